"""Mapping graphs onto chips (neurosdm.hardware.mapping / routing, `neurosdm map`, mapping-based energy): resource
counts, placement and routing checked by hand on two small graphs, limits, bad input, the profiles' resources."""

import json
import subprocess

import nir
import numpy as np
import pytest
from conftest import assert_one_line_error, invoke, neurosdm

from neurosdm import energy as E
from neurosdm.errors import ConfigError, GraphError
from neurosdm.graph.program import load_program
from neurosdm.hardware.profiles import PROFILE_DIR, RESOURCES, list_profiles, load_profile
from neurosdm.hardware.routing import core_slots, map_program, try_map
from neurosdm.hardware.sanafe import run_mapped
from neurosdm.simulators.stats import RunStats

# a 2 x 2 mesh, one core per router, 4 cores per chip; the limits set per test
BASE = {"cores_per_chip": (4, "cores"), "mesh_x": (2, "routers"), "mesh_y": (2, "routers"),
        "cores_per_router": (1, "cores"), "neurons_per_core": (4, "neurons"), "fanin_axons_per_core": (64, "axons"),
        "fanout_axons_per_core": (64, "axons"), "synapse_memory_per_core": (4096, "bits"),
        "synapse_bits": (8, "bits"), "conv_weight_sharing": (0, "flag"), "multicast": (0, "flag")}


def profile(tmp_path, name="chip", **changes):
    """A profile TOML with the resources ``BASE`` updated by ``changes`` (value, or None to drop the key)."""
    res = dict(BASE)
    for k, v in changes.items():
        if v is None:
            res.pop(k)
        else:
            res[k] = (v, res.get(k, (0, RESOURCES[k][1][0]))[1])
    lines = [f'name = "{name}"', 'description = "test chip"', "[sources]", 'hand = "by hand"']
    for k, (v, unit) in res.items():
        lines += [f"[resources.{k}]", f"value = {v}", f'unit = "{unit}"', 'source = "hand"',
                  'evidence = "assumption"']
    path = tmp_path / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def dense_graph():
    """input (8) -> IF a (8) -> Affine W [4, 8] (columns 2 and 5 zero) -> IF b (4)."""
    w = np.arange(1.0, 33.0).reshape(4, 8)
    w[:, [2, 5]] = 0
    w[0, 0] = 0
    nodes = {"input": nir.Input({"input": np.array([8])}),
             "a": nir.IF(np.ones(8), np.ones(8), np.zeros(8)),
             "fc": nir.Affine(w, np.zeros(4)),
             "b": nir.IF(np.ones(4), np.ones(4), np.zeros(4)),
             "output": nir.Output({"output": np.array([4])})}
    return nir.NIRGraph(nodes, [("input", "a"), ("a", "fc"), ("fc", "b"), ("b", "output")]), w


def conv_graph(weight=None):
    """input (1, 6, 6) -> IF s -> Conv2d [2, 1, 3, 3] (padding 1) -> IF c (2, 6, 6)."""
    w = np.ones((2, 1, 3, 3)) if weight is None else weight
    nodes = {"input": nir.Input({"input": np.array([1, 6, 6])}),
             "s": nir.IF(np.ones((1, 6, 6)), np.ones((1, 6, 6)), np.zeros((1, 6, 6))),
             "conv": nir.Conv2d((6, 6), w, 1, 1, 1, 1, np.zeros(2)),
             "c": nir.IF(np.ones((2, 6, 6)), np.ones((2, 6, 6)), np.zeros((2, 6, 6))),
             "output": nir.Output({"output": np.array([2, 6, 6])})}
    return nir.NIRGraph(nodes, [("input", "s"), ("s", "conv"), ("conv", "c"), ("c", "output")])


def pieces(m, pop):
    return next(p for p in m["populations"] if p["population"] == pop)["pieces"]


def edge(m, src, dst):
    return next(e for e in m["edges"] if e["src"] == src and e["dst"] == dst)


# ------------------------------------------------------------------------------------------- counts by hand

