"""Foreign NIR graphs (the whole core node set) on the engines.

Part 1: both engines against the reference interpreter (``run_graph``), float64, per node type, nested graphs,
recurrent edges, delays; the event engine's counts equal the torch engine's (two independent countings: dense
fan-out sums vs per-event work); one-line errors.
Part 2: graphs exported by snnTorch, Norse and spikingjelly themselves, run by the exporting framework and by both
engines on the same inputs (skipped where the framework is absent). docs/foreign-graphs.md has the rules and
the differences found.
"""

from __future__ import annotations

import numpy as np
import nir
import pytest
import torch
from conftest import snntorch_conv_net

from neurosdm.errors import GraphError
from neurosdm.graph.program import load_program
from neurosdm.simulators.reference import Discretisation, run_graph
from neurosdm.simulators.event import EventEngine
from neurosdm.simulators.torch_engine import TorchEngine

TOL = 1e-9


def _graph(nodes: dict, edges: list, metadata=None) -> nir.NIRGraph:
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata=metadata or {}, type_check=False)


def _chain(*named, in_shape, metadata=None) -> nir.NIRGraph:
    """``input -> named[0] -> ... -> output``."""
    nodes = {"input": nir.Input(input_type={"input": np.array(in_shape)})}
    names = ["input"]
    for name, node in named:
        nodes[name] = node
        names.append(name)
    edges = list(zip(names[:-1], names[1:]))
    try:  # the Output's shape: the last node's, as the reference infers it
        out_shape = load_program(_graph(nodes, edges)).by_name[names[-1]].out_shape
    except GraphError:
        out_shape = (1,)  # (a graph built to fail)
    nodes["output"] = nir.Output(output_type={"output": np.array(out_shape)})
    return _graph(nodes, edges + [(names[-1], "output")], metadata)


def _parity(graph, x, disc=None, spikes=False):
    """Both engines (the event engine with and without numba) vs the reference on ``x [T, B, ...]``: every node's
    output within TOL; the event engine's counts equal the torch engine's. Returns the torch engine's result."""
    ref = run_graph(graph, x, disc=disc, record=True)
    prog = load_program(graph, disc=disc)
    eng = TorchEngine(prog).run(x, record=True)
    for res in (eng, EventEngine(prog).run(x, record=True), EventEngine(prog, use_numba=False).run(x, record=True)):
        assert set(res["records"]) == set(ref["records"])
        for name, want in ref["records"].items():
            got = res["records"][name]
            assert got.shape == want.shape, name
            np.testing.assert_allclose(got, want, rtol=0, atol=TOL, err_msg=name)
        for name in ref["outputs"]:
            np.testing.assert_allclose(res["outputs"][name], ref["outputs"][name], rtol=0, atol=TOL)
        assert res["counts"].keys() == eng["counts"].keys()
        for name, cs in eng["counts"].items():
            assert cs.keys() == res["counts"][name].keys(), name
            for c, v in cs.items():
                np.testing.assert_array_equal(res["counts"][name][c], v, err_msg=f"{name} {c}")
    return eng


def _rng(seed=0):
    return np.random.default_rng(seed)


DISCS = [Discretisation(), Discretisation(dt=0.5, method="exp", reset="subtract", comparison=">")]


@pytest.mark.parametrize("disc", DISCS, ids=["euler-zero-ge", "exp-subtract-gt"])
def test_affine_linear_lif_threshold(disc):
    r = _rng(1)
    g = _chain(("fc", nir.Affine(weight=r.normal(size=(5, 4)), bias=r.normal(size=5))),
               ("lif", nir.LIF(tau=np.full(5, 3.0), r=np.full(5, 2.0), v_leak=np.full(5, 0.1),
                               v_threshold=np.full(5, 0.6), v_reset=np.full(5, -0.1))),
               ("lin", nir.Linear(weight=r.normal(size=(3, 5)) * (r.random((3, 5)) > 0.3))),
               ("thr", nir.Threshold(threshold=np.full(3, 0.2))),
               in_shape=(4,))
    x = r.normal(size=(12, 3, 4))
    eng = _parity(g, x, disc)
    assert eng["records"]["lif"].any() and eng["records"]["thr"].any()
    c = eng["counts"]
    spikes = eng["records"]["lif"]
    nnz_per_in = (g.nodes["lin"].weight != 0).sum(0)
    np.testing.assert_array_equal(c["lin"]["synops"], (spikes * nnz_per_in).sum(axis=(1, 2)))
    assert c["fc"]["macs"].tolist() == [3 * 20] * 12
    np.testing.assert_array_equal(c["thr"]["spikes_out"], eng["records"]["thr"].sum(axis=(1, 2)))
    np.testing.assert_array_equal(c["lif"]["spikes_out"], spikes.sum(axis=(1, 2)))


