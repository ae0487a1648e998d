"""Tests for DPM-Solver (Lu et al. 2022) and Analytic-DPM (Bao et al. 2022) against closed forms.

Gaussian data x_0 ~ N(mu, s^2) per pixel, x_t = a x_0 + b eps (a = sqrt(ab), b = sqrt(1 - ab)):
x_t ~ N(a mu, a^2 s^2 + b^2) and Cov(eps, x_t) = b, so the exact eps predictor is

    eps*(x_t, t) = E[eps | x_t] = b (x_t - a mu) / (a^2 s^2 + b^2)

and Gamma_t = E[eps*^2] = b^2 / (a^2 s^2 + b^2). The probability-flow ODE maps quantiles, so its exact solution
from step T' to step t is x_t = a_t mu + sd_t (x_T' - a_T' mu) / sd_T' with sd = sqrt(a^2 s^2 + b^2).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neurosdm.config import DiffusionConfig
from neurosdm.diffusion import SAMPLERS, GaussianDiffusion, sample
from neurosdm.diffusion.analytic import (
    analytic_variance,
    estimate_gamma,
    gamma_table,
    load_gamma,
    reverse_lambda2,
    variance_bounds,
)
from neurosdm.diffusion.samplers import dpm_solver_plan, host_ops_per_pixel, host_ops_schedule
from neurosdm.errors import ConfigError

MU, S = 0.1, 0.25


@pytest.fixture(scope="module")
def linear():
    return GaussianDiffusion(DiffusionConfig())


def oracle(diffusion, mu=MU, s=S):
    ab = diffusion.alphas_bar.tolist()

    def model(x_t, t):
        steps = t.tolist()
        assert len(set(steps)) == 1
        a, b = math.sqrt(ab[steps[0]]), math.sqrt(1 - ab[steps[0]])
        return b / (a * a * s * s + b * b) * (x_t - a * mu)

    return model


def gamma_closed_form(diffusion, t, s=S):
    ab = diffusion.alphas_bar[t].item()
    return (1 - ab) / (ab * s * s + 1 - ab)


def affine_map(diffusion, sampler, k, **kw):
    """(offset, gain) of a deterministic sampler with the (affine) oracle: out = offset + gain x_T."""
    x = torch.tensor([0.0, 1.0], dtype=torch.float64).view(2, 1, 1, 1)
    out = sample(oracle(diffusion), x, diffusion, sampler, k, clip_x0=False, **kw).flatten().tolist()
    return out[0], out[1] - out[0]


def exact_flow_map(diffusion, k, mu=MU, s=S):
    """(offset, gain) of the exact ODE from tau_K to step 0 followed by the exact x_0 prediction E[x_0 | x]."""
    ab = diffusion.alphas_bar.tolist()
    t_start = diffusion.timesteps(k)[-1]
    a_T, a_0 = math.sqrt(ab[t_start]), math.sqrt(ab[0])
    sd_T = math.sqrt(ab[t_start] * s * s + 1 - ab[t_start])
    sd_0 = math.sqrt(ab[0] * s * s + 1 - ab[0])
    post = a_0 * s * s / sd_0**2  # E[x_0 | x] = mu + post (x - a_0 mu)
    return mu - post * sd_0 * a_T * mu / sd_T, post * sd_0 / sd_T


# ------------------------------------------------------------------------------------------------ DPM-Solver


@pytest.mark.parametrize("k", [1, 2, 10, 50, 1000])
@pytest.mark.parametrize("clip_x0", [False, True])
def test_dpm_solver_1_is_ddim(linear, k, clip_x0):
    mu, s = (MU, S) if not clip_x0 else (0.7, 0.5)  # predictions leave [-1, 1]: clipping is exercised
    x_T = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = oracle(linear, mu, s)
    a = sample(model, x_T, linear, "dpm-solver", k, order=1, clip_x0=clip_x0)
    b = sample(model, x_T, linear, "ddim", k, eta=0.0, clip_x0=clip_x0)
    assert torch.allclose(a, b, atol=1e-10, rtol=0), (a - b).abs().max()


def test_dpm_solver_plan_and_calls(linear):
    assert dpm_solver_plan(7, 3) == [(0, 3), (1, 3), (2, 3), (0, 3), (1, 3), (2, 3), (0, 1)]
    assert dpm_solver_plan(6, 2) == [(0, 2), (1, 2), (0, 2), (1, 2), (0, 1), (0, 1)]
    assert dpm_solver_plan(6, 3) == [(0, 3), (1, 3), (2, 3), (0, 2), (1, 2), (0, 1)]
    assert dpm_solver_plan(1, 3) == [(0, 1)]
    for k in (1, 5, 50):
        for o in (1, 2, 3):
            assert len(dpm_solver_plan(k, o)) == k
    # the network is called at exactly the DDIM steps, one call per step
    events = []
    sample(lambda x, t: torch.zeros_like(x), torch.zeros(2, 1, 2, 2), linear, "dpm-solver", 10, order=3,
           callback=lambda i, t, x: events.append((i, t)))
    assert events == list(enumerate(reversed(linear.timesteps(10))))
    with pytest.raises(ConfigError, match="order"):
        sample(lambda x, t: torch.zeros_like(x), torch.zeros(2, 1, 2, 2), linear, "dpm-solver", 10, order=4)


def _poly_eps_model(diffusion, coeffs):
    """A model whose eps depends only on t: eps = sum_m c_m lambda_t^m (a known function along any path)."""
    ab = diffusion.alphas_bar.tolist()

    def model(x, t):
        lam = 0.5 * math.log(ab[t[0].item()] / (1 - ab[t[0].item()]))
        return torch.full_like(x, sum(c * lam**m for m, c in enumerate(coeffs)))

    return model


def _poly_reference(diffusion, k, coeffs, x_T):
    """x_T -> exact ODE solution at step 0 (closed-form integral) -> first-order hop to x_0 (the x_0 prediction)."""
    ab = diffusion.alphas_bar.tolist()
    t0, tT = 0, diffusion.timesteps(k)[-1]
    a0, aT, s0 = math.sqrt(ab[t0]), math.sqrt(ab[tT]), math.sqrt(1 - ab[t0])
    l0, lT = (0.5 * math.log(ab[t] / (1 - ab[t])) for t in (t0, tT))

    def antiderivative(lam):  # of e^-lam (c0 + c1 lam + c2 lam^2)
        c = list(coeffs) + [0.0] * (3 - len(coeffs))
        return -math.exp(-lam) * (c[0] + c[1] * (lam + 1) + c[2] * (lam * lam + 2 * lam + 2))

    x0_step = a0 / aT * x_T - a0 * (antiderivative(l0) - antiderivative(lT))
    eps0 = sum(c * l0**m for m, c in enumerate(coeffs))
    return (x0_step - s0 * eps0) / a0


@pytest.mark.parametrize("order,coeffs", [(1, [0.3]), (2, [0.3, -0.2]), (3, [0.3, -0.2, 0.05])])
def test_dpm_solver_exact_for_polynomial_eps(linear, order, coeffs):
    # DPM-Solver-p integrates the exponentially weighted eps exactly when eps is a polynomial of degree < p in
    # lambda; K - 1 = 12 is a multiple of 1, 2 and 3, so every solver step has the full order
    k = 13
    x_T = torch.tensor([-0.4, 0.0, 0.3], dtype=torch.float64).view(3, 1, 1, 1)

    def run(o):  # the output before the final clamp to [-1, 1] (these outputs are far outside it)
        seen = []
        sample(_poly_eps_model(linear, coeffs), x_T, linear, "dpm-solver", k, order=o, clip_x0=False,
               callback=lambda i, t, x: seen.append(x))
        return seen[-1]

    out, ref = run(order), _poly_reference(linear, k, coeffs, x_T)
    assert torch.allclose(out, ref, atol=1e-9 * ref.abs().max().item(), rtol=0), (out - ref).abs().max()
    if order > 1:  # and a lower order is not exact for it
        assert (run(order - 1) - ref).abs().max() > 1e-3


def test_dpm_solver_gaussian_convergence(linear):
    # exact (no Monte Carlo): each solver is an affine map of x_T; compare with the exact flow
    errs = {}
    for k in (7, 25, 97, 193):
        ref_off, ref_gain = exact_flow_map(linear, k)
        for order in (1, 2, 3):
            off, gain = affine_map(linear, "dpm-solver", k, order=order)
            errs[order, k] = (abs(off - ref_off), abs(gain - ref_gain))
    for order in (1, 2, 3):
        std_errs = [errs[order, k][1] for k in (7, 25, 97, 193)]
        assert std_errs == sorted(std_errs, reverse=True)
        assert errs[order, 193][0] < 1e-5  # mean
    # higher orders are closer at few steps (std errors 0.133 / 0.039 / 0.032 at K = 7; 0.047 / 0.020 / 0.016 at 25)
    for k in (7, 25):
        assert errs[1, k][1] > errs[2, k][1] > errs[3, k][1]
    # order of convergence: from K = 97 to 193 (h halves) DPM-Solver-1 error halves, the higher orders shrink faster
    assert errs[1, 97][1] / errs[1, 193][1] == pytest.approx(2.0, rel=0.1)
    assert errs[2, 97][1] / errs[2, 193][1] > 3.0
    assert errs[3, 97][1] / errs[3, 193][1] > 3.0
    # and the sampled law approaches the data's: std within 0.2% of s with DPM-Solver-3 at K = 193
    off, gain = affine_map(linear, "dpm-solver", 193, order=3)
    assert off == pytest.approx(MU, abs=5e-4) and gain == pytest.approx(S, rel=2e-3)


def test_dpm_solver_samples_match_exact_flow(linear):
    x_T = torch.randn(4000, 1, 1, 1, generator=torch.Generator().manual_seed(1))
    x = sample(oracle(linear), x_T, linear, "dpm-solver", 25, order=3, clip_x0=False)
    off, gain = exact_flow_map(linear, 25)
    ref = off + gain * x_T
    assert (x - ref).abs().max() < 0.02 * 4  # per-sample: the std error 0.016 at K=25 times |x_T| < 4
    assert x.mean().item() == pytest.approx(MU, abs=5 * S / math.sqrt(4000))
    assert x.std().item() == pytest.approx(S, rel=0.1)


# ----------------------------------------------------------------------------------------------- Analytic-DPM


def test_estimate_gamma_matches_closed_form(linear, tmp_path):
    g = torch.Generator().manual_seed(0)
    data = MU + S * torch.randn(5000, 1, 2, 2, generator=g)
    steps = [0, 10, 100, 300, 600, 999]
    est = estimate_gamma(oracle(linear), data, linear, steps, num_samples=2000, generator=g)
    assert est.shape == (6,) and est.dtype == np.float64
    for t, e in zip(steps, est):
        exact = gamma_closed_form(linear, t)
        # Gamma = E[eps*^2]: eps* ~ N(0, Gamma) so the mean of 8000 squares has relative s.e. sqrt(2 / 8000)
        assert e == pytest.approx(exact, rel=5 * math.sqrt(2 / 8000)), (t, e, exact)
    # point mass: eps* is the true noise, Gamma = 1
    point = estimate_gamma(oracle(linear, 0.3, 0.0), torch.full((10, 1, 2, 2), 0.3), linear, steps, 2000, generator=g)
    assert np.allclose(point, 1.0, atol=5 * math.sqrt(2 / 8000))
    # cache: written, reloaded (without calling the model), recomputed for other timesteps
    path = tmp_path / "gamma.npz"
    first = estimate_gamma(oracle(linear), data, linear, steps, 100, generator=g, cache=path)
    assert path.exists()
    again = estimate_gamma(lambda x, t: pytest.fail("model called"), data, linear, steps, 100, cache=path)
    assert np.array_equal(first, again)
    assert load_gamma(path) == gamma_table(steps, first)
    other = estimate_gamma(oracle(linear), data, linear, [5, 50], 100, generator=g, cache=path)
    assert other.shape == (2,)


def test_analytic_variance_between_bounds(linear):
    ab = linear.alphas_bar.tolist()
    rng = np.random.default_rng(0)
    for k in (10, 100, 1000):
        steps = linear.timesteps(k)
        for j in range(1, k):
            t, prev = steps[j], steps[j - 1]
            for kind, eta in (("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5)):
                lam2 = reverse_lambda2(ab[t], ab[prev], kind, eta)
                lower, upper = variance_bounds(ab[t], ab[prev], lam2)
                assert 0 <= lower <= upper
                for gamma in list(rng.uniform(-0.5, 1.5, 4)) + [0.0, 1.0, gamma_closed_form(linear, t)]:
                    v = analytic_variance(ab[t], ab[prev], gamma, lam2)
                    assert lower <= v <= upper
                # the Gaussian data of these tests lie (essentially) in [-1, 1]: the exact value is inside
                exact = analytic_variance(ab[t], ab[prev], gamma_closed_form(linear, t), lam2, clip=False)
                assert lower <= exact <= upper * (1 + 1e-12)
    # estimates outside [0, 1] are clipped to the bounds
    t, prev = 500, 400
    lam2 = reverse_lambda2(ab[t], ab[prev])
    lower, upper = variance_bounds(ab[t], ab[prev], lam2, data_range=None)
    assert analytic_variance(ab[t], ab[prev], 1.3, lam2, data_range=None) == lower
    assert analytic_variance(ab[t], ab[prev], -0.3, lam2, data_range=None) == upper


def test_analytic_variance_known_limits(linear):
    ab = linear.alphas_bar.tolist()
    betas = linear.betas.tolist()
    for t in (1, 10, 500, 999):
        beta_tilde = (1 - ab[t - 1]) / (1 - ab[t]) * betas[t]
        # point mass (Gamma = 1): beta_tilde for DDPM (Ho et al.'s lower extreme), 0 for DDIM
        assert analytic_variance(ab[t], ab[t - 1], 1.0, reverse_lambda2(ab[t], ab[t - 1])) == pytest.approx(
            beta_tilde, rel=1e-12)
        assert analytic_variance(ab[t], ab[t - 1], 1.0, reverse_lambda2(ab[t], ab[t - 1], "ddim")) == 0.0
        # x_0 ~ N(0, I) (Gamma = 1 - ab): beta_t, Ho et al.'s upper extreme
        v = analytic_variance(ab[t], ab[t - 1], 1 - ab[t], reverse_lambda2(ab[t], ab[t - 1]), data_range=None)
        assert v == pytest.approx(betas[t], rel=1e-9)


def _analytic_chain_moments(diffusion, kind, k, eta=0.0, mu=MU, s=S):
    """Exact output (mean, var) of the analytic sampler with the oracle (no clipping, no noise at the last step)."""
    ab = diffusion.alphas_bar.tolist()
    steps = diffusion.timesteps(k)
    m, v = 0.0, 1.0
    for j in range(k - 1, -1, -1):
        t = steps[j]
        a_bar, a_prev = ab[t], (ab[steps[j - 1]] if j > 0 else 1.0)
        a, b = math.sqrt(a_bar), math.sqrt(1 - a_bar)
        lam2 = reverse_lambda2(a_bar, a_prev, kind, eta) if j > 0 else 0.0

        def step(x):
            eps = b / (a * a * s * s + b * b) * (x - a * mu)
            x0 = (x - b * eps) / a
            return math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - lam2, 0.0)) * (x - a * x0) / b

        sigma2 = analytic_variance(a_bar, a_prev, b * b / (a * a * s * s + b * b), lam2) if j > 0 else 0.0
        gain, off = step(1.0) - step(0.0), step(0.0)
        m, v = gain * m + off, gain * gain * v + sigma2
    return m, v


@pytest.mark.parametrize("sampler,eta", [("analytic-ddpm", 0.0), ("analytic-ddim", 0.0), ("analytic-ddim", 0.5)])
def test_analytic_sampler_recovers_gaussian_data(linear, sampler, eta):
    kind = "ddpm" if sampler == "analytic-ddpm" else "ddim"
    gamma = {t: gamma_closed_form(linear, t) for t in range(1000)}
    # with the exact Gamma every reverse step is the true q(x_prev | x_t): the data law even with 10 steps
    # (DDPM with beta_tilde is 18% too narrow already at 50 steps)
    for k in (10, 50):
        m, v = _analytic_chain_moments(linear, kind, k, eta)
        assert m == pytest.approx(MU, abs=1e-3) and math.sqrt(v) == pytest.approx(S, rel=2e-3)
    x_T = torch.randn(4000, 1, 1, 1, generator=torch.Generator().manual_seed(2))
    x = sample(oracle(linear), x_T, linear, sampler, 10, eta=eta, generator=torch.Generator().manual_seed(3),
               clip_x0=False, gamma=gamma)
    m, v = _analytic_chain_moments(linear, kind, 10, eta)
    n = x.numel()
    assert abs(x.mean().item() - m) < 5 * math.sqrt(v / n)
    assert abs(x.std().item() - math.sqrt(v)) < 5 * math.sqrt(v / (2 * n))
    # a sequence over all steps works too, and the same generator reproduces the same samples
    y = sample(oracle(linear), x_T, linear, sampler, 10, eta=eta, generator=torch.Generator().manual_seed(3),
               clip_x0=False, gamma=[gamma[t] for t in range(1000)])
    assert torch.equal(x, y)


def test_analytic_ddpm_with_unit_gamma_is_ddpm(linear):
    # Gamma = 1 (a point mass) makes sigma* = beta_tilde: the analytic sampler is then exactly DDPM
    x_T = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    model = oracle(linear, 0.7, 0.5)
    a = sample(model, x_T, linear, "ddpm", 20, generator=torch.Generator().manual_seed(1))
    b = sample(model, x_T, linear, "analytic-ddpm", 20, generator=torch.Generator().manual_seed(1),
               gamma={t: 1.0 for t in linear.timesteps(20)})
    assert torch.allclose(a, b, atol=1e-6)


def test_analytic_needs_gamma(linear):
    x_T = torch.zeros(2, 1, 2, 2)
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(ConfigError, match="gamma"):
        sample(model, x_T, linear, "analytic-ddpm", 10)
    with pytest.raises(ConfigError, match="gamma"):
        sample(model, x_T, linear, "analytic-ddpm", 10, gamma={0: 1.0})
    with pytest.raises(ConfigError, match="gamma"):
        sample(model, x_T, linear, "analytic-ddim", 10, gamma=[1.0] * 10)


# ------------------------------------------------------------------------------------------ common / host ops


def test_all_samplers_listed_and_dispatched(linear):
    assert set(SAMPLERS) == {"ddpm", "ddim", "analytic-ddpm", "analytic-ddim", "dpm-solver"}
    x_T = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 3
    gamma = {t: 0.5 for t in range(1000)}
    for sampler in SAMPLERS:
        x = sample(lambda x_t, t: torch.zeros_like(x_t), x_T, linear, sampler, 7, gamma=gamma,
                   generator=torch.Generator().manual_seed(0))
        assert x.shape == x_T.shape and x.dtype == x_T.dtype and x.abs().max() <= 1


def test_host_ops(linear):
    # unchanged for the original samplers
    assert host_ops_per_pixel("ddim", 0.0, True, False) == 10
    assert host_ops_per_pixel("ddpm", 0.0, True, False) == 9
    assert host_ops_per_pixel("analytic-ddpm", 0.0, True, False) == host_ops_per_pixel("ddpm", 0.0, True, False)
    assert host_ops_per_pixel("analytic-ddim", 0.0, True, True) == host_ops_per_pixel("ddim", 0.0, True, True)
    assert host_ops_per_pixel("analytic-ddim", 0.0, True, False) == host_ops_per_pixel("ddim", 1.0, True, False)
    # DPM-Solver: 2 (stage + 1) + 1 for the linear combination, + 7 to re-derive eps from a clamped x_0
    assert [host_ops_per_pixel("dpm-solver", 0.0, False, False, s) for s in range(3)] == [3, 5, 7]
    assert host_ops_schedule("dpm-solver", 7, clip_x0=True, order=3) == [10, 12, 14, 10, 12, 14, 10]
    # DPM-Solver-1 costs what DDIM (eta 0) costs with clipping
    assert host_ops_schedule("dpm-solver", 20, order=1) == host_ops_schedule("ddim", 20)
    assert len(host_ops_schedule("ddpm", 20)) == 20


def test_cli_dpm_solver_order_and_analytic_with_gamma(tmp_path):
    """`neurosdm sample --sampler dpm-solver --order`, `neurosdm gamma` then `--sampler analytic-ddpm --gamma`."""
    import subprocess
    import sys

    from typer.testing import CliRunner

    from neurosdm import cli
    from conftest import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "t.pt")
    run = CliRunner().invoke
    r1 = run(cli.app, ["sample", str(ckpt), "--out", str(tmp_path / "o1"), "--num-images", "2", "--steps", "4",
                       "--sampler", "dpm-solver", "--order", "1"])
    r2 = run(cli.app, ["sample", str(ckpt), "--out", str(tmp_path / "o2"), "--num-images", "2", "--steps", "4",
                       "--sampler", "dpm-solver", "--order", "3"])
    assert r1.exit_code == 0 and r2.exit_code == 0, (r1.output, r2.output)
    assert not np.array_equal(np.load(tmp_path / "o1" / "samples.npy"), np.load(tmp_path / "o2" / "samples.npy"))
    r = run(cli.app, ["gamma", str(ckpt), "--dataset", "builtin", "--steps", "4", "--num-samples", "8", "--out",
                      str(tmp_path / "g.npz")])
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "g.npz") as z:
        assert z["gamma"].shape == (4,) and np.all(np.isfinite(z["gamma"]))
    r = run(cli.app, ["sample", str(ckpt), "--out", str(tmp_path / "o3"), "--num-images", "2", "--steps", "4",
                      "--sampler", "analytic-ddpm", "--gamma", str(tmp_path / "g.npz")])
    assert r.exit_code == 0, r.output
    p = subprocess.run([sys.executable, "-m", "neurosdm", "sample", str(ckpt), "--out", str(tmp_path / "o4"),
                        "--sampler", "analytic-ddim", "--steps", "4"], capture_output=True, text=True)
    assert p.returncode == 1 and "--gamma" in p.stderr and "Traceback" not in p.stderr
