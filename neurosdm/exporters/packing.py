"""The up-sampling form of an export, and what the polyphase (packed) form of the up path stores.

Two forms (``neurosdm export --upsample``): ``"polyphase"`` keeps the file in core NIR (the packing of
:mod:`neurosdm.lowering`, exact) but its stored weights grow 16x per up-sampling level after the first;
``"extension"`` writes the dialect's up-sampling node (:data:`neurosdm.graph.dialect.UPSAMPLE_RULE`) and stores the
model's own weights. ``"auto"`` (the default) chooses polyphase for at most one up-sampling level and the extension
beyond, so every depth exports. :func:`packed_weight_overhead` walks a torch :class:`~neurosdm.models.SpikingUNet` to
count the polyphase form's weights.
"""

from __future__ import annotations

from torch import nn

from neurosdm.errors import ConfigError, NeuroSDMError
from neurosdm.models.spiking_unet import DownSample, ResBlock, SpikingUNet, UpSample

__all__ = ["packed_weight_overhead", "conv_cost", "upsample_form", "UPSAMPLE_CHOICES", "MAX_STORED_WEIGHTS",
           "UnsupportedModelError", "neuron_count", "EXPORT_BYTES_PER_NEURON"]

UPSAMPLE_CHOICES = ("auto", "extension", "polyphase")
MAX_STORED_WEIGHTS = 2**28  # 1 GB of float32 conv weights: the polyphase form's limit


class UnsupportedModelError(NeuroSDMError, NotImplementedError):
    """The model uses a feature this exporter cannot express (yet)."""


def upsample_form(model, upsample: str = "auto") -> str:
    """The up-sampling form of ``model``'s export (module docstring); :class:`UnsupportedModelError` for a
    polyphase form whose stored weights exceed :data:`MAX_STORED_WEIGHTS`."""
    if upsample not in UPSAMPLE_CHOICES:
        raise ConfigError(f"unknown --upsample {upsample!r}; expected one of {', '.join(UPSAMPLE_CHOICES)}")
    levels = sum(isinstance(m, UpSample) for m in model.upblocks)
    form = upsample if upsample != "auto" else ("polyphase" if levels <= 1 else "extension")
    if form == "polyphase":
        stored = packed_weight_overhead(model)
        if stored["model_packed_stored"] > MAX_STORED_WEIGHTS:
            raise UnsupportedModelError(
                f"this model's up path has {stored['levels']} up-sampling levels: the polyphase form stores "
                f"{stored['model_packed_stored']:,} conv weights ({stored['model_packed_stored'] * 4 / 1e9:.1f} GB; "
                f"16x per level, {stored['model_original']:,} in the model), above the limit of "
                f"{MAX_STORED_WEIGHTS:,}; use --upsample extension (or auto), see docs/export.md")
    return form


def conv_cost(kind: str, cout: int, cin: int, k: int, level: int) -> tuple[int, int]:
    """(stored, structurally non-zero) weights of one conv ``[cout, cin, k, k]`` after lowering at up level
    ``level`` (L upsamplings done). ``kind``: "packed" (packed map -> packed map), "skip" (unpacked down-path map
    -> packed map) or "upsample" (nearest x2 + conv3x3 from level - 1 into level)."""
    n = cout * cin
    if level == 0:
        return n * k * k, n * k * k
    if kind == "packed":
        kp = 3 if k == 3 else 1
        return n * 16**level * kp * kp, n * 4**level * k * k
    if kind == "skip":
        side = 2**level + k - 1
        return n * 4**level * side * side, n * 4**level * k * k
    if kind == "upsample":  # pack_phases (4 Cout x Cin x 9, 16 non-zero) lifted level - 1 times
        return n * 36 * 16 ** (level - 1), n * 16 * 4 ** (level - 1)
    raise ValueError(kind)


