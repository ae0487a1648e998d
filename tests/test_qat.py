"""Quantisation-aware training (``train --qat``): the QAT forward uses exactly the export's rounding of the
BN-folded weights, BN statistics stay frozen, and the CLI runs it from a checkpoint."""

import copy

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from neurosdm import cli
from neurosdm.checkpoint import build_model, load_checkpoint, save_checkpoint
from neurosdm.config import Config, DiffusionConfig, ModelConfig, TrainConfig
from neurosdm.lowering import affine_of_batchnorm, fold_batchnorm
from neurosdm.models import SpikingUNet
from neurosdm.models.spiking_unet import Conv
from neurosdm.quantize import dequantize, quantize_weight
from neurosdm.train import Trainer, train

MODEL = dict(img_ch=1, image_size=8, ch=4, ch_mult=(1, 2), num_res_blocks=1, num_steps=2, num_diffusion_steps=20)


def _np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def randomised_model(head: str) -> SpikingUNet:
    """A small model with non-trivial BN statistics and affine parameters (so that the folded scale matters)."""
    torch.manual_seed(0)
    model = SpikingUNet(ModelConfig(**MODEL, head=head))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.3)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1 + 0.5)
            elif isinstance(m, Conv):
                m.weight.mul_(3.0)  # larger weights: more spikes, so that rounding shows in the output
        torch.nn.init.xavier_uniform_(model.tail_conv.weight)  # not the 1e-5 init: an output of order 1
    return model.eval()


def export_quantised(conv: Conv, bn, bits: int = 8) -> np.ndarray:
    """What the int8 export stores for this conv, dequantised: the rounded BN-folded weight (float64)."""
    w = fold_batchnorm(_np64(conv.weight), None, bn)[0] if bn is not None else _np64(conv.weight)
    return dequantize(*quantize_weight(w, None, bits), dtype=np.float64)


def float_copy_with_export_weights(model: SpikingUNet) -> SpikingUNet:
    """A float (non-QAT) copy whose conv weights are ``dequantize(*quantize_weight(W * s)) / s`` (``W`` alone
    for convs without BN): its eval BN then applies the exported weight."""
    ref = copy.deepcopy(model)
    ref.set_qat(None)
    with torch.no_grad():
        for conv, bn in ref.qat_pairs():
            wq = export_quantised(conv, bn)
            if bn is not None:
                wq = wq / affine_of_batchnorm(bn)[0].reshape(-1, 1, 1, 1)
            conv.weight.copy_(torch.from_numpy(wq).float())
    return ref


@pytest.mark.parametrize("head", ["spiking", "sdm"])
def test_qat_forward_uses_the_exported_weights(head):
    model = randomised_model(head)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 7, 19])
    with torch.no_grad():
        float_out = model(x, t)
        ref_out = float_copy_with_export_weights(model)(x, t)
        model.set_qat(8)
        qat_out = model(x, t)
    assert torch.allclose(qat_out, ref_out, rtol=0, atol=1e-5), (qat_out - ref_out).abs().max()
    assert (qat_out - float_out).abs().max() > 1e-3  # the rounding does change the output
    # every conv is covered, except the SDM head's host-side tail_conv
    quantised = {id(c) for c, _ in model.qat_pairs()}
    convs = {name for name, m in model.named_modules() if isinstance(m, Conv) and id(m) not in quantised}
    assert convs == (set() if head == "spiking" else {"tail_conv"})
    assert all(m.qat is not None for m, _ in model.qat_pairs())
    # the state dict is unchanged by QAT (checkpoints stay loadable everywhere)
    assert list(model.state_dict()) == list(SpikingUNet(ModelConfig(**MODEL, head=head)).state_dict())
    model.set_qat(None)
    with torch.no_grad():
        assert torch.equal(model(x, t), float_out)


def test_qat_bits_are_validated():
    with pytest.raises(Exception, match="2..24"):
        SpikingUNet(ModelConfig(**MODEL)).set_qat(1)
    with pytest.raises(Exception, match="2..24"):
        TrainConfig(qat=True, qat_weight_bits=40)


def qat_config(qat: bool = True, **train) -> Config:
    return Config(ModelConfig(**MODEL, head="spiking"), DiffusionConfig(num_diffusion_steps=20),
                  TrainConfig(**{"batch_size": 4, "steps": 4, "lr": 1e-3, "warmup": 1, "ckpt_every": 0,
                                 "log_every": 1, "qat": qat, **train}))


