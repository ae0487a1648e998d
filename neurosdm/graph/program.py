"""The ONE translation of a NIR graph into an executable program: layers in evaluation order with their
parameters, shapes checked. Every simulator (the reference, the event and the torch engines) runs a
:class:`Program`; none reads NIR nodes itself.

Semantics (time is discrete; one call runs ``num_steps`` steps from a zero state; arrays are time-first,
``[num_steps, batch, *shape]``, and NIR shapes exclude the batch):

- **Edges** are identity connections; several edges into one node are **summed**; a node without incoming edges
  receives zeros of its input shape. Nested graphs, the evaluation order and back edges: :mod:`.structure`. A back
  edge delivers its source's output of the **previous** step (zero at step 0).
- **Shapes** are inferred once, in evaluation order, and every edge is checked: the source's output shape must equal
  the destination's declared input shape, or, where a node declares none (Conv without ``input_shape``, pooling,
  Flatten without ``input_type``, nodes whose parameters are all scalars), the shape the first incoming edge brings.
- ``Input``, ``Output``: ``y = x``. ``Affine``: ``y = W x + b`` (leading weight axes are batched); ``Linear``:
  ``y = W x``. ``Scale``: ``y = s * x``.
- ``Conv1d`` / ``Conv2d``: cross-correlation as torch (:mod:`.geometry`), ``padding`` int, per-axis, ``'valid'`` or
  ``'same'``; a Conv1d runs as a height-1 Conv2d. The declared input channels of a conv are
  ``weight.shape[1] * groups`` (nir 1.0.8's ``input_type`` is wrong for ``groups > 1``; not used here).
- ``SumPool2d``: zero padding, then window sums; ``AvgPool2d``: the same divided by ``kh * kw`` (padding counted).
- ``Flatten(start_dim, end_dim)``: NIR's dims index the **batch-free** shape (``nir.ir.utils.calc_flatten_output``);
  negative values count from the end. ``torch.nn.Flatten`` counts the batch: readers passing the dims unchanged are
  off by one. A declared ``output_type`` is checked against this rule.
- ``Delay(delay)``: ``y[k] = x[k - d]`` per element, ``d = delay / dt`` whole steps ``>= 0`` (else
  :class:`GraphError`). A Delay whose every element delays by at least one step is **late**: its incoming edges do
  not constrain the order, it is read from its history and its input is stored after the step, so a cycle through
  it has exactly its latency. A scalar late Delay must declare its ``input_type``.
- ``Threshold``: ``y = [x >= threshold]`` (or ``>``, :class:`.dialect.Discretisation`).
- Up-sampling (the dialect's extension node, :data:`.dialect.UPSAMPLE_RULE`): nearest neighbour,
  ``y[c, sh i + a, sw j + b] = x[c, i, j]``; of spikes it is spikes.
- Neurons (I, IF, LI, LIF, CubaLI, CubaLIF): one step of :mod:`neurosdm.dynamics` with coefficients from ``tau``,
  ``r``, ``dt`` and the method; IF/LIF/CubaLIF spike, the others output their membrane. NIR's docs fix no
  discretisation for IF; the frameworks read ``nir.IF`` as ``v <- v + x`` (Norse ignores ``r`` and ``dt``,
  snnTorch asserts ``r = 1``, spikingjelly writes ``r = 1``), so neurosdm writes ``dt = 1`` and ``r = 1``.
- Fixed point (:class:`.dialect.FixedPoint`): I, IF and LI only, gain 1, one decay per layer, integer thresholds,
  ``v_leak = v_reset = 0``; convs in ``round_nodes`` round their output (bias included) half to even.

Layer inputs (``Layer.input``) decide how a layer is computed and counted: ``"spikes"`` (exactly one source, a
spiking layer or a Flatten / Delay of one), ``"graded"`` (one source, a TSM Scale node of ``scale_tables`` whose own
source spikes: spikes with a payload), ``"analog"`` (anything else).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import nir
import numpy as np

from neurosdm.errors import ConfigError, GraphError
from neurosdm.graph import structure
from neurosdm.graph.checks import check_graph
from neurosdm.graph.dialect import Discretisation, FixedPoint, table_entry, tables_vary_per_step
from neurosdm.graph.inspect import read_nir
from neurosdm.graph.nodes import (KINDS, NEURONS, SPIKING, Layer, declared_input_shape, delay_steps, layer_kind,
                                  translate)

__all__ = ["Layer", "Program", "load_program", "read_graph", "KINDS", "SPIKING", "NEURONS", "delay_steps"]


@dataclass
class Program:
    """A graph ready to run: ``layers`` in evaluation order; ``inputs`` / ``outputs``: the top-level Input and
    Output nodes."""

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
        """Parameter overrides at diffusion step ``t`` (the tables of :mod:`.dialect`): a list with one entry per
        spiking step (a single entry used at every step when nothing varies with the spiking step), each
        ``{layer: {"bias"|"scale": array}}``."""
        bias = self.metadata.get("bias_tables", {})
        scale = self.metadata.get("scale_tables", {})
        if bias and not 0 <= int(t) < self.num_diffusion_steps:
            raise ConfigError(f"diffusion step must lie in 0..{self.num_diffusion_steps - 1}, got {t}")
        out = []
        for k in range(self.num_steps if tables_vary_per_step(self.metadata) else 1):
            p: dict[str, dict[str, np.ndarray]] = {}
            for name, table in bias.items():
                p[name] = {"bias": np.asarray(table_entry(np.asarray(table, np.float64), int(t), k))}
            for name, table in scale.items():
                value = table_entry(np.asarray(table, np.float64).reshape(-1), int(t), k)
                p[name] = {"scale": np.full(self.by_name[name].in_shape, value)}
            out.append(p)
        return out


def read_graph(source) -> nir.NIRGraph:
    """A NIR graph from a file (one-line errors for files nir cannot read) or a graph passed through."""
    return source if isinstance(source, nir.NIRGraph) else read_nir(source)


def load_program(source: str | os.PathLike | nir.NIRGraph, disc: Discretisation | None = None,
                 fixed: FixedPoint | None | str = "auto") -> Program:
    """A :class:`Program` from a NIR file or graph. ``disc`` defaults to the graph's metadata; ``fixed``: the
    integer arithmetic, ``"auto"`` (from the metadata of a quantised export), None (float) or a
    :class:`FixedPoint`."""
    graph = read_graph(source)
    metadata = dict(graph.metadata or {})
    disc = disc or Discretisation.from_metadata(metadata)
    check_graph(graph, disc.strict)  # node values, declared sizes, the dialect's sizes and tables: before building
    if isinstance(fixed, str):
        if fixed != "auto":
            raise ConfigError(f"fixed must be a FixedPoint, None or 'auto', got {fixed!r}")
        fixed = FixedPoint.from_metadata(metadata)
    for name, node in structure.flat_nodes(graph):
        if layer_kind(node) is None:
            raise GraphError(f"node {name!r} has type {type(node).__name__}, which neurosdm does not support "
                             f"(supported: {', '.join(sorted({t.__name__ for t in KINDS} | {'NIRGraph'}))})")
    nodes, edges = structure.flatten(graph)
    top_inputs = [k for k, n in graph.nodes.items() if isinstance(n, nir.Input)]
    top_outputs = [k for k, n in graph.nodes.items() if isinstance(n, nir.Output)]
    if not top_inputs:
        raise GraphError("the graph has no Input node; add nir.Input nodes for the data it reads")
    late = {}  # Delays of >= 1 step everywhere: their steps
    for name, node in nodes.items():
        if isinstance(node, nir.Delay):
            steps = delay_steps(node.delay, disc.dt, name)
            if steps.size and steps.min() >= 1:
                late[name] = steps
    late_edges = {i for i, (_, dst) in enumerate(edges) if dst in late}
    order, back = structure.order(list(nodes), edges, top_inputs, late_edges)
    incoming: dict[str, list[int]] = {n: [] for n in nodes}
    for idx, (_, dst) in enumerate(edges):
        incoming[dst].append(idx)
    for name in top_inputs:
        if incoming[name]:
            raise GraphError(f"Input node {name!r} has incoming edges {[edges[i] for i in incoming[name]]}")
    scale_tables = set(metadata.get("scale_tables", {}))
    layers: dict[str, Layer] = {}
    for name in order:
        node = nodes[name]
        declared = declared_input_shape(node)
        if name in top_inputs and declared is None:
            raise GraphError(f"Input node {name!r} declares no shape")
        if name in late and declared is None:
            raise GraphError(f"node {name!r} (Delay) has a scalar delay of at least one step and no input_type: "
                             "it runs before its input is computed, so it must declare its shape (input_type)")
        arriving = [(edges[i][0], layers[edges[i][0]].out_shape) for i in incoming[name]
                    if i not in back and i not in late_edges]
        if declared is None:
            if arriving:
                declared = arriving[0][1]
            else:
                known = [layers[edges[i][0]].out_shape for i in incoming[name] if edges[i][0] in layers]
                if not known:
                    raise GraphError(f"node {name!r} ({type(node).__name__}) declares no input shape and no "
                                     "feed-forward edge brings one; set its input_type / input_shape")
                declared = known[0]
        for src, shape in arriving:
            if shape != declared:
                raise GraphError(f"shape mismatch on edge {src!r} -> {name!r}: {src!r} outputs {shape}, "
                                 f"{name!r} ({type(node).__name__}) expects {declared}")
        layer = Layer(name, layer_kind(node), [edges[i][0] for i in incoming[name]], tuple(declared), (),
                      back=[i in back for i in incoming[name]], late=name in late)
        translate(layer, node, disc, fixed, late.get(name))
        layers[name] = layer
    for idx in sorted(back | late_edges):  # recurrent edges and edges into late Delays, now that shapes are known
        src, dst = edges[idx]
        if layers[src].out_shape != layers[dst].in_shape:
            kind = "recurrent edge" if idx in back else "edge"
            raise GraphError(f"shape mismatch on {kind} {src!r} -> {dst!r}: {src!r} outputs "
                             f"{layers[src].out_shape}, {dst!r} ({type(nodes[dst]).__name__}) expects "
                             f"{layers[dst].in_shape}")
    _classify_inputs(layers, scale_tables)
    num_steps = int(np.asarray(metadata.get("num_steps", 1)))
    return Program([layers[n] for n in order], metadata, num_steps, disc, fixed, top_inputs, top_outputs)


def _classify_inputs(layers: dict[str, Layer], scale_tables: set) -> None:
    known: dict[str, bool] = {}

    def carries_spikes(name: str) -> bool:
        """A spiking layer, or a Flatten (a reshape) or Delay of exactly one layer that carries spikes (a loop,
        remembered along the way: chains of any length)."""
        path: dict[str, None] = {}
        while name not in known and name not in path and len(layers[name].sources) == 1 and \
                layers[name].kind in ("flatten", "delay", "upsample"):
            path[name], name = None, layers[name].sources[0]
        known.update(dict.fromkeys(path, known.get(name, layers[name].kind in SPIKING)))
        return known.get(name, layers[name].kind in SPIKING)

    for layer in layers.values():
        if len(layer.sources) != 1:
            continue
        src = layer.sources[0]
        if carries_spikes(src):
            layer.input = "spikes"
        elif src in scale_tables and len(layers[src].sources) == 1 and carries_spikes(layers[src].sources[0]):
            layer.input = "graded"
