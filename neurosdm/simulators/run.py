"""Whole generations on an exported graph: an engine inside the DDPM/DDIM sampler, counted.

``simulate(program, engine="event", num_images=4, sampler="ddim", steps=20, seed=0)`` returns the images and a
:class:`~neurosdm.simulators.stats.RunStats`. The images use the same noise as the GPU path: the sampler loop is
:func:`neurosdm.sample.generate`, image ``i`` drawing ``x_T`` and its per-step noise from its own stream
(:mod:`neurosdm.diffusion.noise`), so the same seed gives comparable images on every path and image ``i`` does
not depend on the batch size or on how the images are split across processes. :func:`simulate_sharded` splits
a run across torchrun processes (:mod:`neurosdm.distributed`) and sums their counts (:func:`merge_stats`).

Host work (``RunStats.host``, per denoising step, all images): the input encoding of a quantised graph (1 op per
pixel), the readout/host head (:func:`host_counts`) and the sampler's update
(:func:`neurosdm.diffusion.samplers.host_ops_schedule` per pixel).
"""

from __future__ import annotations

import nir
import numpy as np
import torch

from neurosdm.config import Config, DiffusionConfig, ModelConfig, check_count, check_memory, check_positive
from neurosdm.diffusion.samplers import host_ops_schedule
from neurosdm.distributed import World, gather_shards
from neurosdm.errors import ConfigError, GraphError
from neurosdm.graph.dialect import (as_str, meta_value, quantize_input, read_steps_schedule, steps_schedule_table,
                                    tables_vary_per_step)
from neurosdm.graph.host import HostHead, eps_from_outputs
from neurosdm.graph.program import Program
from neurosdm.io import atomic_buffer
from neurosdm.quantize import threshold_units
from neurosdm.sample import generate
from neurosdm.simulators.event import EventEngine
from neurosdm.simulators.stats import RunStats, add_counts
from neurosdm.simulators.torch_engine import TorchEngine

__all__ = ["ENGINES", "make_engine", "GraphDenoiser", "simulate", "simulate_sharded", "merge_stats", "host_counts",
           "config_of", "apply_threshold_scale", "save_spikes_nird", "is_denoiser_export", "steps_schedule_of",
           "split_by_steps"]

ENGINES = ("event", "torch")


def make_engine(name: str, program: Program, device: str = "cpu", dtype: torch.dtype = torch.float64):
    """An engine by name: ``"event"`` (event-driven, numpy/numba, CPU) or ``"torch"`` (clocked, dense, CPU/CUDA)."""
    if name == "event":
        if str(device) != "cpu":
            raise ConfigError("the event engine runs on the CPU; use --engine torch for --device cuda")
        return EventEngine(program)
    if name == "torch":
        return TorchEngine(program, device=device, dtype=dtype)
    raise ConfigError(f"unknown engine {name!r}; choose one of: {', '.join(ENGINES)}")


def config_of(program: Program) -> Config:
    """The image shape and diffusion schedule of an exported graph, as a :class:`Config` for the samplers."""
    md = program.metadata
    if "image_shape" not in md or "diffusion" not in md:
        raise ConfigError("this NIR file has no image shape or diffusion schedule in its metadata: it is not a "
                          "neurosdm denoiser export (use a file written by `neurosdm export`)")
    c, h, w = (int(v) for v in np.asarray(md["image_shape"]).reshape(-1))
    d = md["diffusion"]
    diffusion = DiffusionConfig(schedule=str(meta_value(d, "schedule")),
                                num_diffusion_steps=int(meta_value(d, "num_diffusion_steps")),
                                beta_start=float(meta_value(d, "beta_start")),
                                beta_end=float(meta_value(d, "beta_end")))
    return Config(ModelConfig(img_ch=c, image_size=h, num_steps=program.num_steps,
                              num_diffusion_steps=diffusion.num_diffusion_steps), diffusion)


