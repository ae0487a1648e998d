"""The neurosdm NIR dialect: what a graph's metadata means, read once into typed objects.

- :class:`Discretisation`: how continuous-time NIR neurons become one discrete step (``dt``, method, reset,
  comparison), from the keys ``dt``, ``discretisation``, ``reset``, ``comparison``;
- :class:`FixedPoint`: the integer arithmetic of a quantised export (``metadata["quant"]``, :data:`UNITS_RULE`),
  and the host's input encoding of such an export, :func:`quantize_input`;
- the per-step tables (``bias_tables``, ``scale_tables``) and their one rule, :func:`table_entry`, applied to a
  graph by :func:`graph_at`;
- the up-sampling extension node (:data:`UPSAMPLE_RULE`: a sub-graph whose metadata names the operator), read by
  :func:`upsample_factor` and written by :func:`upsample_node`;
- :func:`meta_value` / :func:`as_str`: values as ``nir.read`` returns them (0-d arrays, bytes) as Python values;
- the spiking-steps schedule ``num_steps(t)`` (``metadata["steps_schedule"]``, :data:`STEPS_SCHEDULE_RULE`),
  written by :func:`steps_schedule_table` and read (validated) by :func:`read_steps_schedule`.

The host side of a denoiser export (unpacking, the analog "sdm" head) is :mod:`neurosdm.graph.host`.

Semantics of a neurosdm export (:func:`neurosdm.exporters.nir.to_nir_graph`; recorded in the metadata): discrete
steps with ``dt = 1``, IF neurons ``v <- v + x``, fire when ``v >= v_threshold`` (comparison ``">="``), then reset
to ``v_reset = 0`` (reset ``"zero"``); every neuron starts at 0 at each network call. The single Input node
``"input"`` takes the analog image x_t ``(C, H, W)``, the same at every one of the ``num_steps`` spiking steps
(direct encoding).

Converted SNNs (:mod:`neurosdm.convert`): one threshold per IF layer (``metadata["if_thresholds"]``), reset by
subtraction (``metadata["reset"] = "subtract"``: ``v <- v - (v_threshold - v_reset)`` where it fires) and an
initial membrane ``v(0) = a theta`` (``a = metadata["v_init"]``, 1/2). NIR neurons start at 0, so the membrane is
stored shifted by ``-a theta``: ``u = v - a theta`` starts at 0 and the IF node holds ``v_threshold = (1 - a)
theta`` and ``v_reset = -a theta``. Then ``u >= (1 - a) theta  <=>  v >= theta``, a spike removes ``v_threshold -
v_reset = theta``, and a hard reset sets ``u = -a theta``, i.e. ``v = 0``: the same neuron, exactly, per node.
With ``a = 0`` this is the usual ``(theta, 0)``.

Per-step tables: ``metadata["bias_tables"][node]`` is ``[A, K, C']`` (``A`` diffusion steps or 1, ``K`` spiking
steps or 1), the TOTAL bias of that conv node (folded BatchNorm, the time embedding, TSM's ``p[k]`` times the conv
bias); ``metadata["scale_tables"][node]`` is ``[K]``, the scale of a TSM ``<conv>.tsm`` Scale node at every
spiking step. Rules: :data:`BIAS_TABLE_RULE`, :data:`SCALE_TABLE_RULE` (also written in the metadata); the stored
nodes hold diffusion step ``metadata["diffusion_step"]`` and spiking step 0.

Packing: ``metadata["node_packing"]`` gives the space-to-depth packing level of every node's output,
``metadata["packed_levels"]`` that of the graph's output (the host unpacks it with
:func:`neurosdm.lowering.depth_to_space`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import nir
import numpy as np

from neurosdm.config import format_steps_schedule, parse_steps_schedule
from neurosdm.dynamics import METHODS, Reset, parse_method
from neurosdm.errors import ConfigError, GraphError

__all__ = ["Discretisation", "FixedPoint", "COMPARISONS", "RESETS", "METHODS", "as_str", "meta_value",
           "table_entry", "tables_vary_per_step", "graph_at",
           "quantize_input", "BIAS_TABLE_RULE", "SCALE_TABLE_RULE", "UNITS_RULE", "UPSAMPLE_OPERATOR", "UPSAMPLE_RULE",
           "upsample_factor", "upsample_node", "STEPS_SCHEDULE_RULE", "steps_schedule_table", "read_steps_schedule"]

RESETS = tuple(r.value for r in Reset)
COMPARISONS = (">=", ">")

# the rule texts as every export writes them (metadata "bias_table_rule", "scale_table_rule", quant "units_rule")
BIAS_TABLE_RULE = ("at diffusion step t and spiking step k, every node in bias_tables (a table [A, K, C]) gets "
                   "bias := table[t if A > 1 else 0, k if K > 1 else 0] (the total bias: folded BatchNorm, the "
                   "time embedding, TSM's p[k] times the conv bias)")
SCALE_TABLE_RULE = ("at spiking step k, every Scale node in scale_tables (a table [K]) gets scale := table[k] at "
                    "every element (TSM: the per-step scale p[k] of the conv it feeds, applied to its input)")
UNITS_RULE = ("every value of the graph is an integer in units of 2**state_exponent; convs in round_nodes round "
              "their output half to even; IF: v <- clip(v + x, +-(2**(state_bits-1)-1)), spike when v >= "
              "v_threshold, reset to 0; LI: v <- sign(v*d)*(|v*d| >> 12) + x, d = round(4096*(1 - dt/tau)), "
              "clipped; the host sends x_int = clip(round_half_even(x / 2**input_exponent), "
              "+-(2**(input_bits-1)-1)) and reads eps from output * 2**output_exponent; weight mantissas are "
              "weight / 2**(weight_exponents[node] + u_in - state_exponent), u_in = 0 for spikes, "
              "input_exponent for the image, state_exponent for streams, plus tsm_exponents for TSM inputs")


STEPS_SCHEDULE_RULE = ("steps_schedule is an integer table [n, 2] of rows (A, K), A increasing, the last A = "
                       "num_diffusion_steps: a network call at diffusion step t runs K spiking steps of the first "
                       "row with t < A (the constant input for K steps, per-step tables at k = 0..K-1, the "
                       "readout over those K steps); absent: num_steps at every call")


def steps_schedule_table(spec: str, num_diffusion_steps: int) -> np.ndarray:
    """The metadata form ``[n, 2]`` int64 of a schedule's text (:func:`neurosdm.config.parse_steps_schedule`)."""
    return np.asarray(parse_steps_schedule(spec, num_diffusion_steps), dtype=np.int64).reshape(-1, 2)


