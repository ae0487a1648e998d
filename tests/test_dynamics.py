"""neurosdm.dynamics: one neuron step for numpy and torch, checked by hand and between the two."""

import numpy as np
import pytest
import torch

from neurosdm.dynamics import (NeuronParams, Reset, coefficients, fixed_point_step, leaky_readout, neuron_update,
                               parse_method)
from neurosdm.errors import ConfigError


def test_reset_spellings():
    assert Reset.parse("hard") is Reset.ZERO and Reset.parse("Zero") is Reset.ZERO
    assert Reset.parse("soft") is Reset.SUBTRACT and Reset.parse(Reset.SUBTRACT) is Reset.SUBTRACT
    assert parse_method("forward_euler") == "euler" and parse_method("zoh") == "exp"
    with pytest.raises(ConfigError, match="unknown reset"):
        Reset.parse("sideways")


def test_coefficients_by_hand():
    assert coefficients(4.0, 2.0, 1.0, "euler") == (0.75, 0.5)
    decay, gain = coefficients(np.array([2.0]), np.array([3.0]), 1.0, "exp")
    assert decay[0] == pytest.approx(np.exp(-0.5)) and gain[0] == pytest.approx((1 - np.exp(-0.5)) * 3.0)


def test_if_step_by_hand():
    p = NeuronParams(threshold=np.array([1.0, 1.0, 1.0]), reset=Reset.ZERO)
    y, v, s = neuron_update(p, np.array([0.4, 1.0, 2.5]), np.array([0.5, 0.0, 0.0]))
    assert y.tolist() == [0.0, 1.0, 1.0] and v.tolist() == [0.9, 0.0, 0.0] and s.dtype == bool
    p.reset = Reset.SUBTRACT
    p.v_reset = np.array([-0.5, -0.5, -0.5])  # removes threshold - v_reset = 1.5
    _, v, _ = neuron_update(p, np.array([0.4, 1.0, 2.5]), np.array([0.5, 0.0, 0.0]))
    assert v.tolist() == [0.9, -0.5, 1.0]


def _params(rng, shape, cuba, spiking, reset, strict, to):
    def arr(lo, hi):
        return to(rng.uniform(lo, hi, shape))

    p = NeuronParams(decay=arr(0.5, 1.0), gain=arr(0.5, 2.0), leak=arr(-0.1, 0.1), reset=reset, strict=strict,
                     cuba=cuba)
    if cuba:
        p.syn_decay, p.syn_gain = arr(0.2, 1.0), arr(0.5, 1.5)
    if spiking:
        p.threshold, p.v_reset = arr(0.5, 1.5), arr(-0.3, 0.0)
    return p


@pytest.mark.parametrize("cuba", [False, True])
@pytest.mark.parametrize("spiking", [False, True])
@pytest.mark.parametrize("reset", list(Reset))
@pytest.mark.parametrize("strict", [False, True])
def test_numpy_and_torch_run_the_same_step(cuba, spiking, reset, strict):
    shape = (3, 50)
    p_np = _params(np.random.default_rng(0), shape, cuba, spiking, reset, strict, lambda a: a)
    p_t = p_np.map(torch.as_tensor)
    rng = np.random.default_rng(1)
    s_np = (np.zeros(shape), np.zeros(shape)) if cuba else np.zeros(shape)
    s_t = (torch.zeros(shape, dtype=torch.float64),) * 2 if cuba else torch.zeros(shape, dtype=torch.float64)
    fired = 0
    for _ in range(6):
        x = rng.normal(0.3, 1.0, shape)
        y_np, s_np, f_np = neuron_update(p_np, x, s_np)
        y_t, s_t, f_t = neuron_update(p_t, torch.as_tensor(x), s_t)
        assert np.array_equal(y_np, y_t.numpy())  # bit for bit: the same operations in the same order
        if spiking:
            assert np.array_equal(f_np, f_t.numpy())
            fired += int(f_np.sum())
        else:
            assert f_np is None and f_t is None
    assert not spiking or 0 < fired < 6 * 150


@pytest.mark.parametrize("reset", ["hard", "subtract"])
def test_fixed_point_step_by_hand(reset):
    # decay 3072/4096 of -7 is -5.25 -> toward zero: -5; 100 saturates at 2**3 - 1 = 7 (4-bit state)
    s, v, sat = fixed_point_step(np.array([-7, 0, 3]), np.array([0, 100, 2]), 5, 3072, reset, state_bits=4)
    assert s.tolist() == [False, True, False] and sat.tolist() == [False, True, False]
    assert v.tolist() == [-5, 0 if reset == "hard" else 2, 4]


def test_leaky_readout_numpy_and_torch():
    h = np.arange(12.0).reshape(4, 3)
    assert np.array_equal(leaky_readout(h, 0.5), leaky_readout(torch.as_tensor(h), 0.5).numpy())
    assert leaky_readout(h, 0.5)[0] == 0.125 * 0 + 0.25 * 3 + 0.5 * 6 + 9
