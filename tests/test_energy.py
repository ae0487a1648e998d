"""Energy estimation (neurosdm.energy): profiles, pricing of hand-built counts, the SDM paper check, the
`energy` and `profiles` commands, and (if installed) NeuroBench's synaptic-operation counts."""

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from neurosdm import cli
from neurosdm import energy as E
from neurosdm.errors import ConfigError
from neurosdm.hardware.profiles import EVIDENCE, list_profiles, load_profile
from neurosdm.hardware.routing import map_program
from neurosdm.simulators.stats import RunStats

runner = CliRunner()


def hand_stats() -> RunStats:
    """One image, one denoising step, two spiking steps; small known counts."""
    a = lambda *v: np.array([v], np.int64)  # noqa: E731  [1 denoising step, 2 spiking steps]
    layers = {
        "c0": {"macs": a(100, 100), "events_in": a(64, 64)},
        "c1": {"synops": a(10, 20), "events_in": a(5, 5)},
        "g": {"graded_ops": a(7, 3), "events_in": a(2, 1)},
        "n": {"neuron_updates": a(50, 50), "active_neurons": a(20, 10), "spikes_out": a(4, 6),
              "saturations": a(1, 0)},
        "j": {"events_in": a(5, 5), "fanin_adds": a(8, 8)},
    }
    kinds = {"c0": "conv", "c1": "conv", "g": "conv", "n": "if", "j": "scale"}
    return RunStats(2, images=1, timesteps=[5], layers=layers,
                    host={"host_macs": np.array([1000]), "host_elementwise": np.array([500])}, layer_kinds=kinds)


# counts: synop 30, graded 10, mac 200, fanin_add 16, scale_op 10, updates active 30 / idle 70, spikes 10, syncs 2;
# host: 1000 MACs, 500 element-wise (fp32 host: 1000 * 4.6 + 500 * 3.7 = 6450 pJ)
FP32_HOST = 1000 * 4.6 + 500 * 3.7
LOIHI_NS = 2 * 465 + (30 * 3.5 + 30 * 8.4 + 70 * 5.3 + 10 * 2.1 + 10 * 1 * 5.3) / 128
LOIHI2_NS = 2 * 465 + (30 * 3.5 + 10 * 3.5 + 200 * 3.5 + 30 * 8.4 + 70 * 5.3 + 10 * 2.1 + 10 * 5.3) / 128
EXPECTED = {  # profile: (chip pJ, host pJ, static pJ, unpriced terms)
    "loihi": (30 * 23.6 + 30 * 81 + 70 * 52 + 10 * 1.7 + 10 * 3.5, FP32_HOST, LOIHI_NS * 104e-3 * 1e3,
              {"mac", "graded_op", "scale_op", "fanin_add", "sync"}),
    "loihi-sanafe": (30 * 24 + 30 * 72.8 + 70 * 51.2 + 10 * 180.3 + 10 * 3.6, FP32_HOST, LOIHI_NS * 104,
                     {"mac", "graded_op", "scale_op", "fanin_add", "sync"}),
    "loihi2": (30 * 24 + 10 * 24 + 200 * 24 + 30 * 72.8 + 70 * 51.2 + 10 * 180.3 + 10 * 3.6, FP32_HOST,
               LOIHI2_NS * 232, {"scale_op", "fanin_add", "sync"}),
    "truenorth": (30 * 26, FP32_HOST, 0.0, {"mac", "graded_op", "scale_op", "fanin_add"}),
    "spinnaker2": (30 * 450 + 100 * 2190, FP32_HOST, 0.0, {"mac", "graded_op", "scale_op", "fanin_add", "spike"}),
    "cmos45-fp32": (30 * 0.9 + 10 * 4.6 + 200 * 4.6 + 16 * 0.9 + 10 * 3.7 + 100 * 0.9, FP32_HOST, 0.0, {"spike"}),
    "cmos45-int8": (30 * 0.1 + 10 * 0.23 + 200 * 0.23 + 16 * 0.1 + 10 * 0.2 + 100 * 0.1, FP32_HOST, 0.0, {"spike"}),
    "sdm-paper": (30 * 0.9 + 200 * 4.6, 0.0, 0.0, {"graded_op", "scale_op", "fanin_add", "neuron_update_active", "mac",
                                                   "neuron_update_idle", "spike", "elementwise"}),
}


