"""The one step loop: a :class:`~neurosdm.graph.program.Program` run for ``num_steps`` steps on a backend.

Per spiking step ``k`` (state starts at 0 at every call), the layers run in the program's order. A layer's input is
the sum of its sources' outputs at this step, in the order of ``Layer.sources`` (a back edge delivers the previous
step's output, zero at step 0; a layer without sources gets zeros). A late Delay is read from its history before
its sources run and stores their sum after the whole step. Diffusion step ``t`` selects the per-step parameters
(``Program.step_params``). An output is freed once its last reader of the step has run.

What a layer computes is the backend's (:class:`neurosdm.simulators.backend.Backend`: kernels only); what is
counted is decided here, once, for every backend (per layer, per step, summed over the batch):

- conv / gconv / affine: ``events_in`` (nonzero inputs) and, by the layer's input, ``synops`` (spikes),
  ``graded_ops`` (graded spikes) -- the nonzero synapses of the nonzero inputs inside the output -- or ``macs``
  (analog: every synapse of every input, ``Layer.macs`` per image); pool: ``events_in`` and ``pool_adds`` (the
  same rule); scale: ``events_in``;
- neurons and thresholds: ``neuron_updates`` (every neuron), ``active_neurons`` (nonzero input), ``spikes_out``
  (spiking kinds) and, in fixed point, ``saturations`` (state clipped);
- ``fanin_adds`` on every layer with several sources: ``(sources - 1) x input size``.
Input, Output, Flatten, Delay and up-sampling layers have no counters (an up-sampled spike reaches its consumer
as ``sh x sw`` events, which the consumer counts).
"""

from __future__ import annotations

import numpy as np

from neurosdm.errors import GraphError
from neurosdm.graph.program import NEURONS, Layer, Program

__all__ = ["run", "OP_COUNTER"]

#: the counter of a synaptic layer's operations, by its input
OP_COUNTER = {"spikes": "synops", "graded": "graded_ops", "analog": "macs"}


def _free_after(program: Program) -> list[list[str]]:
    """Per layer position, the outputs whose last reader within a step is that layer (sources of back edges and
    of late Delays are kept to the end of the step)."""
    pos = {layer.name: i for i, layer in enumerate(program.layers)}
    last = dict(pos)
    kept = set()
    for layer in program.layers:
        for src, back in zip(layer.sources, layer.back):
            if back or layer.late:
                kept.add(src)
            else:
                last[src] = max(last[src], pos[layer.name])
    free: list[list[str]] = [[] for _ in program.layers]
    for name, i in last.items():
        if name not in kept:
            free[i].append(name)
    return free