@pytest.mark.parametrize("disc", DISCS, ids=["euler-zero-ge", "exp-subtract-gt"])
def test_cuba_li_lif_scale_i_if(disc):
    r = _rng(2)
    n = 6
    g = _chain(("cuba", nir.CubaLIF(tau_syn=np.full(n, 2.0), tau_mem=r.uniform(2, 5, n), r=np.ones(n),
                                    v_leak=np.zeros(n), v_threshold=np.full(n, 0.3), w_in=np.full(n, 1.5))),
               ("sc", nir.Scale(scale=r.normal(size=n))),
               ("cubali", nir.CubaLI(tau_syn=np.full(n, 3.0), tau_mem=np.full(n, 4.0), r=np.ones(n),
                                     v_leak=np.full(n, 0.05))),
               ("li", nir.LI(tau=np.full(n, 2.0), r=np.ones(n), v_leak=np.zeros(n))),
               ("i", nir.I(r=np.full(n, 0.5))),
               ("if", nir.IF(r=np.ones(n), v_threshold=np.full(n, 0.2))),
               in_shape=(n,))
    x = r.normal(size=(15, 2, n)) + 0.5
    eng = _parity(g, x, disc)
    assert eng["records"]["cuba"].any() and eng["records"]["if"].any()


def test_convs_pools_flatten():
    r = _rng(3)
    g = _chain(("c1", nir.Conv2d(input_shape=(6, 6), weight=r.normal(size=(4, 2, 3, 3)), stride=1, padding="same",
                                 dilation=1, groups=1, bias=r.normal(size=4))),
               ("if1", nir.IF(r=np.ones((4, 6, 6)), v_threshold=np.ones((4, 6, 6)))),
               ("c2", nir.Conv2d(input_shape=(6, 6), weight=r.normal(size=(4, 2, 3, 3)), stride=1, padding=2,
                                 dilation=2, groups=2, bias=r.normal(size=4))),
               ("if2", nir.IF(r=np.ones((4, 6, 6)), v_threshold=np.full((4, 6, 6), 0.5))),
               ("sum", nir.SumPool2d(kernel_size=np.array([2, 2]), stride=np.array([2, 2]),
                                     padding=np.array([0, 0]))),
               ("avg", nir.AvgPool2d(kernel_size=np.array([2, 2]), stride=np.array([1, 1]),
                                     padding=np.array([1, 1]))),
               ("c3", nir.Conv2d(input_shape=None, weight=r.normal(size=(3, 4, 2, 2)), stride=(2, 1),
                                 padding="valid", dilation=1, groups=1, bias=None)),
               ("flat", nir.Flatten(input_type=None, start_dim=0, end_dim=-1)),
               ("fc", nir.Affine(weight=r.normal(size=(5, 3 * 2 * 3)), bias=np.zeros(5))),
               in_shape=(2, 6, 6))
    x = (r.random((6, 2, 2, 6, 6)) < 0.5).astype(float) * 2
    eng = _parity(g, x)
    rec, c = eng["records"], eng["counts"]
    # pool_adds of a 2x2/2 SumPool on spikes: every spike falls in exactly one window
    np.testing.assert_array_equal(c["sum"]["pool_adds"], rec["if2"].sum(axis=(1, 2, 3, 4)))
    assert (c["c2"]["synops"] > 0).any() and "macs" in c["c1"]
    assert rec["flat"].shape == (6, 2, 18)


