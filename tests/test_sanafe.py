"""neurosdm against SANA-FE (docs/sanafe.md): the suite of neurosdm.hardware.sanafe builds, neurosdm's counts of a tiny
network equal hand counts, the energy options that model SANA-FE's accounting are priced right by hand, and (when
.venv-sanafe exists: scripts/sanafe_env.sh, `make test` builds it) one network runs through SANA-FE itself with
identical spikes and counts and the same energy by part."""

import json
import subprocess
from pathlib import Path

import nir
import numpy as np
import pytest

from neurosdm import energy as E
from neurosdm.errors import ConfigError
from neurosdm.graph.program import load_program
from neurosdm.hardware import sanafe
from neurosdm.simulators.foreign import simulate_foreign
from neurosdm.simulators.stats import RunStats

ROOT = Path(__file__).resolve().parents[1]
SANAFE_PY = ROOT / ".venv-sanafe" / "bin" / "python"
SANAFE_READY = ROOT / ".venv-sanafe" / ".sanafe-installed"  # written by scripts/sanafe_env.sh once it succeeded


def test_suite_graphs_build():
    for name in sanafe.SUITE:
        graph, x = sanafe.build_graph(name)
        program = load_program(graph)
        assert set(np.unique(x)) <= {0.0, 1.0} and x.shape[1] == 1 and 0 < x.mean() < 1
        weights = [np.asarray(n.weight) for n in graph.nodes.values() if isinstance(n, (nir.Affine, nir.Conv2d))]
        for w in weights:  # Loihi's grid: int8 integers, zeros present (SANA-FE charges them)
            assert np.array_equal(w, np.rint(w)) and np.abs(w).max() <= 127 and (w == 0).any()
        mp = sanafe.mapping(program)
        for info in mp["layers"].values():
            assert info["threshold"] == int(info["threshold"]) and info["size"] <= sanafe.CORE_NEURONS
        assert mp["depth"] == 2 and mp["cores_used"] <= 4
        place = sanafe.placement(mp, {n: 0 for n in mp["layers"]})
        last = [n for n, i in mp["layers"].items() if not i["destinations"]]
        assert len(last) == 1 and place["layers"][last[0]]["packets_per_spike"] == 0


def _tiny_dense():
    """Input(3) -> encoder IF -> Affine W -> IF (threshold 2, fires on v > 2, reset to 0)."""
    w = np.array([[2.0, 0.0, 1.0], [0.0, 3.0, -1.0]])
    nodes = {"input": nir.Input({"input": np.array([3])}),
             "enc": nir.IF(np.ones(3), np.zeros(3), np.zeros(3)),
             "fc": nir.Affine(w, np.zeros(2)),
             "n": nir.IF(np.ones(2), np.full(2, 2.0), np.zeros(2)),
             "output": nir.Output({"output": np.array([2])})}
    edges = [("input", "enc"), ("enc", "fc"), ("fc", "n"), ("n", "output")]
    graph = nir.NIRGraph(nodes, edges, metadata={"dt": 1.0, "reset": "zero", "comparison": ">"})
    x = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 1]], np.float64)[:, None]  # [3 steps, batch 1, 3]
    return load_program(graph), x


def test_tiny_network_counts_equal_hand_counts():
    program, x = _tiny_dense()
    res, stats = simulate_foreign(program, x, engine="torch", record=True)
    c = {k: v[0].tolist() for k, v in stats.layers["fc"].items()}
    n = {k: v[0].tolist() for k, v in stats.layers["n"].items()}
    # x = W s: step 0 [2, 3] -> v [2, 3], neuron 1 fires; step 1 [0, 3] -> v [2, 3], neuron 1 fires;
    # step 2 [3, -1] -> v [5, -1], neuron 0 fires; membranes at the end [0, -1]
    assert c["events_in"] == [2, 1, 2]
    assert c["synops"] == [2, 1, 3]  # nonzero weights in the spiking columns: 1 + 1 | 1 | 1 + 2
    assert n["spikes_out"] == [1, 1, 1] and n["neuron_updates"] == [2, 2, 2]
    assert n["active_neurons"] == [2, 1, 2]  # step 1: neuron 0's input is a spike through a zero weight
    assert E.synapse_events(program, res["records"])["fc"].tolist() == [4, 2, 4]  # 2 synapses per input spike
    upd = E.state_updates(program, res["records"])["n"]
    assert upd["updated"].tolist() == [2, 2, 2] and upd["nonzero_end"] == 1  # reached by any event, v = [0, -1]


