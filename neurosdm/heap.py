"""Keep freed memory in the process heap while training on a CPU.

glibc's malloc serves every block above its mmap threshold with a fresh ``mmap`` and unmaps it on ``free``. The
threshold adapts upwards to the blocks a program frees, but never beyond 32 MiB. The spiking UNet keeps its
activations time-batched, ``[num_steps, B, C, H, W]``: at the larger training shape of issue 18 (4 steps, batch 64,
32 channels at 32x32, float32) one is 33.5 MB, just above that limit, so every one of them is mapped, page-faulted
in (the kernel zeroes each page) and unmapped at every step. Measured here: allocating a 33 MB tensor costs 10 ms
against 1.6 ms for writing it into memory already mapped, and the element-wise passes ran 3-7x slower than their
memory traffic allows (benchmarks/train_vs_public.py). :func:`retain_freed_memory` turns mmap off for malloc and
raises the trim threshold to 2 GiB, so freed blocks are reused, like the caching allocators GPU frameworks use. The
cost: the process keeps its peak heap (up to 2 GiB above what is in use) instead of returning it.

The command line calls it for every command (:func:`neurosdm.cli.main`: one job per process), and so does
:class:`neurosdm.train.Trainer` for training from Python; ``NEUROSDM_RETAIN_HEAP=0`` turns it off. Sampling gains
as much: one denoiser call of the larger shape (batch 64, no gradients) took 1.55-1.94 s with glibc's defaults and
0.75-0.82 s with freed memory kept. Elsewhere than Linux with glibc it does nothing."""

from __future__ import annotations

import ctypes
import os
import platform
import sys

#: mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int


def retain_freed_memory() -> bool:
    """Set malloc to reuse freed memory (module docstring); True when it is set."""
    if os.environ.get("NEUROSDM_RETAIN_HEAP", "1") == "0":
        return False
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):
        return False
