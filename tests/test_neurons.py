import math

import pytest
import torch

from neurosdm import kernels
from neurosdm.neurons import SpikingNeurons, atan_grad, leaky_readout, multistep_neuron, neuron_step, rect_grad
from neurosdm.neurons import functional as NF


def column(values):
    """A [num_steps, 1] input trace."""
    return torch.tensor(values, dtype=torch.float32)[:, None]


def test_if_hard_reset_golden_trace():
    # by hand: v: 0 -> .6 (no) -> 1.2 spike -> 0 -> .6 -> 1.0 spike (>=) -> 0 -> -.5 -> .5
    x = column([0.6, 0.6, 0.6, 0.4, -0.5, 1.0])
    s = multistep_neuron(x, threshold=1.0, reset="hard")
    assert s[:, 0].tolist() == [0, 1, 0, 1, 0, 0]


def test_if_subtract_reset_golden_trace():
    # v: .6 | 1.2 -> spike, .2 | .8 | 1.2 -> spike, .2 | -.3 | .7
    x = column([0.6, 0.6, 0.6, 0.4, -0.5, 1.0])
    s = multistep_neuron(x, threshold=1.0, reset="subtract")
    assert s[:, 0].tolist() == [0, 1, 0, 1, 0, 0]
    x = column([2.5, 0.0, 0.0, 0.0])  # subtract keeps the excess: 2.5 -> 1.5 -> .5; hard reset fires once
    assert multistep_neuron(x, reset="subtract")[:, 0].tolist() == [1, 1, 0, 0]
    assert multistep_neuron(x, reset="hard")[:, 0].tolist() == [1, 0, 0, 0]


def test_comparison_is_greater_or_equal():
    x = column([1.0])
    assert multistep_neuron(x, threshold=1.0)[0, 0] == 1
    assert multistep_neuron(column([0.9999]), threshold=1.0)[0, 0] == 0


def test_lif_golden_trace():
    # decay .5: h = .5 v + x: .8 | .4 + .8 = 1.2 spike -> 0 | .8 | .4 + .3 = .7
    x = column([0.8, 0.8, 0.8, 0.3])
    s = multistep_neuron(x, threshold=1.0, decay=0.5, reset="hard")
    assert s[:, 0].tolist() == [0, 1, 0, 0]
    _, v, h = neuron_step(torch.tensor([0.4]), torch.tensor([0.3]), 1.0, decay=0.5)
    assert h.item() == pytest.approx(0.5) and v.item() == pytest.approx(0.5)


def test_no_state_between_calls():
    x = torch.rand(4, 3, 5) * 1.5
    layer = SpikingNeurons()
    assert torch.equal(layer(x), layer(x))


def test_threshold_scale():
    layer = SpikingNeurons(threshold=1.0)
    x = column([0.999])
    assert layer(x)[0, 0] == 0
    layer.threshold_scale = 0.997
    assert layer(x)[0, 0] == 1


def test_surrogate_derivatives():
    x = torch.tensor([-1.0, -0.2, 0.0, 0.3, 2.0])
    expected = 1.0 / (1 + (math.pi * x) ** 2)  # alpha = 2: (alpha/2) / (1 + (pi/2 alpha x)^2)
    assert torch.allclose(atan_grad(x, 2.0), expected)
    # atan_grad is the derivative of arctan(pi/2 alpha x)/pi + 1/2
    xg = x.clone().requires_grad_(True)
    (torch.atan(math.pi / 2 * 2.0 * xg) / math.pi + 0.5).sum().backward()
    assert torch.allclose(xg.grad, atan_grad(x, 2.0))
    assert rect_grad(x, 1.0).tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def _autograd_reference(x, threshold, decay, reset, surrogate, alpha):
    """An independent backward: unrolled autograd with a straight-through surrogate spike function."""
    sg = NF.SURROGATES[surrogate]

    class Spike(torch.autograd.Function):
        @staticmethod
        def forward(ctx, u):
            ctx.save_for_backward(u)
            return (u >= 0).to(u.dtype)

        @staticmethod
        def backward(ctx, g):
            (u,) = ctx.saved_tensors
            return g * sg(u, alpha)

    v = torch.zeros_like(x[0])
    out = []
    for t in range(x.shape[0]):
        h = decay * v + x[t]
        s = Spike.apply(h - threshold)
        v = h * (1 - s) if reset == "hard" else h - threshold * s
        out.append(s)
    return torch.stack(out)


@pytest.mark.parametrize("reset", ["hard", "subtract"])
@pytest.mark.parametrize("surrogate,decay", [("atan", 1.0), ("rect", 0.7)])
def test_fused_backward_matches_unrolled_autograd(reset, surrogate, decay):
    torch.manual_seed(0)
    x = (torch.randn(5, 3, 4, 6) * 0.8 + 0.4).requires_grad_(True)
    w = torch.randn(5, 3, 4, 6)
    s = multistep_neuron(x, 1.0, decay, reset, surrogate, alpha=2.0 if surrogate == "atan" else 1.0)
    (s * w).sum().backward()
    g_fused = x.grad.clone()
    x.grad = None
    s_ref = _autograd_reference(x, 1.0, decay, reset, surrogate, 2.0 if surrogate == "atan" else 1.0)
    (s_ref * w).sum().backward()
    assert torch.equal(s, s_ref)
    assert torch.allclose(g_fused, x.grad, atol=1e-5)


def test_compiled_kernels_equal_eager(monkeypatch):
    torch.manual_seed(1)
    x = torch.randn(4, 2, 8, 5, 5) + 0.5
    thr = torch.tensor(1.0)
    s_c, h_c = kernels.run(NF._forward_loop, x, thr, 1.0, "hard")
    s_e, h_e = NF._forward_loop(x, thr, 1.0, "hard")
    assert torch.equal(s_c, s_e) and torch.equal(h_c, h_e)
    g = torch.randn_like(x)
    b_c = kernels.run(NF._backward_loop, g, h_e, thr, 1.0, "hard", "atan", 2.0)
    b_e = NF._backward_loop(g, h_e, thr, 1.0, "hard", "atan", 2.0)
    assert torch.allclose(b_c, b_e, atol=1e-6)


def test_leaky_readout():
    h = torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None]
    # 0.8^3*1 + 0.8^2*2 + 0.8*3 + 4
    assert leaky_readout(h, 0.8).item() == pytest.approx(0.512 + 1.28 + 2.4 + 4)


def test_bad_reset_rule():
    with pytest.raises(ValueError, match="reset"):
        multistep_neuron(torch.zeros(2, 1), reset="soft")


def test_matches_spikingjelly_ifnode():
    """The SDM/SDDPM code's neuron: spikingjelly's multi-step IFNode (ATan, hard reset to 0, v >= threshold)."""
    try:
        from spikingjelly.activation_based import functional, neuron, surrogate
    except ImportError as e:
        pytest.skip(f"spikingjelly not installed ({e}); `make test` installs it with --no-deps")
    torch.manual_seed(0)
    x = (torch.randn(4, 3, 8, 5, 5) * 0.7 + 0.4).requires_grad_(True)
    w = torch.randn_like(x)
    sj = neuron.IFNode(v_threshold=1.0, surrogate_function=surrogate.ATan(), step_mode="m")
    functional.reset_net(sj)
    s_ref = sj(x)
    (s_ref * w).sum().backward()
    g_ref, x.grad = x.grad.clone(), None
    s = SpikingNeurons(threshold=1.0)(x)
    (s * w).sum().backward()
    assert torch.equal(s, s_ref)
    assert torch.allclose(x.grad, g_ref, atol=1e-5)
