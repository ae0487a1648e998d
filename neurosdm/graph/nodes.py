"""What each NIR node means as a layer: the per-node half of the one translation (:mod:`.program` does the graph
half: order, shapes along the edges, the layers' inputs). The semantics of every node are stated in :mod:`.program`'s
docstring; :func:`translate` sets a :class:`Layer`'s output shape and parameters from its node and input shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import nir
import numpy as np

from neurosdm.dynamics import DECAY_ONE, NeuronParams, Reset, coefficients, state_limit
from neurosdm.errors import GraphError
from neurosdm.graph.dialect import Discretisation, FixedPoint, upsample_factor
from neurosdm.graph.geometry import as_tuple, conv_padding, fanout, out_size

__all__ = ["Layer", "KINDS", "SPIKING", "NEURONS", "layer_kind", "declared_input_shape", "type_shape", "translate",
           "delay_steps", "compact", "mantissas"]

KINDS = {nir.Input: "input", nir.Output: "output", nir.Conv2d: "conv", nir.Conv1d: "gconv", nir.Scale: "scale",
         nir.IF: "if", nir.LI: "li", nir.I: "i", nir.LIF: "lif", nir.CubaLI: "cubali", nir.CubaLIF: "cubalif",
         nir.Affine: "affine", nir.Linear: "affine", nir.SumPool2d: "pool", nir.AvgPool2d: "pool",
         nir.Flatten: "flatten", nir.Threshold: "threshold", nir.Delay: "delay"}
#: kinds whose output is 0/1 spikes
SPIKING = ("if", "lif", "cubalif", "threshold")
#: kinds with a membrane (and, for cubali/cubalif, a synaptic current) that starts at 0 at every call
NEURONS = ("if", "li", "i", "lif", "cubali", "cubalif")

_ELEMENTWISE_PARAMS = {
    "Scale": ("scale",), "Threshold": ("threshold",), "I": ("r",), "IF": ("r", "v_threshold", "v_reset"),
    "LI": ("tau", "r", "v_leak"), "LIF": ("tau", "r", "v_leak", "v_threshold", "v_reset"),
    "CubaLI": ("tau_syn", "tau_mem", "r", "v_leak", "w_in"),
    "CubaLIF": ("tau_syn", "tau_mem", "r", "v_leak", "v_threshold", "v_reset", "w_in"),
    "Delay": ("delay",),
}


def compact(a) -> np.ndarray:
    """``a`` in the smallest dtype that holds every value exactly: int8, int16 or int32 for whole numbers in their
    range (an int8 export's weights: one byte each), else float32 where every value round-trips (a float export's),
    else float64. No copy when ``a`` already has that dtype. Arithmetic is unchanged: the backends compute in their
    own dtype (float64 for the reference and fixed point) and widen a layer's weights when they use them."""
    a = np.asarray(a)
    if a.dtype.kind in "iub" or (a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.array_equal(a, np.rint(a))):
        lo, hi = (a.min(), a.max()) if a.size else (0, 0)
        for dtype in (np.int8, np.int16, np.int32):
            if np.iinfo(dtype).min <= lo and hi <= np.iinfo(dtype).max:
                return a.astype(dtype, copy=False)
    if a.dtype == np.float32:
        return a
    a64 = np.asarray(a, np.float64)
    with np.errstate(over="ignore"):  # beyond float32's range: not exact there, kept float64
        a32 = a64.astype(np.float32)
    return a32 if np.array_equal(a32, a64) else a64


def mantissas(w) -> tuple[np.ndarray, float]:
    """``(m, scale)`` with ``w == m * scale`` exactly, ``scale`` a power of two and ``m`` integers of at most 16 bits
    stored :func:`compact` (a quantised export's 8-bit mantissas and its per-layer exponent: one byte a weight, as
    a chip stores them) where that holds; else ``(values, 1.0)`` in float32 or float64, whichever is exact.
    Multiplying a sum by a power of two is exact, so the backends may scale before or after they sum."""
    a = np.asarray(w, np.float64)
    nz = a[a != 0]
    if nz.size and np.all(np.isfinite(nz)):
        frac, ex = np.frexp(nz)
        k = np.abs(frac * 2.0**53).astype(np.int64)  # the 53-bit significand, an integer
        s = int((ex - 53 + np.log2(k & -k).astype(np.int64)).min())  # the lowest set bit over all values
        m = np.ldexp(a, -s)
        if np.abs(m).max() <= np.iinfo(np.int16).max:
            return compact(m), float(2.0**s)
    c = compact(w)
    return (a if c.dtype == np.int32 else c), 1.0  # int32 would not widen exactly to a float32 engine


