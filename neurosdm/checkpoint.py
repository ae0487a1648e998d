"""Checkpoints: neurosdm's own (config inside, nanoGPT style) and the public SDM / SDDPM layouts.

A checkpoint is data: everything is loaded with ``torch.load(..., weights_only=True)``.

Layouts read:
- ``neurosdm``: ``{"format": "neurosdm", "version", "config": Config.to_dict(), "model": state_dict,
  "ema": state_dict | None, "optimizer", "step", ...}``
- ``sdm`` / ``sddpm``: ``{"net_model": state_dict, ...}`` and/or ``{"ema_model": state_dict}`` as saved by
  github.com/AndyCao1125/SDM and /SDDPM. No hyper-parameters are stored there; they are inferred from tensor
  shapes (ch, img_ch, ch_mult, num_res_blocks, num_diffusion_steps; num_steps and TSM from the ``tsmp`` scales).
  TSM keys ``<conv>.tsmconv.weight`` / ``.tsmconv.bias`` are renamed to ``<conv>.weight`` / ``.bias``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from neurosdm import __version__
from neurosdm.config import Config, DiffusionConfig, ModelConfig, check_memory
from neurosdm.errors import CheckpointError, ConfigError
from neurosdm.io import atomic_path, describe_head, first_line, regular_file
from neurosdm.models import count_parameters, SpikingUNet

DEFAULT_SDDPM_NUM_STEPS = 4  # SDDPM checkpoints (no TSM) do not record num_steps; the papers' default


@dataclass
class Checkpoint:
    config: Config
    layout: str  # "neurosdm", "sdm" (TSM) or "sddpm"
    model_state: dict
    ema_state: dict | None = None
    step: int = 0
    raw: dict | None = None  # everything else in the file (optimizer, rng, ...)
    notes: tuple[str, ...] = ()  # what was inferred or assumed


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _torch_load(path: Path) -> object:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        cand = path / "ckpt.pt"
        if cand.exists():
            path = cand
        else:
            raise CheckpointError(f"{path} is a directory without a ckpt.pt; pass the checkpoint file")
    regular_file(path, "checkpoint", CheckpointError)  # a FIFO would block: never opened
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (found {describe_head(path)}); expected a file saved by torch.save")
    try:
        with zipfile.ZipFile(path) as z:
            check_memory(f"checkpoint {path}", sum(i.file_size for i in z.infolist()))  # declared, uncompressed
            bad = z.testzip()  # torch.load does not check the CRCs: a flipped byte would load silently
        if bad is not None:
            raise CheckpointError(f"{path} is corrupt: record {bad} fails its CRC check (a damaged copy?)")
        return torch.load(path, map_location="cpu", weights_only=True)
    except (CheckpointError, ConfigError):  # typed already: the CRC, the memory limit
        raise
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds Python objects other than tensors and plain data, and neurosdm loads checkpoints as "
            f"data only (weights_only=True): {first_line(e)}"
        ) from None
    except Exception as e:  # truncated zip, bad records, ...
        raise CheckpointError(f"{path} is truncated or corrupt and cannot be read: {first_line(e)}") from None


def _strip_prefix(sd: dict) -> dict:
    """Drop DataParallel/DDP ``module.`` prefixes."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def normalise_sdm_keys(sd: dict) -> dict:
    """SDM TSM layout -> neurosdm module names: ``x.tsmconv.weight`` -> ``x.weight`` (``tsmp`` stays)."""
    return {re.sub(r"\.tsmconv\.(weight|bias)$", r".\1", k): v for k, v in _strip_prefix(sd).items()}


