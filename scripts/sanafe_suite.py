"""neurosdm's side of the SANA-FE comparison (docs/sanafe.md): build the suite's networks, price them, and write the
comparison with what SANA-FE reports for the same networks and inputs.

    python scripts/sanafe_suite.py build  OUT_DIR     # graphs (.nir), inputs (.npz), mapping + neurosdm side (.json)
    python scripts/sanafe_suite.py report OUT_DIR [--json docs/data/sanafe_compare.json] [--doc docs/sanafe.md]

Between the two, ``scripts/sanafe_compare.py OUT_DIR`` (run with .venv-sanafe's python; GPL SANA-FE is called, not
copied) builds every network on ``sanafe.load_loihi()`` and writes ``OUT_DIR/<net>.sanafe.json``.
``scripts/sanafe_compare.sh`` runs the three steps.

The networks, their mapping and placement, neurosdm's side of a network and the comparison are
:mod:`neurosdm.hardware.sanafe` (its docstring has the method); this program prices with the ``loihi-sanafe``
profile (:func:`neurosdm.energy.estimate`) and writes the JSON and the tables of docs/sanafe.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from neurosdm.energy import estimate
from neurosdm.errors import NeuroSDMError
from neurosdm.hardware.sanafe import SUITE, compare, rel, run_neurosdm
from neurosdm.io import atomic_path

PROFILE = "loihi-sanafe"


def price(stats, placement: dict | None = None) -> dict:
    """The ``loihi-sanafe`` pricing of a run's counts (with SANA-FE's placement, when given)."""
    return estimate(stats, PROFILE, placement=placement)


# ----------------------------------------------------------------------------------------------------- report

def markdown_tables(results: list[dict]) -> str:
    """The per-network tables of docs/sanafe.md (figures only; the method is written around them)."""
    lines = ["| network | spike trains identical (all layers, every step) | synaptic events / packets / updates "
             "equal | largest energy difference by part, modelled | total, shipped profile |", "|---|---|---|---|---|"]
    for r in results:
        c = r["counts"]
        same = (c["synapse_events"]["neurosdm_all_synapses"] == c["synapse_events"]["sanafe"]
                and c["packets"]["neurosdm"] == c["packets"]["sanafe"]
                and c["neuron_updates"]["neurosdm_updated_loihi_rule"] == c["neuron_updates"]["sanafe_updated"]
                and c["neuron_updates"]["neurosdm_accesses"] == c["neuron_updates"]["sanafe_accesses"])
        worst = max(abs(v["rel_diff"]) for v in r["energy"]["modelled"].values())
        trains = all(v["spike_trains_identical"] for v in r["layers"].values())
        shipped = 100 * r["energy"]["shipped"]["total"]["rel_diff"]
        lines.append(f"| {r['network']} | {'yes' if trains else 'NO'} | {'yes' if same else 'NO'} | {worst:.1e} | "
                     f"{shipped:+.2f}% |")
    lines.append("")
    for r in results:
        c = r["counts"]
        lines += [f"### {r['network']}", "",
                  f"{r['num_steps']} input steps, depth {r['depth']} (SANA-FE runs {r['sanafe_steps']} steps); "
                  f"neurons per layer: " + ", ".join(f"{n} {v}" for n, v in r["neurons"].items()) + ".", "",
                  "| layer | depth | spikes neurosdm | spikes SANA-FE (aligned window) | outside window | "
                  "trains identical |",
                  "|---|---|---|---|---|---|"]
        for n, layer in r["layers"].items():
            lines.append(f"| {n} | {layer['depth']} | {layer['spikes_neurosdm']} | "
                         f"{layer['spikes_sanafe'] - layer['spikes_sanafe_outside_window']} | "
                         f"{layer['spikes_sanafe_outside_window']} | "
                         f"{'yes' if layer['spike_trains_identical'] else 'NO'} |")
        lines += ["", "| count | neurosdm | SANA-FE |", "|---|---|---|",
                  f"| synaptic events (all synapses, zero weights included) | "
                  f"{c['synapse_events']['neurosdm_all_synapses']} "
                  f"| {c['synapse_events']['sanafe']} |",
                  f"| synaptic events with a nonzero weight (RunStats synops) | "
                  f"{c['synapse_events']['neurosdm_nonzero_synops']} | - |",
                  f"| packets | {c['packets']['neurosdm']:g} | {c['packets']['sanafe']} |",
                  f"| hops | {c['hops']['neurosdm']} | {c['hops']['sanafe']} |",
                  f"| neuron accesses (every mapped neuron, every step) | {c['neuron_updates']['neurosdm_accesses']} | "
                  f"{c['neuron_updates']['sanafe_accesses']} |",
                  f"| neuron updates, neurosdm's rule (nonzero summed input) | "
                  f"{c['neuron_updates']['neurosdm_active']} | - |",
                  f"| neuron updates, Loihi's rule (any synaptic event or a nonzero membrane) | "
                  f"{c['neuron_updates']['neurosdm_updated_loihi_rule']} | "
                  f"{c['neuron_updates']['sanafe_updated']} |", "",
                  "| energy (pJ) | SANA-FE | neurosdm shipped profile | diff | neurosdm modelled | diff |",
                  "|---|---|---|---|---|---|"]
        for part in ("synapse", "soma", "network", "total"):
            s, m = r["energy"]["shipped"][part], r["energy"]["modelled"][part]
            lines.append(f"| {part} | {s['sanafe_pj']:.1f} | {s['neurosdm_pj']:.1f} | {100 * s['rel_diff']:+.2f}% | "
                         f"{m['neurosdm_pj']:.1f} | {100 * m['rel_diff']:+.2f}% |")
        lines += ["", "From the shipped profile to SANA-FE's accounting, one cause at a time (neurosdm's total after "
                      "each change; the change as a share of SANA-FE's total):", "",
                  "| change | neurosdm total (pJ) | change (pJ) | share of SANA-FE total |", "|---|---|---|---|"]
        for st in r["causes"]:
            lines.append(f"| {st['change']} | {st['total']:.1f} | {st['delta_total_pj']:+.1f} | "
                         f"{100 * st['delta_of_sanafe_total']:+.2f}% |")
        h = r["sanafe_by_hand"]
        lines += ["", f"SANA-FE's reported energy reproduced by hand from its own counts: largest relative "
                      f"difference {h['max_rel_diff']:.1e}."]
        du = r.get("sanafe_dense_synapse_unit")
        if du:
            lines.append(f"With SANA-FE's dense synapse unit (35.5 pJ) on the dense layers instead of the conv unit "
                         f"(24.0 pJ, the profile's `synop`): synapse energy {du['synapse_pj']:.1f} pJ "
                         f"({100 * rel(r['energy']['modelled']['synapse']['neurosdm_pj'], du['synapse_pj']):+.2f}% "
                         f"neurosdm vs SANA-FE).")
        lines.append("")
    return "\n".join(lines)


def report(out: Path, json_path: Path | None, doc: Path | None) -> list[dict]:
    results = []
    for name in SUITE:
        ns = json.loads((out / f"{name}.neurosdm.json").read_text())
        sf_path = out / f"{name}.sanafe.json"
        if not sf_path.exists():
            raise SystemExit(f"{sf_path} is missing: run scripts/sanafe_compare.py {out} with .venv-sanafe's python "
                             f"first (scripts/sanafe_compare.sh does all steps)")
        results.append(compare(ns, json.loads(sf_path.read_text())))
    sf_version = json.loads((out / f"{next(iter(SUITE))}.sanafe.json").read_text()).get("sanafe_version")
    payload = {"what": "neurosdm (event engine + loihi-sanafe profile) vs SANA-FE (sanafe.load_loihi()) on the same "
                       "NIR graphs and inputs; produced by scripts/sanafe_compare.sh",
               "sanafe_version": sf_version, "profile": PROFILE, "networks": results}
    if json_path:
        with atomic_path(json_path) as tmp:
            Path(tmp).write_text(json.dumps(payload, indent=1) + "\n")
    if doc:
        text = doc.read_text() if doc.exists() else ""
        begin, end = "<!-- sanafe tables: begin -->", "<!-- sanafe tables: end -->"
        tables = f"{begin}\n{markdown_tables(results)}{end}"
        if begin in text and end in text:
            text = text[:text.index(begin)] + tables + text[text.index(end) + len(end):]
        else:
            text = text + "\n" + tables + "\n"
        with atomic_path(doc) as tmp:
            Path(tmp).write_text(text)
    for r in results:
        m = r["energy"]["modelled"]
        print(f"{r['network']:8s} trains identical: "
              f"{all(v['spike_trains_identical'] for v in r['layers'].values())}  "
              f"events {r['counts']['synapse_events']['neurosdm_all_synapses']}/"
              f"{r['counts']['synapse_events']['sanafe']}"
              f"  energy diff (modelled) " + " ".join(f"{p} {100 * m[p]['rel_diff']:+.2f}%" for p in m))
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=["build", "report"])
    ap.add_argument("out", type=Path)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--doc", type=Path, default=None)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.step == "build":
        for name in SUITE:
            try:
                side = run_neurosdm(name, a.out, price)
            except NeuroSDMError as e:
                raise SystemExit(str(e)) from None
            print(f"{name}: " + ", ".join(f"{n} {sum(map(sum, s))} spikes" for n, s in side["spikes"].items()))
    else:
        report(a.out, a.json, a.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