def test_conv1d():
    r = _rng(4)
    g = _chain(("c", nir.Conv1d(input_shape=9, weight=r.normal(size=(4, 2, 3)), stride=2, padding=1, dilation=1,
                                groups=1, bias=r.normal(size=4))),
               ("lif", nir.LIF(tau=np.full((4, 5), 2.0), r=np.ones((4, 5)), v_leak=np.zeros((4, 5)),
                               v_threshold=np.full((4, 5), 0.5))),
               ("c2", nir.Conv1d(input_shape=5, weight=r.normal(size=(2, 2, 2)), stride=1, padding="same",
                                 dilation=2, groups=2, bias=None)),
               in_shape=(2, 9))
    x = r.normal(size=(8, 3, 2, 9))
    eng = _parity(g, x)
    spikes = eng["records"]["lif"]
    assert spikes.any()
    # synops of the second conv: its fan-out per input position, summed over the spikes (brute force here)
    w = g.nodes["c2"].weight != 0
    fan = np.zeros((4, 5))
    for ci in range(4):
        g_ = ci // 2
        for co in range(g_, g_ + 1):
            for pos in range(5):
                for k in range(2):
                    o = pos + 1 - 2 * k  # 'same' with dilation 2, kernel 2: 1 zero before, 1 after
                    if 0 <= o < 5 and w[co, ci % 2, k]:
                        fan[ci, pos] += 1
    np.testing.assert_array_equal(eng["counts"]["c2"]["synops"], (spikes * fan).sum(axis=(1, 2, 3)))


def test_recurrent_lif_loop():
    r = _rng(5)
    n = 4
    nodes = {"input": nir.Input(input_type={"input": np.array([3])}),
             "w_in": nir.Linear(weight=r.normal(size=(n, 3))),
             "lif": nir.LIF(tau=np.full(n, 2.0), r=np.full(n, 2.0), v_leak=np.zeros(n),
                            v_threshold=np.full(n, 0.5)),
             "w_rec": nir.Affine(weight=r.normal(size=(n, n)), bias=np.full(n, 0.1)),
             "output": nir.Output(output_type={"output": np.array([n])})}
    edges = [("input", "w_in"), ("w_in", "lif"), ("lif", "w_rec"), ("w_rec", "lif"), ("lif", "output")]
    g = _graph(nodes, edges)
    prog = load_program(g)
    assert prog.by_name["lif"].back == [False, True]
    x = r.normal(size=(20, 2, 3))
    eng = _parity(g, x)
    assert eng["records"]["lif"].any()
    # the recurrent edge reads the previous step: step 0 sees only w_in's drive
    eng0 = TorchEngine(load_program(_graph({k: v for k, v in nodes.items()},
                                           [e for e in edges if e != ("w_rec", "lif")]))).run(x[:1], record=True)
    np.testing.assert_allclose(eng0["records"]["lif"][0], eng["records"]["lif"][0])


def test_self_loop_and_nested_graph():
    r = _rng(6)
    inner = _graph({"in": nir.Input(input_type={"input": np.array([3])}),
                    "fc": nir.Affine(weight=r.normal(size=(3, 3)), bias=r.normal(size=3)),
                    "lif": nir.LIF(tau=np.full(3, 4.0), r=np.ones(3), v_leak=np.zeros(3),
                                   v_threshold=np.full(3, 0.4)),
                    "out": nir.Output(output_type={"output": np.array([3])})},
                   [("in", "fc"), ("fc", "lif"), ("lif", "lif"), ("lif", "out")])
    g = _graph({"input": nir.Input(input_type={"input": np.array([3])}), "sub": inner,
                "scale": nir.Scale(scale=np.array([1.0, -1.0, 2.0])),
                "output": nir.Output(output_type={"output": np.array([3])})},
               [("input", "sub"), ("sub", "scale"), ("scale", "output"), ("input", "output")])
    x = r.normal(size=(10, 2, 3))
    eng = _parity(g, x)
    assert "sub.lif" in eng["records"] and eng["records"]["sub.lif"].any()
    assert eng["counts"]["output"]["fanin_adds"].tolist() == [2 * 3] * 10


def test_constant_input_still_works_and_steps_from_metadata():
    r = _rng(7)
    g = _chain(("fc", nir.Affine(weight=r.normal(size=(3, 2)), bias=np.zeros(3))),
               ("lif", nir.LIF(tau=np.full(3, 2.0), r=np.ones(3), v_leak=np.zeros(3), v_threshold=np.full(3, .3))),
               in_shape=(2,), metadata={"num_steps": 5})
    x = r.normal(size=(4, 2))
    eng = TorchEngine(load_program(g)).run(x)
    ref = run_graph(g, x[None], num_steps=5)
    np.testing.assert_allclose(eng["outputs"]["output"], ref["outputs"]["output"], atol=TOL)


