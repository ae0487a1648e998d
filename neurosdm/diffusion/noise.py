"""Per-image noise streams: image ``i`` of a run with seed ``s`` gets its own random stream.

The rule (the one place it is written down):

    stream(s, i) = numpy.random.Generator(PCG64(SeedSequence(s, spawn_key=(i,))))

i.e. the ``i``-th child of ``numpy.random.SeedSequence(s)`` (``SeedSequence(s).spawn(i + 1)[i]``), feeding a
PCG64 generator. Every draw is ``stream.standard_normal(shape, dtype=float32)`` with ``shape = [C, H, W]`` (one
image, no batch dimension): the first draw is the image's ``x_T``, then one draw per noise-adding step of the
sampler, in sampling order (largest ``t`` first; see :func:`neurosdm.diffusion.samplers.sample`).

So image ``i`` depends only on ``(s, i)`` (and the model, sampler and steps): not on the batch it is drawn in,
the number of processes, their order or the device. Draws are made on the CPU in float32 and then moved to the
chain's device and dtype, so CPU and GPU runs start from the same numbers. SeedSequence mixes ``(s, i)`` into
128 bits of PCG64 state, so no two images of a run share a stream (``torch.Generator.manual_seed`` keeps only
32 bits of a seed on the CPU, which is why the streams are numpy's). Seeds must be integers >= 0.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from neurosdm.errors import ConfigError

__all__ = ["ImageNoise", "image_stream"]


def image_stream(seed: int, index: int) -> np.random.Generator:
    """The random stream of image ``index`` of a run with ``seed`` (the rule in the module docstring)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"--seed must be an integer >= 0, got {seed!r}")
    if index < 0:
        raise ValueError(f"image index must be >= 0, got {index}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(int(seed), spawn_key=(int(index),))))


class ImageNoise:
    """Standard normal noise for a batch of images, each image from its own stream (:func:`image_stream`).

    ``noise = ImageNoise(seed, indices)``; ``noise(shape) -> [len(indices), *shape]`` float32 CPU tensor, row
    ``j`` the next draw of image ``indices[j]``'s stream. The samplers take it as ``noise=``
    (:func:`neurosdm.diffusion.samplers.sample`); the first call gives ``x_T``.
    """

    def __init__(self, seed: int, indices: Iterable[int]):
        self.seed = seed
        self.indices: Sequence[int] = list(indices)
        self.streams = [image_stream(seed, i) for i in self.indices]

    def __len__(self) -> int:
        return len(self.streams)

    def __call__(self, shape: Sequence[int]) -> torch.Tensor:
        shape = tuple(int(v) for v in shape)
        out = np.empty((len(self.streams), *shape), np.float32)
        for j, g in enumerate(self.streams):
            out[j] = g.standard_normal(shape, dtype=np.float32)
        return torch.from_numpy(out)
