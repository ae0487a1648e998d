"""The form of an exported NIR graph that the engines run: layers in evaluation order with their parameters.

``load_program(path_or_graph)`` reads a NIR file (or takes a ``nir.NIRGraph``), checks it with the reference
interpreter's preparation (flattening, ordering, shape inference; so every engine accepts the same graphs and
rejects the same mistakes) and returns a :class:`Program`. The engines (``neurosdm.simulators.torch_engine``,
``neurosdm.simulators.event``) read only the program, i.e. only the .nir file.

Supported node types: Input, Output, Conv2d, Scale, IF, LI, I (everything neurosdm's exporter writes); others
raise :class:`GraphError` naming the node. Recurrent edges are not supported yet.

Layer kinds and what a layer's input is (``Layer.input``), which decides how it is computed and counted:

- ``"spikes"``: the layer has exactly one source and it is an IF layer (0/1 values);
- ``"graded"``: one source, a TSM Scale node (``metadata["scale_tables"]``) whose own source is an IF layer:
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

__all__ = ["Layer", "Program", "load_program", "KINDS"]

KINDS = {nir.Input: "input", nir.Output: "output", nir.Conv2d: "conv", nir.Scale: "scale", nir.IF: "if",
         nir.LI: "li", nir.I: "i"}


@dataclass
class Layer:
    """One node. Arrays are float64 and full-shaped (per neuron / per element) unless said otherwise.

    conv: ``weight [Co, Ci, kh, kw]``, ``bias [Co]``, ``stride (sh, sw)``, ``padding ((top, bottom), (left,
    right))``; ``rounded``: in fixed point, the output (bias included) is rounded half to even.
    scale: ``scale`` (element-wise factor, input shape).
    if / li / i: one float step is ``v <- decay * v + (1 - decay) * v_leak + gain * x`` (then, for IF, compare
    and reset as the reference interpreter: ``disc.comparison``, ``disc.reset``): IF/I ``decay = 1``,
    ``gain = r dt``; LI euler ``decay = 1 - dt/tau``, ``gain = r dt / tau``; LI exp ``decay = exp(-dt/tau)``,
    ``gain = (1 - decay) r``. ``threshold`` and ``v_reset`` (IF), ``v_leak`` (zeros for IF/I), ``decay_q12``
    (fixed point: ``round(4096 * decay)``, one value per layer, gain 1, ``neurosdm.quantize.fixed_point_step``).
    """

    name: str
    kind: str
    sources: list[str]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    input: str = "analog"
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    rounded: bool = False
    scale: np.ndarray | None = None
    gain: np.ndarray | None = None
    decay: np.ndarray | None = None
    threshold: np.ndarray | None = None
    v_reset: np.ndarray | None = None
    v_leak: np.ndarray | None = None
    decay_q12: int = 4096

    @property
    def size(self) -> int:
        return int(np.prod(self.out_shape))


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


def load_program(source: str | os.PathLike | nir.NIRGraph, disc: Discretisation | None = None) -> Program:
    """A :class:`Program` from a NIR file or graph; ``disc`` defaults to the graph's metadata."""
    graph = _read(source)
    metadata = dict(graph.metadata or {})
    disc = disc or Discretisation.from_metadata(metadata)
    fixed = FixedPoint.from_metadata(metadata)
    ops, edges, back, incoming, top_inputs, top_outputs = _prepare(graph, disc, fixed)
    if back:
        raise GraphError(f"recurrent edges are not supported by the engines yet: {[edges[i] for i in back][:3]}")
    scale_tables = set(metadata.get("scale_tables", {}))
    kinds: dict[str, str] = {}
    layers = []
    for op in ops:
        node = op.node
        kind = KINDS.get(type(node))
        if kind is None:
            raise GraphError(f"node {op.name!r} has type {type(node).__name__}, which the engines do not support "
                             f"(supported: {', '.join(sorted(t.__name__ for t in KINDS))})")
        if op.role == "input":
            kind = "input"
        elif op.role == "output":
            kind = "output"
        kinds[op.name] = kind
        sources = [edges[i][0] for i in incoming[op.name]]
        layer = Layer(op.name, kind, sources, tuple(op.in_shape), tuple(op.out_shape))
        if len(sources) == 1 and kinds[sources[0]] == "if":
            layer.input = "spikes"
        elif len(sources) == 1 and sources[0] in scale_tables and len(incoming[sources[0]]) == 1 \
                and kinds[edges[incoming[sources[0]][0]][0]] == "if":
            layer.input = "graded"
        shape = op.in_shape
        if kind == "conv":
            w = np.asarray(node.weight, np.float64)
            if w.ndim != 4 or int(np.asarray(node.groups).reshape(-1)[0]) != 1:
                raise GraphError(f"node {op.name!r}: the engines support Conv2d with groups=1")
            dilation = _tuple(node.dilation, 2, "dilation", op.name)
            if dilation != (1, 1):
                raise GraphError(f"node {op.name!r}: the engines support Conv2d with dilation 1")
            layer.stride = _tuple(node.stride, 2, "stride", op.name)
            layer.padding = _padding(node.padding, w.shape[2:], dilation, layer.stride, op.name)
            layer.weight = w
            layer.bias = np.zeros(w.shape[0]) if node.bias is None else \
                np.broadcast_to(np.asarray(node.bias, np.float64), (w.shape[0],)).copy()
            layer.rounded = fixed is not None and op.name in fixed.round_nodes
        elif kind == "scale":
            layer.scale = np.broadcast_to(np.asarray(node.scale, np.float64), shape).copy()
        elif kind in ("if", "i", "li"):
            r = np.broadcast_to(np.asarray(node.r, np.float64), shape)
            if kind == "li":
                tau = np.broadcast_to(np.asarray(node.tau, np.float64), shape)
                layer.decay = 1.0 - disc.dt / tau if disc.method == "euler" else np.exp(-disc.dt / tau)
                layer.gain = r * disc.dt / tau if disc.method == "euler" else (1.0 - layer.decay) * r
                layer.v_leak = np.broadcast_to(np.asarray(node.v_leak, np.float64), shape).copy()
            else:
                layer.gain = r * disc.dt
                layer.decay = np.ones(shape)
                layer.v_leak = np.zeros(shape)
            if kind == "if":
                layer.threshold = np.broadcast_to(np.asarray(node.v_threshold, np.float64), shape).copy()
                v_reset = getattr(node, "v_reset", None)
                layer.v_reset = np.zeros(shape) if v_reset is None else \
                    np.broadcast_to(np.asarray(v_reset, np.float64), shape).copy()
            if fixed is not None:
                q = np.unique(np.rint(np.asarray(layer.decay) * 4096))
                if q.size != 1 or not np.allclose(layer.gain, 1.0):
                    raise GraphError(f"node {op.name!r}: fixed point needs one decay per layer and gain 1")
                layer.decay_q12 = int(q[0])
        layers.append(layer)
    num_steps = int(np.asarray(metadata.get("num_steps", 1)))
    return Program(layers, metadata, num_steps, disc, fixed, list(top_inputs), list(top_outputs))