@dataclass
class Layer:
    """One node, ready to run. Arrays are float64 and full-shaped (per neuron / element) unless said otherwise;
    conv/affine weights are ``weight * weight_scale`` (:func:`mantissas`: int8 mantissas and a power of two for an
    int8 export; :meth:`dense_weight` gives them as float64) and ``fanout`` is stored :func:`compact`.

    ``sources``: the nodes whose outputs are summed into this layer's input; ``back[j]``: the edge from
    ``sources[j]`` is a back edge (previous step's value). conv/gconv: ``weight [Co, Ci/groups, kh, kw]`` (a Conv1d
    as height 1, ``nd = 1``), ``bias [Co]``, ``stride``, ``padding ((top, bottom), (left, right))``, ``dilation``,
    ``groups``, ``rounded``. affine: ``weight [..., out, in]``, ``bias [..., out]``. pool: ``kernel``, ``stride``,
    ``padding``, ``pool_scale``. conv/gconv/pool/affine: ``fanout`` (integers, input shape: the nonzero synapses each
    input element reaches inside the output; its sum is the layer's MACs per image). threshold: ``threshold``.
    scale: ``scale``. upsample: ``scale_factor``. delay: ``delay`` (int64 steps per element), ``late``. Neurons:
    ``neuron`` (float
    :class:`neurosdm.dynamics.NeuronParams`) or, in fixed point, ``threshold_int``, ``decay_q12``, ``reset``.
    """

    name: str
    kind: str
    sources: list[str]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    input: str = "analog"
    back: list[bool] = field(default_factory=list)
    late: bool = False
    weight: np.ndarray | None = None
    weight_scale: float = 1.0
    bias: np.ndarray | None = None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    nd: int = 2
    kernel: tuple[int, int] = (1, 1)
    pool_scale: float = 1.0
    rounded: bool = False
    fanout: np.ndarray | None = None
    scale: np.ndarray | None = None
    threshold: np.ndarray | None = None
    neuron: NeuronParams | None = None
    threshold_int: Any = None
    decay_q12: int = DECAY_ONE
    reset: Reset = Reset.ZERO
    delay: np.ndarray | None = None
    scale_factor: tuple[int, int] = (1, 1)

    @property
    def size(self) -> int:
        return int(np.prod(self.out_shape))

    @property
    def spiking(self) -> bool:
        return self.kind in SPIKING

    @property
    def v_threshold(self):
        """A neuron layer's firing threshold in the graph's units (``neuron.threshold``, or ``threshold_int`` in
        fixed point)."""
        return self.neuron.threshold if self.neuron is not None else self.threshold_int

    def dense_weight(self) -> np.ndarray:
        """The weights as float64 values (``weight * weight_scale``, exact; a new array unless already float64)."""
        w = np.asarray(self.weight, np.float64)
        return w * self.weight_scale if self.weight_scale != 1.0 else w

    @property
    def macs(self) -> int:
        """Dense synaptic operations of one image and one step (every input, its nonzero fan-out)."""
        return int(self.fanout.sum()) if self.fanout is not None else 0


def delay_steps(delay, dt: float, name: str) -> np.ndarray:
    """A Delay node's ``delay / dt`` as whole steps (int64, per element); :class:`GraphError` if any element is
    negative or not a whole number of steps (to 1e-9 relative)."""
    d = np.asarray(delay, np.float64) / dt
    steps = np.rint(d)
    if not np.all(np.isfinite(d)) or np.any(steps < 0) or \
            not np.allclose(d, steps, rtol=0, atol=1e-9 * max(1.0, float(np.abs(d).max(initial=0)))):
        bad = d[~np.isclose(d, steps, rtol=0, atol=1e-9) | (steps < 0)].reshape(-1)
        raise GraphError(f"node {name!r} (Delay): delay / dt must be a whole number of steps >= 0 for every "
                         f"element; got {bad[:3].tolist()} steps with dt={dt} (choose --dt to match the delays)")
    return steps.astype(np.int64)


