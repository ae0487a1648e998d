"""Issue 16's knobs: the spiking-steps schedule num_steps(t) (config rule, GPU sampler, export metadata, both
engines) and the firing-rate penalty in training."""

import json

import nir
import numpy as np
import pytest
import torch

from neurosdm.checkpoint import load_model
from neurosdm.config import (Config, DiffusionConfig, ModelConfig, TrainConfig, format_steps_schedule,
                             parse_steps_schedule, schedule_steps)
from neurosdm.errors import ConfigError, GraphError
from neurosdm.exporters.pipeline import export_checkpoint
from neurosdm.graph.program import load_program
from neurosdm.neurons import SpikingNeurons
from neurosdm.sample import generate
from neurosdm.simulators.run import host_counts, simulate, steps_schedule_of
from neurosdm.train import Trainer, rate_penalty, train
from conftest import assert_one_line_error, neurosdm, tiny_checkpoint, tiny_model


# ------------------------------------------------------------------------------------------------ the rule

def test_schedule_rule_by_hand():
    seg = parse_steps_schedule("t<300:4, t<700:3,2", 1000)
    assert seg == ((300, 4), (700, 3), (1000, 2))
    assert [schedule_steps(seg, t) for t in (0, 299, 300, 699, 700, 999)] == [4, 4, 3, 3, 2, 2]
    assert format_steps_schedule(seg) == "t<300:4,t<700:3,2"
    assert parse_steps_schedule("3", 50) == ((50, 3),)


@pytest.mark.parametrize("spec, needle", [("t<300:4", "not a number of spiking steps"), ("t<300:0,2", "1..4096"),
                                          ("t<700:4,t<300:3,2", "701..999"), ("x<3:4,2", "not 't<A:K'"),
                                          ("t<1000:3,2", "1..999"), ("", "not a number"), ("t<5:9,2", "1..4")])
def test_schedule_rule_refuses(spec, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        parse_steps_schedule(spec, 1000, 4 if "9" in spec else None)


def test_tsm_model_config_bounds_the_schedule():
    ModelConfig(tsm=True, num_steps=4, steps_schedule="t<500:2,4")
    with pytest.raises(ConfigError, match="TSM"):
        ModelConfig(tsm=True, num_steps=4, steps_schedule="t<500:2,6")
    ModelConfig(tsm=False, num_steps=4, steps_schedule="t<500:2,6")  # more steps than trained: allowed


# ------------------------------------------------------------------------------------------------ GPU path

class StepLog:
    """Records ``(t, spiking steps)`` of every network call through the stem neuron's input length."""

    def __init__(self, model):
        self.calls = []
        self.t = None
        model.neuron.register_forward_pre_hook(lambda m, args: self.calls.append((self.t, args[0].shape[0])))


def test_gpu_sampler_runs_each_call_with_its_steps():
    model = tiny_model(num_steps=3)
    cfg = Config(model.cfg, DiffusionConfig(num_diffusion_steps=50))
    log = StepLog(model)
    orig = model.forward

    def spy(x, t):
        log.t = int(t[0])
        return orig(x, t)

    model.forward = spy
    a = generate(model, cfg, 2, num_sample_steps=4)
    b = generate(model, cfg, 2, num_sample_steps=4, steps_schedule="3")  # the constant schedule: the same images
    assert torch.equal(a, b)
    log.calls.clear()
    c = generate(model, cfg, 2, num_sample_steps=4, steps_schedule="t<25:1,2")
    assert log.calls == [(37, 2), (25, 2), (12, 1), (0, 1)]
    assert not torch.equal(a, c)
    assert model.spiking_steps is None  # restored after sampling

    # a call with K steps is the model with num_steps K (same weights: a non-TSM model does not depend on it)
    one = tiny_model(num_steps=1)
    one.load_state_dict(model.state_dict())
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 12)
    model.set_spiking_steps(1)
    assert torch.equal(orig(x, t), one(x, t))
    model.set_spiking_steps(None)


