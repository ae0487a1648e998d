"""The model's fast path (channels-last activations, one stem convolution, the neuron kernels on the input's memory
order) against a plain computation of the same network: the public code's order of operations, channels-first,
the stem conv on the image repeated over the spiking steps, and an unrolled autograd neuron (spikingjelly's rule:
hard reset, ``h >= threshold``, ATan surrogate, gradient through the reset). Outputs, every parameter gradient
and the input gradient agree to float rounding. In float64, so that no membrane sits close enough to the
threshold for a rounding to flip a spike; in float32, on a batch where none does."""

import math

import pytest
import torch
import torch.nn.functional as F

from neurosdm.config import ModelConfig
from neurosdm.models import SpikingUNet
from neurosdm.models.spiking_unet import DownSample, ResBlock, UpSample
from neurosdm.neurons import multistep_neuron
from neurosdm.neurons.functional import dense_order

CFG = dict(img_ch=3, image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, num_steps=3, num_diffusion_steps=20)


class _Spike(torch.autograd.Function):
    """Heaviside forward, ATan surrogate (alpha 2) backward: ``(alpha/2) / (1 + (pi/2 alpha u)^2)``."""

    @staticmethod
    def forward(ctx, u):
        ctx.save_for_backward(u)
        return (u >= 0).to(u.dtype)

    @staticmethod
    def backward(ctx, g):
        (u,) = ctx.saved_tensors
        return g / (1 + (math.pi * u) ** 2)


def _if_neurons(x, threshold=1.0):
    v, out = torch.zeros_like(x[0]), []
    for t in range(x.shape[0]):
        h = v + x[t]
        s = _Spike.apply(h - threshold)
        v = h * (1 - s)
        out.append(s)
    return torch.stack(out)


def _reference(m: SpikingUNet, x, t):
    """The plain forward (channels-first, as the public Spk_UNet_TSM computes it)."""
    T = m.cfg.num_steps

    def conv(c, h):
        y = F.conv2d(h.flatten(0, 1), c.weight, c.bias, c.stride, c.padding)
        y = y.reshape(T, -1, *y.shape[1:])
        return y * c.tsmp if c.tsmp is not None else y

    def bn(b, h):
        return F.batch_norm(h.flatten(0, 1), b.running_mean, b.running_var, b.weight, b.bias, True, b.momentum,
                            b.eps).reshape(h.shape)

    temb = m.time_embedding(t)
    h = bn(m.bn, conv(m.conv, x.unsqueeze(0).repeat(T, 1, 1, 1, 1)))
    h = bn(m.bn_identity, conv(m.conv_identity, _if_neurons(h)))
    hs = [h]

    def block(layer, h):
        if isinstance(layer, ResBlock):
            y = bn(layer.bn1, conv(layer.conv1, _if_neurons(h))) + layer.temb_proj(temb)[None, :, :, None, None]
            y = bn(layer.bn2, conv(layer.conv2, _if_neurons(y)))
            return y + (conv(layer.shortcut, h) if not isinstance(layer.shortcut, torch.nn.Identity) else h)
        s = _if_neurons(h)
        if isinstance(layer, UpSample):
            s = F.interpolate(s.flatten(0, 1), scale_factor=2, mode="nearest").reshape(T, s.shape[1], s.shape[2],
                                                                                        *[2 * d for d in s.shape[3:]])
        assert isinstance(layer, (UpSample, DownSample))
        return bn(layer.bn, conv(layer.conv, s))

    for layer in m.downblocks:
        h = block(layer, h)
        hs.append(h)
    for layer in m.middleblocks:
        h = block(layer, h)
    for layer in m.upblocks:
        if isinstance(layer, ResBlock):
            h = torch.cat([h, hs.pop()], dim=2)
        h = block(layer, h)
    h = conv(m.tail_conv, F.silu(bn(m.tail_bn, h)))
    w = m.T_output_layer.weight[..., 0]
    y = F.conv2d(h.flatten(0, 1), w, m.T_output_layer.bias, padding=1).reshape(h.shape)
    h = F.silu(bn(m.last_bn, y)) + h
    return sum(0.8 ** (T - 1 - k) * h[k] for k in range(T))


