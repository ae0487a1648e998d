"""Pricing: ``energy`` (a run on a hardware profile, as a table, JSON or CSV) and ``profiles``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from neurosdm.cli.common import DISC_HELP, FORCE_HELP, console, fmt_energy, say, write_rendered
from neurosdm.errors import ConfigError
from neurosdm.io import atomic_path, check_finite_report, check_outputs


def energy(
    file: Path = typer.Argument(..., help="NIR file (a denoiser export, or a foreign graph with --input), or "
                                "stats.json of `neurosdm simulate`"),
    profile: str = typer.Option("loihi2", help="hardware profile (see `neurosdm profiles`) or a .toml file"),
    baseline: str = typer.Option("cmos45-fp32", help="profile pricing the ANN baseline's MACs"),
    host: Optional[str] = typer.Option(None, help="profile pricing host work (default: the profile's own host)"),
    graph: Optional[Path] = typer.Option(None, help="with stats.json: the .nir it came from (for the ANN baseline)"),
    num_images: int = typer.Option(1, help="from a .nir: images to simulate"),
    steps: int = typer.Option(10, help="from a .nir: DDIM steps"),
    seed: int = typer.Option(0, help="from a .nir: seed"),
    input: Optional[Path] = typer.Option(None, "--input", help="from a foreign .nir: its input (as `simulate "
                                         "--input`), run on the torch engine"),
    dt: Optional[float] = typer.Option(None, help=DISC_HELP["dt"]),
    method: Optional[str] = typer.Option(None, help=DISC_HELP["method"]),
    reset: Optional[str] = typer.Option(None, help=DISC_HELP["reset"]),
    comparison: Optional[str] = typer.Option(None, help=DISC_HELP["comparison"]),
    mapping: str = typer.Option("auto", help="auto: map the graph onto the profile's chips (cores, chips, hops, the "
                                "busiest core's time; docs/mapping.md) | none: the profile's lower bound"),
    as_json: bool = typer.Option(False, "--json", help="print/write JSON"),
    as_csv: bool = typer.Option(False, "--csv", help="print/write CSV (layer, kind, term, count, pJ)"),
    out: Optional[Path] = typer.Option(None, "--out", help="write the report (JSON, CSV or the table) to FILE"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
):
    """Energy, time and EDP of a run on a hardware profile, per layer and term, with an ANN baseline."""
    if as_json and as_csv:
        raise ConfigError("choose one of --json and --csv")
    check_outputs(out, (), force, sources=(file, graph, input))
    from neurosdm import jobs

    quiet = as_json or as_csv
    err = Console(stderr=True)  # with --json/--csv, stdout carries only the report
    with warnings.catch_warnings():  # overflows are not warned about one by one: a non-finite report is refused
        warnings.simplefilter("ignore", RuntimeWarning)
        r = jobs.energy_report(file, profile=profile, baseline=baseline, host=host, graph=graph,
                               num_images=num_images, steps=steps, seed=seed, input=input, dt=dt, method=method,
                               reset=reset, comparison=comparison, mapping=mapping,
                               say=(lambda m: say(m, err)) if quiet else say)
    check_finite_report(r, f"the energy report of {file.name}")
    if quiet:
        if as_json:
            text = json.dumps(r, indent=1)
        else:
            from neurosdm.energy import report_csv

            text = report_csv(r)
        if out:
            with atomic_path(out) as tmp:
                tmp.write_text(text)
            err.print(f"wrote {out}")
        else:
            typer.echo(text, nl=False)
        return
    table, lines = _report_table(file, r)
    console.print(table)
    for line in lines:
        say(line)
    if out:
        write_rendered(out, table, lines, width=200)
        console.print(f"wrote {out}")


def _report_table(file: Path, r: dict) -> tuple[Table, list[str]]:
    """The energy report as a table (layer x term, host, static) and the lines under it (totals, time, baseline,
    unpriced terms)."""
    terms = sorted({t for layer in r["layers"] for t in layer["terms"]})
    if r.get("foreign"):
        title = f"{file.name} on {r['profile']}: {r['images']} sample(s) x {r['num_steps']} steps (foreign graph)"
    else:
        title = (f"{file.name} on {r['profile']}: {r['images']} image(s), {r['denoising_steps']} denoising steps x "
                 f"{r['num_steps']} spiking steps")
    table = Table(title=title)
    for col in ("layer", "kind", *terms, "total"):
        table.add_column(col, justify="left" if col in ("layer", "kind") else "right")
    for layer in r["layers"]:
        if not layer["terms"]:
            continue
        table.add_row(layer["layer"], layer["kind"],
                      *[fmt_energy(layer["terms"][t]["pj"]) if t in layer["terms"] else "" for t in terms],
                      fmt_energy(layer["total_pj"]))
    for term, v in r["host"]["terms"].items():
        table.add_row(f"host ({r['host_profile']})", term, *[""] * len(terms), fmt_energy(v["pj"]))
    if r["static"]:
        table.add_row("static", f"{r['static']['power_mw']:g} mW", *[""] * len(terms), fmt_energy(r["static"]["pj"]))
    tot = r["totals"]
    if r.get("foreign"):
        lines = [f"total {fmt_energy(tot['total_pj'])}; per sample {fmt_energy(tot['per_image_pj'])}"]
    else:
        lines = [f"total {fmt_energy(tot['total_pj'])}; per image {fmt_energy(tot['per_image_pj'])}; per network "
                 f"call per image {fmt_energy(tot['per_call_per_image_pj'])}; per denoising step (all images) "
                 + ", ".join(fmt_energy(v) for v in tot["per_denoising_step_pj"][:5])
                 + (" ..." if len(tot["per_denoising_step_pj"]) > 5 else "")]
    if r["time"]:
        lines.append(f"estimated chip time per image {r['time']['per_image_s'] * 1e3:.3g} ms "
                     f"({r['time']['model']}); EDP per image {r['edp_per_image_js']:.3g} J s"
                     + (f"; no latency for: {', '.join(r['time']['untimed_terms'])}"
                        if r["time"]["untimed_terms"] else ""))
    else:
        lines.append("no time estimate: the profile publishes no latencies (no EDP, no static energy)")
    if r.get("mapping_note"):
        lines.append(r["mapping_note"])
    for c in (r.get("mapping") or {}).get("limiting_cores", [])[:3]:
        lines.append(f"limiting core {c['core']} ({c['population']}): {c['work_s'] * 1e3:.3g} ms of work, "
                     f"{c['share_of_busiest_time']:.0%} of the chip time")
    b = r.get("ann_baseline")
    if b:
        lines.append(f"ANN baseline ({b['profile']}, {b['mac_pj']:g} pJ/MAC, {b['macs']:,} MACs per call): "
                     f"{fmt_energy(b['pj_per_image'])} per image; SNN/ANN = {b['ratio_snn_to_ann']:.3g}")
    elif r.get("foreign"):
        lines.append("ANN baseline: none for a foreign graph")
    else:
        lines.append("ANN baseline: needs the graph (give a .nir, or --graph FILE.nir with stats.json)")
    if r["unpriced"]:
        lines.append("UNPRICED (no price in the profile, not included): " + "; ".join(
            f"{u['term']} ({u['where']}): {u['count']:,}" for u in r["unpriced"]))
    else:
        lines.append("unpriced: none")
    return table, lines


def profiles():
    """List the hardware profiles: description, sources, and how many constants are assumptions."""
    from neurosdm.hardware.profiles import list_profiles, load_profile

    table = Table(title="hardware profiles (neurosdm/hw_profiles)")
    for col in ("profile", "description", "host", "constants", "assumptions", "sources"):
        table.add_column(col, no_wrap=col in ("profile", "host"))
    for name in list_profiles():
        p = load_profile(name)
        consts = list(p.constants())
        table.add_row(name, p.description, p.host or "-", str(len(consts)),
                      str(sum(c.evidence == "assumption" for _, _, c in consts)), "\n".join(p.sources.values()))
    console.print(table)
