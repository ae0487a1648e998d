"""Neuron dynamics, written once: coefficients, the float step, the fixed-point step, the reset kinds.

Every function here works on numpy arrays and on torch tensors alike (the array namespace is taken from the
arguments; this module never imports torch), so the training kernels (:mod:`neurosdm.neurons.functional`), the
reference interpreter, both engines and the energy replay run the same lines. A test runs each function on both and
compares.

One discrete step of a neuron with membrane ``v`` (and, for the current-based kinds, a synaptic current ``i``)::

    i <- syn_decay * i + syn_gain * x                 current-based kinds (CubaLI, CubaLIF) only; then x := i
    h  = decay * v + leak + gain * x                  charge (a missing term: decay 1, leak 0, gain 1)
    s  = [h >= threshold]   (or [h > threshold])      spiking kinds only
    v <- v_reset where s, else h                      Reset.ZERO
    v <- h - (threshold - v_reset) * s                Reset.SUBTRACT (what a reset to v_reset removes at threshold)

For ``tau dv/dt = (v_leak - v) + r x`` with step ``dt`` (:func:`coefficients`): forward Euler ``decay = 1 - dt/tau``,
``gain = r dt / tau``; exact (exponential) ``decay = exp(-dt/tau)``, ``gain = (1 - decay) r``; the leak term is
``(1 - decay) v_leak``. Integrators (I, IF) have ``decay = 1``, ``gain = r dt``.

Fixed point (Loihi-style integers, :func:`fixed_point_step`)::

    d = sign(v decay_q12) * (|v decay_q12| >> 12);   h_raw = d + x;   h = clip(h_raw, -V, V),  V = 2**(bits-1) - 1
    s = h >= threshold;   v <- 0 where s, else h (ZERO)  |  h - threshold * s (SUBTRACT)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from neurosdm.errors import ConfigError

__all__ = ["Reset", "METHODS", "parse_method", "coefficients", "charge", "fire", "NeuronParams", "neuron_update",
           "DECAY_BITS", "DECAY_ONE", "state_limit", "fixed_point_step", "leaky_readout"]

DECAY_BITS = 12
DECAY_ONE = 1 << DECAY_BITS  # 4096: decay 1.0 (integrate-and-fire)


class Reset(str, Enum):
    """What a neuron that fires does to its membrane: ``ZERO`` sets it to ``v_reset`` (also called a hard reset),
    ``SUBTRACT`` removes ``threshold - v_reset`` (a soft reset; ``threshold`` when ``v_reset = 0``)."""

    ZERO = "zero"
    SUBTRACT = "subtract"

    @classmethod
    def parse(cls, name: "str | Reset") -> "Reset":
        """A reset from any of its spellings (neurosdm's ``hard``/``subtract``, NIR metadata, other frameworks')."""
        if isinstance(name, Reset):
            return name
        key = str(name).strip().lower()
        for reset, spellings in _RESET_SPELLINGS.items():
            if key in spellings:
                return reset
        spellings = sorted(s for v in _RESET_SPELLINGS.values() for s in v)
        raise ConfigError(f"unknown reset {name!r}; expected one of {spellings}")


_RESET_SPELLINGS = {Reset.ZERO: ("zero", "hard", "value", "to_value", "reset_value"),
                    Reset.SUBTRACT: ("subtract", "subtraction", "soft", "reset_subtract")}

METHODS = ("euler", "exp")
_METHOD_SPELLINGS = {"euler": ("euler", "forward_euler", "forward-euler"),
                     "exp": ("exp", "exact", "exponential", "zoh")}


def parse_method(name: str) -> str:
    """``"euler"`` or ``"exp"`` from any of their spellings."""
    key = str(name).strip().lower()
    for method, spellings in _METHOD_SPELLINGS.items():
        if key in spellings:
            return method
    raise ConfigError(f"unknown discretisation {name!r}; expected one of "
                      f"{sorted(s for v in _METHOD_SPELLINGS.values() for s in v)}")


def _xp(a: Any):
    """The array namespace of ``a``: torch for a tensor (only if torch is already imported), else numpy."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and isinstance(a, torch.Tensor) else np


def coefficients(tau, r, dt: float, method: str = "euler"):
    """``(decay, gain)`` of one step of ``tau dv/dt = -v + r x``: euler ``(1 - dt/tau, r dt/tau)``, exp
    ``(exp(-dt/tau), (1 - exp(-dt/tau)) r)``."""
    if method == "euler":
        return 1.0 - dt / tau, r * dt / tau
    if method != "exp":
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    decay = _xp(tau).exp(-dt / tau)
    return decay, (1.0 - decay) * r