def _perturbed(dtype, seed=0):
    torch.manual_seed(seed)
    m = SpikingUNet(ModelConfig(tsm=True, **CFG)).to(dtype)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("tsmp"):
                p.mul_(1 + 0.2 * torch.randn_like(p))
            elif p.requires_grad and "weight" in name and p.dim() > 1:
                p.add_(0.3 * torch.randn_like(p) / math.sqrt(p[0].numel()))
            elif p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    return m.train()


def _run(model, forward, x, t):
    x = x.clone().requires_grad_(True)
    eps = forward(model, x, t)
    (eps * torch.linspace(-1, 1, eps.numel(), dtype=eps.dtype).reshape(eps.shape)).sum().backward()
    return eps.detach(), x.grad, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 5e-4)])
def test_fast_path_equals_plain_computation(dtype, atol):
    fast = _perturbed(dtype)
    ref = _perturbed(dtype)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 8, 8, generator=g).to(dtype)
    t = torch.randint(0, 20, (4,), generator=g)
    eps_f, gx_f, grads_f = _run(fast, lambda m, x, t: m(x, t), x, t)
    eps_r, gx_r, grads_r = _run(ref, _reference, x, t)
    assert eps_f.abs().max() > 0.1  # the network does something
    torch.testing.assert_close(eps_f, eps_r, atol=atol, rtol=0)
    torch.testing.assert_close(gx_f, gx_r, atol=atol, rtol=0)
    assert grads_f.keys() == grads_r.keys()
    for name in grads_r:
        torch.testing.assert_close(grads_f[name], grads_r[name], atol=atol * max(1.0, float(grads_r[name].abs().max())),
                                   rtol=0, msg=name)
    # BN running statistics moved identically (F.batch_norm does not count batches)
    for (name, b_f), b_r in zip(fast.named_buffers(), ref.buffers()):
        if not name.endswith("num_batches_tracked"):
            torch.testing.assert_close(b_f, b_r, atol=atol, rtol=0, msg=name)


def test_activations_are_channels_last():
    """Every activation the convolutions see is channels-last (memory order T, B, H, W, C)."""
    m = _perturbed(torch.float32)
    seen = []

    def hook(module, args, out):
        for a in (args[0], out):
            if a.dim() == 5 and a.shape[2] > 3:
                seen.append(dense_order(a))

    handles = [mod.register_forward_hook(hook) for mod in m.modules() if mod is not m]
    m(torch.randn(2, 3, 8, 8), torch.tensor([1, 2])).sum().backward()
    for h in handles:
        h.remove()
    assert seen and set(seen) == {(0, 1, 3, 4, 2)}


@pytest.mark.parametrize("layout", ["channels_last", "channels_first", "sliced"])
def test_neuron_keeps_layout_and_values(layout):
    """The neuron kernels run on the input's memory order: same spikes and gradients for any layout, and the
    spikes come back in the input's layout."""
    torch.manual_seed(0)
    base = torch.randn(3, 2, 5, 4, 4) * 0.8 + 0.5
    if layout == "channels_last":
        leaf = base.permute(0, 1, 3, 4, 2).contiguous().requires_grad_(True)
        view = lambda a: a.permute(0, 1, 4, 2, 3)  # noqa: E731
    elif layout == "sliced":
        leaf = base.repeat_interleave(2, dim=2).requires_grad_(True)
        view = lambda a: a[:, :, ::2]  # noqa: E731
    else:
        leaf = base.clone().requires_grad_(True)
        view = lambda a: a  # noqa: E731
    x = view(leaf)
    w = torch.randn_like(base)
    s = multistep_neuron(x, 1.0)
    (s * w).sum().backward()
    xr = base.clone().requires_grad_(True)
    sr = _if_neurons(xr)
    (sr * w).sum().backward()
    assert torch.equal(s, sr)
    torch.testing.assert_close(view(leaf.grad), xr.grad, atol=1e-6, rtol=0)
    if layout != "sliced":
        assert s.stride() == x.stride()
