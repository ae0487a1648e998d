"""Held-out epsilon-MSE of a checkpoint on a dataset's test split, at fixed seeds, overall and by diffusion step.

    python scripts/heldout_loss.py neurosdm/assets/tiny_fashion.pt --dataset fashion-mnist --num-images 512

Prints JSON. The same images, diffusion steps and noise for every checkpoint (seeded), so numbers compare.
"""

import argparse
import json

import torch

from neurosdm.checkpoint import load_model
from neurosdm.data import load_dataset
from neurosdm.diffusion import GaussianDiffusion


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--num-images", type=int, default=512)
    ap.add_argument("--weights", default="ema", choices=["ema", "net"])
    ap.add_argument("--steps", default="10,100,250,500,750,999", help="diffusion steps to report")
    args = ap.parse_args()
    model, cfg = load_model(args.ckpt, weights=args.weights)
    x_0 = load_dataset(args.dataset, split="test", image_size=cfg.model.image_size, limit=args.num_images)
    diffusion = GaussianDiffusion(cfg.diffusion)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, diffusion.num_diffusion_steps, (len(x_0),), generator=g)
    noise = torch.randn(x_0.shape, generator=g)
    overall = float((model(diffusion.q_sample(x_0, t, noise), t) - noise).pow(2).mean())
    by_step = {}
    for step in map(int, args.steps.split(",")):
        ts = torch.full((len(x_0),), step)
        by_step[step] = float((model(diffusion.q_sample(x_0, ts, noise), ts) - noise).pow(2).mean())
    print(json.dumps({"ckpt": args.ckpt, "weights": args.weights, "dataset": args.dataset, "split": "test",
                      "num_images": len(x_0), "eps_mse_uniform_t": overall, "eps_mse_by_step": by_step}, indent=1))


if __name__ == "__main__":
    main()