def test_conv_synapse_events_border_fan_out():
    """3x3 input, 2x2 kernel: a corner input reaches 1 output, the centre 4; zeros of the kernel included."""
    w = np.array([[[[1.0, 0.0], [0.0, 1.0]]]])
    nodes = {"input": nir.Input({"input": np.array([1, 3, 3])}),
             "enc": nir.IF(np.ones((1, 3, 3)), np.zeros((1, 3, 3)), np.zeros((1, 3, 3))),
             "conv": nir.Conv2d((3, 3), w, 1, 0, 1, 1, np.zeros(1)),
             "n": nir.IF(np.ones((1, 2, 2)), np.full((1, 2, 2), 5.0), np.zeros((1, 2, 2))),
             "output": nir.Output({"output": np.array([1, 2, 2])})}
    edges = [("input", "enc"), ("enc", "conv"), ("conv", "n"), ("n", "output")]
    program = load_program(nir.NIRGraph(nodes, edges, metadata={"reset": "zero", "comparison": ">"}))
    x = np.zeros((1, 1, 1, 3, 3))
    x[0, 0, 0, 0, 0] = x[0, 0, 0, 1, 1] = 1
    res, stats = simulate_foreign(program, x, engine="torch", record=True)
    assert stats.layers["conv"]["synops"].tolist() == [[3]]  # corner: 1 nonzero tap; centre: the 2 diagonal taps
    assert E.synapse_events(program, res["records"])["conv"].tolist() == [5]
    E.add_synapse_events(stats, program, res["records"])
    r = E.estimate(stats, "loihi-sanafe")
    conv = next(layer for layer in r["layers"] if layer["layer"] == "conv")["terms"]
    assert conv["synop"]["pj"] == pytest.approx(3 * 24.0) and conv["zero_synop"]["pj"] == pytest.approx(2 * 24.0)
    assert {u["term"] for u in E.estimate(stats, "loihi")["unpriced"]} == {"zero_synop", "sync"}  # listed, not 0


def _option_stats() -> RunStats:
    a = lambda *v: np.array([v], np.int64)  # noqa: E731  [1 call, 2 spiking steps]
    layers = {"enc": {"neuron_updates": a(3, 3), "active_neurons": a(2, 1), "spikes_out": a(2, 1)},
              "fc": {"events_in": a(2, 1), "synops": a(4, 2), "synapse_events": a(6, 3)},
              "n": {"neuron_updates": a(2, 2), "active_neurons": a(1, 2), "updated_neurons": a(2, 2),
                    "spikes_out": a(1, 1)}}
    return RunStats(2, images=1, timesteps=[0], layers=layers,
                    layer_kinds={"enc": "if", "fc": "affine", "n": "if"})


def _terms(report):
    return {layer["layer"]: {t: v["pj"] for t, v in layer["terms"].items()} for layer in report["layers"]}


