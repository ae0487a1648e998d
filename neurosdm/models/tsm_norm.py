"""TSM scale, BatchNorm and the adds after it in two passes over memory forward and two backward.

The spiking UNet follows every conv of its ResBlocks with ``z = BN(y * p[t]) + extra``: the TSM scale of step t,
a BatchNorm whose statistics pool all steps, then the time embedding (per sample and channel) or the residual
(a whole tensor). As separate ops that is a multiply, the BN's statistics and normalisation, and an add, each
reading and writing the activation (and as many passes again backward): on a CPU these passes, not the
convolutions, made the training step slower than the public code at the larger shapes (issue 18's profile).

Here the statistics come per step and channel in one pass (``m[t, c]``, ``v[t, c]`` over batch and pixels, in
float32 or float64) and pool exactly: with ``N`` elements per channel, ``T`` equal groups,
``mean = (1/T) sum_t p_t m_t`` and ``var = (1/T) sum_t (p_t^2 v_t + (p_t m_t - mean)^2)`` (biased; the running
variance gets the unbiased ``var * N / (N - 1)``, as ``nn.BatchNorm2d``). The output is one affine pass,
``z = y * A[t, c] + B[t, b, c] (+ residual)`` with ``A = p_t gamma invstd``, ``B = beta - mean gamma invstd
(+ temb[b, c])``. Backward, with ``x = p_t y``, ``k = gamma invstd`` and the per-step sums ``G1[t, c] = sum g``,
``G2[t, c] = sum g y`` (one pass; ``S1``, ``S2`` the forward's ``sum y``, ``sum y^2``)::

    dbeta = sum_t G1          dgamma = invstd sum_t (p_t G2 - mean G1)          dtemb[b, c] = sum_{t, pixels} g
    dy    = p_t k (g - dbeta/N - xhat dgamma/N)  = g * alpha[t, c] + y * beta[t, c] + delta[t, c]      (one pass)
    dp_t  = sum_c k (G2 - dbeta/N S1 - invstd dgamma/N (p_t S2 - mean S1))

(in eval mode the statistics are the running ones and do not depend on ``y``: the ``dbeta``, ``dgamma`` terms of
``dy`` and ``dp`` drop). The convolution's bias is a per-channel constant: ``y`` arrives without it, the formulas
hold for ``y + bias`` (the shift moves ``m_t``, ``G2``, ``S1``, ``S2`` and ``B``; ``dbias = sum_t (alpha G1 + beta
S1 + delta n_t)``), and the conv's backward skips its bias reduction. A residual from a 1x1 shortcut conv joins the
same way, ``+ (r + rbias) * rs[t]`` (its TSM scale and bias), ``dr = g rs[t]`` written in the pass that writes
``dy``, ``drs_t`` from ``sum g r`` taken with ``G1``, ``G2``. The passes are :mod:`neurosdm.kernels` (compiled).
Activations must be channels-last (the model's layout, :func:`~neurosdm.models.spiking_unet.channels_last`); any
other layout, or a BatchNorm without affine parameters or running statistics, takes the plain ops
(:func:`tsm_batchnorm_reference`, also the parity tests' oracle)."""

from __future__ import annotations

import torch
from torch import nn

from neurosdm import kernels


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stats(y4):
    """Per-step, per-channel variance (biased) and mean of ``y4 [T, B, HW, C]``."""
    return torch.var_mean(y4.to(_acc(y4.dtype)), dim=(1, 2), correction=0)


def _affine(y4, a, b):
    return (y4 * a + b).to(y4.dtype)


def _affine_residual(y4, a, b, r4, rs):
    return (y4 * a + b + r4 * rs).to(y4.dtype)


def _grad_sums(g4, y4):
    """``sum over pixels of g`` per step, sample and channel ``[T, B, C]`` and ``sum of g y`` per step and channel."""
    acc = _acc(y4.dtype)
    g = g4.to(acc)
    return g.sum(2), (g * y4.to(acc)).sum((1, 2))


def _grad_sums_residual(g4, y4, r4):
    """:func:`_grad_sums` and ``sum of g r`` per step and channel (the gradient of a scaled residual's scale)."""
    acc = _acc(y4.dtype)
    g = g4.to(acc)
    return g.sum(2), (g * y4.to(acc)).sum((1, 2)), (g * r4.to(acc)).sum((1, 2))


def _grad_input(g4, y4, al, be, de):
    acc = _acc(y4.dtype)
    return (g4.to(acc) * al + y4.to(acc) * be + de).to(y4.dtype)