def test_file_roundtrip(tmp_path):
    r = _rng(8)
    g = _chain(("c", nir.Conv2d(input_shape=(4, 4), weight=r.normal(size=(2, 1, 3, 3)), stride=1, padding=1,
                                dilation=1, groups=1, bias=np.zeros(2))),
               ("lif", nir.LIF(tau=np.full((2, 4, 4), 2.0), r=np.ones((2, 4, 4)), v_leak=np.zeros((2, 4, 4)),
                               v_threshold=np.ones((2, 4, 4)))),
               in_shape=(1, 4, 4))
    nir.write(tmp_path / "g.nir", g)
    x = r.normal(size=(5, 2, 1, 4, 4))
    eng = TorchEngine(load_program(tmp_path / "g.nir")).run(x)
    np.testing.assert_allclose(eng["outputs"]["output"], run_graph(g, x)["outputs"]["output"], atol=TOL)


# --------------------------------------------------------------------------------------------------- delays


def test_delay_per_element_by_hand():
    """``y[k] = x[k - d]`` per element, d = delay / dt; a zero element makes it an ordinary node, all >= 1 a late one
    (evaluated before its source); both engines as the reference, and the values by hand."""
    x = _rng(3).normal(size=(7, 2, 4))
    for delay, dt in (([0.0, 1.0, 2.0, 3.0], 1.0), ([0.5, 1.0, 0.5, 1.5], 0.5)):
        g = _graph({"input": nir.Input(input_type={"input": np.array([4])}), "d": nir.Delay(delay=np.array(delay)),
                    "output": nir.Output(output_type={"output": np.array([4])})}, [("input", "d"), ("d", "output")])
        disc = Discretisation(dt=dt)
        steps = np.rint(np.array(delay) / dt).astype(int)
        want = np.zeros_like(x)
        for e, d in enumerate(steps):
            want[d:, :, e] = x[:x.shape[0] - d, :, e]
        assert load_program(g, disc=disc).by_name["d"].late == bool(steps.min() >= 1)
        eng = _parity(g, x, disc=disc)
        np.testing.assert_array_equal(eng["outputs"]["output"], want)


def test_delay_in_a_cycle_has_exactly_its_latency():
    """``s = x + delay_d(s)``: with a Delay of d >= 1 steps in the loop the cycle's latency is d (no extra step of
    the back-edge rule), so s[k] = x[k] + s[k - d]; a loop without a Delay gets one step (s[k] = x[k] + s[k - 1])."""
    x = _rng(4).normal(size=(9, 3, 2))
    for d in (1, 2, 3):
        g = _graph({"input": nir.Input(input_type={"input": np.array([2])}), "s": nir.Scale(scale=np.ones(2)),
                    "d": nir.Delay(delay=np.full(2, float(d))),
                    "output": nir.Output(output_type={"output": np.array([2])})},
                   [("input", "s"), ("s", "d"), ("d", "s"), ("s", "output")])
        prog = load_program(g)
        assert not any(any(layer.back) for layer in prog.layers)  # broken by the Delay, not by a back edge
        want = x.copy()
        for k in range(d, x.shape[0]):
            want[k] = x[k] + want[k - d]
        eng = _parity(g, x)
        np.testing.assert_allclose(eng["outputs"]["output"], want, rtol=0, atol=1e-12)


def test_delayed_recurrent_lif_spikes():
    """A LIF layer whose spikes come back through a 2-step Delay and an Affine (a delayed recurrent SNN): both engines
    as the reference, spikes exactly; the Delay of spikes keeps the Affine on the spike (synops) path."""
    r = _rng(5)
    n = 5
    nodes = {"input": nir.Input(input_type={"input": np.array([3])}),
             "fc": nir.Affine(weight=r.normal(size=(n, 3)) * 1.5, bias=np.zeros(n)),
             "lif": nir.LIF(tau=np.full(n, 4.0), r=np.ones(n) * 4, v_leak=np.zeros(n), v_threshold=np.ones(n)),
             "d": nir.Delay(delay=np.full(n, 2.0)),
             "rec": nir.Linear(weight=r.normal(size=(n, n))),
             "output": nir.Output(output_type={"output": np.array([n])})}
    edges = [("input", "fc"), ("fc", "lif"), ("lif", "d"), ("d", "rec"), ("rec", "lif"), ("lif", "output")]
    g = _graph(nodes, edges)
    x = r.random((30, 4, 3)) * 2
    eng = _parity(g, x)
    assert load_program(g).by_name["rec"].input == "spikes"
    assert 10 < eng["outputs"]["output"].sum() < eng["outputs"]["output"].size - 10
    assert eng["counts"]["rec"]["synops"].sum() > 0