def test_sanafe_options_priced_by_hand():
    place = {"layers": {"enc": {"source": True, "packets_per_spike": 1, "hops_per_spike": 0},
                        "n": {"packets_per_spike": 0, "hops_per_spike": 0, "extra_updates": 1}},
             "pipeline_steps": 1}
    t = _terms(E.estimate(_option_stats(), "loihi-sanafe", placement=place))
    assert t["fc"] == pytest.approx({"synop": 6 * 24.0, "zero_synop": 3 * 24.0})
    assert t["enc"] == pytest.approx({"message": 3 * 111.0})  # an input neuron: packets only
    # updates: 4 by Loihi's rule + 1 after the input; accesses: 4 + 2 (one pipeline step) - 5 active = 1 idle
    assert t["n"] == pytest.approx({"neuron_update_active": 5 * 72.8, "neuron_update_idle": 1 * 51.2,
                                    "spike": 2 * 69.3})
    # without a placement: one packet and the profile's 1 hop (3.6 pJ) per spike, every layer on the soma
    t = _terms(E.estimate(_option_stats(), "loihi-sanafe"))
    assert t["enc"] == pytest.approx({"neuron_update_active": 3 * 72.8, "neuron_update_idle": 3 * 51.2,
                                      "spike": 3 * 69.3, "message": 3 * 111.0, "hop": 3 * 3.6})
    assert t["n"]["neuron_update_active"] == pytest.approx(4 * 72.8)  # updated_neurons, not active_neurons
    # a profile that prices the message inside `spike` gets no message term and lists nothing new as unpriced
    r = E.estimate(_option_stats(), "loihi")
    assert "message" not in _terms(r)["enc"] and {u["term"] for u in r["unpriced"]} == {"zero_synop", "sync"}


@pytest.mark.parametrize("placement,needle", [
    ({"layers": {"nope": {}}}, "layer 'nope'"),
    ({"layers": {"n": {"packets": 1}}}, "allowed keys"),
    ({"layers": {"n": {"hops_per_spike": -1}}}, "hops_per_spike must be a number >= 0"),
    ({"pipeline_steps": 1.5}, "pipeline_steps must be an integer"),
    ({"cores": 3}, "placement must be a dict"),
])
def test_placement_errors(placement, needle):
    with pytest.raises(ConfigError, match=needle):
        E.estimate(_option_stats(), "loihi-sanafe", placement=placement)


@pytest.mark.skipif(not SANAFE_READY.exists(), reason=".venv-sanafe is missing (build it with scripts/sanafe_env.sh or "
                                                      "make test; sanafe has cp310/cp311 wheels only): SANA-FE runs "
                                                      "only in its own environment")
def test_cross_check_against_sanafe(tmp_path):
    ns = sanafe.run_neurosdm("mixed", tmp_path,
                             lambda stats, placement=None: E.estimate(stats, "loihi-sanafe", placement=placement))
    script = ROOT / "scripts" / "sanafe_compare.py"
    out = subprocess.run([str(SANAFE_PY), str(script), str(tmp_path), "--no-dense-unit"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    sf = json.loads((tmp_path / "mixed.sanafe.json").read_text())
    r = sanafe.compare(ns, sf)
    assert all(layer["spike_trains_identical"] and layer["spikes_sanafe_outside_window"] == 0
               for layer in r["layers"].values())
    c = r["counts"]
    assert c["synapse_events"]["neurosdm_all_synapses"] == c["synapse_events"]["sanafe"]
    assert c["synapse_events"]["neurosdm_nonzero_synops"] < c["synapse_events"]["sanafe"]
    assert c["packets"]["neurosdm"] == c["packets"]["sanafe"] and c["hops"]["sanafe"] == 0
    assert c["neuron_updates"]["neurosdm_updated_loihi_rule"] == c["neuron_updates"]["sanafe_updated"]
    assert c["neuron_updates"]["neurosdm_accesses"] == c["neuron_updates"]["sanafe_accesses"]
    for part, v in r["energy"]["modelled"].items():
        assert abs(v["rel_diff"]) < 1e-9, part
    assert sf["by_hand"]["max_rel_diff"] < 1e-9  # SANA-FE's energy is its counts times its constants
    assert abs(r["energy"]["shipped"]["total"]["rel_diff"]) > 0.01  # the modelling is what closes the gap