def test_dense_graph_counts_by_hand(tmp_path):
    graph, w = dense_graph()
    m = map_program(load_program(graph), profile(tmp_path))
    # a: 8 neurons, 4 per core -> 2 pieces; the affine is fused into b (its only consumer is a neuron layer)
    assert [p["population"] for p in m["populations"]] == ["a", "b"]
    assert next(p for p in m["populations"] if p["population"] == "b")["layers"] == ["b", "fc"]
    a, b = pieces(m, "a"), pieces(m, "b")
    assert [(p["neurons"], p["fanin_axons"], p["synapses"], p["memory_bits"], p["fanout_axons"]) for p in a] == \
        [(4, 4, 4, 32, 4), (4, 4, 4, 32, 4)]  # one input axon and one (identity) synapse per neuron
    nnz = int((w != 0).sum())  # 32 - 8 - 1 = 23
    assert (b[0]["neurons"], b[0]["fanin_axons"], b[0]["synapses"], b[0]["memory_bits"]) == (4, 6, nnz, 8 * nnz)
    # serpentine: (0,0), (1,0), then row 1 east to west: (1,1)
    assert [p["core"] for p in a + b] == [[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0]]
    e = edge(m, "a", "b")  # piece 0 is 2 hops from b, piece 1 one hop: mean 1.5; one packet per spike
    assert (e["packets_per_spike"], e["hops_per_spike"], e["chip_hops_per_spike"]) == (1.0, 1.5, 0.0)
    e = edge(m, "input", "a")  # the host sits west of (0, 0): 1 and 2 hops
    assert (e["packets_per_spike"], e["hops_per_spike"]) == (1.0, 1.5)
    assert m["cores_used"] == 3 and m["chips_used"] == 1 and m["fits"]
    assert m["utilisation"]["neurons"] == {"mean": 1.0, "max": 1.0, "limit": "resources.neurons_per_core"}


def test_conv_graph_counts_by_hand(tmp_path):
    m = map_program(load_program(conv_graph()), profile(tmp_path, neurons_per_core=36))
    s, c = pieces(m, "s"), pieces(m, "c")
    assert len(s) == 1 and len(c) == 2
    # c (2 x 6 x 6 = 72 neurons) is cut into two column tiles (a spatial cut needs fewer input axons than a channel
    # cut: 6 x 4 input positions, the halo of one column, instead of 6 x 6)
    assert [(p["c"], p["h"], p["w"]) for p in c] == [([0, 2], [0, 6], [0, 3]), ([0, 2], [0, 6], [3, 6])]
    # synapses of a tile: per channel (valid rows per tap 5 + 6 + 5) x (valid columns per tap 2 + 3 + 3) = 128
    assert [(p["neurons"], p["fanin_axons"], p["synapses"]) for p in c] == [(36, 24, 256), (36, 24, 256)]
    # fan-out of s: columns 2 and 3 are in both tiles' windows: per row 1 + 1 + 2 + 2 + 1 + 1 = 8, x 6 rows
    assert s[0]["fanout_axons"] == 48
    e = edge(m, "s", "c")  # 2/3 of the spikes reach the tile 1 hop away, 2/3 the tile 2 hops away
    assert e["packets_per_spike"] == pytest.approx(4 / 3, abs=1e-6)
    assert e["hops_per_spike"] == pytest.approx(2 / 3 + 4 / 3, abs=1e-6)


