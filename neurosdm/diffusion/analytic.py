"""Analytic-DPM (Bao, Li, Zhu & Zhang, ICLR 2022): the optimal reverse variance from the moment of the score.

Notation of the paper on a (possibly strided) step from ``n`` (``ab = alphas_bar[n]``) to the previous step of
the sequence ``n-1`` (``ab_prev``; 1 for the last step): ``beta_bar_n = 1 - ab``, ``alpha_n = ab / ab_prev``.
The reverse process is taken from the family of forward processes q_lambda (paper eq. 1, Song et al.'s DDIM
family) with ``q_lambda(x_{n-1} | x_n, x_0) = N(mu_tilde_n(x_n, x_0), lambda_n^2 I)``:

    mu_tilde_n(x_n, x_0) = sqrt(ab_prev) x_0 + sqrt(beta_bar_{n-1} - lambda_n^2) (x_n - sqrt(ab) x_0) / sqrt(beta_bar_n)

``lambda_n^2 = beta_tilde_n = beta_bar_{n-1} / beta_bar_n (1 - alpha_n)`` is DDPM, ``lambda_n = 0`` is DDIM
(``eta^2 beta_tilde_n`` in between). Theorem 1 gives the KL-optimal Gaussian reverse step
``N(mu*_n, sigma*_n^2 I)``: ``mu*_n`` is ``mu_tilde_n`` at the MMSE ``x_0`` (the usual eps-parametrised mean) and

    sigma*_n^2 = lambda_n^2 + (sqrt(beta_bar_n / alpha_n) - sqrt(beta_bar_{n-1} - lambda_n^2))^2 (1 - Gamma_n)   (*)

where, with the score ``s_n(x) = -eps(x, n) / sqrt(beta_bar_n)``,
``Gamma_n = beta_bar_n E_{q_n} ||s_n(x_n)||^2 / d = E_{q_n} ||eps(x_n, n)||^2 / d``. The paper estimates it by
Monte Carlo on training data (``Gamma_n = 1/M sum_m ||eps(x_{n,m}, n)||^2 / d``, ``x_{n,m} ~ q_n``):
:func:`estimate_gamma`. For the DDPM case the bracket simplifies to ``(1 - alpha_n)^2 / (alpha_n beta_bar_n)``.

Theorem 2 bounds sigma*_n^2 (Gamma_n is in [0, 1]; for data in [a, b]^d also
``1 - Gamma_n <= ab / beta_bar_n ((b - a) / 2)^2``):

    lambda_n^2 <= sigma*_n^2 <= lambda_n^2 + (sqrt(beta_bar_n / alpha_n) - sqrt(beta_bar_{n-1} - lambda_n^2))^2
                                     * min(1, ab / beta_bar_n ((b - a) / 2)^2)

and the estimate is clipped to these bounds (the paper clips to them, sec. 4). Special cases used as tests:
a point mass (Gamma = 1) gives ``sigma*^2 = lambda^2`` (``beta_tilde`` for DDPM, the optimal choice for a
deterministic ``x_0`` noted by Ho et al. 2020, sec. 3.2); ``x_0 ~ N(0, I)`` (Gamma = beta_bar_n) gives ``beta_n``
for DDPM (Ho et al.'s other extreme). The strided ("shorter trajectory", paper sec. 4) case uses the same
formulas with ``n, n-1`` the consecutive steps of the sequence.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from neurosdm.diffusion.schedules import Denoiser, GaussianDiffusion
from neurosdm.errors import ConfigError

DATA_RANGE = (-1.0, 1.0)  # images are scaled to [-1, 1]


def reverse_lambda2(ab: float, ab_prev: float, kind: str = "ddpm", eta: float = 0.0) -> float:
    """``lambda_n^2`` of the forward family: ``beta_tilde_n`` (``"ddpm"``) or ``eta^2 beta_tilde_n`` (``"ddim"``)."""
    beta_tilde = (1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev) if ab < 1.0 else 0.0
    beta_tilde = max(beta_tilde, 0.0)
    if kind == "ddpm":
        return beta_tilde
    if kind == "ddim":
        return eta * eta * beta_tilde
    raise ConfigError(f"kind must be 'ddpm' or 'ddim', got {kind!r}")


def variance_bounds(ab: float, ab_prev: float, lambda2: float,
                    data_range: tuple[float, float] | None = DATA_RANGE) -> tuple[float, float]:
    """Theorem 2's ``(lower, upper)`` bounds of ``sigma*_n^2``; ``data_range=None``: no bounded-data term."""
    alpha_n = ab / ab_prev
    gap = math.sqrt((1.0 - ab) / alpha_n) - math.sqrt(max(1.0 - ab_prev - lambda2, 0.0))
    factor = 1.0
    if data_range is not None:
        half = (data_range[1] - data_range[0]) / 2.0
        factor = min(1.0, ab / (1.0 - ab) * half * half)
    return lambda2, lambda2 + gap * gap * factor


def analytic_variance(ab: float, ab_prev: float, gamma: float, lambda2: float,
                      data_range: tuple[float, float] | None = DATA_RANGE, clip: bool = True) -> float:
    """``sigma*_n^2`` of eq. (*) for the step ``ab -> ab_prev`` with ``Gamma_n = gamma``, clipped to
    :func:`variance_bounds` when ``clip`` (an estimated Gamma may leave [0, 1])."""
    alpha_n = ab / ab_prev
    gap = math.sqrt((1.0 - ab) / alpha_n) - math.sqrt(max(1.0 - ab_prev - lambda2, 0.0))
    var = lambda2 + gap * gap * (1.0 - float(gamma))
    if clip:
        lower, upper = variance_bounds(ab, ab_prev, lambda2, data_range)
        var = min(max(var, lower), upper)
    return var


