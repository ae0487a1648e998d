"""`neurosdm pareto` (neurosdm.pareto): configurations, checks before work, the sweep's tables, resuming."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from neurosdm.errors import ConfigError
from neurosdm.pareto import check_profiles, load_grid, normalise, pareto_front, parse_config, price_run, run_pareto
from neurosdm.energy import estimate
from neurosdm.exporters.pipeline import export_checkpoint
from neurosdm.graph.program import load_program
from neurosdm.simulators.run import simulate, split_by_steps
from conftest import assert_one_line_error, neurosdm, tiny_checkpoint


def test_parse_config_and_grid(tmp_path):
    assert parse_config("threshold_scale=1.1,num_steps=2") == {"threshold_scale": 1.1, "num_steps": 2}
    assert parse_config("name=a,steps_schedule=t<10:1,2") == {"name": "a", "steps_schedule": "t<10:1,2"}
    g = tmp_path / "g.toml"
    g.write_text('[[config]]\nname = "base"\n\n[grid]\nthreshold_scale = [0.9, 1.1]\nnum_steps = [1, 2, 3]\n')
    configs = load_grid(g)
    assert configs[0] == {"name": "base"} and len(configs) == 7
    assert {"threshold_scale": 1.1, "num_steps": 3} in configs
    g.write_text("[grid]\nthreshold_scale = []\n")
    with pytest.raises(ConfigError, match="empty list"):
        load_grid(g)
    g.write_text("[sweep]\nx = 1\n")
    with pytest.raises(ConfigError, match="unknown tables"):
        load_grid(g)


@pytest.mark.parametrize("config, needle", [({"threshold_scale": 0}, "positive"), ({"sampler_steps": 21}, "1..20"),
                                            ({"num_steps": 0}, "num_steps must be in"),
                                            ({"quantize": "int4"}, "int8 or none"), ({"speed": 1}, "unknown knob"),
                                            ({"steps_schedule": "t<30:1,2"}, "bound"),
                                            ({"num_steps": 2, "steps_schedule": "2"}, "not both")])
def test_knob_out_of_range(config, needle, tmp_path):
    with pytest.raises(ConfigError, match=needle):
        normalise(config, tmp_path / "m.pt", 20, None)


def test_normalise_fills_defaults(tmp_path):
    c = normalise({"num_steps": 3}, tmp_path / "m.pt", 20, None)
    assert c == {"ckpt": str(tmp_path / "m.pt"), "steps_schedule": "3", "threshold_scale": 1.0, "sampler_steps": 20,
                 "quantize": "int8", "name": "num_steps=3"}
    with pytest.raises(ConfigError, match="1..2"):  # a TSM model: at most its trained steps
        normalise({"num_steps": 3}, tmp_path / "m.pt", 20, 2)


def test_profiles_checked():
    assert check_profiles(["loihi2", "cmos45-int8"]) == ["loihi2", "cmos45-int8"]
    with pytest.raises(ConfigError):
        check_profiles(["no-such-chip"])
    with pytest.raises(ConfigError, match="empty"):
        check_profiles([])


def test_pareto_front_by_hand():
    pts = [(1.0, 10.0), (2.0, 5.0), (3.0, 6.0), (0.5, 20.0), (2.0, 5.0)]
    assert pareto_front(pts) == [True, True, False, True, True]  # (3, 6) is dominated by (2, 5); ties both stay


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("pareto")
    return tiny_checkpoint(d / "m.pt", head="sdm")


def test_a_schedule_is_priced_per_step_count(model, tmp_path):
    """Barriers (sync) and static power count the steps each call ran, not the widest call: the whole run priced
    at once equals the sum of its parts by step count (each without a schedule)."""
    program = load_program(export_checkpoint(model, tmp_path / "m8.nir", quantize="int8", calibration="builtin",
                                             calibration_images=8))
    _, st, _ = simulate(program, "event", 1, steps=4, steps_schedule="t<10:1,2")
    whole = estimate(st, "loihi2")
    parts = split_by_steps(st)
    assert [p.num_steps for p in parts] == [1, 2] and [len(p.timesteps) for p in parts] == [2, 2]
    reports = [estimate(p, "loihi2") for p in parts]
    assert whole["totals"]["total_pj"] == pytest.approx(sum(r["totals"]["total_pj"] for r in reports))
    assert whole["static"]["pj"] == pytest.approx(sum(r["static"]["pj"] for r in reports))
    assert whole["time"]["total_s"] == pytest.approx(sum(r["time"]["total_s"] for r in reports))
    barriers = {u["term"]: u["count"] for u in whole["unpriced"]}["sync"]  # loihi2 times barriers, has no energy
    assert st.meta["spiking_steps_per_call"] == [2, 2, 1, 1]
    assert barriers == 6 * st.images  # each call's own steps, not 2 for every call
    assert price_run(st, "loihi2")["pj"] == pytest.approx(whole["totals"]["total_pj"])


def test_sweep_writes_tables_and_resumes(model, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    kw = dict(profiles=["loihi2", "cmos45-int8"], num_images=4, energy_images=1, dataset="builtin")
    configs = [{"name": "base", "sampler_steps": 3}, {"name": "T1", "sampler_steps": 3, "num_steps": 1},
               {"name": "sched", "sampler_steps": 3, "steps_schedule": "t<10:1,2"}]
    table = run_pareto(model, configs, out, **kw)
    rows = {r["name"]: r for r in table["rows"]}
    assert set(rows) == {"base", "T1", "sched"}
    assert len(list((out / "results").glob("*.json"))) == 3
    assert rows["T1"]["mean_spiking_steps"] == 1 and rows["base"]["mean_spiking_steps"] == 2
    assert rows["T1"]["energy_mj_per_image"]["loihi2"] < rows["base"]["energy_mj_per_image"]["loihi2"]
    for r in rows.values():
        assert np.isfinite(r["fid"]) and r["num_images"] == 4 and 0 <= r["firing_rate"] <= 1
        assert r["ann_mj_per_image"]["cmos45-fp32"] > r["ann_mj_per_image"]["cmos45-int8"] > 0
    csv = (out / "pareto.csv").read_text().splitlines()
    assert csv[0].startswith("name,fid,") and len(csv) == 4
    assert (out / "pareto_loihi2.png").stat().st_size > 1000
    # resuming: no configuration runs again (the evaluation is replaced by one that fails)
    monkeypatch.setattr("neurosdm.pareto.evaluate_config", lambda *a, **k: pytest.fail("evaluated again"))
    again = run_pareto(model, configs, out, **kw)
    assert [r["fid"] for r in again["rows"]] == [r["fid"] for r in table["rows"]]
    # a killed sweep: one result missing -> only that one runs
    victim = sorted((out / "results").glob("*.json"))[0]
    name = json.loads(victim.read_text())["name"]
    victim.unlink()
    ran = []
    monkeypatch.setattr("neurosdm.pareto.evaluate_config",
                        lambda c, *a, **k: ran.append(c["name"]) or dict(rows[c["name"]]))
    run_pareto(model, configs, out, **kw)
    assert ran == [name]


def test_cli_errors_before_any_work(model, tmp_path):
    cases = [(["--config", "threshold_scale=-1"], "threshold_scale must be a positive"),
             (["--config", "name=a", "--profiles", "loihi2,warp-drive"], "warp-drive")]
    for args, needle in cases:
        r = neurosdm("pareto", model, "--out", tmp_path / "o", "--dataset", "builtin", *args, cwd=tmp_path)
        assert_one_line_error(r, needle)
        assert not (tmp_path / "o").exists()
    (tmp_path / "empty.toml").write_text("")
    for configs, needle in [(load_grid(tmp_path / "empty.toml"), "grid is empty"),
                            ([{"num_steps": 99999}], "num_steps must be in"),
                            ([{"name": "a"}, {"name": "a", "sampler_steps": 2}], "names repeat")]:
        with pytest.raises(ConfigError, match=needle):
            run_pareto(model, configs, tmp_path / "o", dataset="builtin")
        assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="prices no synaptic operation"):
        run_pareto(model, [{}], tmp_path / "o", profiles=[str(synop_free_profile(tmp_path))], dataset="builtin")
    assert not (tmp_path / "o").exists()


def synop_free_profile(tmp_path):
    """A copy of cmos45-int8 without its [energy.synop] table: a profile that cannot price a spiking run."""
    from neurosdm.hardware.profiles import load_profile

    src = Path(load_profile("cmos45-int8").path).read_text()
    head, _, rest = src.partition("[energy.synop]")
    path = tmp_path / "nosynop.toml"
    path.write_text(head + rest[rest.index("\n["):] + "\n")
    return path
