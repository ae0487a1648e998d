"""``neurosdm map`` (:func:`neurosdm.hardware.routing.map_program`) on the shipped tiny model's int8 export and on
paper-cifar10's (random weights, seed 0, as ``benchmarks/deep_model.py``), on every profile with resources.

Per graph and profile: the mapping time (median of ``--repeats``; and the CPU time of the first call, less
sensitive to a shared machine) against reading the graph (``load_program``, measured in the same run: the
baseline), and the answer (fits, cores, chips, boards, utilisation). For the tiny
model also the energy and chip time per image of one generation (event engine, 1 image, DDIM ``--steps``, seed 0)
priced on each profile with the mapping and with the profile's lower bound (``--mapping none``).

Writes ``results/mapping.json`` and ``results/mapping.md`` and prints the tables. ``python benchmarks/mapping.py
--help``. The paper-cifar10 export is cached in ``--work`` (default ``/tmp/neurosdm_bench_mapping``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from _common import (RESULTS_DIR, load_average, log, machine_info, machine_line, markdown_table, median_seconds,
                     write_json_atomic)
from deep_model import make_paper_checkpoint

from neurosdm.energy import estimate
from neurosdm.graph.program import load_program
from neurosdm.hardware.routing import try_map
from neurosdm.simulators.run import simulate

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ("loihi", "loihi2", "loihi-sanafe", "truenorth", "spinnaker2")


def export(ckpt: Path, out: Path, *extra: str) -> Path:
    if not out.exists():
        subprocess.run([sys.executable, "-m", "neurosdm", "export", str(ckpt), "--to", "nir", "--quantize", "int8",
                        "--out", str(out), *extra], check=True, cwd=ROOT)
    return out


def measure(name: str, path: Path, profiles, repeats: int) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    program = load_program(path)
    load_s = time.perf_counter() - t0
    res = {"file": str(path), "load_s": load_s, "load_cpu_s": time.process_time() - c0, "profiles": {}}
    for prof in profiles:
        log(f"{name}: map on {prof}")
        c0 = time.process_time()
        m, note = try_map(program, prof)
        cpu = time.process_time() - c0
        secs = median_seconds(lambda: try_map(program, prof), repeats) if m is not None else None
        res["profiles"][prof] = {"map_s": secs, "map_cpu_s": cpu if m is not None else None,
                                 "map_over_load": secs / load_s if secs else None, "note": note,
                                 **({k: m[k] for k in ("fits", "violations", "cores_used", "chips_used",
                                                       "boards_used", "utilisation")} if m else {})}
    return res, program


def energy(program, steps: int, profiles) -> dict:
    _, stats, _ = simulate(program, "event", num_images=1, steps=steps, seed=0)
    out = {}
    for prof in profiles:
        m, _ = try_map(program, prof)
        lb = estimate(stats, prof)
        r = estimate(stats, prof, mapping=m) if m is not None else lb
        out[prof] = {k: {"mj_per_image": rep["totals"]["per_image_pj"] * 1e-9,
                         "ms_per_image": rep["time"]["per_image_s"] * 1e3 if rep["time"] else None,
                         "limiting": (rep.get("mapping") or {}).get("limiting_cores", [])[:1]}
                     for k, rep in (("mapped", r), ("lower_bound", lb))}
    return out


def fmt(v, digits=3):
    return "-" if v is None else (f"{v:.{digits}g}" if isinstance(v, float) else f"{v:,}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/neurosdm_bench_mapping"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps of the tiny model's priced generation")
    ap.add_argument("--skip-paper", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    results = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "graphs": {}}
    tiny = export(ROOT / "neurosdm" / "assets" / "tiny_fashion.pt", args.work / "tiny_int8.nir")
    results["graphs"]["tiny"], program = measure("tiny", tiny, PROFILES, args.repeats)
    log(f"tiny: one image, DDIM {args.steps}, priced")
    results["tiny_energy"] = energy(program, args.steps, PROFILES)
    if not args.skip_paper:
        ckpt = make_paper_checkpoint(args.work)
        paper = export(ckpt, args.work / "paper_int8.nir", "--calibration", "cifar10", "--data-dir",
                       str(args.work / "noise_cifar"), "--calibration-images", "8")
        results["graphs"]["paper-cifar10"], _ = measure("paper-cifar10", paper, PROFILES, 1)
    info["load_average_end"] = load_average()
    rows = []
    for g, r in results["graphs"].items():
        for prof, p in r["profiles"].items():
            u = p.get("utilisation", {})
            rows.append([g, prof, fmt(r["load_s"]), fmt(p["map_s"]), fmt(p["map_cpu_s"]), fmt(p["map_over_load"]),
                         "yes" if p.get("fits") else ("no" if "fits" in p else "cannot map"),
                         fmt(p.get("cores_used")), fmt(p.get("chips_used")),
                         " ".join(f"{k} {v['mean']:.2f}/{v['max']:.2f}" for k, v in u.items()) or p["note"][:60]])
    t1 = markdown_table(["graph", "profile", "load s", "map s", "map CPU s", "map / load", "fits", "cores", "chips",
                         "utilisation mean/max"], rows, "llrrrrlrrl")
    rows = [[prof, fmt(e["mapped"]["mj_per_image"]), fmt(e["lower_bound"]["mj_per_image"]),
             fmt(e["mapped"]["ms_per_image"]), fmt(e["lower_bound"]["ms_per_image"])]
            for prof, e in results["tiny_energy"].items()]
    t2 = markdown_table(["profile", "mJ / image (mapped)", "mJ / image (lower bound)", "ms / image (mapped)",
                         "ms / image (lower bound)"], rows)
    text = (f"## map on the shipped tiny model and paper-cifar10\n\n{t1}\n\n## tiny model, 1 image, DDIM "
            f"{args.steps}: priced on the mapping and on the lower bound\n\n{t2}\n\n{machine_line(info)}\n")
    print(text)
    write_json_atomic(RESULTS_DIR / "mapping.json", results)
    (RESULTS_DIR / "mapping.md").write_text(text)


if __name__ == "__main__":
    main()
