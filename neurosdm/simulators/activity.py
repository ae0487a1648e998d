"""Activity counted from recorded spikes, for hardware that does work the engines' counters do not count.

An engine's counters (:mod:`neurosdm.simulators.stats`) count the work an event-driven chip does: nonzero synapses
reached by a spike, neurons with a nonzero input. Some hardware does more, and these functions count it from the
layer outputs an engine records (``run(..., record=True)``: ``{layer: [K, B, *shape]}``):

- :func:`synapse_events`: every (spike, synapse) pair, zero weights included (hardware that stores and processes
  every synapse of a layer, as SANA-FE does); :func:`add_synapse_events` stores it as the counter
  ``synapse_events`` (priced by the ``zero_synop`` term as ``synapse_events - synops``);
- :func:`state_updates`: Loihi's update rule as SANA-FE models it (a neuron is updated when it receives any
  synaptic event or its membrane is nonzero), from a replay of the membrane with the one neuron step
  (:func:`neurosdm.dynamics.neuron_update`); :func:`add_state_updates` stores it as the counter
  ``updated_neurons`` (priced as the active updates).
"""

from __future__ import annotations

import numpy as np

from neurosdm.dynamics import neuron_update
from neurosdm.errors import ConfigError
from neurosdm.graph.geometry import taps_per_position

__all__ = ["synapse_events", "add_synapse_events", "state_updates", "add_state_updates"]


def synapse_events(program, records: dict) -> dict[str, np.ndarray]:
    """Per conv (groups 1, dilation 1) and affine layer with a spike input: the (spike, synapse) pairs of every
    spiking step, zero weights included, summed over the batch (int64 ``[K]``): ``sum over input spikes of the
    structural fan-out``, i.e. RunStats' ``synops`` with every weight counted. Conv: an input at ``(c, y, x)``
    reaches ``Co x taps_y(y) x taps_x(x)`` outputs inside the map; affine ``W [..., out, in]``: every input reaches
    all ``prod(W.shape[:-1])`` outputs. ``records``: an engine's recorded outputs ``{layer: [K, B, *shape]}``
    (``run(..., record=True)``); the input of a layer is the record of its one source."""
    out = {}
    for layer in program.layers:
        if layer.input != "spikes" or layer.kind not in ("conv", "affine"):
            continue
        x = np.asarray(records[layer.sources[0]]) != 0
        K, B = x.shape[:2]
        if layer.kind == "conv":
            _, H, W = layer.in_shape
            _, Ho, Wo = layer.out_shape
            (pt, _), (pl, _) = layer.padding
            kh, kw = layer.weight.shape[2:]
            fan = (layer.weight.shape[0] * taps_per_position(H, pt, kh, layer.stride[0], Ho)[:, None]
                   * taps_per_position(W, pl, kw, layer.stride[1], Wo)[None, :])  # [H, W]
            x = x.reshape(K, B, *layer.in_shape)
            out[layer.name] = (x * fan[None, None, None]).reshape(K, -1).sum(axis=1).astype(np.int64)
        else:
            fan = int(np.prod(layer.weight.shape[:-1]))
            out[layer.name] = x.reshape(K, -1).sum(axis=1).astype(np.int64) * fan
    return out


def state_updates(program, records: dict) -> dict[str, dict]:
    """Loihi's update rule as SANA-FE models it, per IF layer fed by one conv/affine layer that reads spikes: a
    neuron is updated at a step when it receives at least one synaptic event (zero weights and inputs that sum to
    zero included) or its membrane is nonzero before the step (bias 0 here). Returns per layer ``updated`` (int64
    ``[K]``, summed over the batch) and ``nonzero_end`` (neurons whose membrane is nonzero after the last step: a
    chip that keeps running updates them at every further step). The membrane is replayed from the recorded input
    with the layer's neuron step (:func:`neurosdm.dynamics.neuron_update` of ``layer.neuron``), checked against
    the recorded spikes."""
    out = {}
    for layer in program.layers:
        if layer.kind != "if" or len(layer.sources) != 1:
            continue
        syn = program.by_name[layer.sources[0]]
        if syn.kind not in ("conv", "affine") or syn.input != "spikes":
            continue
        xin = np.asarray(records[syn.sources[0]]) != 0  # [K, B, *in_shape] the spikes reaching syn
        x = np.asarray(records[syn.name], np.float64)  # [K, B, *shape] the summed input of the neurons
        s = np.asarray(records[layer.name]) != 0
        K, B = x.shape[:2]
        if syn.kind == "affine":
            reached = np.broadcast_to(xin.reshape(K, B, -1).any(axis=2).reshape(K, B, *([1] * (x.ndim - 2))),
                                      x.shape)
        else:
            if syn.stride != (1, 1) or syn.padding != ((0, 0), (0, 0)):
                raise ConfigError(f"state_updates: conv {syn.name!r} needs stride 1 and no padding")
            kh, kw = syn.weight.shape[2:]
            win = np.lib.stride_tricks.sliding_window_view(xin.any(axis=2), (kh, kw), axis=(2, 3))
            reached = np.broadcast_to(win.any(axis=(-2, -1))[:, :, None], x.shape)
        v = np.zeros(x.shape[1:])
        updated = np.zeros(K, np.int64)
        for k in range(K):
            updated[k] = np.count_nonzero(reached[k] | (v != 0))
            _, v, fired = neuron_update(layer.neuron, x[k], v)
            if not np.array_equal(fired, s[k]):
                raise ConfigError(f"state_updates: the replayed membrane of {layer.name!r} does not give the "
                                  f"recorded spikes at step {k} (records from another run or graph?)")
        out[layer.name] = {"updated": updated, "nonzero_end": int(np.count_nonzero(v))}
    return out


def add_state_updates(stats, program, records: dict) -> dict[str, int]:
    """Add :func:`state_updates`' ``updated`` to a one-call :class:`~neurosdm.simulators.stats.RunStats` as the
    counter ``updated_neurons`` (which :func:`neurosdm.energy.estimate` then prices as the active updates); returns
    ``{layer: nonzero_end}``."""
    if len(stats.timesteps) != 1:
        raise ConfigError(f"add_state_updates needs the counts of one network call; this run has "
                          f"{len(stats.timesteps)}")
    ends = {}
    for name, r in state_updates(program, records).items():
        stats.layers[name]["updated_neurons"] = r["updated"].reshape(1, -1)
        ends[name] = r["nonzero_end"]
    return ends


def add_synapse_events(stats, program, records: dict):
    """Add :func:`synapse_events` to a one-call :class:`~neurosdm.simulators.stats.RunStats` as the counter
    ``synapse_events`` (what the ``zero_synop`` term of :func:`neurosdm.energy.estimate` prices:
    ``synapse_events - synops``). Returns ``stats``."""
    if len(stats.timesteps) != 1:
        raise ConfigError(f"add_synapse_events needs the counts of one network call; this run has "
                          f"{len(stats.timesteps)}")
    for name, v in synapse_events(program, records).items():
        if name in stats.layers:
            stats.layers[name]["synapse_events"] = v.reshape(1, -1)
    return stats