def infer_model_config(sd: dict, num_steps: int | None = None, image_size: int | None = None) -> tuple[ModelConfig, list[str]]:
    """Infer the architecture of a (normalised) SDM/SDDPM state dict from its tensor shapes."""
    notes = []
    try:
        ch, img_ch = sd["conv.weight"].shape[:2]
        num_diffusion_steps = sd["time_embedding.timembedding.0.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"state dict has no {e.args[0]!r}: not a spiking UNet of the SDM/SDDPM family") from None
    tsm = "conv.tsmp" in sd
    if tsm:
        inferred = sd["conv.tsmp"].shape[0]
        if num_steps is not None and num_steps != inferred:
            raise CheckpointError(f"num_steps {num_steps} given, but the TSM scales were trained for {inferred}")
        num_steps = inferred
    elif num_steps is None:
        num_steps = DEFAULT_SDDPM_NUM_STEPS
        notes.append(f"num_steps not stored in SDDPM checkpoints; assumed {num_steps} (override with num_steps=)")

    # Walk the down path: groups of ResBlocks (have conv1) separated by DownSamples (have only conv).
    groups, current = [], []
    i = 0
    while f"downblocks.{i}.conv.weight" in sd or f"downblocks.{i}.conv1.weight" in sd:
        if f"downblocks.{i}.conv1.weight" in sd:
            current.append(int(sd[f"downblocks.{i}.conv1.weight"].shape[0]))
        else:
            groups.append(current)
            current = []
        i += 1
    groups.append(current)
    if not groups or not groups[0]:
        raise CheckpointError("state dict has no downblocks.0 ResBlock: not a spiking UNet of the SDM/SDDPM family")
    num_res_blocks = len(groups[0])
    if any(len(g) != num_res_blocks for g in groups) or any(len(set(g)) != 1 for g in groups):
        raise CheckpointError(f"irregular down path {groups}: every level must have the same number of ResBlocks")
    if any(g[0] % ch for g in groups):
        raise CheckpointError(f"level widths {[g[0] for g in groups]} are not multiples of ch={ch}")
    ch_mult = tuple(g[0] // ch for g in groups)
    head = "sdm" if "T_output_layer.weight" in sd else "spiking"
    if image_size is None:  # 28 for 1-channel images (Fashion-MNIST) unless the depth needs 32 (the papers' 32x32)
        image_size = 28 if img_ch == 1 and 28 % 2 ** (len(ch_mult) - 1) == 0 else 32
        notes.append(f"image size not stored; assumed {image_size}x{image_size} (the model is fully convolutional)")
    cfg = ModelConfig(img_ch=int(img_ch), image_size=image_size, ch=int(ch), ch_mult=ch_mult,
                      num_res_blocks=num_res_blocks, num_steps=int(num_steps),
                      num_diffusion_steps=int(num_diffusion_steps), tsm=tsm, head=head)
    return cfg, notes


def load_checkpoint(path: str | os.PathLike, num_steps: int | None = None, image_size: int | None = None) -> Checkpoint:
    """Read any supported layout; see the module docstring."""
    path = Path(path)
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dictionary")
    if obj.get("format") == "neurosdm":
        for key in ("config", "model"):
            if key not in obj:
                raise CheckpointError(f"{path} is a neurosdm checkpoint without {key!r}: truncated or hand-edited?")
        try:
            cfg = Config.from_dict(obj["config"])
        except ConfigError as e:
            raise CheckpointError(f"{path}: {e}") from None
        raw = {k: v for k, v in obj.items() if k not in ("config", "model", "ema")}
        return Checkpoint(cfg, "neurosdm", check_state(obj["model"], path, "model"),
                          check_state(obj.get("ema"), path, "ema", optional=True), check_step(obj, path), raw)
    if "net_model" in obj or "ema_model" in obj:
        net = check_state(obj.get("net_model"), path, "net_model", optional=True)
        ema = check_state(obj.get("ema_model"), path, "ema_model", optional=True)
        if net is None and ema is None:
            raise CheckpointError(f"{path}: 'net_model' and 'ema_model' are both empty")
        sd = normalise_sdm_keys(net if net is not None else ema)
        try:
            model_cfg, notes = infer_model_config(sd, num_steps, image_size)
        except ConfigError as e:
            raise CheckpointError(f"{path}: the inferred architecture is invalid: {e}") from None
        except (ValueError, IndexError, TypeError) as e:  # a tensor of the wrong rank where a shape is read
            raise CheckpointError(f"{path}: tensors of unexpected ranks, not a spiking UNet of the SDM/SDDPM family "
                                  f"({first_line(e)})") from None
        layout = "sdm" if model_cfg.tsm else "sddpm"
        cfg = Config(model=model_cfg, diffusion=DiffusionConfig(num_diffusion_steps=model_cfg.num_diffusion_steps))
        notes.append("diffusion schedule not stored; assumed the papers' linear 1e-4..0.02")
        return Checkpoint(cfg, layout, sd, normalise_sdm_keys(ema) if ema is not None and net is not None else None,
                          int(obj.get("step", 0)) if isinstance(obj.get("step", 0), int) else 0,
                          {k: v for k, v in obj.items() if k not in ("net_model", "ema_model")}, tuple(notes))
    keys = ", ".join(sorted(map(str, obj))[:8])
    raise CheckpointError(
        f"{path} is not a neurosdm, SDM or SDDPM checkpoint: found keys [{keys}]; expected 'config'+'model' "
        f"(neurosdm) or 'net_model'/'ema_model' (SDM/SDDPM)"
    )


def check_step(obj: dict, path) -> int:
    """A checkpoint's ``step``: a non-negative integer (0 when absent)."""
    step = obj.get("step", 0)
    if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_floating_point():
        step = int(step)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: 'step' must be a non-negative integer, got {str(step)[:60]!r}")
    return step


def check_state(state, path, key: str, optional: bool = False) -> dict | None:
    """A state dict as read from a file: a dict of names to real tensors of finite values (NaN or Inf weights
    would give all-NaN samples). :class:`CheckpointError` naming the entry otherwise."""
    if state is None and optional:
        return None
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: {key!r} must be a non-empty state dict (names -> tensors), got "
                              f"{type(state).__name__}")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: {key}[{str(name)[:60]!r}] must be a tensor, got {type(value).__name__}")
        if value.is_complex() or value.dtype == torch.bool:
            raise CheckpointError(f"{path}: {key}[{name!r}] has dtype {value.dtype}; expected real numbers")
        stored = value.untyped_storage().nbytes()
        if value.numel() and value.numel() * value.element_size() > stored:  # expanded: no memory behind it
            raise CheckpointError(f"{path}: {key}[{name!r}] declares {value.numel():,} values of shape "
                                  f"{list(value.shape)} over {stored:,} stored bytes (an expanded tensor)")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{path}: {key}[{name!r}] holds NaN or infinite values")
    return state


def build_model(cfg: ModelConfig, state: dict, source: str = "checkpoint") -> SpikingUNet:
    with torch.device("meta"):  # sizes first: nothing is allocated for an architecture that does not fit
        shapes = {k: tuple(v.shape) for k, v in SpikingUNet(dataclasses.replace(cfg)).state_dict().items()}
    check_memory(f"the model {_arch(cfg)}", 4 * sum(math.prod(s) for s in shapes.values()))
    wrong = [(k, tuple(v.shape), shapes[k]) for k, v in state.items()
             if k in shapes and isinstance(v, torch.Tensor) and tuple(v.shape) != shapes[k]]
    if wrong:
        k, got, want = wrong[0]
        raise CheckpointError(f"{source}: tensor {k!r} has shape {list(got)}, the architecture {_arch(cfg)} needs "
                              f"{list(want)} ({len(wrong)} tensor(s) of the wrong shape)")
    model = SpikingUNet(dataclasses.replace(cfg))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[0]})")
        raise CheckpointError(f"{source} does not match the architecture {_arch(cfg)}: " + "; ".join(parts))
    return model