def test_every_shipped_profile_is_tested_and_documented():
    assert set(list_profiles()) == set(EXPECTED)
    for name in list_profiles():
        p = load_profile(name)
        assert p.name == name and p.description and p.sources
        for section, term, c in p.constants():
            assert c.source in p.sources and c.evidence in EVIDENCE and c.unit
    assert E.load_profile is load_profile and E.list_profiles is list_profiles  # re-exported by neurosdm.energy


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_profile_prices_hand_counts(name):
    chip, host, static, unpriced = EXPECTED[name]
    r = E.estimate(hand_stats(), name)
    got_chip = sum(layer["total_pj"] for layer in r["layers"]) + r["totals"]["by_term_pj"].get("sync", 0.0)
    assert got_chip == pytest.approx(chip, rel=1e-12)
    assert r["host"]["total_pj"] == pytest.approx(host, rel=1e-12)
    assert (r["static"]["pj"] if r["static"] else 0.0) == pytest.approx(static, rel=1e-12)
    assert r["totals"]["total_pj"] == pytest.approx(chip + host + static, rel=1e-12)
    assert r["totals"]["per_image_pj"] == r["totals"]["total_pj"]
    assert {u["term"] for u in r["unpriced"]} == unpriced
    counts = {u["term"]: u["count"] for u in r["unpriced"]}
    assert counts.get("mac", 200) in (200, 1000) and counts.get("fanin_add", 16) == 16


def test_time_and_edp_and_per_step_totals():
    r = E.estimate(hand_stats(), "loihi")
    assert r["time"]["total_s"] == pytest.approx(LOIHI_NS * 1e-9)
    assert r["edp_per_image_js"] == pytest.approx(r["totals"]["per_image_pj"] * 1e-12 * LOIHI_NS * 1e-9)
    assert r["totals"]["per_denoising_step_pj"] == pytest.approx([r["totals"]["total_pj"]])
    assert any("parallel_cores" in a for a in r["assumptions"])
    assert E.estimate(hand_stats(), "truenorth")["time"] is None
    # another host profile changes only the host terms
    r8 = E.estimate(hand_stats(), "loihi", host_profile="cmos45-int8")
    assert r8["host"]["total_pj"] == pytest.approx(1000 * 0.23 + 500 * 0.2)


def bad_profile(tmp_path, text):
    p = tmp_path / "bad.toml"
    head = 'name = "bad"\ndescription = "x"\n'
    tables = '[sources]\na = "someone"\n'
    p.write_text(head + tables + text if text.startswith("[") else head + text + tables)
    return p