# --------------------------------------------------------------------------------------------------- errors


def test_errors_name_the_node():
    r = _rng(9)
    def delayed(delay):
        return _graph({"input": nir.Input(input_type={"input": np.array([3])}), "d": nir.Delay(delay=np.array(delay)),
                       "output": nir.Output(output_type={"output": np.array([3])})}, [("input", "d"), ("d", "output")])

    g = delayed([1.0, 0.5, 2.0])
    with pytest.raises(GraphError, match=r"node 'd' \(Delay\).*whole number of steps.*\[0.5\]"):
        load_program(g)
    with pytest.raises(GraphError, match=r"node 'd' \(Delay\)"):  # -1 step
        load_program(delayed([1.0, -1.0, 2.0]))
    load_program(g, disc=Discretisation(dt=0.5))  # 2, 1, 4 steps: fine
    scalar = nir.Delay(delay=np.array(2.0))
    scalar.input_type = scalar.output_type = {}  # what a file with a scalar delay and no types reads back as
    with pytest.raises(GraphError, match=r"'d' \(Delay\).*scalar delay.*input_type"):
        load_program(_graph({"input": nir.Input(input_type={"input": np.array([3])}), "d": scalar,
                             "output": nir.Output(output_type={"output": np.array([3])})},
                            [("input", "d"), ("d", "output")]))
    g = _chain(("fc", nir.Affine(weight=r.normal(size=(3, 4)), bias=np.zeros(3))), in_shape=(5,))
    with pytest.raises(GraphError, match=r"'fc'"):
        load_program(g)
    lif = nir.LIF(tau=np.ones(3), r=np.ones(3), v_leak=np.zeros(3), v_threshold=np.ones(3))
    g = _chain(("lif", lif), in_shape=(3,))
    lif.v_threshold = None  # (nir refuses it at construction; a file from elsewhere may still lack it)
    with pytest.raises(GraphError, match=r"'lif'.*v_threshold"):
        load_program(g)
    two = _graph({"a": nir.Input(input_type={"input": np.array([2])}),
                  "b": nir.Input(input_type={"input": np.array([2])}),
                  "output": nir.Output(output_type={"output": np.array([2])})}, [("a", "output"), ("b", "output")])
    # several Input nodes: every engine takes a dict (one step loop for all), as the reference does
    xa, xb = np.arange(4.0).reshape(2, 2), np.ones((3, 2, 2))
    want = run_graph(two, {"a": xa[None], "b": xb})["outputs"]["output"]
    for engine in (TorchEngine(load_program(two)), EventEngine(load_program(two))):
        np.testing.assert_array_equal(engine.run({"a": xa, "b": xb})["outputs"]["output"], want)
        with pytest.raises(GraphError, match=r"pass a dict"):
            engine.run(xa)
    g = _chain(("fc", nir.Affine(weight=np.eye(2), bias=np.zeros(2))), in_shape=(2,))
    with pytest.raises(GraphError, match=r"expected \[batch"):
        TorchEngine(load_program(g)).run(np.zeros((1, 2, 3)))


# ------------------------------------------------------------------------------------ frameworks' own exports


class _Both:
    """Both engines on one program: ``run`` returns the torch engine's result after checking the event engine's
    against it (outputs within TOL, every count equal)."""

    def __init__(self, program):
        self.program = program

    def run(self, x, t=0, record=False):
        want = TorchEngine(self.program).run(x, t, record)
        got = EventEngine(self.program).run(x, t, record)
        for name, v in want["outputs"].items():
            np.testing.assert_allclose(got["outputs"][name], v, rtol=0, atol=TOL, err_msg=name)
        assert got["counts"].keys() == want["counts"].keys()
        for name, cs in want["counts"].items():
            for c, v in cs.items():
                np.testing.assert_array_equal(got["counts"][name][c], v, err_msg=f"{name} {c}")
        return want


def _output(graph):
    return next(k for k, v in graph.nodes.items() if isinstance(v, nir.Output))


def _snntorch_run(net, x):
    from snntorch import utils as snn_utils

    snn_utils.reset(net)
    outs = []
    with torch.no_grad():
        for k in range(x.shape[0]):
            spk, _ = net(x[k])
            outs.append(spk)
    return torch.stack(outs).numpy()


