"""The CLI's jobs that need more than one library call, one function each: it loads, runs, writes its data files
and returns what the command shows; it never prints. Messages go through a ``say(line)`` callback and progress
through ``wrap(iterable) -> iterable`` wrappers (or a ``progress(description) -> wrap`` factory where the
description is only known inside). :mod:`neurosdm.cli` declares the options, calls one of these (or one library
function) and renders the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from neurosdm import config as C
from neurosdm import train as T  # T.train looked up at call time (tests replace neurosdm.train.train)
from neurosdm.checkpoint import load_checkpoint, load_model
from neurosdm.data import load_dataset
from neurosdm.diffusion import GaussianDiffusion
from neurosdm.diffusion.analytic import estimate_gamma, load_gamma, save_gamma
from neurosdm.diffusion.samplers import DPM_SOLVER_ORDERS, SAMPLERS
from neurosdm.distributed import process_group
from neurosdm.energy import estimate, with_ann_baseline
from neurosdm.errors import ConfigError, GraphError
from neurosdm.exporters.pipeline import export_checkpoint
from neurosdm.exporters.rewrite import write_for_peer
from neurosdm.graph.inspect import inspect_nir
from neurosdm.hardware.profiles import load_profile
from neurosdm.hardware.routing import try_map
from neurosdm.graph.program import load_program
from neurosdm.io import (atomic_path, check_output_dir, check_output_file, image_grid, os_reason, output_set,
                         regular_file, save_npy, save_png)
from neurosdm.sample import sample_to_dir
from neurosdm.simulators.foreign import (describe_discretisation, load_any, load_foreign_input, save_foreign_outputs,
                                         save_foreign_spikes_nird, simulate_foreign)
from neurosdm.simulators.run import is_denoiser_export, save_spikes_nird, simulate_sharded
from neurosdm.simulators.run import simulate as simulate_images
from neurosdm.simulators.stats import RunStats

Say = Callable[[str], None]


def check_device(device: str) -> str:
    """The one rule for ``--device``: ``cpu``, ``cuda`` or ``cuda:N`` that this torch can use (checked before any
    work)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown --device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: this torch has no usable CUDA device (torch {torch.__version__}); "
                              "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise ConfigError(f"--device {device}: neurosdm runs on cpu or cuda")
    return device

__all__ = ["Simulation", "check_sampler", "energy_report", "export_nir", "gamma", "needs_gamma", "run_foreign",
           "sample", "simulate", "train"]


def train(out: Path, preset: str = "tiny", dataset: Optional[str] = None, steps: Optional[int] = None,
          batch_size: Optional[int] = None, lr: Optional[float] = None, num_steps: Optional[int] = None,
          tsm: Optional[bool] = None, head: Optional[str] = None, data_dir: Optional[str] = None,
          init: Optional[Path] = None, qat: bool = False, qat_bits: Optional[int] = None, ann: bool = False,
          ann_bits: Optional[int] = None, rate_penalty: Optional[float] = None,
          rate_target: Optional[float] = None, seed: Optional[int] = None, bf16: Optional[bool] = None,
          ckpt_every: Optional[int] = None, sample_every: Optional[int] = None, sample_images: int = 64,
          resume: bool = True, device: str = "cpu", progress=None) -> Path:
    """``neurosdm train``: the preset (architecture and schedule from ``init`` when given), the options that are
    not None on top, then :func:`neurosdm.train.train` (under torchrun on this rank's device). Returns the
    checkpoint path."""
    if qat_bits is not None and not qat:
        raise ConfigError("--qat-bits needs --qat")
    if ann_bits is not None and not ann:
        raise ConfigError("--ann-bits needs --ann")
    if rate_target is not None and not rate_penalty:
        raise ConfigError("--rate-target needs --rate-penalty LAMBDA > 0")
    if rate_penalty and ann:
        raise ConfigError("--rate-penalty regularises IF spikes; the --ann model has QCFS activations")
    check_device(device)
    check_output_dir(out)
    if ann and num_steps is None:
        num_steps = 1  # the ANN runs one step
    base = C.preset(preset)
    if init:  # the architecture and schedule come from the checkpoint whose weights we start from
        init_cfg = load_checkpoint(init).config
        base.model, base.diffusion = init_cfg.model, init_cfg.diffusion
    cfg = T.config_with_overrides(
        base, **{"train.dataset": dataset, "train.steps": steps, "train.batch_size": batch_size,
                 "train.lr": lr, "model.num_steps": num_steps, "model.tsm": tsm, "model.head": head,
                 "train.data_dir": data_dir, "train.seed": seed, "train.bf16": bf16,
                 "train.ckpt_every": ckpt_every, "train.sample_every": sample_every,
                 "train.qat": qat or None, "train.qat_weight_bits": qat_bits,
                 "model.qcfs_bits": ann_bits, "train.rate_penalty": rate_penalty,
                 "train.rate_target": rate_target, "model.activation": "qcfs" if ann else None})
    with T.distributed(device) as dev:
        return T.train(cfg, out, resume=resume, init=str(init) if init else None, device=dev, progress=progress,
                       num_sample_images=sample_images)


