import json

import numpy as np
import pytest
import torch

from neurosdm.checkpoint import infer_model_config, load_checkpoint, load_model, normalise_sdm_keys
from neurosdm.config import ModelConfig, preset
from neurosdm.errors import CheckpointError
from neurosdm.models import SpikingUNet, count_parameters

TINY = dict(img_ch=1, image_size=16, ch=8, ch_mult=(1, 2), num_res_blocks=1, num_steps=3, num_diffusion_steps=50)


def test_reference_fixture_reproduced(sdm_reference):
    """The public SDM code's Spk_UNet_TSM output on the fixture input (max abs error < 1e-4)."""
    model, cfg = load_model(sdm_reference / "ckpt.pt")
    ref_cfg = json.loads((sdm_reference / "config.json").read_text())["constructor_kwargs"]
    assert cfg.model.ch == ref_cfg["ch"] and list(cfg.model.ch_mult) == ref_cfg["ch_mult"]
    assert cfg.model.num_res_blocks == ref_cfg["num_res_blocks"] and cfg.model.num_steps == ref_cfg["timestep"]
    assert cfg.model.img_ch == ref_cfg["img_ch"] and cfg.model.tsm
    assert cfg.model.num_diffusion_steps == ref_cfg["T"]
    x = torch.from_numpy(np.load(sdm_reference / "x.npy"))
    t = torch.from_numpy(np.load(sdm_reference / "t.npy"))
    with torch.no_grad():
        eps = model(x, t).numpy()
    ref = np.load(sdm_reference / "eps.npy")
    assert eps.shape == ref.shape
    assert np.abs(eps - ref).max() < 1e-4
    assert count_parameters(model) == json.loads((sdm_reference / "config.json").read_text())["n_params"]


def test_reference_fixture_spike_counts(sdm_reference):
    """Per-layer spike counts equal those the reference recorded (the fixture's firing_rates.json)."""
    model, _ = load_model(sdm_reference / "ckpt.pt")
    rates = json.loads((sdm_reference / "firing_rates.json").read_text())
    counts = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=name: counts.__setitem__(n, int(o.sum())))
             for name, m in model.named_modules() if type(m).__name__ == "SpikingNeurons"]
    with torch.no_grad():
        model(torch.from_numpy(np.load(sdm_reference / "x.npy")), torch.from_numpy(np.load(sdm_reference / "t.npy")))
    for h in hooks:
        h.remove()
    for name, rec in rates.items():
        if name == "__total__":
            continue
        # membranes within 1e-6 of threshold may flip; allow a handful of spikes out of ~10^4-10^5
        assert abs(counts[name] - rec["spike_count"]) <= 3, name
    assert len(counts) == rates["__total__"]["n_ifnodes"]


def test_paper_cifar10_parameter_count():
    """The papers' CIFAR-10 model has 66,696,413 parameters (the sinusoidal table included, as their count)."""
    assert count_parameters(SpikingUNet(preset("paper-cifar10").model)) == 66_696_413


def test_paper_fashion_preset_runs_on_32x32_fashion_mnist():
    """The GPU script's preset: the papers' UNet on 1-channel 32x32 images (Fashion-MNIST resized), eps of the
    input's shape; its training data is Fashion-MNIST resized to 32."""
    cfg = preset("paper-fashion")
    assert (cfg.model.img_ch, cfg.model.image_size, cfg.train.dataset) == (1, 32, "fashion-mnist")
    model = SpikingUNet(cfg.model).eval()
    with torch.no_grad():
        eps = model(torch.zeros(1, 1, 32, 32), torch.tensor([500]))
    assert eps.shape == (1, 1, 32, 32) and torch.isfinite(eps).all()


@pytest.mark.parametrize("tsm", [False, True])
@pytest.mark.parametrize("ch_mult,nrb", [((1, 2), 1), ((1, 2, 2), 2), ((2,), 1)])
def test_shape_inference_from_public_layouts(tsm, ch_mult, nrb):
    cfg = ModelConfig(**{**TINY, "ch_mult": ch_mult, "num_res_blocks": nrb, "tsm": tsm})
    sd = SpikingUNet(cfg).state_dict()
    if tsm:  # write it in the SDM layout: <conv>.tsmconv.weight
        sd = {k.replace(".weight", ".tsmconv.weight").replace(".bias", ".tsmconv.bias")
              if any(k.replace(".weight", ".tsmp").replace(".bias", ".tsmp") == j for j in sd) else k: v
              for k, v in sd.items()}
        assert any(".tsmconv." in k for k in sd)
    inferred, notes = infer_model_config(normalise_sdm_keys(sd), num_steps=None if tsm else 3, image_size=16)
    assert inferred == cfg


def test_sddpm_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY)
    model = SpikingUNet(cfg).eval()
    torch.save({"net_model": model.state_dict(), "step": 7}, tmp_path / "sddpm.pt")
    loaded, conf = load_model(tmp_path / "sddpm.pt", num_steps=3, image_size=16)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 40])
    with torch.no_grad():
        assert torch.equal(loaded(x, t), model(x, t))
    ck = load_checkpoint(tmp_path / "sddpm.pt")
    assert ck.layout == "sddpm" and ck.config.model.num_steps == 4  # the documented default, with a note
    assert any("num_steps" in n for n in ck.notes)
    # a DDP-wrapped state dict ("module." prefix) and an ema_model-only file load too
    torch.save({"ema_model": {"module." + k: v for k, v in model.state_dict().items()}}, tmp_path / "ema.pt")
    loaded, _ = load_model(tmp_path / "ema.pt", num_steps=3)
    with torch.no_grad():
        assert torch.equal(loaded(x, t), model(x, t))


def test_spiking_head_and_tsm_forward():
    torch.manual_seed(0)
    for head in ("sdm", "spiking"):
        for tsm in (False, True):
            m = SpikingUNet(ModelConfig(**TINY, head=head, tsm=tsm))
            x, t = torch.randn(2, 1, 16, 16), torch.tensor([0, 49])
            eps = m(x, t)
            assert eps.shape == x.shape
            eps.pow(2).mean().backward()
            assert all(p.grad is not None for n, p in m.named_parameters() if p.requires_grad), head
    m = SpikingUNet(ModelConfig(**TINY, head="spiking"))
    assert not any(type(mod).__name__ in ("SiLU",) for n, mod in m.named_modules() if n.startswith("tail"))
    assert hasattr(m, "tail_neuron") and not hasattr(m, "T_output_layer")


def test_threshold_scale_changes_spikes():
    torch.manual_seed(0)
    m = SpikingUNet(ModelConfig(**TINY)).eval()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 20])
    with torch.no_grad():
        a = m(x, t)
        m.set_threshold_scale(0.9)
        b = m(x, t)
        m.set_threshold_scale(1.0)
        c = m(x, t)
    assert not torch.equal(a, b) and torch.equal(a, c)


def test_foreign_state_dict_is_refused(tmp_path):
    torch.save({"net_model": {"fc.weight": torch.zeros(3, 3)}}, tmp_path / "mlp.pt")
    with pytest.raises(CheckpointError, match="not a spiking UNet"):
        load_model(tmp_path / "mlp.pt")
