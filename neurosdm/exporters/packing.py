"""What the polyphase (packed) form of the up path stores: conv weights before and after packing, per up-sampling
level (the export refuses a model whose packed weights would not fit; docs/export.md states the growth).

The packing itself is :mod:`neurosdm.lowering`'s (numpy, exact); this module walks a torch
:class:`~neurosdm.models.SpikingUNet` to count it.
"""

from __future__ import annotations

from torch import nn

from neurosdm.models.spiking_unet import ResBlock, SpikingUNet, UpSample

__all__ = ["packed_weight_overhead", "conv_cost"]


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
