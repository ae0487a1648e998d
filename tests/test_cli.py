import json
import subprocess
import sys

import nir
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from neurosdm import cli
from neurosdm.checkpoint import load_checkpoint

runner = CliRunner()


def invoke(*args):
    return runner.invoke(cli.app, [str(a) for a in args])


def test_help_lists_commands():
    r = invoke("--help")
    assert r.exit_code == 0
    for cmd in ("train", "sample", "info", "demo"):
        assert cmd in r.output


def test_train_options_reach_the_config(tmp_path, monkeypatch):
    seen = {}

    def fake_train(cfg, out, resume, init, device, progress, num_sample_images):
        seen.update(cfg=cfg, out=out, resume=resume, init=init, device=device)
        return out / "ckpt.pt"

    monkeypatch.setattr("neurosdm.train.train", fake_train)
    r = invoke("train", "--out", tmp_path, "--preset", "tiny", "--dataset", "mnist", "--steps", "7", "--num-steps",
               "2", "--tsm", "--head", "spiking", "--batch-size", "8", "--lr", "0.01", "--bf16", "--restart")
    assert r.exit_code == 0, r.output
    cfg = seen["cfg"]
    assert (cfg.train.dataset, cfg.train.steps, cfg.train.batch_size, cfg.train.lr, cfg.train.bf16) == \
        ("mnist", 7, 8, 0.01, True)
    assert (cfg.model.num_steps, cfg.model.tsm, cfg.model.head, cfg.model.ch) == (2, True, "spiking", 16)
    assert seen["resume"] is False and seen["init"] is None


def test_train_sample_info_end_to_end(tmp_path):
    out = tmp_path / "run"
    r = invoke("train", "--out", out, "--dataset", "builtin", "--steps", "2", "--batch-size", "4",
               "--sample-images", "2")
    assert r.exit_code == 0, r.output
    assert load_checkpoint(out / "ckpt.pt").step == 2
    r = invoke("sample", out / "ckpt.pt", "--out", tmp_path / "s", "--num-images", "3", "--steps", "2",
               "--sampler", "ddpm", "--threshold-scale", "0.99")
    assert r.exit_code == 0, r.output
    images = np.load(tmp_path / "s" / "samples.npy")
    assert images.shape == (3, 1, 28, 28) and images.min() >= -1 and images.max() <= 1
    assert (tmp_path / "s" / "samples.png").stat().st_size > 0
    r = invoke("info", out / "ckpt.pt")
    assert r.exit_code == 0 and "neurosdm" in r.output and "ch=16" in r.output


def test_sample_is_reproducible(sdm_reference, tmp_path):
    for name in ("a", "b"):
        r = invoke("sample", sdm_reference / "ckpt.pt", "--out", tmp_path / name, "--num-images", "2", "--steps", "2",
                   "--seed", "5")
        assert r.exit_code == 0, r.output
    assert np.array_equal(np.load(tmp_path / "a" / "samples.npy"), np.load(tmp_path / "b" / "samples.npy"))


def test_info_on_public_layout(sdm_reference):
    r = invoke("info", sdm_reference / "ckpt.pt")
    assert r.exit_code == 0
    assert "sdm" in r.output and "tsm=True" in r.output and "178,133" in r.output


