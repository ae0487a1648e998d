"""Exact integer counts of a simulated run (``RunStats``), the one schema both engines fill.

One network call of an engine returns, per layer, one int64 array ``[num_steps]`` per counter (summed over the
batch). :class:`RunStats` stacks the calls of a generation into ``[denoising_steps, num_steps]`` per layer and
counter, plus the host's work per denoising step, and writes it as JSON.

Counters (per layer, per spiking step; a layer reports the counters of its kind, the others are absent):

conv
    ``events_in``   nonzero elements of the conv's input (the spikes, for a spike input)
    ``synops``      spike input: the (spike, nonzero synapse) pairs, i.e. for every input spike the number of
                    nonzero weights connecting it to output positions inside the output map (borders and stride
                    respected; structural zeros, e.g. of the packed up path, are not synapses)
    ``graded_ops``  graded input (TSM): the same count for the nonzero graded inputs (each a multiply-accumulate
                    of weight x payload)
    ``macs``        analog input (the image, a residual stream): dense, every input position whatever its value,
                    times its nonzero fan-out
gconv (Conv1d; Conv2d with dilation or groups; torch engine only)
    as conv (the fan-out respects dilation and groups; a Conv1d is a height-1 Conv2d)
affine (Affine, Linear; torch engine only)
    ``events_in``, and ``synops`` / ``graded_ops`` / ``macs`` as conv, with the fan-out of input element ``j``
    = the nonzero weights of column ``j`` (``macs`` = batch x nonzero weights)
pool (SumPool2d, AvgPool2d; torch engine only)
    ``events_in``   nonzero input elements
    ``pool_adds``   additions into the pooling windows: spike / graded input, for every nonzero input element the
                    number of windows (inside the output map) that contain it; analog input, the same for every
                    input element (dense). AvgPool2d's division by the window size is not counted.
flatten
    none (a reshape)
scale
    ``events_in``   nonzero input elements (a TSM scale on spikes: the spikes that get a payload)
if / li / i / lif / cubali / cubalif (LIF and the Cuba types: torch engine only)
    ``neuron_updates``  every neuron, every step (clocked update; a Cuba neuron's current and membrane: one)
    ``active_neurons``  neurons whose summed input is nonzero at that step
    ``spikes_out``      spikes emitted (IF, LIF, CubaLIF)
threshold (torch engine only)
    ``neuron_updates``, ``active_neurons``, ``spikes_out`` as a neuron without state
    ``saturations``     fixed point only: neurons whose state was clipped
any layer with several sources
    ``fanin_adds``  ``(sources - 1) * input size`` additions that sum the incoming edges

Host (per denoising step, all images): ``host_macs`` (the SDM head's convs: dense multiply-accumulates),
``host_elementwise`` (element-wise operations: head activations and BatchNorm, the readout, the sampler's update,
the input encoding).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from neurosdm.io import atomic_path

__all__ = ["COUNTERS", "HOST_COUNTERS", "RunStats", "add_counts"]

COUNTERS = ("events_in", "synops", "graded_ops", "macs", "fanin_adds", "neuron_updates", "active_neurons",
            "spikes_out", "saturations", "pool_adds")
HOST_COUNTERS = ("host_macs", "host_elementwise")


def add_counts(total: dict, counts: dict) -> dict:
    """``total[layer][counter] += counts[layer][counter]`` (arrays of the same shape), in place; returns total."""
    for layer, cs in counts.items():
        dst = total.setdefault(layer, {})
        for name, v in cs.items():
            v = np.asarray(v, np.int64)
            dst[name] = dst[name] + v if name in dst else v.copy()
    return total


@dataclass
class RunStats:
    """Counts of a run: ``layers[layer][counter]`` int64 ``[denoising_steps, num_steps]``, ``host[counter]`` int64
    ``[denoising_steps]``, ``timesteps`` (the diffusion step of each denoising step), ``images``, ``meta``."""

    num_steps: int
    images: int = 0
    timesteps: list[int] = field(default_factory=list)
    layers: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    host: dict[str, np.ndarray] = field(default_factory=dict)
    layer_kinds: dict[str, str] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def add_call(self, t: int, counts: dict, host: dict, kinds: dict[str, str] | None = None) -> None:
        """Append one denoising step: ``counts[layer][counter]`` ``[num_steps]`` (an engine call over all images)
        and ``host[counter]`` (ints)."""
        d = len(self.timesteps)
        self.timesteps.append(int(t))
        for layer, cs in counts.items():
            dst = self.layers.setdefault(layer, {})
            for name, v in cs.items():
                row = np.asarray(v, np.int64).reshape(1, self.num_steps)
                prev = dst.get(name, np.zeros((d, self.num_steps), np.int64))
                if prev.shape[0] < d:  # a counter first seen now
                    prev = np.concatenate([np.zeros((d - prev.shape[0], self.num_steps), np.int64), prev])
                dst[name] = np.concatenate([prev, row])
        for name, v in host.items():
            prev = self.host.get(name, np.zeros(d, np.int64))
            self.host[name] = np.concatenate([prev, [int(v)]])
        if kinds:
            self.layer_kinds.update(kinds)

    def totals(self) -> dict[str, dict[str, int]]:
        """Per layer, every counter summed over denoising and spiking steps."""
        return {layer: {k: int(v.sum()) for k, v in cs.items()} for layer, cs in self.layers.items()}

    def total(self, counter: str) -> int:
        return int(sum(cs[counter].sum() for cs in self.layers.values() if counter in cs))

    def layer_rows(self) -> list[dict]:
        """One row per layer (run order): kind, totals of every counter, and the firing rate (spikes per neuron
        update) of spiking layers."""
        rows = []
        for layer, cs in self.layers.items():
            row = {"layer": layer, "kind": self.layer_kinds.get(layer, "")}
            row.update({c: int(cs[c].sum()) for c in COUNTERS if c in cs})
            if "spikes_out" in cs and row.get("neuron_updates"):
                row["rate"] = row["spikes_out"] / row["neuron_updates"]
            rows.append(row)
        return rows

    def to_dict(self) -> dict:
        return {
            "format": "neurosdm RunStats v1",
            "num_steps": self.num_steps, "images": self.images, "timesteps": self.timesteps,
            "layer_kinds": self.layer_kinds,
            "layers": {layer: {k: v.tolist() for k, v in cs.items()} for layer, cs in self.layers.items()},
            "host": {k: v.tolist() for k, v in self.host.items()},
            "totals": {c: self.total(c) for c in COUNTERS},
            "host_totals": {k: int(v.sum()) for k, v in self.host.items()},
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "RunStats":
        s = cls(int(d["num_steps"]), int(d.get("images", 0)), list(d.get("timesteps", [])),
                {layer: {k: np.asarray(v, np.int64) for k, v in cs.items()} for layer, cs in d["layers"].items()},
                {k: np.asarray(v, np.int64) for k, v in d.get("host", {}).items()},
                dict(d.get("layer_kinds", {})), dict(d.get("meta", {})))
        return s

    def save(self, path: str | os.PathLike) -> None:
        with atomic_path(path) as tmp:
            with open(tmp, "w") as f:
                json.dump(self.to_dict(), f)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RunStats":
        with open(path) as f:
            return cls.from_dict(json.load(f))
