"""Per-image noise streams (neurosdm.diffusion.noise) and torchrun sharding (neurosdm.distributed) of `sample`,
`simulate` and `evaluate`: the images (and summed counts, and FID) of 2 processes equal those of one, bit for bit."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from neurosdm.config import DiffusionConfig
from neurosdm.diffusion import GaussianDiffusion, ImageNoise, image_stream, sample
from neurosdm.distributed import World, gather_shards, shard_range, world_from_env
from neurosdm.errors import ConfigError
from neurosdm.exporters.pipeline import export_checkpoint
from neurosdm.graph.program import load_program
from neurosdm.simulators.run import merge_stats, simulate, simulate_sharded
from neurosdm.simulators.stats import RunStats

TINY = Path(__file__).resolve().parents[1] / "neurosdm" / "assets" / "tiny_fashion.pt"
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ per-image noise


def test_noise_rule_is_the_documented_seedsequence_child():
    """Image i of seed s: the i-th child of SeedSequence(s) feeding PCG64, float32 standard normals, x_T first."""
    shape = (1, 3, 2)
    noise = ImageNoise(7, [0, 5, 2])
    first, second = noise(shape), noise(shape)
    for j, i in enumerate([0, 5, 2]):
        child = np.random.SeedSequence(7).spawn(i + 1)[i]  # numpy's own spawning, not our formula
        rng = np.random.default_rng(child)
        np.testing.assert_array_equal(first[j].numpy(), rng.standard_normal(shape, dtype=np.float32))
        np.testing.assert_array_equal(second[j].numpy(), rng.standard_normal(shape, dtype=np.float32))
    assert first.dtype == torch.float32 and first.shape == (3, *shape)
    assert not torch.equal(first[0], first[1]) and not torch.equal(first, second)
    assert not torch.equal(ImageNoise(8, [0])(shape), ImageNoise(7, [0])(shape))  # the seed matters
    with pytest.raises(ConfigError, match="seed"):
        image_stream(-1, 0)


class _Oracle:
    """A denoiser with no batch coupling (eps = 0.3 x_t), so any batch difference comes from the noise."""

    training = False

    def __call__(self, x, t):
        return 0.3 * x


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.5), ("analytic-ddpm", 0.0),
                                         ("analytic-ddim", 0.0), ("dpm-solver", 0.0)])
def test_every_sampler_draws_each_images_noise_from_its_own_stream(sampler, eta):
    """A batch of three runs each image exactly as alone: x_T and every per-step draw follow the image."""
    d = GaussianDiffusion(DiffusionConfig(num_diffusion_steps=100))
    kw = dict(sampler=sampler, num_sample_steps=4, eta=eta, gamma=[0.5] * 100)
    shape = (1, 2, 2)
    batch_noise = ImageNoise(3, [0, 1, 2])
    batch = sample(_Oracle(), batch_noise(shape), d, noise=batch_noise, **kw)
    alone = []
    for i in range(3):
        n = ImageNoise(3, [i])
        alone.append(sample(_Oracle(), n(shape), d, noise=n, **kw))
    assert torch.equal(batch, torch.cat(alone))
    with pytest.raises(ValueError, match="not both"):
        sample(_Oracle(), batch_noise(shape), d, generator=torch.Generator(), noise=batch_noise, **kw)


def test_batch_size_does_not_change_the_noise_of_the_float_model():
    """The shipped model (GPU path) with DDPM: the same images for batch sizes 1, 3 and 8. Not bit for bit: the
    float32 time-embedding GEMM takes another kernel below 4 rows on these CPUs (a few 1e-6)."""
    from neurosdm.checkpoint import load_model
    from neurosdm.sample import generate

    model, config = load_model(TINY)
    kw = dict(sampler="ddpm", num_sample_steps=2)
    ref = generate(model, config, 8, 4, batch_size=8, **kw)
    for b in (1, 3):
        other = generate(model, config, 8, 4, batch_size=b, **kw)
        assert float((other - ref).abs().max()) < 1e-3, b
    # a shard that starts on a batch boundary is bit-identical to the same images of the whole run
    part = generate(model, config, 5, 4, batch_size=3, first_image=3, **kw)
    assert torch.equal(part, generate(model, config, 8, 4, batch_size=3, **kw)[3:])


@pytest.fixture(scope="module")
def tiny_int8(tmp_path_factory):
    """The shipped checkpoint exported to int8 NIR (8 calibration images of the built-in data)."""
    return export_checkpoint(TINY, tmp_path_factory.mktemp("dist") / "tiny8.nir", quantize="int8",
                             calibration="builtin", calibration_images=8)


def test_batch_size_and_shards_do_not_change_simulated_images_or_counts(tiny_int8):
    """On the int8 graph the denoiser is exact, so images and counts do not depend on the batch size at all, and
    the counts of disjoint shards add up to the whole run (merge_stats)."""
    program = load_program(tiny_int8)
    kw = dict(sampler="ddpm", steps=2, seed=3)
    img, st, _ = simulate(program, "torch", 3, batch_size=3, **kw)
    img1, st1, _ = simulate(program, "torch", 3, batch_size=1, **kw)
    counts = lambda s: {k: v for k, v in s.to_dict().items() if k != "meta"}  # noqa: E731 (meta has batch_size)
    assert torch.equal(img, img1) and counts(st) == counts(st1) and st1.meta["batch_size"] == 1
    a, sa, _ = simulate(program, "torch", 1, batch_size=1, first_image=0, **kw)
    b, sb, _ = simulate(program, "torch", 2, batch_size=1, first_image=1, **kw)
    merged = merge_stats([sa, RunStats(program.num_steps), sb])  # an empty shard (more ranks than batches)
    assert torch.equal(torch.cat([a, b]), img)
    assert merged.to_dict() == st1.to_dict() and merged.images == 3 and sa.total("spikes_out") > 0
    with pytest.raises(ConfigError, match="different runs"):
        merge_stats([sa, simulate(program, "torch", 1, sampler="ddpm", steps=3, seed=3)[1]])


# -------------------------------------------------------------------------------------------- the shards


def test_shard_range_is_disjoint_ordered_and_batch_aligned():
    for n, b, w in [(10, 3, 2), (5, 2, 2), (1, 4, 3), (64, 8, 3), (7, 1, 4)]:
        ranges = [shard_range(n, b, r, w) for r in range(w)]
        assert [i for rg in ranges for i in rg] == list(range(n))  # disjoint, covering, in rank order
        assert all(rg.start % b == 0 for rg in ranges if len(rg))
        sizes = [len(rg) for rg in ranges]
        assert max(sizes) - min(sizes) <= b  # balanced to within one batch
    assert shard_range(10, 3, 0, 2) == range(0, 6) and shard_range(10, 3, 1, 2) == range(6, 10)  # batches 0-1, 2-3
    assert len(shard_range(1, 4, 0, 3)) == 0 and shard_range(1, 4, 2, 3) == range(0, 1)
    with pytest.raises(ConfigError, match="batch-size"):
        shard_range(4, 0)


def test_world_from_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert world_from_env("cuda") == World(0, 1, 0, "cuda")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    w = world_from_env("cuda")
    assert (w.rank, w.size, w.device, w.is_main) == (3, 4, "cuda:1", False)
    assert world_from_env("cpu").device == "cpu"
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match="RANK=4"):
        world_from_env()
    monkeypatch.setenv("WORLD_SIZE", "x")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        world_from_env()


def test_one_process_world_gathers_in_place(tmp_path):
    arr = np.arange(6).reshape(3, 2)
    parts = gather_shards(World(), tmp_path, {"images": arr}, {"n": 3})
    assert len(parts) == 1 and parts[0][0]["images"] is arr and parts[0][1] == {"n": 3}
    assert not any(tmp_path.iterdir())  # no shard files without torchrun


# ---------------------------------------------------------------------------------- 2 processes under torchrun


def _torchrun(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node 2 -m neurosdm ARGS`` (one thread per
    process, eager neuron kernels: the settings of the one-process reference below)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", NEUROSDM_COMPILE="0", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "neurosdm", *map(str, args)]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture
def one_thread_eager(monkeypatch):
    """The one-process reference in this process with the workers' settings (1 thread, eager kernels)."""
    monkeypatch.setenv("NEUROSDM_COMPILE", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _no_shards_left(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if ".neurosdm-shards" in str(p) or p.name.endswith(".tmp")]


def test_torchrun_sample_equals_one_process(tmp_path, one_thread_eager):
    """DDIM with eta 1 (noise at every step), 5 images in batches of 2 over 2 ranks (2 + 3 images)."""
    from neurosdm.sample import sample_to_dir

    r = _torchrun(["sample", TINY, "--out", "two", "--num-images", "5", "--steps", "2", "--eta", "1.0",
                   "--batch-size", "2", "--seed", "11"], tmp_path)
    assert r.stdout.count("wrote ") == 1  # rank 0 speaks
    sample_to_dir(TINY, tmp_path / "one", 5, seed=11, num_sample_steps=2, eta=1.0, batch_size=2)
    two, one = np.load(tmp_path / "two" / "samples.npy"), np.load(tmp_path / "one" / "samples.npy")
    assert two.shape == (5, 1, 28, 28) and np.array_equal(two, one)
    assert (tmp_path / "two" / "samples.png").stat().st_size > 0 and _no_shards_left(tmp_path)


def test_torchrun_simulate_equals_one_process(tmp_path, tiny_int8, one_thread_eager):
    """The int8 graph on the torch engine, DDPM, 3 images in batches of 1 (rank 0: image 0, rank 1: 1-2): the
    same images and the same summed counts as one process."""
    r = _torchrun(["simulate", tiny_int8, "--engine", "torch", "--num-images", "3", "--steps", "2", "--sampler",
                   "ddpm", "--batch-size", "1", "--seed", "2", "--out", "two"], tmp_path)
    assert r.stdout.count("spikes,") == 1
    images, stats, _ = simulate_sharded(load_program(tiny_int8), "torch", 3, "ddpm", 2, 2, batch_size=1)
    assert np.array_equal(np.load(tmp_path / "two" / "images.npy"), images.numpy())
    two = json.loads((tmp_path / "two" / "stats.json").read_text())
    assert two == json.loads(json.dumps(stats.to_dict())) and two["images"] == 3
    assert two["totals"]["spikes_out"] > 0 and _no_shards_left(tmp_path)


def test_torchrun_evaluate_equals_one_process(tmp_path, one_thread_eager):
    """FID and IS of 4 images (classifier features) from 2 ranks are those of one process."""
    from neurosdm.metrics import evaluate

    cache = tmp_path / "cache"
    _torchrun(["evaluate", TINY, "--dataset", "builtin", "--num-images", "4", "--steps", "2", "--batch-size", "2",
               "--ref-images", "32", "--stats-cache", cache, "--out", tmp_path / "two.json"], tmp_path)
    two = json.loads((tmp_path / "two.json").read_text())
    one = evaluate(TINY, "builtin", 4, steps=2, ref_images=32, cache_dir=cache, batch_size=2)
    assert two["num_images"] == 4 and math.isfinite(two["fid"])
    assert (two["fid"], two["is"]) == (one["fid"], one["is"]) and one["reference_cached"]
    assert _no_shards_left(tmp_path)
