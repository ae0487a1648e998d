"""SANA-FE's side of the comparison: build each suite network (:mod:`neurosdm.hardware.sanafe`, written by
``scripts/sanafe_suite.py build``) on SANA-FE's Loihi and run the same input. Runs with .venv-sanafe's python
(``scripts/sanafe_env.sh``): needs sanafe, nir and numpy, no torch and no neurosdm (so it imports nothing from the
package). SANA-FE (GPL-3.0) is called through its Python API, never copied.

    .venv-sanafe/bin/python scripts/sanafe_compare.py OUT_DIR [--no-dense-unit]

Reads ``OUT_DIR/<net>.nir`` (the graph neurosdm simulated), ``<net>.input.npz`` (``spikes [num_steps, *shape]``) and
``<net>.neurosdm.json`` (only its ``mapping``: which cores each layer goes to, and the layers' depth); writes
``<net>.sanafe.json``: SANA-FE's spikes per layer and step (in NIR's neuron order), its counts, its energy by part,
and the energy recomputed by hand from its counts with the architecture's constants.

How the graph becomes a SANA-FE network:
- the encoder IF fed by the Input node (``spikes_in``) becomes input neurons (soma ``loihi_inputs[i]``, model
  ``input``, attribute ``spikes`` = the neuron's spike train);
- every other IF layer becomes a group on soma ``loihi_lif`` (``leaky_integrate_fire``): ``threshold`` (it fires
  when ``v > threshold``: the graph's comparison is ``>``), ``leak_decay = 1``, ``reset_mode = "hard"``, ``reset =
  0``, no bias;
- an Affine becomes ``connect_neurons_dense`` (weights ``[source, destination]``, every pair a synapse, zero weights
  included), a Conv2d (stride 1, no padding: SANA-FE has none) ``connect_neurons_conv2d``. Layouts, found by
  probing SANA-FE 2.2.9 with one input spike at a time (each weight a distinct value, read back from the potential
  trace): a group's neurons are in NIR's C-order ``(c, y, x)``, the conv weights a flat list in the order ``(ky, kx,
  Ci, Co)``, applied as a correlation (no kernel flip), as NIR's Conv2d; a Flatten therefore keeps the order;
- every connection uses the synapse unit ``loihi_conv_synapse`` (24.0 pJ: the profile's ``synop``); a second run
  of networks with dense layers uses ``loihi_dense_synapse`` for them (35.5 pJ) to show that difference;
- SANA-FE delivers a spike at the next step (one step of latency per layer): the run lasts ``num_steps + depth``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
from pathlib import Path

import nir
import numpy as np
import sanafe

CONV_UNIT, DENSE_UNIT = "loihi_conv_synapse", "loihi_dense_synapse"


def arch_constants(arch_path: Path) -> dict:
    """The energy constants (pJ) of SANA-FE's shipped Loihi description that the networks here use."""
    import re

    text = arch_path.read_text()

    def get(unit: str, key: str) -> float:
        block = text[text.index(f"name: {unit}"):]
        return float(re.search(rf"{key}:\s*([0-9.eE+-]+)", block).group(1)) * 1e12

    return {"access": get("loihi_lif", "energy_access_neuron"), "update": get("loihi_lif", "energy_update_neuron"),
            "spike_out": get("loihi_lif", "energy_spike_out"), "message": get("loihi_out", "energy_message_out"),
            CONV_UNIT: get(CONV_UNIT, "energy_process_spike"), DENSE_UNIT: get(DENSE_UNIT, "energy_process_spike"),
            "hop_ew": get("loihi_tile", "energy_east_hop"), "hop_ns": get("loihi_tile", "energy_north_hop")}


