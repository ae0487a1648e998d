"""`neurosdm simulate` and `neurosdm energy` on foreign NIR graphs (not neurosdm denoiser exports): a hand-built
nir graph (no framework) and a small snnTorch-exported conv net (skipped without snntorch)."""

from __future__ import annotations

import json

import nir
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from neurosdm import cli
from neurosdm.graph.program import load_program
from neurosdm.simulators.reference import Discretisation
from neurosdm.simulators.stats import RunStats
from neurosdm.simulators.torch_engine import TorchEngine

runner = CliRunner()


def invoke(*args):
    return runner.invoke(cli.app, [str(a) for a in args])


def _hand_graph(path):
    """input [1, 4, 4] -> conv -> LIF -> flatten -> affine -> IF -> output; metadata sets dt and the reset."""
    r = np.random.default_rng(0)
    nodes = {
        "input": nir.Input(input_type={"input": np.array([1, 4, 4])}),
        "conv": nir.Conv2d(input_shape=(4, 4), weight=r.normal(size=(2, 1, 3, 3)), stride=1, padding=1, dilation=1,
                           groups=1, bias=np.full(2, 0.1)),
        "lif": nir.LIF(tau=np.full((2, 4, 4), 2.0), r=np.full((2, 4, 4), 2.0), v_leak=np.zeros((2, 4, 4)),
                       v_threshold=np.full((2, 4, 4), 0.5)),
        "flat": nir.Flatten(input_type={"input": np.array([2, 4, 4])}, start_dim=0, end_dim=-1),
        "fc": nir.Affine(weight=r.normal(size=(3, 32)), bias=np.zeros(3)),
        "if": nir.IF(r=np.ones(3), v_threshold=np.full(3, 0.5)),
        "output": nir.Output(output_type={"output": np.array([3])}),
    }
    edges = [("input", "conv"), ("conv", "lif"), ("lif", "flat"), ("flat", "fc"), ("fc", "if"), ("if", "output")]
    g = nir.NIRGraph(nodes=nodes, edges=edges, metadata={"dt": 0.5, "reset": "subtract"}, type_check=False)
    nir.write(path, g)
    return path


def _direct(path, x, **disc):
    prog = load_program(path, disc=Discretisation(**disc))
    return TorchEngine(prog).run(x, record=True)


def test_simulate_hand_graph_npy_and_energy(tmp_path):
    graph = _hand_graph(tmp_path / "g.nir")
    x = np.random.default_rng(1).random((6, 3, 1, 4, 4)) * 2
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "run"
    r = invoke("simulate", graph, "--input", tmp_path / "x.npy", "--save-spikes", "--out", out)
    assert r.exit_code == 0, r.output
    # defaults: dt and reset from the metadata, method and comparison the stated defaults, all printed
    assert "dt 0.5 (metadata)" in r.output and "reset subtract (metadata)" in r.output
    assert "method euler (default)" in r.output and "comparison >= (default)" in r.output
    for name in ("outputs.npz", "stats.json", "layers.txt", "spikes.nird"):
        assert (out / name).stat().st_size > 0, name
    want = _direct(graph, x, dt=0.5, reset="subtract")
    outs = np.load(out / "outputs.npz")
    assert set(outs.files) == {"output"}
    np.testing.assert_array_equal(outs["output"], want["outputs"]["output"])
    stats = RunStats.load(out / "stats.json")
    assert (stats.num_steps, stats.images, stats.timesteps) == (6, 3, [0])
    assert {"conv", "lif", "fc", "if"} <= set(stats.layers)
    direct = {layer: {k: int(np.asarray(v).sum()) for k, v in cs.items()} for layer, cs in want["counts"].items()}
    assert stats.totals() == direct
    assert stats.total("spikes_out") > 0
    assert "lif" in (out / "layers.txt").read_text()
    spikes = nir.read_data(str(out / "spikes.nird"))
    assert set(spikes.nodes) == {"lif", "if"}
    lif = spikes.nodes["lif"].observables["spikes"]
    assert lif.data.shape == (3, 6, 32) and lif.dt == 0.5
    np.testing.assert_array_equal(lif.data, want["records"]["lif"].reshape(6, 3, 32).transpose(1, 0, 2) > 0)

    # options override the metadata
    r = invoke("simulate", graph, "--input", tmp_path / "x.npy", "--dt", "1", "--reset", "zero", "--comparison", ">",
               "--method", "exp", "--out", tmp_path / "run2")
    assert r.exit_code == 0, r.output
    assert "dt 1 (option)" in r.output and "method exp (option)" in r.output
    want2 = _direct(graph, x, dt=1.0, reset="zero", comparison=">", method="exp")
    np.testing.assert_array_equal(np.load(tmp_path / "run2" / "outputs.npz")["output"], want2["outputs"]["output"])

    # energy from the .nir (runs the torch engine) and from the saved stats.json: same total, NIR layer names
    r1 = invoke("energy", graph, "--input", tmp_path / "x.npy", "--profile", "loihi", "--json")
    assert r1.exit_code == 0, r1.output
    j1 = json.loads(r1.stdout)
    assert {"conv", "lif", "fc", "if"} <= {layer["layer"] for layer in j1["layers"]}
    assert j1["totals"]["total_pj"] > 0
    r2 = invoke("energy", out / "stats.json", "--profile", "loihi", "--json", "--graph", graph)  # mapped as r1
    assert r2.exit_code == 0, r2.output
    assert json.loads(r2.stdout)["totals"]["total_pj"] == pytest.approx(j1["totals"]["total_pj"])
    r3 = invoke("energy", graph, "--input", tmp_path / "x.npy", "--profile", "loihi")
    assert r3.exit_code == 0, r3.output
    assert "total " in r3.output and "foreign graph" in r3.output


