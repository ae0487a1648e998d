"""One quantiser, shared by quantisation-aware training (:func:`fake_quant`) and export (:func:`quantize_weight`).

Weights: per-layer power-of-two scale, signed ``bits``-bit mantissa (Loihi style, int8 by default)::

    w ~= m * 2**e,    m = clip(round_half_even(w / 2**e), lo, hi),    lo = -2**(bits-1),  hi = 2**(bits-1) - 1
    e in [EXP_MIN, EXP_MAX] = [-16, 15]   (a 5-bit signed exponent)

Rounding is round-half-to-even (``numpy.round`` and ``torch.round`` both do it), written once in
:func:`_round_to_grid`; export and QAT call the same function, so they agree bit for bit. Multiplying by a power of
two is exact in floating point, so the float dtype of the weights does not change the mantissas.

Neuron (one layer, fixed point). A conv layer with weight exponent ``e_w`` and 0/1 input spikes feeds a neuron
with threshold ``theta``, bias ``b`` and decay ``decay``. In integer units of ``2**e_w``::

    x_int[t]      = sum_j m_ij s_j[t] + b_int                     (exact integer synaptic input)
    b_int         = round_half_even(b / 2**e_w)                   (the weight rounding, unclipped)
    threshold_int = ceil(theta / 2**e_w)                          (see below why ceil)
    decay_q12     = round_half_even(decay * 4096)                 (12-bit fraction; 4096 = IF, no leak)

and one step (:func:`neurosdm.dynamics.fixed_point_step`, for numpy arrays and torch tensors alike)::

    p      = v[t-1] * decay_q12                                   (int64)
    d      = sign(p) * (|p| >> 12)                                (decay rounded toward zero, as Lava)
    h_raw  = d + x_int[t]
    h      = clip(h_raw, -V, V),   V = 2**(state_bits-1) - 1      (saturating 24-bit state)
    sat    = h_raw != h                                           (counted)
    s[t]   = h >= threshold_int
    v[t]   = 0 if s[t] else h                                     reset="hard"
    v[t]   = h - threshold_int * s[t]                             reset="subtract"

Why ``ceil`` for the threshold: with an integer state ``k`` (the float membrane ``k 2**e_w``),
``k 2**e_w >= theta  <=>  k >= ceil(theta / 2**e_w)``. So for integrate-and-fire (decay 1) with hard reset, on-grid
weights and bias and 0/1 input spikes, the fixed-point neuron fires exactly when the float neuron of
:mod:`neurosdm.neurons.functional` does, for any ``theta``. With reset by subtraction it is exact when ``theta``
is itself on the grid (then ``ceil`` changes nothing). With a leak (``decay_q12 < 4096``) the truncated decay
differs from ``decay * v`` by less than one unit per step; it is Loihi's arithmetic, not the float model's.

Lava / Loihi (``lava.proc.lif.models.PyLifModelBitAcc``), what is the same and what differs:

- same: 24-bit voltage saturating at ``+-(2**23 - 1)`` (Lava clips ``v`` to that range); the decay product
  in int64 with sign-magnitude truncation, ``sign(p) * (|p| >> 12)``, i.e. rounding toward zero (not floor);
  hard reset to 0; the order decay -> add input -> saturate -> compare -> reset.
- Lava's ``dv`` is the leak, ours the kept fraction: ``decay_q12 = 4096 - dv`` (Lava's 12-bit ``dv`` in
  0..4095 gives ``decay_q12`` in 1..4096; 0 is allowed here but has no Lava equivalent).
- Lava compares ``v > vth << 6``; we compare ``>=`` (the SDM/spikingjelly rule). On integers
  ``h >= T  <=>  h > T - 1``.
- Lava left-shifts activations and thresholds by 6 bits (MSB alignment) and keeps a current state ``u``
  (wrapping, not saturating). Our neuron is Lava's with ``du = 4095`` (``u`` = this step's input) and all
  quantities in Lava's internal units: an exporter passes ``x_int = a_in << 6`` and ``threshold_int = (vth << 6) + 1``
  to be bit-exact; the 6-bit shift then also costs 6 bits of our 24-bit headroom. Reset by subtraction is an
  extension (Loihi 2 microcode can do it; Lava's LIF cannot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from neurosdm.dynamics import DECAY_BITS, DECAY_ONE, fixed_point_step, state_limit  # noqa: F401 (re-exported)
from neurosdm.errors import QuantizationError

EXP_MIN = -16
EXP_MAX = 15
ROUNDINGS = ("nearest-even",)



@dataclass(frozen=True)
class QuantSpec:
    """Fixed-point format of a quantised network (defaults: Loihi-style).

    - ``weight_bits``: signed weight mantissa width, ``m`` in ``[-2**(bits-1), 2**(bits-1) - 1]``.
    - ``state_bits``: neuron state width; the state saturates at ``+-(2**(state_bits-1) - 1)``.
    - ``exp_min``, ``exp_max``: per-layer weight exponent range (``-16..15``, a 5-bit signed exponent).
    - ``decay_bits``: decay fraction width, ``decay_q = round(decay * 2**decay_bits)`` (12, as Loihi).
    - ``rounding``: ``"nearest-even"`` (round half to even), the only one implemented.
    """

    weight_bits: int = 8
    state_bits: int = 24
    exp_min: int = EXP_MIN
    exp_max: int = EXP_MAX
    decay_bits: int = DECAY_BITS
    rounding: str = "nearest-even"

    def __post_init__(self):
        if not 2 <= self.weight_bits <= 24:
            raise QuantizationError(f"weight_bits must be in 2..24, got {self.weight_bits}")
        if not 2 <= self.state_bits <= 32:
            raise QuantizationError(f"state_bits must be in 2..32, got {self.state_bits}")
        if self.exp_min > self.exp_max:
            raise QuantizationError(f"exp_min {self.exp_min} is above exp_max {self.exp_max}")
        if self.decay_bits != DECAY_BITS:
            raise QuantizationError(f"only {DECAY_BITS}-bit decays are implemented, got {self.decay_bits}")
        if self.rounding not in ROUNDINGS:
            raise QuantizationError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")

    @property
    def state_max(self) -> int:
        """``V = 2**(state_bits-1) - 1``: the state saturates at ``+-V``."""
        return state_limit(self.state_bits)


def mantissa_range(bits: int) -> tuple[int, int]:
    """``(lo, hi) = (-2**(bits-1), 2**(bits-1) - 1)``, the signed mantissa range."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def _np(x) -> np.ndarray:
    """A numpy array from a numpy array, a torch tensor (detached, CPU) or a number; integers become float64."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    return a if np.issubdtype(a.dtype, np.floating) else a.astype(np.float64)


def _round_to_grid(x, exponent: int):
    """``round_half_even(x / 2**exponent)`` for a numpy array or a torch tensor, in its own float dtype.

    The one rounding of this module (weights, biases, QAT). ``x * 2.0**-exponent`` is exact (power of two);
    ``+ 0.0`` turns the ``-0.0`` that rounding small negatives gives into ``+0.0`` (as an integer mantissa has).
    """
    return (x * 2.0 ** (-int(exponent))).round() + 0.0


def threshold_units(theta, exponent: int):
    """``ceil(theta / 2**exponent)``: the integer threshold of a fixed-point neuron whose state counts units of
    ``2**exponent`` (the one threshold rule; see the module docstring for why ``ceil``). Numpy in, numpy out."""
    return np.ceil(np.asarray(theta, np.float64) * 2.0 ** -int(exponent))


def bias_units(b, exponent: int):
    """``round_half_even(b / 2**exponent)`` (float64): a bias in units of ``2**exponent`` (the weight rounding,
    unclipped)."""
    return _round_to_grid(np.asarray(b, np.float64), exponent)


def _clip_mantissa(k, bits: int):
    lo, hi = mantissa_range(bits)
    return k.clip(lo, hi)


# ----------------------------------------------------------------------------------------------------- weights


def choose_exponent(w, bits: int = 8, exp_min: int = EXP_MIN, exp_max: int = EXP_MAX) -> int:
    """The smallest exponent ``e`` (finest grid) at which no element of ``w`` clips::

        e = min { e : lo <= round_half_even(w_i / 2**e) <= hi  for all i },    then e = max(e, exp_min)

    For 8 bits this is the smallest ``e`` with ``max(w) / 2**e`` rounding to at most 127 and ``min(w) / 2**e``
    to at least -128 (``[0.5, -0.25, 1.0]`` -> -6: ``1.0 / 2**-7 = 128`` clips, ``1.0 / 2**-6 = 64`` does not;
    ``[-1.0]`` -> -7, mantissa -128). Since nothing clips, ``|w - m 2**e| <= 2**(e-1)``.

    An all-zero (or empty) tensor returns 0: every exponent represents it exactly, and 0 leaves a downstream
    threshold in its own units. An exponent above ``exp_max`` raises :class:`QuantizationError`; one below
    ``exp_min`` is raised to ``exp_min`` (coarser grid, still no clipping). Non-finite weights raise.
    """
    a = _np(w)
    if a.size == 0 or not np.any(a):
        return 0
    if not np.all(np.isfinite(a)):
        raise QuantizationError("cannot quantise a tensor with NaN or infinite values")
    lo, hi = mantissa_range(bits)
    extremes = np.array([a.min(), a.max()], dtype=np.float64)
    _, k = math.frexp(float(np.abs(extremes).max()))  # max|w| = f 2**k, f in [0.5, 1)
    e = k - bits  # max|w| / 2**e = f 2**bits >= 2**(bits-1): at best exactly lo, so no finer grid can fit
    while True:
        m = _round_to_grid(extremes, e)
        if m[0] >= lo and m[1] <= hi:
            break
        e += 1
    e = max(e, exp_min)
    if e > exp_max:
        raise QuantizationError(f"weights up to {np.abs(extremes).max():.6g} need exponent {e} > exp_max {exp_max} "
                                f"with {bits}-bit mantissas; widen the exponent range or rescale the layer")
    return int(e)


def quantize_weight(w, exponent: int | None = None, bits: int = 8) -> tuple[np.ndarray, int]:
    """``m = clip(round_half_even(w / 2**e), lo, hi)`` as int32, and ``e``; ``exponent=None`` uses
    :func:`choose_exponent`. ``w`` is a numpy array or a torch tensor (rounded in its own float dtype)."""
    a = _np(w)
    e = choose_exponent(a, bits) if exponent is None else int(exponent)
    return _clip_mantissa(_round_to_grid(a, e), bits).astype(np.int32), e


def dequantize(mantissa, exponent: int, dtype=np.float32) -> np.ndarray:
    """``w = m * 2**e`` (exact in float32 for mantissas up to 24 bits and exponents in the float32 range)."""
    return (np.asarray(mantissa).astype(np.float64) * 2.0 ** int(exponent)).astype(dtype)


def calibrate_exponents(named_weights: dict, bits: int = 8, exp_min: int = EXP_MIN,
                        exp_max: int = EXP_MAX) -> dict[str, int]:
    """Post-training weight calibration: ``{name: choose_exponent(w)}`` for each layer's weight."""
    return {name: choose_exponent(w, bits, exp_min, exp_max) for name, w in named_weights.items()}


