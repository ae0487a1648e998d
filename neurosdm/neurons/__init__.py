"""Spiking neurons. Equations live in :mod:`neurosdm.neurons.functional`; the modules here are thin shells.

Tensor layout everywhere in neurosdm: ``[num_steps, batch, C, H, W]`` (time first).
"""

from __future__ import annotations

import torch
from torch import nn

from neurosdm.neurons.functional import (  # noqa: F401
    RESETS,
    SURROGATES,
    atan_grad,
    if_step,
    leaky_readout,
    lif_step,
    multistep_neuron,
    neuron_step,
    rect_grad,
)


class SpikingNeurons(nn.Module):
    """Multi-step IF (``decay=1``) or LIF neurons with no persistent state: input ``[num_steps, B, ...]`` ->
    spikes of the same shape. ``threshold_scale`` multiplies the threshold at run time (threshold guidance)."""

    def __init__(self, threshold: float = 1.0, decay: float = 1.0, reset: str = "hard", surrogate: str = "atan",
                 alpha: float = 2.0):
        super().__init__()
        self.threshold = float(threshold)
        self.decay = float(decay)
        self.reset = reset
        self.surrogate = surrogate
        self.alpha = float(alpha)
        self.threshold_scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return multistep_neuron(x, self.threshold * self.threshold_scale, self.decay, self.reset, self.surrogate,
                                self.alpha)

    def extra_repr(self) -> str:
        return (f"threshold={self.threshold}, decay={self.decay}, reset={self.reset}, surrogate={self.surrogate}, "
                f"threshold_scale={self.threshold_scale}")
