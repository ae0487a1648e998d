import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neurosdm.neurons import multistep_neuron
from neurosdm.quantize import (
    FixedPointNeuron,
    QuantizationError,
    QuantSpec,
    calibrate_exponents,
    choose_exponent,
    dequantize,
    fake_quant,
    fixed_point_run,
    fixed_point_run_torch,
    fixed_point_step,
    quantize_weight,
)

VMAX = 2**23 - 1


# ------------------------------------------------------------------------------------------------------ weights


def test_choose_exponent_golden():
    # 1.0 / 2**-7 = 128 > 127 clips; 1.0 / 2**-6 = 64 fits
    assert choose_exponent(np.array([0.5, -0.25, 1.0])) == -6
    m, e = quantize_weight(np.array([0.5, -0.25, 1.0]))
    assert e == -6 and m.tolist() == [32, -16, 64]
    # the negative end reaches -128: -1.0 / 2**-7 = -128 fits
    assert quantize_weight(np.array([-1.0]))[0].tolist() == [-128] and choose_exponent([-1.0]) == -7
    # 0.99 * 128 = 126.72 -> 127 fits at -7; 127.5 / 128 rounds (half to even) to 128, clips, so -6
    assert choose_exponent([0.99]) == -7
    assert choose_exponent([127.5 / 128]) == -6
    assert choose_exponent([3.0], bits=4) == -1  # 3 / 2**-2 = 12 > 7; 3 / 2**-1 = 6
    assert choose_exponent(torch.tensor([0.5, -0.25, 1.0])) == -6


def test_choose_exponent_edges():
    assert choose_exponent(np.zeros((3, 3))) == 0  # documented rule for all-zero tensors
    assert choose_exponent(np.zeros(0)) == 0
    assert choose_exponent([2.0**-30]) == -16  # finer than exp_min: raised to exp_min
    assert quantize_weight([2.0**-30], -16)[0].tolist() == [0]
    with pytest.raises(QuantizationError):
        choose_exponent([2.0**30])  # needs exponent 24 > 15
    with pytest.raises(QuantizationError):
        choose_exponent([1.0, float("nan")])


def test_round_half_to_even_and_clip():
    g = 2.0**-6
    m, _ = quantize_weight(np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49]) * g, -6)
    assert m.tolist() == [0, 2, 2, 0, -2, -2, 0]
    m, _ = quantize_weight(np.array([1.0, -1.0, -2.0]), -7)  # fixed exponent: 128 -> 127, -256 -> -128
    assert m.tolist() == [127, -128, -128]


@pytest.mark.parametrize("scale", [1e-3, 0.05, 1.0, 37.0])
def test_round_trip_error_and_minimal_exponent(scale):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 4, 3, 3)) * scale).astype(np.float32)
    m, e = quantize_weight(w)
    assert m.min() >= -128 and m.max() <= 127
    assert np.abs(w - dequantize(m, e)).max() <= 2.0 ** (e - 1)
    m_finer, _ = quantize_weight(w, e - 1)  # one step finer must clip somewhere (the exponent is minimal)
    assert np.abs(w - dequantize(m_finer, e - 1)).max() > 2.0 ** (e - 2)


def test_calibrate_exponents():
    named = {"conv1": np.array([0.5, -0.25, 1.0]), "conv2": np.array([[0.01, -0.02]]), "zero": np.zeros(4)}
    # 0.02 / 2**-12 = 81.92 -> 82 fits; / 2**-13 = 163.84 clips
    assert calibrate_exponents(named) == {"conv1": -6, "conv2": -12, "zero": 0}


def test_fake_quant_equals_export_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 8, 3, 3, generator=g) * 0.3
    for exponent in (None, -8, -5):  # -8 clips the large weights
        m, e = quantize_weight(w, exponent)
        q = fake_quant(w, exponent)
        assert q.dtype == torch.float32
        assert np.array_equal(q.numpy(), dequantize(m, e))
    assert np.array_equal(fake_quant(w, -8).numpy().view(np.int32), dequantize(*quantize_weight(w, -8)).view(np.int32))