class _FakeQuant(torch.autograd.Function):
    """Forward: ``m 2**e`` with ``m`` from :func:`_round_to_grid` (the export rounding). Backward: clamped
    straight-through, ``dL/dw = dL/dw_q * [lo <= round(w / 2**e) <= hi]``."""

    @staticmethod
    def forward(ctx, w, exponent, bits):
        k = _round_to_grid(w, exponent)
        lo, hi = mantissa_range(bits)
        ctx.save_for_backward((k >= lo) & (k <= hi))
        return k.clamp(lo, hi) * 2.0 ** exponent

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype), None, None


def fake_quant(w: torch.Tensor, exponent: int | None = None, bits: int = 8) -> torch.Tensor:
    """Quantisation-aware training: ``w_q = clip(round_half_even(w / 2**e), lo, hi) * 2**e`` in the forward pass,
    bit-equal to ``dequantize(*quantize_weight(w))``; straight-through gradient, clamped::

        dL/dw = dL/dw_q   where w is not clipped (lo <= round(w / 2**e) <= hi),   0 where it is

    ``exponent=None`` chooses it from the current (detached) weights with :func:`choose_exponent`, so nothing
    clips and the gradient passes everywhere; a fixed exponent lets weights that outgrow it stop learning.
    """
    e = choose_exponent(w.detach(), bits) if exponent is None else int(exponent)
    return _FakeQuant.apply(w, e, bits)


