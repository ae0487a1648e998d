"""The NIR interop matrix (docs/peer-readers.md, scripts/peer_readers.py) and the peer export options.

- The committed matrix (docs/data/peer_readers.json) regenerates to the same classification and causes from the
  installed peers (the suite is small: one run of the survey, a few seconds).
- The options of ``neurosdm.exporters.rewrite.for_peer`` are checked by hand, independently of any peer: the
  threshold shift against the reference interpreter's two comparisons, the IF-as-LIF form against the IF, the
  input-gain fold and the edge order against the exported graph.
- ``neurosdm export ... --peer NAME`` writes the rewritten graph.
A peer that is not installed is skipped with the reason. If a peer release changes behaviour, the regeneration
test fails: rerun ``python scripts/peer_readers.py`` and review the new matrix.
"""

import importlib.metadata
import json
import warnings
from pathlib import Path

import nir
import numpy as np
import pytest
import torch
from conftest import invoke, tiny_checkpoint

from neurosdm.config import DiffusionConfig
from neurosdm.errors import ConfigError
from neurosdm.exporters.fixed_point import calibrate, calibration_inputs, quantize_graph
from neurosdm.exporters.nir import to_nir_graph
from neurosdm.exporters.rewrite import (
    fold_input_gain,
    for_peer,
    if_as_lif,
    strict_thresholds,
    topological_edges,
)
from neurosdm.graph.dialect import Discretisation
from neurosdm.simulators import peers as pr
from neurosdm.simulators.peers import snntorch as snn_peer
from neurosdm.simulators.reference import run_graph

ROOT = Path(__file__).resolve().parents[1]
DOC_JSON = ROOT / "docs" / "data" / "peer_readers.json"


def export_tiny(model, quantize=False, upsample="auto"):
    """What scripts/peer_readers.py exports for the suite: ``to_nir_graph`` float32, or int8 fixed point
    calibrated on 8 random images (seed ``pr.SEED``)."""
    graph, md = to_nir_graph(model, dtype=np.float64 if quantize else np.float32, upsample=upsample)
    if quantize:
        images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(pr.SEED)) * 2 - 1
        cal = calibrate(graph, md, calibration_inputs(images, DiffusionConfig(num_diffusion_steps=50), steps=2))
        graph, md = quantize_graph(graph, md, cal)
        graph = nir.NIRGraph(nodes=graph.nodes, edges=graph.edges, metadata=md)
    return graph


@pytest.fixture(scope="module")
def features():
    """The suite without the shipped checkpoint's whole graph (the slowest row; the tiny whole UNet stays)."""
    return pr.feature_graphs(export_tiny)


