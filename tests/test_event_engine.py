"""The event-driven engine (neurosdm.simulators.event): parity with the reference interpreter, exact counts."""

import nir
import numpy as np
import pytest

from neurosdm.errors import GraphError
from neurosdm.exporters.nir import to_nir_graph
from neurosdm.graph.dialect import quantize_input
from neurosdm.exporters.rewrite import inline_junctions
from neurosdm.simulators.event import HAVE_NUMBA, EventEngine
from neurosdm.graph.program import load_program
from neurosdm.graph.geometry import conv2d
from neurosdm.simulators.reference import run_graph
from conftest import quantized, tiny_model

T = 17  # diffusion step: any step with its own biases


def _x(b=2, seed=3):
    return np.random.default_rng(seed).normal(size=(b, 1, 8, 8))


def _graph(head, tsm, ch_mult, quant, junctions="scale"):
    """A random tiny export (float64 or int8) and its (encoded) input."""
    x = _x()
    if quant:
        _, _, _, graph, md = quantized(head, tsm, ch_mult=ch_mult)
        x, _ = quantize_input(x, md)
    else:
        graph, md = to_nir_graph(tiny_model(head, ch_mult, tsm=tsm), dtype=np.float64)
    if junctions == "edges":
        graph = inline_junctions(graph, md, output_junction="none")
        md = graph.metadata
    return graph, md, x


def _reference(graph, md, x, t=T):
    prog = load_program(graph)
    return prog, run_graph(graph, x[None], num_steps=prog.num_steps, record=True, t=t,
                           fixed="auto")


CASES = [("spiking", False, (1, 2), False), ("sdm", False, (1, 2), False), ("spiking", True, (1, 2, 2), False),
         ("sdm", True, (1, 2, 2), False), ("spiking", False, (1, 2, 2), True), ("sdm", False, (1, 2), True),
         ("spiking", True, (1, 2), True), ("sdm", True, (1, 2, 2), True)]


@pytest.mark.parametrize("junctions", ["scale", "edges"])
@pytest.mark.parametrize("head,tsm,ch_mult,quant", CASES)
def test_parity_with_reference(head, tsm, ch_mult, quant, junctions):
    graph, md, x = _graph(head, tsm, ch_mult, quant, junctions)
    prog, ref = _reference(graph, md, x)
    res = EventEngine(prog).run(x, T, record=True)
    inputs = {layer.input for layer in prog.layers if layer.kind == "conv"}
    assert inputs == {"graded" if tsm else "spikes", "analog"}  # TSM puts a per-step Scale on every spike input
    if junctions == "edges":
        assert not any(layer.name.endswith(".sum") for layer in prog.layers)  # the junctions are edges now
        assert any(len(layer.sources) > 1 and layer.kind in ("conv", "scale") for layer in prog.layers)
    assert set(res["outputs"]) == set(ref["outputs"]) and set(res["records"]) == set(ref["records"])
    spikes = [res["records"][layer.name] for layer in prog.layers if layer.kind == "if"]
    assert 0.02 < np.mean([s.mean() for s in spikes]) < 0.98  # neither silent nor saturated: not a trivial match
    for name, rec in ref["records"].items():  # layer by layer, step by step
        got = res["records"][name]
        assert got.shape == rec.shape and got.dtype == np.float64, name
        if quant:
            np.testing.assert_array_equal(got, rec, err_msg=name)
        else:
            np.testing.assert_allclose(got, rec, rtol=0, atol=1e-9, err_msg=name)
    for name, out in ref["outputs"].items():
        if quant:
            np.testing.assert_array_equal(res["outputs"][name], out)
        else:
            np.testing.assert_allclose(res["outputs"][name], out, rtol=0, atol=1e-9)
    sat = {n: int(c["saturations"].sum()) for n, c in res["counts"].items() if c.get("saturations") is not None}
    assert (len(sat) > 0) == quant
    assert {n: v for n, v in sat.items() if v} == ref["saturations"]