def _grad_input_residual(g4, y4, al, be, de, rs):
    acc = _acc(y4.dtype)
    g = g4.to(acc)
    return (g * al + y4.to(acc) * be + de).to(y4.dtype), (g * rs).to(g4.dtype)


def _pixels_last(x: torch.Tensor) -> torch.Tensor:
    """``[T, B, C, H, W]`` (channels-last) as the ``[T, B, H*W, C]`` view of its memory; a copy for other layouts."""
    T, B, C, H, W = x.shape
    return x.permute(0, 1, 3, 4, 2).reshape(T, B, H * W, C)


def _channels_back(x4: torch.Tensor, shape) -> torch.Tensor:
    T, B, C, H, W = shape
    return x4.view(T, B, H, W, C).permute(0, 1, 4, 2, 3)


class _TSMBatchNorm(torch.autograd.Function):
    """The fused function; every small per-step/per-channel tensor is in the accumulation dtype (:func:`_acc`).
    ``y`` and ``residual`` come without their convolutions' biases (``bias``, ``rbias``): a bias is a per-channel
    constant, folded into the affine pass, and its gradient comes from the sums the backward computes anyway, so
    the convolutions' backward passes skip their own bias reductions."""

    @staticmethod
    def forward(ctx, y, p, bias, gamma, beta, temb, residual, rscale, rbias, bn):
        T, B, C, H, W = y.shape
        acc, dev = _acc(y.dtype), y.device

        def vec(t, n):
            return t.reshape(n).to(acc) if t is not None else None

        y4 = _pixels_last(y)
        ps = vec(p, T) if p is not None else torch.ones(T, dtype=acc, device=dev)
        ps = ps[:, None]
        cb = vec(bias, C) if bias is not None else torch.zeros(C, dtype=acc, device=dev)
        n = B * H * W * T
        m_t = v_t = None
        if bn.training:
            v_t, m_t = kernels.run(_stats, y4)
            m_t = m_t + cb  # the statistics of y + bias
            mean = (ps * m_t).mean(0)
            var = (ps * ps * v_t + (ps * m_t - mean) ** 2).mean(0)
            with torch.no_grad():
                _update_running(bn, mean, var, n)
        else:
            mean, var = bn.running_mean.to(acc), bn.running_var.to(acc)
        invstd = torch.rsqrt(var + bn.eps)
        k = gamma.to(acc) * invstd
        a = ps * k  # [T, C]
        b = beta.to(acc) - mean * k + cb * a
        r4 = rs = rb = None
        if residual is not None:
            r4 = _pixels_last(residual)
            rs = vec(rscale, T) if rscale is not None else torch.ones(T, dtype=acc, device=dev)
            if rbias is not None:
                rb = vec(rbias, C)
                b = b + rs[:, None] * rb
        b = b[:, None, None, :]
        if temb is not None:
            b = b + temb.to(acc)[None, :, None, :]
        scaled = rscale is not None
        if r4 is not None:
            z4 = kernels.run(_affine_residual, y4, a[:, None, None, :], b, r4, rs[:, None, None, None])
        else:
            z4 = kernels.run(_affine, y4, a[:, None, None, :], b)
        ctx.save_for_backward(y4, r4 if scaled else None, ps, cb, k, invstd, mean, m_t, v_t, rs, rb)
        ctx.info = (y.shape, bn.training, n, temb is not None, residual is not None)
        ctx.like = {i: (t.shape, t.dtype) for i, t in enumerate((y, p, bias, gamma, beta, temb, residual, rscale,
                                                                  rbias)) if t is not None}
        return _channels_back(z4, y.shape)

    @staticmethod
    def backward(ctx, g):
        y4, r4, ps, cb, k, invstd, mean, m_t, v_t, rs, rb = ctx.saved_tensors
        shape, training, n, has_temb, has_res = ctx.info
        need = ctx.needs_input_grad
        g4 = _pixels_last(g).contiguous()
        if r4 is not None:
            gb, g2, gr = kernels.run(_grad_sums_residual, g4, y4, r4)
        else:
            gb, g2 = kernels.run(_grad_sums, g4, y4)
        g1 = gb.sum(1)  # [T, C]
        g2 = g2 + cb * g1  # sum of g (y + bias)
        dbeta = g1.sum(0)
        dgamma = invstd * (ps * g2 - mean * g1).sum(0)
        al = ps * k
        zero = torch.zeros_like(al)
        be = -ps * ps * k * invstd * dgamma / n if training else zero
        de = ps * k * (mean * invstd * dgamma - dbeta) / n if training else zero
        coef = (al[:, None, None, :], be[:, None, None, :], (de + cb * be)[:, None, None, :])
        grads = [None] * 10
        if r4 is not None:
            dy4, dr4 = kernels.run(_grad_input_residual, g4, y4, *coef, rs[:, None, None, None])
            grads[6] = _channels_back(dr4, shape)
        else:
            dy4 = kernels.run(_grad_input, g4, y4, *coef)
            grads[6] = g if has_res else None
        grads[0] = _channels_back(dy4, shape)
        per_t = n // len(ps)
        s1 = m_t * per_t if training else None  # sum of (y + bias) per step and channel
        if need[1]:
            dp_c = g2
            if training:
                s2 = (v_t + m_t * m_t) * per_t
                dp_c = g2 - dbeta / n * s1 - invstd * dgamma / n * (ps * s2 - mean * s1)
            grads[1] = (k * dp_c).sum(1)
        if need[2]:
            grads[2] = (al * g1 + (be * s1 + de * per_t if training else 0)).sum(0)
        grads[3], grads[4] = dgamma, dbeta
        if has_temb:
            grads[5] = gb.sum(0)
        if r4 is not None:
            grads[7] = (gr + (rb * g1 if rb is not None else 0)).sum(1)
        if rb is not None:
            grads[8] = (rs[:, None] * g1).sum(0)
        for i in (1, 2, 3, 4, 5, 7, 8):  # back to the shapes and dtypes of the inputs
            if grads[i] is not None:
                shp, dt = ctx.like[i]
                grads[i] = grads[i].reshape(shp).to(dt)
        return tuple(grads)