def test_fake_quant_straight_through_gradient_is_clamped():
    # e = -6: w / 2**-6 = [6.4, 96, 160, -134.4, -127.36, -128] -> 160 and -134 clip (grad 0), the rest pass
    w = torch.tensor([0.1, 1.5, 2.5, -2.1, -1.99, -2.0], requires_grad=True)
    c = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    (fake_quant(w, -6) * c).sum().backward()
    assert w.grad.tolist() == [1.0, 2.0, 0.0, 0.0, 5.0, 6.0]
    w2 = w.detach().clone().requires_grad_(True)
    fake_quant(w2).sum().backward()  # exponent chosen from the weights: nothing clips, gradient passes everywhere
    assert w2.grad.tolist() == [1.0] * 6


def test_quant_spec():
    spec = QuantSpec()
    assert (spec.weight_bits, spec.state_bits, spec.exp_min, spec.exp_max) == (8, 24, -16, 15)
    assert spec.state_max == VMAX
    with pytest.raises(QuantizationError):
        QuantSpec(rounding="nearest")
    with pytest.raises(QuantizationError):
        QuantSpec(exp_min=3, exp_max=2)


# ------------------------------------------------------------------------------------------------------ neuron


def test_from_float():
    g = 2.0**-6
    n = FixedPointNeuron.from_float(1.0, -6)
    assert (n.threshold_int, n.decay_q12, n.reset, int(n.bias_int)) == (64, 4096, "hard", 0)
    assert FixedPointNeuron.from_float(0.37, -6).threshold_int == 24  # ceil(23.68)
    n = FixedPointNeuron.from_float(1.0, -6, bias=np.array([2.5 * g, -0.5 * g, 3.0]), decay=0.9)
    assert n.bias_int.tolist() == [2, 0, 192] and n.decay_q12 == 3686  # round(0.9 * 4096 = 3686.4)
    for bad in (0.0, -1.0, 2.0**24 * g):
        with pytest.raises(QuantizationError):
            FixedPointNeuron.from_float(bad, -6)


def _h(v, decay_q12, x=0):
    """Pre-reset state of one step, far below threshold."""
    s, v_new, _ = fixed_point_step(np.array([v]), np.array([x]), 10**9, decay_q12)
    assert not s.any()
    return int(v_new[0])


def test_decay_arithmetic_golden():
    assert _h(1000, 2048) == 500
    assert _h(-1001, 2048) == -500  # -1001 * 2048 = -2050048; |.| >> 12 = 500 (toward zero, floor would be -501)
    assert _h(3, 4095) == 2  # 12285 / 4096 = 2.9993
    assert _h(-3, 4095) == -2
    assert _h(100, 3686) == 89  # 368600 / 4096 = 89.99
    assert _h(100, 3686, x=7) == 96
    assert _h(7, 0) == 0
    assert _h(VMAX, 4096) == VMAX and _h(-VMAX, 4096) == -VMAX  # IF: no leak, exact


def test_integer_golden_traces():
    x = np.array([3, 3, 3, 2, -3, 5])[:, None]
    n = FixedPointNeuron(0, 5)
    assert fixed_point_run(x, n)[0][:, 0].tolist() == [0, 1, 0, 1, 0, 0]  # 3 | 6 s | 3 | 5 s | -3 | 2
    n = FixedPointNeuron(0, 5, reset="subtract")
    assert fixed_point_run(x, n)[0][:, 0].tolist() == [0, 1, 0, 1, 0, 0]  # 3 | 6 s -> 1 | 4 | 6 s -> 1 | -2 | 3
    assert fixed_point_run(np.array([[12], [0], [0]]), n)[0][:, 0].tolist() == [1, 1, 0]  # 12 -> 7 -> 2
    n = FixedPointNeuron(0, 100, decay_q12=2048)  # LIF: 80 | 40 + 80 = 120 s | 80 | 40 + 30 = 70
    assert fixed_point_run(np.array([80, 80, 80, 30])[:, None], n)[0][:, 0].tolist() == [0, 1, 0, 0]