def layer_kind(node) -> str | None:
    """The layer kind of a (flattened) node: its exact type's (a subclass may mean something else), or
    ``"upsample"`` for the dialect's up-sampling node; None if unsupported."""
    if upsample_factor(node) is not None:
        return "upsample"
    return KINDS.get(type(node))


def _shape(value) -> tuple[int, ...] | None:
    return None if value is None else tuple(int(v) for v in np.asarray(value).reshape(-1))


def type_shape(types, key: str) -> tuple[int, ...] | None:
    """The shape stored under ``key`` (or the only key) of a nir ``input_type``/``output_type`` dict."""
    if not isinstance(types, dict) or not types:
        return None
    return _shape(types.get(key, next(iter(types.values())) if len(types) == 1 else None))


def declared_input_shape(node) -> tuple[int, ...] | None:
    """The input shape a node declares (None where it declares none or acts element-wise on any shape)."""
    kind = type(node).__name__
    if isinstance(node, (nir.Conv1d, nir.Conv2d)):
        if node.input_shape is None:
            return None
        return (int(node.weight.shape[1]) * int(np.asarray(node.groups).reshape(-1)[0]), *_shape(node.input_shape))
    if isinstance(node, (nir.Affine, nir.Linear)):
        return tuple(int(v) for v in node.weight.shape[:-2]) + (int(node.weight.shape[-1]),)
    if kind in _ELEMENTWISE_PARAMS and all(np.ndim(getattr(node, p)) == 0 for p in _ELEMENTWISE_PARAMS[kind]):
        return None  # scalar parameters: element-wise on any shape
    return type_shape(getattr(node, "input_type", None), "input")


