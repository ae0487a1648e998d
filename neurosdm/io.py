"""Small I/O helpers: atomic writes (no half-written outputs) and image grids."""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block finishes.

    An error or Ctrl-C inside the block leaves ``path`` untouched and removes the temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def image_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """``[N, C, H, W]`` floats in [-1, 1] -> one uint8 image ``[rows*(H+pad)+pad, cols*(W+pad)+pad, 3]``."""
    images = np.asarray(images, dtype=np.float32)
    n, c, h, w = images.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    ncol_rows = int(math.ceil(n / nrow))
    grid = np.full((ncol_rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    pix = np.clip((images + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    if c == 1:
        pix = np.repeat(pix, 3, axis=1)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = pix[i].transpose(1, 2, 0)
    return grid


def save_png(array: np.ndarray, path: str | os.PathLike) -> None:
    """Write an ``[H, W, 3]`` uint8 array as PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.image as mpimg

    with atomic_path(path) as tmp:
        mpimg.imsave(tmp, array, format="png")


def save_npy(array: np.ndarray, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def describe_head(path: str | os.PathLike) -> str:
    """What a file starts with, for error messages: ``an empty file`` or ``a file starting with b'...'``."""
    with open(path, "rb") as f:
        head = f.read(8)
    return "an empty file" if not head else f"a file starting with {head!r}"


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (or its type name), for one-line errors."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]