def test_tsm_model_uses_the_first_scales():
    model = tiny_model(num_steps=3, tsm=True)
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 7)
    two = tiny_model(num_steps=2, tsm=True)
    state = {k: (v[:2] if k.endswith("tsmp") else v) for k, v in model.state_dict().items()}
    two.load_state_dict(state)
    model.set_spiking_steps(2)
    assert torch.equal(model(x, t), two(x, t))
    with pytest.raises(ConfigError, match="TSM model runs 1..3"):
        model.set_spiking_steps(4)


# ------------------------------------------------------------------------------------------------ export, engines

@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    d = tmp_path_factory.mktemp("sched")
    ckpt = tiny_checkpoint(d / "m.pt", head="sdm")
    return dict(ckpt=ckpt, float=export_checkpoint(ckpt, d / "m.nir", steps_schedule="t<10:1,2"),
                int8=export_checkpoint(ckpt, d / "m8.nir", quantize="int8", calibration="builtin",
                                       calibration_images=8, steps_schedule="t<10:1,2"), dir=d)


def test_export_writes_the_schedule_and_both_engines_honour_it(exports):
    g = nir.read(exports["int8"])
    np.testing.assert_array_equal(np.asarray(g.metadata["steps_schedule"]), [[10, 1], [20, 2]])
    program = load_program(exports["int8"])
    assert steps_schedule_of(program) == "t<10:1,2"
    runs = {e: simulate(load_program(exports["int8"]), e, 2, steps=4, seed=1, batch_size=2) for e in ("event", "torch")}
    (ie, se, _), (it, st, _) = runs["event"], runs["torch"]
    assert torch.equal(ie, it)
    assert se.meta["spiking_steps_per_call"] == [2, 2, 1, 1] and se.timesteps == [15, 10, 5, 0]
    assert se.meta["steps_schedule"] == "t<10:1,2"
    for layer, cs in se.layers.items():
        for c, v in cs.items():
            np.testing.assert_array_equal(v, st.layers[layer][c], err_msg=f"{layer}.{c}")
            assert not v[2:, 1].any(), f"{layer}.{c}: a one-step call counts nothing at step 1"
    updates = se.total("neuron_updates")
    plain, sp, _ = simulate(load_program(exports["int8"]), "event", 2, steps=4, seed=1, batch_size=2,
                            steps_schedule="")
    assert sp.total("neuron_updates") == updates * 4 // 3  # 2+2+1+1 steps against 2+2+2+2
    np.testing.assert_array_equal(se.host["host_macs"][2:], [host_counts(program, 2, 1)["host_macs"]] * 2)


def test_float_export_on_the_engine_matches_the_gpu_path_with_a_schedule(exports):
    model, config = load_model(exports["ckpt"])
    img, _, _ = simulate(load_program(exports["float"]), "torch", 2, steps=4, seed=3, batch_size=2)
    want = generate(model, config, 2, seed=3, num_sample_steps=4, batch_size=2, steps_schedule="t<10:1,2")
    assert float((img - want).abs().max()) < 1e-3
    other = generate(model, config, 2, seed=3, num_sample_steps=4, batch_size=2)
    assert float((other - want).abs().max()) > 1e-3  # the schedule changed the images


def test_cli_simulate_overrides_the_graph_schedule(exports, tmp_path):
    from conftest import invoke

    r = invoke("simulate", exports["int8"], "--num-images", "1", "--steps", "2", "--steps-schedule", "1",
               "--out", tmp_path / "s")
    assert r.exit_code == 0, r.output
    stats = json.loads((tmp_path / "s" / "stats.json").read_text())
    assert stats["num_steps"] == 1 and stats["meta"]["steps_schedule"] == "1"