@pytest.mark.parametrize("args,message", [
    (["info", "nope.pt"], "checkpoint not found"),
    (["sample", "nope.pt", "--out", "x"], "checkpoint not found"),
    (["train", "--out", "x", "--preset", "huge"], "unknown preset 'huge'"),
])
def test_user_errors_are_one_line(tmp_path, args, message):
    r = subprocess.run([sys.executable, "-m", "neurosdm", *args], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 1
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_bad_sampler_and_truncated_checkpoint(tmp_path, sdm_reference):
    r = subprocess.run([sys.executable, "-m", "neurosdm", "sample", str(sdm_reference / "ckpt.pt"), "--out", "o",
                        "--sampler", "euler"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 1 and "unknown sampler 'euler'" in r.stderr
    assert not (tmp_path / "o" / "samples.png").exists()
    data = (sdm_reference / "ckpt.pt").read_bytes()
    (tmp_path / "t.pt").write_bytes(data[:1000])
    r = subprocess.run([sys.executable, "-m", "neurosdm", "info", "t.pt"], cwd=tmp_path, capture_output=True,
                       text=True)
    assert r.returncode == 1 and "t.pt" in r.stderr and "Traceback" not in r.stderr


def test_demo_runs_on_shipped_checkpoint(tmp_path):
    if not cli.DEFAULT_CKPT.exists():
        pytest.skip("the shipped checkpoint neurosdm/assets/tiny_fashion.pt is not in this checkout")
    r = invoke("demo", "--out", tmp_path, "--num-images", "2", "--steps", "2")
    assert r.exit_code == 0, r.output
    assert "report:" in r.output and "bit for bit: True" in r.output
    for name in ("gpu_float32", "torch_engine", "event_engine"):
        assert np.load(tmp_path / f"images_{name}.npy").shape == (2, 1, 28, 28)
    html = (tmp_path / "report.html").read_text()
    for needle in ("loihi2", "ANN baseline", "synaptic operations", "data:image/png;base64", "Assumptions"):
        assert needle in html, needle
    energy = json.loads((tmp_path / "energy.json").read_text())
    assert set(energy["summary"]) >= {"loihi", "loihi2", "loihi-sanafe", "truenorth", "spinnaker2", "sdm-paper"}
    assert isinstance(nir.read(tmp_path / "model_int8.nir"), nir.NIRGraph)
    assert torch.load(cli.DEFAULT_CKPT, weights_only=True)["format"] == "neurosdm"


def test_usage_error_exit_code():
    r = subprocess.run([sys.executable, "-m", "neurosdm", "sample"], capture_output=True, text=True)
    assert r.returncode == 2 and "Missing argument" in r.stderr and "Traceback" not in r.stderr


def test_init_takes_architecture_from_checkpoint(tmp_path, monkeypatch, sdm_reference):
    seen = {}
    monkeypatch.setattr("neurosdm.train.train", lambda cfg, out, **kw: seen.update(cfg=cfg, **kw) or out / "c.pt")
    r = invoke("train", "--out", tmp_path, "--preset", "small", "--init", sdm_reference / "ckpt.pt", "--steps", "3")
    assert r.exit_code == 0, r.output
    m = seen["cfg"].model
    assert (m.ch, list(m.ch_mult), m.tsm, m.num_steps) == (16, [1, 2], True, 4)
    assert seen["init"] == str(sdm_reference / "ckpt.pt") and seen["cfg"].train.steps == 3


def test_compare_sampler_choices_come_from_the_library(tmp_path, monkeypatch):
    """`compare --sampler`: every sampler of neurosdm.diffusion.samplers.SAMPLERS that needs no Gamma table reaches
    neurosdm.compare.compare as given; others are usage errors (exit 2)."""
    from neurosdm.diffusion.samplers import SAMPLERS

    seen = []

    def fake_compare(source, out, num_images, steps, seed, sampler, *args, **kw):
        seen.append(sampler)
        return {"program": "p", "pairs": {}, "spike_agreement": {}, "engine_outputs_bit_identical": True,
                "counts_equal": True, "spikes_compared": 0, "seconds_per_image": {}}

    monkeypatch.setattr("neurosdm.compare.compare", fake_compare)
    table_free = [s for s in SAMPLERS if not s.startswith("analytic")]
    assert {"ddpm", "ddim", "dpm-solver"} <= set(table_free)
    for sampler in table_free:
        r = invoke("compare", tmp_path / "x.nir", "--sampler", sampler, "--out", tmp_path)
        assert r.exit_code == 0, r.output
    assert seen == table_free
    for sampler in ("euler", "analytic-ddpm"):
        r = invoke("compare", tmp_path / "x.nir", "--sampler", sampler, "--out", tmp_path)
        assert r.exit_code == 2 and seen == table_free


def test_energy_csv_is_the_library_csv_of_the_job_report(tmp_path, monkeypatch):
    """`energy --csv` prints neurosdm.energy.report_csv of what neurosdm.jobs.energy_report returns, as is."""
    from neurosdm.energy import report_csv

    report = {"layers": [{"layer": "c1", "kind": "conv", "terms": {"synop": {"count": 3, "pj": 1.5}}}],
              "host": {"terms": {"mac": {"count": 2, "pj": 4.0}}}, "static": {"pj": 9.0},
              "unpriced": [{"where": "c1", "term": "spike", "count": 7}]}
    handed = {}
    monkeypatch.setattr("neurosdm.jobs.energy_report", lambda file, **kw: handed.update(file=file, **kw) or report)
    r = invoke("energy", tmp_path / "stats.json", "--profile", "loihi", "--csv")
    assert r.exit_code == 0, r.output
    assert r.stdout_bytes.decode() == report_csv(report)
    assert handed["file"] == tmp_path / "stats.json" and handed["profile"] == "loihi" and handed["steps"] == 10


def test_demo_and_compare_pass_the_calibration_set_on(tmp_path, monkeypatch):
    """`demo --ckpt` on a checkpoint whose training set is not on the machine (the papers' CIFAR-10 model): the int8
    calibration set is chosen with --calibration / --data-dir / --calibration-images, handed to the export; `compare`
    takes --calibration-images too."""
    from neurosdm import report
    from neurosdm.errors import ConfigError

    seen = {}

    def fake_export(ckpt, out, **kw):
        seen.update(kw)
        raise ConfigError("stop here")

    monkeypatch.setattr(report, "export_checkpoint", fake_export)
    r = invoke("demo", "--out", tmp_path, "--ckpt", cli.DEFAULT_CKPT, "--calibration", "cifar10", "--data-dir",
               tmp_path / "noise", "--calibration-images", "8")
    assert isinstance(r.exception, ConfigError) and "stop here" in str(r.exception)
    assert (seen["quantize"], seen["calibration"], seen["data_dir"], seen["calibration_images"]) == \
        ("int8", "cifar10", str(tmp_path / "noise"), 8)

    got = {}
    monkeypatch.setattr("neurosdm.compare.compare",
                        lambda *a, **kw: got.update(args=a, kw=kw) or (_ for _ in ()).throw(ConfigError("stop")))
    r = invoke("compare", cli.DEFAULT_CKPT, "--out", tmp_path / "c", "--calibration", "cifar10", "--data-dir",
               tmp_path / "noise", "--calibration-images", "5")
    assert isinstance(r.exception, ConfigError), r.output
    assert got["args"][7:9] == ("cifar10", str(tmp_path / "noise")) and got["kw"]["calibration_images"] == 5
