"""``neurosdm export --to lava`` (neurosdm.exporters.lava): the netx HDF5 layout read back with h5py, the chain and
its stop reasons, errors; and, where the Python 3.10 Lava environment exists (.venv-lava), Lava itself."""

import json
import subprocess
from pathlib import Path

import h5py
import nir
import numpy as np
import pytest
from typer.testing import CliRunner

from neurosdm import cli
from neurosdm.errors import GraphError, QuantizationError
from neurosdm.exporters.lava import feedforward_chain, write_netx
from neurosdm.graph.dialect import graph_at
from neurosdm.loihi import loihi_params, run_in_lava_units
from neurosdm.simulators.reference import run_graph

ROOT = Path(__file__).resolve().parents[1]
LAVA_PY = ROOT / ".venv-lava" / "bin" / "python"
runner = CliRunner()


def _conv(rng, c_out, c_in, k, hw, stride=1, pad=1, scale=40):
    return nir.Conv2d(input_shape=np.array(hw), weight=rng.integers(-scale, scale + 1, (c_out, c_in, k, k)) * 1.0,
                      stride=np.array([stride, stride]), padding=np.array([pad, pad]), dilation=np.array([1, 1]),
                      groups=1, bias=rng.integers(-20, 20, c_out) * 1.0)


def _if(shape, th):
    return nir.IF(r=np.ones(shape), v_threshold=np.full(shape, float(th)), v_reset=np.zeros(shape))


def chain_graph(seed=0, metadata=None):
    """Input (2, 6, 6) spikes -> conv 3x3 -> IF (4, 6, 6) -> conv 3x3 stride 2 -> IF (3, 3, 3) -> Output."""
    rng = np.random.default_rng(seed)
    nodes = {"input": nir.Input(input_type=np.array([2, 6, 6])), "c1": _conv(rng, 4, 2, 3, (6, 6)),
             "n1": _if((4, 6, 6), 50), "c2": _conv(rng, 3, 4, 3, (6, 6), stride=2), "n2": _if((3, 3, 3), 60),
             "output": nir.Output(output_type=np.array([3, 3, 3]))}
    edges = [("input", "c1"), ("c1", "n1"), ("n1", "c2"), ("c2", "n2"), ("n2", "output")]
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata=dict(metadata or {}))


def test_netx_layout_of_a_spiking_chain(tmp_path):
    g = chain_graph()
    path, chain = write_netx(tmp_path / "chain.net", g, source="chain.nir")
    assert chain.input_node == "input" and [(L.conv, L.neuron) for L in chain.layers] == [("c1", "n1"), ("c2", "n2")]
    assert chain.stop_node == "output" and "output" in chain.stop_reason
    with h5py.File(path) as f:
        assert sorted(f["layer"].keys()) == ["0", "1", "2"]
        assert f["layer/0/type"][0] == b"input" and f["layer/0/shape"][()].tolist() == [2, 6, 6]
        for i, (conv, neuron, shape) in enumerate([("c1", "n1", [4, 6, 6]), ("c2", "n2", [3, 3, 3])], start=1):
            L = f[f"layer/{i}"]
            assert L["type"][0] == b"conv" and L["shape"][()].tolist() == shape
            assert np.array_equal(L["weight"][()], g.nodes[conv].weight) and L["weight"].dtype == np.int32
            assert np.array_equal(L["bias"][()], g.nodes[conv].bias)
            assert L["kernelSize"][()].tolist() == [3, 3] and int(L["groups"][()]) == 1
            assert L["inChannels"][()] == g.nodes[conv].weight.shape[1] and L["outChannels"][()] == shape[0]
            n = L["neuron"]
            assert n["type"][0] == b"CUBA" and (n["iDecay"][()], n["vDecay"][()]) == (4096, 0)
            assert n["vThMant"][()] == g.nodes[neuron].v_threshold.flat[0] - 1
            assert L.attrs["nir_conv"] == conv and L.attrs["nir_neuron"] == neuron
        assert f["layer/2/stride"][()].tolist() == [2, 2] and f["layer/1/padding"][()].tolist() == [1, 1]
        assert f["simulation/tSample"][()] == 1
        assert f["neurosdm"].attrs["input_node"] == "input" and f["neurosdm"].attrs["source"] == "chain.nir"