def apply_threshold_scale(program: Program, scale: float) -> Program:
    """Threshold guidance at simulation time (SDM): every IF layer fires at ``threshold * scale`` instead of the
    exported ``threshold * metadata["threshold_scale"]``; in place, returns ``program``. A float graph gets
    ``threshold * scale``; an int8 graph ``ceil(threshold * scale / 2**state_exponent)`` (the exporter's rule).
    Only for neurosdm exports: one shared threshold (``metadata["threshold"]``), or per-layer thresholds of a float
    converted SNN (``metadata["if_thresholds"]``, ``v_init``: each layer's ``theta * scale``, stored shifted)."""
    scale = check_positive("--threshold-scale", scale)
    md = program.metadata
    if "if_thresholds" in md:  # per-layer thresholds, membranes stored shifted (a converted SNN, exporters.nir)
        if isinstance(md.get("quant"), dict):
            raise ConfigError("threshold guidance at simulation time is not available for an int8 export with "
                              "per-layer thresholds (a converted SNN): simulate its float export, or set the scale "
                              "on the model before exporting")
        a, base = float(np.asarray(md.get("v_init", 0.0))), float(np.asarray(md.get("threshold_scale", 1.0)))
        theta = {k: float(np.asarray(v)) / base * scale for k, v in md["if_thresholds"].items()}
        for layer in program.layers:
            if layer.kind == "if":  # v_threshold = (1 - a) theta, v_reset = -a theta (the exporter's rule)
                n = layer.neuron
                n.threshold = np.full(layer.in_shape, (1.0 - a) * theta[layer.name])
                n.v_reset = np.full(layer.in_shape, -a * theta[layer.name])
        program.metadata = dict(md, threshold_scale=scale, v_threshold=max(theta.values()))
        return program
    if "threshold" not in md:
        raise ConfigError("threshold guidance needs a neurosdm export (its metadata records the base threshold)")
    theta = float(np.asarray(md["threshold"])) * scale
    for layer in program.layers:
        if layer.kind != "if":
            continue
        if program.fixed is not None:
            layer.threshold_int = np.full(layer.in_shape, int(threshold_units(
                theta, program.fixed.unit("state_exponent"))), np.int64)
        else:
            layer.neuron.threshold = np.full(layer.in_shape, theta)
    program.metadata = dict(md, threshold_scale=scale, v_threshold=theta)
    return program


def steps_schedule_of(program: Program, override: str | None = None) -> str | None:
    """The spiking-steps schedule a denoiser run uses: ``override`` (an option's text; "" for none) or the graph's
    ``metadata["steps_schedule"]``, checked against the graph (:func:`neurosdm.graph.dialect.read_steps_schedule`:
    TSM scale tables bound the step counts; a converted SNN's spiking head with a mean readout runs its own
    ``num_steps`` only). Returns the text, or None for ``num_steps`` at every call."""
    md = dict(program.metadata)
    if override is not None:
        if not override:
            return None
        try:
            md["steps_schedule"] = steps_schedule_table(override, program.num_diffusion_steps)
        except ConfigError as e:
            raise ConfigError(f"--steps-schedule: {e}") from None
    fixed = as_str(md.get("head")) == "spiking" and as_str(md.get("readout_mode", "leaky")) == "mean"
    try:
        return read_steps_schedule(md, program.num_steps, tables_vary_per_step(md), fixed)
    except GraphError as e:
        if override is None:
            raise
        raise ConfigError(str(e).replace("metadata steps_schedule", "--steps-schedule")) from None


def host_counts(program: Program, batch: int, num_steps: int | None = None) -> dict[str, int]:
    """Host work of one denoiser call (per batch): input encoding (quantised graphs), output scaling (quantised),
    and the SDM head (``host_head``: tail BN, Swish, tail conv, T_output conv, last BN, Swish, residual add,
    TSM scale, leaky readout; dense multiply-accumulates and element-wise operations per spiking step, or once on
    the time-averaged input for a converted model's mean readout, ``host_head["average_input"]``). ``num_steps``:
    the spiking steps of the call (a steps schedule), default ``program.num_steps``."""
    md = program.metadata
    k = num_steps or program.num_steps
    c, h, w = (int(v) for v in np.asarray(md["image_shape"]).reshape(-1))
    pixels = c * h * w
    quant = program.fixed is not None
    out_size = int(np.prod(program.by_name[program.outputs[0]].out_shape))
    macs = 0
    elem = pixels if quant else 0  # input encoding
    head = HostHead.from_metadata(md)
    if head is not None:
        ch = head.channels
        averaged = head.average_input  # readout "mean": the head runs once
        head_steps = 1 if averaged else k
        macs = head_steps * h * w * 9 * (ch * c + c * c)
        # tail BN+Swish; last BN+Swish+add; TSM; readout (and the time average of the input: k adds/multiplies)
        elem += head_steps * (ch * h * w * 3 + pixels * (3 + 1 + 1) + pixels * 2) + (k * ch * h * w if averaged else 0)
        elem += k * out_size if quant else 0
    else:
        elem += out_size if quant else 0  # the last step's membrane, scaled
    return {"host_macs": batch * macs, "host_elementwise": batch * elem}


