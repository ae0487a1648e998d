"""Plain, dense numpy reference interpreter for NIR graphs (nir 1.0.8).

This is the independent baseline: an exported graph must reproduce the torch model here, and the real engines
(event-driven, clocked torch) must reproduce this. It is written for clarity, not speed: float64 throughout,
every node evaluated densely at every step.

Time is discrete. One call of :func:`run_graph` runs ``num_steps`` steps from a zero state (every membrane,
synaptic current and recurrent edge starts at 0; the SDM rule "reset all neuron state after every network call").
Layout: every array is time-first, ``[num_steps, batch, *shape]``; NIR shapes exclude the batch dimension, so a
node declared with shape ``(C, H, W)`` carries ``[num_steps, batch, C, H, W]``.

Graph semantics
---------------
- **Edges** are identity connections. Several edges into one node are **summed** (the only addition in NIR);
  a node without incoming edges receives zeros of its declared input shape.
- **Evaluation order.** A depth-first search over the edges marks the edges that close a cycle (back edges: an
  edge into a node that is still on the DFS stack, self-loops included). The search starts from the ``Input``
  nodes in sorted name order, then from every node not yet visited (nodes without incoming edges first), each
  in sorted name order, and visits successors in sorted name order, so the result does not depend on the order
  of ``graph.nodes`` (``nir.read`` returns nodes alphabetically). Within one step the nodes are evaluated in
  reverse DFS post-order, a topological order of the remaining (feed-forward) edges. A back edge delivers its
  source's output of the **previous step** (zero at step 0, not the source applied to zeros: an Affine's bias
  first arrives through a back edge at step 1): one step of delay around every cycle, as NIR's torch readers
  (snnTorch's RLeaky, nirtorch) evaluate recurrent graphs. Feed-forward edges deliver the current step's value.
- **Nested graphs** are flattened before the run: a ``NIRGraph`` node ``sub`` with nodes ``a, b`` becomes nodes
  ``sub.a, sub.b`` (names joined with ``.``, recursively). The sub-graph's ``Input`` and ``Output`` nodes stay
  as identity nodes (``sub.<input>``, ``sub.<output>``): a parent edge ``(x, sub)`` ends at the sub-graph's
  Input node and a parent edge ``(sub, y)`` starts at its Output node, so a sub-graph used in an edge needs
  exactly one Input (resp. Output) node. ``records`` use the flattened names.
- **Shapes** are inferred once before the run (topological order) and every edge is checked: the source's output
  shape must equal the destination's declared input shape, or, where a node declares none (Conv without
  ``input_shape``, pooling, Flatten without ``input_type``), the shape the first incoming edge brings.
  A node whose parameters are all 0-d (scalar) arrays acts element-wise on whatever shape arrives.

Node semantics (``x`` is the summed input at this step, ``y`` the output)
-------------------------------------------------------------------------
- ``Input``, ``Output``: ``y = x``.
- ``Affine``: ``y = W x + b`` (``W`` is ``[out, in]``; leading weight axes, if any, are batched as in NIR's
  ``input_type = weight.shape[:-2] + (in,)``). ``Linear``: ``y = W x``. ``Scale``: ``y = s * x`` (element-wise).
- ``Conv1d`` / ``Conv2d``: cross-correlation as ``torch.nn.functional.conv1d/conv2d``: ``weight`` is
  ``[C_out, C_in / groups, k...]``, ``stride``, ``dilation`` (int or per-axis), ``padding`` (int, per-axis, or
  ``'valid'`` = 0, or ``'same'`` = total ``dilation * (k - 1)`` zeros per axis, ``floor(total / 2)`` before and
  the rest after, as torch; ``'same'`` needs stride 1), ``groups``, ``bias [C_out]`` (None = 0). Output size per
  axis: ``floor((n + pad_before + pad_after - dilation (k - 1) - 1) / stride) + 1``.
  The declared input channels of a conv are ``weight.shape[1] * groups`` (nir 1.0.8's ``input_type`` uses
  ``weight.shape[1]``, which is wrong for ``groups > 1``; that is not used here).
- ``SumPool2d``: zero padding ``padding`` on each side, then the sum over each ``kernel_size`` window moved by
  ``stride`` (output size as for a conv with dilation 1). ``AvgPool2d``: the same sum divided by
  ``kernel_h * kernel_w`` (padding zeros counted: torch's ``count_include_pad=True``; NIR: SumPooling; Scale).
- ``Flatten(input_type, start_dim, end_dim)``: in nir 1.0.8 ``start_dim`` and ``end_dim`` index the **batch-free**
  shape (``nir.ir.utils.calc_flatten_output`` computes the node's ``output_type`` from ``input_type``, which has no
  batch axis); negative values count from the end. So ``(C, H, W)`` with ``start_dim=0, end_dim=-1`` gives
  ``(C*H*W,)``, and NIR's default ``start_dim=1`` gives ``(C, H*W)``. This differs from ``torch.nn.Flatten``,
  whose dims include the batch; the torch readers that pass the dims to ``torch.nn.Flatten`` unchanged are off by
  one for graphs written this way. The node's ``output_type``, where defined, is checked against this rule.
- ``Delay(delay)``: ``y[k] = x[k - d]`` (0 for ``k < d``) per element, ``d = delay / dt`` steps, which must be
  a whole number ``>= 0`` for every element (else :class:`GraphError`). A Delay whose every element delays by at
  least one step does not need this step's input: its incoming edges do not constrain the evaluation order (the
  node is evaluated from its buffer, and its input is summed and stored after every node of the step has run),
  so a cycle through it has exactly the latency of its delays, with no extra step of the back-edge rule. A Delay
  with a zero element is an ordinary node (a cycle through it gets the one step of delay of its back edge). A
  scalar ``delay`` acts element-wise on whatever shape arrives; a scalar Delay of at least one step must then
  declare its ``input_type``, since no edge brings its shape before it runs.
- ``Threshold``: ``y = [x >= threshold]`` (or ``>``, see :class:`Discretisation`), as 0.0/1.0.

Neurons (state starts at 0; ``dt``, the method, the reset rule and the comparison come from
:class:`Discretisation`; all parameters are per-neuron arrays broadcast over the batch). Per step, a spiking
neuron first integrates, then compares the **updated** membrane with ``v_threshold`` and, where it fires, resets;
the spike is the output of the same step (no extra step of delay; the rule of ``neurosdm.neurons.functional``,
spikingjelly, and snnTorch with ``reset_delay=False``)::

    v  <- charge(v, x)                      see below, per neuron type and method
    s  =  [v >= v_threshold]                (comparison ">="; or [v > v_threshold] with ">")
    v  <- v_reset                 where s   (reset "zero": reset to the value v_reset)
    v  <- v - (v_threshold - v_reset) * s   (reset "subtract")

Reset by subtraction removes ``v_threshold - v_reset``: the amount a reset to ``v_reset`` removes from a membrane
sitting exactly at the threshold, so both rules agree there and the surplus above threshold is kept. With
``v_reset = 0`` (``neurosdm.neurons``, spikingjelly's and snnTorch's soft reset) this is ``v - v_threshold``.

Charge, with ``a = exp(-dt / tau)``:

- ``I`` (integrator, ``dv/dt = R I``, output ``v``) and ``IF`` (``I`` then threshold): ``v <- v + dt * R * x``
  under both methods (forward Euler and the exact solution coincide for piecewise-constant input). NIR's docs
  fix no discretisation for IF ("backends are free to implement as they want"). With ``dt = 1`` and ``r = 1``
  this rule is ``v <- v + x``, which is how the frameworks read or write ``nir.IF``: Norse's importer builds an
  ``IAFCell`` (``r`` ignored with a warning, ``dt`` "unused, but added for compatibility"; older Norse releases
  also fire on the membrane before this step's input, one step late), snnTorch's a ``Leaky(beta=1)`` (asserts
  ``r = 1``), spikingjelly's ``IFNode`` exports as ``IF(r=1)``. Those readers ignore ``dt`` for IF, so they agree
  with this rule only when ``r * dt = 1``: neurosdm's exporter should write ``dt = 1`` and ``r = 1``.
- ``LI`` (``tau dv/dt = (v_leak - v) + R I``, output ``v``) and ``LIF`` (``LI`` then threshold):
  euler: ``v <- v + dt / tau * (v_leak - v + R x)`` (Norse's ``LIFBoxCell``/``LIBoxCell``, snnTorch's import with
  ``beta = 1 - dt / tau`` and input scale ``R dt / tau``); exp: ``v <- v_leak + (v - v_leak) * a + (1 - a) * R x``.
  With ``v_leak = 0`` euler is ``neurosdm.neurons.functional``'s ``h = decay * v + x'`` with
  ``decay = 1 - dt / tau`` and ``x' = R dt / tau * x``.
- ``CubaLI`` (output ``v``) and ``CubaLIF``: a synaptic current ``tau_syn di/dt = -i + w_in x`` drives the
  membrane ``tau_mem dv/dt = (v_leak - v) + R i``. The current is updated first and the membrane sees the
  updated current of the same step (Norse's CubaLIF order): euler:
  ``i <- i + dt / tau_syn * (w_in x - i)``, ``v <- v + dt / tau_mem * (v_leak - v + R i)``; exp (each stage
  exact for a drive held constant over the step, not the exact solution of the coupled pair):
  ``i <- i a_syn + (1 - a_syn) w_in x``, ``v <- v_leak + (v - v_leak) a_mem + (1 - a_mem) R i``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

import nir
import numpy as np

from neurosdm.errors import ConfigError, GraphError

__all__ = ["GraphError", "Discretisation", "FixedPoint", "run_graph", "METHODS", "RESETS", "COMPARISONS"]

METHODS = ("euler", "exp")
RESETS = ("zero", "subtract")
COMPARISONS = (">=", ">")

# spellings accepted in graph metadata (other frameworks' and neurosdm.neurons' names) -> canonical value
_METHOD_ALIASES = {"euler": "euler", "forward_euler": "euler", "forward-euler": "euler",
                   "exp": "exp", "exact": "exp", "exponential": "exp", "zoh": "exp"}
_RESET_ALIASES = {"zero": "zero", "hard": "zero", "value": "zero", "to_value": "zero", "reset_value": "zero",
                  "subtract": "subtract", "subtraction": "subtract", "soft": "subtract", "reset_subtract": "subtract"}



def _as_str(value: Any) -> str:
    """A string from metadata as ``nir.read`` returns it (str, bytes, 0-d numpy array)."""
    if isinstance(value, np.ndarray):
        value = value.item() if value.ndim == 0 else value.tolist()
    if isinstance(value, bytes):
        value = value.decode("utf8")
    return str(value).strip()


@dataclass
class Discretisation:
    """How the continuous-time NIR neurons become one discrete step (see the module docstring for the equations).

    dt:         step length, in the unit of the graph's time constants (neurosdm writes ``tau`` in steps: dt = 1).
    method:     ``"euler"`` (forward Euler, as NIR's reference frameworks) or ``"exp"`` (exact exponential decay
                for an input held constant over the step).
    reset:      ``"zero"``: a neuron that fires is set to ``v_reset``; ``"subtract"``: ``v -= v_threshold - v_reset``.
    comparison: ``">="`` (neurosdm, spikingjelly) or ``">"`` (NIR's equations, Norse, snnTorch), for the spiking
                neurons and the ``Threshold`` node.
    """

    dt: float = 1.0
    method: str = "euler"
    reset: str = "zero"
    comparison: str = ">="

    def __post_init__(self):
        try:
            self.dt = float(self.dt)
        except (TypeError, ValueError):
            raise ConfigError(f"dt must be a number, got {self.dt!r}") from None
        if not np.isfinite(self.dt) or self.dt <= 0:
            raise ConfigError(f"dt must be a positive number, got {self.dt}")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.reset not in RESETS:
            raise ConfigError(f"reset must be one of {RESETS}, got {self.reset!r}")
        if self.comparison not in COMPARISONS:
            raise ConfigError(f"comparison must be one of {COMPARISONS}, got {self.comparison!r}")

    @classmethod
    def from_metadata(cls, metadata: dict | None, **overrides) -> "Discretisation":
        """Read ``dt``, ``reset``, ``comparison`` and ``discretisation`` (the method) from a graph's metadata.

        Missing keys keep the defaults; values may be as ``nir.read`` returns them (bytes, numpy scalars).
        Accepted spellings: reset ``zero|hard|value|to_value|reset_value`` and
        ``subtract|subtraction|soft|reset_subtract``; method ``euler|forward_euler|forward-euler`` and
        ``exp|exact|exponential|zoh``. Keyword ``overrides`` (the dataclass fields) win over the metadata.
        """
        metadata = dict(metadata or {})
        kwargs: dict[str, Any] = {}
        if "dt" in metadata:
            dt = metadata["dt"]
            kwargs["dt"] = float(np.asarray(dt).reshape(-1)[0]) if np.size(dt) == 1 else dt
        if "reset" in metadata:
            name = _as_str(metadata["reset"]).lower()
            if name not in _RESET_ALIASES:
                raise ConfigError(f"metadata reset {name!r} is not one of {sorted(_RESET_ALIASES)}")
            kwargs["reset"] = _RESET_ALIASES[name]
        if "comparison" in metadata:
            kwargs["comparison"] = _as_str(metadata["comparison"])
        if "discretisation" in metadata:
            name = _as_str(metadata["discretisation"]).lower()
            if name not in _METHOD_ALIASES:
                raise ConfigError(f"metadata discretisation {name!r} is not one of {sorted(_METHOD_ALIASES)}")
            kwargs["method"] = _METHOD_ALIASES[name]
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise ConfigError(f"unknown Discretisation field(s) {sorted(unknown)}; known: {sorted(known)}")
        kwargs.update(overrides)
        return cls(**kwargs)


@dataclass
class FixedPoint:
    """Integer arithmetic of a quantised neurosdm export (``metadata["quant"]``; see
    :mod:`neurosdm.exporters.fixed_point`). Values are integers held in float64 (exact below 2**53):

    - nodes in ``round_nodes`` (convs reading graded values) round their output half to even;
    - ``IF``, ``I`` and ``LI`` run :func:`neurosdm.quantize.fixed_point_step`: state saturating at
      ``+-(2**(state_bits-1) - 1)``; ``LI`` decays by ``decay_q12 = round(4096 (1 - dt/tau))`` with the product
      rounded toward zero (Loihi); its input gain ``r dt / tau`` (1 for ``IF``/``I``: ``r dt``) must be 1;
      thresholds must be integers; IF fires on ``>=`` and resets to 0 or by subtraction;
    - other neuron types are refused. Saturations are counted per node (``run_graph(...)["saturations"]``).
    """

    state_bits: int = 24
    round_nodes: frozenset = frozenset()

    @classmethod
    def from_metadata(cls, metadata: dict | None) -> "FixedPoint | None":
        """The fixed-point rules of a quantised export, or None for a float graph."""
        q = (metadata or {}).get("quant")
        if not isinstance(q, dict):
            return None
        rounded = q.get("round_nodes", {})
        return cls(int(np.asarray(q["state_bits"]).reshape(-1)[0]), frozenset(rounded))


# ----------------------------------------------------------------------------------------------- array kernels


def _tuple(value, n: int, what: str, name: str) -> tuple[int, ...]:
    """An int or a per-axis sequence (list, numpy array as nir.read returns it) as ``n`` ints."""
    arr = np.asarray(value).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, n)
    if arr.size != n:
        raise GraphError(f"node {name!r}: {what} {value!r} must be an int or {n} ints")
    return tuple(int(v) for v in arr)


def _padding(padding, kernel, dilation, stride, name: str) -> tuple[tuple[int, int], ...]:
    """Per axis ``(before, after)`` zero padding for an int / per-axis / 'same' / 'valid' padding (torch rules)."""
    n = len(kernel)
    if isinstance(padding, np.ndarray) and padding.dtype.kind in "SUO" and padding.size == 1:
        padding = padding.reshape(-1)[0]
    if isinstance(padding, (bytes, str)):
        mode = _as_str(padding).lower()
        if mode == "valid":
            return tuple((0, 0) for _ in range(n))
        if mode == "same":
            if any(s != 1 for s in stride):
                raise GraphError(f"node {name!r}: padding 'same' needs stride 1, got stride {stride}")
            total = [d * (k - 1) for k, d in zip(kernel, dilation)]
            return tuple((t // 2, t - t // 2) for t in total)
        raise GraphError(f"node {name!r}: padding must be 'same', 'valid' or ints, got {padding!r}")
    return tuple((p, p) for p in _tuple(padding, n, "padding", name))


def _out_size(n: int, pad: tuple[int, int], k: int, d: int, s: int) -> int:
    return (n + pad[0] + pad[1] - d * (k - 1) - 1) // s + 1


def conv2d(x: np.ndarray, weight: np.ndarray, bias, stride, padding, dilation, groups: int) -> np.ndarray:
    """Cross-correlation of ``x [B, C_in, H, W]`` with ``weight [C_out, C_in/groups, kh, kw]`` (float64).

    ``padding`` is ``((top, bottom), (left, right))`` zeros; the rest as ``torch.nn.functional.conv2d``. One
    einsum per kernel tap (``kh * kw`` of them) over the strided, dilated window of the padded input.
    """
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    B, C, H, W = x.shape
    c_out, c_g, kh, kw = w.shape
    (pt, pb), (pl, pr) = padding
    sh, sw = stride
    dh, dw = dilation
    ho, wo = _out_size(H, (pt, pb), kh, dh, sh), _out_size(W, (pl, pr), kw, dw, sw)
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    xg = xp.reshape(B, groups, c_g, xp.shape[2], xp.shape[3])
    wg = w.reshape(groups, c_out // groups, c_g, kh, kw)
    out = np.zeros((B, groups, c_out // groups, ho, wo))
    for ky in range(kh):
        for kx in range(kw):
            y0, x0 = ky * dh, kx * dw
            window = xg[:, :, :, y0:y0 + sh * (ho - 1) + 1:sh, x0:x0 + sw * (wo - 1) + 1:sw]
            out += np.einsum("goc,bgchw->bgohw", wg[:, :, :, ky, kx], window)
    out = out.reshape(B, c_out, ho, wo)
    if bias is not None:
        out = out + np.asarray(bias, dtype=np.float64).reshape(-1, 1, 1)
    return out


def sum_pool2d(x: np.ndarray, kernel, stride, padding) -> np.ndarray:
    """Sum over ``kernel`` windows of ``x [B, C, H, W]`` zero-padded by ``padding = (ph, pw)`` on each side."""
    x = np.asarray(x, dtype=np.float64)
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    B, C, H, W = x.shape
    ho, wo = _out_size(H, (ph, ph), kh, 1, sh), _out_size(W, (pw, pw), kw, 1, sw)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    out = np.zeros((B, C, ho, wo))
    for ky in range(kh):
        for kx in range(kw):
            out += xp[:, :, ky:ky + sh * (ho - 1) + 1:sh, kx:kx + sw * (wo - 1) + 1:sw]
    return out


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


def delay_push(history: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Shift a Delay's history ``[D + 1, B, *shape]`` (``history[j]`` = the input ``j`` steps ago) by one step
    with ``x`` as the newest input."""
    return np.concatenate([x[None], history[:-1]]) if history.shape[0] > 1 else x[None].copy()


def delay_read(history: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``y[b, e] = history[index[e], b, e]``: the input ``index[e]`` steps before the newest one stored."""
    idx = np.broadcast_to(index, history.shape[2:])[None, None]
    return np.take_along_axis(history, np.broadcast_to(idx, (1, *history.shape[1:])), axis=0)[0]


# -------------------------------------------------------------------------------------------- node compilation

_Step = Callable[[np.ndarray, Any], tuple[np.ndarray, Any]]


@dataclass
class _Op:
    """One flattened node, ready to run: ``init(batch) -> state`` and ``step(x, state) -> (y, state)``."""

    name: str
    node: Any
    role: str  # "input" (a top-level Input), "output" (a top-level Output), "node" (everything else)
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    init: Callable[[int], Any] | None = None
    step: _Step | None = None
    saturations: int = 0
    late: bool = False  # a Delay of >= 1 step everywhere: evaluated from its buffer, input stored after the step
    delay: np.ndarray | None = None  # Delay: steps per element (int64)


def _shape(value) -> tuple[int, ...] | None:
    if value is None:
        return None
    return tuple(int(v) for v in np.asarray(value).reshape(-1))


def _type_shape(types, key: str) -> tuple[int, ...] | None:
    """The shape stored under ``key`` (or the only key) of a nir ``input_type``/``output_type`` dict."""
    if not isinstance(types, dict) or not types:
        return None
    value = types.get(key, next(iter(types.values())) if len(types) == 1 else None)
    return _shape(value)


_ELEMENTWISE_PARAMS = {
    "Scale": ("scale",), "Threshold": ("threshold",), "I": ("r",), "IF": ("r", "v_threshold", "v_reset"),
    "LI": ("tau", "r", "v_leak"), "LIF": ("tau", "r", "v_leak", "v_threshold", "v_reset"),
    "CubaLI": ("tau_syn", "tau_mem", "r", "v_leak", "w_in"),
    "CubaLIF": ("tau_syn", "tau_mem", "r", "v_leak", "v_threshold", "v_reset", "w_in"),
    "Delay": ("delay",),
}


def _declared_input_shape(node) -> tuple[int, ...] | None:
    """The input shape a node declares (None where it declares none or acts element-wise on any shape)."""
    kind = type(node).__name__
    if isinstance(node, (nir.Conv1d, nir.Conv2d)):
        if node.input_shape is None:
            return None
        spatial = _shape(node.input_shape)
        return (int(node.weight.shape[1]) * int(np.asarray(node.groups).reshape(-1)[0]), *spatial)
    if isinstance(node, (nir.Affine, nir.Linear)):
        return tuple(int(v) for v in node.weight.shape[:-2]) + (int(node.weight.shape[-1]),)
    if kind in _ELEMENTWISE_PARAMS:
        if all(np.ndim(getattr(node, p)) == 0 for p in _ELEMENTWISE_PARAMS[kind]):
            return None  # scalar parameters: element-wise on any shape
    return _type_shape(getattr(node, "input_type", None), "input")


def _param(node, field: str, name: str, shape: tuple[int, ...], default=None) -> np.ndarray:
    value = getattr(node, field, None)
    if value is None:
        if default is None:
            raise GraphError(f"node {name!r} ({type(node).__name__}) has no parameter {field!r}")
        value = default
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim and arr.shape != shape:
        try:
            np.broadcast_to(arr, shape)
        except ValueError:
            raise GraphError(f"node {name!r} ({type(node).__name__}): parameter {field!r} has shape {arr.shape}, "
                             f"the node's input has shape {shape}") from None
    return arr


def _stateless(fn: Callable[[np.ndarray], np.ndarray]):
    return (lambda batch: None), (lambda x, state: (fn(x), None))


def _fire(v: np.ndarray, v_th: np.ndarray, v_reset: np.ndarray, disc: Discretisation):
    """Compare, then reset: returns ``(spikes 0/1, v after reset)``."""
    s = (v >= v_th) if disc.comparison == ">=" else (v > v_th)
    if disc.reset == "zero":
        v = np.where(s, v_reset, v)
    else:
        v = v - (v_th - v_reset) * s
    return s.astype(np.float64), v


def _leak(v, x_drive, v_leak, tau, disc: Discretisation):
    """One step of ``tau dv/dt = (v_leak - v) + drive`` (``x_drive = R I``) by the chosen method."""
    if disc.method == "euler":
        return v + disc.dt / tau * (v_leak - v + x_drive)
    a = np.exp(-disc.dt / tau)
    return v_leak + (v - v_leak) * a + (1.0 - a) * x_drive


def _integers(x: np.ndarray, name: str) -> np.ndarray:
    xi = np.rint(x)
    if not np.array_equal(xi, x):
        raise GraphError(f"node {name!r}: fixed-point mode got a non-integer value {x[xi != x].flat[0]!r}")
    return xi.astype(np.int64)


def _fixed_neuron(op: _Op, gain: np.ndarray, decay_q12, v_th, reset: str, fixed: FixedPoint, spiking: bool):
    """``op.step`` for a fixed-point I/IF/LI node (:class:`FixedPoint`)."""
    from neurosdm.quantize import fixed_point_step, state_limit

    if not np.allclose(gain, 1.0, rtol=0, atol=1e-9):
        raise GraphError(f"node {op.name!r}: fixed-point mode needs an input gain of 1 (r dt / tau), got "
                         f"{np.unique(gain)[:3]}")
    dq = np.unique(np.asarray(decay_q12, np.int64))
    if dq.size != 1:
        raise GraphError(f"node {op.name!r}: fixed-point mode needs one decay per node, got {dq[:3]}")
    thr = _integers(np.asarray(v_th, np.float64), op.name) if spiking else state_limit(fixed.state_bits) + 1

    def step(x, v):
        s, v_new, sat = fixed_point_step(v, _integers(x, op.name), thr, int(dq[0]), reset, fixed.state_bits)
        op.saturations += int(sat.sum())
        out = s.astype(np.float64) if spiking else v_new.astype(np.float64)
        return out, v_new

    op.init = lambda batch: np.zeros((batch, *op.in_shape), np.int64)
    op.step = step


def _compile(op: _Op, disc: Discretisation, fixed: FixedPoint | None = None) -> None:
    """Set ``op.out_shape``, ``op.init`` and ``op.step`` from the node and ``op.in_shape`` (float semantics, or
    the integer arithmetic of ``fixed``)."""
    node, name, shape = op.node, op.name, op.in_shape
    kind = type(node).__name__
    if fixed is not None and isinstance(node, (nir.I, nir.IF, nir.LI)) and op.role == "node":
        from neurosdm.quantize import DECAY_ONE

        op.out_shape = shape
        if disc.method != "euler" or disc.comparison != ">=":
            raise GraphError("fixed-point mode needs the euler discretisation and the '>=' comparison")
        r = _param(node, "r", name, shape)
        if isinstance(node, nir.LI):
            tau = _param(node, "tau", name, shape)
            if np.any(_param(node, "v_leak", name, shape) != 0):
                raise GraphError(f"node {name!r}: fixed-point mode needs v_leak = 0")
            _fixed_neuron(op, r * disc.dt / tau, np.rint((1.0 - disc.dt / tau) * DECAY_ONE), None, "hard", fixed,
                          False)
        else:
            spiking = isinstance(node, nir.IF)
            v_th = _param(node, "v_threshold", name, shape) if spiking else None
            if spiking and np.any(_param(node, "v_reset", name, shape, default=0.0) != 0):
                raise GraphError(f"node {name!r}: fixed-point mode needs v_reset = 0")
            _fixed_neuron(op, r * disc.dt, DECAY_ONE, v_th, "hard" if disc.reset == "zero" else "subtract", fixed,
                          spiking)
        return
    if fixed is not None and isinstance(node, (nir.LIF, nir.CubaLI, nir.CubaLIF, nir.Threshold)):
        raise GraphError(f"node {name!r} ({kind}): fixed-point mode supports the neuron types I, IF and LI")
    zeros = (lambda batch: np.zeros((batch, *shape)))

    def p(field, default=None):
        return _param(node, field, name, shape, default)

    if op.role in ("input", "output") or isinstance(node, (nir.Input, nir.Output)):
        op.out_shape = shape
        op.init, op.step = _stateless(lambda x: x)
    elif isinstance(node, (nir.Affine, nir.Linear)):
        w = np.asarray(node.weight, dtype=np.float64)
        b = getattr(node, "bias", None)
        b = np.zeros(w.shape[:-1]) if b is None else np.broadcast_to(np.asarray(b, dtype=np.float64), w.shape[:-1])
        op.out_shape = tuple(int(v) for v in w.shape[:-1])
        op.init, op.step = _stateless(lambda x: np.matmul(w, x[..., None])[..., 0] + b)
    elif isinstance(node, nir.Scale):
        s = p("scale")
        op.out_shape = shape
        op.init, op.step = _stateless(lambda x: x * s)
    elif isinstance(node, (nir.Conv1d, nir.Conv2d)):
        nd = 1 if isinstance(node, nir.Conv1d) else 2
        w = np.asarray(node.weight, dtype=np.float64)
        groups = int(np.asarray(node.groups).reshape(-1)[0])
        if w.ndim != nd + 2 or len(shape) != nd + 1:
            raise GraphError(f"node {name!r} ({kind}): weight {w.shape} and input {shape} must have "
                             f"{nd + 2} and {nd + 1} axes")
        if groups < 1 or w.shape[0] % groups or shape[0] != w.shape[1] * groups:
            raise GraphError(f"node {name!r} ({kind}): input has {shape[0]} channels, weight {w.shape} with "
                             f"groups={groups} expects {w.shape[1] * groups} (and C_out divisible by groups)")
        stride = _tuple(node.stride, nd, "stride", name)
        dilation = _tuple(node.dilation, nd, "dilation", name)
        pad = _padding(node.padding, w.shape[2:], dilation, stride, name)
        bias = None if node.bias is None else np.broadcast_to(np.asarray(node.bias, np.float64), (w.shape[0],))
        if nd == 1:  # a 1-d conv is a 2-d conv over a height-1 map
            w, stride, dilation, pad = w[:, :, None, :], (1, *stride), (1, *dilation), ((0, 0), *pad)
        spatial = shape[1:] if nd == 2 else (1, *shape[1:])
        out_sp = tuple(_out_size(n, pd, k, d, s) for n, pd, k, d, s in zip(spatial, pad, w.shape[2:], dilation, stride))
        if min(out_sp) < 1:
            raise GraphError(f"node {name!r} ({kind}): input {shape} is too small for kernel {w.shape[2:]}, "
                             f"padding {pad}, dilation {dilation}, stride {stride}")
        op.out_shape = (int(w.shape[0]), *(out_sp if nd == 2 else out_sp[1:]))

        rounded = fixed is not None and name in fixed.round_nodes

        def conv(x, w=w, bias=bias, stride=stride, pad=pad, dilation=dilation):
            x4 = x if nd == 2 else x[:, :, None, :]
            y = conv2d(x4, w, bias, stride, pad, dilation, groups)
            y = y if nd == 2 else y[:, :, 0, :]
            return np.round(y) if rounded else y  # numpy rounds half to even

        op.init, op.step = _stateless(conv)
    elif isinstance(node, (nir.SumPool2d, nir.AvgPool2d)):
        if len(shape) != 3:
            raise GraphError(f"node {name!r} ({kind}) needs a (C, H, W) input, got {shape}")
        kernel = _tuple(node.kernel_size, 2, "kernel_size", name)
        stride = _tuple(node.stride if node.stride is not None else kernel, 2, "stride", name)
        padding = _tuple(node.padding if node.padding is not None else 0, 2, "padding", name)
        out_sp = tuple(_out_size(n, (q, q), k, 1, s) for n, q, k, s in zip(shape[1:], padding, kernel, stride))
        if min(out_sp) < 1:
            raise GraphError(f"node {name!r} ({kind}): input {shape} is too small for kernel {kernel}")
        op.out_shape = (shape[0], *out_sp)
        scale = 1.0 if isinstance(node, nir.SumPool2d) else 1.0 / (kernel[0] * kernel[1])
        op.init, op.step = _stateless(lambda x: sum_pool2d(x, kernel, stride, padding) * scale)
    elif isinstance(node, nir.Flatten):
        nd = len(shape)
        start, end = int(np.asarray(node.start_dim)), int(np.asarray(node.end_dim))
        s0, e0 = (start + nd if start < 0 else start), (end + nd if end < 0 else end)
        if not 0 <= s0 <= e0 < nd:
            raise GraphError(f"node {name!r} (Flatten): start_dim={start}, end_dim={end} do not fit the batch-free "
                             f"input shape {shape} (NIR's Flatten dims exclude the batch)")
        out = (*shape[:s0], int(np.prod(shape[s0:e0 + 1])), *shape[e0 + 1:])
        declared = _type_shape(node.output_type, "output")
        if declared is not None and declared != out:
            raise GraphError(f"node {name!r} (Flatten): output_type {declared} disagrees with flattening {shape} "
                             f"from dim {start} to {end} (= {out})")
        op.out_shape = out
        op.init, op.step = _stateless(lambda x: x.reshape(x.shape[0], *out))
    elif isinstance(node, nir.Threshold):
        th = p("threshold")
        op.out_shape = shape
        if disc.comparison == ">=":
            op.init, op.step = _stateless(lambda x: (x >= th).astype(np.float64))
        else:
            op.init, op.step = _stateless(lambda x: (x > th).astype(np.float64))
    elif isinstance(node, (nir.I, nir.IF)):
        r = p("r")
        op.out_shape = shape
        if isinstance(node, nir.I):
            def step(x, v):
                v = v + disc.dt * r * x
                return v, v
        else:
            v_th, v_reset = p("v_threshold"), p("v_reset", default=0.0)

            def step(x, v):
                return _fire(v + disc.dt * r * x, v_th, v_reset, disc)
        op.init, op.step = zeros, step
    elif isinstance(node, (nir.LI, nir.LIF)):
        tau, r, v_leak = p("tau"), p("r"), p("v_leak")
        op.out_shape = shape
        if isinstance(node, nir.LI):
            def step(x, v):
                v = _leak(v, r * x, v_leak, tau, disc)
                return v, v
        else:
            v_th, v_reset = p("v_threshold"), p("v_reset", default=0.0)

            def step(x, v):
                return _fire(_leak(v, r * x, v_leak, tau, disc), v_th, v_reset, disc)
        op.init, op.step = zeros, step
    elif isinstance(node, (nir.CubaLI, nir.CubaLIF)):
        tau_syn, tau_mem, r, v_leak = p("tau_syn"), p("tau_mem"), p("r"), p("v_leak")
        w_in = p("w_in", default=1.0)
        op.out_shape = shape
        spiking = isinstance(node, nir.CubaLIF)
        if spiking:
            v_th, v_reset = p("v_threshold"), p("v_reset", default=0.0)

        def step(x, state):
            i, v = state
            i = _leak(i, w_in * x, 0.0, tau_syn, disc)
            v = _leak(v, r * i, v_leak, tau_mem, disc)
            if not spiking:
                return v, (i, v)
            s, v = _fire(v, v_th, v_reset, disc)
            return s, (i, v)

        op.init, op.step = (lambda batch: (np.zeros((batch, *shape)), np.zeros((batch, *shape)))), step
    elif isinstance(node, nir.Delay):
        steps = np.broadcast_to(op.delay if op.delay is not None else delay_steps(p("delay"), disc.dt, name), shape)
        op.delay = np.ascontiguousarray(steps)
        op.out_shape = shape
        depth = int(steps.max(initial=0)) + 1

        def init(batch):
            return np.zeros((depth, batch, *shape))

        def step(x, history):  # an ordinary Delay (some element delays by 0 steps): store, then read
            history = delay_push(history, x)
            return delay_read(history, steps), history

        op.init, op.step = init, step
    else:
        raise GraphError(f"node {name!r} has type {kind}, which the reference interpreter does not support")


# --------------------------------------------------------------------------------------------- graph structure

_SUPPORTED = (nir.Input, nir.Output, nir.Affine, nir.Linear, nir.Scale, nir.Conv1d, nir.Conv2d,
              nir.SumPool2d, nir.AvgPool2d, nir.Flatten, nir.Threshold, nir.I, nir.IF, nir.LI, nir.LIF, nir.CubaLI,
              nir.CubaLIF, nir.Delay)


def _flatten(graph: nir.NIRGraph, prefix: str = "") -> tuple[dict[str, Any], list[tuple[str, str]], dict, dict]:
    """Inline nested graphs. Returns ``(nodes, edges, entry, exit)``: flattened node names -> nodes, the edges
    between them, and for this graph's own nodes the flattened name where an incoming (``entry``) or outgoing
    (``exit``) parent edge attaches (a node itself, or a nested graph's single Input / Output node)."""
    nodes: dict[str, Any] = {}
    edges: list[tuple[str, str]] = []
    entry: dict[str, str | None] = {}
    exit_: dict[str, str | None] = {}
    for key, node in graph.nodes.items():
        full = f"{prefix}{key}"
        if isinstance(node, nir.NIRGraph):
            sub_nodes, sub_edges, _, _ = _flatten(node, prefix=f"{full}.")
            for sub_name in sub_nodes:
                if sub_name in nodes:
                    raise GraphError(f"flattening nested graph {full!r} gives node name {sub_name!r} twice")
            nodes.update(sub_nodes)
            edges.extend(sub_edges)
            ins = [k for k, n in node.nodes.items() if isinstance(n, nir.Input)]
            outs = [k for k, n in node.nodes.items() if isinstance(n, nir.Output)]
            entry[key] = f"{full}.{ins[0]}" if len(ins) == 1 else None
            exit_[key] = f"{full}.{outs[0]}" if len(outs) == 1 else None
        else:
            if full in nodes:
                raise GraphError(f"node name {full!r} occurs twice after flattening nested graphs")
            nodes[full] = node
            entry[key] = exit_[key] = full
    for src, dst in graph.edges:
        src, dst = str(src), str(dst)
        for end, table in ((src, exit_), (dst, entry)):
            if end not in table:
                raise GraphError(f"edge ({src!r}, {dst!r}) names node {prefix}{end!r}, which is not in the graph")
            if table[end] is None:
                port = "Output" if table is exit_ else "Input"
                raise GraphError(f"edge ({src!r}, {dst!r}) attaches to nested graph {prefix}{end!r}, which must then "
                                 f"have exactly one {port} node")
        edges.append((exit_[src], entry[dst]))
    return nodes, edges, entry, exit_


def _order(names: list[str], edges: list[tuple[str, str]], roots: list[str],
           skip: set[int] = frozenset()) -> tuple[list[str], set[int]]:
    """Depth-first search (see the module docstring) over the edges not in ``skip`` (those into late Delays).
    Returns the evaluation order (reverse post-order) and the indices of the back edges."""
    succ: dict[str, list[tuple[str, int]]] = {n: [] for n in names}
    has_pred = set()
    for idx, (src, dst) in enumerate(edges):
        if idx in skip:
            continue
        succ[src].append((dst, idx))
        has_pred.add(dst)
    for n in succ:
        succ[n].sort()
    state: dict[str, int] = {}  # 1: on the stack, 2: finished
    post: list[str] = []
    back: set[int] = set()
    starts = sorted(roots) + sorted(n for n in names if n not in has_pred) + sorted(names)
    for start in starts:
        if start in state:
            continue
        state[start] = 1
        stack = [(start, iter(succ[start]))]
        while stack:
            node, it = stack[-1]
            for dst, idx in it:
                if state.get(dst) == 1:
                    back.add(idx)
                elif dst not in state:
                    state[dst] = 1
                    stack.append((dst, iter(succ[dst])))
                    break
            else:
                stack.pop()
                state[node] = 2
                post.append(node)
    return post[::-1], back


def _prepare(graph: nir.NIRGraph, disc: Discretisation, fixed: FixedPoint | None = None):
    """Flatten, order, infer and check shapes, compile. Returns ``(ops in evaluation order, edges, back-edge
    indices, incoming edge indices per node, top-level Input names, top-level Output names)``."""
    if not isinstance(graph, nir.NIRGraph):
        raise GraphError(f"expected a nir.NIRGraph, got {type(graph).__name__}")
    nodes, edges, _, _ = _flatten(graph)
    for name, node in nodes.items():
        if type(node) not in _SUPPORTED:  # exact types: a subclass may mean something else
            _compile(_Op(name=name, node=node, role="node", in_shape=()), disc)  # raises the typed error
    top_inputs = [k for k, n in graph.nodes.items() if isinstance(n, nir.Input)]
    top_outputs = [k for k, n in graph.nodes.items() if isinstance(n, nir.Output)]
    if not top_inputs:
        raise GraphError("the graph has no Input node; add nir.Input nodes for the data it reads")
    late_nodes = {}  # Delays of >= 1 step everywhere (module docstring): their steps
    for name, node in nodes.items():
        if isinstance(node, nir.Delay):
            steps = delay_steps(node.delay, disc.dt, name)
            if steps.size and steps.min() >= 1:
                late_nodes[name] = steps
    late_edges = {i for i, (_, dst) in enumerate(edges) if dst in late_nodes}
    order, back = _order(list(nodes), edges, top_inputs, late_edges)
    ops: dict[str, _Op] = {}
    for name in order:
        role = "input" if name in top_inputs else "output" if name in top_outputs else "node"
        ops[name] = _Op(name=name, node=nodes[name], role=role, late=name in late_nodes,
                        delay=late_nodes.get(name))
    incoming: dict[str, list[int]] = {n: [] for n in nodes}
    for idx, (_, dst) in enumerate(edges):
        incoming[dst].append(idx)
    for name in top_inputs:
        if incoming[name]:
            raise GraphError(f"Input node {name!r} has incoming edges {[edges[i] for i in incoming[name]]}")

    for name in order:  # shapes, in topological order of the feed-forward edges
        op = ops[name]
        declared = _declared_input_shape(op.node)
        if op.role == "input" and declared is None:
            raise GraphError(f"Input node {name!r} declares no shape")
        if op.late and declared is None:
            raise GraphError(f"node {name!r} (Delay) has a scalar delay of at least one step and no input_type: "
                             "it runs before its input is computed, so it must declare its shape (input_type)")
        arriving = [(edges[i][0], ops[edges[i][0]].out_shape) for i in incoming[name]
                    if i not in back and i not in late_edges]
        if declared is None:
            if arriving:
                declared = arriving[0][1]
            else:
                arriving_back = [(edges[i][0], ops[edges[i][0]].out_shape) for i in incoming[name]]
                known = [s for _, s in arriving_back if s is not None]
                if not known:
                    raise GraphError(f"node {name!r} ({type(op.node).__name__}) declares no input shape and no "
                                     "feed-forward edge brings one; set its input_type / input_shape")
                declared = known[0]
        op.in_shape = declared
        for src, shape in arriving:
            if shape != declared:
                raise GraphError(f"shape mismatch on edge {src!r} -> {name!r}: {src!r} outputs {shape}, "
                                 f"{name!r} ({type(op.node).__name__}) expects {declared}")
        _compile(op, disc, fixed)
    for idx in sorted(back | late_edges):  # recurrent edges and edges into late Delays, now that shapes are known
        src, dst = edges[idx]
        if ops[src].out_shape != ops[dst].in_shape:
            kind = "recurrent edge" if idx in back else "edge"
            raise GraphError(f"shape mismatch on {kind} {src!r} -> {dst!r}: {src!r} outputs "
                             f"{ops[src].out_shape}, {dst!r} ({type(ops[dst].node).__name__}) expects "
                             f"{ops[dst].in_shape}")
    return [ops[n] for n in order], edges, back, incoming, top_inputs, top_outputs


def _check_inputs(inputs, top_inputs: list[str], ops: dict[str, _Op], num_steps: int | None):
    """Validate and normalise the inputs. Returns ``({input name: float64 array}, num_steps, batch)``."""
    if not isinstance(inputs, dict):
        if len(top_inputs) != 1:
            raise GraphError(f"the graph has {len(top_inputs)} Input nodes {sorted(top_inputs)}; pass a dict "
                             "{input node name: array [num_steps, batch, *shape]}")
        inputs = {top_inputs[0]: inputs}
    unknown = sorted(set(inputs) - set(top_inputs))
    if unknown:
        raise GraphError(f"inputs {unknown} name no Input node of the graph; its Input nodes are {sorted(top_inputs)}")
    arrays = {}
    for name in top_inputs:
        if name not in inputs:
            raise GraphError(f"no input given for Input node {name!r} (shape {ops[name].in_shape}); pass an array "
                             "[num_steps, batch, *shape] under that name")
        arr = np.asarray(inputs[name], dtype=np.float64)
        shape = ops[name].in_shape
        if arr.ndim != 2 + len(shape) or arr.shape[2:] != shape:
            raise GraphError(f"input for Input node {name!r} has shape {arr.shape}; expected "
                             f"[num_steps, batch, *{shape}]")
        arrays[name] = arr
    lengths = {a.shape[0] for a in arrays.values()}
    if num_steps is None:
        num_steps = max(lengths)
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise GraphError(f"num_steps must be a positive int, got {num_steps!r}")
    for name, arr in arrays.items():
        if arr.shape[0] not in (1, num_steps):
            raise GraphError(f"input for Input node {name!r} has {arr.shape[0]} steps; expected {num_steps} "
                             "(or 1, repeated at every step)")
    batches = {a.shape[1] for a in arrays.values()}
    if len(batches) != 1:
        raise GraphError(f"inputs disagree on the batch size: { {n: a.shape[1] for n, a in arrays.items()} }")
    return arrays, int(num_steps), batches.pop()


def run_graph(graph: nir.NIRGraph, inputs: dict[str, np.ndarray] | np.ndarray, num_steps: int | None = None,
              disc: Discretisation | None = None, record: bool = False,
              step_graphs: list[nir.NIRGraph] | None = None, fixed: FixedPoint | None | str = "auto") -> dict:
    """Run ``graph`` for ``num_steps`` discrete steps from a zero state (semantics: the module docstring).

    inputs:    per top-level Input node, an array ``[num_steps, batch, *shape]`` (a single array when the graph
               has one Input); an array with 1 step is repeated at every step (a constant, direct-coded input).
    num_steps: defaults to the longest input.
    disc:      the discretisation; default: :meth:`Discretisation.from_metadata` of ``graph.metadata``.
    record:    also return every node's output (flattened names).
    step_graphs: graphs with the same nodes and edges as ``graph`` but other parameters; step ``k`` runs with
               the parameters of ``step_graphs[min(k, len - 1)]`` (state carries over). Time-varying parameters,
               e.g. TSM's per-step scales (``neurosdm.exporters.nir.step_graphs``). Default: ``graph`` at every step.
    fixed:     integer arithmetic (:class:`FixedPoint`); ``"auto"`` (default) reads it from the metadata of a
               quantised export (None for a float graph); None forces float semantics.

    Returns ``{"outputs": {output node: [num_steps, batch, *shape]}, "records": {node: [num_steps, batch, ...]},
    "saturations": {node: count}}`` (float64; ``records`` is empty unless ``record``; ``saturations`` counts the
    (neuron, step) pairs whose state was clipped, fixed-point mode only). Raises :class:`GraphError` for graphs or
    inputs it cannot run, naming the node(s) and shapes involved.
    """
    metadata = getattr(graph, "metadata", None)
    if disc is None:
        disc = Discretisation.from_metadata(metadata)
    if isinstance(fixed, str):
        if fixed != "auto":
            raise ConfigError(f"fixed must be a FixedPoint, None or 'auto', got {fixed!r}")
        fixed = FixedPoint.from_metadata(metadata)
    ops_list, edges, back, incoming, top_inputs, top_outputs = _prepare(graph, disc, fixed)
    per_step = [ops_list]
    for g in step_graphs or []:
        other = _prepare(g, disc, fixed)[0]
        if [op.name for op in other] != [op.name for op in ops_list]:
            raise GraphError("step_graphs must have the nodes and edges of the graph")
        per_step.append(other)
    if step_graphs:
        per_step = per_step[1:]
    ops = {op.name: op for op in ops_list}
    arrays, num_steps, batch = _check_inputs(inputs, top_inputs, ops, num_steps)

    states = {op.name: op.init(batch) for op in ops_list}
    prev = {op.name: np.zeros((batch, *op.out_shape)) for op in ops_list}  # outputs of the previous step
    wanted = set(top_outputs) | (set(ops) if record else set())
    traces: dict[str, list[np.ndarray]] = {n: [] for n in ops if n in wanted}
    for t in range(num_steps):
        cur: dict[str, np.ndarray] = {}
        for op in per_step[min(t, len(per_step) - 1)]:
            if op.late:  # a Delay of >= 1 step: from its history (the inputs of the steps before this one)
                cur[op.name] = y = delay_read(states[op.name], op.delay - 1)
                if op.name in traces:
                    traces[op.name].append(y)
                continue
            if op.role == "input":
                arr = arrays[op.name]
                x = arr[t if arr.shape[0] > 1 else 0]
            else:
                x = np.zeros((batch, *op.in_shape))
                for i in incoming[op.name]:
                    src = edges[i][0]
                    x = x + (prev[src] if i in back else cur[src])
            y, states[op.name] = op.step(x, states[op.name])
            cur[op.name] = y
            if op.name in traces:
                traces[op.name].append(y)
        for op in ops_list:  # late Delays store this step's input, now that all its sources have run
            if op.late:
                x = np.zeros((batch, *op.in_shape))
                for i in incoming[op.name]:
                    x = x + cur[edges[i][0]]
                states[op.name] = delay_push(states[op.name], x)
        prev = cur

    def stack(name):
        return np.stack(traces[name]) if traces[name] else np.zeros((0, batch, *ops[name].out_shape))

    outputs = {name: stack(name) for name in top_outputs}
    records = {name: stack(name) for name in ops if record}
    saturations = {}
    for ops_k in per_step:
        for op in ops_k:
            if op.saturations:
                saturations[op.name] = saturations.get(op.name, 0) + op.saturations
    return {"outputs": outputs, "records": records, "saturations": saturations}
