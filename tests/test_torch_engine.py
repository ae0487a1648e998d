"""The clocked torch engine (neurosdm.simulators.torch_engine) reproduces the reference and counts exactly."""

import functools

import nir
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neurosdm.errors import ConfigError, GraphError
from neurosdm.graph.dialect import quantize_input
from neurosdm.exporters.rewrite import inline_junctions
from neurosdm.graph.program import load_program
from neurosdm.simulators.reference import run_graph
from neurosdm.simulators.torch_engine import TorchEngine
from conftest import quantized

STEPS = (0, 31)


@functools.lru_cache(maxsize=None)
def _graphs(head, ch_mult, tsm):
    """(float64 graph, int8 graph) of a small random model (test_fixed_point._quantized)."""
    _, graph, _, qg, _ = quantized(head, tsm, ch_mult=ch_mult)
    return graph, qg


def _graph(head, ch_mult, tsm, junctions, quantized):
    g = _graphs(head, ch_mult, tsm)[int(quantized)]
    return inline_junctions(g) if junctions == "edges" else g


def _x(b=3, seed=7):
    return np.random.default_rng(seed).normal(size=(b, 1, 8, 8))


def _reference(graph, x, t):
    md = graph.metadata
    return run_graph(graph, x[None], num_steps=int(md["num_steps"]), record=True, t=t)


CASES = [("spiking", (1, 2), False, "scale"), ("sdm", (1, 2), True, "scale"), ("spiking", (1, 2, 2), True, "scale"),
         ("sdm", (1, 2, 2), False, "scale"), ("spiking", (1, 2), True, "edges"), ("sdm", (1, 2), False, "edges")]


@pytest.mark.parametrize("head,ch_mult,tsm,junctions", CASES)
def test_float_graph_matches_reference(head, ch_mult, tsm, junctions):
    graph = _graph(head, ch_mult, tsm, junctions, quantized=False)
    engine = TorchEngine(load_program(graph))
    x = _x()
    for t in STEPS:
        ref = _reference(graph, x, t)
        res = engine.run(x, t, record=True)
        assert set(res["records"]) == set(ref["records"])
        for name, want in ref["records"].items():
            assert res["records"][name].shape == want.shape and res["records"][name].dtype == np.float64, name
            np.testing.assert_allclose(res["records"][name], want, rtol=0, atol=1e-9, err_msg=name)
        np.testing.assert_allclose(res["outputs"]["output"], ref["outputs"]["output"], rtol=0, atol=1e-9)
        spikes = sum(c["spikes_out"].sum() for c in res["counts"].values() if "spikes_out" in c)
        assert 0 < spikes < sum(c["neuron_updates"].sum() for c in res["counts"].values() if "spikes_out" in c)
    # the comparison can fail: another diffusion step (other biases) gives other outputs
    other = engine.run(x, 49)["outputs"]["output"]
    assert np.abs(other - res["outputs"]["output"]).max() > 1e-6


@pytest.mark.parametrize("head,ch_mult,tsm,junctions", CASES)
def test_int8_graph_is_bit_identical(head, ch_mult, tsm, junctions):
    graph = _graph(head, ch_mult, tsm, junctions, quantized=True)
    md = graph.metadata
    program = load_program(graph)
    assert program.fixed is not None
    engine = TorchEngine(program)
    xq, _ = quantize_input(_x(), md)
    for t in STEPS:
        ref = _reference(graph, xq, t)
        res = engine.run(xq, t, record=True)
        for name, want in ref["records"].items():  # layer by layer, step by step
            got = res["records"][name]
            for k in range(want.shape[0]):
                assert np.array_equal(got[k], want[k]), (name, k, np.abs(got[k] - want[k]).max())
        assert np.array_equal(res["outputs"]["output"], ref["outputs"]["output"])
        sat = {n: int(c["saturations"].sum()) for n, c in res["counts"].items() if "saturations" in c}
        assert sat and {n: v for n, v in sat.items() if v} == ref["saturations"]
    # rounded convs are exercised (graded inputs: the image, streams, TSM payloads)
    assert any(layer.rounded for layer in program.layers)


def test_float32_mode_is_close_to_reference():
    graph = _graph("spiking", (1, 2), True, "scale", quantized=False)
    engine = TorchEngine(load_program(graph), dtype=torch.float32)
    x = _x()
    ref = _reference(graph, x, 17)
    res = engine.run(x, 17, record=True)
    # float32 rounding (~1e-7 relative) can flip a spike whose membrane lies that close to the threshold; with
    # these inputs none does, so the spikes agree exactly and every value to float32 precision
    for name, want in ref["records"].items():
        np.testing.assert_allclose(res["records"][name], want, rtol=0, atol=1e-4, err_msg=name)
    assert np.abs(res["outputs"]["output"]).max() > 1e-2


