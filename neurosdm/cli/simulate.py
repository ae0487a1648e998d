"""Running the exported graph: ``simulate``, ``compare`` (GPU path vs both engines) and ``demo`` (everything)."""

from __future__ import annotations

import json
import time
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from neurosdm.cli.common import (DEFAULT_CKPT, DISC_HELP, FORCE_HELP, GAMMA_HELP, SAMPLER_HELP, console, layer_table,
                                 progress_bar, say, write_rendered)
from neurosdm.config import check_real
from neurosdm.io import check_outputs


class Engine(str, Enum):
    event = "event"
    torch = "torch"


def simulate(
    file: Path = typer.Argument(..., help="NIR file: a denoiser written by `neurosdm export`, or any (foreign) NIR "
                                "graph with --input"),
    engine: Optional[Engine] = typer.Option(None, help="event: event-driven (CPU) | torch: clocked, dense (CPU/CUDA) "
                                            "(default: event for a denoiser export, torch for a foreign graph)"),
    num_images: int = typer.Option(4, help="images to generate"),
    sampler: str = typer.Option("ddim", help=SAMPLER_HELP),
    steps: int = typer.Option(20, help="denoising steps (network calls)"),
    seed: int = typer.Option(0),
    eta: float = typer.Option(0.0, help="DDIM stochasticity"),
    order: int = typer.Option(3, help="DPM-Solver order (1-3)"),
    gamma: Optional[Path] = typer.Option(None, help=GAMMA_HELP),
    batch_size: int = typer.Option(16),
    device: str = typer.Option("cpu", help="torch engine only: cpu | cuda"),
    save_spikes: bool = typer.Option(False, "--save-spikes", help="also write the spikes as NIR data "
                                     "(DIR/spikes.nird): every IF layer, or a foreign graph's spiking layers"),
    threshold_scale: Optional[float] = typer.Option(None, help="threshold guidance at simulation time: IF layers "
                                                    "fire at threshold x this (default: as exported)"),
    steps_schedule: Optional[str] = typer.Option(None, "--steps-schedule", help="spiking steps per network call by "
                                                 "diffusion step: rules 't<A:K' then a default K, e.g. "
                                                 "'t<300:4,t<700:3,2' (docs/pareto.md); default: the export's "
                                                 "metadata, '' for none"),
    input: Optional[Path] = typer.Option(None, "--input", help="foreign graphs: the input, .npy/.npz [T, B, *shape] "
                                         "or [T, *shape], or NIR data (TimeGriddedData [samples, T, neurons])"),
    dt: Optional[float] = typer.Option(None, help=DISC_HELP["dt"]),
    method: Optional[str] = typer.Option(None, help=DISC_HELP["method"]),
    reset: Optional[str] = typer.Option(None, help=DISC_HELP["reset"]),
    comparison: Optional[str] = typer.Option(None, help=DISC_HELP["comparison"]),
    out: Path = typer.Option(..., "--out", help="output directory"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
):
    """Run an exported graph on an engine: a denoiser inside the sampler (images), or a foreign graph on --input
    (outputs.npz); exact per-layer counts."""
    check_real("--eta", eta, 0.0, 1.0)  # DDIM's stochasticity: 0 (deterministic) .. 1 (DDPM-like)
    written = ["outputs.npz"] if input is not None else ["images.npy", "images.png"]
    check_outputs(out, [*written, "stats.json", "layers.txt", *(["spikes.nird"] if save_spikes else [])], force,
                  sources=(file, input, gamma))
    from neurosdm import jobs

    run = jobs.simulate(file, out, engine=engine.value if engine is not None else None, num_images=num_images,
                        sampler=sampler, steps=steps, seed=seed, eta=eta, order=order, gamma_file=gamma,
                        batch_size=batch_size, device=device, save_spikes=save_spikes,
                        threshold_scale=threshold_scale, steps_schedule=steps_schedule, input=input, dt=dt,
                        method=method, reset=reset, comparison=comparison, progress=progress_bar, say=say)
    if run is None:  # another rank of a torchrun job
        return
    stats = run.stats
    tot = stats.to_dict()["totals"]
    if run.foreign:
        title = f"{file.name}: {run.engine} engine, {stats.images} sample(s) x {stats.num_steps} steps"
        written = [f"{out}/outputs.npz", f"{out}/stats.json", f"{out}/layers.txt"]
        if run.spike_layers is not None:
            written.append(f"{out}/spikes.nird ({len(run.spike_layers)} spiking layer(s))")
        summary = (f"{tot['spikes_out']:,} spikes, {tot['synops']:,} synops, {tot['graded_ops']:,} graded ops, "
                   f"{tot['macs']:,} MACs, {tot['pool_adds']:,} pool adds -> " + ", ".join(written))
    else:
        title = f"{file.name}: {run.engine} engine, {num_images} images, {sampler} {steps}"
        summary = (f"{tot['spikes_out']:,} spikes, {tot['synops']:,} synops, {tot['graded_ops']:,} graded ops, "
                   f"{tot['macs']:,} MACs on chip; host {int(stats.host['host_macs'].sum()):,} MACs, "
                   f"{int(stats.host['host_elementwise'].sum()):,} element-wise ops -> {out}/images.png, "
                   f"{out}/stats.json")
    table = layer_table(stats, title)
    console.print(table)
    write_rendered(out / "layers.txt", table)
    say(summary)


def _sampler_without_table(value: str) -> str:
    """``compare --sampler``: one of the library's samplers that need no Gamma table (compare takes no --gamma)."""
    from neurosdm.diffusion.samplers import SAMPLERS
    from neurosdm.jobs import needs_gamma

    choices = [s for s in SAMPLERS if not needs_gamma(s)]
    if value not in choices:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(map(repr, choices))}.")
    return value