# snnTorch exports Leaky/RLeaky with dt = 1e-4, tau = dt / (1 - beta), r = tau / dt: euler then gives
# v <- beta v + x. Its spike is [mem - threshold > 0] (">"). Exact parity needs reset_delay=False (immediate
# reset, the reference's rule) and reset_mechanism="zero" (see docs/foreign-graphs.md for "subtract").
SNNTORCH_DISC = Discretisation(dt=1e-4, method="euler", reset="zero", comparison=">")


def test_snntorch_conv_leaky_exact():
    net, graph = snntorch_conv_net()
    x = torch.rand(20, 3, 1, 6, 6) * 2
    want = _snntorch_run(net, x)
    eng = _Both(load_program(graph, disc=SNNTORCH_DISC))
    got = eng.run(x.numpy())["outputs"][_output(graph)]
    assert want.sum() > 5
    np.testing.assert_array_equal(got, want)


def test_snntorch_rleaky_exact():
    snn = pytest.importorskip("snntorch")
    from snntorch.export_nir import export_to_nir

    torch.manual_seed(1)
    n = 6
    net = torch.nn.Sequential(torch.nn.Linear(3, n), snn.RLeaky(
        beta=torch.full((n,), 0.85), threshold=torch.ones(n), linear_features=n, all_to_all=True, init_hidden=True,
        reset_delay=False, reset_mechanism="zero", output=True))
    with torch.no_grad():  # snnTorch adds the recurrent bias at step 0 (recurrent(0) = b); NIR's back edge does not
        net[1].recurrent.bias.zero_()
    graph = export_to_nir(net, torch.zeros(2, 3), ignore_dims=[0])
    prog = load_program(graph, disc=SNNTORCH_DISC)
    assert any(any(layer.back) for layer in prog.layers)
    x = torch.rand(25, 4, 3) * 2
    want = _snntorch_run(net, x)
    got = _Both(prog).run(x.numpy())["outputs"][_output(graph)]
    assert want.sum() > 20
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------------ Norse 1.1.0
# Norse's cells integrate with forward Euler, a = cell.dt * tau_mem_inv (lif_box.py, lif.py), fire on
# [v - v_th > 0] (heaviside: torch.gt) and reset to v_reset. norse.torch.to_nir(..., dt=d) writes tau = d / tau_mem_inv
# (not 1 / tau_mem_inv) and r = 1, so the engine's euler dt / tau equals a when dt = cell.dt * d (1e-6 with the
# defaults). LIFCell (CubaLIF) adds the input to the current unscaled, i <- (1 - b) i + x with b = cell.dt *
# tau_syn_inv; NIR's current is i <- (1 - b) i + b w_in x, and the export leaves w_in = 1: exact parity needs
# w_in = 1 / b = tau_syn / dt. See docs/foreign-graphs.md.


def _norse_run(net, x, state=None):
    """Norse's own step-by-step run of a Sequential whose cells take ``(input, state)``; ``x [T, B, ...]``.
    ``state``: one initial state per module (None: Norse's own, which starts the membrane at ``v_leak``)."""
    state = list(state) if state is not None else [None] * len(net)
    outs = []
    with torch.no_grad():
        for k in range(x.shape[0]):
            h = x[k]
            for j, m in enumerate(net):
                if "Cell" in type(m).__name__:
                    h, state[j] = m(h, state[j])
                else:
                    h = m(h)
            outs.append(h)
    return torch.stack(outs).numpy()


def _norse_disc(cell_dt, export_dt):
    return Discretisation(dt=cell_dt * export_dt, method="euler", reset="zero", comparison=">")


def test_norse_linear_lifbox_exact():
    norse = pytest.importorskip("norse.torch")
    from norse.torch.functional.lif_box import LIFBoxFeedForwardState, LIFBoxParameters

    torch.manual_seed(0)
    cell_dt, export_dt = 0.002, 0.005  # non-default on purpose: the rule is dt = cell.dt * export dt
    p = LIFBoxParameters(tau_mem_inv=torch.tensor(50.0), v_leak=torch.tensor(0.1), v_th=torch.tensor(0.8))
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), norse.LIFBoxCell(p, dt=cell_dt))
    with torch.no_grad():
        net[0].weight.mul_(10.0)
    graph = norse.to_nir(net, torch.zeros(3), dt=export_dt)  # no batch dimension in the sample
    assert type(graph.nodes["1"]).__name__ == "LIF"
    x = torch.rand(40, 4, 3) * 2
    got = _Both(load_program(graph, disc=_norse_disc(cell_dt, export_dt))).run(x.numpy())["outputs"][
        _output(graph)]
    # Norse starts the membrane at v_leak, the engine at zero: exact when Norse is given v = 0 at the start
    want = _norse_run(net, x, [None, LIFBoxFeedForwardState(v=torch.zeros(4, 8))])
    assert want.sum() > 50
    np.testing.assert_array_equal(got, want)
    assert (_norse_run(net, x) != want).any()  # Norse's own start (v = v_leak = 0.1) fires earlier
    # the documented failure: the export's dt alone gives decay 1 - dt / tau = 1 - 1/(cell.dt tau_mem_inv) < 0
    bad = _Both(load_program(graph, disc=Discretisation(dt=export_dt, method="euler", reset="zero",
                                                              comparison=">"))).run(x.numpy())["outputs"][
        _output(graph)]
    assert (bad != want).sum() > want.size // 10


