"""The reference: a plain, dense float64 numpy backend (the oracle) and :func:`run_graph`.

An exported graph must reproduce the torch model here, and the real engines (event-driven, clocked torch) must
reproduce this: float graphs to rounding, fixed-point graphs bit for bit. It is written for clarity, not speed:
every layer is computed densely at every step with the plain kernels of :mod:`neurosdm.graph.geometry` (a conv is
one einsum per kernel tap), every neuron with :mod:`neurosdm.dynamics`. The semantics of every node (what the
program means) are :mod:`neurosdm.graph.program`'s; the step loop is :mod:`neurosdm.simulators.loop`'s.
"""

from __future__ import annotations

import contextlib

import nir
import numpy as np

from neurosdm.dynamics import fixed_point_step, neuron_update
from neurosdm.errors import GraphError
from neurosdm.graph.dialect import Discretisation, FixedPoint, meta_value, quantize_input
from neurosdm.graph.geometry import conv2d, sum_pool2d
from neurosdm.graph.host import eps_from_outputs
from neurosdm.graph.program import Layer, Program, load_program
from neurosdm.simulators.backend import Engine, numpy_stack

__all__ = ["ReferenceBackend", "run_graph", "run_reference", "Discretisation", "FixedPoint", "GraphError",
           "delay_push", "delay_read"]


