"""The long fuzz profile of issue 17: ``--cases`` generated hostile runs of the command line (the generators of
``tests/fuzz_cases.py``, drawn by a seeded ``random.Random``, the categories in turn), each in a forked child of
this process (torch and neurosdm imported once: a fork costs milliseconds) under an address-space cap, a file size
limit where the case asks for one, a signal after a delay where it asks for one, and a timeout. Counts tracebacks,
messages that are not one ``error:`` line, memory blow-ups (peak RSS above 2 GB for a refused input), hangs,
crashes, stray files and NaN outputs; writes JSON and a Markdown table.

    .venv/bin/python scripts/fuzz_long.py --cases 2400 --seed 17 --json docs/data/fuzz_long.json \
        --table docs/data/fuzz_long.md
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.update({"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})

import torch  # noqa: E402 - after the thread settings

from fuzz_cases import (CATEGORIES, ENV, GENERATORS, RSS_LIMIT, Outcome, Pick, judge, make_fixtures,  # noqa: E402
                        run_in_process)

KINDS = ("traceback", "message", "memory", "hang", "crash", "stray", "nan", "accepted")


def preload() -> None:
    """Import what the commands import lazily, so that each forked child starts with it."""
    import neurosdm.checkpoint  # noqa: F401
    import neurosdm.compare  # noqa: F401
    import neurosdm.convert  # noqa: F401
    import neurosdm.energy  # noqa: F401
    import neurosdm.exporters.lava  # noqa: F401
    import neurosdm.exporters.pipeline  # noqa: F401
    import neurosdm.graph.inspect  # noqa: F401
    import neurosdm.hardware.profiles  # noqa: F401
    import neurosdm.jobs  # noqa: F401
    import neurosdm.metrics  # noqa: F401


def vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def run_forked(case, work: Path, address_space: int) -> Outcome:
    """Run ``case`` in a forked child (in ``work``): limits set in the child, its fds 1 and 2 into pipes (what C
    libraries print counts too; a pipe is not bound by the file size limit), a signal after ``case.signal[1]`` s,
    SIGKILL at the timeout; peak RSS from ``wait4``."""
    import resource

    pipes = [os.pipe(), os.pipe()]
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child
        code = 98
        try:
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: never outlive the parent
            os.chdir(work)
            for fd, (r, w) in zip((1, 2), pipes):
                os.dup2(w, fd)
                os.close(r)
                os.close(w)
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
            if case.fsize is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (case.fsize, case.fsize))
            code, out, err, escaped = run_in_process(case.argv)
            os.write(1, out.encode(errors="replace"))
            os.write(2, (err + escaped).encode(errors="replace"))
            code = 99 if escaped else (code if code is not None else 98)
        except BaseException:  # noqa: BLE001
            code = 97
        os._exit(code)
    readers = []
    for r, w in pipes:
        os.close(w)
        os.set_blocking(r, False)
        readers.append(r)
    chunks = {r: [] for r in readers}

    def drain():
        for r in readers:
            try:
                while data := os.read(r, 1 << 16):
                    chunks[r].append(data)
            except BlockingIOError:
                pass

    start = time.monotonic()
    signalled = timed_out = False
    while True:
        drain()
        done, status, rusage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        elapsed = time.monotonic() - start
        if case.signal and not signalled and elapsed >= case.signal[1]:
            os.kill(pid, case.signal[0])
            signalled = True
        if elapsed > case.timeout:
            os.kill(pid, signal.SIGKILL)
            _, status, rusage = os.wait4(pid, 0)
            timed_out = True
            break
        time.sleep(0.01)
    drain()
    for r in readers:
        os.close(r)
    out, err = (b"".join(chunks[r]).decode(errors="replace") for r in readers)
    killed = os.WTERMSIG(status) if os.WIFSIGNALED(status) and not timed_out else None
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    if signalled and killed == case.signal[0]:  # ended by the signal itself before neurosdm handled it
        code, killed = 128 + killed, None
    return Outcome(code, out, err, escaped=err if code in (97, 99) else "", killed_by=killed, timed_out=timed_out,
                   max_rss=rusage.ru_maxrss * 1024)


def table(report: dict) -> str:
    lines = ["| category | cases | exit 0 | exit 1 | exit 2 | exit 130 | " + " | ".join(KINDS) + " | max RSS (MB) |",
             "|---" * (7 + len(KINDS)) + "|"]
    for cat, r in report["categories"].items():
        codes = r["exit_codes"]
        lines.append(f"| {cat} | {r['cases']} | {codes.get('0', 0)} | {codes.get('1', 0)} | {codes.get('2', 0)} | "
                     f"{codes.get('130', 0)} | " + " | ".join(str(r['failures'].get(k, 0)) for k in KINDS)
                     + f" | {r['max_rss_mb']:.0f} |")
    t = report["totals"]
    lines.append(f"| **all** | **{report['cases']}** | | | | | " + " | ".join(f"**{t.get(k, 0)}**" for k in KINDS)
                 + f" | {max(r['max_rss_mb'] for r in report['categories'].values()):.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=2400)
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--categories", default=",".join(CATEGORIES))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--table", type=Path, default=None)
    ap.add_argument("--address-space-gb", type=float, default=4.0, help="the children's cap above this process's")
    args = ap.parse_args()
    os.environ.update(ENV)
    torch.set_num_threads(1)  # no OpenMP pool in the parent: the forked children stay safe
    categories = args.categories.split(",")
    root = Path(tempfile.mkdtemp(prefix="neurosdm-fuzz-long-"))
    t0 = time.monotonic()
    fx = make_fixtures(root / "fixtures")  # through cli.main: its signal handlers are undone below
    for s in (signal.SIGTERM, signal.SIGALRM):
        signal.signal(s, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    preload()
    address_space = vm_size() + int(args.address_space_gb * (1 << 30))
    per = {c: {"cases": 0, "exit_codes": collections.Counter(), "failures": collections.Counter(), "max_rss": 0,
               "examples": []} for c in categories}
    skipped = 0
    for i in range(args.cases):
        category = categories[i % len(categories)]
        work = root / f"case{i}"
        work.mkdir()
        try:
            case = GENERATORS[category](Pick(rng=random.Random(args.seed * 1_000_003 + i)), fx, work)
        except Exception as e:  # noqa: BLE001 - a generator that cannot build its file: not a case
            skipped += 1
            print(f"case {i} ({category}) not built: {type(e).__name__}: {e}", flush=True)
            shutil.rmtree(work, ignore_errors=True)
            continue
        outcome = run_forked(case, work, address_space)
        failures = judge(case, outcome, work)
        r = per[category]
        r["cases"] += 1
        r["exit_codes"][str(outcome.code if outcome.code is not None else "killed")] += 1
        r["max_rss"] = max(r["max_rss"], outcome.max_rss)
        for f in failures:
            r["failures"][f.split(" ")[0]] += 1
        if failures:
            print(f"case {i} ({category}): {failures} {case.note} exit {outcome.code}: "
                  f"{(outcome.stderr + outcome.escaped).strip().splitlines()[-1:] or ''}", flush=True)
        if failures and len(r["examples"]) < 20:
            r["examples"].append({"case": i, "failures": failures, "note": case.note,
                                  "argv": [str(a).replace(str(root), "$TMP") for a in case.argv],
                                  "exit": outcome.code, "stderr": (outcome.stderr + outcome.escaped)[-1500:]})
        for p in work.rglob("*"):
            if p.is_dir():
                os.chmod(p, 0o755)
        shutil.rmtree(work, ignore_errors=True)
        if (i + 1) % 50 == 0:
            bad = sum(sum(v["failures"].values()) for v in per.values())
            print(f"{i + 1} cases, {time.monotonic() - t0:.0f} s, failures {bad}", flush=True)
    totals = collections.Counter()
    for r in per.values():
        totals.update(r["failures"])
    report = {"command": " ".join(["scripts/fuzz_long.py", *sys.argv[1:]]), "seed": args.seed,
              "cases": sum(r["cases"] for r in per.values()), "not_built": skipped,
              "seconds": round(time.monotonic() - t0, 1), "rss_limit_mb": RSS_LIMIT >> 20, "environment": ENV,
              "address_space_cap_gb": round(address_space / (1 << 30), 2),
              "totals": {k: totals.get(k, 0) for k in KINDS},
              "categories": {c: {"cases": r["cases"], "exit_codes": dict(r["exit_codes"]),
                                 "failures": dict(r["failures"]), "max_rss_mb": r["max_rss"] / (1 << 20),
                                 "examples": r["examples"]} for c, r in per.items()}}
    text = table(report)
    print(text)
    print(json.dumps(report["totals"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.table:
        args.table.write_text(text)
    shutil.rmtree(root, ignore_errors=True)
    return 1 if any(totals.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