def fake_data(n=16):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


@pytest.mark.parametrize("qat", [True, False])
def test_qat_step_trains_weights_and_bn_affine_with_frozen_statistics(qat):
    tr = Trainer(qat_config(qat), data=fake_data())
    if qat:
        tr.calibrate_batchnorm()  # what train() does for QAT from scratch: with mean 0 / var 1 nothing fires
    # The spiking head's tail_conv starts at 1e-5 of the xavier scale, below 2**EXP_MIN: its quantised weight is
    # all zero at the first step from scratch (only tail_conv itself then gets a gradient, straight-through, and
    # is on the grid after one Adam step). A trained model (the --init case) has larger tail weights; give it those.
    with torch.no_grad():
        tr.model.tail_conv.weight.mul_(1e5)
    before = _bn_buffers(tr.model)
    weights = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.step()
    after = _bn_buffers(tr.model)
    frozen = all(torch.equal(before[k], after[k]) for k in before)
    assert frozen == qat  # without QAT the statistics move (so this test can fail)
    assert all(torch.equal(v, after[k]) for k, v in _bn_buffers(tr.ema).items())  # the EMA has the same
    for conv, bn in tr.model.qat_pairs():
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
        if bn is not None:
            assert bn.weight.grad.abs().sum() > 0 and bn.bias.grad.abs().sum() > 0
    changed = [n for n, p in tr.model.named_parameters() if not torch.equal(p, weights[n])]
    assert any(n.endswith("conv1.weight") for n in changed) and any(n.endswith("bn1.weight") for n in changed)


def test_qat_from_scratch_calibrates_then_freezes_batchnorm(tmp_path):
    cfg = qat_config(dataset="builtin", steps=2)
    cfg.model.image_size = 8  # builtin images are resized to the model's size
    path = train(cfg, tmp_path, resume=False, num_sample_images=0)
    ckpt = load_checkpoint(path)
    assert ckpt.config.train.qat
    var = ckpt.model_state["bn.running_var"]
    assert not torch.equal(var, torch.ones_like(var))  # estimated, not the untrained 1
    assert all(torch.equal(v, ckpt.ema_state[k]) for k, v in ckpt.model_state.items() if "running" in k)


