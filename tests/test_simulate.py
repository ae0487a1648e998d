"""Whole generations on exported graphs (neurosdm.simulators.run), `neurosdm simulate` and `neurosdm compare`."""

import json

import nir
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from neurosdm import cli
from neurosdm.diffusion.samplers import host_ops_per_pixel
from neurosdm.exporters.pipeline import export_checkpoint
from neurosdm.graph.program import load_program
from neurosdm.simulators.run import host_counts, simulate
from neurosdm.simulators.stats import RunStats
from conftest import tiny_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("sim")
    out = {}
    for head in ("spiking", "sdm"):
        ckpt = tiny_checkpoint(d / f"{head}.pt", head=head)
        out[head] = dict(ckpt=ckpt,
                         int8=export_checkpoint(ckpt, d / f"{head}8.nir", quantize="int8", calibration="builtin",
                                                calibration_images=8),
                         float=export_checkpoint(ckpt, d / f"{head}.nir"))
    return out


@pytest.mark.parametrize("head", ["spiking", "sdm"])
def test_engines_generate_the_same_images_and_counts(exported, head):
    program = load_program(exported[head]["int8"])
    kw = dict(num_images=3, sampler="ddim", steps=4, seed=1, batch_size=2)
    img_e, st_e, _ = simulate(program, "event", **kw)
    img_t, st_t, _ = simulate(program, "torch", **kw)
    assert torch.equal(img_e, img_t)  # bit-identical on a quantised graph
    assert st_e.timesteps == st_t.timesteps and len(st_e.timesteps) == 4
    assert st_e.timesteps == sorted(st_e.timesteps, reverse=True)
    for layer, cs in st_t.layers.items():
        for c, v in cs.items():
            np.testing.assert_array_equal(st_e.layers[layer][c], v, err_msg=f"{layer} {c}")
            assert v.shape == (4, program.num_steps)
    assert st_e.total("spikes_out") > 0 and st_e.total("synops") > 0 and st_e.total("macs") > 0
    # host work: the sampler's update (and for the SDM head its head) per denoising step
    pixels = 3 * 64
    per_step = host_counts(program, 3)
    np.testing.assert_array_equal(
        st_e.host["host_elementwise"],
        [per_step["host_elementwise"] + pixels * host_ops_per_pixel("ddim", 0.0, True, i == 3) for i in range(4)])
    assert (st_e.host["host_macs"] > 0).all() == (head == "sdm")
    # another seed, other images; the same seed, the same images
    img_2, _, _ = simulate(program, "event", **dict(kw, seed=2))
    assert not torch.equal(img_2, img_e)


def test_host_counts_by_hand(exported):
    program = load_program(exported["spiking"]["int8"])
    # spiking head, int8: input encoding (1 per pixel) and the last step's output scaling, per image
    out = int(np.prod(program.by_name[program.outputs[0]].out_shape))
    assert host_counts(program, 2) == {"host_macs": 0, "host_elementwise": 2 * (64 + out)}
    program = load_program(exported["sdm"]["float"])
    k, ch = program.num_steps, 4
    assert host_counts(program, 1)["host_macs"] == k * 8 * 8 * 9 * (ch * 1 + 1)


def test_runstats_json_round_trip(exported, tmp_path):
    program = load_program(exported["spiking"]["float"])
    _, stats, _ = simulate(program, "torch", num_images=1, steps=2)
    stats.save(tmp_path / "s.json")
    back = RunStats.load(tmp_path / "s.json")
    assert back.timesteps == stats.timesteps and back.totals() == stats.totals()
    d = json.loads((tmp_path / "s.json").read_text())
    assert d["totals"]["spikes_out"] == stats.total("spikes_out") and d["meta"]["engine"] == "torch"


def test_cli_simulate(exported, tmp_path):
    r = runner.invoke(cli.app, ["simulate", str(exported["sdm"]["int8"]), "--engine", "event", "--num-images", "2",
                                "--steps", "3", "--out", str(tmp_path / "o"), "--save-spikes"])
    assert r.exit_code == 0, r.output
    for f in ("images.png", "images.npy", "stats.json", "layers.txt", "spikes.nird"):
        assert (tmp_path / "o" / f).exists(), f
    assert "synops" in r.output
    table = (tmp_path / "o" / "layers.txt").read_text()
    assert "down0.if2" in table and "neuron upd." in table
    data = nir.read_data(tmp_path / "o" / "spikes.nird")
    stats = RunStats.load(tmp_path / "o" / "stats.json")
    spikes = data.nodes["down0.if2"].observables["spikes"].data
    assert spikes.shape[:2] == (2, 3 * stats.num_steps)
    assert int(spikes.sum()) == int(stats.layers["down0.if2"]["spikes_out"].sum())
    # any sampler: DPM-Solver (order 2, 4 calls); the analytic ones need a Gamma table
    r = runner.invoke(cli.app, ["simulate", str(exported["sdm"]["int8"]), "--num-images", "1", "--steps", "4",
                                "--sampler", "dpm-solver", "--order", "2", "--out", str(tmp_path / "dpm")])
    assert r.exit_code == 0, r.output
    stats = RunStats.load(tmp_path / "dpm" / "stats.json")
    assert len(stats.timesteps) == 4 and stats.meta["sampler"] == "dpm-solver" and stats.meta["order"] == 2


