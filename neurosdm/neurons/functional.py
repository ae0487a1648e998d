"""Spiking neurons as pure functions (torch, float).

Layout: every multi-step tensor is time-first, ``[num_steps, batch, ...]`` (here usually ``[num_steps, B, C, H, W]``).
State is never kept between calls: a multi-step call starts from ``v = v_init`` (0 unless asked; the SDM rule
"reset all neuron state after every network call"), so a network is a pure function of its input. ANN-to-SNN
conversion (:mod:`neurosdm.convert`) starts its neurons at half the threshold, ``v_init = threshold / 2``.

The neuron equation is :mod:`neurosdm.dynamics`' (the one step every simulator runs too), here with ``v_reset = 0``,
no leak term and unit gain::

    h[t] = decay * v[t-1] + x[t]                      charge (decay = 1: integrate-and-fire; decay < 1: LIF)
    s[t] = 1 if h[t] >= threshold else 0              fire (the SDM/spikingjelly comparison, >=)
    v[t] = 0 where s[t], else h[t]                    reset="hard"      (to v_reset = 0)
    v[t] = h[t] - threshold * s[t]                    reset="subtract"  (reset by subtraction)

Gradients use a surrogate for ds/dh (the Heaviside has none): ATan (spikingjelly's default, alpha = 2, used by
the SDM/SDDPM code) or rectangular. As in spikingjelly with ``detach_reset=False``, the gradient also flows
through the reset term.
"""

from __future__ import annotations

import math

import torch

from neurosdm import kernels
from neurosdm.dynamics import Reset, charge, fire, leaky_readout  # noqa: F401  (leaky_readout: part of this API)

RESETS = ("hard", "subtract")


