"""Post-training quantisation of exported graphs (neurosdm.exporters.fixed_point) and the fixed-point reference."""

import nir
import numpy as np
import pytest
from conftest import quantized

from neurosdm.errors import QuantizationError
from neurosdm.exporters.fixed_point import quantize_graph
from neurosdm.graph.dialect import quantize_input
from neurosdm.simulators.reference import GraphError, run_graph, run_reference


def _x(b=4, seed=7):
    return np.random.default_rng(seed).normal(size=(b, 1, 8, 8))


@pytest.mark.parametrize("head,tsm", [("spiking", False), ("sdm", False), ("spiking", True), ("sdm", True)])
def test_stored_values_are_the_fixed_point_model(head, tsm):
    model, graph, md, qg, qmd = quantized(head, tsm)
    q = qmd["quant"]
    e_state, e_in = q["state_exponent"], q["input_exponent"]
    assert set(q["weight_exponents"]) == {n for n, v in graph.nodes.items() if isinstance(v, nir.Conv2d)}
    for name, node in qg.nodes.items():
        if isinstance(node, nir.Conv2d):
            src = next(s for s, d in qg.edges if d == name)
            e = q["weight_exponents"][name]
            u = 0
            if src in q["tsm_exponents"]:
                u, src = q["tsm_exponents"][src], next(s for s, d in qg.edges if d == src)
            kind = type(qg.nodes[src])
            u += {nir.IF: 0, nir.Input: e_in}.get(kind, e_state)
            m = node.weight.astype(np.float64) * 2.0 ** (e_state - e - u)
            assert np.array_equal(m, np.round(m)) and m.min() >= -128 and m.max() <= 127, name
            # mantissa * 2**e is the float weight to within half a step of its grid
            w = np.asarray(graph.nodes[name].weight) * 2.0 ** -e
            assert np.abs(m - w).max() <= 0.5 + 1e-9, name
            assert (name in q["round_nodes"]) == (kind is not nir.IF or u != 0), name
            if name not in q["round_nodes"]:
                assert np.array_equal(node.weight, np.round(node.weight))
            assert np.array_equal(node.bias, np.round(node.bias))
        if isinstance(node, nir.IF):
            assert np.all(node.v_threshold == np.ceil(0.97 * 2.0 ** -e_state))
    for table in qmd["bias_tables"].values():
        assert np.array_equal(table, np.round(table))
    for name, table in qmd["scale_tables"].items():
        assert np.array_equal(table, np.round(table)) and np.abs(table).max() <= 127
        np.testing.assert_allclose(table * 2.0 ** q["tsm_exponents"][name], md["scale_tables"][name],
                                   atol=2.0 ** (q["tsm_exponents"][name] - 1))


@pytest.mark.parametrize("head,tsm", [("spiking", False), ("sdm", True)])
def test_quantised_model_converges_to_the_float_model(head, tsm):
    """8-bit weights flip a few percent of the spikes of these small random nets (which changes eps a lot: the
    nets are chaotic); finer grids flip fewer, and 16-bit mantissas reproduce the float eps."""
    _, graph, md, _, _ = quantized(head, tsm)
    x = _x()
    ref, ref_run = run_reference(graph, md, x, 20, record=True)
    ifs = [n for n, v in graph.nodes.items() if isinstance(v, nir.IF)]
    errs, flips = {}, {}
    for bits in (8, 12, 16):
        _, _, _, g, m = quantized(head, tsm, bits=bits)
        eps, res = run_reference(g, m, x, 20, record=True)
        assert not res["saturations"]
        errs[bits] = ((eps - ref) ** 2).mean() / ref.var()
        flips[bits] = np.mean([np.mean(res["records"][n] != ref_run["records"][n]) for n in ifs])
    assert flips[8] < 0.05 and flips[16] <= flips[12] <= flips[8], flips
    assert errs[16] < 1e-5 and errs[16] < errs[8], errs


def test_fixed_point_run_is_integer_and_survives_the_file(tmp_path):
    _, _, _, qg, qmd = quantized("spiking", True)
    x = _x()
    eps, res = run_reference(qg, qmd, x, 30, record=True)
    for name, rec in res["records"].items():  # every value the graph carries is an integer (of the unit)
        assert np.array_equal(rec, np.round(rec)), name
    nir.write(tmp_path / "q.nir", qg)
    back = nir.read(tmp_path / "q.nir")
    eps_file, _ = run_reference(back, back.metadata, x, 30)
    np.testing.assert_array_equal(eps_file, eps)
    # float semantics of the same integer graph (no rounding, no saturation) is a different model
    eps_float, _ = run_reference(qg, qmd, x, 30, fixed=None)
    assert not np.array_equal(eps_float, eps)


def test_fixed_point_refuses_non_integer_values():
    _, graph, md, qg, qmd = quantized("spiking")
    with pytest.raises(GraphError, match="non-integer"):  # the float graph run with integer rules
        run_graph(graph, _x()[None], num_steps=3, fixed=type(run_graph).__call__ and __import__(
            "neurosdm.simulators.reference", fromlist=["FixedPoint"]).FixedPoint())


def test_saturation_is_counted():
    _, _, _, qg, qmd = quantized("spiking")
    q = dict(qmd["quant"], state_bits=12)  # a narrow state: the readout and membranes clip
    md = dict(qmd, quant=q)
    _, res = run_reference(qg, md, _x() * 50, 0)
    assert sum(res["saturations"].values()) > 0


def test_input_encoding_clips_and_counts():
    _, _, _, qg, qmd = quantized("spiking")
    e_in = qmd["quant"]["input_exponent"]
    lim = 2**15 - 1
    x = np.array([0.0, 2.0 ** e_in * 2.5, 1e9, -1e9])
    k, clipped = quantize_input(x, qmd)
    np.testing.assert_array_equal(k, [0.0, 2.0, lim, -lim])  # half to even
    assert clipped == 2


def test_already_quantised_and_bad_graphs_are_refused():
    _, graph, md, qg, qmd = quantized("spiking")
    cal = {"max_abs": {}, "input_max_abs": 1.0, "images": 1, "diffusion_steps": np.array([0])}
    with pytest.raises(QuantizationError, match="already"):
        quantize_graph(qg, qmd, cal)
    with pytest.raises(QuantizationError, match="do not fit a 24-bit state"):
        quantize_graph(graph, md, dict(cal, max_abs={"x": 2.0**40}))