def run(program: Program, backend, inputs: dict, num_steps: int, params: list, record: bool = False,
        count: bool = True) -> dict:
    """One call of ``program`` from a zero state on ``backend``.

    inputs: per top-level Input node ``(array, sequence)``: the backend array ``[B, *shape]`` used at every step
    (``sequence`` False) or ``[steps, B, *shape]`` read at step ``k`` (True). params: the backend's form of
    ``program.step_params(t)`` (per spiking step, the last one repeated). Returns ``{"outputs": {output: numpy
    float64 [K, B, *shape]}, "counts": {layer: {counter: int64 [K]}}, "records": {layer: [K, B, *shape]}}``
    (records empty unless ``record``: True for every layer, or a collection of layer names; counts empty unless
    ``count``).
    """
    be = backend
    arr0, seq0 = next(iter(inputs.values()))
    batch = int(arr0.shape[1] if seq0 else arr0.shape[0])
    counts: dict[str, dict[str, list]] = {}
    not_integer: dict[str, list] = {}

    def add(layer: str, counter: str, value) -> None:
        counts.setdefault(layer, {}).setdefault(counter, []).append(value)

    state = {}
    for layer in program.layers:
        if layer.kind in NEURONS:
            state[layer.name] = be.neuron_state(layer, batch)
        elif layer.kind == "delay":
            state[layer.name] = be.zeros((int(layer.delay.max(initial=0)) + 1, batch, *layer.in_shape))
    recurrent = sorted({src for layer in program.layers for src, b in zip(layer.sources, layer.back) if b})
    prev = {name: be.zeros((batch, *program.by_name[name].out_shape)) for name in recurrent}
    recorded = [] if not record else [layer.name for layer in program.layers] if record is True else \
        [name for name in record if name in program.by_name]
    wanted = set(program.outputs) | set(recorded)
    traces: dict[str, list] = {name: [] for name in wanted}
    free_after = _free_after(program)

    for k in range(num_steps):
        p = params[min(k, len(params) - 1)]
        cur: dict[str, object] = {}
        for li, layer in enumerate(program.layers):
            name = layer.name
            if name in inputs:
                arr, seq = inputs[name]
                y = arr[k] if seq else arr
            elif layer.late:  # a Delay of >= 1 step: from its history; its input is stored after the step
                y = be.delay_read(state[name], layer, late=True)
            else:
                vals = [prev[src] if b else cur[src] for src, b in zip(layer.sources, layer.back)]
                if vals:
                    xin = vals[0]
                    for v in vals[1:]:
                        xin = xin + v
                else:
                    xin = be.zeros((batch, *layer.in_shape))
                if count and len(vals) > 1:
                    add(name, "fanin_adds", (len(vals) - 1) * batch * int(np.prod(layer.in_shape)))
                y = _layer(be, layer, xin, p.get(name, {}), state, batch, add if count else None, not_integer,
                           program.fixed is not None)
            cur[name] = y
            if name in traces:
                traces[name].append(y)
            for done in free_after[li]:
                cur.pop(done, None)
        for layer in program.layers:  # late Delays store this step's input, now that every source has run
            if layer.late:
                xin = be.zeros((batch, *layer.in_shape))
                for src in layer.sources:
                    xin = xin + cur[src]
                state[layer.name] = be.delay_push(state[layer.name], xin)
        prev = {name: cur[name] for name in recurrent}

    for name, flags in not_integer.items():
        if any(be.to_host(flags)):
            raise GraphError(f"node {name!r}: fixed-point mode got a non-integer input")
    host = iter(be.to_host([v for cs in counts.values() for vals in cs.values() for v in vals]))
    result_counts = {layer: {c: np.array([next(host) for _ in vals], np.int64) for c, vals in cs.items()}
                     for layer, cs in counts.items()}

    def stack(name):
        return be.stack(traces[name], (0, batch, *program.by_name[name].out_shape))

    return {"outputs": {name: stack(name) for name in program.outputs},
            "counts": result_counts,
            "records": {name: stack(name) for name in recorded}}


def _layer(be, layer: Layer, x, over: dict, state: dict, batch: int, add, not_integer: dict, fixed: bool):
    """One layer at one step: the backend's kernel, and the counts of :mod:`this module <neurosdm.simulators.loop>`."""
    kind, name = layer.kind, layer.name
    if kind in ("input", "output"):  # an Output, or a nested graph's Input / Output node: identity
        return x
    if kind == "flatten":
        return be.reshape(x, (batch, *layer.out_shape))
    if kind == "upsample":  # routing: every input element copied to sh x sw outputs (the consumers count them)
        return be.upsample(layer, x)
    if kind == "delay":  # some element delays by 0 steps: store, then read
        state[name] = be.delay_push(state[name], x)
        return be.delay_read(state[name], layer, late=False)
    if kind == "scale":
        if add:
            add(name, "events_in", be.nnz(x))
        return be.scale(layer, x, over.get("scale"))
    if kind in ("conv", "gconv", "pool", "affine"):
        if kind == "pool":
            y, ops = be.pool(layer, x), None
        elif kind == "affine":
            y, ops = be.affine(layer, x), None
        else:
            y, ops = be.conv(layer, x, over.get("bias"), count=add is not None)
        if add:
            add(name, "events_in", be.nnz(x))
            counter = "pool_adds" if kind == "pool" else OP_COUNTER[layer.input]
            if layer.input == "analog":
                add(name, counter, batch * layer.macs)
            else:
                add(name, counter, ops if ops is not None else be.weighted_nnz(x, layer))
        return y
    if kind == "threshold":
        s = be.threshold(layer, x)
        if add:
            add(name, "neuron_updates", batch * layer.size)
            add(name, "active_neurons", be.nnz(x))
            add(name, "spikes_out", be.nnz(s))
        return be.as_float(s)
    if kind in NEURONS:
        sat = None
        if fixed:
            flag = be.not_integer(x)
            if flag is True:
                raise GraphError(f"node {name!r}: fixed-point mode got a non-integer input")
            not_integer.setdefault(name, []).append(flag)
            y, state[name], s, sat = be.fixed_neuron(layer, x, state[name])
        else:
            y, state[name], s = be.neuron(layer, x, state[name])
        if add:
            add(name, "neuron_updates", batch * layer.size)
            add(name, "active_neurons", be.nnz(x))
            if s is not None:
                add(name, "spikes_out", be.nnz(s))
            if sat is not None:
                add(name, "saturations", be.nnz(sat))
        return y
    raise GraphError(f"node {name!r}: no rule for layers of kind {kind!r}")
