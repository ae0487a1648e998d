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

from typing import TYPE_CHECKING

import numpy as np
import torch

from neurosdm.config import Config, DiffusionConfig, ModelConfig
from neurosdm.exporters.nir import meta_value as _meta
from neurosdm.errors import ConfigError
from neurosdm.simulators.program import Program
from neurosdm.simulators.stats import RunStats, add_counts

if TYPE_CHECKING:
    from neurosdm.distributed import World

__all__ = ["ENGINES", "make_engine", "GraphDenoiser", "simulate", "simulate_sharded", "merge_stats", "host_counts",
           "config_of",
           "apply_threshold_scale", "is_denoiser_export", "foreign_discretisation", "load_foreign_input",
           "simulate_foreign", "save_foreign_outputs", "save_foreign_spikes_nird",
           "load_any", "describe_discretisation", "FOREIGN_DEFAULTS"]

ENGINES = ("event", "torch")


def make_engine(name: str, program: Program, device: str = "cpu", dtype: torch.dtype = torch.float64):
    """An engine by name: ``"event"`` (event-driven, numpy/numba, CPU) or ``"torch"`` (clocked, dense, CPU/CUDA)."""
    if name == "event":
        if str(device) != "cpu":
            raise ConfigError("the event engine runs on the CPU; use --engine torch for --device cuda")
        from neurosdm.simulators.event import EventEngine

        return EventEngine(program)
    if name == "torch":
        from neurosdm.simulators.torch_engine import TorchEngine

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
    diffusion = DiffusionConfig(schedule=str(_meta(d, "schedule")), num_diffusion_steps=int(_meta(d, "num_diffusion_steps")),
                                beta_start=float(_meta(d, "beta_start")), beta_end=float(_meta(d, "beta_end")))
    return Config(ModelConfig(img_ch=c, image_size=h, num_steps=program.num_steps,
                              num_diffusion_steps=diffusion.num_diffusion_steps), diffusion)


def apply_threshold_scale(program: Program, scale: float) -> Program:
    """Threshold guidance at simulation time (SDM): every IF layer fires at ``threshold * scale`` instead of the
    exported ``threshold * metadata["threshold_scale"]``; in place, returns ``program``. A float graph gets
    ``threshold * scale``; an int8 graph ``ceil(threshold * scale / 2**state_exponent)`` (the exporter's rule).
    Only for neurosdm exports: one shared threshold (``metadata["threshold"]``), or per-layer thresholds of a float
    converted SNN (``metadata["if_thresholds"]``, ``v_init``: each layer's ``theta * scale``, stored shifted)."""
    scale = float(scale)
    if not np.isfinite(scale) or scale <= 0:
        raise ConfigError(f"--threshold-scale must be a positive number, got {scale}")
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
                layer.threshold = np.full_like(layer.threshold, (1.0 - a) * theta[layer.name])
                layer.v_reset = np.full_like(layer.v_reset, -a * theta[layer.name])
        program.metadata = dict(md, threshold_scale=scale, v_threshold=max(theta.values()))
        return program
    if "threshold" not in md:
        raise ConfigError("threshold guidance needs a neurosdm export (its metadata records the base threshold)")
    theta = float(np.asarray(md["threshold"])) * scale
    quant = md.get("quant")
    if isinstance(quant, dict):
        from neurosdm.quantize import threshold_units

        value = float(threshold_units(theta, int(np.asarray(quant["state_exponent"]))))
    else:
        value = theta
    for layer in program.layers:
        if layer.kind == "if":
            layer.threshold = np.full_like(layer.threshold, value)
    program.metadata = dict(md, threshold_scale=scale, v_threshold=theta)
    return program