def needs_gamma(sampler: str) -> bool:
    """Whether ``sampler`` needs a Gamma table (the analytic samplers, :mod:`neurosdm.diffusion.analytic`)."""
    return sampler.startswith("analytic")


def check_sampler(sampler: str, order: int, gamma_file: Optional[Path], source: Path, steps: int):
    """Check ``--sampler`` (one of :data:`neurosdm.diffusion.samplers.SAMPLERS`), ``--order`` and ``--gamma``;
    returns the analytic samplers' Gamma table (or None)."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    if order not in DPM_SOLVER_ORDERS:
        raise ConfigError(f"--order must be 1, 2 or 3, got {order}")
    if gamma_file is not None:
        if not gamma_file.exists():
            raise ConfigError(f"Gamma table not found: {gamma_file} (make one with `neurosdm gamma CKPT --dataset "
                              "NAME`)")
        regular_file(gamma_file, "Gamma table", ConfigError)
        try:
            return load_gamma(gamma_file)
        except OSError as e:
            raise ConfigError(f"Gamma table {gamma_file} cannot be read: {os_reason(e)}") from None
        except Exception as e:  # not an .npz, pickled objects (never loaded), missing arrays
            raise ConfigError(f"{gamma_file} is not a Gamma table written by `neurosdm gamma`: "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}") from None
    if needs_gamma(sampler):
        raise ConfigError(f"--sampler {sampler} needs --gamma FILE.npz: estimate it once with `neurosdm gamma "
                          f"{source} --dataset NAME --steps {steps} --out gamma.npz`")
    return None


def sample(ckpt: Path, out: Path, num_images: int = 64, sampler: str = "ddim", steps: int = 50, eta: float = 0.0,
           order: int = 3, gamma_file: Optional[Path] = None, seed: int = 0, threshold_scale: float = 1.0,
           batch_size: int = 64, device: str = "cpu", progress=None,
           steps_schedule: Optional[str] = None) -> Optional[Path]:
    """``neurosdm sample``: the sampler options checked, then :func:`neurosdm.sample.sample_to_dir` (under torchrun
    each rank samples its share, rank 0 merges; ``progress`` shows on rank 0). Returns the PNG path on rank 0,
    None on the other ranks."""
    table = check_sampler(sampler, order, gamma_file, ckpt, steps)
    check_device(device)
    check_output_dir(out)  # before the work, not after it
    with process_group(device) as world:
        return sample_to_dir(ckpt, out, num_images, seed=seed, sampler=sampler, num_sample_steps=steps, eta=eta,
                             threshold_scale=threshold_scale, batch_size=batch_size, device=world.device,
                             progress=progress if world.is_main else None, order=order, gamma=table, world=world,
                             steps_schedule=steps_schedule)


def gamma(ckpt: Path, dataset: str, out: Path, steps: int = 50, num_samples: int = 100,
          data_dir: Optional[str] = None, seed: int = 0) -> tuple[list[int], torch.Tensor]:
    """``neurosdm gamma``: Analytic-DPM's Gamma_t at the timesteps of a ``steps``-step sampler, estimated on the
    training data of ``dataset``, written to ``out``. Returns ``(timesteps, values)``."""
    check_output_file(out, force=True, sources=(ckpt,), label="Gamma table")
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
    return timesteps, values


def export_nir(ckpt: Path, out: Optional[Path] = None, quantize: str = "none", force: bool = False,
               calibration: Optional[str] = None, data_dir: Optional[str] = None, calibration_images: int = 64,
               junctions: str = "scale", peer: Optional[str] = None, upsample: str = "auto",
               steps_schedule: Optional[str] = None) -> tuple[Path, dict]:
    """``neurosdm export --to nir``: export (rewritten for ``peer``'s NIR reader when given, in the core-NIR
    polyphase form unless ``upsample`` says otherwise; the file is removed if that fails), then inspect it.
    Returns ``(path, totals)`` of :func:`neurosdm.graph.inspect.inspect_nir`."""
    if peer is not None and upsample == "auto":
        upsample = "polyphase"  # a peer reads core NIR only (its placeholder of the extension runs as zeros)
    path = export_checkpoint(ckpt, out, quantize=quantize, force=force, calibration=calibration, data_dir=data_dir,
                             calibration_images=calibration_images, junctions=junctions, upsample=upsample,
                             steps_schedule=steps_schedule)
    if peer is not None:
        write_for_peer(path, peer, discard_on_error=True)
    _, totals = inspect_nir(path)
    return path, totals


@dataclass
class Simulation:
    """What ``neurosdm simulate`` ran: the engine, its counts, whether the graph was foreign (outputs.npz) or a
    denoiser (images), and the spiking layers written to spikes.nird for a foreign graph (None: not written)."""

    engine: str
    stats: RunStats
    foreign: bool
    spike_layers: Optional[list[str]] = None


def run_foreign(file: Path, program, origin: dict, engine: Optional[str], input: Optional[Path], device: str,
                record: bool, say: Say) -> tuple[str, dict, RunStats]:
    """Read the input of a foreign graph, say the discretisation, run it (default engine: torch). Returns
    ``(engine name, result, stats)``."""
    if input is None:
        inp = program.by_name[program.inputs[0]] if len(program.inputs) == 1 else None
        shape = f" [T, B, {', '.join(map(str, inp.in_shape))}]" if inp is not None else ""
        raise ConfigError(f"{file.name} is not a neurosdm denoiser export: give its input with --input FILE "
                          f"(.npy/.npz{shape}, or NIR data)")
    name = engine or "torch"
    x = load_foreign_input(input, program)
    say(describe_discretisation(program, origin))
    say(f"running {file.name} on the {name} engine: {x.shape[0]} steps x {x.shape[1]} sample(s) from {input.name}")
    res, stats = simulate_foreign(program, x, name, device, record=record)
    stats.meta.update(input=str(input), graph_file=str(file))
    return name, res, stats


def simulate(file: Path, out: Path, engine: Optional[str] = None, num_images: int = 4, sampler: str = "ddim",
             steps: int = 20, seed: int = 0, eta: float = 0.0, order: int = 3, gamma_file: Optional[Path] = None,
             batch_size: int = 16, device: str = "cpu", save_spikes: bool = False,
             threshold_scale: Optional[float] = None, steps_schedule: Optional[str] = None,
             input: Optional[Path] = None, dt: Optional[float] = None,
             method: Optional[str] = None, reset: Optional[str] = None, comparison: Optional[str] = None,
             progress: Optional[Callable[[str], Callable]] = None, say: Say = lambda line: None
             ) -> Optional[Simulation]:
    """``neurosdm simulate``: a denoiser export generates images inside the sampler (images.npy, images.png,
    stats.json; under torchrun each rank runs its share and rank 0 merges, the others return None); a foreign graph
    runs once on ``input`` (outputs.npz, stats.json). ``save_spikes``: also spikes.nird. ``progress(description)``
    makes the progress wrapper of the denoiser run."""
    check_device(device)
    if threshold_scale is not None:
        C.check_positive("--threshold-scale", threshold_scale)
    C.check_count("--num-images", num_images)
    check_output_dir(out)  # before the work, not after it
    program, origin = load_any(file, dt, method, reset, comparison)
    if origin is not None:
        if threshold_scale is not None:
            raise ConfigError("--threshold-scale needs a neurosdm denoiser export (its metadata records the "
                              "threshold)")
        if steps_schedule is not None:
            raise ConfigError("--steps-schedule needs a neurosdm denoiser export (it runs inside the sampler)")
        name, res, stats = run_foreign(file, program, origin, engine, input, device, save_spikes, say)
        with output_set(out) as stage:  # the files appear together or not at all
            save_foreign_outputs(res, stage / "outputs.npz")
            stats.save(stage / "stats.json")
            layers = save_foreign_spikes_nird(res, program, stage / "spikes.nird") if save_spikes else None
        return Simulation(name, stats, foreign=True, spike_layers=layers)
    if input is not None:
        raise ConfigError("--input is for foreign graphs; a neurosdm denoiser export generates images from noise")
    engine = engine or "event"
    table = check_sampler(sampler, order, gamma_file, file, steps)
    with process_group(device) as world, np.errstate(all="ignore"):  # under torchrun: each rank runs its share,
        # rank 0 merges; overflows are not warned about value by value: non-finite images are refused below
        res = simulate_sharded(program, engine, num_images, sampler, steps, seed, eta, batch_size, world.device,
                               record=save_spikes, threshold_scale=threshold_scale, steps_schedule=steps_schedule,
                               progress=progress(f"{engine} engine") if progress and world.is_main else None,
                               world=world, shard_dir=out, order=order, gamma=table)
    if res is None:
        return None
    images, stats, den = res
    if not torch.isfinite(images).all():  # never a silent NaN: nothing is written
        raise GraphError(f"{file.name} produced NaN or infinite images (weights or parameters out of range?); "
                         "nothing was written")
    with output_set(out) as stage:  # the files appear together or not at all
        save_npy(images.numpy(), stage / "images.npy")
        save_png(image_grid(images.numpy()), stage / "images.png")
        stats.save(stage / "stats.json")
        if save_spikes:
            save_spikes_nird(den, program, stage / "spikes.nird")
    return Simulation(engine, stats, foreign=False)


def energy_report(file: Path, profile: str = "loihi2", baseline: str = "cmos45-fp32", host: Optional[str] = None,
                  graph: Optional[Path] = None, num_images: int = 1, steps: int = 10, seed: int = 0,
                  input: Optional[Path] = None, dt: Optional[float] = None, method: Optional[str] = None,
                  reset: Optional[str] = None, comparison: Optional[str] = None,
                  say: Say = lambda line: None, mapping: str = "auto") -> dict:
    """``neurosdm energy``: the counts (a stats.json of ``neurosdm simulate``; or the event engine on a denoiser
    .nir, DDIM; or the torch engine on a foreign .nir with ``input``), priced on ``profile``
    (:func:`neurosdm.energy.estimate`; with ``mapping="auto"`` and a graph, on the mapping of
    :func:`neurosdm.hardware.routing.try_map`, else the profile's lower bound; ``mapping_note`` says which), with
    the ANN baseline on ``baseline`` when the denoiser graph is known (:func:`neurosdm.energy.with_ann_baseline`).
    Returns the report dict (``foreign``: True for a foreign graph)."""
    if not file.exists():
        raise ConfigError(f"file not found: {file}")
    regular_file(file, "input", ConfigError)  # a FIFO would block: never opened
    for name in (profile, host, baseline):  # the profiles first: a bad one fails before the work
        if name is not None:
            load_profile(name)
    program = graph_program = None
    if mapping not in ("auto", "none"):
        raise ConfigError(f"--mapping must be auto or none, got {mapping!r}")
    if file.suffix == ".json":
        try:
            stats = RunStats.load(file)
        except (KeyError, ValueError, TypeError) as e:
            raise ConfigError(f"{file} is not a RunStats file written by `neurosdm simulate`: {e}") from None
        if graph is not None:
            program = graph_program = load_program(graph)
            if not is_denoiser_export(program):
                program = None  # a foreign graph: no ANN baseline
    else:
        program, origin = load_any(file, dt, method, reset, comparison)
        graph_program = program
        if origin is not None:
            _, _, stats = run_foreign(file, program, origin, None, input, "cpu", False, say)
            program = None
        else:
            if input is not None:
                raise ConfigError("--input is for foreign graphs; a neurosdm denoiser export generates from noise")
            say(f"simulating {file.name} on the event engine: {num_images} image(s), DDIM {steps} steps, seed {seed}")
            _, stats, _ = simulate_images(program, "event", num_images, "ddim", steps, seed)
    mapped, note = try_map(graph_program, profile) if mapping == "auto" and graph_program is not None else \
        (None, "no mapping (--mapping none, or stats.json without --graph): the time is the profile's lower bound")
    report = estimate(stats, profile, host, mapping=mapped)
    report["mapping_note"] = note
    if stats.meta.get("graph") == "foreign":
        report["foreign"] = True
    if program is not None:
        report = with_ann_baseline(report, program, baseline)
    return report

