"""Chip time from a mapping (:func:`neurosdm.hardware.routing.map_program`): per spiking step, the barrier plus the
busiest core's work.

A layer's work in one spiking step (its exact counts x the profile's latencies) is spread over the cores of its
pieces: synaptic terms (``synop``, ``graded_op``, ``mac``, ``zero_synop``, ``fanin_add``, ``scale_op``) in proportion
to each piece's synapses of that layer, neuron terms (updates, spikes, their packets and hops) in proportion to each
piece's neurons (the mapping's ``work_share`` and ``neuron_share``: activity spread evenly over a layer's
elements, since the counts are per layer). A core's time in a step is the sum over the layers on it; the step
takes the slowest core's time (the cores run in parallel and meet at the barrier). Counts are summed over the
images of a run, so the busiest core is that of the summed work (at most the sum of each image's busiest core).
"""

from __future__ import annotations

import numpy as np

__all__ = ["SYNAPTIC_TERMS", "core_time"]

SYNAPTIC_TERMS = ("synop", "graded_op", "mac", "zero_synop", "fanin_add", "scale_op")


def core_time(work: dict[str, dict[str, np.ndarray]], mapping: dict, shape: tuple[int, int], top: int = 5):
    """``work[layer] = {"synaptic": ns [D, K], "neuron": ns [D, K]}`` spread over the mapping's cores. Returns the
    busiest core's ns per step ``[D, K]``, the ``top`` cores with the most work over the run (core coordinates,
    populations, share of the summed busiest-core time), and the work of layers the mapping does not place (ns
    ``[D, K]``, run on one more core)."""
    layers = mapping["layers"]
    n = 1 + max((c for v in layers.values() for c in v["cores"]), default=0)
    cores = np.zeros((n + 1, *shape))  # the last row: work of layers the mapping does not place
    for name, w in work.items():
        m = layers.get(name)
        if m is None:
            cores[n] += w["synaptic"] + w["neuron"]
            continue
        ids = np.asarray(m["cores"])
        for kind, share in (("synaptic", m["work_share"]), ("neuron", m["neuron_share"])):
            np.add.at(cores, ids, np.asarray(share)[:, None, None] * w[kind][None])
    busiest = cores.max(axis=0)
    total = cores.sum(axis=(1, 2))
    coords = {}
    for p in mapping["populations"]:
        for pc, core in zip(p["pieces"], layers[p["population"]]["cores"]):
            coords[core] = (pc["core"], p["population"])
    ref = float(busiest.sum()) or 1.0
    limiting = [{"core": coords[int(i)][0] if int(i) in coords else "unmapped",
                 "population": coords[int(i)][1] if int(i) in coords else "(layers without a placement)",
                 "work_s": float(total[i]) * 1e-9, "share_of_busiest_time": float(total[i]) / ref}
                for i in np.argsort(-total)[:top] if total[i] > 0]
    return busiest, limiting, cores[n]
