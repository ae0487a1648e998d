"""The backend interface of the step loop, and :class:`Engine`, a program bound to a backend.

A backend holds kernels and nothing else: the loop (:mod:`neurosdm.simulators.loop`) decides the order, the sums,
the recurrent and delayed values and the counts. Arrays are the backend's own (numpy float64, or torch tensors on a
device); the loop only adds them (``a + b``) and indexes them (``a[k]``).

Kernels (``layer``: a :class:`~neurosdm.graph.program.Layer`; ``x``: the summed input ``[B, *in_shape]``):
``conv(layer, x, bias, count) -> (y, ops or None)`` (``bias``: this step's override or None; ``ops``: the
synaptic operations when the kernel counts them itself, else None and the loop uses :meth:`weighted_nnz`),
``pool``, ``affine``, ``upsample``, ``scale(layer, x, scale)``, ``threshold -> spikes (bool)``,
``neuron(layer, x, state) -> (y, state, spikes or None)``, ``fixed_neuron(layer, x, state) -> (y, state, spikes or
None, saturated)``,
``delay_push(history, x)``, ``delay_read(history, layer, late)``, ``reshape``. Helpers: ``zeros``,
``neuron_state``, ``nnz``, ``weighted_nnz(x, layer)`` (``sum(layer.fanout[x != 0])``), ``not_integer`` (True/False,
or a device flag), ``as_float``, ``params`` (the backend's form of ``Program.step_params``), ``to_host`` (a list of
counts and flags as Python values, one transfer), ``stack`` (a trace as numpy float64).
"""

from __future__ import annotations

import numpy as np

from neurosdm.errors import ConfigError, GraphError
from neurosdm.graph.program import Program
from neurosdm.simulators import loop

__all__ = ["Engine"]


class Engine:
    """A program bound to a backend: :meth:`run` is one network call from a zero state."""

    name = "engine"

    def __init__(self, program: Program, backend):
        if not isinstance(program, Program):
            raise ConfigError(f"{type(self).__name__} needs a Program (neurosdm.graph.program.load_program), got "
                              f"{type(program).__name__}")
        self.program = program
        self.backend = backend
        backend.prepare(program)
        self._params: tuple[int, list] | None = None

    def inputs(self, x, num_steps: int | None = None) -> tuple[dict, int]:
        """``({Input node: (backend array, sequence)}, steps)`` from one array (a graph with one Input) or a dict:
        each ``[B, *shape]`` (the same at each of ``num_steps`` steps, default ``program.num_steps``) or
        ``[T, B, *shape]`` (``T`` steps; every sequence the same length)."""
        prog = self.program
        if not isinstance(x, dict):
            if len(prog.inputs) != 1:
                raise GraphError(f"the graph has {len(prog.inputs)} Input nodes {sorted(prog.inputs)}; pass a dict "
                                 "{input node name: array}")
            x = {prog.inputs[0]: x}
        unknown = sorted(set(x) - set(prog.inputs))
        if unknown:
            raise GraphError(f"inputs {unknown} name no Input node of the graph; its Input nodes are "
                             f"{sorted(prog.inputs)}")
        out, lengths, batches = {}, set(), set()
        for name in prog.inputs:
            shape = tuple(prog.by_name[name].in_shape)
            if name not in x:
                raise GraphError(f"no input given for Input node {name!r} (shape {shape})")
            a = self.backend.input(x[name])
            n = len(shape)
            if a.ndim == 1 + n and tuple(a.shape[1:]) == shape:
                out[name] = (a, False)
                batches.add(int(a.shape[0]))
            elif a.ndim == 2 + n and tuple(a.shape[2:]) == shape and a.shape[0] >= 1:
                out[name] = (a, True)
                lengths.add(int(a.shape[0]))
                batches.add(int(a.shape[1]))
            else:
                raise GraphError(f"input for Input node {name!r} has shape {tuple(a.shape)}; expected [batch, "
                                 f"*{shape}] (constant) or [steps, batch, *{shape}]")
        if len(lengths) > 1:
            raise GraphError(f"the input sequences disagree on the number of steps: {sorted(lengths)}")
        if len(batches) != 1:
            raise GraphError(f"inputs disagree on the batch size: {sorted(batches)}")
        if num_steps is not None and lengths and lengths != {num_steps}:
            raise GraphError(f"the input sequences have {sorted(lengths)} steps; expected {num_steps}")
        return out, (lengths.pop() if lengths else num_steps or prog.num_steps)

    def run(self, x, t: int | None = 0, record: bool = False, count: bool = True,
            num_steps: int | None = None) -> dict:
        """One network call from a zero state at diffusion step ``t`` (selects ``program.step_params(t)``).

        ``x``: the (already encoded) input ``[B, *input_shape]``, the same at each of ``program.num_steps``
        spiking steps (the denoiser path), or a time-varying sequence ``[T, B, *input_shape]`` (``T`` steps); a
        dict by Input node for graphs with several. ``num_steps``: the steps of a constant input (default
        ``program.num_steps``). ``t`` None: the parameters as stored in the graph, at every step. Returns
        ``{"outputs": {output: float64 [K, B, *shape]}, "counts": {layer: {counter: int64 [K]}}, "records":
        {layer: float64 [K, B, *shape]}}`` (records empty unless ``record``: True for every layer, or the names of
        the layers to record; counts empty unless ``count``)."""
        with self.backend.running():
            inputs, steps = self.inputs(x, num_steps)
            if self._params is None or self._params[0] != t:
                self._params = (t, self.backend.params(self.program.step_params(t) if t is not None else [{}]))
            return loop.run(self.program, self.backend, inputs, steps, self._params[1], record, count)


def numpy_stack(trace: list, empty_shape) -> np.ndarray:
    """A trace of numpy arrays as one float64 array ``[K, ...]`` (``empty_shape`` if it is empty)."""
    return np.stack(trace).astype(np.float64, copy=False) if trace else np.zeros(empty_shape)
