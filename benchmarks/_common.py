"""Helpers shared by the benchmark scripts: machine description, atomic JSON output, plain-text tables, timing stats.

Benchmarks are scripts, not timed tests (see DESIGN.md): each prints a table and writes ``results/<name>.json``.
Every number that matters is a ratio against a baseline measured in the same run, because these machines are
shared and noisy; the machine description records the load average so a reader can judge how noisy.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags(wanted=("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")) -> list[str]:
    """The SIMD/matrix flags that decide fp32 vs bf16 speed on a CPU (from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _git_revision() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10,
                             check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=False)
        if rev.returncode == 0:
            return {"commit": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": None, "dirty": None}


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def machine_info() -> dict:
    """What a reader needs to compare two result files: software versions, threads, CPU, load."""
    import torch

    info = {
        "timestamp_utc": _utc_now(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "cpu_capability": _cpu_capability(),
        "mem_total_gib": _mem_total_gib(),
        "load_average_1_5_15_min": load_average(),
        "neurosdm_compile_env": os.environ.get("NEUROSDM_COMPILE"),
        "git": _git_revision(),
    }
    for name in ("neurosdm", "spikingjelly"):
        info[f"{name}_version"] = _package_version(name)
    return info


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _cpu_capability() -> str | None:
    import torch

    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return None


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as JSON to ``path`` through a temporary file in the same folder and a rename, so a reader never
    sees a half-written file (``*.tmp`` is git-ignored in ``benchmarks/results``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def summarize_ms(samples_s: list[float]) -> dict:
    """Median (the headline number), min, max and quartiles of timings given in seconds, reported in ms."""
    ms = sorted(1000.0 * s for s in samples_s)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = ms[0]
    return {
        "median_ms": statistics.median(ms),
        "min_ms": ms[0],
        "max_ms": ms[-1],
        "q1_ms": q1,
        "q3_ms": q3,
        "n": len(ms),
        "samples_ms": [round(v, 4) for v in ms],
    }


def markdown_table(headers: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """An aligned Markdown pipe table: readable in a terminal and pasteable into a README as is.
    ``align`` has one character per column, ``l`` or ``r`` (default: first column left, the others right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]

    def line(cells):
        out = []
        for c, w, a in zip(cells, widths, align, strict=True):
            out.append(str(c).ljust(w) if a == "l" else str(c).rjust(w))
        return "| " + " | ".join(out) + " |"

    rule = "|" + "|".join((":" + "-" * (w + 1)) if a == "l" else ("-" * (w + 1) + ":")
                          for w, a in zip(widths, align, strict=True)) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def machine_line(info: dict) -> str:
    """One line naming the machine and its load, printed under each table."""
    load = info.get("load_average_1_5_15_min")
    return (f"torch {info['torch']}, {info['torch_threads']} threads, {info['cpu_model']} x{info['cpu_count']}, "
            f"load average {load}")


def contention_note(threads: int) -> str | None:
    """A warning when other processes already keep the cores busy: torch's intra-op threads then wait for each other
    at every parallel region, which slows many-small-op code (eager loops) far more than fused code. Call it before
    the benchmark starts work, so the load average is other processes' load."""
    load = load_average()
    cores = os.cpu_count() or 1
    if load is None or load[0] + threads <= cores + 0.5:
        return None
    fewer = max(1, min(threads - 1, cores - round(load[0])))
    hint = f"try --threads {fewer} or an idle machine" if fewer < threads else "use an idle machine for final numbers"
    return (f"note: 1-min load average {load[0]} on {cores} cores before start; with {threads} torch thread(s) the "
            f"timings include contention with other processes ({hint})")


def log(msg: str) -> None:
    """Progress goes to stderr so that stdout holds only the table."""
    print(msg, file=sys.stderr, flush=True)


def median_seconds(fn, repeats: int = 3) -> float:
    """The median wall time of ``repeats`` calls of ``fn()`` (seconds)."""
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(statistics.median(ts))