def test_bad_schedule_metadata_and_options(exports):
    program = load_program(exports["float"])
    program.metadata["steps_schedule"] = np.array([[10, 1], [19, 2]])
    with pytest.raises(GraphError, match="end at num_diffusion_steps = 20"):
        simulate(program, "event", 1, steps=2)
    program.metadata["steps_schedule"] = np.array([1.5, 2])
    with pytest.raises(GraphError, match="steps_schedule is invalid"):
        simulate(program, "event", 1, steps=2)
    with pytest.raises(ConfigError, match="--steps-schedule"):
        simulate(load_program(exports["float"]), "event", 1, steps=2, steps_schedule="t<30:1,2")
    d = exports["dir"]
    r = neurosdm("sample", exports["ckpt"], "--out", d / "s", "--steps-schedule", "t<5:0,2", cwd=d)
    assert_one_line_error(r, "spiking steps must be in")
    assert not (d / "s").exists()
    r = neurosdm("export", exports["ckpt"], "--to", "nir", "--out", d / "x.nir", "--steps-schedule", "2,", cwd=d)
    assert_one_line_error(r, "steps schedule")
    assert not (d / "x.nir").exists()


# ------------------------------------------------------------------------------------------------ rate penalty

MODEL = dict(img_ch=1, image_size=8, ch=4, ch_mult=(1, 2), num_res_blocks=1, num_steps=2, num_diffusion_steps=20)


def small_config(**train) -> Config:
    return Config(ModelConfig(**MODEL), DiffusionConfig(num_diffusion_steps=20),
                  TrainConfig(**{"batch_size": 8, "steps": 6, "lr": 1e-3, "warmup": 1, "ckpt_every": 0,
                                 "log_every": 1, **train}))


def data(n=32):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_rate_penalty_by_hand():
    rates = {"a": torch.tensor(0.30), "b": torch.tensor(0.05)}
    assert float(rate_penalty(rates, 0.0)) == pytest.approx(0.175)
    assert float(rate_penalty(rates, 0.1)) == pytest.approx(0.1)  # (0.2 + 0) / 2


def test_penalty_free_path_installs_no_hook():
    tr = Trainer(small_config(), data=data())
    assert tr.spike_rates is None
    assert not any(m._forward_hooks for m in tr.model.modules())


def test_rate_penalty_lowers_firing_and_is_logged(tmp_path):
    def mean_rate(tr):
        rates = []
        hooks = [m.register_forward_hook(lambda m, i, o: rates.append(float(o.float().mean())))
                 for m in tr.model.modules() if isinstance(m, SpikingNeurons)]
        with torch.no_grad():
            tr.model.eval()
            tr.diffusion.loss(tr.model, data(), torch.Generator().manual_seed(9))
        for h in hooks:
            h.remove()
        return float(np.mean(rates))

    plain = Trainer(small_config(steps=12), data=data())
    penal = Trainer(small_config(steps=12, rate_penalty=10.0), data=data())
    for _ in range(12):
        plain.step()
        penal.step()
    assert set(penal.last_rates) == {n for n, m in penal.model.named_modules() if isinstance(m, SpikingNeurons)}
    assert mean_rate(penal) < 0.7 * mean_rate(plain)

    cfg = small_config(steps=2, rate_penalty=0.5, rate_target=0.1)
    train(cfg, tmp_path, num_sample_images=0)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and len(rows[0]["rates"]) == len(penal.last_rates)
    assert rows[0]["rate_penalty"] == pytest.approx(np.mean([max(0, r - 0.1) for r in rows[0]["rates"].values()]))


def test_rate_penalty_options_refused(tmp_path):
    with pytest.raises(ConfigError, match="--rate-penalty must be >= 0"):
        TrainConfig(rate_penalty=-1.0)
    with pytest.raises(ConfigError, match=r"--rate-target must be in \[0, 1\)"):
        TrainConfig(rate_penalty=1.0, rate_target=1.5)
    r = neurosdm("train", "--out", tmp_path / "o", "--rate-target", "0.1", "--steps", "1", cwd=tmp_path)
    assert_one_line_error(r, "--rate-target needs --rate-penalty")
    r = neurosdm("train", "--out", tmp_path / "o", "--rate-penalty", "1", "--ann", "--steps", "1", cwd=tmp_path)
    assert_one_line_error(r, "QCFS")
    assert not (tmp_path / "o").exists()