def test_fixed_point_needs_float64_and_inputs_are_checked():
    graph = _graph("spiking", (1, 2), False, "scale", quantized=True)
    with pytest.raises(ConfigError, match="float64"):
        TorchEngine(load_program(graph), dtype=torch.float32)
    engine = TorchEngine(load_program(graph))
    with pytest.raises(GraphError, match="shape"):
        engine.run(np.zeros((2, 1, 4, 4)), 0)


# ------------------------------------------------------------------------------------------------ counts by hand


def _conv(w, stride, padding, bias=None, shape=None):
    w = np.asarray(w, np.float64)
    return nir.Conv2d(input_shape=shape, weight=w, stride=stride, padding=padding, dilation=1, groups=1,
                      bias=np.zeros(w.shape[0]) if bias is None else np.asarray(bias, np.float64))


def _if(shape, threshold):
    return nir.IF(r=np.ones(shape), v_threshold=np.full(shape, float(threshold)), v_reset=np.zeros(shape))


def _hand_graph():
    """input (1,5,5) -> if0 (threshold 1: a 0/1 input becomes spikes) -> conv1 (3x3, stride 2, padding 1,
    zero weights) -> if1 (threshold 3) -> conv2 (3x3, padding 1) -> output; and input -> conv_a (conv1's weights,
    analog input) -> if1 (two sources)."""
    w1 = np.zeros((2, 1, 3, 3))
    w1[0, 0, 0, 0] = 1.0
    w1[0, 0, 1, 1] = 1.0
    w1[1, 0, 2, 2] = 2.0
    w2 = np.zeros((1, 2, 3, 3))
    w2[0, 0, 1, 1] = 1.0
    w2[0, 0, 2, 2] = 1.0
    w2[0, 1] = 0.5
    nodes = {
        "input": nir.Input(input_type={"input": np.array([1, 5, 5])}),
        "if0": _if((1, 5, 5), 1.0),
        "conv1": _conv(w1, 2, 1, shape=(5, 5)),
        "conv_a": _conv(w1, 2, 1, shape=(5, 5)),
        "if1": _if((2, 3, 3), 3.0),
        "conv2": _conv(w2, 1, 1, bias=[0.25], shape=(3, 3)),
        "output": nir.Output(output_type={"output": np.array([1, 3, 3])}),
    }
    edges = [("input", "if0"), ("if0", "conv1"), ("conv1", "if1"), ("input", "conv_a"), ("conv_a", "if1"),
             ("if1", "conv2"), ("conv2", "output")]
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata={"num_steps": 3})


def _hand_input():
    x = np.zeros((2, 1, 5, 5))
    for y, xx in [(0, 0), (4, 4), (0, 4), (2, 0), (0, 1)]:  # image 0: corners, a border, an odd/even position
        x[0, 0, y, xx] = 1.0
    for y, xx in [(1, 1), (3, 3), (4, 0)]:  # image 1
        x[1, 0, y, xx] = 1.0
    return x