# ------------------------------------------------------------------------------------------------------ neuron


@dataclass(frozen=True)
class FixedPointNeuron:
    """Parameters of a fixed-point IF/LIF neuron layer in integer units of ``2**weight_exponent`` (module docstring
    for the equations). ``bias_int`` is 0-d or per channel ``[C]`` (applied on axis 2 of ``[T, B, C, ...]``)."""

    weight_exponent: int
    threshold_int: int
    bias_int: np.ndarray = field(default_factory=lambda: np.zeros((), np.int64))
    decay_q12: int = DECAY_ONE
    reset: str = "hard"
    state_bits: int = 24

    @classmethod
    def from_float(cls, threshold: float, weight_exponent: int, bias=None, decay: float = 1.0,
                   reset: str = "hard", spec: QuantSpec | None = None) -> "FixedPointNeuron":
        """``threshold_int = ceil(theta / 2**e_w)``, ``b_int = round_half_even(b / 2**e_w)``,
        ``decay_q12 = round_half_even(decay * 4096)``. Raises :class:`QuantizationError` when the threshold is not
        positive or a threshold or bias does not fit the state."""
        spec = spec or QuantSpec()
        e = int(weight_exponent)
        vmax = spec.state_max
        threshold_int = int(threshold_units(float(threshold), e))
        if not 1 <= threshold_int <= vmax:
            raise QuantizationError(f"threshold {threshold} is {threshold_int} units of 2**{e}, outside 1..{vmax}")
        b = np.zeros((), np.int64) if bias is None else bias_units(_np(bias), e)
        if np.abs(b).max(initial=0) > vmax:
            raise QuantizationError(f"bias of up to {np.abs(_np(bias)).max():.6g} does not fit {spec.state_bits}-bit "
                                    f"state in units of 2**{e}")
        if not 0.0 <= decay <= 1.0:
            raise QuantizationError(f"decay must be in [0, 1], got {decay}")
        return cls(e, threshold_int, np.asarray(b, np.int64), round(decay * DECAY_ONE), reset, spec.state_bits)


