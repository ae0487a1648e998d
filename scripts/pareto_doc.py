"""Print docs/pareto.md's tables from a `neurosdm pareto` output folder (its pareto.json), and copy the table and
plots into docs/data and docs/img.

    python scripts/pareto_doc.py OUT_DIR [--copy]
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def main(out: Path, copy: bool) -> None:
    table = json.loads((out / "pareto.json").read_text())
    rows, profiles = table["rows"], table["profiles"]
    base = next((r for r in rows if r["name"] == "base"), rows[0])
    s = table["settings"]
    print(f"{len(rows)} configurations; FID: classifier, {s['num_images']} samples (seed {s['seed']}, quality path "
          f"{s['quality']}); energy: event engine, {s['energy_images']} images\n")
    head = ["configuration", "FID", "firing rate", "spiking steps / call", "calls", *[f"{p} mJ" for p in profiles],
            "ANN fp32 mJ", "ANN int8 mJ"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        e = r["energy_mj_per_image"]
        cells = [r["name"], f"{r['fid']:.2f}", f"{r['firing_rate']:.3f}", f"{r['mean_spiking_steps']:.2f}",
                 str(r["network_calls"]),
                 *[f"{e[p]:.3g}{' (front)' if r['pareto'][p] else ''}" for p in profiles],
                 f"{r['ann_mj_per_image']['cmos45-fp32']:.3g}", f"{r['ann_mj_per_image']['cmos45-int8']:.3g}"]
        print("| " + " | ".join(cells) + " |")
    print("\nRelative to base:")
    for r in rows:
        if r is base:
            continue
        moves = ", ".join(f"{p} {100 * (r['energy_mj_per_image'][p] / base['energy_mj_per_image'][p] - 1):+.0f}%"
                          for p in profiles)
        print(f"- {r['name']}: rate {100 * (r['firing_rate'] / base['firing_rate'] - 1):+.0f}%, FID "
              f"{100 * (r['fid'] / base['fid'] - 1):+.0f}%, energy {moves}")
    ok = [r for r in rows if r["fid"] <= 1.1 * base["fid"]]
    print("\nCheapest within 10% of the base FID:")
    for p in profiles:
        best = min(ok, key=lambda r: r["energy_mj_per_image"][p])
        print(f"- {p}: {best['name']} ({best['energy_mj_per_image'][p]:.3g} mJ, FID {best['fid']:.2f})")
    print("\nAgainst the ANN baselines (same architecture and calls):")
    for p in profiles:
        for b in ("cmos45-fp32", "cmos45-int8"):
            wins = [r for r in rows if r["energy_mj_per_image"][p] < r["ann_mj_per_image"][b]]
            print(f"- {p} vs ANN {b}: " + (", ".join(f"{r['name']} ({r['energy_mj_per_image'][p]:.3g} < "
                                                       f"{r['ann_mj_per_image'][b]:.3g} mJ, FID {r['fid']:.2f})"
                                                       for r in wins) or "none"))
    if copy:
        root = Path(__file__).resolve().parents[1]
        shutil.copy(out / "pareto.json", root / "docs" / "data" / "pareto.json")
        shutil.copy(out / "pareto.csv", root / "docs" / "data" / "pareto.csv")
        for p in profiles:
            shutil.copy(out / f"pareto_{p}.png", root / "docs" / "img" / f"pareto_{p}.png")


if __name__ == "__main__":
    main(Path(sys.argv[1]), "--copy" in sys.argv[2:])