def test_netx_of_the_int8_denoiser_export(tmp_path):
    """The int8 export's stem chain, values as the export holds them, biases of the chosen diffusion step."""
    from conftest import quantized

    _, _, _, qg, qmd = quantized("spiking")
    chain = feedforward_chain(qg, qmd)
    assert chain.input_node == "stem.conv.if"  # stem.conv reads the analog image: it stays on the host
    assert [(L.conv, L.neuron) for L in chain.layers] == [("stem.conv_identity", "stem.conv_identity.if"),
                                                        ("down0.conv1", "down0.if2")]
    assert chain.stop_node == "down0.conv2" and "residual sum" in chain.stop_reason
    t = 17
    g_t = graph_at(qg, qmd, t)
    path, _ = write_netx(tmp_path / "d.net", qg, qmd, diffusion_step=t)
    with h5py.File(path) as f:
        assert f["layer/0/shape"][()].tolist() == list(qg.nodes["stem.conv.if"].v_threshold.shape)
        for i, L in enumerate(chain.layers, start=1):
            conv, neuron = g_t.nodes[L.conv], g_t.nodes[L.neuron]
            assert np.array_equal(f[f"layer/{i}/weight"][()], conv.weight)
            assert np.array_equal(f[f"layer/{i}/bias"][()], conv.bias)  # time embedding of step t
            assert f[f"layer/{i}/neuron/vThMant"][()] == np.unique(neuron.v_threshold).item() - 1
            e = int(qmd["quant"]["weight_exponents"][L.conv])
            assert f[f"layer/{i}/"].attrs["weight_exponent"] == e
            k = int(f[f"layer/{i}/"].attrs["loihi_weight_exponent"])  # Loihi: 8-bit mantissa << k
            w = f[f"layer/{i}/weight"][()].astype(np.int64)
            assert np.array_equal((w >> k) << k, w) and -128 <= (w >> k).min() and (w >> k).max() <= 127
        assert not np.array_equal(f["layer/2/bias"][()], qg.nodes["down0.conv1"].bias)  # step 17 is not step 0
        assert f["neurosdm"].attrs["diffusion_step"] == t
        assert f["neurosdm"].attrs["state_exponent"] == int(qmd["quant"]["state_exponent"])
        assert f["simulation/tSample"][()] == int(qmd["num_steps"])
    _, _, _, tg, tmd = quantized("spiking", tsm=True)
    with pytest.raises(GraphError, match="'stem.conv_identity.tsm' is a TSM scale"):
        feedforward_chain(tg, tmd)


def test_stop_reasons_and_errors(tmp_path):
    rng = np.random.default_rng(3)
    g = chain_graph()
    nodes = dict(g.nodes)
    nodes["c3"] = _conv(rng, 3, 2, 3, (6, 6), stride=2)  # a second conv into n2: a split concat
    split = nir.NIRGraph(nodes=nodes, edges=list(g.edges) + [("input", "c3"), ("c3", "n2")], metadata={})
    chain = feedforward_chain(split)
    assert len(chain.layers) == 1 and chain.stop_node == "c2" and "concat" in chain.stop_reason
    floaty = chain_graph()
    floaty.nodes["c2"].weight[0, 0, 0, 0] += 0.5
    with pytest.raises(QuantizationError, match="'c2'.*integer weights"):
        write_netx(tmp_path / "x.net", floaty)
    with pytest.raises(QuantizationError, match="subtraction"):
        write_netx(tmp_path / "x.net", chain_graph(metadata={"reset": "subtract"}))
    no_neuron = nir.NIRGraph(nodes={"input": nir.Input(input_type=np.array([2])), "output": nir.Output(
        output_type=np.array([2]))}, edges=[("input", "output")], metadata={})
    with pytest.raises(GraphError, match="no spiking neuron"):
        feedforward_chain(no_neuron)
    assert not (tmp_path / "x.net").exists()  # nothing half-written


def test_cli_export_to_lava(tmp_path):
    nir.write(tmp_path / "chain.nir", chain_graph())
    r = runner.invoke(cli.app, ["export", str(tmp_path / "chain.nir"), "--to", "lava"])
    assert r.exit_code == 0, r.output
    assert "chain.net" in r.output and "2 layers" in r.output and "c1 -> n1" in r.output
    with h5py.File(tmp_path / "chain.net") as f:
        assert f["layer/2/type"][0] == b"conv"
    r = runner.invoke(cli.app, ["export", str(tmp_path / "chain.nir"), "--to", "lava"])
    assert r.exit_code == 1 and "already exists" in str(r.exception)