def test_step_dependent_parameters_matter():
    """The engine applies step_params(t): another diffusion step changes the result as in the reference."""
    graph, md, x = _graph("sdm", True, (1, 2), True)
    prog, ref = _reference(graph, md, x, t=40)
    eng = EventEngine(prog)
    np.testing.assert_array_equal(eng.run(x, 40)["outputs"]["output"], ref["outputs"]["output"])
    assert not np.array_equal(eng.run(x, T)["outputs"]["output"], ref["outputs"]["output"])


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba not installed")
def test_numpy_path_equals_kernel():
    graph, md, x = _graph("spiking", True, (1, 2, 2), True)
    prog = load_program(graph)
    a = EventEngine(prog, use_numba=True).run(x, T, record=True)
    b = EventEngine(prog, use_numba=False).run(x, T, record=True)
    for name in a["records"]:
        np.testing.assert_array_equal(a["records"][name], b["records"][name])
    assert a["counts"].keys() == b["counts"].keys()
    for name, cs in a["counts"].items():
        assert cs.keys() == b["counts"][name].keys()
        for c, v in cs.items():
            np.testing.assert_array_equal(v, b["counts"][name][c], err_msg=f"{name} {c}")


# ------------------------------------------------------------------------------------------ hand-computed counts

def _hand_graph():
    """input (1, 5, 5) -> c1 (3x3, stride 2, padding 1) -> n1 (IF, threshold 1) -> c2 (3x3, stride 2, padding 1)
    -> output. c1 has two nonzero weights: c1[0, 0, 1, 1] = 1 (n1 channel 0 at (i, j) sees x[2i, 2j]) and
    c1[1, 0, 0, 0] = 1 (channel 1 at (i, j) sees x[2i - 1, 2j - 1], 0 outside the image)."""
    w1 = np.zeros((2, 1, 3, 3))
    w1[0, 0, 1, 1] = 1.0
    w1[1, 0, 0, 0] = 1.0
    w2 = np.ones((2, 2, 3, 3))
    w2[1, 0, 1, 1] = 0.0  # zero synapses: not counted
    w2[1, 1, 1, 2] = 0.0
    w2[0, 1, 0, :] = 0.0  # (never reached by the spikes below)
    w2[:, :, 2, 2] = 0.0  # (never reached by the spikes below)
    nodes = {
        "input": nir.Input(input_type={"input": np.array([1, 5, 5])}),
        "c1": nir.Conv2d(input_shape=(5, 5), weight=w1, stride=2, padding=1, dilation=1, groups=1, bias=np.zeros(2)),
        "n1": nir.IF(r=np.ones((2, 3, 3)), v_threshold=np.ones((2, 3, 3))),
        "c2": nir.Conv2d(input_shape=(3, 3), weight=w2, stride=2, padding=1, dilation=1, groups=1,
                         bias=np.array([0.5, -0.25])),
        "output": nir.Output(output_type={"output": np.array([2, 2, 2])}),
    }
    edges = [("input", "c1"), ("c1", "n1"), ("n1", "c2"), ("c2", "output")]
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata={"num_steps": 3, "reset": "zero", "comparison": ">="})