def compare(
    source: Path = typer.Argument(..., help="checkpoint (exported to int8 in memory) or NIR file"),
    num_images: int = typer.Option(4),
    steps: int = typer.Option(20, help="denoising steps"),
    sampler: str = typer.Option("ddim", callback=_sampler_without_table,
                                help="ddpm | ddim | dpm-solver (order 3); the analytic samplers need --gamma "
                                     "(`neurosdm simulate`)"),
    seed: int = typer.Option(0),
    batch_size: int = typer.Option(16),
    calibration: Optional[str] = typer.Option(None, help="int8 calibration dataset (checkpoint input)"),
    data_dir: Optional[str] = typer.Option(None),
    calibration_images: int = typer.Option(64, help="images for int8 calibration (checkpoint input)"),
    out: Path = typer.Option(..., "--out", help="output directory"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
):
    """GPU path (float torch model) vs the quantised graph on the torch engine vs the event engine, same seeds."""
    check_outputs(out, ["compare.json", "compare.png", "stats_torch.json", "stats_event.json"], force,
                  sources=(source,))
    from neurosdm.compare import compare as run_compare

    r = run_compare(source, out, num_images, steps, seed, sampler, batch_size, calibration, data_dir,
                    calibration_images=calibration_images, progress=progress_bar("sampling"))
    table = Table(title=f"{r['program']}: {num_images} images, {sampler} {steps}")
    for col in ("pair", "PSNR per image (dB)", "max |diff|", "identical"):
        table.add_column(col)
    for name, p in r["pairs"].items():
        table.add_row(name, " ".join(f"{v:.1f}" for v in p["psnr"]), f"{max(p['max_abs']):.3g}", str(p["identical"]))
    console.print(table)
    worst = min(r["spike_agreement"].values()) if r["spike_agreement"] else 1.0
    say(f"event vs torch engine: outputs bit-identical {r['engine_outputs_bit_identical']}, counts equal "
        f"{r['counts_equal']}, spike agreement {worst:.6f} (worst layer, {r['spikes_compared']:,} spikes compared); "
        "seconds per image: " + ", ".join(f"{k} {v:.2f}" for k, v in r["seconds_per_image"].items())
        + f" -> {out}/compare.png, {out}/compare.json")


def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", help="output directory"),
    ckpt: Path = typer.Option(DEFAULT_CKPT, help="checkpoint (default: the shipped Fashion-MNIST model)"),
    num_images: int = typer.Option(4),
    steps: int = typer.Option(20, help="DDIM sampling steps"),
    seed: int = typer.Option(0),
    calibration: Optional[str] = typer.Option(None, help="int8 calibration dataset (default: the checkpoint's "
                                              "training set, else the built-in sample)"),
    data_dir: Optional[str] = typer.Option(None, help="where the calibration dataset lives"),
    calibration_images: int = typer.Option(64, help="images for int8 calibration (noised at 8 diffusion steps)"),
):
    """The main job on a built-in default: sample on the GPU path, export to int8 NIR, simulate event by event,
    price on every hardware profile against the ANN baseline, compare, and write an HTML report."""
    from neurosdm.report import run_demo

    t0 = time.perf_counter()
    report = run_demo(ckpt, out, num_images, steps, seed, progress=progress_bar("sampling"), log=say,
                      calibration=calibration, data_dir=data_dir, calibration_images=calibration_images)
    priced = json.loads((out / "energy.json").read_text())  # the summary line is made of what the report shows
    cmp = json.loads((out / "compare.json").read_text())
    snn = ", ".join(f"{k} {v['per_image_mj']:.3g}" for k, v in priced["summary"].items()
                    if k in ("loihi", "loihi2", "truenorth"))
    ann = priced["ann_baseline"]["cmos45-fp32"]["pj_per_image"] * 1e-9
    say(f"demo: {num_images} images of {ckpt.name} in {time.perf_counter() - t0:.0f} s; event engine = torch engine "
        f"bit for bit: {cmp['engine_outputs_bit_identical']}; SNN mJ per image: {snn}; ANN baseline (45 nm fp32) "
        f"{ann:.3g}")
    say(f"report: {report}")