def test_saturation_and_counter():
    s, v, sat = fixed_point_step(np.array([8388000, -8388600, 0]), np.array([1000, -100, 5]), 10**8)
    assert v.tolist() == [VMAX, -VMAX, 5] and sat.tolist() == [True, True, False] and not s.any()
    s, v, sat = fixed_point_step(np.array([8388000]), np.array([1000]), VMAX)  # saturated state still fires
    assert s.tolist() == [True] and v.tolist() == [0] and sat.tolist() == [True]
    # IF, 2**22 per step, threshold out of reach: 2**22 | 2**23 -> VMAX (sat) | sat | sat; the other neuron is fine
    x = np.array([[2**22, 1]] * 4)
    spikes, n_sat = fixed_point_run(x, FixedPointNeuron(0, 10**8))
    assert n_sat == 3 and not spikes.any()
    assert fixed_point_run(x, FixedPointNeuron(0, 10**8, state_bits=32))[1] == 0
    assert fixed_point_run_torch(torch.tensor(x), FixedPointNeuron(0, 10**8))[1] == 3


@pytest.mark.parametrize("reset", ["hard", "subtract"])
def test_numpy_torch_step_parity(reset):
    rng = np.random.default_rng(2)
    shape = (4000,)
    v = rng.integers(-VMAX, VMAX + 1, shape)
    x = rng.integers(-(2**24), 2**24, shape)
    thr = rng.integers(1, 2**22, shape)
    for decay_q12 in (0, 1, 2048, 3686, 4095, 4096):
        a = fixed_point_step(v, x, thr, decay_q12, reset)
        b = fixed_point_step(torch.tensor(v), torch.tensor(x), torch.tensor(thr), decay_q12, reset)  # one function
        for u, w in zip(a, b):
            assert np.array_equal(u, w.numpy())
        assert a[2].any() and a[0].any() and not a[0].all()


@pytest.mark.parametrize("decay_q12", [4096, 3000])
def test_numpy_torch_run_parity(decay_q12):
    rng = np.random.default_rng(3)
    x = rng.integers(-(2**21), 2**22, (8, 2, 3, 4, 4))
    n = FixedPointNeuron(-6, 2**22, bias_int=np.array([5, -7, 2**23]), decay_q12=decay_q12, reset="subtract")
    s_np, sat_np = fixed_point_run(x, n)
    s_t, sat_t = fixed_point_run_torch(torch.tensor(x, dtype=torch.int32), n)
    assert np.array_equal(s_np, s_t.numpy()) and sat_np == sat_t > 0 and 0 < s_np.mean() < 1


@pytest.mark.parametrize("reset, theta", [("hard", float(np.float32(0.37))), ("hard", 1.0), ("subtract", 40 / 64)])
def test_quantized_if_reproduces_float_neuron(reset, theta):
    """Conv (on-grid weights and bias) -> IF: the integer neuron fires exactly when the float one does."""
    g = torch.Generator().manual_seed(4)
    num_steps, batch = 6, 2
    s_in = (torch.rand(num_steps, batch, 3, 5, 5, generator=g) < 0.4).float()
    m, e = quantize_weight(torch.randn(4, 3, 3, 3, generator=g) * 0.2)
    neuron = FixedPointNeuron.from_float(theta, e, bias=torch.randn(4, generator=g) * 0.1, reset=reset)
    w_q = torch.from_numpy(dequantize(m, e))
    b_q = torch.from_numpy(dequantize(neuron.bias_int, e))

    x = F.conv2d(s_in.flatten(0, 1), w_q, b_q, padding=1).unflatten(0, (num_steps, batch))
    s_float = multistep_neuron(x, threshold=theta, decay=1.0, reset=reset)

    x_int = F.conv2d(s_in.flatten(0, 1), torch.from_numpy(m.astype(np.float32)), padding=1)
    x_int = x_int.unflatten(0, (num_steps, batch)).round().to(torch.int64)  # exact small integers in float32
    s_np, n_sat = fixed_point_run(x_int.numpy(), neuron)
    s_t, _ = fixed_point_run_torch(x_int, neuron)

    assert n_sat == 0 and 0.05 < s_float.mean().item() < 0.95
    assert np.array_equal(s_np, s_float.numpy().astype(bool))
    assert torch.equal(s_t, s_float.bool())
