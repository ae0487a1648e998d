"""SANA-FE's side of the mapping cross-check (docs/mapping.md): each suite network on SANA-FE's Loihi with every
neuron on the core neurosdm's mapper chose (``<net>.mapped.json`` of ``neurosdm.hardware.sanafe.run_mapped``).
Runs with .venv-sanafe's python (no torch, no neurosdm); the network is built by ``scripts/sanafe_compare.py``'s
``build`` (same conventions), then every neuron is moved to its core.

    .venv-sanafe/bin/python scripts/sanafe_mapped.py OUT_DIR

Writes ``<net>.sanafe_mapped.json``: spikes per layer and step, packets (non-placeholder messages), hops, the
simulated time per step (``timing_model="simple"``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nir
import numpy as np
import sanafe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sanafe_compare import CONV_UNIT, build  # noqa: E402


def main(out_dir: Path) -> int:
    arch = sanafe.load_loihi()
    for path in sorted(out_dir.glob("*.mapped.json")):
        side = json.loads(path.read_text())
        name, mapping = side["network"], side["mapping"]
        graph = nir.read(out_dir / f"{name}.nir")
        spikes = np.load(out_dir / f"{name}.input.npz")["spikes"]
        net, groups = build(arch, graph, spikes, mapping, CONV_UNIT)
        cores = arch.cores()
        for layer, group in groups.items():
            for i, neuron in enumerate(group):
                neuron.map_to_core(cores[mapping["layers"][layer]["core_of_neuron"][i]])
        chip = sanafe.SpikingChip(arch)
        chip.load(net)
        steps = int(spikes.shape[0]) + int(mapping["depth"])
        res = chip.sim(steps, spike_trace=True, perf_trace=True, message_trace=True, timing_model="simple",
                       processing_threads=1)
        fired = {g: np.zeros(steps, np.int64) for g in groups}
        for s, neurons in enumerate(res["spike_trace"]):
            for n in neurons:
                fired[str(n).rpartition(".")[0]][s] += 1
        out = {"network": name, "steps": steps, "spikes": {g: v.tolist() for g, v in fired.items()},
               "packets": sum(1 for step in res["message_trace"] for m in step if not m["placeholder"]),
               "hops": int(sum(res["perf_trace"]["hops"])), "sim_time_s": float(res["sim_time"]),
               "time_per_step_s": float(res["sim_time"]) / steps}
        tmp = out_dir / f".{name}.sanafe_mapped.json.tmp"
        tmp.write_text(json.dumps(out))
        os.replace(tmp, out_dir / f"{name}.sanafe_mapped.json")
        print(f"{name}: {out['packets']} packets, {out['hops']} hops, {out['time_per_step_s'] * 1e9:.0f} ns/step")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
