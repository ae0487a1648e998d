"""Noise schedules and the Gaussian forward process q(x_t | x_0).

Notation follows Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (DDPM), with diffusion steps
indexed from 0: ``betas[t]`` is the variance added at step t, ``alphas = 1 - betas`` and
``alphas_bar[t] = prod_{s<=t} alphas[s]``, so that

    q(x_t | x_0) = N(sqrt(alphas_bar[t]) x_0, (1 - alphas_bar[t]) I).

All schedule tensors are float64 on the CPU; coefficients are cast to the data's dtype and device only when
they are applied.
"""

from __future__ import annotations

import math
import operator
from typing import Callable

import torch
import torch.nn.functional as F

from neurosdm.config import DiffusionConfig
from neurosdm.errors import ConfigError

# A denoiser: model(x_t: float [B, C, H, W], t: long [B]) -> predicted eps [B, C, H, W].
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

COSINE_S = 0.008  # Nichol & Dhariwal 2021, eq. 17: small offset so that betas near t = 0 are not too small
COSINE_MAX_BETA = 0.999  # Nichol & Dhariwal 2021: clip betas to avoid singularities near t = T


def make_betas(cfg: DiffusionConfig) -> torch.Tensor:
    """The variance schedule ``betas``, float64 of shape [num_diffusion_steps].

    * ``"linear"``: Ho et al. 2020, betas increase linearly from ``beta_start`` to ``beta_end``.
    * ``"cosine"``: Nichol & Dhariwal 2021 ("Improved DDPM", eq. 17),
      ``alphas_bar(t) = f(t) / f(0)`` with ``f(t) = cos(((t / N) + s) / (1 + s) * pi / 2) ** 2``, ``s = 0.008``;
      ``betas[t] = 1 - alphas_bar(t + 1) / alphas_bar(t)`` clipped at 0.999.
    """
    n = int(cfg.num_diffusion_steps)
    if n < 1:
        raise ConfigError("num_diffusion_steps must be >= 1")
    if cfg.schedule == "linear":
        if not (0.0 < cfg.beta_start < 1.0 and 0.0 < cfg.beta_end < 1.0):
            raise ConfigError(
                f"beta_start and beta_end must lie in (0, 1), got {cfg.beta_start} and {cfg.beta_end}"
            )
        return torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float64)
    if cfg.schedule == "cosine":
        steps = torch.arange(n + 1, dtype=torch.float64) / n
        f = torch.cos((steps + COSINE_S) / (1 + COSINE_S) * (math.pi / 2)) ** 2
        alphas_bar = f / f[0]
        betas = 1.0 - alphas_bar[1:] / alphas_bar[:-1]
        return betas.clamp(max=COSINE_MAX_BETA)
    raise ConfigError(f"schedule must be 'linear' or 'cosine', got {cfg.schedule!r}")


def _extract(coef: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``coef[t]`` (float64, CPU) gathered per batch element, cast to ``x``'s dtype/device, shaped to broadcast."""
    idx = t.detach().to("cpu", torch.long)
    out = coef[idx].to(dtype=x.dtype).to(x.device)
    return out.reshape(out.shape + (1,) * (x.dim() - out.dim()))


class GaussianDiffusion:
    """The DDPM forward process (Ho et al. 2020) and its training objective.

    The denoiser is not part of this object: any callable ``model(x_t, t) -> eps`` is accepted, with
    ``x_t`` float [B, C, H, W] and ``t`` long [B] (diffusion steps in ``0 .. num_diffusion_steps - 1``).
    """

    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg
        self.num_diffusion_steps = int(cfg.num_diffusion_steps)
        self.betas = make_betas(cfg)
        self.alphas = 1.0 - self.betas
        self.alphas_bar = torch.cumprod(self.alphas, dim=0)
        self.sqrt_alphas_bar = self.alphas_bar.sqrt()
        self.sqrt_one_minus_alphas_bar = (1.0 - self.alphas_bar).sqrt()

    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion(num_diffusion_steps={self.num_diffusion_steps}, schedule={self.cfg.schedule!r})"
        )

    def _as_steps(self, t, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(t):
            t = torch.full((x.shape[0],), int(t), dtype=torch.long)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        return t

    def q_sample(self, x_0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) (Ho et al. 2020, eq. 4):
        ``x_t = sqrt(alphas_bar[t]) x_0 + sqrt(1 - alphas_bar[t]) noise``.

        ``t`` is a long tensor [B] (or an int for the whole batch); the float64 coefficients are cast to
        ``x_0``'s dtype.
        """
        t = self._as_steps(t, x_0)
        return _extract(self.sqrt_alphas_bar, t, x_0) * x_0 + _extract(self.sqrt_one_minus_alphas_bar, t, x_0) * noise

    def loss(self, model: Denoiser, x_0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The simplified epsilon-prediction objective (Ho et al. 2020, Algorithm 1 / eq. 14).

        ``t ~ Uniform{0, ..., N-1}`` per example and ``noise ~ N(0, I)`` are drawn with ``generator`` on
        ``x_0.device`` (the generator must live on that device); returns the mean squared error between
        ``model(x_t, t)`` and ``noise`` as a scalar float32 tensor.
        """
        b = x_0.shape[0]
        t = torch.randint(0, self.num_diffusion_steps, (b,), generator=generator, device=x_0.device)
        noise = torch.randn(x_0.shape, generator=generator, device=x_0.device, dtype=x_0.dtype)
        x_t = self.q_sample(x_0, t, noise)
        eps = model(x_t, t)
        return F.mse_loss(eps.float(), noise.float())

    def timesteps(self, num_sample_steps: int) -> list[int]:
        """The increasing diffusion steps a sampler visits with ``num_sample_steps`` network calls.

        "Uniform" spacing as in the DDIM code (Song et al. 2021): ``floor(i * N / K)`` for ``i = 0 .. K-1``,
        e.g. N = 1000, K = 50 gives [0, 20, ..., 980]; K == N gives every step. Samplers walk it backwards.
        """
        n = self.num_diffusion_steps
        k = num_sample_steps
        try:
            k = operator.index(k)  # ints and integer numpy scalars; not floats
        except TypeError:
            k = None
        if k is None or isinstance(num_sample_steps, bool) or not 1 <= k <= n:
            raise ConfigError(
                f"num_sample_steps must be an integer in 1..{n} (num_diffusion_steps), got {num_sample_steps!r}"
            )
        return [i * n // k for i in range(k)]