def _installed(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ------------------------------------------------------------------------------------------ the published matrix


def test_matrix_regenerates(features):
    """A fresh survey of the installed peers gives the classification and causes of the committed JSON, cell by
    cell (figures may move with float32 rounding; the class may not), for every row but ``whole_shipped``."""
    data = json.loads(DOC_JSON.read_text())
    doc = (ROOT / "docs" / "peer-readers.md").read_text()
    peers = [p for p in pr.PEERS if _installed(p.dist)]
    if not peers:
        pytest.skip("none of spikingjelly, norse, snntorch is installed: nothing to regenerate")
    fresh = pr.survey(features, for_peer, peers=peers)
    assert set(fresh["features"]) == set(data["features"]) - {"whole_shipped"}
    for p in peers:
        old, new = data["peers"][p.name], fresh["peers"][p.name]
        assert old["version"] == new["version"], (f"{p.name} {new['version']} is installed, the doc describes "
                                                  f"{old['version']}: rerun python scripts/peer_readers.py")
        assert f"{p.name} {new['version']}" in doc
        for f, cell in new["cells"].items():
            for form, r in cell.items():
                o = old["cells"][f][form]
                assert (r["status"], r.get("causes")) == (o["status"], o.get("causes")), (p.name, f, form)
                assert r["status"] == "exact" or r.get("causes") or (r["status"] == "no option" and r.get("error")), \
                    (p.name, f, form, "a cell without a cause")
    # the options fix everything that is neurosdm's to fix: what is left is labelled a framework limit
    for p in peers:
        for f, cell in fresh["peers"][p.name]["cells"].items():
            for c in cell["option"].get("causes", []):
                assert pr.CAUSES[c][0] == pr.FW, (p.name, f, c)


def test_classify_thresholds():
    assert pr.classify({"reads": False}) == "cannot read"
    assert pr.classify({"reads": True, "runs": False}) == "cannot run"
    spikes = {"reads": True, "runs": True, "max_abs_diff": 1.0, "ref_max_abs": 1.0}
    assert pr.classify({**spikes, "spike_mismatch": 0.0}) == "exact"
    assert pr.classify({**spikes, "spike_mismatch": 0.004}) == "within tolerance"
    assert pr.classify({**spikes, "spike_mismatch": 0.02}) == "mismatch"
    analog = {"reads": True, "runs": True, "ref_max_abs": 10.0}
    assert pr.classify({**analog, "max_abs_diff": 5e-5}) == "exact"  # 5e-6 relative to the output's scale
    assert pr.classify({**analog, "max_abs_diff": 5e-3}) == "within tolerance"
    assert pr.classify({**analog, "max_abs_diff": 0.5}) == "mismatch"


# ------------------------------------------------------------------------------------- the options, by hand


def _int_graph(theta=3.0):
    """input (6) -> Linear (integer weights) -> IF (integer threshold) -> output, on the integer grid."""
    w = np.array([[1, 1, 0, 0, 0, 0], [0, 1, 2, 0, 0, 0], [1, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 2]], np.float64)
    nodes = {"input": nir.Input(input_type={"input": np.array([6])}), "fc": nir.Linear(weight=w),
             "if": nir.IF(r=np.ones(4), v_threshold=np.full(4, theta), v_reset=np.zeros(4)),
             "output": nir.Output(output_type={"output": np.array([4])})}
    return nir.NIRGraph(nodes=nodes, edges=[("input", "fc"), ("fc", "if"), ("if", "output")],
                        metadata={"dt": 1.0, "comparison": ">=", "quant": {"state_exponent": 0}})


def test_integer_threshold_shift_is_exact():
    g = _int_graph()
    x = (np.random.default_rng(0).random((6, 32, 6)) < 0.5).astype(np.float64)  # [steps, batch, 6] spikes
    ge = run_graph(g, x, fixed=None)["outputs"]["output"]  # neurosdm: v >= theta
    gt = run_graph(g, x, disc=Discretisation(comparison=">"), fixed=None)["outputs"]["output"]
    assert (ge != gt).any()  # ties happen on this grid: '>' alone differs
    shifted = strict_thresholds(g)
    assert shifted.metadata["comparison"] == ">" and g.metadata["comparison"] == ">="  # input not mutated
    np.testing.assert_array_equal(shifted.nodes["if"].v_threshold, 2.0)
    out = run_graph(shifted, x, fixed=None)["outputs"]["output"]  # read with the metadata's '>'
    np.testing.assert_array_equal(out, ge)
    bad = nir.NIRGraph(nodes={**g.nodes, "if": nir.IF(r=np.ones(4), v_threshold=np.full(4, 2.5),
                                                      v_reset=np.zeros(4))}, edges=g.edges, metadata=g.metadata)
    with pytest.raises(ConfigError, match="non-integer threshold"):
        strict_thresholds(bad)


def test_float_threshold_shift_in_float32():
    """For every float32 v: v > nextafter32(theta, -inf) <=> v >= theta (checked on the neighbours of theta)."""
    theta = np.float32(0.97)
    g = nir.NIRGraph(nodes={"input": nir.Input(input_type={"input": np.array([1])}),
                            "if": nir.IF(r=np.ones(1, np.float32), v_threshold=np.full(1, theta),
                                         v_reset=np.zeros(1, np.float32)),
                            "output": nir.Output(output_type={"output": np.array([1])})},
                     edges=[("input", "if"), ("if", "output")], metadata={"comparison": ">="})
    low = strict_thresholds(g).nodes["if"].v_threshold[0]
    assert low.dtype == np.float32 and low < theta and np.nextafter(low, np.float32(1)) == theta
    v = theta + np.arange(-50, 51, dtype=np.float32) * np.spacing(theta)
    v = np.concatenate([v, np.float32([0, -1, 5])])
    np.testing.assert_array_equal(v > low, v >= theta)
    assert not np.array_equal(v > theta, v >= theta)  # the shift is needed at v == theta


def test_if_as_lif_is_an_integrator_in_float32(features):
    g, kind = features["conv_if"]
    x = pr.make_input(g, kind)
    lif = if_as_lif(g)
    assert lif.metadata["dt"] == pytest.approx(1e-4) and g.metadata["dt"] == 1.0
    n = lif.nodes["stem.conv.if"]
    assert isinstance(n, nir.LIF) and not any(isinstance(m, nir.IF) for m in lif.nodes.values())
    beta = 1 - (1e-4 / np.asarray(n.tau))  # what snnTorch's LIF branch computes (dt = 1e-4 there)
    assert beta.dtype == np.float32 and np.all(beta == 1.0)
    assert np.allclose(np.asarray(n.r) * 1e-4 / np.asarray(n.tau), 1.0)  # its w_scale: threshold not rescaled
    # neurosdm's float64 reference: a leak of 2**-40 per step, the same spikes as the IF graph
    np.testing.assert_array_equal(pr.reference(lif, x), pr.reference(g, x))
    # LIF time constants move with the time unit: the lif_leak graph computes the same in the new unit
    g2, kind2 = features["lif_leak"]
    x2 = pr.make_input(g2, kind2)
    g2s = if_as_lif(g2)
    np.testing.assert_allclose(np.asarray(g2s.nodes["lif1"].tau), 4e-4, rtol=1e-6)
    np.testing.assert_array_equal(pr.reference(g2s, x2), pr.reference(g2, x2))
    bad = nir.NIRGraph(nodes={**g.nodes, "stem.conv.if": nir.IF(r=n.r, v_threshold=n.v_threshold,
                                                                 v_reset=np.ones_like(n.r))},
                       edges=g.edges, metadata=g.metadata)
    with pytest.raises(ConfigError, match="v_reset"):
        if_as_lif(bad)


def test_fold_input_gain_and_topological_edges(features):
    g, kind = features["lif_leak"]  # r = tau = 4: folding is exact (a power of two)
    x = pr.make_input(g, kind)
    folded = fold_input_gain(g)
    assert np.all(np.asarray(folded.nodes["lif1"].r) == 1) and np.all(np.asarray(g.nodes["lif1"].r) == 4)
    np.testing.assert_array_equal(folded.nodes["conv1"].weight, 4 * g.nodes["conv1"].weight)
    np.testing.assert_array_equal(pr.reference(folded, x), pr.reference(g, x))
    # a neuron fed by a node without weights cannot take r
    bad = nir.NIRGraph(nodes=g.nodes, edges=[("input", "lif1") if e == ("conv1", "lif1") else e for e in g.edges],
                       metadata=g.metadata, type_check=False)
    bad.nodes["input"] = nir.Input(input_type={"input": np.array([4, 8, 8])})
    with pytest.raises(ConfigError, match="cannot be moved"):
        fold_input_gain(bad)

    r, kind = features["residual"]
    xr = pr.make_input(r, kind)
    rev = nir.NIRGraph(nodes=r.nodes, edges=list(reversed(r.edges)), metadata=r.metadata)
    topo = topological_edges(rev)
    edges = [tuple(e) for e in topo.edges]
    # every node's incoming edges are listed before its outgoing edges; not so in the reversed list
    assert all(dst != a for i, (a, _) in enumerate(edges) for _, dst in edges[i + 1:])
    assert not all(dst != a for i, (a, _) in enumerate(rev.edges) for _, dst in rev.edges[i + 1:])
    assert sorted(topo.edges) == sorted(tuple(e) for e in r.edges)
    np.testing.assert_array_equal(pr.reference(topo, xr), pr.reference(r, xr))


def test_for_peer_forms(features):
    g, _ = features["whole"]
    assert any(isinstance(n, nir.Scale) for n in g.nodes.values())
    for peer in ("spikingjelly", "norse", "snntorch"):
        new = for_peer(g, peer)
        assert not any(isinstance(n, nir.Scale) for n in new.nodes.values())
        assert new.metadata["peer"] == peer and "peer_import" in new.metadata
        assert (new.metadata["comparison"] == ">") == (peer != "spikingjelly")
        assert any(isinstance(n, nir.IF) for n in new.nodes.values()) == (peer != "snntorch")
    again = for_peer(for_peer(g, "spikingjelly"), "spikingjelly")  # a junction-free graph is not re-inlined
    assert again.metadata["junctions_removed"] == for_peer(g, "spikingjelly").metadata["junctions_removed"] != ""
    with pytest.raises(ConfigError, match="unknown peer"):
        for_peer(g, "lava")


# ---------------------------------------------------------------------------------------------- real peers


def test_snntorch_builds_integrators(features):
    sn = pytest.importorskip("snntorch.import_nir", reason="snnTorch is not installed")
    g, _ = features["conv_if"]
    default = _quiet(snn_peer.load, sn, g, 1.0)
    betas = [float(m.beta) for m in default.modules() if hasattr(m, "reset_mechanism")]
    assert betas and all(abs(b - 0.9) < 1e-6 for b in betas)  # snnTorch's IF import: beta 0.9, a constant
    model = _quiet(snn_peer.load, sn, for_peer(g, "snntorch"), 1e-4)
    leaky = [m for m in model.modules() if hasattr(m, "reset_mechanism")]
    assert len(leaky) == 2
    for m in leaky:
        assert m.init_hidden and m.reset_mechanism == "zero"
        assert bool((m.beta.float() == 1.0).all())


def test_norse_topological_edges(features):
    nt = pytest.importorskip("norse.torch", reason="Norse is not installed")
    g, kind = features["residual"]
    x = pr.make_input(g, kind)
    ref = pr.reference(g, x)
    peer = next(p for p in pr.PEERS if p.key == "norse")
    opt = for_peer(g, "norse")
    rev = nir.NIRGraph(nodes=opt.nodes, edges=list(reversed(opt.edges)), metadata=opt.metadata)
    bad, _ = pr.try_graph(peer, nt, rev, x, ref)
    assert pr.classify(bad) == "mismatch"  # Norse follows the edge list
    good, _ = pr.try_graph(peer, nt, topological_edges(rev), x, ref)
    assert pr.classify(good) == "exact"


# ------------------------------------------------------------------------------------------------------ CLI


def test_cli_export_peer(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "m.pt", head="sdm")
    plain, peer = tmp_path / "plain.nir", tmp_path / "snn.nir"
    assert invoke("export", ckpt, "--to", "nir", "-o", plain).exit_code == 0
    r = invoke("export", ckpt, "--to", "nir", "-o", peer, "--peer", "snntorch")
    assert r.exit_code == 0, r.output
    a, b = nir.read(plain), nir.read(peer)
    assert any(isinstance(n, nir.Scale) for n in a.nodes.values())
    assert not any(isinstance(n, (nir.Scale, nir.IF)) for n in b.nodes.values())
    md = b.metadata
    assert str(md["peer"]) == "snntorch" and float(md["dt"]) == pytest.approx(1e-4) and str(md["comparison"]) == ">"
    # neurosdm reads the peer file by its own metadata (dt 1e-4, '>'): the same output as the plain export
    x = np.random.default_rng(0).standard_normal((1, 2, 1, 8, 8))
    out_a = run_graph(a, x, num_steps=2)["outputs"]["output"]
    out_b = run_graph(b, x, num_steps=2)["outputs"]["output"]
    assert np.abs(out_a).max() > 1e-3
    np.testing.assert_allclose(out_b, out_a, rtol=0, atol=1e-5 * max(1.0, np.abs(out_a).max()))
    r = invoke("export", ckpt, "--to", "nir", "-o", tmp_path / "x.nir", "--peer", "lava")
    assert r.exit_code != 0 and not (tmp_path / "x.nir").exists()