def charge(v, x, decay=None, gain=None, leak=None):
    """``decay * v + leak + gain * x``; a None term is skipped (decay 1, leak 0, gain 1: exact shortcuts)."""
    h = v if decay is None else decay * v
    if leak is not None:
        h = h + leak
    return h + (x if gain is None else gain * x)


def fire(h, threshold, v_reset=0.0, reset: Reset = Reset.ZERO, strict: bool = False):
    """Compare the charged membrane with the threshold, then reset where it fired: ``(s bool, v)``.
    ``strict``: fire on ``h > threshold`` (NIR's equations, Norse, snnTorch) instead of ``>=``."""
    s = h > threshold if strict else h >= threshold
    if reset is Reset.ZERO:
        return s, _xp(h).where(s, v_reset, h)
    return s, h - (threshold - v_reset) * s


@dataclass
class NeuronParams:
    """One neuron layer's step (module docstring): arrays or tensors broadcast over the batch, or None for a term
    that is absent. ``threshold`` None: the layer does not spike (I, LI, CubaLI: the output is the membrane)."""

    decay: Any = None
    gain: Any = None
    leak: Any = None
    threshold: Any = None
    v_reset: Any = 0.0
    reset: Reset = Reset.ZERO
    strict: bool = False
    cuba: bool = False
    syn_decay: Any = None
    syn_gain: Any = None

    @property
    def spiking(self) -> bool:
        return self.threshold is not None

    def map(self, fn) -> "NeuronParams":
        """The same parameters with ``fn`` applied to every array (e.g. to move them to a device)."""
        out = NeuronParams(**vars(self))
        for name in ("decay", "gain", "leak", "threshold", "v_reset", "syn_decay", "syn_gain"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, float):
                setattr(out, name, fn(value))
        return out


def neuron_update(p: NeuronParams, x, state):
    """One float step of a neuron layer: ``(output, new state, spikes bool or None)``; the output is the spikes
    (as 0/1 in ``x``'s dtype) for spiking layers, the membrane otherwise. ``state`` is ``v``, or ``(i, v)`` for the
    current-based kinds."""
    if p.cuba:
        i, v = state
        i = charge(i, x, p.syn_decay, p.syn_gain)
        h = charge(v, i, p.decay, p.gain, p.leak)
    else:
        h = charge(state, x, p.decay, p.gain, p.leak)
    if not p.spiking:
        return h, ((i, h) if p.cuba else h), None
    s, v = fire(h, p.threshold, p.v_reset, p.reset, p.strict)
    out = s.astype(h.dtype) if _xp(h) is np else s.to(h.dtype)
    return out, ((i, v) if p.cuba else v), s


def state_limit(state_bits: int) -> int:
    """Largest magnitude of a signed ``state_bits``-bit state (symmetric: ``2**(state_bits-1) - 1``)."""
    return (1 << (int(state_bits) - 1)) - 1


def fixed_point_step(v_int, x_int, threshold_int, decay_q12: int = DECAY_ONE, reset: "Reset | str" = Reset.ZERO,
                     state_bits: int = 24):
    """One fixed-point step (module docstring) on int64 arrays or tensors. Returns ``(s bool, v_new int64,
    saturated bool)`` with ``saturated = h_raw != h``."""
    reset = Reset.parse(reset)
    if not 0 <= int(decay_q12) <= DECAY_ONE:
        raise ValueError(f"decay_q12 must be in 0..{DECAY_ONE}, got {decay_q12}")
    xp = _xp(v_int)
    if xp is np:
        v, x = np.asarray(v_int, np.int64), np.asarray(x_int, np.int64)
        thr = np.asarray(threshold_int, np.int64)
    else:
        v, x = v_int.to(xp.int64), x_int.to(xp.int64)
        thr = threshold_int
    if int(decay_q12) == DECAY_ONE:  # no leak: sign(v 4096) (|v 4096| >> 12) is v itself
        h_raw = v + x
    else:
        p = v * int(decay_q12)
        h_raw = xp.sign(p) * (abs(p) >> DECAY_BITS) + x
    vmax = state_limit(state_bits)
    h = xp.clip(h_raw, -vmax, vmax)
    s = h >= thr
    v_new = xp.where(s, 0, h) if reset is Reset.ZERO else h - thr * s
    return s, v_new, h_raw != h


def leaky_readout(h, decay: float):
    """Leaky integrator read at the last step (the SDM membrane output, a neuron that never fires)::

        out = sum_t decay**(num_steps-1-t) * h[t]      (equivalently u[t] = decay * u[t-1] + h[t], out = u[-1])
    """
    u = h[0]
    for t in range(1, h.shape[0]):
        u = decay * u + h[t]
    return u