def test_qat_resume_is_exact_and_keeps_qat(tmp_path):
    full = Trainer(qat_config(), data=fake_data())
    for _ in range(4):
        full.step()
    half = Trainer(qat_config(), data=fake_data())
    for _ in range(2):
        half.step()
    half.save(tmp_path / "ckpt.pt")
    assert load_checkpoint(tmp_path / "ckpt.pt").config.train.qat is True
    resumed = Trainer(qat_config(qat=False), data=fake_data())  # QAT comes back from the saved config
    resumed.load_state(tmp_path / "ckpt.pt")
    assert resumed.config.train.qat and resumed.model.qat_bits == 8 and resumed.ema.qat_bits == 8
    for _ in range(2):
        resumed.step()
    for (name, a), b in zip(full.ema.state_dict().items(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b), name


def test_old_checkpoint_config_without_qat_keys_loads():
    d = qat_config(qat=False).to_dict()
    del d["train"]["qat"], d["train"]["qat_weight_bits"]
    cfg = Config.from_dict(d)
    assert cfg.train.qat is False and cfg.train.qat_weight_bits == 8


def test_cli_qat_fine_tuning_and_exported_weights_on_grid(tmp_path):
    # a small untrained checkpoint at the builtin dataset's 28x28 (--init takes the architecture from it)
    cfg = Config(ModelConfig(img_ch=1, image_size=28, ch=4, ch_mult=(1, 2), num_res_blocks=1, num_steps=2,
                             num_diffusion_steps=20, head="spiking"), DiffusionConfig(num_diffusion_steps=20))
    torch.manual_seed(0)
    init_model = randomised_model_like(cfg.model)
    save_checkpoint(tmp_path / "init.pt", cfg, init_model, copy.deepcopy(init_model))
    out = tmp_path / "run"
    r = CliRunner().invoke(cli.app, ["train", "--out", str(out), "--init", str(tmp_path / "init.pt"), "--qat",
                                     "--steps", "2", "--batch-size", "4", "--sample-images", "0"])
    assert r.exit_code == 0, r.output
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt.step == 2 and ckpt.config.train.qat is True and ckpt.config.train.qat_weight_bits == 8
    assert ckpt.config.model.ch == 4  # from --init, not the tiny preset

    # BN statistics were frozen: the EMA (the exported weights) has the init checkpoint's (no recalibration)
    for k, v in ckpt.ema_state.items():
        if k.endswith(("running_mean", "running_var")):
            assert torch.equal(v, init_model.state_dict()[k]), k

    # The stored weights are QAT's latent float weights: after an optimiser step (and the EMA average) W * s is
    # NOT on the grid, and need not be (straight-through training keeps updates smaller than a grid step in the
    # latent weights). The export rounds them, exactly as the QAT forward did. What holds:
    # (a) the folded weight the QAT forward computes with, W_eff * s, equals the export's rounding
    #     dequantize(*quantize_weight(W * s)) up to the float32 rounding of W_eff = q / s (relative 1e-6);
    # (b) it is on the grid: re-quantising it gives the exported weight back exactly (fake_quant is idempotent:
    #     a value on the grid of exponent e is also exact at any finer exponent choose_exponent may pick for it).
    off_grid = 0
    for weights in ("ema", "model"):
        model = build_model(ckpt.config.model, ckpt.ema_state if weights == "ema" else ckpt.model_state).eval()
        model.set_qat(8)
        for conv, bn in model.qat_pairs():
            exported = export_quantised(conv, bn)  # what the int8 export rounds the checkpoint's weights to
            latent = fold_batchnorm(_np64(conv.weight), None, bn)[0] if bn is not None else _np64(conv.weight)
            off_grid += not np.array_equal(exported, latent)
            w_eff = _np64(conv.effective_weight())
            folded_eff = w_eff * affine_of_batchnorm(bn)[0].reshape(-1, 1, 1, 1) if bn is not None else w_eff
            np.testing.assert_allclose(folded_eff, exported, rtol=1e-6, atol=0)  # (a)
            requantised = dequantize(*quantize_weight(folded_eff), dtype=np.float64)
            assert np.array_equal(requantised, exported)  # (b)
    assert off_grid > 0  # the latent weights themselves are off the grid


def randomised_model_like(model_cfg: ModelConfig) -> SpikingUNet:
    model = SpikingUNet(model_cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def test_cli_qat_options(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("neurosdm.train.train", lambda cfg, out, **kw: seen.update(cfg=cfg) or out / "c.pt")
    r = CliRunner().invoke(cli.app, ["train", "--out", str(tmp_path), "--qat", "--qat-bits", "6"])
    assert r.exit_code == 0, r.output
    assert seen["cfg"].train.qat and seen["cfg"].train.qat_weight_bits == 6
    r = CliRunner().invoke(cli.app, ["train", "--out", str(tmp_path), "--qat-bits", "6"])
    assert r.exit_code != 0 and "--qat-bits needs --qat" in str(r.exception)
    r = CliRunner().invoke(cli.app, ["train", "--help"])
    assert "--qat" in r.output and "--qat-bits" in r.output


@pytest.mark.parametrize("head", ["spiking", "sdm"])
def test_export_lowering_keeps_qat_weights_on_grid_except_documented_nodes(head):
    """The NIR graph of a model whose folded weights are on the grid (what the QAT forward computes with): every
    conv node is still on the grid (splits over the skip concatenation and space-to-depth packing only move or
    split taps) except the polyphase up-sampling kernels (sums of 2 or 4 taps) and, with the spiking head, the
    convs feeding the last junction (the tail BN's scale is folded into them). README's --qat paragraph."""
    import nir

    from neurosdm.exporters.nir import to_nir_graph

    graph, _ = to_nir_graph(float_copy_with_export_weights(randomised_model(head)), dtype=np.float64)
    off = set()
    for name, node in graph.nodes.items():
        if isinstance(node, nir.Conv2d):
            w = np.asarray(node.weight, np.float64)
            if not np.allclose(dequantize(*quantize_weight(w), dtype=np.float64), w, rtol=1e-6, atol=0):
                off.add(name)
    up = {n for n in off if n.endswith(".conv") and n.startswith("up")}
    assert up and off - up <= ({"up4.conv2", "up4.shortcut", "up4.shortcut_skip"} if head == "spiking" else set())
