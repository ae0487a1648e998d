"""Turn a training run into the shipped checkpoint: drop the optimiser state (it only matters for resuming) and,
with ``--recalibrate DATASET``, re-estimate the EMA model's BatchNorm statistics on that dataset (runs made before
neurosdm did this at every checkpoint need it). Usage:

    python scripts/ship_checkpoint.py runs/tiny_fashion/ckpt.pt neurosdm/assets/tiny_fashion.pt \
        --recalibrate fashion-mnist
"""

import argparse

import torch

from neurosdm.checkpoint import build_model, load_checkpoint
from neurosdm.data import load_dataset
from neurosdm.diffusion import GaussianDiffusion
from neurosdm.io import atomic_path
from neurosdm.train import recalibrate_batchnorm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--recalibrate", metavar="DATASET", help="re-estimate the EMA BatchNorm statistics on DATASET")
    args = ap.parse_args()
    ckpt = load_checkpoint(args.src)  # validates the file
    obj = torch.load(args.src, map_location="cpu", weights_only=True)
    obj["optimizer"] = None
    obj["shipped_from_step"] = ckpt.step
    if args.recalibrate and ckpt.ema_state is not None:
        ema = build_model(ckpt.config.model, ckpt.ema_state)
        data = load_dataset(args.recalibrate, split="train", image_size=ckpt.config.model.image_size)
        recalibrate_batchnorm(ema, data, GaussianDiffusion(ckpt.config.diffusion), seed=ckpt.config.train.seed)
        obj["ema"] = ema.state_dict()
        obj["ema_bn_recalibrated_on"] = args.recalibrate
    with atomic_path(args.dst) as tmp:
        torch.save(obj, tmp)
    print(f"{args.dst}: step {ckpt.step}, layout {ckpt.layout}")


if __name__ == "__main__":
    main()
