"""ANN-to-SNN conversion (the SDM paper's conversion path; QCFS, Bu et al., ICLR 2022). See docs/convert.md.

The ANN is a :class:`~neurosdm.models.SpikingUNet` built with ``activation="qcfs"``: the same layers, every IF
neuron replaced by a quantised clip-floor-shift activation with a learnable clip ``lambda`` per layer
(:func:`neurosdm.neurons.functional.qcfs`), run for one step. Conversion turns it into an ordinary spiking
checkpoint:

- every QCFS becomes an IF neuron with threshold ``theta = lambda`` of that layer (``ModelConfig.thresholds``),
  membrane starting at ``theta / 2`` (``v_init = 0.5``) and reset by subtraction;
- the IF emits 0/1 spikes where the ANN emitted multiples of ``lambda / L``; the conv reading them gets its weight
  multiplied by ``lambda`` (``conv(lambda s) = (lambda W) s + b``), so that the time average of its output is the
  ANN's conv output of the rate ``lambda * mean_t s[t]``;
- ``num_steps = L = 2**bits - 1`` (or more), and the readout is the time average (``readout="mean"``: the spiking
  head averages its output; the analog "sdm" head runs once on the time-averaged stream).

Why it is exact for a constant input (the test checks it): an IF with threshold ``theta``, ``v(0) = theta / 2``,
subtract reset and input ``x`` each step has, after ``T`` steps, ``v = theta/2 + T x - n theta`` with ``n`` the
spikes so far; for ``0 <= x <= theta`` it keeps ``0 <= v < theta``, so ``n = floor(T x / theta + 1/2)``, and
``n = T`` above, ``0`` below: ``n = clamp(floor(T x / theta + 1/2), 0, T)``. With ``T = L`` the rate times
``theta`` is the QCFS output. Deeper layers see inputs that vary over the steps, so the converted network is the
ANN only approximately; more steps (``num_steps`` a multiple of L) shrink that error.

Optional fine-tuning (:func:`finetune`): the denoising loss (epsilon-MSE) on the converted SNN itself, surrogate
gradients through the IF neurons, BatchNorm statistics frozen, thresholds fixed.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from neurosdm.checkpoint import load_checkpoint, load_model, save_checkpoint
from neurosdm.config import Config, ModelConfig
from neurosdm.data import load_dataset
from neurosdm.diffusion import GaussianDiffusion
from neurosdm.errors import CheckpointError, ConfigError
from neurosdm.models import SpikingUNet
from neurosdm.models.spiking_unet import DownSample, ResBlock, UpSample
from neurosdm.neurons import QCFS
from neurosdm.train import freeze_batchnorm, step_generator

__all__ = ["neuron_conv_pairs", "converted_config", "convert_model", "finetune", "convert_checkpoint"]


def neuron_conv_pairs(model: SpikingUNet) -> list[tuple[str, str]]:
    """``(activation module name, name of the conv that reads its output)`` for every IF/QCFS layer: the stem's
    ``neuron`` -> ``conv_identity``; per ResBlock ``neuron1`` -> ``conv1``, ``neuron2`` -> ``conv2``; per Down/UpSample
    ``neuron`` -> ``conv``; the spiking head's ``tail_neuron`` -> ``tail_conv``."""
    pairs = [("neuron", "conv_identity")]
    for name, m in model.named_modules():
        if isinstance(m, ResBlock):
            pairs += [(f"{name}.neuron1", f"{name}.conv1"), (f"{name}.neuron2", f"{name}.conv2")]
        elif isinstance(m, (DownSample, UpSample)):
            pairs.append((f"{name}.neuron", f"{name}.conv"))
    if model.cfg.head == "spiking":
        pairs.append(("tail_neuron", "tail_conv"))
    return pairs


def converted_config(ann_cfg: ModelConfig, clips: dict[str, float], num_steps: int | None = None) -> ModelConfig:
    """The SNN's model config: IF neurons with per-layer thresholds ``clips``, ``v_init`` 0.5, subtract reset,
    mean readout, ``num_steps`` (default ``L = 2**qcfs_bits - 1``)."""
    levels = 2**ann_cfg.qcfs_bits - 1
    steps = levels if num_steps is None else int(num_steps)
    if steps < 1:
        raise ConfigError(f"--num-steps must be at least 1, got {steps}")
    return dataclasses.replace(ann_cfg, activation="if", num_steps=steps, reset="subtract", v_init=0.5,
                               readout="mean", thresholds=dict(clips), threshold=1.0, threshold_scale=1.0)