class GraphDenoiser:
    """``eps = denoiser(x_t, t)`` of an exported graph on an engine, for the samplers; accumulates the engine's
    counts and the host's per diffusion step (summed over batches) and, with ``record``, spike records."""

    training = False

    def __init__(self, program: Program, engine, record: bool = False, on_result=None):
        """``on_result(step, x_encoded, result)``, if given, sees every engine result (with records)."""
        self.program, self.engine, self.record, self.on_result = program, engine, record, on_result
        self.counts: dict[int, dict] = {}
        self.host: dict[int, dict[str, int]] = {}
        self.records: dict[int, list[dict]] = {}
        self.images = 0
        self.steps: int | None = None  # spiking steps of the next call (a steps schedule); None: num_steps
        self.steps_at: dict[int, int] = {}  # spiking steps run at each diffusion step

    def set_spiking_steps(self, steps: int | None) -> None:
        """Run ``steps`` spiking steps per call from now on (None: ``program.num_steps``), as
        :meth:`neurosdm.models.SpikingUNet.set_spiking_steps`; :class:`neurosdm.sample.Scheduled` calls it."""
        self.steps = None if steps is None else int(steps)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ts = set(int(v) for v in t.reshape(-1).tolist())
        if len(ts) != 1:
            raise ConfigError("an exported graph runs one diffusion step per call")
        step = ts.pop()
        md = self.program.metadata
        xs = x.detach().double().cpu().numpy()
        if self.program.fixed is not None:
            xs, _ = quantize_input(xs, md)
        k = self.steps or self.program.num_steps
        self.steps_at[step] = k
        res = self.engine.run(xs, step, record=self.record or self.on_result is not None, num_steps=k)
        if self.on_result is not None:
            self.on_result(step, xs, res)
        eps = eps_from_outputs(res["outputs"][self.program.outputs[0]], md)
        add_counts(self.counts.setdefault(step, {}), res["counts"])
        host = self.host.setdefault(step, {})
        for key, v in host_counts(self.program, xs.shape[0], k).items():
            host[key] = host.get(key, 0) + v
        if self.record:
            self.records.setdefault(step, []).append(res["records"])
        return torch.from_numpy(eps).to(dtype=x.dtype, device=x.device)

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def stats(self, sampler: str, eta: float, images: int, order: int = 3) -> RunStats:
        """The RunStats of everything run so far, network calls in sampling order (largest t first; every call of a
        run is at a different t, DPM-Solver's intermediate ones included). ``order``: DPM-Solver's, for the host
        work of each call (:func:`neurosdm.diffusion.samplers.host_ops_schedule`)."""
        config = config_of(self.program)
        pixels = config.model.img_ch * config.model.image_size ** 2
        kinds = {layer.name: layer.kind for layer in self.program.layers}
        calls = sorted(self.counts, reverse=True)
        width = max([self.steps_at.get(t, self.program.num_steps) for t in calls] or [self.program.num_steps])
        stats = RunStats(width, images=images, layer_kinds=kinds)
        ops = host_ops_schedule(sampler, len(calls), eta, True, order=order)
        for i, t in enumerate(calls):
            host = dict(self.host[t])
            host["host_elementwise"] += images * pixels * ops[i]
            counts = self.counts[t]
            if self.steps_at.get(t, width) != width:  # a shorter call (a steps schedule): zeros after its last step
                counts = {layer: {c: np.pad(v, (0, width - len(v))) for c, v in cs.items()}
                          for layer, cs in counts.items()}
            stats.add_call(t, counts, host)
        if any(k != width for k in self.steps_at.values()):
            stats.meta["spiking_steps_per_call"] = [int(self.steps_at[t]) for t in calls]
        return stats


