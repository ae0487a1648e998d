"""ANN-to-SNN conversion (neurosdm.convert): QCFS by hand, the IF/QCFS identity, the converted UNet, its export."""

import nir
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from neurosdm import cli
from neurosdm.checkpoint import load_checkpoint, load_model, save_checkpoint
from neurosdm.config import Config, DiffusionConfig, ModelConfig
from neurosdm.convert import convert_model, neuron_conv_pairs
from neurosdm.errors import ConfigError, NeuroSDMError
from neurosdm.exporters.fixed_point import calibrate, calibration_inputs, quantize_graph
from neurosdm.exporters.nir import to_nir_graph
from neurosdm.exporters.packing import UnsupportedModelError
from neurosdm.exporters.pipeline import export_checkpoint
from neurosdm.models import SpikingUNet
from neurosdm.neurons import QCFS, SpikingNeurons, qcfs
from neurosdm.quantize import QuantSpec
from neurosdm.graph.program import load_program
from neurosdm.simulators.reference import run_reference
from neurosdm.simulators.run import simulate
from conftest import assert_one_line_error, neurosdm, perturb_batchnorm, tiny_checkpoint

DIFF = DiffusionConfig(num_diffusion_steps=50)
runner = CliRunner()


def _ann(head="sdm", ch_mult=(1, 2), bits=2, image_size=8, seed=0):
    """A tiny QCFS ANN with random BN statistics, biases and clips (so that conversion is not trivial)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(img_ch=1, image_size=image_size, ch=4, ch_mult=ch_mult, num_res_blocks=1, num_steps=1,
                      num_diffusion_steps=50, head=head, activation="qcfs", qcfs_bits=bits)
    m = SpikingUNet(cfg)
    with torch.no_grad():
        for mod in m.modules():
            perturb_batchnorm(mod)
            if isinstance(mod, QCFS):
                mod.clip.uniform_(1.0, 3.0)
        m.tail_conv.weight.normal_(0.0, 0.3)
    return m.eval()


def _x(b=4, size=8, seed=1):
    return torch.randn(b, 1, size, size, generator=torch.Generator().manual_seed(seed))


def _eps(model, x, t):
    with torch.no_grad():
        return model(x, torch.full((x.shape[0],), t)).double().numpy()


# ------------------------------------------------------------------------------------------------------------ QCFS


def test_qcfs_values_by_hand():
    # clip 2, 2 bits (L = 3): y = 2/3 * clamp(floor(1.5 x + 0.5), 0, 3)
    x = torch.tensor([-1.0, 0.2, 0.4, 0.9, 1.7, 5.0])
    levels = [0, 0, 1, 1, 3, 3]  # floor(1.5 x + 0.5) = -1, 0, 1, 1, 3, 8 -> clamped
    y = qcfs(x, torch.tensor(2.0), 3)
    np.testing.assert_allclose(y.numpy(), [2.0 / 3.0 * k for k in levels], rtol=1e-6)
    # 1 bit (L = 1): a step at clip / 2
    np.testing.assert_allclose(qcfs(torch.tensor([0.99, 1.01]), torch.tensor(2.0), 1).numpy(), [0.0, 2.0])
    m = QCFS(bits=3, clip=4.0)
    assert m.levels == 7 and float(m(torch.tensor(2.3))) == pytest.approx(4.0 / 7.0 * 4)  # floor(4.525) = 4


def test_qcfs_straight_through_gradient():
    x = torch.tensor([-1.0, 0.2, 0.4, 0.9, 1.7, 5.0], requires_grad=True)
    clip = torch.tensor(2.0, requires_grad=True)
    y = qcfs(x, clip, 3)
    y.sum().backward()
    # dy/dx = 1 where 0 <= floor(x L / clip + 1/2) <= L (here x = 0.2 .. 1.7), else 0
    np.testing.assert_allclose(x.grad.numpy(), [0, 1, 1, 1, 1, 0])
    # dy/dclip = (y - x) / clip inside that range, 1 above it, 0 below it
    yv, xv = y.detach().numpy(), x.detach().numpy()
    expected = sum((yv[i] - xv[i]) / 2.0 for i in (1, 2, 3, 4)) + 1.0
    assert float(clip.grad) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_if_with_half_threshold_and_subtract_reset_counts_like_qcfs(bits):
    """Constant input x for T = L steps: the spike count is clamp(floor(x L / theta + 1/2), 0, L) and the rate
    times theta is the QCFS output, exactly (dyadic inputs: no rounding anywhere)."""
    levels, theta = 2**bits - 1, 2.0
    x = torch.arange(-64, 200, dtype=torch.float32) / 64  # -1 .. 3.1, beyond both ends of [0, theta]
    neuron = SpikingNeurons(theta, reset="subtract", v_init=0.5)
    spikes = neuron(x.expand(levels, -1).contiguous())
    count = spikes.sum(0).numpy()
    expected = np.clip(np.floor(x.numpy().astype(np.float64) * levels / theta + 0.5), 0, levels)
    np.testing.assert_array_equal(count, expected)
    np.testing.assert_array_equal(theta * spikes.mean(0).numpy(), qcfs(x, torch.tensor(theta), levels).numpy())
    # without the half-threshold start it is not the QCFS output; nor with a hard reset (once a reset can happen)
    others = [SpikingNeurons(theta, reset="subtract")] + [SpikingNeurons(theta, reset="hard", v_init=0.5)] * (bits > 1)
    for other in others:
        assert not np.array_equal(other(x.expand(levels, -1).contiguous()).sum(0).numpy(), expected)


# ------------------------------------------------------------------------------------------------- the converted net


@pytest.mark.parametrize("head", ["sdm", "spiking"])
def test_conversion_maps_clips_to_thresholds_and_scales_the_convs(head):
    ann = _ann(head)
    snn = convert_model(ann)
    cfg = snn.cfg
    assert (cfg.activation, cfg.num_steps, cfg.reset, cfg.v_init, cfg.readout) == ("if", 3, "subtract", 0.5, "mean")
    pairs = neuron_conv_pairs(ann)
    assert len(pairs) == sum(isinstance(m, QCFS) for m in ann.modules())
    for neuron, conv in pairs:
        clip = float(ann.get_submodule(neuron).clip)
        assert snn.get_submodule(neuron).threshold == pytest.approx(clip)
        torch.testing.assert_close(snn.get_submodule(conv).weight, ann.get_submodule(conv).weight * clip)
    # the config alone rebuilds the converted model (checkpoints store it)
    again = SpikingUNet(ModelConfig(**Config(model=cfg).to_dict()["model"]))
    again.load_state_dict(snn.state_dict())
    x = _x()
    np.testing.assert_array_equal(_eps(again.eval(), x, 7), _eps(snn, x, 7))


@pytest.mark.parametrize("head", ["sdm", "spiking"])
def test_converted_unet_approaches_the_ann_as_num_steps_grows(head):
    ann = _ann(head)
    x = _x()
    ref = _eps(ann, x, 10)
    err = {k: ((_eps(convert_model(ann, k * 3), x, 10) - ref) ** 2).mean() for k in (1, 4)}
    assert err[4] < 0.8 * err[1], err


@pytest.mark.parametrize("head", ["sdm", "spiking"])
def test_converted_unet_converges_to_the_clipped_relu_ann(head):
    """With more spiking steps the rates resolve finer than the ANN's 2**b - 1 levels: the SNN tends to the ANN
    without its quantiser (``clamp(x, 0, clip)``, here QCFS with 2**20 - 1 levels), its error shrinking steadily."""
    import copy

    ann = _ann(head)
    fine = copy.deepcopy(ann)
    for m in fine.modules():
        if isinstance(m, QCFS):
            m.levels = 2**20 - 1
    x = _x()
    ref = _eps(fine, x, 10)
    err = [((_eps(convert_model(ann, k * 3), x, 10) - ref) ** 2).mean() for k in (1, 4, 16)]
    assert err[2] < 0.5 * err[1] < 0.5 * err[0], err


def test_sdm_head_on_the_time_average_converges_and_per_step_heads_do_not():
    """The analog head is non-linear: run once on the time-averaged stream (readout "mean") its output approaches
    the ANN's; averaging the head's per-step outputs instead (readout "leaky" with decay 1, divided by the steps)
    stays further away."""
    ann = _ann("sdm")
    x = _x()
    ref = _eps(ann, x, 10)
    snn = convert_model(ann, 12)
    per_step = SpikingUNet(ModelConfig(**{**Config(model=snn.cfg).to_dict()["model"], "readout": "leaky",
                                          "readout_decay": 1.0}))
    per_step.load_state_dict(snn.state_dict())
    err_mean = ((_eps(snn, x, 10) - ref) ** 2).mean()
    err_per_step = ((_eps(per_step.eval(), x, 10) / 12 - ref) ** 2).mean()
    assert err_mean < err_per_step, (err_mean, err_per_step)


def test_bad_configs_and_models_are_refused():
    with pytest.raises(ConfigError, match="one step"):
        ModelConfig(activation="qcfs", num_steps=4)
    with pytest.raises(ConfigError, match="reset"):
        ModelConfig(reset="soft")
    with pytest.raises(ConfigError, match="not IF layers"):
        SpikingUNet(ModelConfig(thresholds={"nope": 1.0}))
    with pytest.raises(ConfigError, match="QCFS ANN"):
        convert_model(SpikingUNet(ModelConfig(image_size=8, ch=4, num_steps=2)))
    with pytest.raises(UnsupportedModelError, match="convert it first"):
        to_nir_graph(_ann())


# -------------------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("head,ch_mult", [("sdm", (1, 2)), ("spiking", (1, 2)), ("spiking", (1, 2, 2))])
def test_export_of_a_converted_model_matches_torch(head, ch_mult):
    snn = convert_model(_ann(head, ch_mult))
    graph, md = to_nir_graph(snn)
    assert md["reset"] == "subtract" and md["v_init"] == 0.5 and "threshold" not in md
    ifs = {n: v for n, v in graph.nodes.items() if isinstance(v, nir.IF)}
    # one firing threshold per layer: stored shifted, v_threshold - v_reset = theta, v_reset = -theta / 2
    thetas = {n: float(np.asarray(v.v_threshold).flat[0] - np.asarray(v.v_reset).flat[0]) for n, v in ifs.items()}
    np.testing.assert_allclose([-float(np.asarray(v.v_reset).flat[0]) for v in ifs.values()],
                               [t / 2 for t in thetas.values()], rtol=1e-6)
    assert len({round(t, 5) for t in thetas.values()}) > len(ifs) // 2
    assert any("@" in n for n in ifs)  # a stream read by two layers with different thresholds has two IF nodes
    x = _x()
    for t in (0, 31):
        eps, res = run_reference(graph, md, x.numpy(), t, record=True)
        assert np.abs(eps - _eps(snn, x, t)).max() < 1e-5
        rates = [res["records"][n].mean() for n in ifs]
        assert 0.05 < np.mean(rates) < 0.95


def test_threshold_guidance_on_a_converted_float_export():
    """apply_threshold_scale on a converted graph scales every layer's own threshold (stored shifted): the same
    graph as exporting the model with that threshold scale; the int8 form refuses with a reason."""
    from neurosdm.simulators.run import apply_threshold_scale

    snn = convert_model(_ann("spiking"))
    graph, _ = to_nir_graph(snn)
    program = apply_threshold_scale(load_program(graph), 0.9)
    snn.set_threshold_scale(0.9)
    want = load_program(to_nir_graph(snn)[0])
    ifs = [layer for layer in want.layers if layer.kind == "if"]
    assert len(ifs) > 3
    for layer in ifs:
        got = program.by_name[layer.name]
        np.testing.assert_allclose(got.neuron.threshold, layer.neuron.threshold, rtol=1e-6)
        np.testing.assert_allclose(got.neuron.v_reset, layer.neuron.v_reset, rtol=1e-6)
    quantized = load_program(graph)
    quantized.metadata = dict(quantized.metadata, quant={"state_bits": 24})
    with pytest.raises(ConfigError, match="per-layer thresholds"):
        apply_threshold_scale(quantized, 0.9)


def test_host_head_of_a_converted_model_runs_once_per_call():
    """The mean readout runs the SDM head once on the time-averaged stream: its host MACs are one step's (a
    per-step head would cost num_steps times as much)."""
    from neurosdm.simulators.run import host_counts

    snn = convert_model(_ann("sdm"))
    graph, md = to_nir_graph(snn)
    prog = load_program(graph)
    c, h, w = (int(v) for v in np.asarray(md["image_shape"]))
    ch = int(np.asarray(md["host_head"]["tail_bn_scale"]).size)
    assert prog.num_steps == 3 and host_counts(prog, 2)["host_macs"] == 2 * h * w * 9 * (ch * c + c * c)


@pytest.mark.parametrize("head", ["spiking", "sdm"])
def test_int8_export_of_a_converted_model(head):
    """The fixed-point form (v_reset 0 plus a recurrent offset node per IF): exact in float, and the quantised
    graph converges to the float one as the weight mantissas widen (16 bits: the float eps)."""
    snn = convert_model(_ann(head))
    graph, md = to_nir_graph(snn, dtype=np.float64)
    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    cal = calibrate(graph, md, calibration_inputs(images, DIFF, steps=4))
    x = _x().numpy()
    ref, ref_run = run_reference(graph, md, x, 20, record=True)
    ifs = [n for n, v in graph.nodes.items() if isinstance(v, nir.IF)]
    errs, flips = {}, {}
    for bits in (8, 16):
        qg, qmd = quantize_graph(graph, md, cal, QuantSpec(weight_bits=bits))
        loops = qmd["quant"]["reset_offsets"]
        assert set(loops.values()) == set(ifs) and all(np.all(qg.nodes[n].v_reset == 0) for n in ifs)
        assert all((n, s) in qg.edges and (s, n) in qg.edges for s, n in loops.items())
        eps, res = run_reference(qg, qmd, x, 20, record=True)
        assert not res["saturations"]
        errs[bits] = ((eps - ref) ** 2).mean() / ref.var()
        flips[bits] = np.mean([np.mean(res["records"][n] != ref_run["records"][n]) for n in ifs])
    assert flips[8] < 0.06 and flips[16] == 0 and errs[16] < 1e-6, (flips, errs)


# ----------------------------------------------------------------------------------------------------------- CLI


def _ann_checkpoint(path, head="spiking"):
    ann = _ann(head)
    cfg = Config(ann.cfg, DIFF)
    save_checkpoint(path, cfg, ann, step=5)
    return path


def test_cli_convert_export_and_simulate_on_both_engines(tmp_path):
    ann = _ann_checkpoint(tmp_path / "ann.pt")
    snn = tmp_path / "snn.pt"
    r = runner.invoke(cli.app, ["convert", str(ann), "--out", str(snn)])
    assert r.exit_code == 0, r.output
    assert "3 spiking steps" in r.output
    ckpt = load_checkpoint(snn)
    assert ckpt.config.model.thresholds and ckpt.raw["converted_from"] == "ann.pt"
    info = runner.invoke(cli.app, ["info", str(snn)], terminal_width=200)
    assert info.exit_code == 0 and "reset subtract" in info.output and "per-layer thresholds" in info.output
    info = runner.invoke(cli.app, ["info", str(ann)], terminal_width=200)
    assert "QCFS ANN activation, 2 bits" in info.output
    model, _ = load_model(snn)
    x = _x(2)
    np.testing.assert_allclose(_eps(model, x, 3), _eps(convert_model(load_model(ann)[0]), x, 3))
    nir8 = export_checkpoint(snn, tmp_path / "snn8.nir", quantize="int8", calibration="builtin",
                             calibration_images=4)
    program = load_program(nir8)
    kw = dict(num_images=2, sampler="ddim", steps=2, seed=1, batch_size=2)
    img_e, st_e, _ = simulate(program, "event", **kw)
    img_t, st_t, _ = simulate(program, "torch", **kw)
    assert torch.equal(img_e, img_t) and st_e.total("spikes_out") == st_t.total("spikes_out") > 0
    r = runner.invoke(cli.app, ["export", str(snn), "--to", "nir", "--out", str(tmp_path / "snn.nir")])
    assert r.exit_code == 0, r.output


def test_cli_convert_errors_are_one_line(tmp_path):
    ann = _ann_checkpoint(tmp_path / "ann.pt")
    snn_ckpt = tiny_checkpoint(tmp_path / "snn.pt")  # an SNN: nothing to convert
    (tmp_path / "taken.pt").write_bytes(b"x")
    for args, needle in [([snn_ckpt, "--out", tmp_path / "o.pt"], "not a QCFS ANN"),
                         ([ann, "--out", tmp_path / "taken.pt"], "--force")]:
        r = runner.invoke(cli.app, ["convert", *map(str, args)])
        assert isinstance(r.exception, NeuroSDMError) and needle in str(r.exception), r.output
        assert "\n" not in str(r.exception)
    assert not (tmp_path / "o.pt").exists() and (tmp_path / "taken.pt").read_bytes() == b"x"
    r = runner.invoke(cli.app, ["train", "--out", str(tmp_path / "r"), "--ann-bits", "3"])
    assert isinstance(r.exception, ConfigError) and "--ann" in str(r.exception)
    # through the real entry point: one line on stderr, exit 1
    assert_one_line_error(neurosdm("convert", tmp_path / "missing.pt", "--out", tmp_path / "o.pt", cwd=tmp_path),
                          "not found")