def test_counts_of_a_hand_built_graph():
    graph = _hand_graph()
    program = load_program(graph)
    assert program.by_name["conv1"].input == "spikes" and program.by_name["conv_a"].input == "analog"
    assert program.by_name["conv2"].input == "spikes"
    x = _hand_input()
    res = TorchEngine(program).run(x, 0, record=True)
    c = {layer: {k: v.tolist() for k, v in cs.items()} for layer, cs in res["counts"].items()}

    # if0: 25 neurons x 2 images; the 8 ones of the input are nonzero and fire (v = 1 >= 1, reset to 0) every step
    assert c["if0"] == {"neuron_updates": [50] * 3, "active_neurons": [8] * 3, "spikes_out": [8] * 3}
    # conv1 / conv_a (stride 2, padding 1, 5x5 -> 3x3): an even row/column is reached only by kernel row/column 1,
    # an odd one by kernel rows/columns 0 and 2. The nonzero taps (0,0), (1,1) of output channel 0 and (2,2) of
    # channel 1 give the fan-out 1 at (even, even), 2 at (odd, odd), 0 elsewhere.
    # image 0: (0,0) 1, (4,4) 1, (0,4) 1, (2,0) 1, (0,1) 0 -> 4; image 1: (1,1) 2, (3,3) 2, (4,0) 1 -> 5
    assert c["conv1"] == {"events_in": [8] * 3, "synops": [9] * 3}
    # analog: every position counts: 9 (even, even) x 1 + 4 (odd, odd) x 2 = 17 per image
    assert c["conv_a"] == {"events_in": [8] * 3, "macs": [34] * 3}
    # if1 reads conv1 + conv_a = 2 conv1(x): image 0 channel 0: 2 at (0,0), (0,2), (1,0), (2,2); image 1 channel
    # 0: 2 at (1,1), (2,2), (2,0), channel 1: 4 at (0,0), (1,1). Threshold 3: the 4s fire every step, the 2s at
    # steps 1 (v = 4) and not at 0 and 2 (v = 2 after the reset). The sum of 2 sources: 1 x 18 x 2 additions.
    assert c["if1"] == {"fanin_adds": [36] * 3, "neuron_updates": [36] * 3, "active_neurons": [9] * 3,
                        "spikes_out": [2, 9, 2]}
    # conv2 (3x3, padding 1, stride 1 on 3x3): channel 1 has all 9 taps: fan-out 4 (corner), 6 (edge), 9 (centre);
    # channel 0 has taps (1,1) (always inside) and (2,2) (inside when row >= 1 and column >= 1).
    # steps 0, 2: channel 1 at (0,0) 4 + (1,1) 9 = 13; step 1 also channel 0: image 0 (0,0) 1, (0,2) 1, (1,0) 1,
    # (2,2) 2, image 1 (1,1) 2, (2,2) 2, (2,0) 1 -> 10 + 13 = 23
    assert c["conv2"] == {"events_in": [2, 9, 2], "synops": [13, 23, 13]}
    assert set(c) == {"if0", "conv1", "conv_a", "if1", "conv2"}  # Input / Output count nothing
    # and the values are the reference's
    ref = run_graph(graph, x[None], num_steps=3, record=True)
    for name, want in ref["records"].items():
        np.testing.assert_allclose(res["records"][name], want, rtol=0, atol=1e-12, err_msg=name)


def _dense_counts(program, records):
    """The counters by their definitions (stats.py) from the reference's records, with torch conv2d."""
    out = {}
    for layer in program.layers:
        xs = [records[s] for s in layer.sources]
        if not xs:
            continue
        x = sum(xs)  # [K, B, *in_shape]
        K = x.shape[0]
        cs = {}
        if len(xs) > 1:
            cs["fanin_adds"] = [(len(xs) - 1) * x[0].size] * K
        if layer.kind == "conv":
            (pt, pb), (pl, pr) = layer.padding
            mask = torch.as_tensor(layer.weight != 0, dtype=torch.float64)

            def conv(a):
                a = F.pad(torch.as_tensor(a, dtype=torch.float64), (pl, pr, pt, pb))
                return F.conv2d(a, mask, stride=layer.stride)
            cs["events_in"] = [int((x[k] != 0).sum()) for k in range(K)]
            if layer.input == "analog":
                cs["macs"] = [int(conv(np.ones_like(x[0])).sum())] * K
            else:
                name = "synops" if layer.input == "spikes" else "graded_ops"
                cs[name] = [int(conv((x[k] != 0).astype(np.float64)).sum()) for k in range(K)]
        elif layer.kind == "scale":
            cs["events_in"] = [int((x[k] != 0).sum()) for k in range(K)]
        elif layer.kind in ("if", "li", "i"):
            cs["neuron_updates"] = [x[0].size] * K
            cs["active_neurons"] = [int((x[k] != 0).sum()) for k in range(K)]
            if layer.kind == "if":
                cs["spikes_out"] = [int(records[layer.name][k].sum()) for k in range(K)]
        if cs:
            out[layer.name] = cs
    return out


@pytest.mark.parametrize("head,ch_mult,tsm,junctions", [("sdm", (1, 2, 2), True, "scale"),
                                                       ("spiking", (1, 2), False, "edges")])