def delay_push(history: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Shift a Delay's history ``[D + 1, B, *shape]`` (``history[j]`` = the input ``j`` steps ago) by one step
    with ``x`` as the newest input."""
    return np.concatenate([x[None], history[:-1]]) if history.shape[0] > 1 else x[None].copy()


def delay_read(history: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``y[b, e] = history[index[e], b, e]``: the input ``index[e]`` steps before the newest one stored."""
    idx = np.broadcast_to(index, history.shape[2:])[None, None]
    return np.take_along_axis(history, np.broadcast_to(idx, (1, *history.shape[1:])), axis=0)[0]


class ReferenceBackend:
    """Dense numpy float64 kernels (interface: :mod:`neurosdm.simulators.backend`)."""

    name = "reference"

    def prepare(self, program: Program) -> None:
        self.fixed = program.fixed
        self.strict = program.disc.strict

    def running(self):
        return contextlib.nullcontext()

    # -------------------------------------------------------------------------------------------- arrays
    def input(self, x) -> np.ndarray:
        return np.asarray(x, np.float64)

    def zeros(self, shape) -> np.ndarray:
        return np.zeros(shape)

    def neuron_state(self, layer: Layer, batch: int):
        zeros = np.zeros((batch, *layer.in_shape), np.int64 if self.fixed is not None else np.float64)
        return (zeros, zeros.copy()) if layer.kind in ("cubali", "cubalif") else zeros

    def reshape(self, x, shape):
        return x.reshape(shape)

    def as_float(self, s):
        return s.astype(np.float64)

    def nnz(self, x) -> int:
        return int(np.count_nonzero(x))

    def weighted_nnz(self, x, layer: Layer) -> int:
        return int(np.where(x != 0, layer.fanout, 0).sum())

    def not_integer(self, x) -> bool:
        return not np.array_equal(np.rint(x), x)

    def params(self, step_params: list) -> list:
        return step_params

    def to_host(self, values: list) -> list:
        return [int(v) for v in values]

    def stack(self, trace: list, empty_shape) -> np.ndarray:
        return numpy_stack(trace, empty_shape)

    # ------------------------------------------------------------------------------------------- kernels
    def conv(self, layer: Layer, x, bias, count: bool = True):
        x4 = x if layer.nd == 2 else x[:, :, None, :]
        y = conv2d(x4, layer.dense_weight(), layer.bias if bias is None else bias, layer.stride, layer.padding,
                   layer.dilation, layer.groups)
        if layer.rounded and self.fixed is not None:
            y = np.round(y)  # half to even
        return (y if layer.nd == 2 else y[:, :, 0, :]), None

    def upsample(self, layer: Layer, x):
        sh, sw = layer.scale_factor
        return x.repeat(sh, axis=-2).repeat(sw, axis=-1)

    def pool(self, layer: Layer, x):
        (ph, _), (pw, _) = layer.padding
        y = sum_pool2d(x, layer.kernel, layer.stride, (ph, pw))
        return y if layer.pool_scale == 1.0 else y * layer.pool_scale

    def affine(self, layer: Layer, x):
        return np.matmul(layer.dense_weight(), x[..., None])[..., 0] + layer.bias

    def scale(self, layer: Layer, x, scale):
        return x * (layer.scale if scale is None else scale)

    def threshold(self, layer: Layer, x):
        return (x > layer.threshold) if self.strict else (x >= layer.threshold)

    def neuron(self, layer: Layer, x, state):
        return neuron_update(layer.neuron, x, state)

    def fixed_neuron(self, layer: Layer, x, state):
        s, v, sat = fixed_point_step(state, np.rint(x).astype(np.int64), layer.threshold_int, layer.decay_q12,
                                     layer.reset, self.fixed.state_bits)
        if layer.kind == "if":
            return s.astype(np.float64), v, s, sat
        return v.astype(np.float64), v, None, sat

    def delay_push(self, history, x):
        return delay_push(history, x)

    def delay_read(self, history, layer: Layer, late: bool):
        return delay_read(history, layer.delay - 1 if late else layer.delay)


def run_graph(graph: nir.NIRGraph | Program, inputs, num_steps: int | None = None,
              disc: Discretisation | None = None, record: bool = False, fixed: FixedPoint | None | str = "auto",
              t: int | None = None) -> dict:
    """Run ``graph`` for ``num_steps`` discrete steps from a zero state in the reference backend.

    inputs:    per top-level Input node, an array ``[steps, batch, *shape]`` (a single array when the graph has
               one Input); an array with 1 step is repeated at every step (a constant, direct-coded input).
    num_steps: defaults to the longest input.
    disc:      the discretisation; default: from ``graph.metadata``.
    record:    also return every node's output (flattened names).
    fixed:     integer arithmetic (:class:`FixedPoint`); ``"auto"`` (default) reads it from the metadata of a
               quantised export (None for a float graph); None forces float semantics.
    t:         the diffusion step whose per-step tables (biases, TSM scales, :mod:`neurosdm.graph.dialect`) apply
               at every spiking step; None (default): the parameters as stored in the graph.

    Returns ``{"outputs": {output node: [num_steps, batch, *shape]}, "records": {node: [num_steps, batch, ...]},
    "saturations": {node: count}}`` (float64; ``records`` empty unless ``record``; ``saturations``: the (neuron,
    step) pairs whose state was clipped, fixed point only).
    """
    program = graph if isinstance(graph, Program) else load_program(graph, disc, fixed)
    if not isinstance(inputs, dict):
        if len(program.inputs) != 1:
            raise GraphError(f"the graph has {len(program.inputs)} Input nodes {sorted(program.inputs)}; pass a "
                             "dict {input node name: array [num_steps, batch, *shape]}")
        inputs = {program.inputs[0]: inputs}
    arrays = {name: np.asarray(a, np.float64) for name, a in inputs.items()}
    for name, arr in arrays.items():
        if arr.ndim < 2:
            raise GraphError(f"input for Input node {name!r} has shape {arr.shape}; expected [num_steps, batch, "
                             "*shape]")
    if num_steps is None:
        num_steps = max(a.shape[0] for a in arrays.values())
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise GraphError(f"num_steps must be a positive int, got {num_steps!r}")
    for name, arr in arrays.items():
        if arr.shape[0] not in (1, num_steps):
            raise GraphError(f"input for Input node {name!r} has {arr.shape[0]} steps; expected {num_steps} "
                             "(or 1, repeated at every step)")
    constant_or_sequence = {name: (a[0] if a.shape[0] == 1 else a) for name, a in arrays.items()}
    res = Engine(program, ReferenceBackend()).run(constant_or_sequence, t=t, record=record, num_steps=int(num_steps))
    saturations = {name: int(c["saturations"].sum()) for name, c in res["counts"].items()
                   if "saturations" in c and c["saturations"].sum()}
    return {"outputs": res["outputs"], "records": res["records"], "saturations": saturations}


def run_reference(graph: nir.NIRGraph, metadata: dict | None, x_t, t: int, record: bool = False, fixed="auto"):
    """One denoiser call of an exported graph in the reference backend: ``(eps [B, C, H, W], run_graph's
    result)`` for ``x_t [B, C, H, W]`` at diffusion step ``t``, with the per-step tables applied; a quantised
    export gets the host's input encoding and (``fixed="auto"``) its fixed-point arithmetic."""
    md = graph.metadata if metadata is None else metadata
    if md is not graph.metadata:
        graph = nir.NIRGraph(nodes=graph.nodes, edges=list(graph.edges), metadata=md)
    x = np.asarray(x_t, np.float64)
    if isinstance(md.get("quant"), dict):
        x, _ = quantize_input(x, md)
    res = run_graph(graph, x[None], num_steps=int(meta_value(md, "num_steps")), record=record, fixed=fixed, t=t)
    return eps_from_outputs(res["outputs"]["output"], md), res
