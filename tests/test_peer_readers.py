"""What the peer frameworks' NIR readers do with a neurosdm float export (pins down docs/peer-readers.md).

Each test imports a (small, random) export with one peer's reader and checks the behaviour the document
reports: what reproduces ``run_graph`` exactly and what fails, and how. A peer that is not installed is skipped.
If a peer release changes behaviour, these tests fail: rerun ``python scripts/peer_readers.py`` and update the
expectations here.
"""

import importlib.metadata
import importlib.util
import json
import sys
import warnings
from pathlib import Path

import nir
import numpy as np
import pytest
import torch

from neurosdm.exporters.nir import run_reference, to_nir_graph
from neurosdm.exporters.rewrite import inline_junctions
from neurosdm.simulators.reference import Discretisation, run_graph
from test_export_nir import _model

ROOT = Path(__file__).resolve().parents[1]
NUM_STEPS = 3


def _load_script():
    spec = importlib.util.spec_from_file_location("peer_readers", ROOT / "scripts" / "peer_readers.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, mod)  # dataclasses look the module up
    spec.loader.exec_module(mod)
    return mod


pr = _load_script()


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    """A tiny random SDM-head UNet (the shipped checkpoint's layout), exported, written and read back."""
    model = _model("sdm", (1, 2), num_steps=NUM_STEPS)  # random BN statistics and biases
    g, _ = to_nir_graph(model.eval())
    path = tmp_path_factory.mktemp("peer") / "tiny.nir"
    nir.write(path, g)
    return nir.read(path)


@pytest.fixture(scope="module")
def cases(graph):
    """``{variant: (graph, reference output)}`` and the input."""
    vs = pr.variants(graph)
    x = pr.make_input(graph)
    refs = {k: (g, run_graph(g, x[None].astype(np.float64), num_steps=NUM_STEPS)["outputs"]["output"])
            for k, g in vs.items()}
    return refs, x


def _run(model, x, reset=None):
    outs, notes = pr.run_peer(model, x, NUM_STEPS, reset)
    return np.stack(outs), notes


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _nontrivial_spikes(ref):
    assert set(np.unique(ref)) == {0.0, 1.0} and 0.05 < ref.mean() < 0.95


# ---------------------------------------------------------------------------------------------- spikingjelly


def test_spikingjelly_reader(cases):
    sj = pytest.importorskip("spikingjelly.activation_based.nir_exchange",
                             reason="spikingjelly (>= 2.0 for nir_exchange) is not installed")
    refs, x = cases
    with pytest.raises(ValueError, match=r"Unknown node type <class 'nir\.ir\.linear\.Scale'>"):
        sj.import_from_nir(refs["whole"][0], dt=1.0)
    with pytest.raises(ValueError, match=r"Unknown node type <class 'nir\.ir\.neuron\.LI'>"):
        sj.import_from_nir(refs["stem_li"][0], dt=1.0)
    with pytest.raises(ValueError, match=r"nir\.IF\.r must equal 1 / dt"):  # default dt = 1e-4
        sj.import_from_nir(refs["stem_if"][0])

    g, ref = refs["stem_if"]  # spikes: exact
    _nontrivial_spikes(ref)
    out, _ = _run(sj.import_from_nir(g, dt=1.0), x)
    np.testing.assert_array_equal(out, ref)
    g, ref = refs["block"]  # fan-in at an IF: summed correctly
    _nontrivial_spikes(ref)
    out, _ = _run(sj.import_from_nir(g, dt=1.0), x)
    np.testing.assert_array_equal(out, ref)
    g, ref = refs["stem"]
    out, _ = _run(sj.import_from_nir(g, dt=1.0), x)
    assert np.abs(out - ref).max() < 1e-5
    # the whole network without Scale junctions runs (float64: exact), but the Output's fan-in is not summed
    g, ref = refs["whole_no_scale"]
    fan_in = sum(1 for _, dst in g.edges if dst == "output")
    assert fan_in > 1
    out, notes = _run(sj.import_from_nir(g, dt=1.0, dtype=torch.float64), x)
    assert notes.get("unsummed_outputs") == fan_in
    assert np.abs(out - ref).max() < 1e-9


def test_spikingjelly_runs_junction_free_export(graph):
    """The whole export with its junctions as edges (inline_junctions, identity 1x1 conv before the Output): read
    and run by spikingjelly in float32, one output tensor, equal to the reference interpreter's output."""
    sj = pytest.importorskip("spikingjelly.activation_based.nir_exchange",
                             reason="spikingjelly (>= 2.0 for nir_exchange) is not installed")
    pytest.importorskip("nirtorch", reason="nirtorch is not installed")
    g = inline_junctions(graph, output_junction="conv")
    assert not any(isinstance(n, nir.Scale) for n in g.nodes.values())
    x = pr.make_input(graph)
    _, res = run_reference(g, None, x, int(g.metadata["diffusion_step"]))  # the biases the graph holds
    ref = res["outputs"]["output"]
    assert ref.shape[0] == NUM_STEPS and np.abs(ref).max() > 0.1
    out, notes = _run(_quiet(sj.import_from_nir, g, dt=1.0), x)
    assert "unsummed_outputs" not in notes
    assert out.shape == ref.shape and np.abs(out - ref).max() < 1e-5
    # the same check fails when one rewired edge is lost
    old = {tuple(e) for e in graph.edges}
    lost = next(e for e in g.edges if tuple(e) not in old and e[1] != "output")
    assert lost[0] != "input" and lost not in old
    g2 = nir.NIRGraph(nodes=g.nodes, edges=[e for e in g.edges if e != lost], metadata=g.metadata, type_check=False)
    out2, _ = _run(_quiet(sj.import_from_nir, g2, dt=1.0), x)
    assert np.abs(out2 - ref).max() > 1e-3


# ----------------------------------------------------------------------------------------------------- Norse


def test_norse_reader(cases):
    nt = pytest.importorskip("norse.torch", reason="Norse is not installed")
    refs, x = cases
    with pytest.raises(KeyError, match="down0_sum"):  # the Scale node is dropped, then its edge fails
        _quiet(nt.from_nir, refs["whole"][0])

    for name in ("stem_if", "block"):  # IAFCell: v += x, fire, reset to 0; the block's edge order is benign
        g, ref = refs[name]
        _nontrivial_spikes(ref)
        out, _ = _run(_quiet(nt.from_nir, g), x)
        np.testing.assert_array_equal(out, ref)
    # the same block with its edge list reordered: depth-first pre-order runs down0.sum.if before down0.conv2
    g, _ = refs["block"]
    skip = ("stem.conv_identity", "down0.sum.if")
    g2 = nir.NIRGraph(nodes=g.nodes, edges=[skip] + [e for e in g.edges if e != skip], metadata=dict(g.metadata))
    ref2 = run_graph(g2, x[None].astype(np.float64), num_steps=NUM_STEPS)["outputs"]["output"]
    np.testing.assert_array_equal(ref2, refs["block"][1])  # the same graph for NIR
    out, _ = _run(_quiet(nt.from_nir, g2), x)
    assert out.shape == ref2.shape and np.abs(out - ref2).max() > 0.1
    # the LI readout is silently dropped: the module returns stem.conv_identity
    out, _ = _run(_quiet(nt.from_nir, refs["stem_li"][0]), x)
    assert np.abs(out - refs["stem"][1]).max() < 1e-5
    assert np.abs(out - refs["stem_li"][1]).max() > 0.1


# -------------------------------------------------------------------------------------------------- snnTorch


def test_snntorch_reader(cases, capsys):
    sn = pytest.importorskip("snntorch.import_nir", reason="snnTorch is not installed")
    refs, x = cases
    with pytest.raises(ValueError, match=r"Unknown node type <class 'nir\.ir\.linear\.Scale'>"):
        sn.import_from_nir(refs["whole"][0])
    with pytest.raises(ValueError, match=r"Unknown node type <class 'nir\.ir\.neuron\.LI'>"):
        sn.import_from_nir(refs["stem_li"][0])
    # an IF followed by another node: the Leaky's (spk, mem) tuple reaches the conv
    model = sn.import_from_nir(refs["stem"][0])
    with pytest.raises(TypeError, match=r"conv2d\(\) received an invalid combination of arguments - got \(tuple"):
        _run(model, x, pr._snn_reset)

    g, ref = refs["stem_if"]
    _nontrivial_spikes(ref)
    model = sn.import_from_nir(g)
    leaky = [m for m in model.modules() if hasattr(m, "reset_mechanism")]
    assert len(leaky) == 1 and abs(float(leaky[0].beta) - 0.9) < 1e-6 and leaky[0].reset_mechanism == "subtract"
    out, notes = _run(model, x, pr._snn_reset)
    assert notes.get("output_is_tuple") == 2
    assert (out != ref).mean() > 0.01  # not the IF neurosdm wrote ...
    ifn = g.nodes["stem.conv.if"]  # ... but a LIF with beta 0.9 (tau = 10 dt, r = tau) and reset by subtraction
    lif = nir.LIF(tau=np.full_like(ifn.r, 10.0), r=np.full_like(ifn.r, 10.0), v_leak=np.zeros_like(ifn.r),
                  v_threshold=ifn.v_threshold, v_reset=ifn.v_reset)
    g_lif = nir.NIRGraph(nodes={**g.nodes, "stem.conv.if": lif}, edges=g.edges)
    ref_lif = run_graph(g_lif, x[None].astype(np.float64), num_steps=NUM_STEPS,
                        disc=Discretisation(reset="subtract", comparison=">"))["outputs"]["output"]
    np.testing.assert_array_equal(out, ref_lif)


# ---------------------------------------------------------------------------------------------------- the doc


def test_doc_matches_installed_versions():
    """docs/data/peer_readers.json was made with the peer versions installed here (else regenerate it)."""
    data = json.loads((ROOT / "docs" / "data" / "peer_readers.json").read_text())
    doc = (ROOT / "docs" / "peer-readers.md").read_text()
    checked = 0
    for name, entry in data["peers"].items():
        dist = {"spikingjelly": "spikingjelly", "Norse": "norse", "snnTorch": "snntorch"}[name]
        try:
            installed = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        assert entry["version"] == installed, (f"{name} {installed} is installed but docs/peer-readers.md describes "
                                               f"{entry['version']}: rerun python scripts/peer_readers.py")
        assert f"{name} {installed}" in doc
        checked += 1
    if not checked:
        pytest.skip("no peer framework installed")
