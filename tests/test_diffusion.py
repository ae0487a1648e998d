"""Tests for neurosdm.diffusion: schedules, forward process, loss and samplers.

No network is needed: the samplers are checked with closed-form denoisers. For Gaussian data
x_0 ~ N(mu, s^2) (independently per pixel) and x_t = a x_0 + b eps with a = sqrt(alphas_bar[t]),
b = sqrt(1 - alphas_bar[t]), the MMSE noise predictor is

    E[eps | x_t] = b / (a^2 s^2 + b^2) * (x_t - a mu),

which is affine in x_t, so every sampler step is affine-plus-Gaussian-noise and the exact mean and variance
of a sampler's output can also be propagated in closed form (``_chain_moments``, written independently of
the package: DDPM in the form of Ho et al. Algorithm 2 on the respaced process, DDIM as Song et al. eq. 12).
"""

from __future__ import annotations

import math

import pytest
import torch

from neurosdm.config import DiffusionConfig
from neurosdm.diffusion import SAMPLERS, GaussianDiffusion, make_betas, sample
from neurosdm.errors import ConfigError

N_SAMPLES = 4000


def gaussian_oracle(diffusion: GaussianDiffusion, mu: float, s: float):
    """The exact eps predictor E[eps | x_t] for x_0 ~ N(mu, s^2)."""
    ab = diffusion.alphas_bar.tolist()

    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.long and t.shape == (x_t.shape[0],)
        steps = t.tolist()
        assert len(set(steps)) == 1  # the samplers call the model with one step for the whole batch
        # python-float coefficients: cheap, and no multi-threaded tensor ops (slow on an oversubscribed CPU)
        a, b = math.sqrt(ab[steps[0]]), math.sqrt(1 - ab[steps[0]])
        return b / (a * a * s * s + b * b) * (x_t - a * mu)

    return model


def _chain_moments(diffusion, sampler, num_sample_steps, eta, mu, s, start_mean=0.0, start_var=1.0):
    """Exact (mean, var) of the sampler output for Gaussian data with the oracle denoiser (no clipping)."""
    ab = diffusion.alphas_bar.tolist()
    n = diffusion.num_diffusion_steps
    k = num_sample_steps
    taus = [i * n // k for i in range(k)]
    m, v = start_mean, start_var
    for j in range(k - 1, -1, -1):
        t = taus[j]
        a_bar = ab[t]
        a_bar_prev = ab[taus[j - 1]] if j > 0 else 1.0
        a, b = math.sqrt(a_bar), math.sqrt(1 - a_bar)

        def eps(x):
            return b / (a * a * s * s + b * b) * (x - a * mu)

        alpha_p = a_bar / a_bar_prev
        beta_p = 1 - alpha_p
        beta_tilde = (1 - a_bar_prev) / (1 - a_bar) * beta_p
        if sampler == "ddpm":
            # Ho et al. Algorithm 2 on the respaced process, sigma^2 = beta_tilde
            def step(x):
                return (x - beta_p / b * eps(x)) / math.sqrt(alpha_p)

            sigma2 = beta_tilde
        else:
            sigma2 = eta**2 * beta_tilde

            def step(x):
                x0 = (x - b * eps(x)) / a
                return math.sqrt(a_bar_prev) * x0 + math.sqrt(1 - a_bar_prev - sigma2) * eps(x)

        gain, offset = step(1.0) - step(0.0), step(0.0)
        m, v = gain * m + offset, gain * gain * v + (sigma2 if j > 0 else 0.0)
    return m, v


def _assert_moments(x, mean, std, n_se=5.0):
    """Sample mean/std of x agree with (mean, std) within n_se standard errors."""
    n = x.numel()
    se_mean = std / math.sqrt(n)
    se_std = std / math.sqrt(2 * n)
    assert abs(x.mean().item() - mean) < n_se * se_mean, (x.mean().item(), mean)
    assert abs(x.std().item() - std) < n_se * se_std, (x.std().item(), std)


@pytest.fixture(scope="module")
def linear():
    return GaussianDiffusion(DiffusionConfig())


@pytest.fixture(scope="module")
def x_T():
    return torch.randn(N_SAMPLES, 1, 1, 1, generator=torch.Generator().manual_seed(1234))


# ----------------------------------------------------------------------------------------------- schedules


def test_linear_schedule_endpoints():
    cfg = DiffusionConfig(num_diffusion_steps=1000, beta_start=1e-4, beta_end=0.02)
    betas = make_betas(cfg)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert torch.all(betas[1:] > betas[:-1])
    assert torch.allclose(betas[1:] - betas[:-1], torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))