def host_counts(program: Program, batch: int) -> dict[str, int]:
    """Host work of one denoiser call (per batch): input encoding (quantised graphs), output scaling (quantised),
    and the SDM head (``host_head``: tail BN, Swish, tail conv, T_output conv, last BN, Swish, residual add,
    TSM scale, leaky readout; dense multiply-accumulates and element-wise operations per spiking step, or once on
    the time-averaged input for a converted model's mean readout, ``host_head["average_input"]``)."""
    md = program.metadata
    k = program.num_steps
    c, h, w = (int(v) for v in np.asarray(md["image_shape"]).reshape(-1))
    pixels = c * h * w
    quant = isinstance(md.get("quant"), dict)
    out_size = int(np.prod(program.by_name[program.outputs[0]].out_shape))
    macs = 0
    elem = pixels if quant else 0  # input encoding
    if _meta(md, "head") == "sdm":
        hh = md["host_head"]
        ch = int(np.asarray(hh["tail_bn_scale"]).size)
        averaged = bool(float(np.asarray(hh.get("average_input", 0.0))))  # readout "mean": the head runs once
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

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        from neurosdm.exporters.fixed_point import quantize_input
        from neurosdm.exporters.nir import eps_from_outputs

        ts = set(int(v) for v in t.reshape(-1).tolist())
        if len(ts) != 1:
            raise ConfigError("an exported graph runs one diffusion step per call")
        step = ts.pop()
        md = self.program.metadata
        xs = x.detach().double().cpu().numpy()
        if isinstance(md.get("quant"), dict):
            xs, _ = quantize_input(xs, md)
        res = self.engine.run(xs, step, record=self.record or self.on_result is not None)
        if self.on_result is not None:
            self.on_result(step, xs, res)
        eps = eps_from_outputs(res["outputs"][self.program.outputs[0]], md)
        add_counts(self.counts.setdefault(step, {}), res["counts"])
        host = self.host.setdefault(step, {})
        for key, v in host_counts(self.program, xs.shape[0]).items():
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
        from neurosdm.diffusion.samplers import host_ops_schedule

        config = config_of(self.program)
        pixels = config.model.img_ch * config.model.image_size ** 2
        kinds = {layer.name: layer.kind for layer in self.program.layers}
        stats = RunStats(self.program.num_steps, images=images, layer_kinds=kinds)
        calls = sorted(self.counts, reverse=True)
        ops = host_ops_schedule(sampler, len(calls), eta, True, order=order)
        for i, t in enumerate(calls):
            host = dict(self.host[t])
            host["host_elementwise"] += images * pixels * ops[i]
            stats.add_call(t, self.counts[t], host)
        return stats