def test_one_sample_npz_and_nir_data_inputs(tmp_path):
    graph = _hand_graph(tmp_path / "g.nir")
    x = np.random.default_rng(2).random((5, 2, 1, 4, 4)) * 2
    want = _direct(graph, x, dt=0.5, reset="subtract")["outputs"]["output"]
    # [T, *shape]: one sample, in an .npz under the Input node's name
    np.savez(tmp_path / "one.npz", input=x[:, 0], other=np.zeros(3))
    r = invoke("simulate", graph, "--input", tmp_path / "one.npz", "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "outputs.npz")["output"], want[:, :1])
    # NIR data: TimeGriddedData [samples, T, neurons] for the Input node
    data = nir.NIRGraphData({"input": nir.NIRNodeData({"x": nir.TimeGriddedData(
        x.reshape(5, 2, 16).transpose(1, 0, 2).copy(), 0.5)})})
    nir.write_data(str(tmp_path / "x.nird"), data)
    r = invoke("simulate", graph, "--input", tmp_path / "x.nird", "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(np.load(tmp_path / "b" / "outputs.npz")["output"], want)


def _one_line_error(r, *fragments):
    assert r.exit_code != 0
    msg = str(r.exception)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_bad_inputs_give_one_line_errors(tmp_path):
    graph = _hand_graph(tmp_path / "g.nir")
    np.save(tmp_path / "bad.npy", np.zeros((5, 2, 1, 4, 3)))
    r = invoke("simulate", graph, "--input", tmp_path / "bad.npy", "--out", tmp_path / "o")
    _one_line_error(r, "(5, 2, 1, 4, 3)", "[T, B, 1, 4, 4]", "'input'")
    r = invoke("simulate", graph, "--out", tmp_path / "o")
    _one_line_error(r, "--input", "[T, B, 1, 4, 4]")
    r = invoke("simulate", graph, "--input", tmp_path / "missing.npy", "--out", tmp_path / "o")
    _one_line_error(r, "not found", "[T, B, 1, 4, 4]")
    data = nir.NIRGraphData({"input": nir.NIRNodeData({"x": nir.TimeGriddedData(np.zeros((2, 5, 15)), 1.0)})})
    nir.write_data(str(tmp_path / "bad.nird"), data)
    r = invoke("simulate", graph, "--input", tmp_path / "bad.nird", "--out", tmp_path / "o")
    _one_line_error(r, "(2, 5, 15)", "16")
    r = invoke("energy", graph, "--input", tmp_path / "bad.npy", "--profile", "loihi")
    _one_line_error(r, "[T, B, 1, 4, 4]")
    r = invoke("simulate", graph, "--input", tmp_path / "bad.npy", "--reset", "sideways", "--out", tmp_path / "o")
    _one_line_error(r, "reset")
    assert not (tmp_path / "o" / "stats.json").exists()


def test_event_engine_on_a_foreign_graph(tmp_path):
    """`--engine event` runs a foreign graph too: the same outputs and the same stats as the torch engine."""
    graph = _hand_graph(tmp_path / "g.nir")
    x = np.random.default_rng(3).random((5, 2, 1, 4, 4)) * 2
    np.save(tmp_path / "x.npy", x)
    for engine in ("event", "torch"):
        r = invoke("simulate", graph, "--input", tmp_path / "x.npy", "--engine", engine, "--out", tmp_path / engine)
        assert r.exit_code == 0, r.output
        assert f"on the {engine} engine" in r.output
    np.testing.assert_allclose(np.load(tmp_path / "event" / "outputs.npz")["output"],
                               np.load(tmp_path / "torch" / "outputs.npz")["output"], rtol=0, atol=1e-9)
    event, torch_ = (RunStats.load(tmp_path / e / "stats.json") for e in ("event", "torch"))
    assert event.totals() == torch_.totals() and event.total("spikes_out") > 0


def test_snntorch_conv_net_simulate_and_energy(tmp_path):
    from conftest import snntorch_conv_net

    _, graph = snntorch_conv_net()
    nir.write(tmp_path / "snn.nir", graph)
    x = (torch.rand(12, 3, 1, 6, 6) * 2).numpy()
    np.save(tmp_path / "x.npy", x)
    opts = ["--dt", "1e-4", "--comparison", ">", "--reset", "zero"]
    r = invoke("simulate", tmp_path / "snn.nir", "--input", tmp_path / "x.npy", *opts, "--out", tmp_path / "run")
    assert r.exit_code == 0, r.output
    want = _direct(tmp_path / "snn.nir", x, dt=1e-4, comparison=">", reset="zero")
    stats = RunStats.load(tmp_path / "run" / "stats.json")
    direct = {layer: {k: int(np.asarray(v).sum()) for k, v in cs.items()} for layer, cs in want["counts"].items()}
    assert stats.totals() == direct and stats.total("spikes_out") > 0
    assert set(stats.layers) >= {layer.name for layer in load_program(tmp_path / "snn.nir").layers
                                 if layer.kind in ("conv", "lif", "affine")}
    outs = np.load(tmp_path / "run" / "outputs.npz")
    for name, v in want["outputs"].items():
        np.testing.assert_array_equal(outs[name], v)
    r = invoke("energy", tmp_path / "run" / "stats.json", "--profile", "loihi")
    assert r.exit_code == 0, r.output
    assert "total " in r.output
