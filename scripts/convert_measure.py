"""Measure ANN-to-SNN conversion on a trained QCFS ANN checkpoint (the figures of docs/convert.md).

    python scripts/convert_measure.py ANN_CKPT --out runs/convert/measure.json [--images 128] [--finetune-steps 100]

On a fixed evaluation set (Fashion-MNIST sample images of the test split, one uniform diffusion step and one noise
draw per image, seeded) it reports, for the converted SNN at num_steps = m L (``--multiples``, default 1,2,4,8):
- ``eps_mse_vs_ann``: mean over pixels of (eps_SNN - eps_ANN)**2 (and relative to the ANN's eps variance);
- ``loss``: the denoising loss mean (eps - noise)**2 (the ANN's on the same inputs beside it);
- for the "sdm" head also ``per_step_head``: the same with the head run at every spiking step and its outputs
  averaged (readout "leaky", decay 1, / num_steps) instead of once on the time-averaged stream;
- the clip-only ANN (QCFS without its quantiser, ``y = clamp(x, 0, clip)``), the limit of the SNN as num_steps
  grows, against the ANN;
- with ``--finetune-steps N``: the converted SNN (num_steps L) after N steps of denoising-loss fine-tuning;
- the float NIR export of the converted model against torch (max |eps difference|, 4 images).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from neurosdm.checkpoint import load_model
from neurosdm.config import ModelConfig
from neurosdm.convert import convert_model, finetune
from neurosdm.data import load_dataset
from neurosdm.diffusion import GaussianDiffusion
from neurosdm.exporters.nir import to_nir_graph
from neurosdm.io import atomic_path
from neurosdm.models import SpikingUNet
from neurosdm.neurons import QCFS
from neurosdm.simulators.reference import run_reference


class _ClipOnly(torch.nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, x):
        return torch.minimum(torch.relu(x), self.clip)


def _eps(model, x_t, t, batch=64):
    with torch.no_grad():
        return torch.cat([model(x_t[i:i + batch], t[i:i + batch]) for i in range(0, len(x_t), batch)]).double()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ann")
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--finetune-steps", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--multiples", default="1,2,4,8", help="num_steps = m * L for these m")
    args = ap.parse_args()

    ann, config = load_model(args.ann, weights="ema")
    levels = 2**config.model.qcfs_bits - 1
    data = load_dataset("builtin", split="test", limit=args.images, image_size=config.model.image_size)
    g = torch.Generator().manual_seed(args.seed)
    diffusion = GaussianDiffusion(config.diffusion)
    t = torch.randint(0, diffusion.num_diffusion_steps, (len(data),), generator=g)
    noise = torch.randn(data.shape, generator=g)
    x_t = diffusion.q_sample(data, t, noise)
    noise = noise.double()

    def loss(eps):
        return float(((eps - noise) ** 2).mean())

    eps_ann = _eps(ann, x_t, t)
    var = float(eps_ann.var())
    res = {"ann": args.ann, "qcfs_bits": config.model.qcfs_bits, "levels": levels, "images": len(data),
           "ann_loss": loss(eps_ann), "ann_eps_var": var,
           "clips": {n: float(m.clip.detach()) for n, m in ann.named_modules() if isinstance(m, QCFS)}, "snn": {}}

    clip_only = load_model(args.ann, weights="ema")[0]
    for name, m in list(clip_only.named_modules()):
        if isinstance(m, QCFS):
            parent, _, leaf = name.rpartition(".")
            setattr(clip_only.get_submodule(parent) if parent else clip_only, leaf, _ClipOnly(m.clip.detach()))
    eps_clip = _eps(clip_only, x_t, t)
    res["clip_only_ann"] = {"eps_mse_vs_ann": float(((eps_clip - eps_ann) ** 2).mean()), "loss": loss(eps_clip)}

    for k in (int(v) for v in args.multiples.split(",")):
        steps = k * levels
        t0 = time.perf_counter()
        snn = convert_model(ann, steps)
        eps = _eps(snn, x_t, t)
        row = {"eps_mse_vs_ann": float(((eps - eps_ann) ** 2).mean()),
               "eps_mse_vs_clip_only": float(((eps - eps_clip) ** 2).mean()), "loss": loss(eps),
               "seconds": time.perf_counter() - t0}
        row["relative_mse"] = row["eps_mse_vs_ann"] / var
        if snn.cfg.head == "sdm":
            per_step = SpikingUNet(dataclasses.replace(snn.cfg, readout="leaky", readout_decay=1.0))
            per_step.load_state_dict(snn.state_dict())
            eps_ps = _eps(per_step.eval(), x_t, t) / steps
            row["per_step_head"] = {"eps_mse_vs_ann": float(((eps_ps - eps_ann) ** 2).mean()), "loss": loss(eps_ps)}
        res["snn"][steps] = row
        print(f"num_steps {steps}: {row}", flush=True)

    snn = convert_model(ann)
    graph, md = to_nir_graph(snn)
    ref = _eps(snn, x_t[:4], t[:4]).numpy()
    worst = 0.0
    for i in range(4):
        e, _ = run_reference(graph, md, x_t[i:i + 1].numpy(), int(t[i]))
        worst = max(worst, float(np.abs(e - ref[i:i + 1]).max()))
    res["export_float_max_abs_diff"] = worst

    if args.finetune_steps:
        train = load_dataset(config.train.dataset, config.train.data_dir, "train", config.model.image_size)
        t0 = time.perf_counter()
        losses = finetune(snn, dataclasses.replace(config, model=snn.cfg), train, args.finetune_steps,
                          seed=args.seed)
        eps = _eps(snn, x_t, t)
        res["finetuned"] = {"steps": args.finetune_steps, "num_steps": levels, "loss": loss(eps),
                            "eps_mse_vs_ann": float(((eps - eps_ann) ** 2).mean()),
                            "train_loss_first_last_10": [float(np.mean(losses[:10])), float(np.mean(losses[-10:]))],
                            "seconds": time.perf_counter() - t0}

    print(f"ANN ({config.model.qcfs_bits} bits, L={levels}): loss {res['ann_loss']:.4f}, eps variance {var:.4f}")
    print(f"clip-only ANN: eps MSE vs ANN {res['clip_only_ann']['eps_mse_vs_ann']:.4f}, "
          f"loss {res['clip_only_ann']['loss']:.4f}")
    print(f"{'num_steps':>9} {'eps MSE vs ANN':>15} {'rel.':>7} {'loss':>8} {'per-step head MSE':>18}")
    for steps, row in res["snn"].items():
        ps = row.get("per_step_head", {}).get("eps_mse_vs_ann")
        print(f"{steps:>9} {row['eps_mse_vs_ann']:>15.4f} {row['relative_mse']:>7.3f} {row['loss']:>8.4f} "
              f"{'-' if ps is None else f'{ps:.4f}':>18}")
    print(f"float NIR export vs torch (T=L): max |eps diff| {worst:.2e}")
    if "finetuned" in res:
        f = res["finetuned"]
        print(f"fine-tuned {f['steps']} steps (T=L): loss {f['loss']:.4f}, eps MSE vs ANN {f['eps_mse_vs_ann']:.4f}")
    out = Path(args.out)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(res, indent=1))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
