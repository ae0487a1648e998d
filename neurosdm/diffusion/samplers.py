"""Reverse-process samplers over a (possibly strided) step sequence: DDPM, DDIM, Analytic-DPM, DPM-Solver.

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

* ``"analytic-ddpm"`` / ``"analytic-ddim"`` -- Analytic-DPM (Bao et al. 2022, see
  :mod:`neurosdm.diffusion.analytic`): the ``"ddpm"`` mean (resp. the ``"ddim"`` mean with ``lambda^2 =
  eta^2 beta_tilde``) with the optimal variance ``sigma*^2 = lambda^2 + (sqrt((1 - ab) / alpha') -
  sqrt(1 - ab_prev - lambda^2))^2 (1 - Gamma_t)``, ``alpha' = ab / ab_prev``, clipped to Theorem 2's bounds for
  data in [-1, 1]. ``Gamma_t`` (``E ||eps||^2 / d``) comes from ``gamma``: a ``{t: Gamma_t}`` table
  (:func:`~neurosdm.diffusion.analytic.estimate_gamma`) or a sequence over all diffusion steps.
* ``"dpm-solver"`` -- single-step DPM-Solver-1/2/3 (Lu et al. 2022) in the noise-prediction form on the half
  log-SNR ``lambda_t = log(alpha_t / sigma_t)``, ``alpha_t = sqrt(ab)``, ``sigma_t = sqrt(1 - ab)``. The exact
  solution of the probability-flow ODE from ``s`` to ``t`` (their Prop. 3.1) is

      x_t = alpha_t / alpha_s x_s - sigma_t int_0^h e^(h - u) eps(x(u), lambda_s + u) du,   h = lambda_t - lambda_s.

  Every ``eps`` needed is taken at the schedule's own integer steps (the model takes integer ``t``; no
  interpolation of the discrete schedule): the network is called at exactly the steps of ``"ddim"`` with the
  same ``num_sample_steps`` K, ``tau_K > ... > tau_1 = 0``, and an order-p step from ``tau_j`` to
  ``tau_{j-p}`` uses ``tau_{j-1} .. tau_{j-p+1}`` as its intermediate points (``r_i = (lambda_{tau_{j-i}} -
  lambda_{tau_j}) / h``, computed from the exact lambdas, i.e. the paper's general-r DPM-Solver-2/3 with
  time-uniform points). Stage i of a step (after i + 1 calls) integrates exactly the polynomial in ``u`` of degree
  i through the ``eps`` values so far, which gives the next point (``u_i`` or the step's end):

      stage 0: x_t = alpha_t/alpha_s x_s - sigma_t (e^h - 1) eps_0                       (DPM-Solver-1, eq. 3.7)
      stage 1: ... - sigma_t (e^h - 1 - h) D_1 / h_1                                       (D_i = eps_i - eps_0)
      stage 2: ... - sigma_t [(e^h - 1 - h) a_1 + 2 (e^h - 1 - h - h^2/2) a_2],
               a_2 = (D_2/h_2 - D_1/h_1) / (h_2 - h_1),  a_1 = D_1/h_1 - a_2 h_1              (h_i = r_i h)

  (stage 1 at ``h = h_2`` is the paper's ``u_{2i}`` of DPM-Solver-3 exactly; as the last stage of DPM-Solver-2
  it uses ``(e^h - 1 - h) / h`` where Algorithm 1 has ``(e^h - 1) / 2``, equal to leading order; stage 2 equals
  the paper's DPM-Solver-3 update through the ``eps''`` term and, unlike it, stays third order for any r_1, r_2).
  So DPM-Solver-p is exact when ``eps`` is a polynomial of degree < p in lambda along the path. The K - 1
  intervals down to ``tau_1 = 0`` are grouped into steps of ``order`` (a remainder as one lower-order step at
  the end); the final hop from step 0 to ``x_0`` (``lambda = inf``) is always first order, which is the ``x_0``
  prediction, as in the other samplers. DPM-Solver-1 is therefore exactly DDIM with ``eta = 0``.
  With ``clip_x0`` each ``eps`` is replaced by the one consistent with the clamped ``x_0`` prediction (as DDIM).

No noise is added at the last step (``ab_prev = 1`` makes the posterior variance zero; for the analytic
samplers this is where the paper clips the first-step variance to a sub-pixel value -- here to zero).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from neurosdm.diffusion.analytic import analytic_variance, gamma_at, reverse_lambda2
from neurosdm.diffusion.schedules import Denoiser, GaussianDiffusion
from neurosdm.errors import ConfigError

SAMPLERS = ("ddpm", "ddim", "analytic-ddpm", "analytic-ddim", "dpm-solver")
DPM_SOLVER_ORDERS = (1, 2, 3)


def dpm_solver_plan(num_sample_steps: int, order: int) -> list[tuple[int, int]]:
    """``(stage, step_order)`` of each of the K network calls of ``"dpm-solver"``, in sampling order: the K - 1
    intervals down to step 0 are grouped into steps of ``order`` (a remainder as one lower-order step at the
    end), then the first-order hop to ``x_0``. ``stage`` is the number of earlier calls in the same step."""
    if order not in DPM_SOLVER_ORDERS:
        raise ConfigError(f"DPM-Solver order must be one of {DPM_SOLVER_ORDERS}, got {order!r}")
    k = int(num_sample_steps) - 1
    orders = [order] * (k // order) + ([k % order] if k % order else []) + [1]
    return [(stage, p) for p in orders for stage in range(p)]


def host_ops_per_pixel(sampler: str, eta: float = 0.0, clip_x0: bool = True, last: bool = False,
                       stage: int = 0) -> int:
    """Element-wise operations of one sampler update (one network call) per pixel, counted from the equations of
    :func:`sample` (multiply, add/subtract, clamp each count 1).

    * ``"ddpm"``, ``"ddim"``, ``"analytic-*"``: ``x_0`` prediction 3, clamp 1; DDPM mean 3; DDIM ``eps``
      re-derivation 3 (with clamping) and update 3; added noise 2 (``sigma z`` and the add; not at the last
      step). The analytic samplers have the updates of DDPM / DDIM and always add noise (their variance is
      per-step host scalar work, not per pixel).
    * ``"dpm-solver"``: the call at ``stage`` i of a solver step (see :func:`dpm_solver_plan`) forms
      ``c_x x_s + sum_{j<=i} w_j eps_j``: 2 (i + 1) + 1 ops; with ``clip_x0`` the ``eps`` is first made
      consistent with the clamped ``x_0`` (``x_0`` 3, clamp 1, ``eps`` 3). No noise.

    Use :func:`host_ops_schedule` for the per-call counts of a whole run (needed for ``"dpm-solver"`` with
    order > 1, whose calls differ by stage).
    """
    if sampler == "dpm-solver":
        return (7 if clip_x0 else 0) + 2 * (int(stage) + 1) + 1
    ops = 3 + (1 if clip_x0 else 0)
    if sampler in ("ddpm", "analytic-ddpm"):
        ops += 3
    else:
        ops += (3 if clip_x0 else 0) + 3
    stochastic = sampler in ("ddpm", "analytic-ddpm", "analytic-ddim") or eta > 0
    return ops + (2 if stochastic and not last else 0)


def host_ops_schedule(sampler: str, num_sample_steps: int, eta: float = 0.0, clip_x0: bool = True,
                      order: int = 3) -> list[int]:
    """:func:`host_ops_per_pixel` of each network call of a run, in sampling order (largest ``t`` first)."""
    k = int(num_sample_steps)
    if sampler == "dpm-solver":
        return [host_ops_per_pixel(sampler, eta, clip_x0, i == k - 1, stage)
                for i, (stage, _) in enumerate(dpm_solver_plan(k, order))]
    return [host_ops_per_pixel(sampler, eta, clip_x0, i == k - 1) for i in range(k)]


def _noise(x: torch.Tensor, generator: torch.Generator | None, noise=None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``: drawn on the CPU in float32 (reproducible whatever the device),
    then moved to ``x``'s device and dtype. With ``noise`` (per-image streams, ``noise(shape) -> [B, *shape]``)
    each image draws from its own stream; else the whole batch draws from ``generator``."""
    if noise is not None:
        z = noise(tuple(x.shape[1:]))
        if tuple(z.shape) != tuple(x.shape):
            raise ValueError(f"the noise source gave {tuple(z.shape)} for a batch of shape {tuple(x.shape)}")
    else:
        z = torch.randn(x.shape, generator=generator, dtype=torch.float32)
    return z.to(device=x.device, dtype=x.dtype)


