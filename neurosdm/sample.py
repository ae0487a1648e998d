"""Generate images with a denoiser (the GPU path: the torch model, float)."""

from __future__ import annotations

from pathlib import Path

import torch

from neurosdm.config import Config
from neurosdm.diffusion import GaussianDiffusion, sample
from neurosdm.io import image_grid, save_npy, save_png


@torch.no_grad()
def generate(model, config: Config, num_images: int, seed: int = 0, sampler: str = "ddim",
             num_sample_steps: int = 50, eta: float = 0.0, batch_size: int = 64, progress=None,
             device: str | torch.device = "cpu", order: int = 3, gamma=None) -> torch.Tensor:
    """Sample ``num_images`` images ``[N, C, H, W]`` in [-1, 1] (float32, CPU).

    ``x_T`` for all images comes from one generator seeded with ``seed``; batch ``b`` draws its per-step noise
    from a generator seeded with ``(seed, b)``. The same seed, sampler, steps and batch size give the same images.
    ``order`` (DPM-Solver) and ``gamma`` (the analytic samplers' table) go to
    :func:`neurosdm.diffusion.samplers.sample`.
    """
    m = config.model
    diffusion = GaussianDiffusion(config.diffusion)
    was_training = model.training
    model.eval()
    x_T = torch.randn(num_images, m.img_ch, m.image_size, m.image_size, generator=torch.Generator().manual_seed(seed))
    out = []
    for b, start in enumerate(range(0, num_images, batch_size)):
        g = torch.Generator().manual_seed(seed * 1_000_003 + b + 1)
        x = sample(model, x_T[start:start + batch_size].to(device), diffusion, sampler, num_sample_steps, eta, g,
                   progress=progress, order=order, gamma=gamma)
        out.append(x.float().cpu())
    model.train(was_training)
    return torch.cat(out)


def sample_to_dir(ckpt, out_dir, num_images: int, seed: int = 0, sampler: str = "ddim", num_sample_steps: int = 50,
                  eta: float = 0.0, threshold_scale: float = 1.0, batch_size: int = 64, device: str = "cpu",
                  progress=None, order: int = 3, gamma=None) -> Path:
    """Load any checkpoint, sample, write ``out_dir/samples.png`` (grid) and ``samples.npy``; return the PNG path."""
    from neurosdm.checkpoint import load_model

    model, config = load_model(ckpt, device=device)
    model.set_threshold_scale(threshold_scale)
    images = generate(model, config, num_images, seed, sampler, num_sample_steps, eta, batch_size, progress, device,
                      order, gamma)
    out = Path(out_dir)
    save_npy(images.numpy(), out / "samples.npy")
    save_png(image_grid(images.numpy()), out / "samples.png")
    return out / "samples.png"
