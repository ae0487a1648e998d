"""Whole generations on an exported graph: an engine inside the DDPM/DDIM sampler, counted.

``simulate(program, engine="event", num_images=4, sampler="ddim", steps=20, seed=0)`` returns the images and a
:class:`~neurosdm.simulators.stats.RunStats`. The images use the same ``x_T`` and noise seeding as the GPU path
(:func:`neurosdm.sample.generate`), so the same seed gives comparable images on every path.

Host work (``RunStats.host``, per denoising step, all images): the input encoding of a quantised graph (1 op per
pixel), the readout/host head (:func:`host_counts`) and the sampler's update
(:func:`neurosdm.diffusion.samplers.host_ops_schedule` per pixel).
"""

from __future__ import annotations

import numpy as np
import torch

from neurosdm.config import Config, DiffusionConfig, ModelConfig
from neurosdm.errors import ConfigError
from neurosdm.simulators.program import Program
from neurosdm.simulators.stats import RunStats, add_counts

__all__ = ["ENGINES", "make_engine", "GraphDenoiser", "simulate", "host_counts", "config_of",
           "apply_threshold_scale"]

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


def _meta(md: dict, key: str, default=None):
    v = md.get(key, default)
    if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v.item()
    if isinstance(v, bytes):
        v = v.decode("utf8")
    return v


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
    Only for neurosdm exports (``metadata["threshold"]``), whose IF layers share one threshold."""
    scale = float(scale)
    if not np.isfinite(scale) or scale <= 0:
        raise ConfigError(f"--threshold-scale must be a positive number, got {scale}")
    md = program.metadata
    if "threshold" not in md:
        raise ConfigError("threshold guidance needs a neurosdm export (its metadata records the base threshold)")
    theta = float(np.asarray(md["threshold"])) * scale
    quant = md.get("quant")
    if isinstance(quant, dict):
        value = float(np.ceil(theta / 2.0 ** int(np.asarray(quant["state_exponent"]))))
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
    TSM scale, leaky readout; dense multiply-accumulates and element-wise operations per spiking step)."""
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
        macs = k * h * w * 9 * (ch * c + c * c)
        elem += k * (ch * h * w * 3 + pixels * (3 + 1 + 1) + pixels * 2)  # tail BN+Swish; last BN+Swish+add; TSM; readout
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

    def stats(self, sampler: str, eta: float, images: int) -> RunStats:
        """The RunStats of everything run so far, denoising steps in sampling order (largest t first)."""
        from neurosdm.diffusion.samplers import host_ops_schedule

        config = config_of(self.program)
        pixels = config.model.img_ch * config.model.image_size ** 2
        kinds = {layer.name: layer.kind for layer in self.program.layers}
        stats = RunStats(self.program.num_steps, images=images, layer_kinds=kinds)
        order = sorted(self.counts, reverse=True)
        ops = host_ops_schedule(sampler, len(order), eta, True)
        for i, t in enumerate(order):
            host = dict(self.host[t])
            host["host_elementwise"] += images * pixels * ops[i]
            stats.add_call(t, self.counts[t], host)
        return stats


def simulate(program: Program, engine: str = "event", num_images: int = 4, sampler: str = "ddim",
             steps: int = 20, seed: int = 0, eta: float = 0.0, batch_size: int = 16, device: str = "cpu",
             record: bool = False, progress=None, on_result=None, threshold_scale: float | None = None):
    """Generate ``num_images`` images on ``engine``. Returns ``(images [N, C, H, W] float32 in [-1, 1], RunStats,
    denoiser)`` (the denoiser holds the spike records when ``record``). ``threshold_scale``: threshold guidance
    (:func:`apply_threshold_scale`; changes ``program``)."""
    from neurosdm.sample import generate

    if num_images < 1:
        raise ConfigError(f"--num-images must be at least 1, got {num_images}")
    config = config_of(program)
    if threshold_scale is not None:
        apply_threshold_scale(program, threshold_scale)
    eng = make_engine(engine, program, device=device)
    den = GraphDenoiser(program, eng, record=record, on_result=on_result)
    images = generate(den, config, num_images, seed=seed, sampler=sampler, num_sample_steps=steps, eta=eta,
                      batch_size=batch_size, progress=progress)
    stats = den.stats(sampler, eta, num_images)
    stats.meta.update(engine=engine, sampler=sampler, steps=int(steps), seed=int(seed), eta=float(eta),
                      batch_size=int(batch_size), quantized=str(_meta(program.metadata, "quantized", "none")),
                      threshold_scale=float(np.asarray(program.metadata.get("threshold_scale", 1.0))),
                      source_checkpoint=str(_meta(program.metadata, "source_checkpoint", "")))
    return images, stats, den


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