def translate(layer: Layer, node, disc: Discretisation, fixed: FixedPoint | None, late_steps) -> None:
    """Set ``layer.out_shape`` and its parameters from ``node`` and ``layer.in_shape``."""
    name, shape, kind = layer.name, layer.in_shape, type(node).__name__

    def p(fieldname, default=None):
        value = getattr(node, fieldname, None)
        if value is None:
            if default is None:
                raise GraphError(f"node {name!r} ({kind}) has no parameter {fieldname!r}")
            value = default
        arr = np.asarray(value, dtype=np.float64)
        try:
            return np.broadcast_to(arr, shape).copy()
        except ValueError:
            raise GraphError(f"node {name!r} ({kind}): parameter {fieldname!r} has shape {arr.shape}, the node's "
                             f"input has shape {shape}") from None

    layer.out_shape = shape
    if layer.kind in ("input", "output"):
        return
    if isinstance(node, (nir.Affine, nir.Linear)):
        w, layer.weight_scale = mantissas(node.weight)
        b = getattr(node, "bias", None)
        layer.weight = w
        layer.bias = np.zeros(w.shape[:-1]) if b is None else np.broadcast_to(np.asarray(b, np.float64),
                                                                              w.shape[:-1]).copy()
        layer.out_shape = tuple(int(v) for v in w.shape[:-1])
        layer.fanout = compact((w != 0).sum(axis=-2))
    elif isinstance(node, nir.Scale):
        layer.scale = p("scale")
    elif isinstance(node, (nir.Conv1d, nir.Conv2d)):
        _conv(layer, node, fixed)
    elif isinstance(node, (nir.SumPool2d, nir.AvgPool2d)):
        if len(shape) != 3:
            raise GraphError(f"node {name!r} ({kind}) needs a (C, H, W) input, got {shape}")
        layer.kernel = as_tuple(node.kernel_size, 2, "kernel_size", name)
        layer.stride = as_tuple(node.stride if node.stride is not None else layer.kernel, 2, "stride", name)
        ph, pw = as_tuple(node.padding if node.padding is not None else 0, 2, "padding", name)
        layer.padding = ((ph, ph), (pw, pw))
        out_sp = tuple(out_size(n, (q, q), k, 1, s) for n, q, k, s in zip(shape[1:], (ph, pw), layer.kernel,
                                                                          layer.stride))
        if min(out_sp) < 1:
            raise GraphError(f"node {name!r} ({kind}): input {shape} is too small for kernel {layer.kernel}")
        layer.out_shape = (shape[0], *out_sp)
        layer.pool_scale = 1.0 if isinstance(node, nir.SumPool2d) else 1.0 / (layer.kernel[0] * layer.kernel[1])
        layer.fanout = compact(fanout(np.ones((shape[0], 1, *layer.kernel)), shape, layer.stride, layer.padding,
                                      (1, 1), shape[0]))
    elif isinstance(node, nir.Flatten):
        nd = len(shape)
        start, end = int(np.asarray(node.start_dim)), int(np.asarray(node.end_dim))
        s0, e0 = (start + nd if start < 0 else start), (end + nd if end < 0 else end)
        if not 0 <= s0 <= e0 < nd:
            raise GraphError(f"node {name!r} (Flatten): start_dim={start}, end_dim={end} do not fit the batch-free "
                             f"input shape {shape} (NIR's Flatten dims exclude the batch)")
        out = (*shape[:s0], int(np.prod(shape[s0:e0 + 1])), *shape[e0 + 1:])
        declared = type_shape(node.output_type, "output")
        if declared is not None and declared != out:
            raise GraphError(f"node {name!r} (Flatten): output_type {declared} disagrees with flattening {shape} "
                             f"from dim {start} to {end} (= {out})")
        layer.out_shape = out
    elif layer.kind == "upsample":
        if len(shape) != 3:
            raise GraphError(f"node {name!r} (up-sampling) needs a (C, H, W) input, got {shape}")
        layer.scale_factor = upsample_factor(node)
        layer.out_shape = (shape[0], shape[1] * layer.scale_factor[0], shape[2] * layer.scale_factor[1])
        declared = type_shape(node.output_type, "output")
        if declared is not None and declared != layer.out_shape:
            raise GraphError(f"node {name!r} (up-sampling): output_type {declared} disagrees with {shape} up-sampled "
                             f"by {layer.scale_factor}")
    elif isinstance(node, nir.Threshold):
        if fixed is not None:
            raise GraphError(f"node {name!r} ({kind}): fixed-point mode supports the neuron types I, IF and LI")
        layer.threshold = p("threshold")
    elif isinstance(node, nir.Delay):
        steps = late_steps if late_steps is not None else delay_steps(p("delay"), disc.dt, name)
        layer.delay = np.ascontiguousarray(np.broadcast_to(steps, shape))
    elif fixed is not None:
        _fixed_neuron(layer, node, p, disc, fixed)
    else:
        _float_neuron(layer, node, p, disc)


def _conv(layer: Layer, node, fixed: FixedPoint | None) -> None:
    name, shape, kind = layer.name, layer.in_shape, type(node).__name__
    nd = 1 if isinstance(node, nir.Conv1d) else 2
    w, layer.weight_scale = mantissas(node.weight)
    groups = int(np.asarray(node.groups).reshape(-1)[0])
    if w.ndim != nd + 2 or len(shape) != nd + 1:
        raise GraphError(f"node {name!r} ({kind}): weight {w.shape} and input {shape} must have "
                         f"{nd + 2} and {nd + 1} axes")
    if groups < 1 or w.shape[0] % groups or shape[0] != w.shape[1] * groups:
        raise GraphError(f"node {name!r} ({kind}): input has {shape[0]} channels, weight {w.shape} with "
                         f"groups={groups} expects {w.shape[1] * groups} (and C_out divisible by groups)")
    stride = as_tuple(node.stride, nd, "stride", name)
    dilation = as_tuple(node.dilation, nd, "dilation", name)
    padding = conv_padding(node.padding, w.shape[2:], dilation, stride, name)
    if nd == 1:  # a Conv1d runs as a height-1 Conv2d
        w, stride, dilation, padding = w[:, :, None, :], (1, *stride), (1, *dilation), ((0, 0), *padding)
    spatial = shape[1:] if nd == 2 else (1, *shape[1:])
    out_sp = tuple(out_size(n, pd, k, d, s) for n, pd, k, d, s in zip(spatial, padding, w.shape[2:], dilation, stride))
    if min(out_sp) < 1:
        raise GraphError(f"node {name!r} ({kind}): input {shape} is too small for kernel {w.shape[2:]}, "
                         f"padding {padding}, dilation {dilation}, stride {stride}")
    layer.out_shape = (int(w.shape[0]), *(out_sp if nd == 2 else out_sp[1:]))
    if layer.kind == "conv" and (groups != 1 or dilation != (1, 1)):
        layer.kind = "gconv"
    layer.nd, layer.groups, layer.dilation, layer.stride, layer.padding = nd, groups, dilation, stride, padding
    layer.weight = w
    layer.bias = np.zeros(w.shape[0]) if node.bias is None else \
        np.broadcast_to(np.asarray(node.bias, np.float64), (w.shape[0],)).copy()
    layer.rounded = fixed is not None and name in fixed.round_nodes
    layer.fanout = compact(fanout(w, shape, stride, padding, dilation, groups))


