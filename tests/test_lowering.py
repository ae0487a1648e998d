"""The exact rewrites of neurosdm.lowering against the torch computations they replace (float64, 1e-10)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neurosdm.config import ModelConfig
from neurosdm.exporters.packing import conv_cost, packed_weight_overhead
from neurosdm.lowering import (
    affine_of_batchnorm,
    depth_to_space,
    fold_batchnorm,
    full_to_packed_conv,
    pack_bias,
    pack_phases,
    packed_conv,
    packed_conv1x1,
    packed_conv3x3,
    space_to_depth,
    split_concat_conv,
    upsample_conv_phases,
)
from neurosdm.models.spiking_unet import BatchNorm, Conv, UpSample, per_step

TOL64 = 1e-10


def rand(*shape, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape))  # float64


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def random_bn(c, affine=True, seed=0, dtype=torch.float64):
    bn = BatchNorm(c, affine=affine, eps=1e-3).to(dtype)
    g = np.random.default_rng(seed)
    bn.running_mean.copy_(torch.from_numpy(g.standard_normal(c)))
    bn.running_var.copy_(torch.from_numpy(g.uniform(0.2, 3.0, c)))
    if affine:
        bn.weight.data.copy_(torch.from_numpy(g.standard_normal(c)))
        bn.bias.data.copy_(torch.from_numpy(g.standard_normal(c)))
    return bn.eval()


@pytest.mark.parametrize("affine", [True, False])
def test_fold_batchnorm_float64(affine):
    conv = Conv(3, 5, 3, 1, 1, num_steps=2).double()
    conv.bias.data.copy_(rand(5, seed=1))
    bn = random_bn(5, affine)
    x = rand(2, 2, 3, 6, 7, seed=2)  # [steps, B, C, H, W]
    with torch.no_grad():
        ref = bn(conv(x))
    w, b = fold_batchnorm(conv.weight, conv.bias, bn)
    got = per_step(lambda z: F.conv2d(z, t(w), t(b), padding=1), x)
    assert (got - ref).abs().max() < TOL64
    scale, shift = affine_of_batchnorm(bn)
    z = rand(1, 1, 5, 2, 2, seed=3)
    with torch.no_grad():
        assert (bn(z) - (t(scale)[:, None, None] * z + t(shift)[:, None, None])).abs().max() < TOL64


def test_fold_batchnorm_float32_and_no_bias():
    conv = torch.nn.Conv2d(4, 6, 1, bias=False)
    bn = random_bn(6, seed=4, dtype=torch.float32)
    x = rand(1, 3, 4, 5, 5, seed=5).float()
    with torch.no_grad():
        ref = bn(per_step(conv, x))
    w, b = fold_batchnorm(conv.weight, None, bn)
    assert w.dtype == np.float32 and b.dtype == np.float32
    assert (per_step(lambda z: F.conv2d(z, t(w), t(b)), x) - ref).abs().max() < 1e-5


def test_batchnorm_after_tsm_keeps_shift_outside():
    """BN(p[t] (W x + b)) = p[t] (scale W x + scale b) + shift (the docstring's TSM rule)."""
    conv = Conv(2, 3, 3, 1, 1, num_steps=3, tsm=True).double()
    conv.tsmp.data.copy_(torch.tensor([0.5, 1.5, -0.7], dtype=torch.float64).view(3, 1, 1, 1, 1))
    conv.bias.data.copy_(rand(3, seed=6))
    bn = random_bn(3, seed=7)
    x = rand(3, 2, 2, 5, 5, seed=8)
    with torch.no_grad():
        ref = bn(conv(x))
    scale, shift = affine_of_batchnorm(bn)
    w, b = fold_batchnorm(conv.weight, conv.bias, bn)
    b_inner = b - shift  # = scale * conv.bias
    got = per_step(lambda z: F.conv2d(z, t(w), t(b_inner), padding=1), x) * conv.tsmp.detach()
    got = got + t(shift)[:, None, None]
    assert (got - ref).abs().max() < TOL64


@pytest.mark.parametrize("k,sizes", [(3, [3, 5]), (1, [3, 5]), (3, [1, 2, 4])])
def test_split_concat_conv(k, sizes):
    cin = sum(sizes)
    w, b = rand(4, cin, k, k, seed=9), rand(4, seed=10)
    xs = [rand(2, n, 6, 6, seed=11 + i) for i, n in enumerate(sizes)]
    ref = F.conv2d(torch.cat(xs, dim=1), w, b, padding=k // 2)
    parts = split_concat_conv(w, sizes, b)
    assert len(parts) == len(sizes) and not parts[1][1].any()
    got = sum(F.conv2d(x, t(wi), t(bi), padding=k // 2) for x, (wi, bi) in zip(xs, parts))
    assert (got - ref).abs().max() < TOL64
    with pytest.raises(ValueError):
        split_concat_conv(w, [cin - 1])


def test_space_to_depth_matches_pixel_unshuffle():
    x = rand(2, 3, 3, 8, 4, seed=12)
    p = space_to_depth(x)
    assert np.array_equal(p, F.pixel_unshuffle(x, 2).numpy())
    assert np.array_equal(depth_to_space(p, 3), x.numpy())
    assert np.array_equal(depth_to_space(space_to_depth(x, 2), 3, levels=2), x.numpy())
    assert np.array_equal(pack_bias(np.arange(3.0)), np.repeat(np.arange(3.0), 4))
    with pytest.raises(ValueError):
        depth_to_space(p, 5)


def test_upsample_conv_polyphase():
    x, w, b = rand(2, 3, 5, 6, seed=13), rand(4, 3, 3, 3, seed=14), rand(4, seed=15)
    ref = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w, b, padding=1)
    phases = upsample_conv_phases(w)
    assert phases.shape == (2, 2, 4, 3, 3, 3)
    for a in range(2):
        for bb in range(2):
            assert (F.conv2d(x, t(phases[a, bb]), b, padding=1) - ref[:, :, a::2, bb::2]).abs().max() < TOL64
    packed = pack_phases(phases)
    assert packed.shape == (16, 3, 3, 3)
    got = depth_to_space(F.conv2d(x, t(packed), t(pack_bias(b)), padding=1).numpy(), 4)
    assert np.abs(got - ref.numpy()).max() < TOL64
    # 16 of the 36 taps per (output channel, input channel) are non-zero
    nonzero = (packed.reshape(4, 4, 3, 9) != 0).sum(axis=(1, 3))
    assert (nonzero == 16).all()


def test_model_upsample_block_lowered():
    """The model's UpSample (IF -> nearest x2 -> conv -> BN, eval) as one packed Conv2d after the IF."""
    cfg = ModelConfig(ch=4, num_steps=3)
    up = UpSample(4, cfg).double().eval()
    up.conv.bias.data.copy_(rand(4, seed=16))
    up.bn = random_bn(4, seed=17)
    x = rand(3, 2, 4, 5, 5, seed=18) + 0.5
    with torch.no_grad():
        ref = up(x, None)
        spikes = up.neuron(x)
    w, b = fold_batchnorm(up.conv.weight, up.conv.bias, up.bn)
    packed = per_step(lambda z: F.conv2d(z, t(pack_phases(upsample_conv_phases(w))), t(pack_bias(b)), padding=1),
                      spikes)
    assert np.abs(depth_to_space(packed.numpy(), 4) - ref.numpy()).max() < TOL64


@pytest.mark.parametrize("k,levels", [(3, 1), (1, 1), (3, 2), (1, 2)])
def test_packed_conv(k, levels):
    full, w, b = rand(2, 3, 8, 12, seed=19), rand(5, 3, k, k, seed=20), rand(5, seed=21)
    ref = space_to_depth(F.conv2d(full, w, b, padding=k // 2), levels)
    q = packed_conv3x3(w, levels) if k == 3 else packed_conv1x1(w, levels)
    assert q.shape == (5 * 4**levels, 3 * 4**levels, k, k)
    got = F.conv2d(t(space_to_depth(full, levels)), t(q), t(pack_bias(b, levels)), padding=k // 2).numpy()
    assert np.abs(got - ref).max() < TOL64
    assert np.count_nonzero(q) == conv_cost("packed", 5, 3, k, levels)[1]


def test_packed_conv_float32():
    full, w = rand(1, 2, 6, 6, seed=22).float(), rand(3, 2, 3, 3, seed=23).float()
    q = packed_conv(w)
    assert q.dtype == np.float32
    got = F.conv2d(t(space_to_depth(full)), t(q), padding=1).numpy()
    assert np.abs(got - space_to_depth(F.conv2d(full, w, padding=1))).max() < 1e-5


def test_upsample_into_level_two():
    """The second upsampling of the up path: its input is packed once, its output packed twice."""
    x, w = rand(1, 3, 8, 8, seed=24), rand(2, 3, 3, 3, seed=25)  # x: a full-res level-1 map (packed: 4x4 grid)
    ref = space_to_depth(F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w, padding=1), 2)
    q = packed_conv(pack_phases(upsample_conv_phases(w)), 1)
    assert q.shape == (2 * 16, 3 * 4, 3, 3)
    got = F.conv2d(t(space_to_depth(x)), t(q), padding=1).numpy()
    assert np.abs(got - ref).max() < TOL64
    stored, nonzero = conv_cost("upsample", 2, 3, 3, 2)
    assert q.size == stored and np.count_nonzero(q) == nonzero


@pytest.mark.parametrize("k,levels", [(3, 1), (1, 1), (3, 2), (1, 2)])
def test_full_to_packed_conv(k, levels):
    full, w = rand(2, 3, 8, 12, seed=26), rand(4, 3, k, k, seed=27)
    ref = space_to_depth(F.conv2d(full, w, padding=k // 2), levels)
    q = full_to_packed_conv(w, levels)
    got = F.conv2d(full, t(q), stride=2**levels, padding=k // 2).numpy()
    assert got.shape == ref.shape and np.abs(got - ref).max() < TOL64
    stored, nonzero = conv_cost("skip", 4, 3, k, levels)
    assert q.size == stored and np.count_nonzero(q) == nonzero
    if k == 3 and levels == 1:
        assert q.shape == (16, 3, 4, 4)  # the stride-2 4x4 conv of reference/nir.md


def test_packed_weight_overhead_hand_case():
    """ch 2, ch_mult (1, 1), 1 res block, spiking head: 4 up ResBlocks (4 -> 2, skips of 2 channels), one
    UpSample(2), tail conv 2 -> 1. Per ResBlock: conv1 72 (h 36 + skip 36), conv2 36, shortcut 8 (4 + 4) = 116.
    Level 1 ResBlock stored: conv1 h 36*16 = 576, conv1 skip 4 * 4 * 4**2 = 256, conv2 576, shortcut h 4*16 = 64,
    shortcut skip 4 * 4 * 2**2 = 64 -> 1536; non-zero 144 + 144 + 144 + 16 + 16 = 464.
    UpSample: 36 -> stored 4*36 = 144, non-zero 4*16 = 64. Tail: 18 -> 288 stored, 72 non-zero."""
    d = packed_weight_overhead(ModelConfig(ch=2, ch_mult=(1, 1), num_res_blocks=1, head="spiking", image_size=8))
    assert d["levels"] == 1
    assert d["original"] == 2 * 116 + 36 + 2 * 116 + 18 == 518
    assert d["packed_stored"] == 2 * 116 + 144 + 2 * 1536 + 288 == 3736
    assert d["packed_nonzero"] == 2 * 116 + 64 + 2 * 464 + 72 == 1296
    assert d["per_level"][0] == dict(original=232, stored=232, nonzero=232)
    # the sdm head adds the 1 -> 1 3x3 T_output_layer: 9 -> 144 stored, 36 non-zero
    e = packed_weight_overhead(ModelConfig(ch=2, ch_mult=(1, 1), num_res_blocks=1, head="sdm", image_size=8))
    assert (e["original"], e["packed_stored"], e["packed_nonzero"]) == (527, 3880, 1332)


def test_packed_weight_overhead_no_upsampling():
    d = packed_weight_overhead(ModelConfig(ch=2, ch_mult=(1,), num_res_blocks=1, image_size=8))
    assert d["levels"] == 0 and d["packed_stored"] == d["original"] == d["packed_nonzero"]