@pytest.mark.parametrize("text,needle", [
    ('[energy.synop]\nvalue = 1.0\nunit = "pJ"\nsource = "a"\nevidence = "silicon"\ncolour = "red"\n',
     "energy.synop.'colour'"),
    ('[energy.synapse]\nvalue = 1.0\nunit = "pJ"\nsource = "a"\nevidence = "silicon"\n', "'energy.synapse'"),
    ('[energy.synop]\nvalue = 1.0\nsource = "a"\nevidence = "silicon"\n', "missing unit in key 'energy.synop'"),
    ('[energy.synop]\nvalue = 1.0\nunit = "ns"\nsource = "a"\nevidence = "silicon"\n', "unit 'ns'"),
    ('[energy.synop]\nvalue = 1.0\nunit = "pJ"\nsource = "b"\nevidence = "silicon"\n', "source 'b'"),
    ('extra = 1\n', "unknown key 'extra'"),
])
def test_malformed_profile_one_line_error(tmp_path, text, needle):
    p = bad_profile(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_profile(p)
    msg = str(e.value)
    assert needle in msg and str(p) in msg and "\n" not in msg


def test_paper_check_ann_energy():
    """The SDM paper's DDPM-ANN 29.23 mJ per network evaluation: 4.6 pJ x every conv MAC of the paper-cifar10
    architecture once (dense taps, the head's Conv3d included, time-embedding MLP excluded)."""
    r = E.paper_check()
    assert abs(r["ann_error"]) < 0.02, r["ann_mj"]
    assert r["ann_mj"] == pytest.approx(29.808, abs=0.001)
    # the same FLOPs make the paper's SNN figures imply firing rates of 0.47 (T=4) and 0.49 (T=8)
    assert r["implied_rate"][4] == pytest.approx(0.470, abs=0.002)
    assert r["implied_rate"][8] == pytest.approx(0.492, abs=0.002)
    snn = E.paper_energy(r["flops"], 0.47, 4, "conv")
    assert snn["total_pj"] * 1e-9 == pytest.approx(10.97, rel=0.01)
    # counting the time MLP too leaves the 2% band: the convention is convs only
    assert E.paper_check(include_linear=True)["ann_error"] > 0.02


def test_paper_energy_by_hand():
    r = E.paper_energy({"a": 100, "b": 1000, "c": 10}, {"b": 0.5, "c": 0.1}, 4, "a")
    assert r["total_pj"] == pytest.approx(4.6 * 100 + 0.9 * (0.5 * 4 * 1000 + 0.1 * 4 * 10))
    assert r["sops"] == pytest.approx(2004)
    with pytest.raises(ConfigError):
        E.paper_energy({"a": 1, "b": 1}, {}, 4, "a")


# --------------------------------------------------------------------------------------------- exported graphs

@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    from neurosdm.exporters.pipeline import export_checkpoint
    from conftest import tiny_checkpoint

    d = tmp_path_factory.mktemp("energy")
    ckpt = tiny_checkpoint(d / "sdm.pt", head="sdm")
    return export_checkpoint(ckpt, d / "sdm8.nir", quantize="int8", calibration="builtin", calibration_images=8)


@pytest.fixture(scope="module")
def run(graph):
    from neurosdm.graph.program import load_program
    from neurosdm.simulators.run import simulate

    program = load_program(graph)
    _, stats, den = simulate(program, "event", num_images=1, steps=2, seed=0, record=True)
    return program, stats, den


def test_ann_baseline_from_program_matches_macs_formula(run):
    from neurosdm.simulators.event import ConvPlan
    from neurosdm.simulators.run import host_counts

    program, stats, _ = run
    macs = E.program_macs(program)
    for layer in program.layers:
        if layer.kind == "conv":
            assert macs[layer.name] == ConvPlan(layer).macs_per_image
    base = E.ann_baseline(program, "cmos45-fp32")
    head = host_counts(program, 1)["host_macs"] // program.num_steps
    assert base["macs"] == sum(macs.values()) + head and base["pj_per_call"] == pytest.approx(base["macs"] * 4.6)
    # analog-input convs: RunStats' macs are exactly the baseline's count once per spiking step
    for name, cs in stats.layers.items():
        if "macs" in cs:
            assert cs["macs"].sum() == macs[name] * program.num_steps * len(stats.timesteps)


def test_paper_formula_on_measured_rates(run):
    program, stats, _ = run
    rates = E.firing_rates(stats, program)
    flops = E.program_macs(program)
    first = next(layer.name for layer in program.layers if layer.kind == "conv" and layer.sources == program.inputs)
    r = E.paper_energy(flops, rates, program.num_steps, first)
    assert 0 <= r["mean_rate"] <= 1 and r["total_pj"] > 4.6 * flops[first]
    # for spike-input convs, rate x T x FLOPs ~ the measured synops (equal up to border/fan-out variation, which
    # dominates a layer with a handful of spikes on this tiny map: only layers with enough events are compared)
    checked = 0
    for layer in program.layers:
        if layer.kind == "conv" and layer.input == "spikes" and stats.layers[layer.name]["events_in"].sum() >= 50:
            sops = rates[layer.name] * program.num_steps * flops[layer.name] * len(stats.timesteps)
            assert sops == pytest.approx(stats.layers[layer.name]["synops"].sum(), rel=0.5)
            checked += 1
    assert checked >= 2


def test_ann_baseline_per_image_one_rule(run):
    """price_all's baselines and ratios are with_ann_baseline's: per call x denoising steps, SNN / ANN per image."""
    program, stats, _ = run
    priced = E.price_all(stats, program, profiles=["loihi2"])
    report = E.with_ann_baseline(E.estimate(stats, "loihi2", mapping=map_program(program, "loihi2")), program,
                                 "cmos45-fp32")  # price_all prices on the mapping
    base = report["ann_baseline"]
    assert base["pj_per_image"] == base["pj_per_call"] * len(stats.timesteps) == \
        priced["ann_baseline"]["cmos45-fp32"]["pj_per_image"]
    assert base["ratio_snn_to_ann"] == report["totals"]["per_image_pj"] / base["pj_per_image"] == \
        priced["summary"]["loihi2"]["vs_ann_fp32"]
    assert E.snn_to_ann_ratio(report, dict(base, pj_per_image=0)) is None


def test_plots(run, tmp_path):
    from neurosdm.energy_plots import plot_layer_terms, plot_profiles, plot_spikes, write_plots

    program, stats, _ = run
    r = E.estimate(stats, "loihi2")
    for p in (plot_layer_terms(r, tmp_path / "a.png"), plot_spikes(stats, tmp_path / "b.png"),
              plot_profiles({"loihi2": r["totals"]["per_image_pj"]}, {"fp32": 1e9}, tmp_path / "c.png")):
        assert p.read_bytes()[:4] == b"\x89PNG"
    paths = write_plots(E.price_all(stats, program, profiles=["loihi2"]), stats, tmp_path / "all")
    assert sorted(paths) == ["layers", "profiles", "spikes"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths.values())


def test_cli_energy_and_profiles(graph, run, tmp_path):
    r = runner.invoke(cli.app, ["energy", str(graph), "--profile", "loihi", "--steps", "2"])
    assert r.exit_code == 0, r.output
    out = r.output.replace("\n", " ")
    for needle in ("1 image(s), DDIM 2 steps, seed 0", "per image", "ANN baseline", "SNN/ANN", "EDP", "UNPRICED",
                   "static"):
        assert needle in out, needle
    r = runner.invoke(cli.app, ["energy", str(graph), "--profile", "sdm-paper", "--steps", "2", "--json",
                                "--out", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "e.json").read_text())
    assert d["profile"] == "sdm-paper" and d["ann_baseline"]["macs"] > 0 and d["unpriced"]
    # from stats.json (+ --graph for the baseline), CSV
    _, stats, _ = run
    stats.save(tmp_path / "stats.json")
    r = runner.invoke(cli.app, ["energy", str(tmp_path / "stats.json"), "--profile", "cmos45-int8", "--csv",
                                "--graph", str(graph)])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0] == "layer,kind,term,count,pJ" and ",synop," in r.output
    assert r.stdout_bytes.decode() == E.report_csv(E.estimate(stats, "cmos45-int8"))  # the library's CSV, as is
    r = runner.invoke(cli.app, ["energy", str(tmp_path / "stats.json"), "--profile", "loihi2", "--json",
                                "--graph", str(graph), "--baseline", "cmos45-int8"])
    assert r.exit_code == 0, r.output
    program = run[0]
    lib = E.with_ann_baseline(E.estimate(stats, "loihi2", mapping=map_program(program, "loihi2")), program,
                              "cmos45-int8")
    assert json.loads(r.stdout)["ann_baseline"] == json.loads(json.dumps(lib["ann_baseline"]))
    r = runner.invoke(cli.app, ["profiles"])
    assert r.exit_code == 0 and "loihi2" in r.output and "Davies" in r.output