def simulate(program: Program, engine: str = "event", num_images: int = 4, sampler: str = "ddim",
             steps: int = 20, seed: int = 0, eta: float = 0.0, batch_size: int = 16, device: str = "cpu",
             record: bool = False, progress=None, on_result=None, threshold_scale: float | None = None,
             first_image: int = 0, order: int = 3, gamma=None):
    """Generate ``num_images`` images on ``engine``. Returns ``(images [N, C, H, W] float32 in [-1, 1], RunStats,
    denoiser)`` (the denoiser holds the spike records when ``record``). ``threshold_scale``: threshold guidance
    (:func:`apply_threshold_scale`; changes ``program``). ``first_image``: the index of the first image in the run
    (images ``first_image ..``, see :func:`neurosdm.sample.generate`; a shard of a larger run). ``sampler``: any of
    :data:`neurosdm.diffusion.samplers.SAMPLERS`; ``order`` (DPM-Solver) and ``gamma`` (the analytic samplers' table)
    as in :func:`neurosdm.sample.generate`."""
    from neurosdm.sample import generate

    if num_images < 1:
        raise ConfigError(f"--num-images must be at least 1, got {num_images}")
    config = config_of(program)
    if threshold_scale is not None:
        apply_threshold_scale(program, threshold_scale)
    eng = make_engine(engine, program, device=device)
    den = GraphDenoiser(program, eng, record=record, on_result=on_result)
    images = generate(den, config, num_images, seed=seed, sampler=sampler, num_sample_steps=steps, eta=eta,
                      batch_size=batch_size, progress=progress, first_image=first_image, order=order, gamma=gamma)
    stats = den.stats(sampler, eta, num_images, order)
    stats.meta.update(engine=engine, sampler=sampler, steps=int(steps), seed=int(seed), eta=float(eta),
                      **({"order": int(order)} if sampler == "dpm-solver" else {}),
                      batch_size=int(batch_size), quantized=str(_meta(program.metadata, "quantized", "none")),
                      threshold_scale=float(np.asarray(program.metadata.get("threshold_scale", 1.0))),
                      source_checkpoint=str(_meta(program.metadata, "source_checkpoint", "")))
    return images, stats, den


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
                     world: World | None = None, shard_dir=".", on_result=None, order: int = 3, gamma=None):
    """:func:`simulate` across torchrun processes: this rank runs its share of the images
    (:meth:`neurosdm.distributed.World.shard`, whole batches), rank 0 gathers the shards (files in ``shard_dir``,
    :func:`neurosdm.distributed.gather_shards`), concatenates the images in index order and sums the counts
    (:func:`merge_stats`). Returns ``(images, RunStats, denoiser)`` on rank 0, images and counts equal to a
    one-process run with the same ``batch_size``, and ``None`` on the other ranks. In a one-process world (no
    torchrun) this is :func:`simulate`; sharded, there are no spike records (``record`` is refused) and the
    denoiser is ``None``."""
    from neurosdm.distributed import World, gather_shards

    world = world or World()
    if world.size == 1:
        return simulate(program, engine, num_images, sampler, steps, seed, eta, batch_size, device, record=record,
                        progress=progress, on_result=on_result, threshold_scale=threshold_scale, order=order,
                        gamma=gamma)
    if record:
        raise ConfigError("--save-spikes is not sharded: run `neurosdm simulate --save-spikes` without torchrun")
    if num_images < 1:
        raise ConfigError(f"--num-images must be at least 1, got {num_images}")
    mine = world.shard(num_images, batch_size)
    if len(mine):
        images, stats, _ = simulate(program, engine, len(mine), sampler, steps, seed, eta, batch_size, device,
                                    progress=progress, on_result=on_result, threshold_scale=threshold_scale,
                                    first_image=mine.start, order=order, gamma=gamma)
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
    import nir

    from neurosdm.io import atomic_path

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
    with atomic_path(path) as tmp:
        nir.write_data(tmp, nir.NIRGraphData(nodes))


# ------------------------------------------------------------------------------------------- foreign graphs
#
# A NIR graph that is not a neurosdm denoiser export (no ``image_shape`` / ``diffusion`` metadata) runs once on a
# time-varying input ``[T, B, *input_shape]`` read from a file; its RunStats hold that one call (``timesteps
# [0]``, ``num_steps = T``, ``images = B``, no host work), layers named by their NIR node names.

#: the discretisation a foreign graph gets when neither an option nor its metadata says otherwise
FOREIGN_DEFAULTS = {"dt": 1.0, "method": "euler", "reset": "zero", "comparison": ">="}
_META_KEYS = {"dt": "dt", "method": "discretisation", "reset": "reset", "comparison": "comparison"}


def is_denoiser_export(source) -> bool:
    """Whether a Program (or its metadata dict) is a neurosdm denoiser export (image shape and diffusion
    schedule in its metadata), i.e. whether the sampler path (:func:`simulate`) applies."""
    md = source.metadata if isinstance(source, Program) else dict(source or {})
    return "image_shape" in md and "diffusion" in md


def foreign_discretisation(metadata: dict | None, dt: float | None = None, method: str | None = None,
                           reset: str | None = None, comparison: str | None = None):
    """The :class:`~neurosdm.simulators.reference.Discretisation` of a foreign graph and where each field came
    from: options (not None) win over the graph's metadata (``dt``, ``discretisation``, ``reset``,
    ``comparison``), which wins over :data:`FOREIGN_DEFAULTS`. Returns ``(disc, {field: "option" | "metadata" |
    "default"})``."""
    from neurosdm.simulators.reference import Discretisation

    md = dict(metadata or {})
    options = {"dt": dt, "method": method, "reset": reset, "comparison": comparison}
    overrides = {k: v for k, v in options.items() if v is not None}
    disc = Discretisation.from_metadata(md, **overrides)
    origin = {k: "option" if k in overrides else "metadata" if _META_KEYS[k] in md else "default"
              for k in FOREIGN_DEFAULTS}
    return disc, origin


