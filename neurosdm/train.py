"""Training (epsilon-MSE, Ho et al. 2020 Algorithm 1) with EMA, gradient clipping, bf16 autocast, exact resume and
multi-process data parallelism (torch DDP under torchrun; gloo on CPU, nccl on CUDA).

Randomness is a pure function of ``(seed, step, rank)``: the batch indices of step k come from a generator seeded
with ``(seed, k)`` and the diffusion noise from ``(seed, k, rank)``. A run resumed from a checkpoint therefore
repeats exactly what the uninterrupted run would have done, with no random state to save.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from neurosdm.checkpoint import load_checkpoint, save_checkpoint
from neurosdm.config import Config
from neurosdm.data import load_dataset
from neurosdm.diffusion import GaussianDiffusion
from neurosdm.distributed import process_group
from neurosdm.errors import ConfigError
from neurosdm.heap import retain_freed_memory
from neurosdm.io import image_grid, save_npy, save_png
from neurosdm.models import SpikingUNet
from neurosdm.neurons import SpikingNeurons
from neurosdm.sample import generate


def step_generator(*key: int) -> torch.Generator:
    """A torch CPU generator seeded from ``key`` (e.g. ``(seed, step, stream)``) through numpy's SeedSequence: the
    draws of a training step depend on the seed and the step only, so a resumed run repeats them exactly."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0] >> 1))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema_p = decay * ema_p + (1 - decay) * p`` for parameters; buffers (BN statistics) are copied.

    The running statistics copied from the trained model do not match the averaged weights; checkpoints
    therefore re-estimate them for the EMA model (:func:`recalibrate_batchnorm`)."""
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1.0 - decay)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)


def ema_decay(step: int, decay: float) -> float:
    """EMA decay with warm-up, ``min(decay, (1 + k) / (10 + k))``: early averages forget the random init."""
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, data: torch.Tensor, diffusion: GaussianDiffusion,
                          num_batches: int = 8, batch_size: int = 64, seed: int = 0) -> None:
    """Re-estimate every BatchNorm's running mean and variance of ``model`` as the cumulative average over
    ``num_batches`` batches of noisy training inputs ``x_t`` (uniform t), as the network sees them in training.
    Used for the EMA weights, whose averaged parameters do not match the statistics of the trained model."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average
    was_training = model.training
    model.train()
    g = step_generator(seed, 2**31 - 1)
    device = next(model.parameters()).device
    for _ in range(num_batches):
        idx = torch.randint(0, len(data), (min(batch_size, len(data)),), generator=g)
        x_0 = data[idx].to(device)
        t = torch.randint(0, diffusion.num_diffusion_steps, (len(idx),), generator=g).to(device)
        x_t = diffusion.q_sample(x_0, t, torch.randn(x_0.shape, generator=g).to(device))
        model(x_t, t)
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    model.train(was_training)


def freeze_batchnorm(model: torch.nn.Module) -> None:
    """Put every BatchNorm of ``model`` in eval mode (running statistics used and left unchanged; the affine
    parameters still learn). Quantisation-aware training: the quantised weight is the BN-folded one."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


class SpikeRates:
    """Forward hooks on every IF layer (:class:`~neurosdm.neurons.SpikingNeurons`) of ``model``: after a forward
    pass, ``rates[name]`` is the layer's firing rate in that pass, ``mean(spikes)`` over ``[num_steps, B, C, H,
    W]`` (spikes per neuron per spiking step), a differentiable scalar (the surrogate gradient flows through it).
    Installed only when the rate penalty is on, so the penalty-free path runs no hook."""

    def __init__(self, model: torch.nn.Module):
        self.rates: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in model.named_modules()
                        if isinstance(m, SpikingNeurons)]
        if not self.handles:
            raise ConfigError("--rate-penalty regularises IF spikes; this model has no IF layer")

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self.rates[name] = output.float().mean()
        return hook


def rate_penalty(rates: dict[str, torch.Tensor], target: float) -> torch.Tensor:
    """The firing-rate regulariser: ``mean_l max(0, r_l - target)`` over the IF layers' rates ``r_l``
    (:class:`SpikeRates`). With ``target`` 0 it is the mean firing rate, an L1 penalty on spikes, whose gradient
    lowers every layer's rate; above-target layers only otherwise. The trainer adds ``rate_penalty x`` this to
    the denoising loss."""
    return torch.stack([(r - target).clamp_min(0.0) for r in rates.values()]).mean()


def learning_rate(step: int, cfg) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then constant (as the SDDPM/pytorch-ddpm recipe)."""
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))