def test_norse_conv_lifbox_exact():
    norse = pytest.importorskip("norse.torch")

    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), norse.LIFBoxCell())
    with torch.no_grad():
        net[0].weight.mul_(6.0)
    graph = norse.to_nir(net, torch.zeros(1, 6, 6))
    x = torch.rand(25, 2, 1, 6, 6) * 2
    want = _norse_run(net, x)
    got = _Both(load_program(graph, disc=_norse_disc(0.001, 0.001))).run(x.numpy())["outputs"][
        _output(graph)]
    assert want.sum() > 50
    np.testing.assert_array_equal(got, want)


def test_norse_linear_lifcell_cubalif_needs_w_in():
    norse = pytest.importorskip("norse.torch")

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), norse.LIFCell())  # tau_syn_inv 200, tau_mem_inv 100, dt 1e-3
    with torch.no_grad():
        net[0].weight.mul_(2.0)
    graph = norse.to_nir(net, torch.zeros(3))
    node = graph.nodes["1"]
    assert type(node).__name__ == "CubaLIF" and np.all(np.asarray(node.w_in) == 1.0)
    disc = _norse_disc(0.001, 0.001)
    x = torch.rand(40, 4, 3) * 2
    want = _norse_run(net, x)
    assert want.sum() > 50
    # as exported (w_in = 1), the current is scaled by b = 0.2: far fewer spikes
    got = _Both(load_program(graph, disc=disc)).run(x.numpy())["outputs"][_output(graph)]
    assert got.sum() < want.sum() / 4
    # with w_in = tau_syn / dt = 1 / b the run is exact
    node.w_in = np.asarray(node.tau_syn, dtype=np.float64) / disc.dt
    got = _Both(load_program(graph, disc=disc)).run(x.numpy())["outputs"][_output(graph)]
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------------ spikingjelly 2.0.0
# spikingjelly's export_to_nir(net, example [T, B, ...] or [B, ...], dt=1e-4) writes IF r = 1/dt, LIF tau = tau dt with
# r = 1 (decay_input=True) or r = tau (decay_input=False), v_leak = v_reset. Euler with the export's dt then gives
# spikingjelly's v <- v + (x - (v - v_reset)) / tau (or v - (v - v_reset) / tau + x) and IF's v <- v + x. It fires on
# [v - v_th >= 0] (heaviside: x >= 0) and hard-resets to v_reset; soft reset (v_reset=None) is refused by the export.
SJ_DISC = Discretisation(dt=1e-4, method="euler", reset="zero", comparison=">=")


def _sj_run(net, x, v0=None):
    """spikingjelly's own multi-step run. Its neurons start at ``v = v_reset``; ``v0`` overrides that start."""
    from spikingjelly.activation_based import functional

    functional.set_step_mode(net, "m")
    functional.reset_net(net)
    if v0 is not None:
        for m in net:
            if hasattr(m, "v_threshold"):
                m.v = v0
    with torch.no_grad():
        out = net(x).numpy()
    functional.reset_net(net)
    return out


