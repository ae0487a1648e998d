"""``neurosdm export --to nir`` and ``neurosdm inspect``: the float NIR export wired into the CLI."""

import h5py
import nir
import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, invoke, neurosdm, tiny_checkpoint

from neurosdm import cli
from neurosdm.checkpoint import file_sha256
from neurosdm.config import ModelConfig
from neurosdm.errors import ConfigError, GraphError
from neurosdm.exporters.pipeline import default_output_path, export_checkpoint
from neurosdm.graph.host import eps_from_outputs
from neurosdm.graph.inspect import inspect_nir
from neurosdm.simulators.reference import run_graph
from neurosdm.models import SpikingUNet


def test_help_lists_export_and_inspect():
    r = invoke("--help")
    assert r.exit_code == 0 and "export" in r.output and "inspect" in r.output


@pytest.mark.parametrize("head", ["spiking", "sdm"])
def test_export_then_inspect(tmp_path, head):
    ckpt = tiny_checkpoint(tmp_path / "run.pt", head=head)
    r = invoke("export", ckpt, "--to", "nir")
    assert r.exit_code == 0, r.output
    out = tmp_path / "run.nir"
    assert str(out) in r.output.replace("\n", "") and "nodes" in r.output and "MB" in r.output
    graph = nir.read(out)
    assert isinstance(graph.nodes["input"], nir.Input) and isinstance(graph.nodes["output"], nir.Output)
    assert graph.metadata["source_checkpoint"] == "run.pt"
    assert graph.metadata["source_checkpoint_sha256"] == file_sha256(ckpt)

    r = invoke("inspect", out)
    assert r.exit_code == 0, r.output
    assert "input" in r.output and "Conv2d" in r.output and "IF" in r.output and "edges valid" in r.output
    rows, totals = inspect_nir(out)
    assert totals["nodes"] == len(graph.nodes) == len(rows) and totals["edges"] == len(graph.edges)
    assert rows[0]["name"] == "input" and rows[0]["fan_in"] == 0
    by_name = {row["name"]: row for row in rows}
    w = graph.nodes["stem.conv"].weight
    assert by_name["stem.conv"]["synapses"] == w.size
    assert by_name["stem.conv"]["params"] == w.size + graph.nodes["stem.conv"].bias.size
    assert all(row["synapses"] == 0 for row in rows if row["type"] != "Conv2d")
    assert totals["synapses"] == sum(n.weight.size for n in graph.nodes.values() if isinstance(n, nir.Conv2d))
    assert by_name["output"]["fan_in"] == 1 and sum(row["fan_in"] for row in rows) == totals["edges"]


def test_export_uses_ema_weights_and_directory_default(tmp_path):
    run = tmp_path / "run"
    tiny_checkpoint(run / "ckpt.pt")
    assert default_output_path(run) == run / "model.nir"
    path = export_checkpoint(run)
    assert path == run / "model.nir"
    graph = nir.read(path)
    assert graph.metadata["weights"] == "ema"
    # the EMA model was built with other random weights than the trained one: the stem conv must be the EMA's
    state = torch.load(run / "ckpt.pt", weights_only=True)
    assert not torch.equal(state["ema"]["conv.weight"], state["model"]["conv.weight"])
    ema_stem = state["ema"]["conv.weight"].double().numpy()
    bn = {k[len("bn."):]: v.double().numpy() for k, v in state["ema"].items() if k.startswith("bn.")}
    scale = bn["weight"] / np.sqrt(bn["running_var"] + 1e-5)
    np.testing.assert_allclose(graph.nodes["stem.conv"].weight, ema_stem * scale[:, None, None, None],
                               rtol=1e-5, atol=1e-6)


def test_shipped_checkpoint_exports(tmp_path):
    if not cli.DEFAULT_CKPT.exists():
        pytest.skip("the shipped checkpoint neurosdm/assets/tiny_fashion.pt is not in this checkout")
    out = tmp_path / "tiny.nir"
    r = invoke("export", cli.DEFAULT_CKPT, "--to", "nir", "-o", out)
    assert r.exit_code == 0, r.output
    _, totals = inspect_nir(out)
    assert totals["nodes"] == 62 and totals["edges"] == 77
    meta = nir.read(out).metadata
    assert int(meta["num_diffusion_steps"]) == 1000 and int(meta["num_steps"]) == 4


