"""The main job end to end (``neurosdm demo``): sample on the GPU path, export to NIR, simulate event by event,
price on the hardware profiles, compare, and write one self-contained HTML report.

Stages (each timed in the report): export the checkpoint to int8 NIR (``model_int8.nir``); ``compare`` on the same
seeds (the torch model, the graph on the torch engine and on the event engine, the event run checked in lockstep
spike for spike); ``energy.price_all`` of the event engine's counts on every profile with the ANN baselines;
the plots; ``report.html`` (images, tables and plots embedded) next to the JSON files it was made from, with the
mapping of the graph onto Loihi 2 (cores, chips, utilisation, the core loads on the mesh). When a ``neurosdm
pareto`` sweep was written to ``out_dir/pareto``, the report shows it too (its table and plots).

:func:`map_graph` is ``neurosdm map``: a NIR file mapped onto a profile's chips, ``mapping.json`` and the picture
of the core loads (``mapping.png``) written together into a folder.
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

from neurosdm.checkpoint import file_sha256
from neurosdm.compare import compare
from neurosdm.energy import price_all
from neurosdm.energy_plots import plot_core_loads, write_plots
from neurosdm.exporters.pipeline import export_checkpoint
from neurosdm.graph.program import load_program
from neurosdm.hardware.routing import map_program, try_map
from neurosdm.io import atomic_path, output_set
from neurosdm.simulators.foreign import load_any
from neurosdm.simulators.stats import RunStats

__all__ = ["run_demo", "write_html", "map_graph", "MAP_PROFILE"]

MAP_PROFILE = "loihi2"  # the mapping shown in report.html


def map_graph(file, profile: str = "loihi2", out=None, dt=None, method=None, reset=None, comparison=None) -> dict:
    """``neurosdm map``: read ``file`` (a denoiser export or a foreign graph, with its discretisation options),
    map it onto ``profile`` (:func:`neurosdm.hardware.routing.map_program`); with ``out``, write ``mapping.json``
    and ``mapping.png`` there together. Returns the mapping (``files``: what was written)."""
    program, _ = load_any(file, dt, method, reset, comparison)
    mapping = map_program(program, profile)
    mapping["graph"] = str(file)
    mapping["files"] = []
    if out is not None:
        with output_set(out) as stage:
            Path(stage, "mapping.json").write_text(json.dumps(mapping, indent=1))
            plot_core_loads(mapping, Path(stage) / "mapping.png")
        mapping["files"] = [str(Path(out) / "mapping.json"), str(Path(out) / "mapping.png")]
    return mapping


def run_demo(ckpt, out_dir, num_images: int = 4, steps: int = 20, seed: int = 0, progress=None,
             log=print, calibration: str | None = None, data_dir: str | None = None,
             calibration_images: int = 64) -> Path:
    """Run every stage for ``ckpt`` into ``out_dir``; returns the path of ``report.html``. ``calibration``,
    ``data_dir``, ``calibration_images``: the int8 export's calibration set (default: the checkpoint's training
    set, as ``neurosdm export``)."""
    out = Path(out_dir)
    times = {}
    t0 = time.perf_counter()
    nir_path = export_checkpoint(ckpt, out / "model_int8.nir", quantize="int8", force=True, calibration=calibration,
                                 data_dir=data_dir, calibration_images=calibration_images)
    times["export to int8 NIR (calibration included)"] = time.perf_counter() - t0
    log(f"exported {nir_path} ({times['export to int8 NIR (calibration included)']:.0f} s)")

    t0 = time.perf_counter()
    cmp = compare(ckpt, out, num_images=num_images, steps=steps, seed=seed, progress=progress, graph_file=nir_path)
    times["sample: GPU path, torch engine, event engine (lockstep-checked)"] = time.perf_counter() - t0
    log(f"sampled on every path ({times['sample: GPU path, torch engine, event engine (lockstep-checked)']:.0f} s)")

    t0 = time.perf_counter()
    program = load_program(nir_path)
    stats = RunStats.load(out / "stats_event.json")
    priced = price_all(stats, program)
    plots = write_plots(priced, stats, out)
    mapping, note = try_map(program, MAP_PROFILE)
    priced["mapping_note"] = note
    if mapping is not None:
        plots["mapping"] = plot_core_loads(mapping, out / f"mapping_{MAP_PROFILE}.png")
        with atomic_path(out / f"mapping_{MAP_PROFILE}.json") as tmp:
            tmp.write_text(json.dumps(mapping, indent=1))
    with atomic_path(out / "energy.json") as tmp:
        tmp.write_text(json.dumps(priced, indent=1))
    times["price on every profile and plot"] = time.perf_counter() - t0

    md = program.metadata
    q = md.get("quant", {})
    info = {
        "checkpoint": f"{Path(ckpt).name} (sha256 {file_sha256(ckpt)[:16]}...)",
        "export": f"int8: {int(q.get('weight_bits', 8))}-bit weight mantissas, {int(q.get('state_bits', 24))}-bit "
                  f"state in units of 2^{int(q.get('state_exponent', 0))}, calibrated on "
                  f"{int(q.get('calibration', {}).get('images', 0))} images; {len(program.layers)} NIR nodes",
        "generation": f"{num_images} images, DDIM {steps} steps, seed {seed}, {program.num_steps} spiking steps",
    }
    return write_html(out / "report.html", info, cmp, priced, stats, plots, out / "compare.png", times, mapping,
                      pareto_dir=out / "pareto")


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" style="max-width:100%">'


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _mapping_section(mapping: dict | None, note: str, png) -> list[str]:
    """report.html's mapping section: fits or not, cores and chips, utilisation per resource, the core loads."""
    out = [f"<h2>Mapping onto {MAP_PROFILE} (docs/mapping.md)</h2>", f"<p>{html.escape(note)}</p>"]
    if mapping is None:
        return out
    rows = [["fits", "yes" if mapping["fits"] else "NO: " + "; ".join(
                f"{v['layer']} {v['limit']} {v['need']:,} > {v['allowed']:,}" for v in mapping["violations"])],
            ["cores used", f"{mapping['cores_used']:,}"], ["chips used", mapping["chips_used"]],
            ["boards used", mapping["boards_used"] if mapping["boards_used"] is not None else "-"]]
    rows += [[f"utilisation of {k} (mean / max per core)", f"{u['mean']:.2f} / {u['max']:.2f}"]
             for k, u in mapping["utilisation"].items()]
    out.append(_table(["", ""], rows))
    if png:
        out.append(_img(png))
    return out


