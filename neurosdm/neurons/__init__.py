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
    qcfs,
    rect_grad,
)


class SpikingNeurons(nn.Module):
    """Multi-step IF (``decay=1``) or LIF neurons with no persistent state: input ``[num_steps, B, ...]`` ->
    spikes of the same shape. ``threshold_scale`` multiplies the threshold at run time (threshold guidance).
    ``v_init`` is the initial membrane as a fraction of the (scaled) threshold: ``v(0) = v_init * threshold``
    (0 for trained SNNs, 1/2 for converted ones)."""

    def __init__(self, threshold: float = 1.0, decay: float = 1.0, reset: str = "hard", surrogate: str = "atan",
                 alpha: float = 2.0, v_init: float = 0.0):
        super().__init__()
        self.threshold = float(threshold)
        self.decay = float(decay)
        self.reset = reset
        self.surrogate = surrogate
        self.alpha = float(alpha)
        self.v_init = float(v_init)
        self.threshold_scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        theta = self.threshold * self.threshold_scale
        return multistep_neuron(x, theta, self.decay, self.reset, self.surrogate, self.alpha, self.v_init * theta)

    def extra_repr(self) -> str:
        return (f"threshold={self.threshold}, decay={self.decay}, reset={self.reset}, surrogate={self.surrogate}, "
                f"threshold_scale={self.threshold_scale}, v_init={self.v_init}")


class QCFS(nn.Module):
    """The ANN activation that ANN-to-SNN conversion turns into an IF neuron (:func:`neurosdm.neurons.functional.qcfs`):
    ``y = clip / L * clamp(floor(x L / clip + 1/2), 0, L)`` with ``L = 2**bits - 1`` and a learnable ``clip``
    (one per layer, state-dict key ``<name>.clip``). Element-wise: any input shape (here ``[1, B, C, H, W]``)."""

    def __init__(self, bits: int = 2, clip: float = 2.0):
        super().__init__()
        self.bits = int(bits)
        self.levels = 2**self.bits - 1
        self.clip = nn.Parameter(torch.tensor(float(clip)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qcfs(x, self.clip, self.levels)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, levels={self.levels}, clip={float(self.clip.detach()):.4g}"