def read_steps_schedule(metadata: dict, num_steps: int, per_step_tables: bool = False,
                        fixed_steps: bool = False) -> str | None:
    """The schedule of a graph's ``metadata["steps_schedule"]`` as its text (None when absent), validated by the
    rule that parses option values: :class:`GraphError` for a malformed table, a step count above ``num_steps``
    where the graph has per-step tables (``per_step_tables``: TSM scales exist for ``num_steps`` steps only), or
    any step count other than ``num_steps`` where the readout depends on it (``fixed_steps``: a mean readout folded
    into the weights)."""
    if "steps_schedule" not in metadata:
        return None
    n = int(np.asarray(metadata.get("num_diffusion_steps", 0)))
    try:
        table = np.asarray(metadata["steps_schedule"])
        if table.ndim != 2 or table.shape[1] != 2 or table.shape[0] < 1 or not np.issubdtype(table.dtype, np.number) \
                or not np.all(table == np.round(table)):
            raise ConfigError(f"a table [n, 2] of integers is expected, got shape {table.shape}")
        rows = tuple((int(a), int(k)) for a, k in table)
        if rows[-1][0] != n:
            raise ConfigError(f"the last row must end at num_diffusion_steps = {n}, got {rows[-1][0]}")
        spec = format_steps_schedule(rows)
        parse_steps_schedule(spec, n, num_steps if per_step_tables else None)
    except ConfigError as e:
        raise GraphError(f"metadata steps_schedule is invalid: {e}") from None
    if fixed_steps and any(k != num_steps for _, k in rows):
        raise GraphError(f"metadata steps_schedule {spec!r}: this graph's readout is folded for {num_steps} steps "
                         "(a converted SNN's mean readout); it cannot run other step counts")
    return spec


