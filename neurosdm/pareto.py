"""Energy-quality trade-offs of a spiking diffusion model (``neurosdm pareto``, issue 16).

A sweep evaluates configurations of the knobs (:data:`KNOBS`) of one trained model, or of several checkpoints (the
``ckpt`` knob: a model fine-tuned with ``train --rate-penalty``, a converted SNN), and for each gives

- quality: classifier FID (:mod:`neurosdm.metrics`) of ``num_images`` DDIM samples against the real test split,
  made on the GPU path (the float torch model with the configuration's threshold scale and steps schedule;
  ``quality="gpu"``) or by the export itself on the torch engine (``quality="engine"``: bit-identical to the event
  engine on an int8 graph, slower);
- activity and energy per image: the event engine's exact counts of ``energy_images`` images on the export
  (``quantize`` int8 by default), priced on every profile (:func:`neurosdm.energy.estimate`; a steps schedule's
  calls pay barriers, time and static power for their own step count), with the ANN baseline of the
  same architecture and number of calls on ``cmos45-fp32`` and ``cmos45-int8``
  (:func:`neurosdm.energy.baselines.ann_baseline`).

Every knob, profile and the output folder are checked before any work. Each finished configuration is one JSON
file ``results/<key>.json`` (written atomically; the key hashes the configuration and the sweep's settings), so a
killed sweep run again continues where it stopped. The tables (``pareto.json``, ``pareto.csv``) and one plot per
profile (``pareto_<profile>.png``: FID against mJ per image, the Pareto front marked, the ANN baselines as lines)
are written at the end from all result files.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import time
import tomllib
from pathlib import Path
from typing import Callable

import numpy as np

from neurosdm.checkpoint import file_sha256, load_checkpoint, load_model
from neurosdm.config import LIMITS, check_count, check_positive, parse_steps_schedule
from neurosdm.energy import estimate
from neurosdm.energy.baselines import ann_baseline, ann_per_image
from neurosdm.errors import ConfigError
from neurosdm.exporters.pipeline import export_checkpoint
from neurosdm.graph.program import load_program
from neurosdm.hardware.profiles import load_profile
from neurosdm.io import atomic_path, check_output_dir
from neurosdm.metrics import make_extractor, reference_stats, score
from neurosdm.sample import generate
from neurosdm.simulators.run import simulate

__all__ = ["KNOBS", "DEFAULTS", "BASELINES", "parse_config", "load_grid", "normalise", "check_profiles",
           "pareto_front", "price_run", "run_pareto", "write_tables"]

#: the knobs of a configuration and what each means
KNOBS = {
    "ckpt": "checkpoint to evaluate (default: the sweep's CKPT), e.g. a model fine-tuned with --rate-penalty",
    "num_steps": "spiking steps per call (T_snn) at every diffusion step (a constant steps schedule)",
    "steps_schedule": "spiking steps by diffusion step, 't<A:K,...,K' (neurosdm.config.parse_steps_schedule)",
    "threshold_scale": "threshold guidance: every IF layer fires at threshold x this",
    "sampler_steps": "DDIM steps (network calls per image)",
    "quantize": "the export the event engine counts: int8 (Loihi-style fixed point) or none (float)",
}
DEFAULTS = {"ckpt": None, "num_steps": None, "steps_schedule": "", "threshold_scale": 1.0, "sampler_steps": 20,
            "quantize": "int8"}
BASELINES = ("cmos45-fp32", "cmos45-int8")
QUALITY = ("gpu", "engine")
Progress = Callable[[str], Callable]


# ------------------------------------------------------------------------------------------------ configurations

def _value(text: str):
    """A knob value from ``k=v`` text: an int, a float, else the string."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_config(text: str) -> dict:
    """``"threshold_scale=1.1,num_steps=2"`` -> a configuration dict (values as ints, floats or strings). A
    steps schedule holds commas, so its value runs to the end: put ``steps_schedule=...`` last."""
    out: dict = {}
    rest = text.strip()
    while rest:
        key, sep, rest = rest.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--config {text!r}: expected k=v pairs separated by commas")
        if key == "steps_schedule":
            value, rest = rest, ""
        else:
            value, _, rest = rest.partition(",")
        out[key] = _value(value) if key != "steps_schedule" else value.strip()
    if not out:
        raise ConfigError("--config is empty: give k=v pairs, e.g. threshold_scale=1.1,num_steps=2")
    return out


