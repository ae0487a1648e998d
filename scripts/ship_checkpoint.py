"""Turn a training run into the shipped checkpoint: drop the optimiser state (it only matters for resuming),
keep config, weights, EMA weights, step and wall time. Usage:

    python scripts/ship_checkpoint.py runs/tiny_fashion/ckpt.pt neurosdm/assets/tiny_fashion.pt
"""

import sys

import torch

from neurosdm.checkpoint import load_checkpoint
from neurosdm.io import atomic_path


def main(src: str, dst: str) -> None:
    ckpt = load_checkpoint(src)  # validates the file
    obj = torch.load(src, map_location="cpu", weights_only=True)
    obj["optimizer"] = None
    obj["shipped_from_step"] = ckpt.step
    with atomic_path(dst) as tmp:
        torch.save(obj, tmp)
    print(f"{dst}: step {ckpt.step}, layout {ckpt.layout}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