def _dpm_stage_coefficients(ab: list[float], grid: list[int | None], a: int, stage: int) -> tuple[float, list[float]]:
    """``(c_x, [w_0 .. w_stage])`` with ``x_next = c_x x_s + sum_j w_j eps_j`` for ``stage`` of the solver step that
    starts at ``grid[a]`` (the ``eps_j`` taken at ``grid[a + j]``); the target is ``grid[a + stage + 1]``
    (``None``: ``x_0``, ``alpha = 1``, ``sigma = 0``, only reachable by stage 0)."""

    def alpha_sigma_lambda(t):
        if t is None:
            return 1.0, 0.0, math.inf
        al, si = math.sqrt(ab[t]), math.sqrt(1.0 - ab[t])
        return al, si, math.log(al / si)

    a_s, s_s, l_s = alpha_sigma_lambda(grid[a])
    a_t, s_t, l_t = alpha_sigma_lambda(grid[a + stage + 1])
    c_x = a_t / a_s
    # sigma_t (e^h - 1) = alpha_t sigma_s / alpha_s - sigma_t, finite also for the x_0 target
    e1 = a_t * s_s / a_s - s_t
    if stage == 0:
        return c_x, [-e1]
    h = l_t - l_s
    em = math.expm1(h)
    e2 = s_t * (em - h)  # sigma_t int_0^h e^(h-u) u du
    hs = [alpha_sigma_lambda(grid[a + j])[2] - l_s for j in range(1, stage + 1)]
    if stage == 1:
        (h1,) = hs
        c1 = e2 / h1  # coefficient of D_1 = eps_1 - eps_0
        return c_x, [-e1 + c1, -c1]
    h1, h2 = hs
    e3 = 2.0 * s_t * (em - h - 0.5 * h * h)  # sigma_t int_0^h e^(h-u) u^2 du
    # a_1 = p11 D_1 + p12 D_2, a_2 = p21 D_1 + p22 D_2 (the quadratic through (0, eps_0), (h_1, eps_1), (h_2, eps_2))
    p21, p22 = -1.0 / (h1 * (h2 - h1)), 1.0 / (h2 * (h2 - h1))
    p11, p12 = h2 / (h1 * (h2 - h1)), -h1 / (h2 * (h2 - h1))
    c1 = e2 * p11 + e3 * p21  # coefficient of D_1
    c2 = e2 * p12 + e3 * p22  # coefficient of D_2
    return c_x, [-e1 + c1 + c2, -c1, -c2]