def test_counts_follow_their_definitions_on_exported_graphs(head, ch_mult, tsm, junctions):
    graph = _graph(head, ch_mult, tsm, junctions, quantized=False)
    program = load_program(graph)
    x = _x()
    res = TorchEngine(program).run(x, 5, record=True)
    ref = _reference(graph, x, 5)
    want = _dense_counts(program, ref["records"])
    got = {layer: {k: v.tolist() for k, v in cs.items()} for layer, cs in res["counts"].items()}
    assert got == want
    kinds = {counter for cs in got.values() for counter in cs}
    assert {"macs", "events_in", "spikes_out", "active_neurons"} <= kinds
    assert ("graded_ops" in kinds) == tsm and ("synops" in kinds) != tsm  # TSM: every spike gets a payload
    assert "fanin_adds" in got[program.layers[-1].sources[0]] or junctions == "edges"
    multi = {layer.kind for layer in program.layers if len(layer.sources) > 1}
    assert multi == ({"conv", "if"} if junctions == "edges" else {"scale", "if"})  # fan-in into convs: inlined


# ------------------------------------------------------------------------------------------ other semantics


def test_float_variants_match_reference():
    """'>' comparison, reset by subtraction, nonzero v_reset, LI with exp discretisation and a leak, I."""
    rng = np.random.default_rng(3)
    shape = (3, 4, 4)
    nodes = {
        "input": nir.Input(input_type={"input": np.array([2, 4, 4])}),
        "conv": _conv(rng.normal(size=(3, 2, 3, 3)), 1, 1, bias=rng.normal(size=3) * 0.1, shape=(4, 4)),
        "if": nir.IF(r=rng.uniform(0.5, 1.5, shape), v_threshold=rng.uniform(0.5, 1.0, shape),
                     v_reset=rng.uniform(-0.2, 0.2, shape)),
        # 'same' padding of a (2, 4) kernel: (0, 1) rows, (1, 2) columns (asymmetric)
        "conv_s": _conv(rng.normal(size=(3, 3, 2, 4)) * (rng.random((3, 3, 2, 4)) < 0.6), 1, "same", shape=(4, 4)),
        "if_s": _if(shape, 0.3),
        "conv_b": _conv(rng.normal(size=(2, 3, 2, 2)), 2, 0, shape=(4, 4)),
        "li": nir.LI(tau=rng.uniform(2.0, 5.0, (2, 2, 2)), r=rng.uniform(0.5, 2.0, (2, 2, 2)),
                     v_leak=rng.normal(size=(2, 2, 2))),
        "i": nir.I(r=np.full((2, 2, 2), 0.5)),
        "output": nir.Output(output_type={"output": np.array([2, 2, 2])}),
    }
    edges = [("input", "conv"), ("conv", "if"), ("if", "conv_s"), ("conv_s", "if_s"), ("if_s", "conv_b"),
             ("conv_b", "li"), ("conv_b", "i"), ("li", "output"), ("i", "output")]
    x = rng.normal(size=(4, 2, 4, 4))
    for md in ({"comparison": ">", "reset": "subtract", "discretisation": "exp"},
               {"comparison": ">=", "reset": "zero", "discretisation": "euler"}):
        graph = nir.NIRGraph(nodes=nodes, edges=edges, metadata={"num_steps": 6, **md})
        ref = run_graph(graph, x[None], num_steps=6, record=True)
        program = load_program(graph)
        assert program.by_name["conv_s"].padding == ((0, 1), (1, 2))
        res = TorchEngine(program).run(x, 0, record=True)
        for name, want in ref["records"].items():
            np.testing.assert_allclose(res["records"][name], want, rtol=0, atol=1e-12, err_msg=name)
        assert 0 < ref["records"]["if"].mean() < 1 and 0 < ref["records"]["if_s"].mean() < 1
        got = {layer: {k: v.tolist() for k, v in cs.items()} for layer, cs in res["counts"].items()}
        assert got == _dense_counts(program, res["records"])
        assert res["counts"]["output"]["fanin_adds"].tolist() == [8 * 4] * 6


def test_nested_graph():
    """A nested graph's Input and Output nodes are identities (flattened names)."""
    rng = np.random.default_rng(4)
    sub = nir.NIRGraph(nodes={"in": nir.Input(input_type={"input": np.array([2, 4, 4])}),
                              "conv": _conv(rng.normal(size=(2, 2, 3, 3)), 1, 1, shape=(4, 4)),
                              "out": nir.Output(output_type={"output": np.array([2, 4, 4])})},
                       edges=[("in", "conv"), ("conv", "out")])
    graph = nir.NIRGraph(nodes={"input": nir.Input(input_type={"input": np.array([2, 4, 4])}), "sub": sub,
                                "double": nir.Scale(scale=np.full((2, 4, 4), 2.0)), "if": _if((2, 4, 4), 0.5),
                                "output": nir.Output(output_type={"output": np.array([2, 4, 4])})},
                         edges=[("input", "double"), ("double", "sub"), ("sub", "if"), ("if", "output"),
                                ("input", "output")],
                         metadata={"num_steps": 3})
    x = rng.normal(size=(2, 2, 4, 4))
    ref = run_graph(graph, x[None], num_steps=3, record=True)
    res = TorchEngine(load_program(graph)).run(x, 0, record=True)
    assert "sub.conv" in res["records"]
    for name, want in ref["records"].items():
        np.testing.assert_allclose(res["records"][name], want, rtol=0, atol=1e-12, err_msg=name)


