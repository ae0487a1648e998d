"""The fused TSM scale + BatchNorm + add (neurosdm.models.tsm_norm) against the plain ops: outputs, every gradient
(input, TSM scale, gamma, beta, time embedding, residual) and the running statistics, in training and eval mode,
compiled and eager."""

import copy

import pytest
import torch
from torch import nn

from neurosdm.models.spiking_unet import channels_last
from neurosdm.models.tsm_norm import fusable, tsm_batchnorm, tsm_batchnorm_reference

T, B, C, H, W = 3, 4, 5, 6, 7


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = channels_last(torch.randn(T, B, C, H, W, generator=g, dtype=dtype) * 2 + 0.5)
    p = (torch.rand(T, 1, 1, 1, 1, generator=g, dtype=dtype) + 0.5)
    temb = torch.randn(B, C, generator=g, dtype=dtype)
    res = channels_last(torch.randn(T, B, C, H, W, generator=g, dtype=dtype))
    rs = (torch.rand(T, 1, 1, 1, 1, generator=g, dtype=dtype) + 0.5)
    bias, rbias = torch.randn(C, generator=g, dtype=dtype), torch.randn(C, generator=g, dtype=dtype)
    bn = nn.BatchNorm2d(C).to(dtype)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(C, generator=g, dtype=dtype) + 0.5)
        bn.bias.copy_(torch.randn(C, generator=g, dtype=dtype))
        bn.running_mean.copy_(torch.randn(C, generator=g, dtype=dtype))
        bn.running_var.copy_(torch.rand(C, generator=g, dtype=dtype) + 0.5)
    return y, p, temb, res, rs, bias, rbias, bn


def _run(fn, y, p, bn, temb, res, rs, bias, rbias, upstream):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None
              for t in (y, p, temb, res, rs, bias, rbias)]
    y_, p_, temb_, res_, rs_, bias_, rbias_ = leaves
    z = fn(channels_last(y_), p_, bn, temb_, res_, rs_, bias_, rbias_)
    (z * upstream).sum().backward()
    grads = [t.grad if t is not None else None for t in leaves] + [bn.weight.grad, bn.bias.grad]
    return z.detach(), grads


@pytest.mark.parametrize("compiled", ["1", "0"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("with_p,with_temb,with_res,with_rs,with_bias", [
    (True, True, False, False, True), (True, False, True, False, False), (True, False, True, True, True),
    (False, False, False, False, False), (True, True, True, True, False), (False, False, True, False, True)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_fused_equals_plain_ops(monkeypatch, compiled, training, with_p, with_temb, with_res, with_rs,
                                with_bias, dtype, tol):
    monkeypatch.setenv("NEUROSDM_COMPILE", compiled)
    y, p, temb, res, rs, bias, rbias, bn = _inputs(dtype)
    rs = rs if with_rs else None
    bias, rbias = (bias, rbias) if with_bias else (None, None)
    p = p if with_p else None
    temb = temb if with_temb else None
    res = res if with_res else None
    upstream = torch.randn(T, B, C, H, W, generator=torch.Generator().manual_seed(1), dtype=dtype)
    bn_a, bn_b = copy.deepcopy(bn).train(training), copy.deepcopy(bn).train(training)
    assert fusable(channels_last(y), bn_a)
    z_a, g_a = _run(tsm_batchnorm, y, p, bn_a, temb, res, rs, bias, rbias, upstream)
    z_b, g_b = _run(tsm_batchnorm_reference, y, p, bn_b, temb, res, rs, bias, rbias, upstream)
    torch.testing.assert_close(z_a, z_b, rtol=tol, atol=tol)
    assert z_a.permute(0, 1, 3, 4, 2).is_contiguous()  # the output stays channels-last
    names = ("y", "p", "temb", "residual", "residual scale", "bias", "residual bias", "gamma", "beta")
    for name, a, b in zip(names, g_a, g_b):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, float(b.abs().max())), msg=name)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn_a, name), getattr(bn_b, name), rtol=tol, atol=tol, msg=name)


def test_momentum_none_is_the_cumulative_average():
    bn_a, bn_b = nn.BatchNorm2d(C, momentum=None).double(), nn.BatchNorm2d(C, momentum=None).double()
    for seed in range(3):
        y, p, *_ = _inputs(torch.float64, seed)
        tsm_batchnorm(y, p, bn_a)
        tsm_batchnorm_reference(y, p, bn_b)
    torch.testing.assert_close(bn_a.running_var, bn_b.running_var)
    torch.testing.assert_close(bn_a.running_mean, bn_b.running_mean)


def test_other_layouts_take_the_plain_ops():
    y, p, *_, bn = _inputs(torch.float64)
    dense = y.contiguous()  # channels-first
    assert not fusable(dense, bn)
    torch.testing.assert_close(tsm_batchnorm(dense, p, copy.deepcopy(bn)),
                               tsm_batchnorm_reference(dense, p, copy.deepcopy(bn)))