def _arch(cfg: ModelConfig) -> str:
    return (f"ch={cfg.ch} ch_mult={list(cfg.ch_mult)} num_res_blocks={cfg.num_res_blocks} img_ch={cfg.img_ch} "
            f"num_steps={cfg.num_steps} tsm={cfg.tsm} head={cfg.head}")


def load_model(path: str | os.PathLike, weights: str = "ema", num_steps: int | None = None,
               image_size: int | None = None, device: str | torch.device = "cpu") -> tuple[SpikingUNet, Config]:
    """Rebuild the model of any supported checkpoint, in eval mode. ``weights="ema"`` uses the EMA weights when
    the file has them (what sampling should use), else the trained weights."""
    ckpt = load_checkpoint(path, num_steps=num_steps, image_size=image_size)
    state = ckpt.ema_state if weights == "ema" and ckpt.ema_state is not None else ckpt.model_state
    model = build_model(ckpt.config.model, state, source=str(path))
    return model.to(device).eval(), ckpt.config


def save_checkpoint(path: str | os.PathLike, config: Config, model: torch.nn.Module, ema: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, step: int = 0, extra: dict | None = None) -> None:
    """Write a neurosdm checkpoint atomically (never a half-written file)."""
    obj = {
        "format": "neurosdm",
        "version": __version__,
        "config": config.to_dict(),
        "model": model.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": int(step),
    }
    obj.update(extra or {})
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def describe(path: str | os.PathLike) -> dict:
    """What ``neurosdm info`` prints: layout, architecture, parameter count, training state, notes."""
    ckpt = load_checkpoint(path)
    model = build_model(ckpt.config.model, ckpt.model_state, source=str(path))
    m, d = ckpt.config.model, ckpt.config.diffusion
    out = {
        "layout": ckpt.layout,
        "architecture": _arch(m),
        "image": f"{m.img_ch}x{m.image_size}x{m.image_size}",
        "threshold": m.threshold,
        "parameters": f"{count_parameters(model):,}",
        "diffusion": f"{d.schedule} betas {d.beta_start}..{d.beta_end}, {d.num_diffusion_steps} steps",
        "step": ckpt.step,
        "ema weights": "yes" if ckpt.ema_state is not None else "no",
        "sha256": file_sha256(Path(path) / "ckpt.pt" if Path(path).is_dir() else path)[:16],
    }
    if m.activation == "qcfs":
        out["neurons"] = f"QCFS ANN activation, {m.qcfs_bits} bits ({2 ** m.qcfs_bits - 1} levels; convert with " \
                         "`neurosdm convert`)"
    elif m.thresholds or m.reset != "hard" or m.v_init:
        th = list(m.thresholds.values())
        out["neurons"] = (f"IF, reset {m.reset}, v(0) = {m.v_init:g} x threshold, readout {m.readout}"
                          + (f", {len(th)} per-layer thresholds {min(th):.3g}..{max(th):.3g}" if th else ""))
    if "converted_from" in ckpt.raw:
        out["converted from"] = str(ckpt.raw["converted_from"])
    if ckpt.layout == "neurosdm":
        t = ckpt.config.train
        out["trained on"] = f"{t.dataset}, batch {t.batch_size}, lr {t.lr}"
        for key in ("wall_s", "final_loss"):
            if key in ckpt.raw:
                out[key] = f"{ckpt.raw[key]:.4g}"
    for i, note in enumerate(ckpt.notes):
        out[f"note {i + 1}"] = note
    return out