def simulate(program: Program, engine: str = "event", num_images: int = 4, sampler: str = "ddim",
             steps: int = 20, seed: int = 0, eta: float = 0.0, batch_size: int = 16, device: str = "cpu",
             record: bool = False, progress=None, on_result=None, threshold_scale: float | None = None,
             first_image: int = 0, order: int = 3, gamma=None, dtype: torch.dtype = torch.float64,
             steps_schedule: str | None = None):
    """Generate ``num_images`` images on ``engine`` (``dtype``: the torch engine's, float64 or float32 for float
    graphs). Returns ``(images [N, C, H, W] float32 in [-1, 1], RunStats,
    denoiser)`` (the denoiser holds the spike records when ``record``). ``threshold_scale``: threshold guidance
    (:func:`apply_threshold_scale`; changes ``program``). ``first_image``: the index of the first image in the run
    (images ``first_image ..``, see :func:`neurosdm.sample.generate`; a shard of a larger run). ``sampler``: any of
    :data:`neurosdm.diffusion.samplers.SAMPLERS`; ``order`` (DPM-Solver) and ``gamma`` (the analytic samplers' table)
    as in :func:`neurosdm.sample.generate`. ``steps_schedule``: spiking steps per diffusion step (text, "" for none;
    default: the graph's ``metadata["steps_schedule"]``, :func:`steps_schedule_of`); the counts of a shorter call
    are zero after its last step and ``stats.meta["spiking_steps_per_call"]`` lists every call's steps."""
    check_count("--num-images", num_images)
    schedule = steps_schedule_of(program, steps_schedule)
    config = config_of(program)
    m = config.model
    check_memory(f"{num_images} images of {m.img_ch}x{m.image_size}x{m.image_size}",
                 12 * num_images * m.img_ch * m.image_size ** 2)  # the rule of neurosdm.sample.sample_to_dir
    if threshold_scale is not None:
        apply_threshold_scale(program, threshold_scale)
    eng = make_engine(engine, program, device=device, dtype=dtype)
    den = GraphDenoiser(program, eng, record=record, on_result=on_result)
    images = generate(den, config, num_images, seed=seed, sampler=sampler, num_sample_steps=steps, eta=eta,
                      batch_size=batch_size, progress=progress, first_image=first_image, order=order, gamma=gamma,
                      steps_schedule=schedule or "")
    stats = den.stats(sampler, eta, num_images, order)
    stats.meta.update(engine=engine, sampler=sampler, steps=int(steps), seed=int(seed), eta=float(eta),
                      **({"order": int(order)} if sampler == "dpm-solver" else {}),
                      batch_size=int(batch_size), quantized=str(meta_value(program.metadata, "quantized", "none")),
                      threshold_scale=float(np.asarray(program.metadata.get("threshold_scale", 1.0))),
                      source_checkpoint=str(meta_value(program.metadata, "source_checkpoint", "")),
                      **({"steps_schedule": schedule} if schedule else {}))
    return images, stats, den


def split_by_steps(stats: RunStats) -> list[RunStats]:
    """A run of a steps schedule as one RunStats per spiking-step count ``K`` (``stats.meta
    ["spiking_steps_per_call"]``): the calls with ``K`` steps, counters cut to ``[calls, K]`` (the zero padding
    dropped), so that anything priced per spiking step (barriers, static power over time) counts ``K`` steps per
    call. Every count lands in exactly one part. A run without a schedule is returned whole."""
    per_call = stats.meta.get("spiking_steps_per_call")
    if not per_call:
        return [stats]
    parts = []
    for k in sorted(set(per_call)):
        idx = [i for i, v in enumerate(per_call) if v == k]
        layers = {layer: {c: v[idx, :k] for c, v in cs.items()} for layer, cs in stats.layers.items()}
        host = {c: v[idx] for c, v in stats.host.items()}
        meta = {key: v for key, v in stats.meta.items() if key != "spiking_steps_per_call"}
        parts.append(RunStats(int(k), stats.images, [stats.timesteps[i] for i in idx], layers, host,
                              dict(stats.layer_kinds), meta))
    return parts


def merge_stats(parts: list[RunStats]) -> RunStats:
    """The RunStats of one run made of ``parts`` (disjoint sets of images, same graph, sampler and steps): every
    counter summed exactly, ``[denoising_steps, num_steps]`` per layer and ``[denoising_steps]`` per host counter
    (all counts are sums over images, so the parts add up to the one-process run); ``images`` summed; timesteps,
    layer kinds and ``meta`` from the first part. Parts without images are skipped."""
    parts = [p for p in parts if p.images > 0]
    if not parts:
        raise ConfigError("no images to merge")
    first = parts[0]
    for p in parts[1:]:
        if p.timesteps != first.timesteps or p.num_steps != first.num_steps:
            raise ConfigError(f"cannot merge RunStats of different runs: timesteps {p.timesteps} vs "
                              f"{first.timesteps}, num_steps {p.num_steps} vs {first.num_steps}")
    layers: dict = {}
    host: dict = {"host": {}}
    for p in parts:
        add_counts(layers, p.layers)
        add_counts(host, {"host": p.host})
    return RunStats(first.num_steps, sum(p.images for p in parts), list(first.timesteps), layers, host["host"],
                    dict(first.layer_kinds), dict(first.meta))


