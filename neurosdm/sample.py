"""Generate images with a denoiser (the GPU path: the torch model, float)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from neurosdm.checkpoint import load_model
from neurosdm.config import Config, check_count, check_memory, check_positive, parse_steps_schedule, schedule_steps
from neurosdm.diffusion import GaussianDiffusion, ImageNoise, sample
from neurosdm.distributed import World, gather_shards
from neurosdm.errors import CheckpointError, ConfigError
from neurosdm.io import image_grid, output_set, save_npy, save_png


class Scheduled:
    """``model(x_t, t)`` with the spiking steps of the schedule: before each call, ``model.set_spiking_steps(
    num_steps(t))`` (:func:`neurosdm.config.schedule_steps`). The one place a steps schedule is applied: the torch
    model (:meth:`neurosdm.models.SpikingUNet.set_spiking_steps`) and an exported graph on an engine
    (:class:`neurosdm.simulators.run.GraphDenoiser`) both run through it."""

    def __init__(self, model, segments):
        self.model, self.segments = model, segments

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ts = set(int(v) for v in t.reshape(-1).tolist())
        if len(ts) != 1:
            raise ConfigError("a steps schedule needs one diffusion step per call")
        self.model.set_spiking_steps(schedule_steps(self.segments, ts.pop()))
        return self.model(x, t)


@torch.no_grad()
def generate(model, config: Config, num_images: int, seed: int = 0, sampler: str = "ddim",
             num_sample_steps: int = 50, eta: float = 0.0, batch_size: int = 64, progress=None,
             device: str | torch.device = "cpu", order: int = 3, gamma=None, first_image: int = 0,
             steps_schedule: str | None = None) -> torch.Tensor:
    """Sample images ``first_image .. first_image + num_images - 1`` of the run with ``seed``: ``[num_images, C,
    H, W]`` in [-1, 1] (float32, CPU).

    Image ``i`` draws its ``x_T`` and every per-step noise from its own stream, the ``i``-th child of
    ``numpy.random.SeedSequence(seed)`` (:mod:`neurosdm.diffusion.noise` states the rule), so its noise does
    not depend on the batch size, the number of processes or the device. Batches are cut at multiples of
    ``batch_size`` of the image index (batch ``b`` = images ``[b B, (b + 1) B)``), so a shard that starts at a
    batch boundary (:func:`neurosdm.distributed.shard_range`) runs every image in the same batch as one process
    would. ``order`` (DPM-Solver) and ``gamma`` (the analytic samplers' table) go to
    :func:`neurosdm.diffusion.samplers.sample`. ``steps_schedule``: spiking steps per diffusion step
    (:func:`neurosdm.config.parse_steps_schedule`; default ``config.model.steps_schedule``, "" or None: the
    model's own ``num_steps`` at every call), applied through :class:`Scheduled`.
    """
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if num_images < 0 or first_image < 0:
        raise ConfigError(f"need num_images >= 0 and first_image >= 0, got {num_images} and {first_image}")
    m = config.model
    shape = (m.img_ch, m.image_size, m.image_size)
    diffusion = GaussianDiffusion(config.diffusion)
    spec = m.steps_schedule if steps_schedule is None else steps_schedule
    segments = parse_steps_schedule(spec, diffusion.num_diffusion_steps) if spec else None
    was_training = model.training
    model.eval()
    net = Scheduled(model, segments) if segments else model
    out = [torch.empty(0, *shape)]
    start, end = int(first_image), int(first_image) + int(num_images)
    while start < end:
        stop = min((start // batch_size + 1) * batch_size, end)
        noise = ImageNoise(seed, range(start, stop))
        x_T = noise(shape).to(device)
        try:
            x = sample(net, x_T, diffusion, sampler, num_sample_steps, eta, progress=progress, order=order,
                       gamma=gamma, noise=noise)
        finally:
            if segments:
                model.set_spiking_steps(None)
        out.append(x.float().cpu())
        start = stop
    model.train(was_training)
    return torch.cat(out)


def generate_sharded(model, config: Config, num_images: int, world: World | None = None,
                     shard_dir: str | os.PathLike = ".", batch_size: int = 64, **kwargs) -> torch.Tensor | None:
    """:func:`generate` of this rank's share of ``num_images`` (:meth:`neurosdm.distributed.World.shard`),
    merged on rank 0 in image order (:func:`neurosdm.distributed.gather_shards`, shard files in ``shard_dir``).
    Returns all ``num_images`` images on rank 0 (in a one-process world: just :func:`generate`) and ``None`` on
    the other ranks. ``kwargs`` go to :func:`generate`."""
    world = world or World()
    mine = world.shard(num_images, batch_size)
    images = generate(model, config, len(mine), batch_size=batch_size, first_image=mine.start, **kwargs)
    if world.size == 1:
        return images
    parts = gather_shards(world, shard_dir, {"images": images.numpy()})
    if parts is None:
        return None
    return torch.from_numpy(np.concatenate([p["images"] for p, _ in parts]))


def sample_to_dir(ckpt, out_dir, num_images: int, seed: int = 0, sampler: str = "ddim", num_sample_steps: int = 50,
                  eta: float = 0.0, threshold_scale: float = 1.0, batch_size: int = 64, device: str = "cpu",
                  progress=None, order: int = 3, gamma=None, world: World | None = None,
                  steps_schedule: str | None = None) -> Path | None:
    """Load any checkpoint, sample, write ``out_dir/samples.png`` (grid) and ``samples.npy``; return the PNG path.

    Under torchrun (``world``, a :class:`neurosdm.distributed.World` of size > 1) every rank samples its share,
    rank 0 merges, writes and returns the path; the other ranks return ``None``. The images are those of a
    one-process run. ``steps_schedule``: spiking steps per diffusion step (default: the checkpoint's)."""
    check_positive("--threshold-scale", threshold_scale)  # the rule simulate applies
    check_count("--num-images", num_images)
    model, config = load_model(ckpt, device=device)
    m = config.model
    check_memory(f"{num_images} images of {m.img_ch}x{m.image_size}x{m.image_size}",
                 12 * num_images * m.img_ch * m.image_size ** 2)  # float32 images, their copy and the PNG grid
    model.set_threshold_scale(threshold_scale)
    if steps_schedule:  # checked before the work (the TSM bound too)
        parse_steps_schedule(steps_schedule, m.num_diffusion_steps, m.num_steps if m.tsm else None)
    images = generate_sharded(model, config, num_images, world, out_dir, batch_size, seed=seed, sampler=sampler,
                              num_sample_steps=num_sample_steps, eta=eta, progress=progress, device=device,
                              order=order, gamma=gamma, steps_schedule=steps_schedule)
    if images is None:
        return None
    if not torch.isfinite(images).all():  # never a silent NaN: nothing is written
        raise CheckpointError(f"{ckpt} produced NaN or infinite images (weights out of range?); nothing was written")
    out = Path(out_dir)
    with output_set(out) as stage:  # both files or neither
        save_npy(images.numpy(), stage / "samples.npy")
        save_png(image_grid(images.numpy()), stage / "samples.png")
    return out / "samples.png"