def build(arch, graph: nir.NIRGraph, spikes: np.ndarray, mapping: dict, dense_unit: str):
    """The SANA-FE network of ``graph`` on ``arch`` with ``spikes [steps, *shape]`` as the input neurons' trains."""
    cores = arch.cores()
    net = sanafe.Network()
    groups = {}
    incoming = {}
    for src, dst in graph.edges:
        incoming.setdefault(dst, []).append(src)
    def unit_out(name: str) -> str:  # the synapse unit of a layer's outgoing connections
        dests = [mapping["layers"][d]["synapse_layer"] for d in mapping["layers"][name]["destinations"]]
        return dense_unit if any(isinstance(graph.nodes[s], nir.Affine) for s in dests) else CONV_UNIT

    for name, info in mapping["layers"].items():
        size = int(info["size"])
        if info["depth"] == 0:
            trains = spikes.reshape(spikes.shape[0], -1)
            if size > 1024:
                raise SystemExit(f"{name}: more than 1024 input neurons need several input cores")
            g = net.create_neuron_group(name, size, soma_hw_name="loihi_inputs[0]",
                                        default_synapse_hw_name=unit_out(name), log_spikes=True)
            for i, neuron in enumerate(g):
                neuron.set_attributes(soma_hw_name=f"loihi_inputs[{i}]",
                                      model_attributes={"spikes": [bool(v) for v in trains[:, i]]})
        else:
            g = net.create_neuron_group(name, size, soma_hw_name="loihi_lif",
                                        default_synapse_hw_name=unit_out(name), log_spikes=True,
                                        model_attributes={"threshold": info["threshold"], "leak_decay": 1.0,
                                                          "reset_mode": "hard", "reset": 0.0})
        for i, neuron in enumerate(g):
            neuron.map_to_core(cores[info["cores"][i // 1024]])
        groups[name] = g
    for name, info in mapping["layers"].items():
        if info["depth"] == 0:
            continue
        syn = graph.nodes[info["synapse_layer"]]
        src = mapping["layers"][info["source"]]
        if isinstance(syn, nir.Conv2d):
            w = np.asarray(syn.weight, np.float64)  # [Co, Ci, kh, kw]
            if tuple(np.atleast_1d(syn.stride)) not in ((1,), (1, 1)) or np.any(np.asarray(syn.padding) != 0):
                raise SystemExit(f"{info['synapse_layer']}: only stride 1 without padding maps to SANA-FE's conv2d")
            co, ci, kh, kw = w.shape
            _, h, wd = src["shape"]
            groups[info["source"]].connect_neurons_conv2d(
                groups[name], {"weight": w.transpose(2, 3, 1, 0).reshape(-1).tolist()}, wd, h, ci, kw, kh, co, 1, 1)
        else:
            w = np.asarray(syn.weight, np.float64)  # [out, in]; SANA-FE wants [source, destination]
            groups[info["source"]].connect_neurons_dense(groups[name], {"weight": w.T.reshape(-1).tolist()})
    return net, groups


def run(arch, graph, spikes, mapping, dense_unit=CONV_UNIT) -> dict:
    """One fresh chip per run (a reused chip keeps its simulation time: SANA-FE 2.2.9's LIF model then refuses
    the next run)."""
    net, groups = build(arch, graph, spikes, mapping, dense_unit)
    chip = sanafe.SpikingChip(arch)
    chip.load(net)
    steps = int(spikes.shape[0]) + int(mapping["depth"])
    res = chip.sim(steps, spike_trace=True, perf_trace=True, message_trace=True, timing_model="simple",
                   processing_threads=1)
    out = {name: np.zeros((steps, int(mapping["layers"][name]["size"])), np.uint8) for name in groups}
    for s, fired in enumerate(res["spike_trace"]):
        for n in fired:
            group, _, idx = str(n).rpartition(".")
            out[group][s, int(idx)] = 1
    return {"res": res, "spikes": out, "steps": steps}


def summarise(name: str, out_dir: Path, const: dict, arch, dense_unit_run: bool = True) -> dict:
    graph = nir.read(out_dir / f"{name}.nir")
    spikes = np.load(out_dir / f"{name}.input.npz")["spikes"]
    mapping = json.loads((out_dir / f"{name}.neurosdm.json").read_text())["mapping"]
    r = run(arch, graph, spikes, mapping)
    res, perf = r["res"], r["res"]["perf_trace"]
    steps = r["steps"]
    input_spikes = int(r["spikes"][next(n for n, i in mapping["layers"].items() if i["depth"] == 0)].sum())
    lif = [n for n, i in mapping["layers"].items() if i["depth"] > 0]
    n_lif = sum(mapping["layers"][n]["size"] for n in lif)
    lif_fired = int(sum(r["spikes"][n].sum() for n in lif))
    events = int(sum(perf["spikes"]))
    packets = sum(1 for step in res["message_trace"] for m in step if not m["placeholder"])
    hops = int(sum(perf["hops"]))
    lif_updated = int(sum(perf["updated"])) - input_spikes  # an input neuron that fires counts as updated
    e = {k: float(v) * 1e12 for k, v in res["energy"].items()}
    by_hand = {"synapse": events * const[CONV_UNIT],
               "soma": n_lif * steps * const["access"] + lif_updated * const["update"] + lif_fired * const["spike_out"],
               "network": packets * const["message"]}
    by_hand["total"] = sum(by_hand.values())
    if hops:
        by_hand["network_note"] = "hops present: not reproduced by hand (direction-dependent)"
    out = {"network": name, "sanafe_version": importlib.metadata.version("sanafe"), "steps": steps,
           "spikes": {n: v.tolist() for n, v in r["spikes"].items()},
           "counts": {"synapse_events": events, "packets": packets, "hops": hops, "lif_updated": lif_updated,
                      "lif_fired": lif_fired, "input_spikes": input_spikes, "lif_accesses": n_lif * steps,
                      "per_step": {k: perf[k] for k in ("spikes", "updated", "fired", "hops")}},
           "energy_pj": {"synapse": e["synapse"], "soma": e["soma"], "network": e["network"],
                         "dendrite": e.get("dendrite", 0.0), "total": e["total"]},
           "by_hand": {"energy_pj": by_hand,
                       "max_rel_diff": max(abs(by_hand[k] - e[k]) / e[k] for k in ("synapse", "soma", "network",
                                                                                   "total") if e[k])}}
    dense = any(isinstance(graph.nodes[i["synapse_layer"]], nir.Affine) for i in mapping["layers"].values()
                if i["synapse_layer"])
    if dense_unit_run and dense:
        d = run(arch, graph, spikes, mapping, dense_unit=DENSE_UNIT)
        out["dense_unit"] = {"synapse_pj": float(d["res"]["energy"]["synapse"]) * 1e12,
                             "total_pj": float(d["res"]["energy"]["total"]) * 1e12}
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    dense_unit_run = "--no-dense-unit" not in argv
    argv = [a for a in argv if a != "--no-dense-unit"]
    if len(argv) != 1:
        print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
        return 2
    out_dir = Path(argv[0])
    from importlib.resources import files

    const = arch_constants(Path(str(files("sanafe.examples") / "loihi.yaml")))
    names = sorted(p.name[:-len(".neurosdm.json")] for p in out_dir.glob("*.neurosdm.json"))
    if not names:
        print(f"no <net>.neurosdm.json in {out_dir}: run scripts/sanafe_suite.py build {out_dir} first",
              file=sys.stderr)
        return 1
    arch = sanafe.load_loihi()  # the description, shared by the runs (each builds its own chip)
    for name in names:
        s = summarise(name, out_dir, const, arch, dense_unit_run)
        tmp = out_dir / f".{name}.sanafe.json.tmp"
        tmp.write_text(json.dumps(s))
        os.replace(tmp, out_dir / f"{name}.sanafe.json")
        print(f"{name}: {s['steps']} steps, energy {s['energy_pj']['total']:.1f} pJ, by hand within "
              f"{s['by_hand']['max_rel_diff']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
