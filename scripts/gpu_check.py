"""The GPU path at the papers' size, in one run for a lent GPU machine: train a few hundred bf16 steps of
paper-cifar10, export the EMA model to NIR (float; the up-sampling extension), and run the torch engine on the
device; prints every figure and writes them as JSON.

    python scripts/gpu_check.py [--device cuda] [--preset paper-cifar10] [--train-steps 300] [--batch 64]
        [--sample-steps 5] [--images 2] [--out runs/gpu_check]

There is no CIFAR-10 on these machines (no downloads), so training reads seeded synthetic images (smooth random
fields in [-1, 1]): the figures are speed and memory, not quality. The same script runs on the CPU with a small
preset (``--device cpu --preset tiny --train-steps 2 --sample-steps 1 --images 1``: tests/test_gpu_check.py runs
that), so its device plumbing is checked where no GPU is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from neurosdm.checkpoint import save_checkpoint  # noqa: E402
from neurosdm.config import preset  # noqa: E402
from neurosdm.exporters.pipeline import export_checkpoint  # noqa: E402
from neurosdm.graph.program import load_program  # noqa: E402
from neurosdm.simulators.run import simulate  # noqa: E402
from neurosdm.train import Trainer  # noqa: E402


def synthetic_images(n: int, c: int, size: int, seed: int = 0) -> torch.Tensor:
    """``n`` smooth random images ``[n, c, size, size]`` in [-1, 1] (Gaussian noise, blurred by 4x average pooling
    and nearest up-sampling back, then scaled), seeded."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, size // 4, size // 4, generator=g)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x / x.abs().amax(dim=(1, 2, 3), keepdim=True)).clamp(-1, 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="paper-cifar10")
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sample-steps", type=int, default=5, help="DDIM steps of the engine run")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --device cpu (and a small --preset) to check the plumbing")
    cfg = preset(a.preset)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=a.batch, bf16=True,
                                                             steps=a.train_steps))
    m = cfg.model
    out = {"device": str(device), "preset": a.preset, "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    data = synthetic_images(max(4 * a.batch, 256), m.img_ch, m.image_size)
    trainer = Trainer(cfg, data=data, device=str(device))
    out["parameters"] = sum(p.numel() for p in trainer.model.parameters())
    trainer.step()  # first step: kernels compile, memory grows
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(max(a.train_steps - 1, 0)):
        trainer.step()
    sync(device)
    dt = time.perf_counter() - t0
    steps = max(a.train_steps - 1, 0)
    out["train"] = {"steps": a.train_steps, "batch": a.batch, "bf16": True, "last_loss": float(trainer.last_loss),
                    "seconds_per_step": dt / steps if steps else None,
                    "peak_gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda"
                    else None}
    print(f"train: {a.train_steps} bf16 steps, batch {a.batch}: {out['train']['seconds_per_step']} s/step, "
          f"loss {trainer.last_loss:.4f}", flush=True)

    a.out.mkdir(parents=True, exist_ok=True)
    ckpt = a.out / "ckpt.pt"
    save_checkpoint(ckpt, cfg, trainer.model.cpu(), trainer.ema.cpu(), step=a.train_steps)
    t0 = time.perf_counter()
    nir_path = export_checkpoint(ckpt, a.out / "model.nir", force=True)
    out["export"] = {"seconds": time.perf_counter() - t0, "file_mb": nir_path.stat().st_size / 1e6}
    print(f"export: {out['export']['seconds']:.1f} s, {out['export']['file_mb']:.1f} MB", flush=True)

    program = load_program(nir_path)
    runs = {}
    for dtype in (torch.float32, torch.float64):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        images, stats, _ = simulate(program, "torch", num_images=a.images, steps=a.sample_steps, device=str(device),
                                    dtype=dtype)
        sync(device)
        name = str(dtype).rsplit(".", 1)[-1]
        runs[name] = {"seconds_per_image": (time.perf_counter() - t0) / a.images, "spikes": stats.total("spikes_out"),
                      "synops": stats.total("synops"), "finite": bool(np.isfinite(images.numpy()).all()),
                      "peak_gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda"
                      else None}
        print(f"torch engine on {device}, {name}: {runs[name]['seconds_per_image']:.2f} s/image at DDIM "
              f"{a.sample_steps}, {runs[name]['spikes']:,} spikes", flush=True)
    out["engine"] = {"sample_steps": a.sample_steps, "images": a.images, **runs}
    (a.out / "gpu_check.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out / 'gpu_check.json'}")
    return out


if __name__ == "__main__":
    main()
