"""Regenerate neurosdm/assets/fashion_mnist_mini.npz, the built-in dataset.

Provenance: Fashion-MNIST (https://github.com/zalandoresearch/fashion-mnist), Copyright 2017 Zalando SE,
MIT (Expat) licence, as packaged by Debian in ``dataset-fashion-mnist`` (``apt-get install
dataset-fashion-mnist``; the IDX files are in /usr/share/datasets/fashion-mnist). The asset holds, unchanged:

    train_images  uint8 [4096, 28, 28]  first 4,096 images of train-images-idx3-ubyte
    train_labels  uint8 [4096]          their labels (train-labels-idx1-ubyte)
    test_images   uint8 [1024, 28, 28]  first 1,024 images of t10k-images-idx3-ubyte
    test_labels   uint8 [1024]          their labels (t10k-labels-idx1-ubyte)
    license       str                   the copyright and licence notice the MIT licence asks copies to carry

Usage (from the repository root):
    python scripts/make_builtin_dataset.py [--source-dir DIR] [--out PATH] [--num-train N] [--num-test N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from neurosdm.data import DEBIAN_FASHION_MNIST_DIR, read_idx

LICENSE = """\
Fashion-MNIST subset (first 4,096 training and 1,024 test images with labels), unchanged.
Source: https://github.com/zalandoresearch/fashion-mnist via Debian package dataset-fashion-mnist.

The MIT License (MIT) Copyright (c) 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated
documentation files (the "Software"), to deal in the Software without restriction, including without limitation
the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and
to permit persons to whom the Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial portions of
the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO
THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF
CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS
IN THE SOFTWARE.
"""


def build(source_dir: Path, num_train: int, num_test: int) -> dict[str, np.ndarray]:
    """Read the four IDX files and keep the first images of each split."""
    arrays = {}
    for split, prefix, count in (("train", "train", num_train), ("test", "t10k", num_test)):
        images = read_idx(source_dir / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(source_dir / f"{prefix}-labels-idx1-ubyte.gz")
        if images.shape[1:] != (28, 28) or len(labels) != len(images) or len(images) < count:
            raise SystemExit(f"{source_dir}: unexpected {prefix} files {images.shape}, {labels.shape}")
        arrays[f"{split}_images"] = np.ascontiguousarray(images[:count], dtype=np.uint8)
        arrays[f"{split}_labels"] = np.ascontiguousarray(labels[:count], dtype=np.uint8)
    arrays["license"] = np.array(LICENSE)
    return arrays


def write_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed to a temporary file next to ``path``, then rename: no partial asset."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the asset is meant to be readable by everyone
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source-dir",
        type=Path,
        default=DEBIAN_FASHION_MNIST_DIR,
        help="folder with the Fashion-MNIST *-ubyte.gz files (default: Debian's)",
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "neurosdm" / "assets" / "fashion_mnist_mini.npz")
    parser.add_argument("--num-train", type=int, default=4096)
    parser.add_argument("--num-test", type=int, default=1024)
    args = parser.parse_args()

    arrays = build(args.source_dir, args.num_train, args.num_test)
    write_atomic(args.out, arrays)
    print(
        f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): "
        + ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in arrays.items() if k != "license")
    )


if __name__ == "__main__":
    main()
