"""Property-based fuzzing of the command line (issue 17), the short profile run in CI: hypothesis draws hostile
checkpoints, NIR graphs, profiles, input arrays, option values and output locations (the generators of
``tests/fuzz_cases.py``) and every run must end in exit 0 with finite outputs, or in one ``error:`` line (exit 1;
130 after a signal; typer's usage message, exit 2) with nothing left behind: no traceback, no stray or
half-written file, no NaN in an output. Fault categories (a memory cap, a file size limit, SIGINT/SIGTERM during a
write, inputs that would hang) run in a subprocess with a timeout.

Deterministic (``derandomize=True``, no example database), about a minute on 2 cores. The long profile with
counts is ``scripts/fuzz_long.py`` (docs/robustness.md).
"""

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from fuzz_cases import (CATEGORIES, CHILD_CATEGORIES, ENV, GENERATORS, Outcome, Pick, judge, make_fixtures,
                        run_in_process, run_subprocess)

IN_PROCESS = [c for c in CATEGORIES if c not in CHILD_CATEGORIES]
SHORT = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                 suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_fixtures(tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(autouse=True)
def fuzz_env(monkeypatch):
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)


def run_case(fx, category, data, child=False):
    work = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        case = GENERATORS[category](Pick(data=data), fx, work)
        if child:
            outcome = run_subprocess(case, work)
        else:
            code, out, err, escaped = run_in_process(case.argv)
            outcome = Outcome(code, out, err, escaped)
        failures = judge(case, outcome, work)
        assert not failures, (failures, case.note, [str(a) for a in case.argv], outcome.code,
                              outcome.stderr[-2000:], outcome.escaped[-3000:])
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("category", IN_PROCESS)
@settings(SHORT, max_examples=12)
@given(data=st.data())
def test_hostile_inputs_in_process(fx, category, data):
    run_case(fx, category, data)


@pytest.mark.parametrize("category", CHILD_CATEGORIES)
@settings(SHORT, max_examples=1)
@given(data=st.data())
def test_faults_in_a_child_process(fx, category, data):
    run_case(fx, category, data, child=True)