def _dpm_solver(model, x_T, diffusion, steps, order, clip_x0, progress, callback):
    ab = diffusion.alphas_bar.tolist()
    grid: list[int | None] = list(reversed(steps)) + [None]
    plan = dpm_solver_plan(len(steps), order)
    b = x_T.shape[0]
    x = x_T  # the state at the start of the current solver step
    eps_list: list[torch.Tensor] = []
    cur = x_T  # where the next network call is made
    start = 0  # grid index of the current step's start
    calls = list(range(len(plan)))
    it = progress(calls) if progress is not None else calls
    for i in it:
        stage, p = plan[i]
        if stage == 0:
            start, x, eps_list = i, cur, []
        t = grid[i]
        eps = model(cur, torch.full((b,), t, dtype=torch.long, device=cur.device)).to(dtype=cur.dtype)
        if clip_x0:
            a, s = math.sqrt(ab[t]), math.sqrt(1.0 - ab[t])
            x0 = ((1.0 / a) * cur - (s / a) * eps).clamp(-1.0, 1.0)
            eps = (cur - a * x0) / s
        eps_list.append(eps)
        c_x, ws = _dpm_stage_coefficients(ab, grid, start, stage)
        cur = c_x * x
        for w, e in zip(ws, eps_list):
            cur = cur + w * e
        if callback is not None:
            callback(i, t, cur)
    return cur


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
    order: int = 3,
    gamma=None,
    noise: Callable[[tuple[int, ...]], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run the reverse process from ``x_T`` and return ``x_0`` clamped to [-1, 1].

    Args:
        model: ``model(x_t, t) -> eps`` with ``x_t`` [B, C, H, W] and ``t`` long [B].
        x_T: the starting noise [B, C, H, W]; its dtype and device are those of the whole chain.
        diffusion: the forward process whose ``alphas_bar`` the reverse process inverts.
        sampler: one of :data:`SAMPLERS` (see the module docstring).
        num_sample_steps: K network calls, over ``diffusion.timesteps(K)`` (for every sampler, DPM-Solver too).
        eta: DDIM stochasticity (0 deterministic, 1 DDPM-like) for ``"ddim"`` and ``"analytic-ddim"``.
        generator: CPU ``torch.Generator`` for the per-step noise of the whole batch (drawn in float32, then
            moved); the noise of an image then depends on its batch. Give ``noise`` instead for per-image streams.
        clip_x0: clamp each ``x_0`` prediction to [-1, 1] before it is used.
        progress: optional wrapper ``progress(iterable) -> iterable`` (e.g. ``tqdm``) over the K steps.
        callback: optional ``callback(i, t, x)`` called after network call ``i`` (0 .. K-1, in sampling order)
            at diffusion step ``t``; ``x`` is the new sample at the next step of the sequence (for DPM-Solver an
            intermediate ``u`` when the call is not the last of its solver step).
        order: DPM-Solver order, 1, 2 or 3 (``"dpm-solver"`` only).
        gamma: ``Gamma_t`` for the analytic samplers, a ``{t: Gamma_t}`` mapping covering the sampler's steps
            or a sequence over all diffusion steps.
        noise: per-image noise, ``noise(shape) -> [B, *shape]`` float32 (e.g.
            :class:`~neurosdm.diffusion.noise.ImageNoise`): each noise-adding step draws ``noise(x_T.shape[1:])``
            (one draw per image, in sampling order), so an image's chain does not depend on its batch. Exclusive
            with ``generator``.
    """
    if noise is not None and generator is not None:
        raise ValueError("give either generator (one stream per batch) or noise (one stream per image), not both")
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    eta = float(eta)
    if not math.isfinite(eta) or eta < 0:
        raise ConfigError(f"eta must be a finite number >= 0, got {eta}")
    if x_T.dim() < 1:
        raise ValueError("x_T must have a batch dimension")
    steps = diffusion.timesteps(num_sample_steps)  # ConfigError for a bad K
    if sampler == "dpm-solver":
        dpm_solver_plan(len(steps), order)  # ConfigError for a bad order
        return _dpm_solver(model, x_T, diffusion, steps, order, clip_x0, progress, callback).clamp(-1.0, 1.0)
    analytic = sampler.startswith("analytic-")
    if analytic:
        gammas = {t: gamma_at(gamma, t, diffusion.num_diffusion_steps) for t in steps}
    alphas_bar = diffusion.alphas_bar.tolist()  # python floats (float64)
    prev_of = {t: (steps[j - 1] if j > 0 else None) for j, t in enumerate(steps)}
    stochastic = sampler in ("ddpm", "analytic-ddpm", "analytic-ddim") or eta > 0
    ddpm_mean = sampler in ("ddpm", "analytic-ddpm")

    x = x_T
    b = x.shape[0]
    order_ = list(reversed(steps))
    it = progress(order_) if progress is not None else order_
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
        if ddpm_mean:
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
        if analytic and not last:
            lam2 = reverse_lambda2(ab, ab_prev, "ddpm" if ddpm_mean else "ddim", eta)
            sigma = math.sqrt(analytic_variance(ab, ab_prev, gammas[t], lam2))

        if stochastic and not last:
            x = mean + sigma * _noise(x, generator, noise)
        else:
            x = mean
        if callback is not None:
            callback(i, t, x)
    return x.clamp(-1.0, 1.0)