def test_cli_compare(exported, tmp_path):
    r = runner.invoke(cli.app, ["compare", str(exported["spiking"]["ckpt"]), "--num-images", "2", "--steps", "3",
                                "--out", str(tmp_path / "c"), "--calibration", "builtin"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert set(res["pairs"]) == {"gpu_float32_vs_torch_engine", "gpu_float32_vs_event_engine",
                                 "torch_engine_vs_event_engine"}
    assert res["pairs"]["torch_engine_vs_event_engine"]["identical"]
    assert res["engine_outputs_bit_identical"] and res["counts_equal"]
    assert all(v == 1.0 for v in res["spike_agreement"].values()) and res["spikes_compared"] > 0
    assert (tmp_path / "c" / "compare.png").stat().st_size > 1000


def test_bad_inputs_are_one_line_errors(exported, tmp_path):
    import subprocess
    import sys

    g = nir.NIRGraph(nodes={"input": nir.Input(input_type={"input": np.array([2])}),
                            "output": nir.Output(output_type={"output": np.array([2])})},
                     edges=[("input", "output")])
    nir.write(tmp_path / "foreign.nir", g)
    cases = [(["simulate", str(tmp_path / "foreign.nir"), "--out", str(tmp_path / "x")], "not a neurosdm denoiser"),
             (["simulate", str(tmp_path / "nope.nir"), "--out", str(tmp_path / "x")], "not found"),
             (["simulate", str(exported["spiking"]["int8"]), "--num-images", "0", "--out", str(tmp_path / "x")],
              "--num-images"),
             (["simulate", str(exported["spiking"]["int8"]), "--engine", "event", "--device", "cuda", "--out",
               str(tmp_path / "x")], "cuda"),
             (["simulate", str(exported["spiking"]["int8"]), "--sampler", "analytic-ddim", "--out",
               str(tmp_path / "x")], "--gamma"),
             (["simulate", str(exported["spiking"]["int8"]), "--sampler", "euler", "--out", str(tmp_path / "x")],
              "unknown sampler")]
    for args, needle in cases:
        p = subprocess.run([sys.executable, "-m", "neurosdm", *args], capture_output=True, text=True)
        assert p.returncode == 1 and needle in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    p = subprocess.run([sys.executable, "-m", "neurosdm", "simulate", str(exported["spiking"]["int8"]), "--engine",
                        "spinnaker", "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert p.returncode == 2


def test_threshold_guidance_at_simulation_time(exported):
    """apply_threshold_scale sets every IF threshold by the exporter's rule; the spikes follow it."""
    import math

    from neurosdm.simulators.run import apply_threshold_scale

    for kind in ("float", "int8"):
        program = load_program(exported["spiking"][kind])
        md = program.metadata
        apply_threshold_scale(program, 1.3)
        ifs = [layer for layer in program.layers if layer.kind == "if"]
        expect = 1.3 * float(md["threshold"])
        if kind == "int8":
            expect = math.ceil(expect / 2.0 ** int(md["quant"]["state_exponent"]))
        assert all(np.all(layer.v_threshold == expect) for layer in ifs)
    kw = dict(num_images=2, steps=3, seed=0)
    _, low, _ = simulate(load_program(exported["spiking"]["int8"]), "torch", threshold_scale=0.7, **kw)
    _, high, _ = simulate(load_program(exported["spiking"]["int8"]), "torch", threshold_scale=1.5, **kw)
    assert low.total("spikes_out") > high.total("spikes_out") > 0
    assert low.meta["threshold_scale"] == 0.7
    with pytest.raises(Exception, match="positive"):
        apply_threshold_scale(load_program(exported["spiking"]["int8"]), -1.0)


@pytest.mark.parametrize("sampler, extra", [("dpm-solver", {"order": 2}), ("dpm-solver", {"order": 3}),
                                            ("analytic-ddim", {}), ("analytic-ddpm", {}), ("ddpm", {})])
def test_every_sampler_runs_the_exported_graph_as_the_gpu_path(exported, sampler, extra):
    """The float export on the torch engine (float64) inside each sampler gives the GPU path's images (the float32
    torch model, same per-image noise) to float rounding; one call per step, each at its own t, with the sampler's
    host work per call."""
    from neurosdm.checkpoint import load_model
    from neurosdm.diffusion.analytic import gamma_table
    from neurosdm.diffusion import GaussianDiffusion
    from neurosdm.diffusion.samplers import host_ops_schedule
    from neurosdm.sample import generate

    ckpt = exported["sdm"]["ckpt"]
    model, config = load_model(ckpt)
    steps = 5
    if sampler.startswith("analytic"):  # any Gamma in [0, 1] is a valid table; the sampler clips the variance
        ts = GaussianDiffusion(config.diffusion).timesteps(steps)
        extra = {"gamma": gamma_table(ts, np.linspace(0.2, 0.9, len(ts)))}
    kw = dict(num_images=2, sampler=sampler, steps=steps, seed=3, batch_size=2, **extra)
    program = load_program(exported["sdm"]["float"])
    img, stats, _ = simulate(program, "torch", **kw)
    want = generate(model, config, 2, seed=3, sampler=sampler, num_sample_steps=steps, batch_size=2, **extra)
    assert float((img - want).abs().max()) < 1e-3
    assert len(stats.timesteps) == steps and stats.timesteps == sorted(stats.timesteps, reverse=True)
    ops = host_ops_schedule(sampler, steps, 0.0, True, order=extra.get("order", 3))
    per_call = host_counts(program, 2)["host_elementwise"]
    np.testing.assert_array_equal(stats.host["host_elementwise"], [per_call + 2 * 64 * o for o in ops])
