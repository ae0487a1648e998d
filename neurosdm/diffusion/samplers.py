"""Reverse-process samplers: DDPM ancestral sampling and DDIM, both over a (possibly strided) step sequence.

Let ``tau_1 < ... < tau_K`` be :meth:`GaussianDiffusion.timesteps` and, for the step at ``t = tau_i``,
``ab = alphas_bar[tau_i]`` and ``ab_prev = alphas_bar[tau_{i-1}]`` (``ab_prev = 1`` for ``i = 1``). Both samplers
first predict ``x_0`` from the network's ``eps`` (Ho et al. 2020, eq. 15):

    x_0_pred = (x_t - sqrt(1 - ab) eps) / sqrt(ab)          (clamped to [-1, 1] when ``clip_x0``)

* ``"ddpm"`` -- ancestral sampling (Ho et al. 2020, Algorithm 2) on the respaced process with
  ``betas'_i = 1 - ab / ab_prev`` (Nichol & Dhariwal 2021, sec. 4): ``x_prev`` is drawn from the posterior
  q(x_prev | x_t, x_0_pred) (Ho et al. eq. 6-7),

      mean = sqrt(ab_prev) betas'_i / (1 - ab) x_0_pred + sqrt(1 - betas'_i) (1 - ab_prev) / (1 - ab) x_t
      var  = beta_tilde_i = (1 - ab_prev) / (1 - ab) betas'_i

  With every step and no clipping this is exactly Algorithm 2 with sigma_t^2 = beta_tilde_t.
* ``"ddim"`` -- Song et al. 2021, eq. 12:

      x_prev = sqrt(ab_prev) x_0_pred + sqrt(1 - ab_prev - sigma^2) eps + sigma z,
      sigma  = eta sqrt((1 - ab_prev) / (1 - ab)) sqrt(1 - ab / ab_prev)

  where ``eps`` is re-derived from the (possibly clamped) ``x_0_pred``, so the update is consistent with it.
  ``eta = 0`` is deterministic; ``eta = 1`` has sigma^2 = beta_tilde and coincides with ``"ddpm"``.

No noise is added at the last step (``ab_prev = 1`` makes the posterior variance zero).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from neurosdm.diffusion.schedules import Denoiser, GaussianDiffusion
from neurosdm.errors import ConfigError

SAMPLERS = ("ddpm", "ddim")


def host_ops_per_pixel(sampler: str, eta: float = 0.0, clip_x0: bool = True, last: bool = False) -> int:
    """Element-wise operations of one sampler update per pixel, counted from the equations of :func:`sample`
    (multiply, add/subtract, clamp each count 1): ``x_0`` prediction 3, clamp 1; DDPM mean 3; DDIM ``eps``
    re-derivation 3 (with clamping) and update 3; added noise 2 (``sigma z`` and the add; not at the last step)."""
    ops = 3 + (1 if clip_x0 else 0)
    if sampler == "ddpm":
        ops += 3
    else:
        ops += (3 if clip_x0 else 0) + 3
    stochastic = sampler == "ddpm" or eta > 0
    return ops + (2 if stochastic and not last else 0)


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``: drawn on the CPU in float32 (reproducible for a given
    ``generator`` whatever the device), then moved to ``x``'s device and dtype."""
    z = torch.randn(x.shape, generator=generator, dtype=torch.float32)
    return z.to(device=x.device, dtype=x.dtype)


@torch.no_grad()
def sample(
    model: Denoiser,
    x_T: torch.Tensor,
    diffusion: GaussianDiffusion,
    sampler: str = "ddim",
    num_sample_steps: int = 50,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    clip_x0: bool = True,
    progress: Callable[[Iterable], Iterable] | None = None,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run the reverse process from ``x_T`` and return ``x_0`` clamped to [-1, 1].

    Args:
        model: ``model(x_t, t) -> eps`` with ``x_t`` [B, C, H, W] and ``t`` long [B].
        x_T: the starting noise [B, C, H, W]; its dtype and device are those of the whole chain.
        diffusion: the forward process whose ``alphas_bar`` the reverse process inverts.
        sampler: ``"ddpm"`` (ancestral, Ho et al. 2020) or ``"ddim"`` (Song et al. 2021).
        num_sample_steps: K network calls, over ``diffusion.timesteps(K)``.
        eta: DDIM stochasticity (0 deterministic, 1 DDPM-like); ignored by ``"ddpm"``.
        generator: CPU ``torch.Generator`` for the per-step noise (drawn in float32, then moved).
        clip_x0: clamp each ``x_0`` prediction to [-1, 1] before it is used.
        progress: optional wrapper ``progress(iterable) -> iterable`` (e.g. ``tqdm``) over the K steps.
        callback: optional ``callback(i, t, x)`` called after step ``i`` (0 .. K-1, in sampling order) which
            denoised diffusion step ``t``; ``x`` is the new sample (at the previous step of the sequence).
    """
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    eta = float(eta)
    if not math.isfinite(eta) or eta < 0:
        raise ConfigError(f"eta must be a finite number >= 0, got {eta}")
    if x_T.dim() < 1:
        raise ValueError("x_T must have a batch dimension")
    steps = diffusion.timesteps(num_sample_steps)  # ConfigError for a bad K
    alphas_bar = diffusion.alphas_bar.tolist()  # python floats (float64)
    prev_of = {t: (steps[j - 1] if j > 0 else None) for j, t in enumerate(steps)}
    stochastic = sampler == "ddpm" or eta > 0

    x = x_T
    b = x.shape[0]
    order = list(reversed(steps))
    it = progress(order) if progress is not None else order
    for i, t in enumerate(it):
        t = int(t)
        prev = prev_of[t]
        ab = alphas_bar[t]
        ab_prev = alphas_bar[prev] if prev is not None else 1.0
        last = prev is None

        t_batch = torch.full((b,), t, dtype=torch.long, device=x.device)
        eps = model(x, t_batch).to(dtype=x.dtype)

        # x_0 prediction (Ho et al. eq. 15), optionally clamped
        x0 = math.sqrt(1.0 / ab) * x - math.sqrt(1.0 / ab - 1.0) * eps
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)

        beta_p = 1.0 - ab / ab_prev  # respaced betas'_i
        beta_tilde = (1.0 - ab_prev) / (1.0 - ab) * beta_p if ab < 1.0 else 0.0
        if sampler == "ddpm":
            # posterior mean of q(x_prev | x_t, x_0_pred), Ho et al. eq. 7 on the respaced process
            c0 = math.sqrt(ab_prev) * beta_p / (1.0 - ab)
            ct = math.sqrt(1.0 - beta_p) * (1.0 - ab_prev) / (1.0 - ab)
            mean = c0 * x0 + ct * x
            sigma = math.sqrt(max(beta_tilde, 0.0))
        else:
            # Song et al. eq. 12, eps consistent with the (clamped) x_0 prediction
            if clip_x0:
                eps = (x - math.sqrt(ab) * x0) / math.sqrt(1.0 - ab)
            sigma = eta * math.sqrt(max(beta_tilde, 0.0))
            c_eps = math.sqrt(max(1.0 - ab_prev - sigma**2, 0.0))
            mean = math.sqrt(ab_prev) * x0 + c_eps * eps

        if stochastic and not last:
            x = mean + sigma * _noise(x, generator)
        else:
            x = mean
        if callback is not None:
            callback(i, t, x)
    return x.clamp(-1.0, 1.0)