def load_grid(path: str | os.PathLike) -> list[dict]:
    """Configurations from a TOML file: every ``[[config]]`` table as it is, then the Cartesian product of the
    lists in ``[grid]`` (a scalar there is a one-value list). Unknown tables are errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file not found: {path}")
    try:
        doc = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid TOML: {str(e).splitlines()[0]}") from None
    unknown = sorted(set(doc) - {"grid", "config"})
    if unknown:
        raise ConfigError(f"{path}: unknown tables {unknown}; use [grid] (lists of values) and [[config]]")
    configs = [dict(c) for c in doc.get("config", [])]
    grid = doc.get("grid", {})
    if grid:
        keys = list(grid)
        lists = [v if isinstance(v, list) else [v] for v in grid.values()]
        if any(not v for v in lists):
            raise ConfigError(f"{path}: an empty list in [grid] gives no configuration")
        configs += [dict(zip(keys, combo)) for combo in itertools.product(*lists)]
    return configs


def normalise(config: dict, base_ckpt: Path, num_diffusion_steps: int, tsm_steps: int | None) -> dict:
    """Every knob of ``config`` checked and filled with :data:`DEFAULTS` (``num_steps`` becomes the constant
    schedule ``"K"``); a value out of range is a :class:`ConfigError` naming it."""
    unknown = sorted(set(config) - set(KNOBS) - {"name"})
    if unknown:
        raise ConfigError(f"unknown knob(s) {unknown}; the knobs are {', '.join(KNOBS)}")
    c = {**DEFAULTS, **config}
    c["ckpt"] = str(c["ckpt"] or base_ckpt)
    c["threshold_scale"] = check_positive("threshold_scale", c["threshold_scale"])
    c["sampler_steps"] = check_count("sampler_steps", c["sampler_steps"], 1, num_diffusion_steps)
    if c["quantize"] not in ("int8", "none"):
        raise ConfigError(f"quantize must be int8 or none, got {c['quantize']!r}")
    if c["num_steps"] is not None:
        if c["steps_schedule"]:
            raise ConfigError("give num_steps or steps_schedule, not both (num_steps K is the schedule 'K')")
        c["steps_schedule"] = str(check_count("num_steps", c["num_steps"], 1, tsm_steps or LIMITS["num_steps"]))
    c["steps_schedule"] = str(c["steps_schedule"])
    if c["steps_schedule"]:
        parse_steps_schedule(c["steps_schedule"], num_diffusion_steps, tsm_steps)
    del c["num_steps"]
    c["name"] = str(config.get("name") or ",".join(f"{k}={v}" for k, v in config.items() if k != "name") or "base")
    return c


def check_profiles(profiles: list[str]) -> list[str]:
    """Load every profile (an unknown one is an error) and refuse one that prices no synaptic operation: it
    cannot price a spiking run's counts."""
    if not profiles:
        raise ConfigError("--profiles is empty: name at least one, e.g. loihi2,loihi,cmos45-int8")
    for name in profiles:
        prof = load_profile(name)
        if "synop" not in prof.energy:
            raise ConfigError(f"profile {name!r} prices no synaptic operation ('synop'): it cannot price the "
                              "counts of a spiking run")
    for name in BASELINES:
        load_profile(name)
    return list(profiles)


