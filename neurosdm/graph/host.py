"""The host side of a neurosdm denoiser export: eps from the graph's output (numpy, float64).

Heads (``metadata["head"]``, written by :func:`neurosdm.exporters.nir.to_nir_graph`):

- ``"spiking"``: the graph ends in a leaky readout (``nir.LI``, or ``nir.I`` for decay 1); eps is its membrane at
  the last spiking step (``metadata["readout"] = "last_step"``), unpacked with ``depth_to_space`` when the output
  is space-to-depth packed (``metadata["packed_levels"]``).
- ``"sdm"``: the Swish head is analog and stays on the host: the graph's Output gives the last junction (the
  analog boundary before ``tail_bn``) at every spiking step, and ``metadata["host_head"]`` holds the head's weights
  (its ``formula`` says what :func:`host_head` computes).

A quantised export's integer output is first scaled by ``2**quant.output_exponent``
(:data:`neurosdm.graph.dialect.UNITS_RULE`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neurosdm.dynamics import leaky_readout
from neurosdm.errors import GraphError
from neurosdm.graph.dialect import FixedPoint, as_str, meta_value
from neurosdm.graph.geometry import conv2d
from neurosdm.lowering import depth_to_space

__all__ = ["HostHead", "host_head", "eps_from_outputs", "silu"]

_SAME3x3 = ((1, 1), (1, 1))  # the zero padding of a 3x3 same conv


def silu(z: np.ndarray) -> np.ndarray:
    return z / (1.0 + np.exp(-z))


def _conv3x3(x: np.ndarray, w: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """A 3x3 same conv of ``x [..., Cin, H, W]`` (leading axes folded into one batch for :func:`conv2d`)."""
    lead = x.shape[:-3]
    out = conv2d(x.reshape(-1, *x.shape[-3:]), w, bias, (1, 1), _SAME3x3)
    return out.reshape(*lead, *out.shape[1:])


@dataclass
class HostHead:
    """The analog "sdm" head of an export (``metadata["host_head"]``), read once: its arrays (float64: the tail BN
    scale and shift, tail conv, TSM scales, T_output conv, last BN), ``average_input`` (a converted model's mean
    readout: the head runs once, on the time-averaged stream) and ``readout_decay``."""

    arrays: dict
    average_input: bool
    readout_decay: float

    KEYS = ("tail_bn_scale", "tail_bn_shift", "tail_conv_weight", "tail_conv_bias", "tail_conv_tsm", "T_output_weight",
            "T_output_bias", "last_bn_scale", "last_bn_shift", "readout_decay")

    @classmethod
    def from_metadata(cls, metadata: dict) -> "HostHead | None":
        """The head of an export whose ``head`` is "sdm", else None; :class:`GraphError` if an array is missing."""
        if as_str(metadata.get("head")) != "sdm":
            return None
        hh = metadata.get("host_head")
        missing = [k for k in cls.KEYS if not isinstance(hh, dict) or k not in hh]
        if missing:
            raise GraphError(f"the graph's metadata host_head lacks {missing}: the analog head cannot be computed")
        a = {k: np.asarray(v, dtype=np.float64) for k, v in hh.items() if k != "formula"}
        return cls(a, bool(float(a.get("average_input", 0.0))), float(a["readout_decay"]))

    @property
    def channels(self) -> int:
        return int(self.arrays["tail_bn_scale"].size)


def host_head(per_step_values: np.ndarray, metadata: dict) -> np.ndarray:
    """Finish the analog "sdm" head on the host: ``per_step_values [num_steps, B, C', H', W']`` (the graph's
    output at every spiking step, packed as the graph stores it) -> eps ``[B, img_ch, H, W]`` (float64)."""
    head = HostHead.from_metadata(metadata)
    a = head.arrays
    levels = int(meta_value(metadata, "packed_levels"))
    x = np.asarray(per_step_values, dtype=np.float64)
    if levels:
        x = depth_to_space(x, levels=levels)
    if head.average_input:  # readout "mean": the head runs once on the time-averaged stream
        x = x.mean(axis=0, keepdims=True)
    z = x * a["tail_bn_scale"][:, None, None] + a["tail_bn_shift"][:, None, None]
    p = a["tail_conv_tsm"].reshape(-1)[:x.shape[0]].reshape(-1, *([1] * (x.ndim - 1)))  # (averaged: 1 step)
    h = _conv3x3(silu(z), a["tail_conv_weight"], a["tail_conv_bias"]) * p
    g = _conv3x3(h, a["T_output_weight"], a["T_output_bias"])
    h = silu(g * a["last_bn_scale"][:, None, None] + a["last_bn_shift"][:, None, None]) + h
    return leaky_readout(h, head.readout_decay)


def eps_from_outputs(outputs: np.ndarray, metadata: dict) -> np.ndarray:
    """eps ``[B, img_ch, H, W]`` from the graph's output at every spiking step ``[num_steps, B, ...]``, for
    either head (spiking: the last step, unpacked; sdm: :func:`host_head`); a quantised export's integer output
    is first scaled by ``2**quant.output_exponent``."""
    out = np.asarray(outputs, dtype=np.float64)
    fixed = FixedPoint.from_metadata(metadata)
    if fixed is not None:
        out = out * 2.0 ** fixed.unit("output_exponent")
    if as_str(metadata.get("head")) == "sdm":
        return host_head(out, metadata)
    levels = int(meta_value(metadata, "packed_levels"))
    return depth_to_space(out[-1], levels=levels) if levels else out[-1]