@pytest.mark.parametrize("use_numba", [True, False] if HAVE_NUMBA else [False])
def test_counts_by_hand(use_numba):
    graph = _hand_graph()
    x = np.zeros((2, 1, 5, 5))  # image 1 is all zeros: it costs macs and neuron updates, no events
    x[0, 0, 0, 0] = 1.0  # corner      -> n1[0, 0, 0] every step
    x[0, 0, 4, 4] = 1.0  # corner      -> n1[0, 2, 2] every step
    x[0, 0, 3, 1] = 1.0  # interior    -> n1[1, 2, 1] every step (bottom border of n1)
    x[0, 0, 2, 4] = 0.5  # border      -> n1[0, 1, 2] reaches 1 at step 1 only (right border of n1)
    x[0, 0, 1, 2] = 0.7  # no nonzero synapse reaches it: an input event, no work
    prog = load_program(graph)
    res = EventEngine(prog, use_numba=use_numba).run(x, 0, record=True)
    c = res["counts"]
    assert set(c) == {"c1", "n1", "c2"}  # input and a single-source output count nothing
    # c1 (analog input): events_in = nonzero pixels; macs = every pixel times its nonzero fan-out in the map,
    # per image: tap (1, 1) of o=0 reaches outputs from rows/cols {0, 2, 4} (3 x 3 = 9 pixels), tap (0, 0) of o=1
    # from rows/cols {1, 3} (2 x 2 = 4 pixels; row/col 5 would be needed for output 3): 13, times 2 images
    assert {k: v.tolist() for k, v in c["c1"].items()} == {"events_in": [5, 5, 5], "macs": [26, 26, 26]}
    # n1: 2 images x 18 neurons; 4 nonzero inputs; spikes: 3 every step plus n1[0, 1, 2] at step 1
    assert {k: v.tolist() for k, v in c["n1"].items()} == {
        "neuron_updates": [36, 36, 36], "active_neurons": [4, 4, 4], "spikes_out": [3, 4, 3]}
    # c2 (spike input, 3x3 map, stride 2, padding 1, 2x2 output): an input at row y reaches output rows through
    # taps V(0) = {1}, V(1) = {0, 2}, V(2) = {1} (likewise columns). Synapses per spike:
    #   n1[0, 0, 0]: tap (1, 1): o=0 yes, o=1 zero              -> 1
    #   n1[0, 2, 2]: tap (1, 1): the same                       -> 1
    #   n1[1, 2, 1]: taps (1, 0), (1, 2): o=0 2, o=1 1 (zero at (1, 2)) -> 3
    #   n1[0, 1, 2]: taps (0, 1), (2, 1): o=0 2, o=1 2          -> 4 (step 1 only)
    assert {k: v.tolist() for k, v in c["c2"].items()} == {"events_in": [3, 4, 3], "synops": [5, 9, 5]}
    # and the values: the spikes of n1 and c2's output as the reference computes them
    ref = run_graph(graph, x[None], num_steps=3, record=True)
    for name in ("n1", "c2", "output"):
        np.testing.assert_array_equal(res["records"][name], ref["records"][name])
    assert res["records"]["n1"][1, 0, 0, 1, 2] == 1 and res["records"]["n1"][[0, 2], 0, 0, 1, 2].sum() == 0


# ------------------------------------------------------------------------------ counts against a dense recount

def _nonzero_pairs(inp: np.ndarray, layer) -> int:
    """(nonzero input, nonzero weight) pairs that reach an output inside the map: a conv of indicators."""
    return int(conv2d((inp != 0).astype(np.float64), (layer.weight != 0).astype(np.float64), None, layer.stride,
                      layer.padding, (1, 1), 1).sum())


@pytest.mark.parametrize("head,tsm,quant,junctions", [("spiking", True, True, "edges"), ("sdm", True, False, "scale"),
                                                       ("sdm", False, True, "scale"), ("spiking", False, False, "edges")])
def test_counts_equal_dense_recount(head, tsm, quant, junctions):
    graph, md, x = _graph(head, tsm, (1, 2, 2), quant, junctions)
    prog, ref = _reference(graph, md, x)
    res = EventEngine(prog).run(x, T)
    rec, counts, K, B = ref["records"], res["counts"], prog.num_steps, x.shape[0]
    seen = set()
    for layer in prog.layers:
        if not layer.sources:
            continue
        inp = sum(rec[s] for s in layer.sources)  # [K, B, ...] from the reference's own records
        want = {}
        if len(layer.sources) > 1:
            want["fanin_adds"] = [(len(layer.sources) - 1) * B * int(np.prod(layer.in_shape))] * K
        if layer.kind == "conv":
            want["events_in"] = [int(np.count_nonzero(inp[k])) for k in range(K)]
            if layer.input == "analog":
                want["macs"] = [_nonzero_pairs(np.ones_like(inp[k]), layer) for k in range(K)]
            else:
                want["synops" if layer.input == "spikes" else "graded_ops"] = \
                    [_nonzero_pairs(inp[k], layer) for k in range(K)]
        elif layer.kind == "scale":
            want["events_in"] = [int(np.count_nonzero(inp[k])) for k in range(K)]
        elif layer.kind in ("if", "li", "i"):
            want["neuron_updates"] = [B * layer.size] * K
            want["active_neurons"] = [int(np.count_nonzero(inp[k])) for k in range(K)]
            if layer.kind == "if":
                want["spikes_out"] = [int(rec[layer.name][k].sum()) for k in range(K)]
        got = {k: v.tolist() for k, v in counts.get(layer.name, {}).items() if k != "saturations"}
        assert got == want, layer.name
        assert all(v.dtype == np.int64 and v.shape == (K,) for v in counts.get(layer.name, {}).values())
        seen |= set(want)
    assert {"macs", "events_in", "neuron_updates", "active_neurons", "spikes_out", "fanin_adds"} <= seen
    event_ops = "graded_ops" if tsm else "synops"
    assert event_ops in seen and sum(c[event_ops].sum() for c in counts.values() if event_ops in c) > 0


