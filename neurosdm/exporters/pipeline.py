"""The export pipeline (``neurosdm export --to nir``): load a checkpoint, build the graph
(:mod:`neurosdm.exporters.nir`), calibrate and quantise it (:mod:`neurosdm.exporters.fixed_point`), rewrite it
(:mod:`neurosdm.exporters.rewrite`) and write the file."""

from __future__ import annotations

import os
from pathlib import Path

import nir
import numpy as np
import torch

from neurosdm.checkpoint import build_model, file_sha256, load_checkpoint
from neurosdm.config import Config, check_memory, parse_steps_schedule
from neurosdm.data import load_dataset
from neurosdm.errors import ConfigError, DatasetError
from neurosdm.exporters.fixed_point import calibrate, calibration_inputs, quantize_graph
from neurosdm.exporters.nir import to_nir_graph
from neurosdm.exporters.packing import EXPORT_BYTES_PER_NEURON, neuron_count
from neurosdm.exporters.rewrite import inline_junctions
from neurosdm.graph.dialect import STEPS_SCHEDULE_RULE, steps_schedule_table
from neurosdm.io import atomic_buffer, check_output_file

__all__ = ["export_checkpoint", "quantize_export", "calibration_set", "default_output_path", "QUANTIZE_CHOICES",
           "JUNCTION_CHOICES"]

QUANTIZE_CHOICES = ("none", "int8")
JUNCTION_CHOICES = ("scale", "edges")


def default_output_path(ckpt_path: str | os.PathLike) -> Path:
    """``CKPT.nir`` next to a checkpoint file; ``DIR/model.nir`` for a run directory holding ``ckpt.pt``."""
    ckpt_path = Path(ckpt_path)
    if ckpt_path.is_dir():
        return ckpt_path / "model.nir"
    return ckpt_path.with_suffix(".nir")


def export_checkpoint(ckpt_path: str | os.PathLike, out_path: str | os.PathLike | None = None,
                      quantize: str = "none", force: bool = False, calibration: str | None = None,
                      data_dir: str | None = None, calibration_images: int = 64, seed: int = 0,
                      junctions: str = "scale", upsample: str = "auto", steps_schedule: str | None = None) -> Path:
    """Export a checkpoint (any layout, EMA weights when present) as a NIR file; returns the written path.

    quantize: ``"none"`` (float32 graph) or ``"int8"`` (:mod:`neurosdm.exporters.fixed_point`, calibrated on
        ``calibration_images`` images of the dataset ``calibration`` (default: the checkpoint's training dataset)
        noised at 8 diffusion steps from ``seed``: :func:`quantize_export`).
    junctions: ``"scale"`` (identity Scale nodes sum residual streams) or ``"edges"`` (the sums as fan-in edges
        into every consumer and an identity 1x1 conv before the Output, for readers without Scale:
        :func:`neurosdm.exporters.rewrite.inline_junctions`; see docs/peer-readers.md).
    upsample: ``"auto"``, ``"polyphase"`` or ``"extension"`` (:func:`neurosdm.exporters.packing.upsample_form`).
    steps_schedule: spiking steps per diffusion step (:func:`neurosdm.config.parse_steps_schedule`; default: the
        checkpoint's ``model.steps_schedule``), written as ``metadata["steps_schedule"]``
        (:func:`neurosdm.graph.dialect.steps_schedule_table`); engines run each call with its step count.

    The graph holds the biases of diffusion step 0 (all steps are in ``metadata["bias_tables"]``) and records the
    checkpoint's diffusion schedule, ``source_checkpoint`` (file name) and ``source_checkpoint_sha256``. The file
    is written atomically: an error or Ctrl-C leaves no partial output. An existing output is kept unless
    ``force``."""
    if quantize not in QUANTIZE_CHOICES:
        raise ConfigError(f"unknown --quantize {quantize!r}; expected one of {', '.join(QUANTIZE_CHOICES)}")
    if junctions not in JUNCTION_CHOICES:
        raise ConfigError(f"unknown --junctions {junctions!r}; expected one of {', '.join(JUNCTION_CHOICES)}")
    if calibration_images < 1:
        raise ConfigError(f"--calibration-images must be at least 1, got {calibration_images}")
    ckpt_path = Path(ckpt_path)
    out_path = default_output_path(ckpt_path) if out_path is None else Path(out_path)
    ckpt_file = ckpt_path / "ckpt.pt" if ckpt_path.is_dir() else ckpt_path
    check_output_file(out_path, force, sources=(ckpt_file,))  # before the work; never the checkpoint itself
    ckpt = load_checkpoint(ckpt_path)
    m = ckpt.config.model
    schedule = m.steps_schedule if steps_schedule is None else steps_schedule
    if schedule:  # checked before the work (a TSM model's scales bound the step counts)
        parse_steps_schedule(schedule, ckpt.config.diffusion.num_diffusion_steps, m.num_steps if m.tsm else None)
    # the calibration images before the model and graph are built: a missing dataset is a quick one-line error
    images = calibration_set(ckpt.config, calibration, data_dir, calibration_images) if quantize == "int8" else None
    state = ckpt.ema_state if ckpt.ema_state is not None else ckpt.model_state
    model = build_model(ckpt.config.model, state, source=str(ckpt_path)).eval()
    neurons = neuron_count(model, m.image_size)  # the graph's per-neuron arrays grow with the image: checked first
    check_memory(f"the export of {m.img_ch}x{m.image_size}x{m.image_size} images ({neurons:,} neurons)",
                 EXPORT_BYTES_PER_NEURON * neurons)
    graph, metadata = to_nir_graph(model, diffusion=ckpt.config.diffusion,
                                   dtype=np.float32 if quantize == "none" else np.float64, upsample=upsample)
    if quantize == "int8":
        graph, metadata = quantize_export(graph, metadata, ckpt.config, seed=seed, images=images)
    if junctions == "edges":
        graph = inline_junctions(graph, metadata, output_junction="conv")  # no Scale left: spikingjelly reads it
        metadata = graph.metadata
    metadata["source_checkpoint"] = ckpt_file.name
    metadata["source_checkpoint_sha256"] = file_sha256(ckpt_file)
    metadata["weights"] = "ema" if ckpt.ema_state is not None else "model"
    if schedule:
        metadata["steps_schedule"] = steps_schedule_table(schedule, ckpt.config.diffusion.num_diffusion_steps)
        metadata["steps_schedule_rule"] = STEPS_SCHEDULE_RULE
    with atomic_buffer(out_path) as buffer:  # HDF5 in memory: a full disk is a clean error, not a crash
        nir.write(buffer, graph)
    return out_path