def test_cli_export_checkpoint_to_lava(tmp_path):
    """A checkpoint goes through the int8 export first. This random tiny model's time-embedding biases are too
    large for Loihi's 13-bit bias mantissa at its state unit: a one-line error naming the layer (the shipped
    checkpoint exports: docs/lava.md)."""
    from conftest import tiny_checkpoint

    tiny_checkpoint(tmp_path / "m.pt")
    r = runner.invoke(cli.app, ["export", str(tmp_path / "m.pt"), "--to", "lava", "--calibration", "builtin",
                                "--calibration-images", "8"])
    assert r.exit_code == 1 and isinstance(r.exception, QuantizationError), r.output
    assert "down0.if2" in str(r.exception) and "13-bit bias mantissa" in str(r.exception)
    assert not (tmp_path / "m.net").exists()


LIF_SCRIPT = r"""
import sys, types
import numpy as np
sys.path.insert(0, sys.argv[1])
from neurosdm.hardware.lava import lava_lif_run
z = np.load(sys.argv[2])
p = types.SimpleNamespace(**{k: int(z[k]) for k in ("du", "dv", "vth", "bias_exp")}, bias_mant=z["bias_mant"])
s, v = lava_lif_run(z["a"], p)
np.savez(sys.argv[3], s=s, v=v)
print("{}")
"""

NETX_SCRIPT = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from neurosdm.hardware.lava import netx_run
z = np.load(sys.argv[2])
outs = netx_run(sys.argv[3], z["spikes"].astype(np.int32), int(z["spikes"].shape[0]))
print(json.dumps([[int((o != z[f"n{i}"]).sum()), int(o.sum())] for i, o in enumerate(outs, start=1)]))
"""

needs_lava = pytest.mark.skipif(not LAVA_PY.exists(),
                                reason="Lava needs a Python 3.10 environment: run scripts/lava_env.sh")


def _in_lava(script, *args):
    r = subprocess.run([str(LAVA_PY), "-c", script, str(ROOT), *map(str, args)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@needs_lava
def test_lava_lif_is_bit_exact(tmp_path):
    """Lava's bit-accurate LIF process with a leak (dv = 410) against neurosdm's fixed_point_step in Lava's units
    (neurosdm.loihi.run_in_lava_units): spikes and membranes, every neuron and step."""

    rng = np.random.default_rng(0)
    a = rng.integers(-400, 700, size=(6, 2, 3, 4, 4))
    p = loihi_params(300, 3686, rng.integers(-60, 60, size=(2, 3)))
    np.savez(tmp_path / "in.npz", a=a, du=p.du, dv=p.dv, vth=p.vth, bias_exp=p.bias_exp, bias_mant=p.bias_mant)
    _in_lava(LIF_SCRIPT, tmp_path / "in.npz", tmp_path / "out.npz")
    out = np.load(tmp_path / "out.npz")
    s, v, _ = run_in_lava_units(a, p)
    assert s.any() and not s.all() and p.dv == 410
    assert np.array_equal(out["s"], s) and np.array_equal(out["v"], v)


@needs_lava
@pytest.mark.slow
def test_lava_netx_runs_the_export_bit_exact(tmp_path):
    """netx loads the exported chain and Lava's CPU simulator reproduces neurosdm's reference engine spike for
    spike in both layers (about 15 s here, most of it lava-dl's import of torch and slayer)."""
    rng = np.random.default_rng(0)
    g = chain_graph()
    net, _ = write_netx(tmp_path / "chain.net", g)
    spikes = (rng.random((5, 3, 2, 6, 6)) < 0.4).astype(np.float64)
    rec = run_graph(g, spikes, record=True)["records"]
    np.savez(tmp_path / "in.npz", spikes=spikes, n1=rec["n1"].astype(bool), n2=rec["n2"].astype(bool))
    res = _in_lava(NETX_SCRIPT, tmp_path / "in.npz", net)
    assert all(m == 0 and n > 0 for m, n in res), res