@torch.no_grad()
def estimate_gamma(
    model: Denoiser,
    data: torch.Tensor,
    diffusion: GaussianDiffusion,
    timesteps: Sequence[int] | None = None,
    num_samples: int = 100,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    cache: str | Path | None = None,
) -> np.ndarray:
    """Analytic-DPM's Monte Carlo estimate of ``Gamma_t = E_{q_t} ||eps(x_t, t)||^2 / d`` at each ``t`` of
    ``timesteps`` (default: every diffusion step); returns float64 ``[len(timesteps)]`` aligned with them.

    For each ``t``, ``num_samples`` examples are drawn from ``data`` [M, C, H, W] (uniformly with replacement,
    fresh for each ``t``), noised with :meth:`GaussianDiffusion.q_sample` and passed through ``model`` in batches
    of ``batch_size`` (one step per batch). ``generator`` (CPU) drives the choice and the noise.

    ``cache``: a ``.npz`` path. When it exists and was written for the same timesteps, number of diffusion steps
    and ``num_samples``, it is loaded instead of estimating; otherwise the estimate is written there. The cache
    does not identify the model: delete it when the model changes.
    """
    n = diffusion.num_diffusion_steps
    steps = list(range(n)) if timesteps is None else [int(t) for t in timesteps]
    if not steps or any(not 0 <= t < n for t in steps):
        raise ConfigError(f"timesteps must be non-empty and lie in 0..{n - 1}")
    if num_samples < 1 or batch_size < 1:
        raise ConfigError("num_samples and batch_size must be >= 1")
    if data.dim() < 2 or data.shape[0] < 1:
        raise ConfigError("data must be a non-empty batch [M, ...]")
    if cache is not None and Path(cache).exists():
        with np.load(cache) as z:
            if (int(z["num_diffusion_steps"]) == n and int(z["num_samples"]) == num_samples
                    and z["timesteps"].tolist() == steps):
                return z["gamma"].astype(np.float64)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    d = data[0].numel()
    out = np.empty(len(steps), dtype=np.float64)
    for i, t in enumerate(steps):
        idx = torch.randint(0, data.shape[0], (num_samples,), generator=gen)
        total = 0.0
        for start in range(0, num_samples, batch_size):
            x0 = data[idx[start:start + batch_size]]
            noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(device=x0.device, dtype=x0.dtype)
            x_t = diffusion.q_sample(x0, t, noise)
            eps = model(x_t, torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device))
            total += eps.double().pow(2).sum().item()
        out[i] = total / (num_samples * d)
    if cache is not None:
        save_gamma(cache, steps, out, n, num_samples)
    return out


def save_gamma(path: str | Path, timesteps: Sequence[int], gamma: Sequence[float], num_diffusion_steps: int,
               num_samples: int) -> None:
    """Write a Gamma table to ``path`` (.npz: timesteps, gamma, num_diffusion_steps, num_samples)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # np.savez would append .npz to a path without the suffix
        np.savez(f, timesteps=np.asarray(list(timesteps), dtype=np.int64), gamma=np.asarray(gamma, dtype=np.float64),
                 num_diffusion_steps=np.int64(num_diffusion_steps), num_samples=np.int64(num_samples))


def load_gamma(path: str | Path) -> dict[int, float]:
    """A Gamma table written by :func:`save_gamma` / :func:`estimate_gamma` as ``{t: Gamma_t}``, ready for
    ``sample(..., gamma=...)``."""
    with np.load(path) as z:
        return gamma_table(z["timesteps"].tolist(), z["gamma"].tolist())


def gamma_table(timesteps: Sequence[int], gamma: Sequence[float]) -> dict[int, float]:
    """``{t: Gamma_t}`` from aligned sequences (e.g. ``timesteps`` and :func:`estimate_gamma`'s result)."""
    timesteps, gamma = list(timesteps), list(np.asarray(gamma, dtype=np.float64).reshape(-1))
    if len(timesteps) != len(gamma):
        raise ConfigError(f"{len(timesteps)} timesteps but {len(gamma)} Gamma values")
    return {int(t): float(g) for t, g in zip(timesteps, gamma)}


def gamma_at(gamma, t: int, num_diffusion_steps: int) -> float:
    """``Gamma_t`` from a ``{t: value}`` mapping or a sequence over all ``num_diffusion_steps`` steps."""
    if gamma is None:
        raise ConfigError("the analytic samplers need gamma: a {t: Gamma_t} table (estimate_gamma / load_gamma)")
    if isinstance(gamma, Mapping):
        if t not in gamma:
            raise ConfigError(f"gamma has no value for diffusion step {t}; estimate it at the sampler's timesteps")
        return float(gamma[t])
    values = np.asarray(gamma, dtype=np.float64).reshape(-1)
    if values.shape[0] != num_diffusion_steps:
        raise ConfigError(f"a gamma sequence must cover all {num_diffusion_steps} diffusion steps, got "
                          f"{values.shape[0]} (pass a {{t: Gamma_t}} mapping for a subset)")
    return float(values[t])
