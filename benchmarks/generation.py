"""Time to generate images with DDIM-20 on every path, for the shipped checkpoint (ratios in one process).

    python benchmarks/generation.py [--threads 1] [--images 1] [--steps 20]

Paths: the torch model (GPU path, float32), the clocked torch engine on the float export (float32) and on the
int8 export (float64 fixed point), and the event engine on the int8 export. Every path runs once to warm up
(numba and torch compile caches) and is then timed (``neurosdm simulate`` is the same code: an engine in a
``GraphDenoiser`` inside the sampler); the seconds per image and the ratio to the GPU path are written to
benchmarks/results/generation.json with the firing activity the run measured.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, machine_info, machine_line, markdown_table, write_json_atomic  # noqa: E402

from neurosdm.checkpoint import load_model  # noqa: E402
from neurosdm.exporters.pipeline import export_checkpoint  # noqa: E402
from neurosdm.sample import generate  # noqa: E402
from neurosdm.simulators import run as r  # noqa: E402
from neurosdm.graph.program import load_program  # noqa: E402

CKPT = Path(__file__).resolve().parents[1] / "neurosdm" / "assets" / "tiny_fashion.pt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        f32 = load_program(export_checkpoint(CKPT, Path(d) / "f.nir"))
        q8 = load_program(export_checkpoint(CKPT, Path(d) / "q.nir", quantize="int8"))
    model, config = load_model(CKPT)
    n, k = args.images, args.steps

    def gpu():
        return generate(model, config, n, seed=0, num_sample_steps=k, batch_size=n), None

    def engine(program, name, dtype=torch.float64):
        def run():
            eng = r.make_engine(name, program, dtype=dtype)
            den = r.GraphDenoiser(program, eng)
            images = generate(den, r.config_of(program), n, seed=0, num_sample_steps=k, batch_size=n)
            return images, den.stats("ddim", 0.0, n)
        return run

    paths = {"gpu path (torch model, float32)": gpu,
             "torch engine, float export, float32": engine(f32, "torch", torch.float32),
             "torch engine, int8 export (fixed point)": engine(q8, "torch"),
             "event engine, int8 export (fixed point)": engine(q8, "event")}
    rows, results = [], {}
    for name, fn in paths.items():
        fn()  # warm-up: compile caches
        t0 = time.perf_counter()
        _, stats = fn()
        sec = (time.perf_counter() - t0) / n
        results[name] = {"seconds_per_image": sec}
        if stats is not None:
            results[name]["firing_rate"] = stats.total("spikes_out") / stats.total("neuron_updates")
            results[name]["synops_per_image"] = (stats.total("synops") + stats.total("graded_ops")) / n
    base = results["gpu path (torch model, float32)"]["seconds_per_image"]
    for name, res in results.items():
        res["ratio_to_gpu_path"] = res["seconds_per_image"] / base
        rows.append([name, f"{res['seconds_per_image']:.2f}", f"{res['ratio_to_gpu_path']:.1f}x",
                     f"{res.get('firing_rate', float('nan')):.3f}", f"{res.get('synops_per_image', 0):,.0f}"])
    info = machine_info()
    print(machine_line(info))
    print(markdown_table(["path", "s / image", "vs GPU path", "firing rate", "synops / image"], rows))
    write_json_atomic(RESULTS_DIR / "generation.json",
                      {"machine": info, "threads": args.threads, "images": n, "steps": k, "results": results})


if __name__ == "__main__":
    main()