def test_cosine_schedule_matches_closed_form():
    n, s = 1000, 0.008
    d = GaussianDiffusion(DiffusionConfig(num_diffusion_steps=n, schedule="cosine"))
    assert d.betas.dtype == torch.float64 and d.betas.shape == (n,)

    def f(t):
        return math.cos((t / n + s) / (1 + s) * math.pi / 2) ** 2

    expected = torch.tensor([f(t + 1) / f(0) for t in range(n)], dtype=torch.float64)
    # identical wherever the 0.999 clip is not active (only the very last step)
    unclipped = d.betas < 0.999
    assert unclipped[:-1].all()
    assert torch.allclose(d.alphas_bar[:-1], expected[:-1], rtol=1e-10, atol=1e-12)
    assert d.betas[-1].item() == pytest.approx(0.999)
    assert torch.all(d.betas[1:] >= d.betas[:-1])


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("n", [1, 10, 1000])
def test_schedule_properties(schedule, n):
    d = GaussianDiffusion(DiffusionConfig(num_diffusion_steps=n, schedule=schedule))
    assert d.num_diffusion_steps == n
    for name in ("betas", "alphas", "alphas_bar"):
        tensor = getattr(d, name)
        assert tensor.dtype == torch.float64 and tensor.shape == (n,)
    assert torch.all((d.betas > 0) & (d.betas < 1))
    assert torch.allclose(d.alphas, 1 - d.betas)
    assert torch.allclose(d.alphas_bar, torch.cumprod(d.alphas, 0))
    assert torch.all(d.alphas_bar[1:] < d.alphas_bar[:-1])
    assert torch.all((d.alphas_bar > 0) & (d.alphas_bar < 1))
    if n == 1000:
        assert d.alphas_bar[-1] < 1e-4  # x_T is (nearly) pure noise


def test_schedule_errors():
    with pytest.raises(ConfigError, match="schedule"):
        DiffusionConfig(schedule="quadratic")
    with pytest.raises(ConfigError, match="beta"):
        make_betas(DiffusionConfig(beta_start=0.0))
    with pytest.raises(ConfigError, match="beta"):
        make_betas(DiffusionConfig(beta_end=1.5))


# --------------------------------------------------------------------------------------- forward process


def test_q_sample_formula(linear):
    x_0 = torch.randn(4, 3, 5, 5)
    noise = torch.randn(4, 3, 5, 5)
    t = torch.tensor([0, 10, 500, 999])
    x_t = linear.q_sample(x_0, t, noise)
    assert x_t.shape == x_0.shape and x_t.dtype == x_0.dtype
    for i, ti in enumerate(t.tolist()):
        ab = linear.alphas_bar[ti].item()
        assert torch.allclose(x_t[i], math.sqrt(ab) * x_0[i] + math.sqrt(1 - ab) * noise[i], atol=1e-6)
    # an int step means the same step for the whole batch
    assert torch.equal(linear.q_sample(x_0, 500, noise), linear.q_sample(x_0, torch.full((4,), 500), noise))
    # dtype follows the data
    xb = linear.q_sample(x_0.bfloat16(), t, noise.bfloat16())
    assert xb.dtype == torch.bfloat16


@pytest.mark.parametrize("t", [0, 100, 700, 999])
def test_q_sample_mean_variance(linear, t):
    g = torch.Generator().manual_seed(t)
    n = 200_000
    x_0 = torch.full((n, 1, 1, 1), 0.7)
    noise = torch.randn(n, 1, 1, 1, generator=g)
    x_t = linear.q_sample(x_0, torch.full((n,), t), noise)
    ab = linear.alphas_bar[t].item()
    _assert_moments(x_t, 0.7 * math.sqrt(ab), math.sqrt(1 - ab))


