"""``pareto``: energy-quality trade-offs of a model's knobs (:mod:`neurosdm.pareto`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from neurosdm.cli.common import DEFAULT_CKPT, console, progress_bar, say


def pareto(
    ckpt: Path = typer.Argument(DEFAULT_CKPT, help="the trained model (default: the shipped tiny Fashion-MNIST one)"),
    grid: Optional[Path] = typer.Option(None, "--grid", help="TOML file: [[config]] tables and/or a [grid] of value "
                                        "lists (Cartesian product); docs/pareto.md"),
    config: Optional[List[str]] = typer.Option(None, "--config", help="one configuration as k=v pairs, e.g. "
                                               "threshold_scale=1.1,num_steps=2 (repeatable; steps_schedule=... "
                                               "last). Knobs: ckpt, num_steps, steps_schedule, threshold_scale, "
                                               "sampler_steps, quantize, name"),
    profiles: str = typer.Option("loihi2,loihi,cmos45-int8", help="comma-separated hardware profiles"),
    num_images: int = typer.Option(256, help="samples per configuration for the classifier FID"),
    energy_images: int = typer.Option(2, help="images the event engine counts per configuration"),
    seed: int = typer.Option(0),
    dataset: str = typer.Option("fashion-mnist", help="real data: FID reference (test split) and int8 calibration"),
    data_dir: Optional[str] = typer.Option(None),
    quality: str = typer.Option("gpu", help="gpu: samples of the float torch model with the knobs | engine: of the "
                                "export on the torch engine (bit-identical to the event engine for int8; slower)"),
    out: Path = typer.Option(..., "--out", help="output directory (results/, pareto.json, pareto.csv, plots); "
                             "run again to resume"),
):
    """Sweep knobs of a spiking diffusion model: classifier FID against exact energy per image on each profile,
    with the ANN baseline and the Pareto front (resumable)."""
    from neurosdm.pareto import load_grid, parse_config, run_pareto

    configs = (load_grid(grid) if grid else []) + [parse_config(c) for c in (config or [])]
    table = run_pareto(ckpt, configs, out, [p.strip() for p in profiles.split(",") if p.strip()], num_images,
                       energy_images, seed, dataset, data_dir, quality, progress=progress_bar, say=say)
    t = Table(title=f"{ckpt.name}: classifier FID ({num_images} samples) and mJ per image ({energy_images} counted)")
    for col in ("configuration", "FID", "rate", *table["profiles"], "ANN fp32", "ANN int8"):
        t.add_column(col, justify="left" if col == "configuration" else "right")
    for r in table["rows"]:
        e = r["energy_mj_per_image"]
        t.add_row(r["name"], f"{r['fid']:.2f}", f"{r['firing_rate']:.3f}",
                  *[f"{e[p]:.3g}{' *' if r['pareto'][p] else ''}" for p in table["profiles"]],
                  *[f"{r['ann_mj_per_image'][b]:.3g}" for b in table["baselines"]])
    console.print(t)
    say(f"* on the Pareto front of that profile; tables {out}/pareto.json, {out}/pareto.csv; plots: "
        + ", ".join(Path(p).name for p in table["plots"]))