def load_any(path, dt: float | None = None, method: str | None = None, reset: str | None = None,
             comparison: str | None = None):
    """Read a NIR file once: ``(program, None)`` for a neurosdm denoiser export (its own discretisation; the
    options must be None), ``(program, origin)`` for a foreign graph (:func:`foreign_discretisation`)."""
    from neurosdm.simulators.program import _read, load_program

    graph = _read(path)
    if is_denoiser_export(graph.metadata or {}):
        given = [f"--{k}" for k, v in (("dt", dt), ("method", method), ("reset", reset), ("comparison", comparison))
                 if v is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: only for foreign graphs; a neurosdm denoiser export carries its "
                              "own discretisation")
        return load_program(graph), None
    disc, origin = foreign_discretisation(graph.metadata, dt, method, reset, comparison)
    return load_program(graph, disc=disc), origin


def describe_discretisation(program: Program, origin: dict) -> str:
    """One line: the discretisation of a foreign graph and where each value came from."""
    d = program.disc
    vals = {"dt": f"{d.dt:g}", "method": d.method, "reset": d.reset, "comparison": d.comparison}
    return "discretisation: " + ", ".join(f"{k} {v} ({origin[k]})" for k, v in vals.items()) + \
        f"; defaults: dt {FOREIGN_DEFAULTS['dt']:g}, {FOREIGN_DEFAULTS['method']}, reset " \
        f"{FOREIGN_DEFAULTS['reset']}, comparison {FOREIGN_DEFAULTS['comparison']}"


def _input_layer(program: Program):
    if len(program.inputs) != 1:
        raise ConfigError(f"a foreign graph needs exactly one Input node, this one has {sorted(program.inputs)}")
    return program.by_name[program.inputs[0]]