# ------------------------------------------------------------------------------------------------ loss


def test_loss_zero_predictor_is_about_one(linear):
    x_0 = torch.rand(256, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    loss = linear.loss(lambda x_t, t: torch.zeros_like(x_t), x_0, generator=torch.Generator().manual_seed(1))
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(1.0, abs=0.05)


def test_loss_oracle_is_zero_and_reproducible(linear):
    x_0 = torch.rand(64, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    seen = {}

    def oracle(x_t, t):
        # reads x_0 from the closure and recovers the true noise: (x_t - sqrt(ab) x_0) / sqrt(1 - ab)
        assert t.dtype == torch.long and t.shape == (x_0.shape[0],)
        assert t.min() >= 0 and t.max() < linear.num_diffusion_steps
        seen["t"] = t
        ab = linear.alphas_bar[t].view(-1, 1, 1, 1)
        return ((x_t.double() - ab.sqrt() * x_0.double()) / (1 - ab).sqrt()).float()

    loss = linear.loss(oracle, x_0, generator=torch.Generator().manual_seed(5))
    assert loss.item() < 1e-6
    t_first = seen["t"].clone()
    linear.loss(oracle, x_0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(seen["t"], t_first)  # same generator seed, same steps
    assert len(set(t_first.tolist())) > 1


def test_loss_backpropagates(linear):
    w = torch.nn.Parameter(torch.tensor(0.5))
    loss = linear.loss(lambda x_t, t: w * x_t, torch.zeros(8, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert w.grad is not None and torch.isfinite(w.grad)


# ------------------------------------------------------------------------------------------- timesteps


def test_timesteps(linear):
    assert linear.timesteps(50) == list(range(0, 1000, 20))
    assert linear.timesteps(1000) == list(range(1000))
    assert linear.timesteps(1) == [0]
    small = GaussianDiffusion(DiffusionConfig(num_diffusion_steps=10))
    assert small.timesteps(3) == [0, 3, 6]
    for k in (1, 7, 33, 999):
        ts = linear.timesteps(k)
        assert len(ts) == k and ts[0] == 0 and ts[-1] < 1000
        assert all(a < b for a, b in zip(ts, ts[1:]))
    for bad in (0, -1, 1001, 2.5):
        with pytest.raises(ConfigError, match="num_sample_steps"):
            linear.timesteps(bad)


# -------------------------------------------------------------------------------------------- samplers


def test_chain_moments_reference_is_exact_for_the_full_chain(linear):
    # sanity check of the test's own reference: with every step the reverse chains recover the data law
    for sampler in SAMPLERS:
        m, v = _chain_moments(linear, sampler, 1000, 0.0, 0.1, 0.25)
        assert m == pytest.approx(0.1, abs=2e-3)
        assert math.sqrt(v) == pytest.approx(0.25, rel=0.02)


@pytest.mark.parametrize(
    "sampler,num_sample_steps",
    [("ddpm", 1000), ("ddim", 1000), ("ddpm", 100), ("ddim", 100), ("ddpm", 50), ("ddim", 50)],
)
def test_samplers_recover_gaussian_data(linear, x_T, sampler, num_sample_steps):
    mu, s = 0.1, 0.25  # |x_0| < 1 up to 3.6 s: neither clipping nor the final clamp matters
    model = gaussian_oracle(linear, mu, s)
    x = sample(model, x_T, linear, sampler=sampler, num_sample_steps=num_sample_steps,
               generator=torch.Generator().manual_seed(7), clip_x0=False)
    assert x.shape == x_T.shape and x.dtype == x_T.dtype
    # exact moments of this (discretised) chain: the implementation must reproduce them statistically
    m, v = _chain_moments(linear, sampler, num_sample_steps, 0.0, mu, s)
    _assert_moments(x, m, math.sqrt(v))
    # and the chain approximates the data law; the mean is unbiased, the std shrinks with coarse strides
    # (discretisation error of beta_tilde / DDIM's Euler step: e.g. -18% for DDPM and -10% for DDIM at K=50)
    _assert_moments(x, mu, x.std().item())  # mean vs mu (the std is compared to itself)
    std_tol = {1000: 0.03, 100: 0.12, 50: 0.2}[num_sample_steps]
    assert x.std().item() == pytest.approx(s, rel=std_tol)


def test_samplers_recover_gaussian_data_cosine(x_T):
    d = GaussianDiffusion(DiffusionConfig(schedule="cosine"))
    mu, s = -0.2, 0.25
    model = gaussian_oracle(d, mu, s)
    for sampler, k in (("ddpm", 1000), ("ddpm", 50), ("ddim", 50)):
        x = sample(model, x_T, d, sampler=sampler, num_sample_steps=k, generator=torch.Generator().manual_seed(3),
                   clip_x0=False)
        m, v = _chain_moments(d, sampler, k, 0.0, mu, s)
        _assert_moments(x, m, math.sqrt(v))


def test_strided_error_shrinks_with_more_steps(linear):
    for sampler in SAMPLERS:
        errs = [abs(math.sqrt(_chain_moments(linear, sampler, k, 0.0, 0.1, 0.25)[1]) - 0.25) for k in (20, 50, 250, 1000)]
        assert errs == sorted(errs, reverse=True)


def test_ddim_eta0_is_deterministic(linear, x_T):
    model = gaussian_oracle(linear, 0.1, 0.25)
    a = sample(model, x_T, linear, "ddim", 50, eta=0.0, generator=torch.Generator().manual_seed(0))
    b = sample(model, x_T, linear, "ddim", 50, eta=0.0, generator=torch.Generator().manual_seed(99))
    c = sample(model, x_T, linear, "ddim", 50, eta=0.0)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_stochastic_samplers_are_reproducible(linear, x_T):
    model = gaussian_oracle(linear, 0.1, 0.25)
    for sampler, eta in (("ddpm", 0.0), ("ddim", 0.5)):
        a = sample(model, x_T, linear, sampler, 50, eta=eta, generator=torch.Generator().manual_seed(0))
        b = sample(model, x_T, linear, sampler, 50, eta=eta, generator=torch.Generator().manual_seed(0))
        c = sample(model, x_T, linear, sampler, 50, eta=eta, generator=torch.Generator().manual_seed(1))
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)


@pytest.mark.parametrize("num_sample_steps", [1000, 50])
@pytest.mark.parametrize("clip_x0", [False, True])
def test_ddim_eta1_equals_ddpm(linear, num_sample_steps, clip_x0):
    # mu, s chosen so that the x_0 predictions often leave [-1, 1] and clipping is exercised
    mu, s = (0.1, 0.25) if not clip_x0 else (0.7, 0.5)
    model = gaussian_oracle(linear, mu, s)
    x_T = torch.randn(512, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    ddpm = sample(model, x_T, linear, "ddpm", num_sample_steps, generator=torch.Generator().manual_seed(11),
                  clip_x0=clip_x0)
    ddim = sample(model, x_T, linear, "ddim", num_sample_steps, eta=1.0, generator=torch.Generator().manual_seed(11),
                  clip_x0=clip_x0)
    assert torch.allclose(ddpm, ddim, atol=1e-4), (ddpm - ddim).abs().max()
    # and the variances agree in closed form
    if not clip_x0:
        assert _chain_moments(linear, "ddim", num_sample_steps, 1.0, mu, s) == pytest.approx(
            _chain_moments(linear, "ddpm", num_sample_steps, 0.0, mu, s), rel=1e-9
        )


def test_ddpm_two_steps_by_hand_with_clipping():
    d = GaussianDiffusion(DiffusionConfig(num_diffusion_steps=1000))
    ab = d.alphas_bar.tolist()
    x_T = torch.tensor([3.0, -0.2, 0.05], dtype=torch.float64).view(3, 1, 1, 1)
    calls = []

    def model(x_t, t):
        calls.append(t[0].item())
        return torch.full_like(x_t, 0.3)

    out = sample(model, x_T, d, "ddpm", 2, generator=torch.Generator().manual_seed(0), clip_x0=True)
    assert calls == [500, 0]
    z = torch.randn((3, 1, 1, 1), generator=torch.Generator().manual_seed(0), dtype=torch.float32).double()
    a1, a0 = ab[500], ab[0]
    x0 = ((x_T - math.sqrt(1 - a1) * 0.3) / math.sqrt(a1)).clamp(-1, 1)
    beta_p = 1 - a1 / a0
    mean = math.sqrt(a0) * beta_p / (1 - a1) * x0 + math.sqrt(a1 / a0) * (1 - a0) / (1 - a1) * x_T
    x = mean + math.sqrt((1 - a0) / (1 - a1) * beta_p) * z
    expected = ((x - math.sqrt(1 - a0) * 0.3) / math.sqrt(a0)).clamp(-1, 1)  # last step: the x_0 prediction
    assert torch.allclose(out, expected, atol=1e-12)


def test_ddim_two_steps_by_hand_with_clipping():
    d = GaussianDiffusion(DiffusionConfig(num_diffusion_steps=1000))
    ab = d.alphas_bar.tolist()
    x_T = torch.tensor([3.0, -0.2, 0.05], dtype=torch.float64).view(3, 1, 1, 1)
    out = sample(lambda x_t, t: torch.full_like(x_t, 0.3), x_T, d, "ddim", 2, eta=0.0, clip_x0=True)
    a1, a0 = ab[500], ab[0]
    x0 = ((x_T - math.sqrt(1 - a1) * 0.3) / math.sqrt(a1)).clamp(-1, 1)
    eps = (x_T - math.sqrt(a1) * x0) / math.sqrt(1 - a1)  # consistent with the clamped x_0
    x = math.sqrt(a0) * x0 + math.sqrt(1 - a0) * eps
    expected = ((x - math.sqrt(1 - a0) * 0.3) / math.sqrt(a0)).clamp(-1, 1)
    assert torch.allclose(out, expected, atol=1e-12)


def test_output_is_clamped_and_keeps_dtype(linear):
    x_T = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 5
    for sampler in SAMPLERS:
        for clip in (True, False):
            x = sample(lambda x_t, t: torch.zeros_like(x_t), x_T, linear, sampler, 10, clip_x0=clip,
                       generator=torch.Generator().manual_seed(0), gamma=[0.5] * 1000)
            assert x.shape == x_T.shape and x.dtype == torch.float32
            assert x.min() >= -1 and x.max() <= 1
    x64 = sample(lambda x_t, t: torch.zeros_like(x_t), x_T.double(), linear, "ddpm", 10)
    assert x64.dtype == torch.float64


def test_progress_and_callback(linear):
    wrapped = []

    def progress(iterable):
        items = list(iterable)
        wrapped.append(items)
        return iter(items)

    events = []
    x_T = torch.randn(2, 1, 3, 3)
    sample(lambda x_t, t: torch.zeros_like(x_t), x_T, linear, "ddim", 25, progress=progress,
           callback=lambda i, t, x: events.append((i, t, tuple(x.shape))))
    assert len(wrapped) == 1 and wrapped[0] == list(range(960, -1, -40))
    assert [e[0] for e in events] == list(range(25))
    assert [e[1] for e in events] == list(range(960, -1, -40))
    assert all(e[2] == (2, 1, 3, 3) for e in events)


def test_sampler_errors(linear):
    model = lambda x_t, t: torch.zeros_like(x_t)  # noqa: E731
    x_T = torch.randn(2, 1, 2, 2)
    with pytest.raises(ConfigError, match="ddpm.*ddim"):
        sample(model, x_T, linear, sampler="euler")
    with pytest.raises(ConfigError, match="num_sample_steps"):
        sample(model, x_T, linear, num_sample_steps=0)
    with pytest.raises(ConfigError, match="num_sample_steps"):
        sample(model, x_T, linear, num_sample_steps=1001)
    with pytest.raises(ConfigError, match="eta"):
        sample(model, x_T, linear, eta=-0.5)
