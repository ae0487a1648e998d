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
    from neurosdm.energy_plots import write_plots
    from neurosdm.exporters.pipeline import export_checkpoint
    from neurosdm.io import atomic_path
    from neurosdm.graph.program import load_program
    from neurosdm.simulators.run import simulate

    ckpt = ROOT / "neurosdm" / "assets" / "tiny_fashion.pt"
    with tempfile.TemporaryDirectory() as d:
        nir_path = export_checkpoint(ckpt, Path(d) / "tiny8.nir", quantize="int8")
        program = load_program(nir_path)
    t0 = time.time()
    _, stats, _ = simulate(program, "event", num_images=a.images, sampler="ddim", steps=a.steps, seed=a.seed)
    sim_s = time.time() - t0
    priced = E.price_all(stats, program)
    check = E.paper_check()
    out = {
        "checkpoint": "neurosdm/assets/tiny_fashion.pt", "export": "int8 (calibration: built-in sample)",
        "run": {"engine": "event", "images": a.images, "sampler": "ddim", "steps": a.steps, "seed": a.seed,
                "num_steps": stats.num_steps, "seconds": sim_s},
        **{k: priced[k] for k in ("counts", "host", "firing_rates", "summary", "ann_baseline",
                                  "paper_formula_on_measured_rates")},
        "paper_check": {k: check[k] for k in ("macs", "ann_mj", "ann_error", "implied_rate")},
        "reports": priced["reports"],
    }
    summary, paper = priced["summary"], priced["paper_formula_on_measured_rates"]
    with atomic_path(a.out) as tmp:
        tmp.write_text(json.dumps(out, indent=1))
    write_plots(priced, stats, a.plots)
    for name, s in summary.items():
        t = f"{s['time_per_image_ms']:.3g} ms" if s["time_per_image_ms"] is not None else "-"
        print(f"{name:14s} {s['per_image_mj']:10.4g} mJ/image  time {t:>10s}  x ANN-fp32 {s['vs_ann_fp32']:.3g}  "
              f"unpriced: {', '.join(s['unpriced']) or '-'}")
    for k, b in priced["ann_baseline"].items():
        print(f"ANN {k}: {b['macs']:,} MACs/call, {b['pj_per_image'] * 1e-9:.4g} mJ/image")
    print(f"paper formula on measured rates: {paper['per_image_pj'] * 1e-9:.4g} mJ/image (mean rate "
          f"{paper['mean_rate']:.3f}); paper check ANN {check['ann_mj']:.3f} mJ ({100 * check['ann_error']:+.2f}%)")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