def test_cli_unknown_profile_is_one_line(graph, tmp_path):
    p = subprocess.run([sys.executable, "-m", "neurosdm", "energy", str(graph), "--profile", "nosuch"],
                       capture_output=True, text=True)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and "unknown hardware profile 'nosuch'" in lines[0], p.stderr


def test_neurobench_synaptic_operations_agree(run):
    """NeuroBench's effective synaptic operations (nonzero input x nonzero weight, per layer and step) on the
    same recorded inputs equal neurosdm's synops for every spike-input conv."""
    nb = pytest.importorskip("neurobench.metrics.utils.layers",
                             reason="neurobench not installed (optional: pip install neurobench --no-deps)")
    import torch

    program, stats, den = run
    compared = 0
    for i, t in enumerate(sorted(den.records, reverse=True)):
        recs = den.records[t][0]
        for layer in program.layers:
            if layer.kind != "conv" or layer.input != "spikes":
                continue
            w = torch.from_numpy(layer.dense_weight())
            (pt, pb), (pl, pr) = layer.padding
            assert pt == pb and pl == pr
            conv = torch.nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), stride=layer.stride,
                                   padding=(pt, pl), bias=False, dtype=torch.float64)
            conv.weight.data = w.clone()
            for k in range(program.num_steps):
                x = torch.from_numpy(recs[layer.sources[0]][k])
                ops, spiking = nb.single_layer_MACs(x, conv)
                assert spiking
                assert ops == stats.layers[layer.name]["synops"][i, k], (layer.name, t, k)
                compared += 1
    assert compared > 0


def test_price_all_on_a_tsm_export():
    """A TSM export's first conv reads the image through its per-step Scale node: price_all (the demo's pricing)
    still finds it as the paper formula's first layer (this used to end in a StopIteration traceback)."""
    from conftest import tiny_model
    from neurosdm.exporters.nir import to_nir_graph
    from neurosdm.graph.program import load_program
    from neurosdm.simulators.run import simulate

    program = load_program(to_nir_graph(tiny_model("sdm", tsm=True))[0])
    assert program.by_name["stem.conv"].sources == ["stem.conv.tsm"]
    _, stats, _ = simulate(program, "event", num_images=1, steps=1)
    priced = E.price_all(stats, program, profiles=["loihi2"])
    assert priced["paper_formula_on_measured_rates"]["first_pj"] > 0 and priced["summary"]["loihi2"]["per_image_mj"] > 0