def quantize_export(graph: nir.NIRGraph, metadata: dict, config: Config, calibration: str | None = None,
                    data_dir: str | None = None, n_images: int = 64, seed: int = 0,
                    images: tuple[str, torch.Tensor] | None = None) -> tuple[nir.NIRGraph, dict]:
    """PTQ of an exported float graph on real images: ``images`` (``(dataset name, images)``, default
    :func:`calibration_set` of ``calibration``, ``data_dir``, ``n_images``), noised at 8 diffusion steps from
    ``seed``, calibrate the graph and quantise it (:mod:`neurosdm.exporters.fixed_point`). Returns ``(graph,
    metadata)``; ``metadata["quant"]["calibration"]["dataset"]`` records the dataset."""
    name, images = images if images is not None else calibration_set(config, calibration, data_dir, n_images)
    cal = calibrate(graph, metadata, calibration_inputs(images, config.diffusion, seed=seed))
    graph, metadata = quantize_graph(graph, metadata, cal)
    metadata["quant"]["calibration"]["dataset"] = str(name)
    return graph, metadata


def calibration_set(config: Config, calibration: str | None = None, data_dir: str | None = None,
                    n_images: int = 64) -> tuple[str, torch.Tensor]:
    """``(name, images)``: ``n_images`` training images of the dataset ``calibration`` (default: the training
    dataset of ``config``, else the built-in Fashion-MNIST sample for a 1x28x28 model), of the model's shape."""
    cfg = config.model
    name = calibration or config.train.dataset
    try:
        images = load_dataset(name, data_dir or config.train.data_dir, split="train", image_size=cfg.image_size,
                              limit=n_images)
    except DatasetError:
        if calibration is not None or (cfg.img_ch, cfg.image_size) != (1, 28):
            raise
        name = "builtin"  # the training set is not on this machine: the shipped Fashion-MNIST sample (recorded)
        images = load_dataset(name, split="train", limit=n_images)
    if tuple(images.shape[1:]) != (cfg.img_ch, cfg.image_size, cfg.image_size):
        raise ConfigError(f"calibration data {name!r} has images {tuple(images.shape[1:])}, the model takes "
                          f"{(cfg.img_ch, cfg.image_size, cfg.image_size)}; pass --calibration DATASET")
    return name, images
