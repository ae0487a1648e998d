"""inline_junctions: the export without its identity Scale junctions computes the same eps (float64)."""

import nir
import numpy as np
import pytest
import torch
from conftest import tiny_model

from neurosdm.errors import ConfigError
from neurosdm.exporters.nir import to_nir_graph
from neurosdm.exporters.rewrite import inline_junctions, is_identity_scale
from neurosdm.simulators.reference import run_graph, run_reference

STEPS = (0, 31)


def _x(size=8, seed=1):
    return torch.randn(2, 1, size, size, generator=torch.Generator().manual_seed(seed)).double().numpy()


def _snapshot(graph):
    return list(graph.nodes), [tuple(e) for e in graph.edges], sorted(graph.metadata["node_packing"])


@pytest.mark.parametrize("head,tsm", [("spiking", False), ("sdm", False), ("spiking", True), ("sdm", True)])
def test_inline_junctions_is_exact(head, tsm, tmp_path):
    model = tiny_model(head, (1, 2), image_size=8, ch=4, num_steps=3, tsm=tsm)
    graph, md = to_nir_graph(model, dtype=np.float64)
    before = _snapshot(graph)
    junctions = [k for k, n in graph.nodes.items() if is_identity_scale(n) and k not in md["scale_tables"]]
    assert len(junctions) >= 3
    # an identity shortcut: a junction fed by another junction (the rewrite must expand it transitively)
    assert any(a in junctions and b in junctions for a, b in graph.edges)

    new = inline_junctions(graph, md)
    assert _snapshot(graph) == before and graph.metadata is md  # the input is not mutated
    into_out = [a for a, b in new.edges if b == "output"]
    assert len(into_out) == 1
    left = [k for k, n in new.nodes.items() if is_identity_scale(n) and k not in md["scale_tables"]]
    if head == "sdm":  # the last junction (3 feeders) feeds the Output: kept, as exported
        assert left == into_out == [junctions[-1]]
        assert new.metadata["junctions_kept_for_output"] == f"{junctions[-1]} (scale)"
    else:  # the Output reads the LI readout
        assert left == []
    assert list(new.nodes) == [k for k in graph.nodes if k not in junctions or k in left]  # order kept
    assert set(new.metadata["scale_tables"]) == set(md["scale_tables"]) <= set(new.nodes)
    if tsm:
        assert md["scale_tables"]
    assert set(new.metadata["node_packing"]) == set(new.nodes)
    assert len(new.edges) > len(graph.edges) - len(junctions)  # edges are duplicated, not lost

    x = _x()
    for t in STEPS:
        eps0, res = run_reference(graph, md, x, t)
        eps1, _ = run_reference(new, None, x, t)
        assert np.abs(eps0).max() > 1e-3
        np.testing.assert_allclose(eps1, eps0, rtol=0, atol=1e-9)

    # the comparison can fail: dropping one rewired edge changes eps
    rewired = next(e for e in new.edges if e not in graph.edges and e[1] != "output")
    broken = nir.NIRGraph(nodes=new.nodes, edges=[e for e in new.edges if e != rewired], metadata=new.metadata,
                          type_check=False)
    assert np.abs(run_reference(broken, None, x, STEPS[0])[0] - run_reference(graph, md, x, STEPS[0])[0]).max() > 1e-6

    path = tmp_path / "edges.nir"
    nir.write(path, new)
    back = nir.read(path)
    assert set(back.nodes) == set(new.nodes)  # HDF5 returns the names sorted
    assert sorted(tuple(e) for e in back.edges) == sorted(tuple(e) for e in new.edges)
    np.testing.assert_allclose(run_reference(back, None, x, STEPS[1])[0], run_reference(graph, md, x, STEPS[1])[0],
                               rtol=0, atol=1e-9)


@pytest.mark.parametrize("form", ["conv", "none"])
def test_output_junction_forms(form):
    model = tiny_model("sdm", (1, 2), image_size=8, ch=4, num_steps=3, tsm=False)
    graph, md = to_nir_graph(model, dtype=np.float64)
    last = [a for a, b in graph.edges if b == "output"][0]
    new = inline_junctions(graph, output_junction=form)
    assert not any(isinstance(n, nir.Scale) for n in new.nodes.values())
    into_out = [a for a, b in new.edges if b == "output"]
    if form == "conv":
        assert into_out == [last] and isinstance(new.nodes[last], nir.Conv2d)
        c = new.nodes[last].weight.shape[0]
        np.testing.assert_array_equal(new.nodes[last].weight[:, :, 0, 0], np.eye(c))
    else:
        assert last not in new.nodes and len(into_out) == 3  # conv2, shortcut, shortcut_skip
    x = _x()
    np.testing.assert_allclose(run_reference(new, None, x, 5)[0], run_reference(graph, md, x, 5)[0], rtol=0,
                               atol=1e-9)
    with pytest.raises(ConfigError, match="output_junction"):
        inline_junctions(graph, output_junction="sum")


def _scale(v, shape=(2,)):
    return nir.Scale(scale=np.full(shape, v))


def _run(graph):
    x = np.random.default_rng(0).standard_normal((1, 1, 2))
    return run_graph(graph, x, num_steps=1)["outputs"]["output"]


def test_pinned_and_duplicate_junctions_are_kept():
    io = {"input": nir.Input(input_type={"input": np.array([2])}),
          "output": nir.Output(output_type={"output": np.array([2])})}
    # a TSM Scale whose stored (step 0) scale is 1 is not a junction: named in scale_tables
    g = nir.NIRGraph(nodes={**io, "a": _scale(3.0), "c.tsm": _scale(1.0), "c": _scale(2.0)},
                     edges=[("input", "a"), ("a", "c.tsm"), ("c.tsm", "c"), ("c", "output")],
                     metadata={"scale_tables": {"c.tsm": np.array([1.0, 0.5])}})
    assert list(inline_junctions(g).nodes) == list(g.nodes)
    assert "c.tsm" not in inline_junctions(g, {}).nodes  # without the table it is an identity
    # j1 -> j2 and input -> j2: inlining would need the edge input -> c (or input -> j2) twice: both stay
    g = nir.NIRGraph(nodes={**io, "j1": _scale(1.0), "j2": _scale(1.0), "c": _scale(2.0)},
                     edges=[("input", "j1"), ("j1", "j2"), ("input", "j2"), ("j2", "c"), ("c", "output")])
    new = inline_junctions(g)
    assert list(new.nodes) == list(g.nodes) and new.edges == g.edges
    # the same with a -> j2 (a distinct feeder): both junctions go, c gets input and a
    g = nir.NIRGraph(nodes={**io, "a": _scale(3.0), "j1": _scale(1.0), "j2": _scale(1.0), "c": _scale(2.0)},
                     edges=[("input", "a"), ("input", "j1"), ("j1", "j2"), ("a", "j2"), ("j2", "c"), ("c", "output")])
    new = inline_junctions(g)
    assert list(new.nodes) == ["input", "output", "a", "c"]
    assert new.edges == [("input", "a"), ("input", "c"), ("a", "c"), ("c", "output")]
    np.testing.assert_allclose(_run(new), _run(g))
    assert np.abs(_run(new)).max() > 0