def load_foreign_input(path, program: Program) -> np.ndarray:
    """The input of a foreign graph's Input node as float64 ``[T, B, *input_shape]`` from

    - ``.npy``: ``[T, B, *shape]``, or ``[T, *shape]`` (one sample: B = 1);
    - ``.npz``: the same, its only array or the one named after the Input node, ``input`` or ``x``;
    - anything else: NIR data (``nir.read_data``): the node named after the Input node (or the file's only
      node), its only observable, a ``TimeGriddedData [samples, T, neurons]`` (``EventData`` is gridded with the
      graph's dt), neurons reshaped to the input shape.

    Raises a one-line :class:`ConfigError` that names the expected shape."""
    from pathlib import Path

    path = Path(path)
    inp = _input_layer(program)
    shape = tuple(int(v) for v in inp.in_shape)
    want = (f"expected [T, B, {', '.join(map(str, shape))}] or [T, {', '.join(map(str, shape))}] (one sample) "
            f"for Input node {inp.name!r} of shape {shape}")
    if not path.exists():
        raise ConfigError(f"input file not found: {path} ({want})")
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        try:
            loaded = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ConfigError(f"cannot read {path} as {suffix}: {e}") from None
        if suffix == ".npz":
            keys = list(loaded.keys())
            key = keys[0] if len(keys) == 1 else next((k for k in (inp.name, "input", "x") if k in keys), None)
            if key is None:
                raise ConfigError(f"{path} holds arrays {keys}; name the input array {inp.name!r}, 'input' or 'x' "
                                  f"or keep only one ({want})")
            arr = loaded[key]
        else:
            arr = loaded
        arr = np.asarray(arr)
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise ConfigError(f"input {path} has dtype {arr.dtype}, not numbers ({want})")
        arr = arr.astype(np.float64)
        if arr.ndim == 2 + len(shape) and tuple(arr.shape[2:]) == shape and arr.shape[0] >= 1 and arr.shape[1] >= 1:
            return arr
        if arr.ndim == 1 + len(shape) and tuple(arr.shape[1:]) == shape and arr.shape[0] >= 1:
            return arr[:, None]
        raise ConfigError(f"input {path.name} has shape {tuple(arr.shape)}; {want}")
    import nir

    try:
        data = nir.read_data(str(path))
    except Exception as e:  # h5py / nir raise many types for a file that is not NIR data
        raise ConfigError(f"cannot read {path} as .npy, .npz or NIR data (nir.read_data): "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    nodes = data.nodes
    name = inp.name if inp.name in nodes else (next(iter(nodes)) if len(nodes) == 1 else None)
    if name is None:
        raise ConfigError(f"NIR data {path.name} has nodes {sorted(nodes)}; none is the Input node {inp.name!r}")
    node = nodes[name]
    if not isinstance(node, nir.NIRNodeData) or len(node.observables) != 1:
        obs = sorted(getattr(node, "observables", {}) or {})
        raise ConfigError(f"NIR data {path.name}: node {name!r} must hold exactly one observable, it has {obs}")
    obs = next(iter(node.observables.values()))
    if isinstance(obs, nir.EventData):
        obs = obs.to_time_gridded(float(program.disc.dt))
    arr = np.asarray(obs.data, np.float64)  # [samples, T, neurons]
    if arr.ndim != 3 or arr.shape[2] != int(np.prod(shape)) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ConfigError(f"NIR data {path.name} node {name!r} has shape {tuple(arr.shape)}; expected [samples, T, "
                          f"{int(np.prod(shape))}] (neurons = the Input node {inp.name!r}'s shape {shape})")
    return arr.transpose(1, 0, 2).reshape(arr.shape[1], arr.shape[0], *shape)


def simulate_foreign(program: Program, x, engine: str = "torch", device: str = "cpu", record: bool = False):
    """Run a foreign graph once on ``x [T, B, *input_shape]`` from a zero state. Returns ``(result, RunStats)``:
    the engine's result (``outputs``, ``counts``, ``records``) and its counts as one call (``timesteps [0]``,
    ``num_steps T``, ``images B``, no host work). Both engines run every kind and give the same counts."""
    x = np.asarray(x, np.float64)
    inp = _input_layer(program)
    n = len(inp.in_shape)
    if x.ndim != 2 + n or tuple(x.shape[2:]) != tuple(inp.in_shape):
        raise ConfigError(f"input has shape {tuple(x.shape)}; expected [T, B, *{tuple(inp.in_shape)}] for Input node "
                          f"{inp.name!r}")
    eng = make_engine(engine, program, device=device)
    res = eng.run(x, 0, record=record)
    T, B = int(x.shape[0]), int(x.shape[1])
    kinds = {layer.name: layer.kind for layer in program.layers}
    stats = RunStats(T, images=B, layer_kinds=kinds)
    stats.add_call(0, res["counts"], {}, kinds)
    d = program.disc
    stats.meta.update(engine=engine, graph="foreign", input_node=inp.name, time_steps=T, batch=B,
                      dt=float(d.dt), method=d.method, reset=d.reset, comparison=d.comparison)
    return res, stats


def save_foreign_outputs(result: dict, path) -> None:
    """Every Output node's ``[T, B, ...]`` float64 array of an engine result, as ``.npz`` keyed by node name."""
    from neurosdm.io import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{name: np.asarray(v) for name, v in result["outputs"].items()})


def save_foreign_spikes_nird(result: dict, program: Program, path) -> list[str]:
    """The outputs of every spiking layer (``SPIKING`` kinds: IF, LIF, CubaLIF, Threshold) of a recorded engine
    result as NIR data: per layer (its NIR node name) a ``TimeGriddedData`` of bools ``[B, T, neurons]``, dt from
    the discretisation. Returns the layer names written."""
    import nir

    from neurosdm.io import atomic_path
    from neurosdm.simulators.program import SPIKING

    nodes = {}
    for layer in program.layers:
        if layer.kind not in SPIKING:
            continue
        rec = np.asarray(result["records"][layer.name])  # [T, B, ...]
        data = rec.reshape(rec.shape[0], rec.shape[1], -1).transpose(1, 0, 2) > 0
        nodes[layer.name] = nir.NIRNodeData({"spikes": nir.TimeGriddedData(data, float(program.disc.dt))})
    with atomic_path(path) as tmp:
        nir.write_data(tmp, nir.NIRGraphData(nodes))
    return list(nodes)
