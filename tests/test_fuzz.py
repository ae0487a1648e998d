"""Generated hostile values (seeded; hypothesis is not installed here) through the library's validation layers:
every malformed config, quant table, profile constant and graph parameter raises a typed neurosdm error, never
another exception. ``NEUROSDM_FUZZ_CASES`` raises the number of cases per test (default 200: about 2 s)."""

import math
import os
import random

import nir
import numpy as np
import pytest

from neurosdm.config import Config, preset
from neurosdm.errors import NeuroSDMError
from neurosdm.graph.checks import check_graph
from neurosdm.graph.dialect import FixedPoint
from neurosdm.hardware.profiles import load_profile

CASES = int(os.environ.get("NEUROSDM_FUZZ_CASES", "200"))
HOSTILE = [None, True, False, 0, -1, 1, 3, 2 ** 31, 10 ** 9, -10 ** 9, 0.0, -0.5, 1e300, float("nan"), float("inf"),
           -float("inf"), "", "x", "24", b"\xff", [], [1, 2], [[1]], {}, {"a": 1}, {"a": "x"}, (1,), 1j]


def hostile(rng: random.Random):
    return rng.choice(HOSTILE)


def test_configs_are_valid_or_refused_with_a_config_error():
    rng = random.Random(0)
    refused = 0
    for _ in range(CASES):
        d = preset(rng.choice(["tiny", "small"])).to_dict()
        for _ in range(rng.randint(1, 3)):
            section = rng.choice(["model", "diffusion", "train"])
            d[section][rng.choice(sorted(d[section]))] = hostile(rng)
        try:
            cfg = Config.from_dict(d)
        except NeuroSDMError as e:
            refused += 1
            assert "\n" not in str(e)
            continue
        m = cfg.model  # accepted: every value typed and in range
        assert isinstance(m.ch, int) and 1 <= m.ch and math.isfinite(m.threshold) and cfg.train.lr > 0
    assert refused > CASES // 2


def test_quant_tables_are_valid_or_refused_with_a_graph_error():
    rng = random.Random(1)
    base = {"state_bits": 24, "state_exponent": -10, "input_exponent": -7, "input_bits": 8, "output_exponent": -10,
            "round_nodes": {"c": 1}}
    refused = 0
    for _ in range(CASES):
        q = dict(base)
        for _ in range(rng.randint(1, 2)):
            key = rng.choice(sorted(base))
            if rng.random() < 0.2:
                q.pop(key, None)
            else:
                q[key] = hostile(rng)
        metadata = {"quant": q} if rng.random() < 0.9 else {"quantized": "int8", "quant": hostile(rng)}
        try:
            fixed = FixedPoint.from_metadata(metadata)
        except NeuroSDMError:
            refused += 1
            continue
        if fixed is not None:
            assert 2 <= fixed.state_bits <= 53
    assert refused > CASES // 3


def test_profile_constants_are_valid_or_refused(tmp_path):
    rng = random.Random(2)
    text = open(os.path.join(os.path.dirname(__file__), "..", "neurosdm", "hw_profiles", "loihi2.toml")).read()
    values = ["nan", "inf", "-inf", "-1", "0", "1e400", '"x"', "true", "[1]", "{a = 1}", "2.5", "1e-3"]
    starts = [i for i in range(len(text)) if text.startswith("value =", i)]
    for n in range(min(CASES, 100)):
        i = rng.choice(starts)
        j = text.index("\n", i)
        path = tmp_path / f"p{n}.toml"
        path.write_text(text[:i] + f"value = {rng.choice(values)}" + text[j:])
        try:
            prof = load_profile(path)
        except NeuroSDMError:
            continue
        assert all(math.isfinite(c.value) and c.value >= 0 for _, _, c in prof.constants())
        assert prof.mapping["parallel_cores"].value >= 1


def _graph(neuron, weight):
    return nir.NIRGraph(nodes={"input": nir.Input(np.array([2])), "fc": nir.Affine(weight, np.zeros(2)),
                               "n": neuron, "output": nir.Output(np.array([2]))},
                        edges=[("input", "fc"), ("fc", "n"), ("n", "output")], type_check=False)


@pytest.mark.parametrize("kind", ["LIF", "IF", "LI", "CubaLIF"])
def test_neuron_parameters_are_valid_or_refused_with_a_graph_error(kind):
    rng = np.random.default_rng(3)
    specials = np.array([np.nan, np.inf, -np.inf, 0.0, -1.0, 1e-300, 1e300, 2.0, 0.5])
    fields = {"LIF": ("tau", "r", "v_leak", "v_threshold", "v_reset"), "IF": ("r", "v_threshold", "v_reset"),
              "LI": ("tau", "r", "v_leak"),
              "CubaLIF": ("tau_syn", "tau_mem", "r", "v_leak", "v_threshold", "v_reset", "w_in")}[kind]
    for _ in range(CASES // 4):
        p = {f: np.full(2, 2.0 if f.startswith("tau") else (1.0 if f in ("r", "v_threshold", "w_in") else 0.0))
             for f in fields}
        for f in rng.choice(fields, size=rng.integers(1, 3)):
            p[f] = rng.choice(specials, size=2)
        weight = np.ones((2, 2)) if rng.random() < 0.8 else rng.choice(specials, size=(2, 2))
        try:
            check_graph(_graph(getattr(nir, kind)(**p), weight))
        except NeuroSDMError:
            continue
        assert all(np.isfinite(v).all() for v in p.values()) and np.isfinite(weight).all()
        assert all((p[f] > 0).all() for f in fields if f.startswith("tau"))
        if "v_threshold" in p:
            assert (p["v_threshold"] > p["v_reset"]).all()