def convert_model(ann: SpikingUNet, num_steps: int | None = None) -> SpikingUNet:
    """The converted SNN (eval mode) of a QCFS ANN (module docstring); ``ann`` is left unchanged."""
    if ann.cfg.activation != "qcfs":
        raise ConfigError("conversion needs a QCFS ANN (trained with `neurosdm train --ann`); this model already "
                          "has IF neurons")
    clips = {name: float(m.clip.detach()) for name, m in ann.named_modules() if isinstance(m, QCFS)}
    bad = {k: v for k, v in clips.items() if not v > 0}
    if bad:
        raise ConfigError(f"QCFS clips must be positive to become thresholds, got {bad}")
    pairs = neuron_conv_pairs(ann)
    if {n for n, _ in pairs} != set(clips):
        raise RuntimeError(f"activation layers {sorted(clips)} do not match the conv pairs {pairs}")
    snn = SpikingUNet(converted_config(ann.cfg, clips, num_steps))
    state = {k: v.detach().clone() for k, v in ann.state_dict().items() if not k.endswith(".clip")}
    for neuron, conv in pairs:
        state[f"{conv}.weight"] = state[f"{conv}.weight"] * clips[neuron]
    snn.load_state_dict(state, strict=True)
    return snn.to(next(ann.parameters()).device).eval()


def finetune(model: SpikingUNet, config: Config, data: torch.Tensor, steps: int, lr: float = 1e-4,
             batch_size: int = 32, seed: int = 0) -> list[float]:
    """Fine-tune a converted SNN in place with the denoising loss ``E ||eps - model(x_t, t)||^2`` (surrogate
    gradients through the IF neurons), Adam, gradient clipping at 1, BatchNorm statistics frozen (the running
    statistics of the ANN), thresholds fixed. Returns the loss of every step; leaves the model in eval mode."""
    if steps < 0 or batch_size < 1 or not lr > 0:
        raise ConfigError(f"fine-tuning needs steps >= 0, batch size >= 1 and lr > 0, got {steps}, {batch_size}, {lr}")
    diffusion = GaussianDiffusion(config.diffusion)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    model.train()
    freeze_batchnorm(model)
    for k in range(steps):
        idx = torch.randint(0, len(data), (batch_size,), generator=step_generator(seed, k))
        loss = diffusion.loss(model, data[idx], generator=step_generator(seed, k, 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def convert_checkpoint(ann_path: str | os.PathLike, out_path: str | os.PathLike, force: bool = False,
                       num_steps: int | None = None, finetune_steps: int = 0, dataset: str | None = None,
                       data_dir: str | None = None, lr: float = 1e-4, batch_size: int = 32, seed: int = 0) -> dict:
    """Convert the QCFS ANN checkpoint ``ann_path`` (its EMA weights when present) and write the SNN checkpoint
    ``out_path`` (atomically; an existing file only with ``force``). ``finetune_steps > 0`` fine-tunes it on
    ``dataset`` (default: the ANN's training dataset). Returns a summary (thresholds, steps, fine-tuning losses)."""
    ann_path, out_path = Path(ann_path), Path(out_path)
    if out_path.is_dir():
        raise ConfigError(f"output {out_path} is a directory; pass a file name such as {out_path / 'snn.pt'}")
    if out_path.exists() and not force:
        raise ConfigError(f"output {out_path} already exists; use --force to overwrite it")
    ckpt = load_checkpoint(ann_path)
    if ckpt.config.model.activation != "qcfs":
        raise CheckpointError(f"{ann_path} is not a QCFS ANN checkpoint (its neurons are "
                              f"{ckpt.config.model.activation!r}); train one with `neurosdm train --ann`")
    ann, config = load_model(ann_path, weights="ema")
    snn = convert_model(ann, num_steps)
    snn_config = dataclasses.replace(config, model=snn.cfg)
    losses: list[float] = []
    if finetune_steps:
        data = load_dataset(dataset or config.train.dataset, data_dir or config.train.data_dir, "train",
                            snn.cfg.image_size)
        losses = finetune(snn, snn_config, data, finetune_steps, lr=lr, batch_size=batch_size, seed=seed)
    extra = {"converted_from": ann_path.name, "conversion": {
        "method": "QCFS -> IF (threshold = clip, v_init = threshold/2, subtract reset, mean readout)",
        "qcfs_bits": int(config.model.qcfs_bits), "finetune_steps": int(finetune_steps),
        "finetune": "denoising loss, surrogate gradients, BN frozen" if finetune_steps else "none"}}
    if losses:
        extra["final_loss"] = losses[-1]
    save_checkpoint(out_path, snn_config, snn, step=ckpt.step, extra=extra)
    return {"out": out_path, "num_steps": snn.cfg.num_steps, "thresholds": dict(snn.cfg.thresholds),
            "finetune_losses": losses}