def adam(params, lr: float) -> torch.optim.Adam:
    """Adam, torch's fused implementation (one kernel over all parameters: 36 ms against 100 ms per step for the
    papers' 66.7M parameters on a 2-core CPU, benchmarks/train_vs_public.py) where the device has it, else the
    per-parameter loop. Same algorithm and state dict either way."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):  # a device without the fused kernel
        return torch.optim.Adam(params, lr=lr)


class Trainer:
    """Holds the model, its EMA copy, the optimiser and the data; ``step()`` does one optimisation step."""

    def __init__(self, config: Config, data: torch.Tensor | None = None, device: str = "cpu"):
        self.config = config
        tc = config.train
        self.device = torch.device(device)
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if tc.batch_size % self.world:
            raise ConfigError(f"batch size {tc.batch_size} is not divisible by the {self.world} processes")
        retain_freed_memory()  # large activations reuse freed memory instead of fresh pages at every step
        torch.manual_seed(tc.seed)  # parameter initialisation
        self.model = SpikingUNet(config.model).to(self.device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        if tc.qat:
            self._set_qat(tc.qat_weight_bits)
        self.net = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.opt = adam(self.model.parameters(), tc.lr)
        self.diffusion = GaussianDiffusion(config.diffusion)
        if data is None:
            data = load_dataset(tc.dataset, tc.data_dir, "train", config.model.image_size)
        if data.shape[1:] != (config.model.img_ch, config.model.image_size, config.model.image_size):
            raise ConfigError(
                f"dataset images are {tuple(data.shape[1:])} but the model expects "
                f"{(config.model.img_ch, config.model.image_size, config.model.image_size)}; "
                f"pick a preset or options that match the dataset"
            )
        self.data = data
        self.step_count = 0
        self.last_loss = float("nan")
        self.spike_rates = SpikeRates(self.model) if tc.rate_penalty > 0 else None
        self.last_rates: dict[str, float] = {}
        self.last_penalty = 0.0

    def _set_qat(self, bits: int | None) -> None:
        """Quantisation-aware training on (``bits``) or off (None) for the model and its EMA
        (:meth:`SpikingUNet.set_qat`); under QAT ``step()`` keeps BN statistics frozen and ``save()`` does not
        recalibrate them."""
        self.model.set_qat(bits)
        self.ema.set_qat(bits)

    def calibrate_batchnorm(self) -> None:
        """Estimate the model's BN statistics from training batches (:func:`recalibrate_batchnorm`, float
        weights) and copy them to the EMA: QAT from scratch starts from these, frozen, instead of the untrained
        mean 0 / variance 1, with which no neuron of a fresh network fires."""
        bits = self.model.qat_bits
        self.model.set_qat(None)
        recalibrate_batchnorm(self.model, self.data, self.diffusion, seed=self.config.train.seed)
        self.model.set_qat(bits)
        with torch.no_grad():
            for be, b in zip(self.ema.buffers(), self.model.buffers()):
                be.copy_(b)

    def load_state(self, path: str | os.PathLike, weights_only_init: bool = False) -> None:
        """Resume from a neurosdm checkpoint, or (``weights_only_init``) start from its weights only
        (``train --init``). Resuming a QAT run keeps QAT on, with the run's bit width (its saved config)."""
        ckpt = load_checkpoint(path)
        saved = ckpt.config.train
        if not weights_only_init and saved.qat:
            self.config.train = dataclasses.replace(self.config.train, qat=True,
                                                    qat_weight_bits=saved.qat_weight_bits)
            self._set_qat(saved.qat_weight_bits)
        model_state = dict(ckpt.model_state)
        if self.config.model.tsm and not ckpt.config.model.tsm:  # TSM fine-tuning: scales start at 1
            for k, v in self.model.state_dict().items():
                if k.endswith(".tsmp"):
                    model_state.setdefault(k, torch.ones_like(v))
        missing, unexpected = self.model.load_state_dict(model_state, strict=False)
        if missing or unexpected:
            raise ConfigError(f"--init/--resume checkpoint does not fit this model: missing {missing[:2]}, "
                              f"unexpected {unexpected[:2]}")
        ema_state = ckpt.ema_state if ckpt.ema_state is not None else model_state
        self.ema.load_state_dict({**self.model.state_dict(), **ema_state}, strict=True)
        if not weights_only_init:
            if ckpt.raw.get("optimizer") is not None:
                self.opt.load_state_dict(ckpt.raw["optimizer"])
            self.step_count = ckpt.step

    def step(self) -> float:
        tc = self.config.train
        k = self.step_count
        local = tc.batch_size // self.world
        idx = torch.randint(0, len(self.data), (tc.batch_size,), generator=step_generator(tc.seed, k))
        x_0 = self.data[idx[self.rank * local:(self.rank + 1) * local]].to(self.device)
        for group in self.opt.param_groups:
            group["lr"] = learning_rate(k, tc)
        self.net.train()
        if tc.qat:  # BN statistics frozen: QAT trains the weights for the folding the export will do
            freeze_batchnorm(self.model)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=tc.bf16):
            loss = self.diffusion.loss(self.net, x_0, generator=step_generator(tc.seed, k, self.rank + 1))
        total = loss
        if self.spike_rates is not None:  # loss += lambda * mean_l max(0, rate_l - target)
            penalty = rate_penalty(self.spike_rates.rates, tc.rate_target)
            total = loss + tc.rate_penalty * penalty
            self.last_penalty = float(penalty.detach())
            self.last_rates = {n: float(r.detach()) for n, r in self.spike_rates.rates.items()}
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.opt.step()
        ema_update(self.ema, self.model, ema_decay(k, tc.ema_decay))
        self.step_count += 1
        self.last_loss = float(loss.detach())
        return self.last_loss

    def save(self, path: str | os.PathLike, extra: dict | None = None) -> None:
        """Write a checkpoint (rank 0). The EMA model's BN statistics are re-estimated first; they are
        overwritten by the next ``step()`` anyway, so resuming stays exact. Not under QAT: the statistics are
        frozen there, and new ones would move the folded weights off the grid QAT trained for."""
        if self.rank == 0:
            if not self.config.train.qat:
                recalibrate_batchnorm(self.ema, self.data, self.diffusion, seed=self.config.train.seed)
            save_checkpoint(path, self.config, self.model, self.ema, self.opt, self.step_count, extra)