def test_fixed_point_saturation_rounding_and_subtract_reset():
    """4-bit state (saturates at +-7), a rounded conv (half to even), reset by subtraction, an LI readout."""
    nodes = {
        "input": nir.Input(input_type={"input": np.array([1, 2, 3])}),
        "conv": _conv(np.full((1, 1, 1, 1), 0.5), 1, 0, shape=(2, 3)),
        "if": _if((1, 2, 3), 5.0),
        "conv_b": _conv(np.full((1, 1, 1, 1), 3.0), 1, 0, shape=(2, 3)),
        "li": nir.LI(tau=np.full((1, 2, 3), 2.0), r=np.full((1, 2, 3), 2.0), v_leak=np.zeros((1, 2, 3))),
        "output": nir.Output(output_type={"output": np.array([1, 2, 3])}),
    }
    edges = [("input", "conv"), ("conv", "if"), ("if", "conv_b"), ("conv_b", "li"), ("li", "output")]
    md = {"num_steps": 4, "reset": "subtract", "quant": {"state_bits": 4, "round_nodes": {"conv": 1}}}
    graph = nir.NIRGraph(nodes=nodes, edges=edges, metadata=md)
    x = np.array([[[[-1.0, 1.0, 3.0], [5.0, 7.0, 19.0]]]])  # conv: -0.5 0.5 1.5 2.5 3.5 9.5 -> -0 0 2 2 4 10
    program = load_program(graph)
    res = TorchEngine(program).run(x, 0, record=True)
    ref = run_graph(graph, x[None], num_steps=4, record=True)
    for name, want in ref["records"].items():
        assert np.array_equal(res["records"][name], want), name
    assert res["records"]["conv"][0].reshape(-1).tolist() == [0, 0, 2, 2, 4, 10]
    sat = {n: c["saturations"].tolist() for n, c in res["counts"].items() if "saturations" in c}
    # if (threshold 5, subtract): 10 clips to 7 at every step (fires, 2 left); 4 reaches 8 at step 1 and clips
    assert sat["if"] == [1, 2, 1, 1]
    assert {n: sum(v) for n, v in sat.items() if sum(v)} == ref["saturations"]
    # a neuron input that is not an integer (here: an unrounded conv of 0.5) is refused, as by the reference
    graph = nir.NIRGraph(nodes=nodes, edges=edges, metadata={**md, "quant": {"state_bits": 4, "round_nodes": {}}})
    with pytest.raises(GraphError, match="non-integer"):
        run_graph(graph, x[None], num_steps=4)
    with pytest.raises(GraphError, match="non-integer"):
        TorchEngine(load_program(graph)).run(x, 0)


# ------------------------------------------------------------------------------------------------------ CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA path is checked where one is")
def test_cuda_matches_cpu():
    x = _x(b=5)
    for quantized in (False, True):
        graph = _graph("sdm", (1, 2), True, "scale", quantized)
        program = load_program(graph)
        xx = quantize_input(x, graph.metadata)[0] if quantized else x
        cpu = TorchEngine(program).run(xx, 11, record=True)
        gpu = TorchEngine(program, device="cuda").run(xx, 11, record=True)
        assert gpu["counts"].keys() == cpu["counts"].keys()
        for layer, cs in cpu["counts"].items():
            for k, v in cs.items():
                assert np.array_equal(gpu["counts"][layer][k], v), (layer, k)
        for name, want in cpu["records"].items():
            if quantized:
                assert np.array_equal(gpu["records"][name], want), name
            else:
                np.testing.assert_allclose(gpu["records"][name], want, rtol=0, atol=1e-9, err_msg=name)
        if not quantized:
            fast = TorchEngine(program, device="cuda", dtype=torch.float32).run(xx, 11)
            np.testing.assert_allclose(fast["outputs"]["output"], cpu["outputs"]["output"], rtol=0, atol=1e-4)