def _float_neuron(layer: Layer, node, p, disc: Discretisation) -> None:
    """:class:`NeuronParams` of a float neuron layer; terms that are exactly neutral are left out (exact)."""
    def neutral(a, value):
        return None if np.all(a == value) else a

    cuba = isinstance(node, (nir.CubaLI, nir.CubaLIF))
    n = NeuronParams(reset=disc.reset_kind, strict=disc.strict, cuba=cuba)
    if isinstance(node, (nir.I, nir.IF)):
        n.gain = neutral(p("r") * disc.dt, 1.0)
    else:
        tau = p("tau_mem") if cuba else p("tau")
        decay, gain = coefficients(tau, p("r"), disc.dt, disc.method)
        n.decay, n.gain = neutral(decay, 1.0), neutral(gain, 1.0)
        n.leak = neutral((1.0 - decay) * p("v_leak"), 0.0)
    if cuba:
        syn_decay, syn_gain = coefficients(p("tau_syn"), p("w_in", 1.0), disc.dt, disc.method)
        n.syn_decay, n.syn_gain = neutral(syn_decay, 1.0), neutral(syn_gain, 1.0)
    if layer.kind in SPIKING:
        n.threshold, n.v_reset = p("v_threshold"), p("v_reset", 0.0)
    layer.neuron = n


def _fixed_neuron(layer: Layer, node, p, disc: Discretisation, fixed: FixedPoint) -> None:
    """Fixed-point parameters of an I / IF / LI layer (:class:`FixedPoint`)."""
    name = layer.name
    if not isinstance(node, (nir.I, nir.IF, nir.LI)):
        raise GraphError(f"node {name!r} ({type(node).__name__}): fixed-point mode supports the neuron types I, IF "
                         "and LI")
    if disc.method != "euler" or disc.comparison != ">=":
        raise GraphError("fixed-point mode needs the euler discretisation and the '>=' comparison")
    r = p("r")
    if isinstance(node, nir.LI):
        tau = p("tau")
        if np.any(p("v_leak") != 0):
            raise GraphError(f"node {name!r}: fixed-point mode needs v_leak = 0")
        gain, decay = r * disc.dt / tau, 1.0 - disc.dt / tau
    else:
        gain, decay = r * disc.dt, np.ones(layer.in_shape)
    if not np.allclose(gain, 1.0, rtol=0, atol=1e-9):
        raise GraphError(f"node {name!r}: fixed-point mode needs an input gain of 1 (r dt / tau), got "
                         f"{np.unique(gain)[:3]}")
    dq = np.unique(np.rint(np.asarray(decay) * DECAY_ONE).astype(np.int64))
    if dq.size != 1:
        raise GraphError(f"node {name!r}: fixed-point mode needs one decay per node, got {dq[:3]}")
    layer.decay_q12 = int(dq[0])
    if isinstance(node, nir.IF):
        if np.any(p("v_reset", 0.0) != 0):
            raise GraphError(f"node {name!r}: fixed-point mode needs v_reset = 0")
        thr = p("v_threshold")
        if not np.array_equal(thr, np.rint(thr)):
            bad = thr[np.rint(thr) != thr].flat[0]
            raise GraphError(f"node {name!r}: fixed-point mode got a non-integer value {bad!r} (threshold)")
        layer.threshold_int = compact(thr)
        layer.reset = disc.reset_kind
    else:  # I / LI never fire: the output is the state
        layer.threshold_int = state_limit(fixed.state_bits) + 1
        layer.reset = Reset.ZERO
