"""neurosdm.loihi: fixed-point neuron -> Lava/Loihi LIF parameters (hand values), and the Lava-unit twin checked
against an independent transcription of Lava's bit-accurate LIF update (lava.proc.lif.models.PyLifModelBitAcc)."""

import nir
import numpy as np
import pytest

from neurosdm.errors import QuantizationError
from neurosdm.loihi import loihi_params, loihi_params_from_neuron, loihi_params_from_nir
from neurosdm.quantize import FixedPointNeuron, fixed_point_step


def test_integrate_and_fire_hand_values():
    p = loihi_params(512)
    assert (p.du, p.dv, p.vth, p.bias_exp) == (4095, 0, 511, 6)
    assert p.effective_threshold == 511 * 64 and int(p.bias_mant) == 0
    assert p.netx_neuron() == {"type": "CUBA", "iDecay": 4096, "vDecay": 0, "vThMant": 511, "refDelay": 1,
                               "gradedSpike": False}


def test_leak_bias_and_current_hand_values():
    p = loihi_params(3, decay_q12=3686, bias_int=np.array([3, -5, 4095]), current_decay_q12=3277)
    assert (p.du, p.dv, p.vth) == (818, 410, 2)
    assert p.bias_exp == 6 and p.bias_mant.tolist() == [3, -5, 4095]
    assert p.effective_bias.tolist() == [192, -320, 4095 * 64]
    big = loihi_params(1, bias_int=[5000, -8190])  # above 13 bits at exponent 6, even: exponent 7
    assert big.bias_exp == 7 and big.bias_mant.tolist() == [2500, -4095]
    assert big.effective_bias.tolist() == [5000 * 64, -8190 * 64]
    with pytest.raises(QuantizationError, match="exponent 6"):
        big.netx_neuron()
    assert loihi_params(2 ** 17).vth == 2 ** 17 - 1  # the largest 17-bit threshold mantissa


@pytest.mark.parametrize("kwargs,match", [
    (dict(threshold_int=0), "outside Loihi's 1..131072"),
    (dict(threshold_int=2 ** 17 + 1), "outside Loihi's 1..131072"),
    (dict(threshold_int=[4, 5]), "one threshold per layer"),
    (dict(threshold_int=4.5), "integers"),
    (dict(threshold_int=4, decay_q12=0), "decay 0"),
    (dict(threshold_int=4, decay_q12=[4000, 4096]), "one decay per layer"),
    (dict(threshold_int=4, reset="subtract"), "resets the voltage to 0"),
    (dict(threshold_int=4, current_decay_q12=4096), "never decays"),
    (dict(threshold_int=4, bias_int=[5001]), "13-bit"),
    (dict(threshold_int=4, bias_int=[9000]), "13-bit"),
    (dict(threshold_int=4, bias_int=[0.5]), "integers"),
])
def test_what_loihi_cannot_represent(kwargs, match):
    with pytest.raises(QuantizationError, match=match):
        loihi_params(name="layer7", **kwargs)


def test_from_fixed_point_neuron():
    n = FixedPointNeuron.from_float(threshold=1.0, weight_exponent=-9, bias=[0.01, -0.5], decay=0.9)
    p = loihi_params_from_neuron(n, name="blk.if")
    assert (p.du, p.dv, p.vth, p.unit_exponent) == (4095, 4096 - 3686, 511, -9)
    assert p.bias_mant.tolist() == [5, -256] and p.bias_exp == 6  # round(5.12) = 5, -0.5 * 512
    twin = p.lava_units()
    assert (twin.threshold_int, twin.decay_q12, twin.weight_exponent) == (511 * 64 + 1, 3686, -15)
    assert twin.bias_int.tolist() == [5 * 64, -256 * 64]
    with pytest.raises(QuantizationError, match="24-bit"):
        loihi_params_from_neuron(FixedPointNeuron(0, 4, state_bits=16))
    with pytest.raises(QuantizationError, match="du = 818"):
        loihi_params(3, current_decay_q12=3277).lava_units()