def packed_weight_overhead(model_cfg) -> dict:
    """Count conv weights of the up path (``upblocks`` and the head) before and after packing, by walking a
    :class:`~neurosdm.models.SpikingUNet` built from ``model_cfg`` (a ModelConfig or a built model).

    Each ResBlock's concat input is split (:func:`neurosdm.lowering.split_concat_conv`): the up-path part is "packed", the skip
    part "skip" (:func:`neurosdm.lowering.full_to_packed_conv`). Returns ``original``, ``packed_stored``, ``packed_nonzero`` (up
    path), ``stored_ratio``, ``nonzero_ratio``, ``per_level`` ({level: {original, stored, nonzero}}),
    ``levels`` and ``model_original`` / ``model_packed_stored`` (all conv weights of the model, the down path,
    stem and the low-resolution level unchanged).
    """
    model = model_cfg if isinstance(model_cfg, nn.Module) else SpikingUNet(model_cfg)
    per_level: dict[int, dict[str, int]] = {}

    def add(kind, conv_weight_shape, level, cin=None):
        cout, cin_all, k, _ = conv_weight_shape
        stored, nonzero = conv_cost(kind, cout, cin_all if cin is None else cin, k, level)
        d = per_level.setdefault(level, dict(original=0, stored=0, nonzero=0))
        d["original"] += cout * (cin_all if cin is None else cin) * k * k
        d["stored"] += stored
        d["nonzero"] += nonzero

    level, now_ch = 0, model.middleblocks[-1].conv2.out_channels
    for block in model.upblocks:
        if isinstance(block, ResBlock):
            for conv in [block.conv1] + ([block.shortcut] if isinstance(block.shortcut, nn.Conv2d) else []):
                shape = tuple(conv.weight.shape)
                add("packed", shape, level, cin=now_ch)
                add("skip", shape, level, cin=shape[1] - now_ch)
            add("packed", tuple(block.conv2.weight.shape), level)
            now_ch = block.conv2.out_channels
        elif isinstance(block, UpSample):
            level += 1
            add("upsample", tuple(block.conv.weight.shape), level)
    add("packed", tuple(model.tail_conv.weight.shape), level)
    if hasattr(model, "T_output_layer"):
        add("packed", tuple(model.T_output_layer.weight.shape[:4]), level)

    original = sum(d["original"] for d in per_level.values())
    stored = sum(d["stored"] for d in per_level.values())
    nonzero = sum(d["nonzero"] for d in per_level.values())
    all_convs = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))
    return dict(
        levels=level,
        original=original,
        packed_stored=stored,
        packed_nonzero=nonzero,
        stored_ratio=stored / original,
        nonzero_ratio=nonzero / original,
        per_level=per_level,
        model_original=all_convs,
        model_packed_stored=all_convs - original + stored,
    )


#: bytes an export holds per neuron while it is built and written (per-neuron parameter arrays in float64, their
#: float32 copies, the HDF5 buffer), for the memory check before the graph is built
EXPORT_BYTES_PER_NEURON = 64


def neuron_count(model: SpikingUNet, image_size: int) -> int:
    """The neurons of ``model``'s export for ``image_size`` images: every conv but the stem's reads an IF layer of
    its input channels at its resolution (the down-sampling conv and the up-sampling node's IF at the coarser one).
    Computed from the modules, before any graph is built."""
    side = (lambda level: max(1, image_size >> level))
    res = (lambda block: block.conv1.in_channels + block.conv2.in_channels)
    n, level = (model.conv_identity.in_channels + model.tail_conv.in_channels) * side(0) ** 2, 0
    for block in model.downblocks:
        n += (block.conv.in_channels if isinstance(block, DownSample) else res(block)) * side(level) ** 2
        level += isinstance(block, DownSample)
    n += sum(res(block) for block in model.middleblocks) * side(level) ** 2
    for block in model.upblocks:
        n += (block.conv.in_channels if isinstance(block, UpSample) else res(block)) * side(level) ** 2
        level -= isinstance(block, UpSample)
    return int(n)
