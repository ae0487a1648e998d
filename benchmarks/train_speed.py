"""Training iterations per second of each neurosdm preset, float32 and bfloat16 autocast, in one process.

For each preset it builds one :class:`neurosdm.train.Trainer` per precision on random images
(``torch.randn(N, C, H, W).clamp(-1, 1)``: no dataset is read) and times ``trainer.step()``: one full optimisation
step (batch draw, forward of the spiking UNet, epsilon-MSE loss, backward, gradient clipping, Adam, EMA update).

* The first step of each trainer is timed on its own (it includes torch.compile of the neuron kernels, or loading
  them from the inductor cache, and a recompile for bfloat16 inputs) and ``--warmup`` further steps are untimed.
* Then the precisions are interleaved step by step (the order alternates) for ``--iters`` timed steps each, so that
  load from other processes hits both alike; the headline is the median step time.
* The in-run baseline is each preset's float32 step time; bfloat16 is reported as a speed-up against it
  (``fp32 median / bf16 median``: above 1 means bf16 is faster). Parameter counts are from the model itself.

Run ``python benchmarks/train_speed.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    RESULTS_DIR,
    contention_note,
    load_average,
    log,
    machine_info,
    machine_line,
    markdown_table,
    summarize_ms,
    write_json_atomic,
)

DEFAULT_BATCH = {"tiny": 64, "small": 64, "paper-cifar10": 32}
DTYPES = ("fp32", "bf16")


def build_trainer(preset_name: str, bf16: bool, batch_size: int, data: torch.Tensor, seed: int):
    from neurosdm.config import preset
    from neurosdm.train import Trainer, config_with_overrides

    cfg = config_with_overrides(preset(preset_name), **{
        "train.bf16": bf16,
        "train.batch_size": batch_size,
        "train.seed": seed,
    })
    return Trainer(cfg, data=data)


def bench_preset(name: str, dtypes: list[str], batch_size: int, iters: int, warmup: int, data_size: int,
                 seed: int) -> dict:
    from neurosdm.config import preset
    from neurosdm.models import count_parameters

    mc = preset(name).model
    gen = torch.Generator().manual_seed(seed)
    data = torch.randn(max(data_size, batch_size), mc.img_ch, mc.image_size, mc.image_size, generator=gen).clamp(-1, 1)

    trainers, first_s, losses = {}, {}, {}
    for dt in dtypes:
        tr = build_trainer(name, dt == "bf16", batch_size, data, seed)
        t0 = time.perf_counter()
        losses[dt] = [tr.step()]
        first_s[dt] = time.perf_counter() - t0
        trainers[dt] = tr
        log(f"  {name} {dt}: first step {first_s[dt]:.1f} s (includes neuron-kernel compile)")
    for _ in range(warmup):
        for dt in dtypes:
            losses[dt].append(trainers[dt].step())

    samples = {dt: [] for dt in dtypes}
    for i in range(iters):
        order = dtypes if i % 2 == 0 else dtypes[::-1]
        for dt in order:
            t0 = time.perf_counter()
            losses[dt].append(trainers[dt].step())
            samples[dt].append(time.perf_counter() - t0)

    params = count_parameters(trainers[dtypes[0]].model)
    trainable = sum(p.numel() for p in trainers[dtypes[0]].model.parameters() if p.requires_grad)
    per_dtype = {}
    for dt in dtypes:
        s = summarize_ms(samples[dt])
        med_s = s["median_ms"] / 1000
        per_dtype[dt] = s | {
            "first_step_s": first_s[dt],
            "it_per_s": 1.0 / med_s,
            "it_per_s_mean": len(samples[dt]) / sum(samples[dt]),
            "images_per_s": batch_size / med_s,
            "final_loss": losses[dt][-1],
            "losses_finite": all(math.isfinite(v) for v in losses[dt]),
        }
    ratios = {}
    if "fp32" in per_dtype and "bf16" in per_dtype:
        ratios["bf16_speedup_vs_fp32"] = per_dtype["fp32"]["median_ms"] / per_dtype["bf16"]["median_ms"]
    del trainers
    gc.collect()
    return {
        "preset": name,
        "batch_size": batch_size,
        "model": {"img_ch": mc.img_ch, "image_size": mc.image_size, "ch": mc.ch, "ch_mult": list(mc.ch_mult),
                  "num_res_blocks": mc.num_res_blocks, "num_steps": mc.num_steps, "tsm": mc.tsm},
        "parameters": params,
        "trainable_parameters": trainable,
        "baseline": "fp32" if "fp32" in per_dtype else None,
        "per_dtype": per_dtype,
        "ratios": ratios,
    }


def render(results: list[dict], dtypes: list[str]) -> str:
    headers = ["preset", "params", "batch"]
    for dt in dtypes:
        headers += [f"{dt} ms/it", f"{dt} it/s", f"{dt} img/s"]
    if "fp32" in dtypes and "bf16" in dtypes:
        headers.append("bf16 speed-up")
    rows = []
    for r in results:
        row = [r["preset"], f"{r['parameters'] / 1e6:.2f}M", str(r["batch_size"])]
        for dt in dtypes:
            d = r["per_dtype"][dt]
            row += [f"{d['median_ms']:.0f}", f"{d['it_per_s']:.2f}", f"{d['images_per_s']:.1f}"]
        if "bf16_speedup_vs_fp32" in r["ratios"]:
            row.append(f"{r['ratios']['bf16_speedup_vs_fp32']:.2f}x")
        rows.append(row)
    return markdown_table(headers, rows)


def main(argv=None) -> int:
    from neurosdm.config import PRESETS

    ap = argparse.ArgumentParser(
        description="Training iterations per second (Trainer.step) of neurosdm presets in float32 and bfloat16 "
                    "autocast, interleaved in one process; fp32 is the in-run baseline. Prints a Markdown table "
                    "and writes JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--presets", default="tiny,small",
                    help=f"comma-separated presets from: {', '.join(PRESETS)}, or 'all' (paper-cifar10 is a "
                         f"66.7M-parameter model: seconds per step on a CPU)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="batch size for every preset; unset: per preset, "
                         + ", ".join(f"{k} {v}" for k, v in DEFAULT_BATCH.items()))
    ap.add_argument("--iters", type=int, default=10, help="timed steps per preset and precision (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compiling) one")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated subset of fp32,bf16")
    ap.add_argument("--data-size", type=int, default=256, help="random images the batches are drawn from")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; unset: torch chooses")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "train_speed.json", help="JSON output path")
    args = ap.parse_args(argv)

    presets = list(PRESETS) if args.presets.strip() == "all" else [p.strip() for p in args.presets.split(",")
                                                                    if p.strip()]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown or not presets:
        ap.error(f"--presets: unknown {unknown}; choose from {', '.join(PRESETS)} or 'all'")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in DTYPES for d in dtypes) or len(set(dtypes)) != len(dtypes):
        ap.error(f"--dtypes: choose from {', '.join(DTYPES)}")
    if args.iters < 1 or args.warmup < 0 or (args.batch_size is not None and args.batch_size < 1):
        ap.error("--iters and --batch-size must be >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)

    note = contention_note(torch.get_num_threads())
    info = machine_info()
    info["contention_note"] = note
    log(f"train_speed: presets {presets}, {dtypes}, first step + {args.warmup} warm-up + {args.iters} timed steps "
        f"each; {machine_line(info)}")
    if note:
        log(note)

    results = []
    for name in presets:
        bs = args.batch_size or DEFAULT_BATCH.get(name, 32)
        t0 = time.perf_counter()
        r = bench_preset(name, dtypes, bs, args.iters, args.warmup, args.data_size, args.seed)
        results.append(r)
        log(f"  {name}: " + ", ".join(f"{dt} {r['per_dtype'][dt]['median_ms']:.0f} ms/it" for dt in dtypes)
            + f"; {time.perf_counter() - t0:.0f} s")
    info["load_average_at_end_1_5_15_min"] = load_average()

    report = {
        "benchmark": "train_speed",
        "what": "Trainer.step() (forward, epsilon-MSE, backward, clip, Adam, EMA) on random images; median of "
                "interleaved steps; bf16 = torch.autocast(bfloat16)",
        "machine": info,
        "settings": {"presets": presets, "dtypes": dtypes, "iters": args.iters, "warmup": args.warmup,
                     "data_size": args.data_size, "seed": args.seed, "batch_size_override": args.batch_size},
        "results": results,
    }
    path = write_json_atomic(args.out, report)

    print(render(results, dtypes))
    print()
    print("first steps (compile / cache load, excluded above): " + "; ".join(
        f"{r['preset']} " + ", ".join(f"{dt} {r['per_dtype'][dt]['first_step_s']:.1f} s" for dt in dtypes)
        for r in results))
    print(machine_line(info))
    if note:
        print(note)
    print(f"JSON: {path}")
    bad = [f"{r['preset']} {dt}" for r in results for dt in dtypes if not r["per_dtype"][dt]["losses_finite"]]
    if bad:
        print(f"WARNING: non-finite loss in {', '.join(bad)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
