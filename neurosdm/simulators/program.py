"""The form of an exported NIR graph that the engines run: layers in evaluation order with their parameters.

``load_program(path_or_graph)`` reads a NIR file (or takes a ``nir.NIRGraph``), checks it with the reference
interpreter's preparation (flattening, ordering, shape inference; so every engine accepts the same graphs and
rejects the same mistakes) and returns a :class:`Program`. The engines (``neurosdm.simulators.torch_engine``,
``neurosdm.simulators.event``) read only the program, i.e. only the .nir file.

Supported node types: the reference interpreter's whole set (Input, Output, Affine, Linear, Scale, Conv1d, Conv2d,
SumPool2d, AvgPool2d, Flatten, Delay, Threshold, I, IF, LI, LIF, CubaLI, CubaLIF, nested NIRGraphs), one rule each
(:class:`Layer`, and the reference module's docstring). Other types raise :class:`GraphError` naming the node; so
do graphs with more than one top-level Input. Recurrent edges (``Layer.back``) deliver the source's output of the
previous step; a late Delay (``Layer.late``) is read from its history and stores its summed input after the step.
Both engines run every kind.

Layer kinds and what a layer's input is (``Layer.input``), which decides how it is computed and counted:

- ``"spikes"``: the layer has exactly one source and it is a spiking layer (``SPIKING``: IF, LIF, CubaLIF,
  Threshold; 0/1 values) or a Flatten of one;
- ``"graded"``: one source, a TSM Scale node (``metadata["scale_tables"]``) whose own source is a spiking layer:
  spikes with a payload ``p[k]``;
- ``"analog"``: anything else (the image, a residual stream, a sum of several sources).

Per-step parameters (``Program.step_params(t)``): diffusion step ``t`` selects the biases of ``bias_tables`` and
spiking step ``k`` those of TSM models and the scales of ``scale_tables``
(``neurosdm.exporters.nir.BIAS_TABLE_RULE`` / ``SCALE_TABLE_RULE``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import nir
import numpy as np

from neurosdm.errors import ConfigError, GraphError
from neurosdm.simulators.reference import Discretisation, FixedPoint, _padding, _prepare, _tuple

__all__ = ["Layer", "Program", "load_program", "KINDS", "SPIKING", "NEURONS"]

KINDS = {nir.Input: "input", nir.Output: "output", nir.Conv2d: "conv", nir.Conv1d: "gconv", nir.Scale: "scale",
         nir.IF: "if", nir.LI: "li", nir.I: "i", nir.LIF: "lif", nir.CubaLI: "cubali", nir.CubaLIF: "cubalif",
         nir.Affine: "affine", nir.Linear: "affine", nir.SumPool2d: "pool", nir.AvgPool2d: "pool",
         nir.Flatten: "flatten", nir.Threshold: "threshold", nir.Delay: "delay"}

#: kinds whose output is 0/1 spikes (a layer reading exactly one of them has ``input == "spikes"``)
SPIKING = ("if", "lif", "cubalif", "threshold")
#: kinds with a membrane (and, for cubali/cubalif, a synaptic current) that starts at 0 at every call
NEURONS = ("if", "li", "i", "lif", "cubali", "cubalif")


@dataclass
class Layer:
    """One node. Arrays are float64 and full-shaped (per neuron / per element) unless said otherwise.

    ``sources`` are the nodes whose outputs are summed into this layer's input; ``back[j]`` is True where the edge
    from ``sources[j]`` closes a cycle (a recurrent edge: it delivers that source's output of the **previous**
    spiking step, zero at the first; the reference interpreter's rule).

    conv (Conv2d, groups 1, dilation 1) / gconv (Conv1d, or Conv2d with dilation or groups): ``weight [Co, Ci /
    groups, kh, kw]`` (a Conv1d is stored as a height-1 Conv2d: ``weight [Co, Ci / groups, 1, k]``, ``nd = 1``),
    ``bias [Co]``, ``stride (sh, sw)``, ``padding ((top, bottom), (left, right))``, ``dilation (dh, dw)``,
    ``groups``; ``rounded``: in fixed point, the output (bias included) is rounded half to even.
    affine (Affine, Linear): ``y = W x + b``, ``weight [..., out, in]``, ``bias [..., out]`` (zeros for Linear).
    pool (SumPool2d, AvgPool2d): ``kernel``, ``stride``, ``padding ((ph, ph), (pw, pw))``; ``y = pool_scale *
    window sum`` (``pool_scale`` 1, or ``1 / (kh kw)`` for AvgPool2d, padding zeros counted).
    flatten: a reshape to ``out_shape`` (NIR's batch-free ``start_dim`` / ``end_dim``, checked by the reference).
    threshold: ``y = [x >= threshold]`` (``disc.comparison``).
    delay: ``y[k] = x[k - delay[e]]`` per element ``e`` (``delay``: int64 steps, input shape). ``late`` (every
    element >= 1 step): the layer is evaluated from its history before its sources and its input (the sum of its
    sources at this step) is stored after the whole step (reference: ``delay_push`` / ``delay_read``).
    scale: ``scale`` (element-wise factor, input shape).
    if / li / i / lif: one float step is ``v <- decay * v + (1 - decay) * v_leak + gain * x`` (then, for IF and
    LIF, compare and reset as the reference interpreter: ``disc.comparison``, ``disc.reset``): IF/I
    ``decay = 1``, ``gain = r dt``; LI/LIF euler ``decay = 1 - dt/tau``, ``gain = r dt / tau``; exp
    ``decay = exp(-dt/tau)``, ``gain = (1 - decay) r``. ``threshold`` and ``v_reset`` (IF/LIF), ``v_leak``
    (zeros for IF/I), ``decay_q12`` (fixed point: ``round(4096 * decay)``, one value per layer, gain 1,
    ``neurosdm.quantize.fixed_point_step``).
    cubali / cubalif: first the current ``i <- syn_decay * i + syn_gain * x`` (``syn_decay`` and ``syn_gain`` as
    ``decay`` and ``gain`` above with ``tau_syn`` and ``r = w_in``, ``v_leak = 0``), then the membrane as LI/LIF
    with ``tau_mem`` driven by the updated ``i`` (the reference's CubaLI/CubaLIF rule).
    """

    name: str
    kind: str
    sources: list[str]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    input: str = "analog"
    back: list[bool] = field(default_factory=list)
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    nd: int = 2
    kernel: tuple[int, int] = (1, 1)
    pool_scale: float = 1.0
    rounded: bool = False
    scale: np.ndarray | None = None
    gain: np.ndarray | None = None
    decay: np.ndarray | None = None
    syn_gain: np.ndarray | None = None
    syn_decay: np.ndarray | None = None
    threshold: np.ndarray | None = None
    v_reset: np.ndarray | None = None
    v_leak: np.ndarray | None = None
    decay_q12: int = 4096
    delay: np.ndarray | None = None
    late: bool = False

    @property
    def size(self) -> int:
        return int(np.prod(self.out_shape))

    @property
    def spiking(self) -> bool:
        return self.kind in SPIKING


@dataclass
class Program:
    """An exported graph ready to run: ``layers`` in evaluation order (sources before consumers)."""

    layers: list[Layer]
    metadata: dict
    num_steps: int
    disc: Discretisation
    fixed: FixedPoint | None
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.by_name = {layer.name: layer for layer in self.layers}

    @property
    def num_diffusion_steps(self) -> int:
        return int(np.asarray(self.metadata.get("num_diffusion_steps", 1)))

    def step_params(self, t: int) -> list[dict[str, dict[str, np.ndarray]]]:
        """Parameter overrides at diffusion step ``t``: a list with one entry per spiking step (or a single entry
        used at every step when nothing varies with the spiking step), each ``{layer: {"bias"|"scale": array}}``."""
        bias = {k: np.asarray(v, np.float64) for k, v in self.metadata.get("bias_tables", {}).items()}
        scale = {k: np.asarray(v, np.float64).reshape(-1) for k, v in self.metadata.get("scale_tables", {}).items()}
        if bias and not 0 <= int(t) < self.num_diffusion_steps:
            raise ConfigError(f"diffusion step must lie in 0..{self.num_diffusion_steps - 1}, got {t}")
        varying = any(v.shape[1] > 1 for v in bias.values()) or any(v.size > 1 for v in scale.values())
        out = []
        for k in range(self.num_steps if varying else 1):
            p: dict[str, dict[str, np.ndarray]] = {}
            for name, table in bias.items():
                p[name] = {"bias": table[int(t) if table.shape[0] > 1 else 0, k if table.shape[1] > 1 else 0]}
            for name, table in scale.items():
                p[name] = {"scale": np.full(self.by_name[name].in_shape, table[k if table.size > 1 else 0])}
            out.append(p)
        return out


def _read(source) -> nir.NIRGraph:
    if isinstance(source, nir.NIRGraph):
        return source
    path = Path(source)
    if not path.exists():
        raise GraphError(f"NIR file not found: {path}")
    from neurosdm.exporters.nir import inspect_nir

    inspect_nir(path)  # one-line errors for files nir cannot read
    return nir.read(path)


def _leak_coefficients(tau: np.ndarray, r: np.ndarray, disc: Discretisation) -> tuple[np.ndarray, np.ndarray]:
    """``(decay, gain)`` of one step of ``tau dv/dt = -v + r x`` (the reference's ``_leak``, written as
    ``v <- decay v + (1 - decay) v_leak + gain x``): euler ``1 - dt/tau, r dt/tau``; exp ``a = exp(-dt/tau), (1-a) r``."""
    if disc.method == "euler":
        return 1.0 - disc.dt / tau, r * disc.dt / tau
    decay = np.exp(-disc.dt / tau)
    return decay, (1.0 - decay) * r


def _flat_nodes(graph: nir.NIRGraph, prefix: str = ""):
    for key, node in graph.nodes.items():
        if isinstance(node, nir.NIRGraph):
            yield from _flat_nodes(node, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", node


def load_program(source: str | os.PathLike | nir.NIRGraph, disc: Discretisation | None = None) -> Program:
    """A :class:`Program` from a NIR file or graph; ``disc`` defaults to the graph's metadata."""
    graph = _read(source)
    if not isinstance(graph, nir.NIRGraph):
        raise GraphError(f"expected a nir.NIRGraph, got {type(graph).__name__}")
    metadata = dict(graph.metadata or {})
    disc = disc or Discretisation.from_metadata(metadata)
    fixed = FixedPoint.from_metadata(metadata)
    for name, node in _flat_nodes(graph):
        if type(node) not in KINDS:
            raise GraphError(f"node {name!r} has type {type(node).__name__}, which the engines do not support "
                             f"(supported: {', '.join(sorted({t.__name__ for t in KINDS} | {'NIRGraph'}))})")
    ops, edges, back, incoming, top_inputs, top_outputs = _prepare(graph, disc, fixed)
    if len(top_inputs) != 1:
        raise GraphError(f"the engines run graphs with exactly one top-level Input node; this one has "
                         f"{sorted(top_inputs)}")
    scale_tables = set(metadata.get("scale_tables", {}))
    kinds: dict[str, str] = {}
    for op in ops:
        kinds[op.name] = "input" if op.role == "input" else "output" if op.role == "output" else KINDS[type(op.node)]
    def carries_spikes(name: str, seen: frozenset = frozenset()) -> bool:
        """A spiking layer, or a Flatten (a reshape) or Delay of exactly one layer that carries spikes."""
        if kinds[name] in SPIKING:
            return True
        return kinds[name] in ("flatten", "delay") and len(incoming[name]) == 1 and name not in seen and \
            carries_spikes(edges[incoming[name][0]][0], seen | {name})

    layers = []
    for op in ops:
        node = op.node
        kind = kinds[op.name]
        sources = [edges[i][0] for i in incoming[op.name]]
        layer = Layer(op.name, kind, sources, tuple(op.in_shape), tuple(op.out_shape),
                      back=[i in back for i in incoming[op.name]], late=op.late)
        if len(sources) == 1 and carries_spikes(sources[0]):
            layer.input = "spikes"
        elif len(sources) == 1 and sources[0] in scale_tables and len(incoming[sources[0]]) == 1 \
                and kinds[edges[incoming[sources[0]][0]][0]] in SPIKING:
            layer.input = "graded"
        shape = op.in_shape

        def p(name, default=None):
            value = getattr(node, name, None)
            if value is None:
                if default is None:  # (the reference's preparation has already refused a missing parameter)
                    raise GraphError(f"node {op.name!r} ({type(node).__name__}) has no parameter {name!r}")
                value = default
            return np.broadcast_to(np.asarray(value, np.float64), shape).copy()

        if kind in ("conv", "gconv"):
            nd = 1 if isinstance(node, nir.Conv1d) else 2
            w = np.asarray(node.weight, np.float64)
            groups = int(np.asarray(node.groups).reshape(-1)[0])
            stride = _tuple(node.stride, nd, "stride", op.name)
            dilation = _tuple(node.dilation, nd, "dilation", op.name)
            padding = _padding(node.padding, w.shape[2:], dilation, stride, op.name)
            if nd == 1:  # a Conv1d runs as a height-1 Conv2d (as the reference does)
                w, stride, dilation, padding = w[:, :, None, :], (1, *stride), (1, *dilation), ((0, 0), *padding)
            if kind == "conv" and (groups != 1 or dilation != (1, 1)):
                kind = layer.kind = "gconv"
            layer.nd, layer.groups, layer.dilation = nd, groups, dilation
            layer.stride, layer.padding = stride, padding
            layer.weight = w
            layer.bias = np.zeros(w.shape[0]) if node.bias is None else \
                np.broadcast_to(np.asarray(node.bias, np.float64), (w.shape[0],)).copy()
            layer.rounded = fixed is not None and op.name in fixed.round_nodes
        elif kind == "affine":
            w = np.asarray(node.weight, np.float64)
            b = getattr(node, "bias", None)
            layer.weight = w
            layer.bias = np.zeros(w.shape[:-1]) if b is None else \
                np.broadcast_to(np.asarray(b, np.float64), w.shape[:-1]).copy()
        elif kind == "pool":
            layer.kernel = _tuple(node.kernel_size, 2, "kernel_size", op.name)
            layer.stride = _tuple(node.stride if node.stride is not None else layer.kernel, 2, "stride", op.name)
            ph, pw = _tuple(node.padding if node.padding is not None else 0, 2, "padding", op.name)
            layer.padding = ((ph, ph), (pw, pw))
            layer.pool_scale = 1.0 if isinstance(node, nir.SumPool2d) else 1.0 / (layer.kernel[0] * layer.kernel[1])
        elif kind == "threshold":
            layer.threshold = p("threshold")
        elif kind == "delay":
            layer.delay = np.broadcast_to(op.delay, shape).copy()
        elif kind == "scale":
            layer.scale = p("scale")
        elif kind in NEURONS:
            if kind in ("li", "lif"):
                layer.decay, layer.gain = _leak_coefficients(p("tau"), p("r"), disc)
                layer.v_leak = p("v_leak")
            elif kind in ("cubali", "cubalif"):
                layer.syn_decay, layer.syn_gain = _leak_coefficients(p("tau_syn"), p("w_in", 1.0), disc)
                layer.decay, layer.gain = _leak_coefficients(p("tau_mem"), p("r"), disc)
                layer.v_leak = p("v_leak")
            else:
                layer.gain = p("r") * disc.dt
                layer.decay = np.ones(shape)
                layer.v_leak = np.zeros(shape)
            if kind in SPIKING:
                layer.threshold = p("v_threshold")
                layer.v_reset = p("v_reset", 0.0)
            if fixed is not None:
                q = np.unique(np.rint(np.asarray(layer.decay) * 4096))
                if q.size != 1 or not np.allclose(layer.gain, 1.0):
                    raise GraphError(f"node {op.name!r}: fixed point needs one decay per layer and gain 1")
                layer.decay_q12 = int(q[0])
        layers.append(layer)
    num_steps = int(np.asarray(metadata.get("num_steps", 1)))
    return Program(layers, metadata, num_steps, disc, fixed, list(top_inputs), list(top_outputs))
