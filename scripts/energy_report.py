"""Energy report of the shipped checkpoint on every hardware profile -> docs/data/energy_report.json (+ plots).

Exports neurosdm/assets/tiny_fashion.pt to int8 NIR (calibration: the built-in sample), generates images with the
event engine (DDIM, seed 0) and prices the exact counts with every profile in neurosdm/hw_profiles, plus the ANN
baselines (cmos45-fp32, cmos45-int8) and the SDM paper's formula on the measured firing rates.

    python scripts/energy_report.py [--images 2] [--steps 20] [--out docs/data/energy_report.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "data" / "energy_report.json")
    ap.add_argument("--plots", type=Path, default=ROOT / "docs" / "img")
    a = ap.parse_args()

    from neurosdm import energy as E
    from neurosdm.energy_plots import plot_layer_terms, plot_profiles, plot_spikes
    from neurosdm.exporters.nir import export_checkpoint
    from neurosdm.io import atomic_path
    from neurosdm.simulators.program import load_program
    from neurosdm.simulators.run import simulate

    ckpt = ROOT / "neurosdm" / "assets" / "tiny_fashion.pt"
    with tempfile.TemporaryDirectory() as d:
        nir_path = export_checkpoint(ckpt, Path(d) / "tiny8.nir", quantize="int8")
        program = load_program(nir_path)
    t0 = time.time()
    _, stats, _ = simulate(program, "event", num_images=a.images, sampler="ddim", steps=a.steps, seed=a.seed)
    sim_s = time.time() - t0
    calls = len(stats.timesteps)
    reports = {name: E.estimate(stats, name) for name in E.list_profiles()}
    baselines = {}
    for name in ("cmos45-fp32", "cmos45-int8"):
        b = E.ann_baseline(program, name)
        b["pj_per_image"] = b["pj_per_call"] * calls
        baselines[name] = b
    rates = E.firing_rates(stats, program)
    flops = E.program_macs(program)
    first = next(layer.name for layer in program.layers if layer.kind == "conv" and layer.sources == program.inputs)
    paper = E.paper_energy(flops, rates, program.num_steps, first)
    paper["per_image_pj"] = paper["total_pj"] * calls
    check = E.paper_check()
    summary = {
        name: {"per_image_mj": r["totals"]["per_image_pj"] * 1e-9,
               "per_call_per_image_uj": r["totals"]["per_call_per_image_pj"] * 1e-6,
               "time_per_image_ms": r["time"]["per_image_s"] * 1e3 if r["time"] else None,
               "edp_per_image_js": r["edp_per_image_js"],
               "vs_ann_fp32": r["totals"]["per_image_pj"] / baselines["cmos45-fp32"]["pj_per_image"],
               "unpriced": {f"{u['term']} ({u['where']})": u["count"] for u in r["unpriced"]},
               "by_term_mj": {k: v * 1e-9 for k, v in r["totals"]["by_term_pj"].items()}}
        for name, r in reports.items()}
    out = {
        "checkpoint": "neurosdm/assets/tiny_fashion.pt", "export": "int8 (calibration: built-in sample)",
        "run": {"engine": "event", "images": a.images, "sampler": "ddim", "steps": a.steps, "seed": a.seed,
                "num_steps": stats.num_steps, "seconds": sim_s},
        "counts": {c: stats.total(c) for c in ("synops", "graded_ops", "macs", "fanin_adds", "neuron_updates",
                                               "active_neurons", "spikes_out")},
        "host": {k: int(v.sum()) for k, v in stats.host.items()},
        "firing_rates": rates,
        "summary": summary,
        "ann_baseline": {k: {kk: v[kk] for kk in ("macs", "mac_pj", "pj_per_call", "pj_per_image", "convention")}
                         for k, v in baselines.items()},
        "paper_formula_on_measured_rates": {k: paper[k] for k in ("total_pj", "first_pj", "sops", "mean_rate",
                                                                   "per_image_pj")},
        "paper_check": {k: check[k] for k in ("macs", "ann_mj", "ann_error", "implied_rate")},
        "reports": reports,
    }
    with atomic_path(a.out) as tmp:
        tmp.write_text(json.dumps(out, indent=1))
    plot_layer_terms(reports["loihi2"], a.plots / "energy_layers_loihi2.png")
    plot_spikes(stats, a.plots / "energy_spikes.png")
    plot_profiles({k: v["totals"]["per_image_pj"] for k, v in reports.items()},
                  {k: v["pj_per_image"] for k, v in baselines.items()}, a.plots / "energy_profiles.png")
    for name, s in summary.items():
        t = f"{s['time_per_image_ms']:.3g} ms" if s["time_per_image_ms"] is not None else "-"
        print(f"{name:14s} {s['per_image_mj']:10.4g} mJ/image  time {t:>10s}  x ANN-fp32 {s['vs_ann_fp32']:.3g}  "
              f"unpriced: {', '.join(s['unpriced']) or '-'}")
    for k, b in baselines.items():
        print(f"ANN {k}: {b['macs']:,} MACs/call, {b['pj_per_image'] * 1e-9:.4g} mJ/image")
    print(f"paper formula on measured rates: {paper['per_image_pj'] * 1e-9:.4g} mJ/image (mean rate "
          f"{paper['mean_rate']:.3f}); paper check ANN {check['ann_mj']:.3f} mJ ({100 * check['ann_error']:+.2f}%)")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