def _update_running(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
    """``nn.BatchNorm2d``'s running-statistics update: momentum (or the cumulative average when it is None), the
    unbiased variance."""
    if not bn.track_running_stats:
        return
    bn.num_batches_tracked.add_(1)
    f = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    bn.running_mean.mul_(1 - f).add_(mean.to(bn.running_mean.dtype), alpha=f)
    bn.running_var.mul_(1 - f).add_((var * n / max(n - 1, 1)).to(bn.running_var.dtype), alpha=f)


def tsm_batchnorm_reference(y, p, bn: nn.BatchNorm2d, temb=None, residual=None, residual_scale=None, bias=None,
                            residual_bias=None):
    """The same result with plain ops: ``BN((y + bias) * p[t]) + temb[None, :, :, None, None]
    + (residual + residual_bias) * residual_scale[t]``."""

    def channel(v, like):
        return v.to(like.dtype)[None, None, :, None, None]

    x = y if bias is None else y + channel(bias, y)
    x = x if p is None else x * p.to(x.dtype)
    z = nn.BatchNorm2d.forward(bn, x.flatten(0, 1)).reshape(x.shape)  # the 2-D BN on time folded into batch
    if temb is not None:
        z = z + temb[None, :, :, None, None]
    if residual is None:
        return z
    if residual_bias is not None:
        residual = residual + channel(residual_bias, residual)
    if residual_scale is not None:
        residual = residual * residual_scale.to(residual.dtype)
    return z + residual


def fusable(y: torch.Tensor, bn: nn.BatchNorm2d) -> bool:
    """The fused kernels apply: channels-last ``[T, B, C, H, W]`` input, an affine BN with running statistics."""
    if y.dim() != 5 or not bn.affine or bn.running_mean is None:
        return False
    return y.permute(0, 1, 3, 4, 2).is_contiguous()


def tsm_batchnorm(y, p, bn: nn.BatchNorm2d, temb=None, residual=None, residual_scale=None, bias=None,
                  residual_bias=None):
    """``BN((y + bias) * p[t]) + temb[None, :, :, None, None] + (residual + residual_bias) * residual_scale[t]``
    (all but ``y`` and ``bn`` optional; ``bias`` and ``residual_bias`` per channel) for ``y [T, B, C, H, W]``:
    the fused passes of the module docstring, or the plain ops where they do not apply."""
    if residual is None:
        residual_scale = residual_bias = None
    if not fusable(y, bn) or (residual is not None and (residual.shape != y.shape or residual.dtype != y.dtype)):
        return tsm_batchnorm_reference(y, p, bn, temb, residual, residual_scale, bias, residual_bias)
    return _TSMBatchNorm.apply(y, p, bias, bn.weight, bn.bias, temb, residual, residual_scale, residual_bias, bn)