def test_rejects_wrong_input_shape():
    graph, md, x = _graph("spiking", False, (1, 2), False)
    eng = EventEngine(load_program(graph))
    with pytest.raises(GraphError):
        eng.run(x[:, :, :4], T)


def test_weights_are_stored_compact_and_widened_exactly():
    """An int8 export's weights are held as int8 (one byte each) by the program, the event plans and the torch
    engine; a float graph's keep float64 where float32 would round them; the engines still agree bit for bit."""
    import torch

    from neurosdm.graph.nodes import compact
    from neurosdm.simulators.torch_engine import TorchEngine

    assert compact(np.array([1.0, -128.0, 127.0])).dtype == np.int8
    assert compact(np.array([1.0, 300.0])).dtype == np.int16
    assert compact(np.array([0.5, 0.25], np.float64)).dtype == np.float32
    assert compact(np.array([0.1])).dtype == np.float64 and compact(np.array([0.1]))[0] == 0.1
    graph, md, x = _graph("spiking", True, (1, 2), True)
    prog = load_program(graph)
    convs = [layer for layer in prog.layers if layer.kind == "conv"]
    assert convs and all(layer.weight.dtype == np.int8 for layer in convs)
    ev, te = EventEngine(prog), TorchEngine(prog)
    assert all(plan.wv.dtype == np.int8 for plan in ev.plans.values() if plan.event)
    assert not any(plan.acc32 for plan in ev.plans.values())  # TSM: graded inputs keep float64 sums
    plain = load_program(_graph("spiking", False, (1, 2), True)[0])
    plans = EventEngine(plain).plans
    spiking = [plans[layer.name] for layer in plain.layers if layer.kind == "conv" and layer.input == "spikes"]
    assert spiking and all(plan.acc32 for plan in spiking)  # float32 sums, exact here
    assert all(te.backend.layers[layer.name].weight[0].dtype == torch.int8 for layer in convs)
    a, b = ev.run(x, T), te.run(x, T)
    for name in a["outputs"]:
        assert np.array_equal(a["outputs"][name], b["outputs"][name])
    for layer, counts in a["counts"].items():
        for counter, values in counts.items():
            if counter in b["counts"].get(layer, {}):
                assert np.array_equal(values, b["counts"][layer][counter]), (layer, counter)


def test_float32_sums_only_where_exact():
    """A spike-input conv whose absolute weight sum per output reaches 2**24 keeps float64 sums; below, float32."""
    from neurosdm.graph.nodes import Layer
    from neurosdm.simulators.event import ConvPlan

    def plan(value, ci):
        w = np.full((2, ci, 1, 1), value, np.int16)
        layer = Layer("c", "conv", ["s"], (ci, 3, 3), (2, 3, 3), input="spikes", weight=w, bias=np.zeros(2),
                      fanout=np.full((ci, 3, 3), 2))
        return ConvPlan(layer)

    assert plan(32767, 511).acc32 and not plan(32767, 513).acc32  # 511 * 32767 < 2**24 <= 513 * 32767
    big = plan(32767, 513)
    x = np.ones((1, 513, 3, 3))
    y, events, ops = big.scatter(x, HAVE_NUMBA)
    assert np.all(y == 513 * 32767.0) and events == 513 * 9 and ops == 2 * 513 * 9