def as_str(value: Any) -> str:
    """A string from metadata as ``nir.read`` returns it (str, bytes, 0-d numpy array)."""
    if isinstance(value, np.ndarray):
        value = value.item() if value.ndim == 0 else value.tolist()
    if isinstance(value, bytes):
        value = value.decode("utf8")
    return str(value).strip()


def meta_value(metadata: dict, key: str, default=None):
    """A metadata value as written (``nir.read`` returns 0-d arrays and bytes for numbers and strings)."""
    v = metadata.get(key, default)
    if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v.item()
    if isinstance(v, bytes):
        v = v.decode("utf8")
    return v


def table_entry(table, t: int, k: int) -> np.ndarray:
    """The one table rule (:data:`BIAS_TABLE_RULE`, :data:`SCALE_TABLE_RULE`): entry ``[t, k]`` of a bias table
    ``[A, K, ...]`` (``A`` or ``K`` of 1: the same at every diffusion / spiking step), or entry ``k`` of a scale
    table ``[K]``."""
    table = np.asarray(table)
    if table.ndim == 1:
        return table[k if table.size > 1 else 0]
    return table[t if table.shape[0] > 1 else 0, k if table.shape[1] > 1 else 0]


UPSAMPLE_OPERATOR = "upsample_nearest"
UPSAMPLE_RULE = ("neurosdm extension: a NIRGraph node whose metadata has neurosdm_operator = 'upsample_nearest' is "
                 "nearest-neighbour up-sampling by scale_factor (sh, sw): y[c, sh*i + a, sw*j + b] = x[c, i, j] for "
                 "0 <= a < sh, 0 <= b < sw; input (C, H, W), output (C, sh*H, sw*W). Its body (input -> placeholder "
                 "-> output) only carries these types for nir's type check: a conv with zero weights and padding, "
                 "which a reader without the extension runs as a map of zeros")


def upsample_factor(node) -> tuple[int, int] | None:
    """The scale factor of a neurosdm up-sampling node (:data:`UPSAMPLE_RULE`), or None for any other node."""
    if not isinstance(node, nir.NIRGraph) or not isinstance(node.metadata, dict):
        return None
    if as_str(node.metadata.get("neurosdm_operator", "")) != UPSAMPLE_OPERATOR:
        return None
    f = np.asarray(node.metadata.get("scale_factor", [])).reshape(-1)
    if f.size != 2 or f.dtype.kind not in "iu" or np.any(f < 1):
        raise GraphError(f"an up-sampling node's scale_factor must be two positive integers, got "
                         f"{node.metadata.get('scale_factor')!r}")
    return int(f[0]), int(f[1])