@pytest.mark.parametrize("kind", ["if", "lif", "lif-no-decay-input"])
def test_spikingjelly_linear_exact(kind):
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import functional, layer, neuron
    from spikingjelly.activation_based.nir_exchange import export_to_nir

    torch.manual_seed(0)
    cell = {"if": lambda: neuron.IFNode(),
            "lif": lambda: neuron.LIFNode(tau=2.0),
            "lif-no-decay-input": lambda: neuron.LIFNode(tau=3.0, decay_input=False, v_reset=-0.2,
                                                         v_threshold=0.8)}[kind]()
    net = torch.nn.Sequential(layer.Linear(3, 6), cell).double()  # float64: no float32 rounding at the threshold
    functional.set_step_mode(net, "m")
    graph = export_to_nir(net, torch.zeros(2, 4, 3, dtype=torch.float64))
    x = torch.rand(30, 4, 3, dtype=torch.float64) * 2
    want = _sj_run(net, x, v0=0.0)  # the engine starts at zero; spikingjelly at v_reset
    got = _Both(load_program(graph, disc=SJ_DISC)).run(x.numpy())["outputs"][_output(graph)]
    assert want.sum() > 5
    np.testing.assert_array_equal(got, want)
    if kind == "lif-no-decay-input":  # v_reset = -0.2: spikingjelly's own start differs in the first steps
        assert (_sj_run(net, x) != want).any()
    else:
        np.testing.assert_array_equal(_sj_run(net, x), want)


def test_spikingjelly_conv_lif_flatten_if_exact():
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import functional, layer, neuron
    from spikingjelly.activation_based.nir_exchange import export_to_nir

    torch.manual_seed(0)
    net = torch.nn.Sequential(layer.Conv2d(1, 4, 3, padding=1), neuron.LIFNode(tau=2.0), layer.Flatten(),
                              layer.Linear(4 * 36, 5), neuron.IFNode())
    functional.set_step_mode(net, "m")
    with torch.no_grad():
        net[3].weight.mul_(4.0)
    graph = export_to_nir(net, torch.zeros(2, 3, 1, 6, 6))
    x = torch.rand(20, 3, 1, 6, 6) * 2
    want = _sj_run(net, x)
    got = _Both(load_program(graph, disc=SJ_DISC)).run(x.numpy())["outputs"][_output(graph)]
    assert want.sum() > 5
    np.testing.assert_array_equal(got, want)


def test_spikingjelly_fires_at_equality():
    """An IF membrane that reaches the threshold exactly (0.5 + 0.5 = 1) fires in spikingjelly: ">=", not ">"."""
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import functional, layer, neuron
    from spikingjelly.activation_based.nir_exchange import export_to_nir

    net = torch.nn.Sequential(layer.Linear(1, 1, bias=False), neuron.IFNode()).double()
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    functional.set_step_mode(net, "m")
    graph = export_to_nir(net, torch.zeros(2, 1, 1, dtype=torch.float64))
    x = torch.full((6, 1, 1), 0.5, dtype=torch.float64)
    want = _sj_run(net, x)
    np.testing.assert_array_equal(want.ravel(), [0, 1, 0, 1, 0, 1])
    got = _Both(load_program(graph, disc=SJ_DISC)).run(x.numpy())["outputs"][_output(graph)]
    np.testing.assert_array_equal(got, want)
    gt = Discretisation(dt=1e-4, method="euler", reset="zero", comparison=">")
    got = _Both(load_program(graph, disc=gt)).run(x.numpy())["outputs"][_output(graph)]
    assert (got != want).any()


def test_a_flatten_of_spikes_still_carries_spikes():
    """Linear after Flatten after a spiking layer counts synaptic operations (a reshape changes no values)."""
    n = 4
    g = nir.NIRGraph(nodes={
        "input": nir.Input(input_type={"input": np.array([1, 2, 2])}),
        "lif": nir.IF(r=np.ones((1, 2, 2)), v_threshold=np.full((1, 2, 2), 0.5), v_reset=np.zeros((1, 2, 2))),
        "flat": nir.Flatten(input_type={"input": np.array([1, 2, 2])}, start_dim=0, end_dim=-1),
        "fc": nir.Affine(weight=np.array([[1.0, 0.0, 2.0, 3.0], [0.0, 0.0, 1.0, 0.0]]), bias=np.zeros(2)),
        "output": nir.Output(output_type={"output": np.array([2])})},
        edges=[("input", "lif"), ("lif", "flat"), ("flat", "fc"), ("fc", "output")])
    program = load_program(g)
    assert program.by_name["fc"].input == "spikes"
    x = np.ones((1, 1, 1, 2, 2))  # every IF neuron fires at step 0: 4 spikes
    res = _Both(program).run(x, 0)
    # nonzero fan-out per input element: columns [1, 0, 2, 1] -> 4 spikes give 1 + 0 + 2 + 1 = 4 synops
    assert int(res["counts"]["fc"]["synops"].sum()) == n and "macs" not in res["counts"]["fc"]