def _fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f3f3f3}td{text-align:right}td:first-child{text-align:left}h2{margin-top:1.6em}.note{color:#555}"""


def pareto_section(folder: Path) -> list[str]:
    """The HTML of a ``neurosdm pareto`` sweep in ``folder`` (its pareto.json and plots), or nothing."""
    try:
        table = json.loads((Path(folder) / "pareto.json").read_text())
    except (OSError, ValueError):
        return []
    s, profiles = table["settings"], table["profiles"]
    rows = [[r["name"], f"{r['fid']:.2f}", f"{r['firing_rate']:.3f}",
             *[f"{r['energy_mj_per_image'][p]:.3g}" + (" *" if r["pareto"][p] else "") for p in profiles],
             f"{r['ann_mj_per_image']['cmos45-fp32']:.3g}", f"{r['ann_mj_per_image']['cmos45-int8']:.3g}"]
            for r in table["rows"]]
    parts = ["<h2>Energy against quality (neurosdm pareto)</h2>",
             f"<p>Classifier FID of {s['num_images']} samples per configuration; energy from the event engine's "
             f"counts of {s['energy_images']} images; * on that profile's Pareto front.</p>",
             _table(["configuration", "FID", "firing rate", *[f"{p} mJ" for p in profiles], "ANN fp32 mJ",
                     "ANN int8 mJ"], rows)]
    return parts + [_img(Path(folder) / f"pareto_{p}.png") for p in profiles
                    if (Path(folder) / f"pareto_{p}.png").is_file()]


def write_html(path, info: dict, cmp: dict, priced: dict, stats, plots: dict, compare_png, times: dict,
               mapping: dict | None = None, pareto_dir: Path | None = None) -> Path:
    """The report (see the module docstring), written atomically; returns its path. ``pareto_dir``: a
    ``neurosdm pareto`` folder, shown when it holds a pareto.json."""
    parts = [f"<!doctype html><meta charset='utf-8'><title>neurosdm report</title><style>{CSS}</style>",
             "<h1>neurosdm: a spiking diffusion model on simulated neuromorphic hardware</h1>"]
    parts.append(_table(["", ""], [[k, v] for k, v in info.items()]))

    parts.append("<h2>Samples: GPU path against the simulated chip</h2>")
    parts.append(_img(compare_png))
    rows = [[name, " ".join(f"{v:.1f}" for v in p["psnr"]), f"{max(p['max_abs']):.3g}", p["identical"]]
            for name, p in cmp["pairs"].items()]
    parts.append(_table(["pair", "PSNR per image (dB)", "max |difference|", "identical"], rows))
    worst = min(cmp["spike_agreement"].values()) if cmp["spike_agreement"] else 1.0
    parts.append(f"<p>Event engine against the torch engine, checked at every denoiser call: outputs bit-identical "
                 f"<b>{cmp['engine_outputs_bit_identical']}</b>, counts equal <b>{cmp['counts_equal']}</b>, spike "
                 f"agreement {worst:.6f} in the worst layer ({cmp['spikes_compared']:,} spike-neuron-steps "
                 f"compared). The difference to the GPU path is the int8 quantisation (see docs/export.md: "
                 f"the denoising error is unchanged, a few percent of spikes flip).</p>")

    c = priced["counts"]
    rate = c["spikes_out"] / c["neuron_updates"] if c["neuron_updates"] else 0.0
    n = max(stats.images, 1)
    parts.append("<h2>Activity (exact counts, event engine)</h2>")
    parts.append(_table(["quantity", "total", "per image"], [
        ["spikes", f"{c['spikes_out']:,}", f"{c['spikes_out'] // n:,}"],
        ["neuron updates", f"{c['neuron_updates']:,}", f"{c['neuron_updates'] // n:,}"],
        ["firing rate (spikes / neuron update)", f"{rate:.3f}", ""],
        ["synaptic operations", f"{c['synops']:,}", f"{c['synops'] // n:,}"],
        ["graded operations (TSM)", f"{c['graded_ops']:,}", f"{c['graded_ops'] // n:,}"],
        ["analog-input MACs on chip", f"{c['macs']:,}", f"{c['macs'] // n:,}"],
        ["host MACs", f"{priced['host'].get('host_macs', 0):,}", ""],
        ["host element-wise ops", f"{priced['host'].get('host_elementwise', 0):,}", ""]]))
    parts.append(_img(plots["spikes"]))

    parts.append("<h2>Energy per image</h2>")
    rows = []
    for name, s in priced["summary"].items():
        rows.append([name, _fmt(s["per_image_mj"], 4), _fmt(s["time_per_image_ms"], 3), _fmt(s["vs_ann_fp32"], 3),
                     _fmt(s["edp_per_image_js"], 3), ", ".join(s["unpriced"]) or "-"])
    parts.append(_table(["profile", "mJ / image", "chip ms / image", "x ANN fp32", "EDP (J s)",
                         "unpriced (listed, not included)"], rows))
    base = [[k, f"{b['macs']:,}", b["mac_pj"], f"{b['pj_per_image'] * 1e-9:.4g}", b["convention"]]
            for k, b in priced["ann_baseline"].items()]
    parts.append("<p>ANN baseline of the same architecture (every synapse a dense MAC, once per network call):</p>")
    parts.append(_table(["profile", "MACs per call", "pJ per MAC", "mJ / image", "convention"], base))
    pf = priced["paper_formula_on_measured_rates"]
    parts.append(f"<p>The SDM paper's formula (4.6 pJ per first-layer MAC + 0.9 pJ per SOP) on the measured firing "
                 f"rates (mean {pf['mean_rate']:.3f}): {pf['per_image_pj'] * 1e-9:.4g} mJ per image.</p>")
    parts.append(_img(plots["profiles"]))
    parts.append(_img(plots["layers"]))

    rep = priced["reports"].get("loihi2")
    if rep:
        parts.append("<h2>Per layer on loihi2</h2>")
        rows = [[r["layer"], r["kind"], f"{r['total_pj'] * 1e-6:.4g}",
                 ", ".join(f"{t} {v['count']:,.0f}" for t, v in r["terms"].items())]
                for r in rep["layers"] if r["terms"]]
        parts.append(_table(["layer", "kind", "uJ (all images)", "priced counts"], rows))
        parts.append("<h3>Assumptions of the loihi2 profile</h3><ul>"
                     + "".join(f"<li>{html.escape(a)}</li>" for a in rep["assumptions"]) + "</ul>")
        parts.append("<h3>Unpriced terms</h3><ul>" + "".join(
            f"<li>{html.escape(u['term'])} ({html.escape(u['where'])}): {u['count']:,}</li>"
            for u in rep["unpriced"]) + "</ul>")

    parts += _mapping_section(mapping, priced.get("mapping_note", ""), plots.get("mapping"))
    parts += pareto_section(pareto_dir) if pareto_dir is not None else []
    parts.append("<h2>Run</h2>")
    parts.append(_table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in times.items()]))
    parts.append("<p class='note'>Files next to this report: model_int8.nir (the exported graph), compare.json, "
                 "stats_event.json and stats_torch.json (RunStats), energy.json, images_*.npy, the PNG plots.</p>")
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(parts))
    return Path(path)