def test_synapses_of_the_pieces_sum_to_the_layer_and_sharing_stores_the_kernel(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.integers(-3, 4, (2, 1, 3, 3)).astype(float)  # about 1/7 zeros
    program = load_program(conv_graph(w))
    for n in (9, 12, 36, 72):
        m = map_program(program, profile(tmp_path, neurons_per_core=n))
        assert sum(p["synapses"] for p in pieces(m, "c")) == program.by_name["conv"].macs  # graph.geometry's count
    m = map_program(program, profile(tmp_path, neurons_per_core=72, conv_weight_sharing=1))
    (pc,) = pieces(m, "c")
    assert pc["memory_bits"] == 8 * int((w != 0).sum()) and pc["fanin_axons"] == 36  # positions, not x channels


def test_multicast_sends_one_packet(tmp_path):
    m = map_program(load_program(conv_graph()), profile(tmp_path, neurons_per_core=36, multicast=1))
    e = edge(m, "s", "c")  # one packet forks from (0,0) to (1,0) and (1,1): a tree of 2 links
    assert (e["packets_per_spike"], e["hops_per_spike"]) == (1.0, 2.0)


def test_chips_fill_in_order_and_crossings_are_counted(tmp_path):
    m = map_program(load_program(conv_graph()), profile(tmp_path, neurons_per_core=9))
    assert m["chips_used"] == -(-m["cores_used"] // 4)
    assert edge(m, "s", "c")["chip_hops_per_spike"] > 0
    slots = core_slots({"mesh_x": 2, "mesh_y": 2, "cores_per_router": 1, "cores_per_chip": 4}, 6)
    assert slots.tolist() == [[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [1, 2, 0, 0], [1, 3, 0, 0]]


# ------------------------------------------------------------------------------------------------- limits

def test_a_neuron_over_a_core_limit_is_a_one_line_error_naming_layer_and_limit(tmp_path):
    with pytest.raises(GraphError, match=r"layer 'c' cannot be mapped: one neuron needs 9 fanin axons, a core "
                                         r"allows 8 \(resources.fanin_axons_per_core\)"):
        map_program(load_program(conv_graph()), profile(tmp_path, fanin_axons_per_core=8))
    with pytest.raises(GraphError, match="resources.synapse_memory_per_core"):
        map_program(load_program(conv_graph()), profile(tmp_path, synapse_memory_per_core=64))


def test_limits_that_splitting_cannot_fix_are_reported(tmp_path):
    graph, _ = dense_graph()
    m = map_program(load_program(graph), profile(tmp_path, weights_per_neuron=4, targets_per_neuron=1,
                                                 chips_per_system=1, neurons_per_core=1))
    found = {(v["limit"], v["layer"]) for v in m["violations"]}
    assert ("resources.weights_per_neuron", "b") in found and ("resources.chips_per_system", "(whole graph)") in found
    assert not m["fits"]
    m = map_program(load_program(conv_graph()), profile(tmp_path, neurons_per_core=9, targets_per_neuron=1))
    assert ("resources.targets_per_neuron", "s") in {(v["limit"], v["layer"]) for v in m["violations"]}


@pytest.mark.parametrize("changes, needle", [
    ({"cores_per_chip": 5}, "cores_per_chip = 5 > mesh_x x mesh_y x cores_per_router = 4"),
    ({"cores_per_chip": 2}, "leaves a whole row"),
    ({"neurons_per_core": None}, "resources.neurons_per_core is missing"),
    ({"multicast": 2}, "resources.multicast must be 0 or 1"),
    ({"fanin_axons_per_core": 2.5}, "must be a whole number >= 1"),
    ({"synapse_bits": None}, "go together"),
    ({"chips_per_board": 4, "chips_per_system": 2}, "chips_per_board = 4 > chips_per_system = 2"),
])
def test_inconsistent_resources_are_refused_on_load(tmp_path, changes, needle):
    path = profile(tmp_path, **changes)
    with pytest.raises(ConfigError) as e:
        load_profile(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "inconsistent [resources]" in msg and needle in msg, msg


def test_unknown_resource_unit_is_refused(tmp_path):
    path = profile(tmp_path)
    path.write_text(path.read_text().replace('value = 4\nunit = "neurons"', 'value = 4\nunit = "cores"'))
    with pytest.raises(ConfigError, match="resources.neurons_per_core.*unit 'cores' is not one of neurons"):
        load_profile(path)


def test_shipped_resources_are_sourced_and_the_cmos_profiles_have_none():
    have = {n for n in list_profiles() if load_profile(n).resources}
    assert have == {"loihi", "loihi2", "loihi-sanafe", "truenorth", "spinnaker2"}
    for n in have:
        for k, c in load_profile(n).resources.items():
            assert c.source in load_profile(n).sources and (c.evidence != "assumption" or c.note), (n, k)
    assert load_profile("loihi").resources["synapse_memory_per_core"].value == 128 * 8192  # KiB -> bits
    with pytest.raises(ConfigError, match="'cmos45-fp32' has no \\[resources\\] section"):
        map_program(load_program(conv_graph()), "cmos45-fp32")
    assert try_map(load_program(conv_graph()), "cmos45-fp32")[0] is None


# ---------------------------------------------------------------------------------- energy on the mapping

def test_energy_on_the_mapping_counts_hops_and_takes_the_busiest_core(tmp_path):
    program = load_program(conv_graph())
    stats = RunStats(num_steps=2, images=1, timesteps=[0], layer_kinds={"s": "if", "conv": "conv", "c": "if"})
    stats.add_call(0, {"s": {"neuron_updates": [36, 36], "active_neurons": [36, 36], "spikes_out": [10, 20]},
                       "conv": {"events_in": [10, 20], "synops": [90, 180]},
                       "c": {"neuron_updates": [72, 72], "active_neurons": [40, 40], "spikes_out": [0, 5]}}, {})
    text = (PROFILE_DIR / "loihi.toml").read_text()  # Loihi with 36 neurons and one router per core: 3 cores apart
    for key, old, new in (("cores_per_chip", 128, 32), ("cores_per_router", 4, 1), ("neurons_per_core", 1024, 36)):
        text = text.replace(f"[resources.{key}]\nvalue = {old}\n", f"[resources.{key}]\nvalue = {new}\n")
    chip = tmp_path / "small-loihi.toml"
    chip.write_text(text)
    m = map_program(program, chip)
    r = E.estimate(stats, chip, mapping=m)
    hops = m["spikes"]["s"]["hops_per_spike"]
    s_terms = next(layer for layer in r["layers"] if layer["layer"] == "s")["terms"]
    assert s_terms["hop"]["count"] == pytest.approx(30 * hops)
    lb = E.estimate(stats, chip)
    assert "lower bound" in lb["time"]["model"] and "busiest core" in r["time"]["model"]
    assert r["time"]["total_s"] > lb["time"]["total_s"]  # the busiest core is slower than 128 even cores
    assert r["mapping"]["cores_used"] == m["cores_used"] and r["mapping"]["limiting_cores"]
    assert r["static"]["chips"] == m["chips_used"]


# -------------------------------------------------------------------------------------------------- CLI

def test_cli_map_writes_mapping_and_png(tmp_path):
    nir.write(tmp_path / "conv.nir", conv_graph())  # a foreign graph (no denoiser metadata)
    r = invoke("map", tmp_path / "conv.nir", "--profile", "loihi2", "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert "fits: 2 cores on 1 chip(s)" in r.output and "utilisation per core" in r.output
    m = json.loads((tmp_path / "out" / "mapping.json").read_text())
    assert m["profile"] == "loihi2" and m["fits"] and (tmp_path / "out" / "mapping.png").stat().st_size > 1000


def test_cli_map_bad_input_is_one_line(tmp_path):
    nir.write(tmp_path / "conv.nir", conv_graph())
    assert_one_line_error(neurosdm("map", tmp_path / "conv.nir", "--profile", "cmos45-int8", cwd=tmp_path),
                          "no [resources] section")
    assert_one_line_error(neurosdm("map", tmp_path / "none.nir", cwd=tmp_path), "file not found")
    small = profile(tmp_path, fanin_axons_per_core=8)
    assert_one_line_error(neurosdm("map", tmp_path / "conv.nir", "--profile", small, cwd=tmp_path),
                          "layer 'c' cannot be mapped", "resources.fanin_axons_per_core")
    bad = profile(tmp_path, name="bad", cores_per_chip=5)
    assert_one_line_error(neurosdm("map", tmp_path / "conv.nir", "--profile", bad, cwd=tmp_path),
                          "inconsistent [resources]", "bad.toml")


# ------------------------------------------------------------------ SANA-FE with neurosdm's placement

ROOT = PROFILE_DIR.parent.parent
SANAFE_READY = ROOT / ".venv-sanafe" / ".sanafe-installed"


def small_sanafe(tmp_path, neurons=32):
    old = "[resources.neurons_per_core]\nvalue = 1024\n"
    path = tmp_path / "loihi-sanafe-small.toml"
    path.write_text((PROFILE_DIR / "loihi-sanafe.toml").read_text().replace(old, old.replace("1024", str(neurons))))
    return path


def test_mapped_suite_network_exact_counts_agree_with_the_mapper_on_a_dense_network(tmp_path):
    prof = small_sanafe(tmp_path)
    side = run_mapped("dense2", tmp_path, prof, lambda stats, mapping: E.estimate(stats, prof, mapping=mapping))
    # every input of a dense layer reaches every destination core: the per-layer average is exact
    assert side["exact"]["packets"] == side["mapper"]["packets"] > 0 and side["exact"]["hops"] == side["mapper"]["hops"]
    assert side["cores_used"] > 3 and side["time_per_step_s"] > 0


@pytest.mark.skipif(not SANAFE_READY.exists(), reason=".venv-sanafe is missing: SANA-FE runs only in its own "
                                                      "environment (scripts/sanafe_env.sh)")
def test_sanafe_with_the_mappers_placement_counts_the_same_packets_and_hops(tmp_path):
    prof = small_sanafe(tmp_path)
    side = run_mapped("conv2", tmp_path, prof, lambda stats, mapping: E.estimate(stats, prof, mapping=mapping))
    out = subprocess.run([str(ROOT / ".venv-sanafe" / "bin" / "python"), str(ROOT / "scripts" / "sanafe_mapped.py"),
                          str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    sf = json.loads((tmp_path / "conv2.sanafe_mapped.json").read_text())
    layers = side["mapping"]["layers"]
    for name, per_step in side["spikes"].items():
        d = layers[name]["depth"]
        assert sf["spikes"][name][d:d + side["num_steps"]] == per_step
    assert (side["exact"]["packets"], side["exact"]["hops"]) == (sf["packets"], sf["hops"]) and sf["hops"] > 0