def train(config: Config, out_dir: str | os.PathLike, resume: bool = True, init: str | None = None,
          device: str = "cpu", progress=None, num_sample_images: int = 64) -> Path:
    """Train ``config`` into ``out_dir`` (``ckpt.pt``, ``log.jsonl``, sample grids). Resumes from
    ``out_dir/ckpt.pt`` when it exists and ``resume`` is set. Returns the checkpoint path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "ckpt.pt"
    tr = Trainer(config, device=device)
    if resume and ckpt_path.exists():
        tr.load_state(ckpt_path)
    elif init:
        tr.load_state(init, weights_only_init=True)
    elif config.train.qat:  # QAT from scratch: BN statistics estimated once, then frozen
        tr.calibrate_batchnorm()
    tc = config.train
    start, t0 = tr.step_count, time.perf_counter()
    grid_steps = min(50, config.diffusion.num_diffusion_steps)  # DDIM steps for the sample grids
    log = open(out / "log.jsonl", "a") if tr.rank == 0 else None
    steps = range(start, tc.steps)
    it = progress(steps, start) if progress is not None and tr.rank == 0 else steps
    for _ in it:
        loss = tr.step()
        if not math.isfinite(loss):
            raise ConfigError(f"loss became {loss} at step {tr.step_count}; lower --lr or enable gradient clipping")
        k = tr.step_count
        if log and (k % tc.log_every == 0 or k == tc.steps):
            rate = (k - start) / (time.perf_counter() - t0)
            row = {"step": k, "loss": loss, "lr": learning_rate(k - 1, tc), "it_per_s": rate}
            if tr.spike_rates is not None:  # the rate penalty's terms: per IF layer, and their regulariser
                row.update(rate_penalty=tr.last_penalty, mean_rate=float(np.mean(list(tr.last_rates.values()))),
                           rates=tr.last_rates)
            log.write(json.dumps(row) + "\n")
            log.flush()
        if tc.ckpt_every and k % tc.ckpt_every == 0 and k < tc.steps:
            tr.save(ckpt_path, {"wall_s": time.perf_counter() - t0})
        if tc.sample_every and k % tc.sample_every == 0 and k < tc.steps and tr.rank == 0:
            _write_samples(generate(tr.ema, config, num_sample_images, seed=0, num_sample_steps=grid_steps), out / f"samples_{k:07d}")
    if log:
        log.close()
    tr.save(ckpt_path, {"wall_s": time.perf_counter() - t0, "final_loss": tr.last_loss})
    if tr.rank == 0 and num_sample_images:
        _write_samples(generate(tr.ema, config, num_sample_images, seed=0, num_sample_steps=grid_steps), out / "samples")
    return ckpt_path


def _write_samples(images: torch.Tensor, stem: Path) -> None:
    save_png(image_grid(images.numpy()), stem.with_suffix(".png"))
    save_npy(images.numpy(), stem.with_suffix(".npy"))


def config_with_overrides(config: Config, **overrides) -> Config:
    """Return a copy of ``config`` with ``section.field`` overrides (``None`` values are ignored)."""
    config = copy.deepcopy(config)
    for key, value in overrides.items():
        if value is None:
            continue
        section, name = key.split(".")
        sub = getattr(config, section)
        if not hasattr(sub, name):
            raise ConfigError(f"unknown option {key}")
        setattr(config, section, dataclasses.replace(sub, **{name: value}))
    return config


@contextlib.contextmanager
def distributed(device: str = "cpu"):
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (:func:`neurosdm.distributed.process_group`: gloo
    on CPU, nccl on CUDA); yield this rank's device. Outside torchrun it only yields ``device``."""
    with process_group(device) as world:
        yield world.device