def simulate_sharded(program: Program, engine: str = "event", num_images: int = 4, sampler: str = "ddim",
                     steps: int = 20, seed: int = 0, eta: float = 0.0, batch_size: int = 16, device: str = "cpu",
                     record: bool = False, progress=None, threshold_scale: float | None = None,
                     world: World | None = None, shard_dir=".", on_result=None, order: int = 3, gamma=None,
                     steps_schedule: str | None = None):
    """:func:`simulate` across torchrun processes: this rank runs its share of the images
    (:meth:`neurosdm.distributed.World.shard`, whole batches), rank 0 gathers the shards (files in ``shard_dir``,
    :func:`neurosdm.distributed.gather_shards`), concatenates the images in index order and sums the counts
    (:func:`merge_stats`). Returns ``(images, RunStats, denoiser)`` on rank 0, images and counts equal to a
    one-process run with the same ``batch_size``, and ``None`` on the other ranks. In a one-process world (no
    torchrun) this is :func:`simulate`; sharded, there are no spike records (``record`` is refused) and the
    denoiser is ``None``."""
    world = world or World()
    if world.size == 1:
        return simulate(program, engine, num_images, sampler, steps, seed, eta, batch_size, device, record=record,
                        progress=progress, on_result=on_result, threshold_scale=threshold_scale, order=order,
                        gamma=gamma, steps_schedule=steps_schedule)
    if record:
        raise ConfigError("--save-spikes is not sharded: run `neurosdm simulate --save-spikes` without torchrun")
    check_count("--num-images", num_images)
    mine = world.shard(num_images, batch_size)
    if len(mine):
        images, stats, _ = simulate(program, engine, len(mine), sampler, steps, seed, eta, batch_size, device,
                                    progress=progress, on_result=on_result, threshold_scale=threshold_scale,
                                    first_image=mine.start, order=order, gamma=gamma, steps_schedule=steps_schedule)
    else:  # more ranks than batches: nothing to run here
        m = config_of(program).model
        images, stats = torch.empty(0, m.img_ch, m.image_size, m.image_size), RunStats(program.num_steps)
    parts = gather_shards(world, shard_dir, {"images": images.numpy()}, stats.to_dict())
    if parts is None:
        return None
    merged = merge_stats([RunStats.from_dict(meta) for _, meta in parts])
    return torch.from_numpy(np.concatenate([p["images"] for p, _ in parts])), merged, None


def save_spikes_nird(den: GraphDenoiser, program: Program, path) -> None:
    """Spike records of every IF layer as NIR data (``nir.write_data``): per layer a ``TimeGriddedData`` of bools
    ``[images, denoising_steps * num_steps, neurons]`` (sampling order, spiking steps innermost), dt from the
    graph."""
    order = sorted(den.records, reverse=True)
    nodes = {}
    for layer in program.layers:
        if layer.kind != "if":
            continue
        per_step = []
        for t in order:
            batches = [r[layer.name] for r in den.records[t]]  # each [K, B, ...]
            arr = np.concatenate(batches, axis=1)
            per_step.append(arr.reshape(arr.shape[0], arr.shape[1], -1))
        data = np.concatenate(per_step, axis=0).transpose(1, 0, 2) > 0  # [images, D*K, neurons]
        nodes[layer.name] = nir.NIRNodeData({"spikes": nir.TimeGriddedData(data, float(program.disc.dt))})
    with atomic_buffer(path) as buffer:  # HDF5 in memory: a full disk is a clean error, not a crash
        nir.write_data(buffer, nir.NIRGraphData(nodes))


def is_denoiser_export(source) -> bool:
    """Whether a Program (or its metadata dict) is a neurosdm denoiser export (image shape and diffusion
    schedule in its metadata), i.e. whether the sampler path (:func:`simulate`) applies."""
    md = source.metadata if isinstance(source, Program) else dict(source or {})
    return "image_shape" in md and "diffusion" in md