def test_from_nir_nodes():
    shape = (2, 3, 3)
    one = np.ones(shape)
    p = loihi_params_from_nir(nir.IF(r=one, v_threshold=one, v_reset=0 * one), unit_exponent=-9,
                              bias=np.array([0.25, -0.125]))
    assert (p.du, p.dv, p.vth) == (4095, 0, 511) and p.bias_mant.tolist() == [128, -64]
    lif = nir.LIF(tau=10 * one, r=10 * one, v_leak=0 * one, v_threshold=3 * one, v_reset=0 * one)
    p = loihi_params_from_nir(lif)
    assert (p.du, p.dv, p.vth) == (4095, 4096 - 3686, 2)
    leak = nir.LIF(tau=10 * one, r=10 * one, v_leak=20 * one, v_threshold=3 * one, v_reset=0 * one)
    assert loihi_params_from_nir(leak).bias_mant.tolist() == [2, 2]  # v_leak dt / tau per step, per channel
    cuba = nir.CubaLIF(tau_syn=5 * one, tau_mem=10 * one, r=10 * one, v_leak=0 * one, v_threshold=3 * one,
                       v_reset=0 * one, w_in=5 * one)
    p = loihi_params_from_nir(cuba)
    assert (p.du, p.dv, p.vth) == (4095 - 3277, 4096 - 3686, 2)
    with pytest.raises(QuantizationError, match="gain r dt / tau_mem is 0.1"):
        loihi_params_from_nir(nir.LIF(tau=10 * one, r=one, v_leak=0 * one, v_threshold=one, v_reset=0 * one))
    with pytest.raises(QuantizationError, match="v_reset must be 0"):
        loihi_params_from_nir(nir.IF(r=one, v_threshold=one, v_reset=one))
    with pytest.raises(QuantizationError, match="subtraction"):
        loihi_params_from_nir(nir.IF(r=one, v_threshold=one, v_reset=0 * one), reset="subtract")
    with pytest.raises(QuantizationError, match="no Loihi LIF form"):
        loihi_params_from_nir(nir.LI(tau=one, r=one, v_leak=0 * one))


def _lava_bit_acc(a, p, steps):
    """Lava's PyLifModelBitAcc, transcribed independently of neurosdm.quantize (du = 4095: u = a << 6)."""
    v = np.zeros(a.shape[1:], np.int64)
    lim = 2 ** 23 - 1
    out_s, out_v = [], []
    for t in range(steps):
        u = a[t].astype(np.int64) << 6
        prod = v * (4096 - p.dv)
        decayed = np.sign(prod) * np.right_shift(np.abs(prod), 12)
        v = np.clip(decayed + u + (p.bias_mant.astype(np.int64) << p.bias_exp), -lim, lim)
        s = v > (p.vth << 6)
        v = np.where(s, 0, v)
        out_s.append(s)
        out_v.append(v)
    return np.stack(out_s), np.stack(out_v)


@pytest.mark.parametrize("decay_q12", [4096, 3686, 1000])
def test_lava_unit_twin_is_bit_exact_with_lavas_update(decay_q12):
    rng = np.random.default_rng(decay_q12)
    steps, shape = 12, (3, 40)
    a = rng.integers(-400, 700, size=(steps, *shape))
    a[:, 0, :5] = -120000  # drives v into the negative 24-bit clip (a positive drive fires and resets)
    p = loihi_params(300, decay_q12, rng.integers(-60, 60, size=(3, 1)))
    s_lava, v_lava = _lava_bit_acc(a, p, steps)
    twin = p.lava_units()
    v = np.zeros(shape, np.int64)
    sat = 0
    for t in range(steps):
        s, v, sat_t = fixed_point_step(v, (a[t] << 6) + twin.bias_int, twin.threshold_int, twin.decay_q12,
                                       twin.reset, twin.state_bits)
        sat += int(sat_t.sum())
        assert np.array_equal(s, s_lava[t]) and np.array_equal(v, v_lava[t]), t
    assert sat > 0 and s_lava.any() and not s_lava.all()


def test_integrate_and_fire_in_neurosdm_units_equals_lava():
    """dv = 0: Lava's state is 64 times neurosdm's, so the neuron in neurosdm's own units fires identically."""
    rng = np.random.default_rng(1)
    steps, shape = 10, (4, 30)
    a = rng.integers(-300, 500, size=(steps, *shape))
    bias = rng.integers(-50, 50, size=(4, 1))
    p = loihi_params(700, 4096, bias)
    s_lava, v_lava = _lava_bit_acc(a, p, steps)
    v = np.zeros(shape, np.int64)
    for t in range(steps):
        s, v, _ = fixed_point_step(v, a[t] + bias, 700)
        assert np.array_equal(s, s_lava[t]) and np.array_equal(v * 64, v_lava[t])