def _bias_for(bias_int, ndim: int):
    """Per-channel ``[C]`` bias shaped to broadcast on one step ``[B, C, ...]`` (ndim = dims of one step)."""
    b = np.asarray(bias_int, np.int64)
    return b.reshape(-1, *([1] * (ndim - 2))) if b.ndim == 1 else b


def fixed_point_run(x_int, neuron: FixedPointNeuron) -> tuple[np.ndarray, int]:
    """All steps of ``x_int`` ``[num_steps, B, C, ...]`` (integers, bias excluded) from ``v = 0``: each step
    :func:`fixed_point_step` on ``x_int[t] + bias_int``. Returns ``(spikes bool [num_steps, ...], saturations)``,
    saturations = number of (neuron, step) pairs whose state was clipped."""
    x = np.asarray(x_int, np.int64)
    b = _bias_for(neuron.bias_int, x.ndim - 1)
    v = np.zeros(x.shape[1:], np.int64)
    spikes, n_sat = [], 0
    for t in range(x.shape[0]):
        s, v, sat = fixed_point_step(v, x[t] + b, neuron.threshold_int, neuron.decay_q12, neuron.reset,
                                     neuron.state_bits)
        spikes.append(s)
        n_sat += int(sat.sum())
    return np.stack(spikes), n_sat


def fixed_point_run_torch(x_int: torch.Tensor, neuron: FixedPointNeuron) -> tuple[torch.Tensor, int]:
    """Torch twin of :func:`fixed_point_run`."""
    x = x_int.to(torch.int64)
    b = torch.as_tensor(_bias_for(neuron.bias_int, x.ndim - 1), device=x.device)
    v = torch.zeros(x.shape[1:], dtype=torch.int64, device=x.device)
    spikes, n_sat = [], 0
    for t in range(x.shape[0]):
        s, v, sat = fixed_point_step(v, x[t] + b, neuron.threshold_int, neuron.decay_q12, neuron.reset,
                                           neuron.state_bits)
        spikes.append(s)
        n_sat += int(sat.sum())
    return torch.stack(spikes), n_sat