def atan_grad(x: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """Derivative of the ATan surrogate ``sg(x) = arctan(pi/2 * alpha * x) / pi + 1/2``:
    ``sg'(x) = (alpha / 2) / (1 + (pi/2 * alpha * x)**2)``."""
    return (alpha / 2) / (1 + (math.pi / 2 * alpha * x) ** 2)


def rect_grad(x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Derivative of the rectangular surrogate of width ``alpha``: ``sg'(x) = 1/alpha if |x| < alpha/2 else 0``."""
    return (x.abs() < alpha / 2).to(x.dtype) / alpha


SURROGATES = {"atan": atan_grad, "rect": rect_grad}


def neuron_step(v: torch.Tensor, x: torch.Tensor, threshold: float, decay: float = 1.0, reset: str = "hard"):
    """One spiking step of the neuron above (:func:`neurosdm.dynamics.charge` and :func:`~neurosdm.dynamics.fire`).
    Returns ``(s, v_new, h)``: spikes in ``x``'s dtype, the membrane after the reset, the pre-reset membrane ``h``."""
    h = charge(v, x, None if decay == 1.0 else decay)
    s, v_new = fire(h, threshold, 0.0, Reset.parse(reset))
    return s.to(x.dtype), v_new, h


def if_step(v, x, threshold: float = 1.0, reset: str = "hard"):
    """Integrate-and-fire: ``h = v + x; s = [h >= threshold]; v = reset(h, s)``."""
    return neuron_step(v, x, threshold, 1.0, reset)


def lif_step(v, x, decay: float, threshold: float = 1.0, reset: str = "hard"):
    """Leaky integrate-and-fire, decay form: ``h = decay * v + x; s = [h >= threshold]; v = reset(h, s)``.

    For a NIR LIF (``tau dv/dt = (v_leak - v) + R I``, forward Euler with step dt, v_leak = 0):
    ``decay = 1 - dt/tau`` and the input is scaled by ``R dt / tau``.
    """
    return neuron_step(v, x, threshold, decay, reset)


def _forward_loop(x: torch.Tensor, threshold: torch.Tensor, decay: float, reset: Reset, v_init=0.0):
    """All steps of :func:`neuron_step` from ``v = v_init``; returns spikes and pre-reset membranes ``h``."""
    v = torch.zeros_like(x[0]) + v_init
    spikes, hs = [], []
    for t in range(x.shape[0]):
        s, v, h = neuron_step(v, x[t], threshold, decay, reset)
        spikes.append(s)
        hs.append(h)
    return torch.stack(spikes), torch.stack(hs)


def _backward_loop(grad_spikes, hs, threshold: torch.Tensor, decay: float, reset: Reset, surrogate: str,
                   alpha: float):
    """Backward through time of :func:`_forward_loop` (g = surrogate derivative at h[t] - threshold; the spikes
    ``s[t]`` are recomputed from ``h[t]`` by the forward's own rule, :func:`~neurosdm.dynamics.fire`, so that the
    backward pass reads two tensors, not three)::

        dL/dh[t]   = dL/ds[t] * g + dL/dv[t] * dv/dh[t]
        dv/dh[t]   = (1 - s[t]) - h[t] * g      (hard reset; the gradient flows through the reset term)
                   = 1 - threshold * g          (subtract)
        dL/dx[t]   = dL/dh[t];   dL/dv[t-1] = decay * dL/dh[t]
    """
    sg = SURROGATES[surrogate]
    grad_v = torch.zeros_like(hs[0])
    grads = []
    for t in range(hs.shape[0] - 1, -1, -1):
        g = sg(hs[t] - threshold, alpha)
        if reset is Reset.ZERO:
            dv_dh = (1.0 - fire(hs[t], threshold)[0].to(hs.dtype)) - hs[t] * g
        else:
            dv_dh = 1.0 - threshold * g
        grad_h = grad_spikes[t] * g + grad_v * dv_dh
        grads.append(grad_h)
        grad_v = grad_h * decay
    return torch.stack(grads[::-1])


# The loops above are many small element-wise ops; torch.compile fuses them into one pass per step (about 13x
# faster forward+backward on CPU): neurosdm.kernels.run (NEUROSDM_COMPILE=0 runs them eagerly; the parity test
# compares both).


def dense_order(x: torch.Tensor) -> tuple[int, ...]:
    """The order of ``x``'s dimensions in memory, time first: ``x.permute(order)`` is contiguous when ``x`` is
    dense in any layout (e.g. ``[num_steps, B, C, H, W]`` stored channels-last, order ``(0, 1, 3, 4, 2)``).
    The neuron is element-wise over everything but time, so its kernels run on that contiguous view and the
    spikes keep the input's layout (the convolutions after them want channels-last); a layout that is not
    dense (expanded, sliced) gives the identity order and is copied."""
    rest = sorted(range(1, x.dim()), key=lambda d: -x.stride(d))
    order = (0, *rest)
    return order if x.permute(order).is_contiguous() else tuple(range(x.dim()))


def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(order)
    for i, d in enumerate(order):
        inv[d] = i
    return tuple(inv)


class _MultiStepNeuron(torch.autograd.Function):
    """Fused multi-step neuron: forward without autograd bookkeeping, hand-written backward through time. The
    kernels run on the input's memory order (:func:`dense_order`); spikes and gradients keep the input's layout."""

    @staticmethod
    def forward(ctx, x, threshold, decay, reset, surrogate, alpha, v_init):
        order = dense_order(x)
        spikes, hs = kernels.run(_forward_loop, x.permute(order).contiguous(), threshold, decay, reset, v_init)
        ctx.save_for_backward(hs, threshold)
        ctx.params = (decay, reset, surrogate, alpha, order)
        return spikes.permute(_inverse(order))

    @staticmethod
    def backward(ctx, grad_spikes):
        hs, threshold = ctx.saved_tensors
        decay, reset, surrogate, alpha, order = ctx.params
        grad = grad_spikes.permute(order).contiguous()
        grad_x = kernels.run(_backward_loop, grad, hs, threshold, decay, reset, surrogate, alpha)
        return grad_x.permute(_inverse(order)), None, None, None, None, None, None


def multistep_neuron(
    x: torch.Tensor,
    threshold: float = 1.0,
    decay: float = 1.0,
    reset: str = "hard",
    surrogate: str = "atan",
    alpha: float = 2.0,
    v_init: float = 0.0,
) -> torch.Tensor:
    """Run the neuron over ``x`` of shape ``[num_steps, batch, ...]`` from ``v = v_init`` (an absolute membrane
    value, 0 by default); return the spikes (same shape, same dtype, values 0/1). Differentiable through the
    surrogate (``v_init`` is a constant: the backward pass of :func:`_backward_loop` does not depend on it)."""
    if reset not in RESETS:
        raise ValueError(f"reset must be one of {RESETS}, got {reset!r}")
    reset = Reset.parse(reset)
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate must be one of {tuple(SURROGATES)}, got {surrogate!r}")
    # the threshold travels as a 0-d tensor so that threshold guidance does not recompile the kernels
    thr = torch.tensor(float(threshold), dtype=x.dtype, device=x.device)
    v0 = torch.tensor(float(v_init), dtype=x.dtype, device=x.device)
    if torch.is_grad_enabled() and x.requires_grad:
        return _MultiStepNeuron.apply(x, thr, float(decay), reset, surrogate, float(alpha), v0)
    order = dense_order(x)
    spikes = kernels.run(_forward_loop, x.permute(order).contiguous(), thr, float(decay), reset, v0)[0]
    return spikes.permute(_inverse(order))


def qcfs(x: torch.Tensor, clip: torch.Tensor, levels: int) -> torch.Tensor:
    """Quantisation clip-floor-shift activation (QCFS, Bu et al., ICLR 2022), the ANN side of ANN-to-SNN conversion::

        y = clip / L * clamp(floor(x * L / clip + 1/2), 0, L),        L = levels = 2**bits - 1

    computed as ``clip * clamp(floor_st(x / clip * L + 1/2) / L, 0, 1)`` with a straight-through floor
    (``floor_st(z) = floor(z)`` forward, ``d floor_st / dz = 1`` backward), so autograd gives QCFS's gradients::

        dy/dx    = 1 where 0 <= floor(x L / clip + 1/2) <= L, else 0
        dy/dclip = y / clip - x / clip   in that range;   1 above it (y = clip);   0 below it (y = 0)

    An IF neuron with threshold ``clip``, membrane starting at ``clip / 2``, reset by subtraction and a constant
    input ``x`` emits exactly ``clamp(floor(x L / clip + 1/2), 0, L)`` spikes in ``L`` steps, so its rate times
    ``clip`` is ``y`` (:mod:`neurosdm.convert`; a test checks it)."""
    z = x / clip * levels + 0.5
    z = z + (torch.floor(z) - z).detach()
    return clip * torch.clamp(z / levels, 0.0, 1.0)