def upsample_node(shape, factor: tuple[int, int] = (2, 2), dtype=np.float32) -> nir.NIRGraph:
    """The up-sampling node of :data:`UPSAMPLE_RULE` for an input ``(C, H, W)``; the placeholder body is a
    ``[C, C, k, k]`` conv of zeros with padding ``p`` per axis such that ``n + 2 p - k + 1 = s n`` (``k = 1`` where
    ``(s - 1) n`` is even, 2 where it is odd; both axes alike), the smallest core node whose output type is the
    up-sampled shape."""
    c, h, w = (int(v) for v in shape)
    sh, sw = (int(v) for v in factor)
    k = 1 + ((sh - 1) * h) % 2
    if k != 1 + ((sw - 1) * w) % 2:
        raise GraphError(f"an up-sampling node needs (factor - 1) x size of the same parity on both axes for its "
                         f"placeholder, got input {(c, h, w)} and factor {(sh, sw)}")
    placeholder = nir.Conv2d(input_shape=np.array([h, w]), weight=np.zeros((c, c, k, k), dtype), stride=1,
                             padding=np.array([((sh - 1) * h + k - 1) // 2, ((sw - 1) * w + k - 1) // 2]),
                             dilation=1, groups=1, bias=np.zeros(c, dtype))
    return nir.NIRGraph(nodes={"input": nir.Input(input_type={"input": np.array([c, h, w])}),
                               "placeholder": placeholder,
                               "output": nir.Output(output_type={"output": np.array([c, sh * h, sw * w])})},
                        edges=[("input", "placeholder"), ("placeholder", "output")],
                        metadata={"neurosdm_operator": UPSAMPLE_OPERATOR, "scale_factor": np.array([sh, sw]),
                                  "rule": UPSAMPLE_RULE})


def tables_vary_per_step(metadata: dict) -> bool:
    """Whether any table changes with the spiking step (TSM exports)."""
    return any(np.asarray(v).shape[1] > 1 for v in metadata.get("bias_tables", {}).values()) or \
        any(np.asarray(v).size > 1 for v in metadata.get("scale_tables", {}).values())


def graph_at(graph: nir.NIRGraph, metadata: dict | None, t: int, k: int = 0) -> nir.NIRGraph:
    """A copy of ``graph`` holding the parameters of diffusion step ``t`` and spiking step ``k``: every node in
    ``bias_tables`` gets its bias, every Scale node in ``scale_tables`` its scale (:func:`table_entry`)."""
    metadata = dict(graph.metadata if metadata is None else metadata)
    n = int(meta_value(metadata, "num_diffusion_steps"))
    t, k = int(t), int(k)
    if not 0 <= t < n:
        raise ConfigError(f"diffusion step must lie in 0..{n - 1}, got {t}")
    nodes = dict(graph.nodes)
    for name, table in metadata.get("bias_tables", {}).items():
        node = nodes[name]
        nodes[name] = nir.Conv2d(input_shape=node.input_shape, weight=node.weight, stride=node.stride,
                                 padding=node.padding, dilation=node.dilation, groups=node.groups,
                                 bias=np.asarray(table_entry(table, t, k)).astype(node.weight.dtype))
    for name, table in metadata.get("scale_tables", {}).items():
        node = nodes[name]
        nodes[name] = nir.Scale(scale=np.full(np.shape(node.scale), table_entry(np.asarray(table).reshape(-1), t, k),
                                              np.asarray(node.scale).dtype))
    metadata["diffusion_step"] = t
    return nir.NIRGraph(nodes=nodes, edges=[tuple(e) for e in graph.edges], metadata=metadata)


def quantize_input(x: np.ndarray, metadata: dict) -> tuple[np.ndarray, int]:
    """The host's input encoding of a quantised export (:data:`UNITS_RULE`): ``(x_int as float64, clipped
    pixels)``, ``x_int = clip(round_half_even(x / 2**input_exponent), +-(2**(input_bits-1) - 1))``."""
    fixed = FixedPoint.from_metadata(metadata)
    if fixed is None:
        raise GraphError("quantize_input needs a quantised export (metadata quant)")
    e_in, bits = fixed.unit("input_exponent"), fixed.unit("input_bits")
    lim = (1 << (bits - 1)) - 1
    k = np.round(np.asarray(x, np.float64) * 2.0 ** -e_in)
    return np.clip(k, -lim, lim) + 0.0, int(np.count_nonzero(np.abs(k) > lim))


@dataclass
class Discretisation:
    """How the continuous-time NIR neurons become one discrete step (:mod:`neurosdm.dynamics` has the equations).

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

    @property
    def reset_kind(self) -> Reset:
        return Reset(self.reset)

    @property
    def strict(self) -> bool:
        """Fire on ``>`` rather than ``>=``."""
        return self.comparison == ">"

    @classmethod
    def from_metadata(cls, metadata: dict | None, **overrides) -> "Discretisation":
        """Read ``dt``, ``reset``, ``comparison`` and ``discretisation`` (the method) from a graph's metadata.

        Missing keys keep the defaults; values may be as ``nir.read`` returns them (bytes, numpy scalars).
        Accepted spellings: those of :meth:`neurosdm.dynamics.Reset.parse` and :func:`neurosdm.dynamics.parse_method`.
        Keyword ``overrides`` (the dataclass fields) win over the metadata.
        """
        metadata = dict(metadata or {})
        kwargs: dict[str, Any] = {}
        if "dt" in metadata:
            dt = metadata["dt"]
            try:
                kwargs["dt"] = float(np.asarray(dt).reshape(-1)[0]) if np.size(dt) == 1 else dt
            except (TypeError, ValueError):
                raise ConfigError(f"metadata dt must be a number, got {str(dt)[:40]!r}") from None
        if "reset" in metadata:
            try:
                kwargs["reset"] = Reset.parse(as_str(metadata["reset"])).value
            except ConfigError as e:
                raise ConfigError(f"metadata {e}") from None
        if "comparison" in metadata:
            kwargs["comparison"] = as_str(metadata["comparison"])
        if "discretisation" in metadata:
            try:
                kwargs["method"] = parse_method(as_str(metadata["discretisation"]))
            except ConfigError as e:
                raise ConfigError(f"metadata {e}") from None
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise ConfigError(f"unknown Discretisation field(s) {sorted(unknown)}; known: {sorted(known)}")
        kwargs.update(overrides)
        return cls(**kwargs)


@dataclass
class FixedPoint:
    """Integer arithmetic of a quantised neurosdm export (``metadata["quant"]``; written by
    :mod:`neurosdm.exporters.fixed_point`). Values are integers held in float64 (exact below 2**53):

    - nodes in ``round_nodes`` (convs reading graded values) round their output half to even;
    - ``IF``, ``I`` and ``LI`` run :func:`neurosdm.dynamics.fixed_point_step`: state saturating at
      ``+-(2**(state_bits-1) - 1)``; ``LI`` decays by ``decay_q12 = round(4096 (1 - dt/tau))`` with the product
      rounded toward zero (Loihi); its input gain ``r dt / tau`` (1 for ``IF``/``I``: ``r dt``) must be 1;
      thresholds must be integers; IF fires on ``>=`` and resets to 0 or by subtraction;
    - other neuron types are refused. Saturations are counted per node.

    The host's units (:data:`UNITS_RULE`; None where a graph does not say, e.g. a hand-made fixed-point graph):
    ``state_exponent`` (one state unit is ``2**state_exponent``), ``input_exponent`` and ``input_bits`` (the
    input encoding, :func:`quantize_input`), ``output_exponent`` (the output's unit).
    """

    state_bits: int = 24
    round_nodes: frozenset = frozenset()
    state_exponent: int | None = None
    input_exponent: int | None = None
    input_bits: int | None = None
    output_exponent: int | None = None

    @classmethod
    def from_metadata(cls, metadata: dict | None) -> "FixedPoint | None":
        """The fixed-point rules of a quantised export (every ``quant`` key read here, once), or None for a float
        graph. :class:`GraphError` for a key of the wrong type or out of range."""
        q = (metadata or {}).get("quant")
        if not isinstance(q, dict):
            marked = as_str((metadata or {}).get("quantized", "none")) not in ("none", "")
            if q is not None or marked:  # an int8 export must not run as a float graph
                raise GraphError("the graph's metadata marks it quantised but its 'quant' table is missing or not a "
                                 "table: the fixed-point rules are unknown (export it again with --quantize int8)")
            return None
        if not isinstance(q.get("round_nodes", {}), dict):
            raise GraphError(f"metadata quant.round_nodes must be a table of node names, got {q['round_nodes']!r}")

        def integer(key: str, lo: int, hi: int, required: bool = False) -> int | None:
            value = q.get(key)
            if value is None:
                if required:
                    raise GraphError(f"the graph's metadata quant has no {key!r}: not a complete fixed-point export")
                return None
            arr = np.asarray(value)
            if arr.size != 1 or arr.dtype.kind not in "iuf" or not float(arr.reshape(-1)[0]).is_integer() or \
                    not lo <= int(arr.reshape(-1)[0]) <= hi:
                raise GraphError(f"metadata quant.{key} must be an integer in {lo}..{hi}, got {value!r}")
            return int(arr.reshape(-1)[0])

        return cls(integer("state_bits", 2, 53, required=True), frozenset(q.get("round_nodes", {})),
                   integer("state_exponent", -64, 64), integer("input_exponent", -64, 64),
                   integer("input_bits", 2, 53), integer("output_exponent", -64, 64))

    def unit(self, key: str) -> int:
        """One of the host's units (class docstring); :class:`GraphError` if the graph does not record it."""
        value = getattr(self, key)
        if value is None:
            raise GraphError(f"the graph's metadata quant has no {key!r}, which the host needs; use a file written "
                             "by `neurosdm export --quantize int8`")
        return value
