"""Mapping: ``map`` (a NIR graph onto a profile's chips: fits or not, cores, chips, utilisation, the core loads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from neurosdm.cli.common import DISC_HELP, console, say
from neurosdm.errors import ConfigError


def map(  # noqa: A001 - the command's name
    file: Path = typer.Argument(..., help="NIR file: a denoiser export or a foreign graph"),
    profile: str = typer.Option("loihi2", help="hardware profile with a resources section (loihi, loihi2, "
                                "loihi-sanafe, truenorth, spinnaker2) or a .toml file"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for mapping.json and mapping.png (core loads)"),
    as_json: bool = typer.Option(False, "--json", help="print the mapping as JSON"),
    dt: Optional[float] = typer.Option(None, help=DISC_HELP["dt"]),
    method: Optional[str] = typer.Option(None, help=DISC_HELP["method"]),
    reset: Optional[str] = typer.Option(None, help=DISC_HELP["reset"]),
    comparison: Optional[str] = typer.Option(None, help=DISC_HELP["comparison"]),
):
    """Map a graph onto a chip's cores (docs/mapping.md): does it fit, on how many cores and chips, how full."""
    from neurosdm.report import map_graph

    if not file.exists():
        raise ConfigError(f"file not found: {file}")
    m = map_graph(file, profile=profile, out=out, dt=dt, method=method, reset=reset, comparison=comparison)
    if as_json:
        typer.echo(json.dumps(m, indent=1))
        return
    table = Table(title=f"{file.name} on {m['profile']}: {m['cores_used']:,} cores, {m['chips_used']} chip(s)")
    for col in ("population", "shape", "pieces", "neurons / core (max)", "input axons (max)",
                "output axons (max)", "memory bits (max)"):
        table.add_column(col, justify="left" if col == "population" else "right",
                         overflow="fold" if col == "population" else "ellipsis")
    for p in m["populations"]:
        pcs = p["pieces"]
        table.add_row(p["population"], "x".join(map_str(p["shape"])), str(len(pcs)),
                      *[f"{max(pc[k] for pc in pcs):,}" for k in ("neurons", "fanin_axons", "fanout_axons",
                                                                   "memory_bits")])
    console.print(table)
    if m["fits"]:
        say(f"fits: {m['cores_used']:,} cores on {m['chips_used']} chip(s)"
            + (f", {m['boards_used']} board(s)" if m["boards_used"] else "") + f" ({m['scheme']})")
    else:
        say("does NOT fit: " + "; ".join(f"layer {v['layer']}: {v['limit']} needs {v['need']:,}, allows "
                                         f"{v['allowed']:,}" for v in m["violations"]))
    say("utilisation per core (mean / max): " + ", ".join(
        f"{k} {u['mean']:.2f} / {u['max']:.2f}" for k, u in m["utilisation"].items()))
    spiking = m["spikes"]
    if spiking:
        n = len(spiking)
        say(f"per spike or graded message, mean over {n} source population(s): "
            f"{sum(s['packets_per_spike'] for s in spiking.values()) / n:.2f} packets, "
            f"{sum(s['hops_per_spike'] for s in spiking.values()) / n:.2f} hops, "
            f"{sum(s['chip_hops_per_spike'] for s in spiking.values()) / n:.3f} chip crossings")
    for f in m["files"]:
        say(f"wrote {f}")


def map_str(values) -> list[str]:
    return [str(v) for v in values]