def _key(config: dict, settings: dict, ckpt_sha: str) -> str:
    blob = json.dumps({"config": {k: v for k, v in config.items() if k not in ("name", "ckpt")}, "ckpt": ckpt_sha,
                       "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ evaluation

def price_run(stats, profile: str) -> dict:
    """Energy of a run on ``profile`` (:func:`neurosdm.energy.estimate`, which prices a steps schedule per call).
    Returns ``pj``, ``pj_per_image`` and ``unpriced`` (the terms left unpriced)."""
    report = estimate(stats, profile)
    total = report["totals"]["total_pj"]
    unpriced = sorted({u["term"] for u in report["unpriced"]})
    return {"pj": total, "pj_per_image": total / max(int(stats.images), 1), "unpriced": unpriced}


def _export(ckpt: str, quantize: str, folder: Path, dataset: str, data_dir: str | None) -> Path:
    """The export of ``ckpt`` (cached in ``folder`` by checkpoint hash and quantisation)."""
    path = folder / f"{file_sha256(ckpt)[:16]}-{quantize}.nir"
    if not path.is_file():
        export_checkpoint(ckpt, path, quantize=quantize, force=True, calibration=dataset, data_dir=data_dir)
    return path


def evaluate_config(c: dict, settings: dict, exports: Path, extractor, ref: dict, profiles: list[str],
                    progress: Progress | None = None) -> dict:
    """One configuration: its quality, activity and energy (see the module docstring); a JSON-ready dict."""
    t0 = time.perf_counter()
    seed, n, k = settings["seed"], settings["num_images"], settings["energy_images"]
    nir_path = _export(c["ckpt"], c["quantize"], exports, settings["dataset"], settings["data_dir"])
    # activity and energy: the event engine's exact counts
    program = load_program(nir_path)
    with np.errstate(all="ignore"):
        _, stats, _ = simulate(program, "event", k, "ddim", c["sampler_steps"], seed, batch_size=k,
                               threshold_scale=c["threshold_scale"], steps_schedule=c["steps_schedule"],
                               progress=progress(f"counts: {c['name']}") if progress else None)
    spikes, updates = stats.total("spikes_out"), stats.total("neuron_updates")
    energy = {p: price_run(stats, p) for p in profiles}
    calls = len(stats.timesteps)
    ann = {b: ann_per_image(ann_baseline(program, b), calls)["pj_per_image"] for b in BASELINES}
    # quality
    if settings["quality"] == "engine":
        images, _, _ = simulate(load_program(nir_path), "torch", n, "ddim", c["sampler_steps"], seed,
                                batch_size=64, threshold_scale=c["threshold_scale"],
                                steps_schedule=c["steps_schedule"],
                                progress=progress(f"samples: {c['name']}") if progress else None)
    else:
        model, config = load_model(c["ckpt"])
        model.set_threshold_scale(c["threshold_scale"])
        images = generate(model, config, n, seed=seed, num_sample_steps=c["sampler_steps"],
                          steps_schedule=c["steps_schedule"],
                          progress=progress(f"samples: {c['name']}") if progress else None)
    q = score(images, extractor, ref)
    mean_steps = float(np.mean(stats.meta.get("spiking_steps_per_call", [stats.num_steps])))
    return {
        "name": c["name"], "config": c, "fid": q["fid"], "is": q["is"], "num_images": q["num_images"],
        "ref_images": q["ref_images"], "features": q["features"], "quality_path": settings["quality"],
        "energy_images": int(stats.images), "firing_rate": spikes / updates if updates else 0.0,
        "spikes_per_image": spikes / stats.images, "synops_per_image": stats.total("synops") / stats.images,
        "mean_spiking_steps": mean_steps, "network_calls": calls,
        "energy_mj_per_image": {p: e["pj_per_image"] * 1e-9 for p, e in energy.items()},
        "unpriced": {p: e["unpriced"] for p, e in energy.items()},
        "ann_mj_per_image": {b: v * 1e-9 for b, v in ann.items()},
        "export": nir_path.name, "wall_s": time.perf_counter() - t0,
    }


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For ``(energy, fid)`` pairs (both lower is better): whether each lies on the Pareto front, i.e. no other
    point is at most as costly and at most as bad, and better in one."""
    out = []
    for i, (e, f) in enumerate(points):
        dominated = any(e2 <= e and f2 <= f and (e2 < e or f2 < f) for j, (e2, f2) in enumerate(points) if j != i)
        out.append(not dominated)
    return out


# ------------------------------------------------------------------------------------------------ the sweep

def run_pareto(ckpt: str | os.PathLike, configs: list[dict], out_dir: str | os.PathLike,
               profiles: list[str] = ("loihi2", "loihi", "cmos45-int8"), num_images: int = 256,
               energy_images: int = 2, seed: int = 0, dataset: str = "fashion-mnist", data_dir: str | None = None,
               quality: str = "gpu", classifier: str | os.PathLike | None = None,
               progress: Progress | None = None, say: Callable[[str], None] = lambda line: None) -> dict:
    """Evaluate every configuration (resuming from ``out_dir/results``) and write the tables and plots; returns
    the table (:func:`write_tables`). Everything is checked before the first configuration runs."""
    ckpt = Path(ckpt)
    if not configs:
        raise ConfigError("the grid is empty: give --config k=v,... or a --grid FILE.toml with configurations")
    if quality not in QUALITY:
        raise ConfigError(f"--quality must be one of {', '.join(QUALITY)}, got {quality!r}")
    check_count("--num-images", num_images, 2)
    check_count("--energy-images", energy_images, 1, 1024)
    profiles = check_profiles(list(profiles))
    base = load_checkpoint(ckpt).config
    normalised, shas = [], {}
    for config in configs:
        other = config.get("ckpt")
        cfg = load_checkpoint(other).config if other else base
        m = cfg.model
        c = normalise(config, ckpt, cfg.diffusion.num_diffusion_steps, m.num_steps if m.tsm else None)
        if c["steps_schedule"] and m.head == "spiking" and m.readout == "mean":
            raise ConfigError(f"{c['name']}: a converted SNN's spiking head runs its own num_steps only")
        shas.setdefault(c["ckpt"], file_sha256(c["ckpt"]))
        normalised.append(c)
    names = [c["name"] for c in normalised]
    if len(set(names)) != len(names):
        raise ConfigError(f"configuration names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    out = check_output_dir(out_dir)
    settings = {"num_images": int(num_images), "energy_images": int(energy_images), "seed": int(seed),
                "dataset": dataset, "data_dir": data_dir, "quality": quality,
                "classifier": str(classifier) if classifier else "shipped"}
    extractor = make_extractor("classifier", None, classifier)
    ref = reference_stats(dataset, extractor, None, "test", data_dir)  # a missing dataset fails here, early
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "exports").mkdir(exist_ok=True)
    rows = []
    todo = list(enumerate(normalised))
    for i, c in todo:  # one line per configuration; the bars are the stages inside (one live bar at a time)
        path = out / "results" / f"{_key(c, {**settings, 'profiles': profiles}, shas[c['ckpt']])}.json"
        if path.is_file():
            try:
                rows.append(json.loads(path.read_text()))
                say(f"[{i + 1}/{len(todo)}] {c['name']}: done before ({path.name})")
                continue
            except (OSError, ValueError):
                pass  # unreadable: evaluate again
        r = evaluate_config(c, settings, out / "exports", extractor, ref, profiles, progress)
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(r, indent=1))
        say(f"[{i + 1}/{len(todo)}] {c['name']}: FID {r['fid']:.2f}, rate {r['firing_rate']:.3f}, "
            + ", ".join(f"{p} {v:.3g} mJ" for p, v in r["energy_mj_per_image"].items()))
        rows.append(r)
    return write_tables(rows, out, profiles, settings)


def write_tables(rows: list[dict], out: Path, profiles: list[str], settings: dict) -> dict:
    """``pareto.json`` (settings, rows with their Pareto flags per profile), ``pareto.csv`` (one row per
    configuration) and ``pareto_<profile>.png`` per profile; returns the JSON dict."""
    for p in profiles:
        front = pareto_front([(r["energy_mj_per_image"][p], r["fid"]) for r in rows])
        for r, on in zip(rows, front):
            r.setdefault("pareto", {})[p] = bool(on)
    table = {"format": "neurosdm pareto v1", "settings": settings, "profiles": profiles, "baselines": BASELINES,
             "rows": rows}
    with atomic_path(out / "pareto.json") as tmp:
        Path(tmp).write_text(json.dumps(table, indent=1))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["name", "fid", "num_images", "firing_rate", "mean_spiking_steps", "network_calls",
                *[f"{p}_mj" for p in profiles], *[f"ann_{b}_mj" for b in BASELINES],
                *[f"pareto_{p}" for p in profiles]])
    for r in rows:
        w.writerow([r["name"], f"{r['fid']:.4f}", r["num_images"], f"{r['firing_rate']:.4f}",
                    f"{r['mean_spiking_steps']:.3f}", r["network_calls"],
                    *[f"{r['energy_mj_per_image'][p]:.6g}" for p in profiles],
                    *[f"{r['ann_mj_per_image'][b]:.6g}" for b in BASELINES], *[int(r["pareto"][p]) for p in profiles]])
    with atomic_path(out / "pareto.csv") as tmp:
        Path(tmp).write_text(buf.getvalue())
    table["plots"] = [str(plot_front(rows, p, out / f"pareto_{p}.png", settings)) for p in profiles]
    return table


def plot_front(rows: list[dict], profile: str, path: Path, settings: dict) -> Path:
    """FID against mJ per image on ``profile`` (log x), Pareto front joined, ANN baselines as vertical lines."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    e = np.array([r["energy_mj_per_image"][profile] for r in rows])
    f = np.array([r["fid"] for r in rows])
    on = np.array([r["pareto"][profile] for r in rows])
    ax.scatter(e[~on], f[~on], c="#999999", label="configuration")
    order = np.argsort(e[on])
    ax.plot(e[on][order], f[on][order], "o-", c="#c0392b", label="Pareto front")
    for r, x, y in zip(rows, e, f):
        ax.annotate(r["name"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for b, style in zip(BASELINES, ("--", ":")):
        calls = {r["ann_mj_per_image"][b]: r["network_calls"] for r in rows}
        for v, n in sorted(calls.items()):
            ax.axvline(v, ls=style, c="#2c3e50", lw=1)
            ax.annotate(f"{n} calls", (v, 1.0), xycoords=("data", "axes fraction"), fontsize=6, rotation=90,
                        ha="right", va="top")
        if calls:
            ax.plot([], [], ls=style, c="#2c3e50", label=f"ANN on {b} (same calls)")
    ax.set_xscale("log")
    ax.set_xlabel(f"mJ per image on {profile} (event engine counts, {settings['energy_images']} images)")
    ax.set_ylabel(f"classifier FID ({settings['num_images']} samples)")
    ax.set_title(f"quality against energy: {profile}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