def test_existing_output_needs_force(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    out = tmp_path / "m.nir"
    out.write_bytes(b"keep me")
    r = neurosdm("export", "m.pt", "--to", "nir", cwd=tmp_path)
    assert_one_line_error(r, "already exists", "--force")
    assert out.read_bytes() == b"keep me"
    r = neurosdm("export", ckpt, "--to", "nir", "--force", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert isinstance(nir.read(out), nir.NIRGraph)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.nir", "m.pt"]


def test_quantize_int8_export(tmp_path):
    tiny_checkpoint(tmp_path / "m.pt")
    r = invoke("export", tmp_path / "m.pt", "--to", "nir", "--quantize", "int8", "--calibration", "builtin",
               "--calibration-images", "16")
    assert r.exit_code == 0, r.output
    assert "int8" in r.output and "calibrated on 16 images" in r.output
    graph = nir.read(tmp_path / "m.nir")
    q = graph.metadata["quant"]
    assert graph.metadata["quantized"] == "int8" and int(q["weight_bits"]) == 8 and int(q["state_bits"]) == 24
    assert q["calibration"]["dataset"] == "builtin"
    for name, node in graph.nodes.items():  # stored as float32, integers where the unit says so
        if isinstance(node, nir.Conv2d):
            assert node.weight.dtype == np.float32 and np.all(node.bias == np.round(node.bias))
        if isinstance(node, nir.IF):
            assert np.all(node.v_threshold == np.round(node.v_threshold)) and node.v_threshold.min() >= 1
    # --junctions edges: no identity Scale left except in front of the Output
    r = invoke("export", tmp_path / "m.pt", "--to", "nir", "-o", tmp_path / "e.nir", "--junctions", "edges")
    assert r.exit_code == 0, r.output
    scales = [n for n, node in nir.read(tmp_path / "e.nir").nodes.items() if isinstance(node, nir.Scale)]
    assert len(scales) <= 1


def test_quantize_errors(tmp_path):
    tiny_checkpoint(tmp_path / "m.pt")
    r = neurosdm("export", "m.pt", "--to", "nir", "--quantize", "int8", "--calibration", "cifar10", cwd=tmp_path)
    assert_one_line_error(r, "cifar10")
    r = neurosdm("export", "m.pt", "--to", "nir", "--quantize", "int4", cwd=tmp_path)
    assert r.returncode == 2 and "int4" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
    with pytest.raises(ConfigError):
        export_checkpoint(tmp_path / "m.pt", quantize="int4")
    with pytest.raises(ConfigError):
        export_checkpoint(tmp_path / "m.pt", quantize="int8", calibration_images=0)


def test_unknown_format_is_a_usage_error(tmp_path):
    tiny_checkpoint(tmp_path / "m.pt")
    r = neurosdm("export", "m.pt", "--to", "onnx", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "onnx" in r.stderr
    r = neurosdm("export", "m.pt", cwd=tmp_path)
    assert r.returncode == 2 and "--to" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_public_sdm_tsm_checkpoint_exports_and_reproduces_its_output(tmp_path, sdm_reference):
    """The public SDM code's TSM model (fixture made by that code): the exported file, read back and run by the
    reference interpreter with the per-step tables, gives the public model's own eps."""
    r = neurosdm("export", sdm_reference / "ckpt.pt", "--to", "nir", "-o", "tsm.nir", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    graph = nir.read(tmp_path / "tsm.nir")
    md = graph.metadata
    assert int(md["tsm"]) == 1 and len(md["scale_tables"]) > 0
    x, t, ref = (np.load(sdm_reference / f) for f in ("x.npy", "t.npy", "eps.npy"))
    for i, step in enumerate(t):
        res = run_graph(graph, x[i:i + 1][None].astype(np.float64), num_steps=int(md["num_steps"]),
                        t=int(step))
        eps = eps_from_outputs(res["outputs"]["output"], md)
        assert np.abs(eps - ref[i:i + 1]).max() < 1e-4, (int(step), np.abs(eps - ref[i:i + 1]).max())


def test_missing_checkpoint(tmp_path):
    r = neurosdm("export", "nope.pt", "--to", "nir", cwd=tmp_path)
    assert_one_line_error(r, "checkpoint not found")


def test_inspect_rejects_text_and_truncated_files(tmp_path):
    (tmp_path / "notes.nir").write_text("hello, I am not a graph\n")
    r = neurosdm("inspect", "notes.nir", cwd=tmp_path)
    assert_one_line_error(r, "notes.nir", "not a NIR file", "hello")
    tiny_checkpoint(tmp_path / "m.pt")
    export_checkpoint(tmp_path / "m.pt", tmp_path / "m.nir")
    data = (tmp_path / "m.nir").read_bytes()
    (tmp_path / "cut.nir").write_bytes(data[: len(data) // 2])
    r = neurosdm("inspect", "cut.nir", cwd=tmp_path)
    assert_one_line_error(r, "cut.nir")
    r = neurosdm("inspect", "missing.nir", cwd=tmp_path)
    assert_one_line_error(r, "not found", "missing.nir")
    (tmp_path / "empty.nir").write_bytes(b"")
    r = neurosdm("inspect", "empty.nir", cwd=tmp_path)
    assert_one_line_error(r, "empty.nir", "empty file")


def test_inspect_validates_the_graph(tmp_path):
    ok = dict(input=nir.Input(input_type={"input": np.array([3])}),
              affine=nir.Affine(weight=np.ones((2, 3)), bias=np.zeros(2)),
              output=nir.Output(output_type={"output": np.array([2])}))
    nir.write(tmp_path / "ok.nir", nir.NIRGraph(nodes=ok, edges=[("input", "affine"), ("affine", "output")]))
    rows, totals = inspect_nir(tmp_path / "ok.nir")
    assert [r["name"] for r in rows] == ["input", "affine", "output"]
    assert rows[1]["synapses"] == 6 and rows[1]["params"] == 8 and totals["synapses"] == 6
    with h5py.File(tmp_path / "ok.nir", "a") as f:  # a dangling edge (nir.NIRGraph itself adds missing outputs)
        del f["node/nodes/output"]
    r = neurosdm("inspect", "ok.nir", cwd=tmp_path)
    assert_one_line_error(r, "ok.nir", "'output'", "does not exist")
    with pytest.raises(GraphError):
        inspect_nir(tmp_path / "ok.nir")


def test_failed_export_leaves_no_temp_file(tmp_path, monkeypatch):
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def broken_write(filename, graph, **kw):
        f = filename if hasattr(filename, "write") else open(filename, "wb")  # the HDF5 is written in memory
        f.write(b"\x89HDF\r\n\x1a\n half")  # a partial file, then an interruption
        raise KeyboardInterrupt

    monkeypatch.setattr("neurosdm.exporters.nir.nir.write", broken_write)
    r = invoke("export", ckpt, "--to", "nir", "-o", out_dir / "m.nir")
    assert r.exit_code != 0
    assert list(out_dir.iterdir()) == []

    def failing_write(filename, graph, **kw):
        f = filename if hasattr(filename, "write") else open(filename, "wb")  # the HDF5 is written in memory
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("neurosdm.exporters.nir.nir.write", failing_write)
    with pytest.raises(OSError):
        export_checkpoint(ckpt, out_dir / "m.nir")
    assert list(out_dir.iterdir()) == []


def test_sddpm_layout_exports_float_and_int8(tmp_path):
    """A checkpoint in the public SDDPM layout (bare state dict under net_model): float export reproduces the
    model; the int8 export of it calibrates (on the built-in sample) and runs in fixed point."""
    from neurosdm.simulators.reference import run_reference

    torch.manual_seed(0)
    cfg = ModelConfig(img_ch=1, image_size=28, ch=4, ch_mult=(1, 2), num_res_blocks=1, num_steps=4,
                      num_diffusion_steps=1000)
    model = SpikingUNet(cfg).eval()
    torch.save({"net_model": model.state_dict(), "step": 1}, tmp_path / "sddpm.pt")
    r = invoke("export", tmp_path / "sddpm.pt", "--to", "nir")
    assert r.exit_code == 0, r.output
    graph = nir.read(tmp_path / "sddpm.nir")
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x, torch.full((2,), 300)).double().numpy()
    eps, _ = run_reference(graph, graph.metadata, x.double().numpy(), 300)
    assert np.abs(eps - ref).max() < 1e-4
    r = invoke("export", tmp_path / "sddpm.pt", "--to", "nir", "--quantize", "int8", "-o", tmp_path / "q.nir",
               "--calibration-images", "8")
    assert r.exit_code == 0, r.output
    q = nir.read(tmp_path / "q.nir")
    eps_q, res = run_reference(q, q.metadata, x.double().numpy(), 300)
    assert np.isfinite(eps_q).all() and not res["saturations"] and eps_q.shape == ref.shape
