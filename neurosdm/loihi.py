"""Loihi / Lava neuron parameters of a neurosdm fixed-point neuron (the one conversion: :func:`loihi_params`).

Lava's bit-accurate LIF (``lava.proc.lif.models.PyLifModelBitAcc``, Loihi 1's arithmetic; lava-nc 0.10) keeps a
current ``u`` and a voltage ``v``, both 24-bit, and per step, for a synaptic input ``a`` (declared int16)::

    u <- wrap24( sign(u k_u) (|u k_u| >> 12) + (a << 6) ),      k_u = 4096 - (du + 1),   du in 0..4095
    v <- clip24( sign(v k_v) (|v k_v| >> 12) + u + (bias_mant << bias_exp) ),  k_v = 4096 - dv,  dv in 0..4095
    s  = v > (vth << 6);     v <- 0 where s                     vth in 0..2**17 - 1, bias_mant 13-bit signed,
                                                                  bias_exp in 0..7, clip24 = clip to +-(2**23 - 1)

neurosdm's fixed-point neuron (:mod:`neurosdm.quantize`), in integer units ``U = 2**E`` of its state::

    h = sign(v d) (|v d| >> 12) + x + b,   h <- clip(h, +-V);   s = h >= T;   v <- 0 where s (hard reset)

Mapping (``x`` = the conv output without bias, which Lava receives as ``a``; Lava's state is then ``64`` times
ours, "Lava's internal units")::

    du        = 4095                          u holds this step's input only (k_u = 0): our neuron has no current
    dv        = 4096 - decay_q12              (decay_q12 = 4096: integrate-and-fire, dv = 0)
    vth       = T - 1                         64 h > 64 (T - 1)  <=>  h >= T   for integers h, T
    bias_mant << bias_exp = 64 b             bias_exp = 6 (bias in units of the synaptic input, as netx writes
                                              it; lava-dl's netx fixes 6) when |b| <= 4095, else 7 if b is even and
                                              |b| / 2 <= 4095; anything else does not fit Loihi's 13-bit mantissa

For integrate-and-fire (``dv = 0``) the two neurons are the same up to the factor 64, spike for spike, while
neither saturates. With a leak, Lava truncates ``v k_v`` at 64 times our resolution, so it is a different
(finer) rounding; the bit-exact twin is neurosdm's :func:`neurosdm.quantize.fixed_point_step` run in Lava's
internal units (:meth:`LoihiParams.lava_units`: input ``a << 6``, bias ``bias_mant << bias_exp``, threshold
``(vth << 6) + 1``, ``decay_q12 = 4096 - dv``, 24-bit state). A CubaLIF's synaptic current maps to
``du = 4095 - round(4096 (1 - dt / tau_syn))`` (Lava's ``u`` keeps ``(4095 - du) / 4096`` per step); Lava's
process has a current, neurosdm's fixed-point step does not, so only ``du = 4095`` has a neurosdm twin.

What Loihi's LIF cannot represent raises :class:`~neurosdm.errors.QuantizationError`: reset by subtraction (Lava's
LIF resets to 0), decay 0 (``dv`` would be 4096), a current that never decays (``du`` would be -1), thresholds
outside ``1..2**17``, thresholds or decays that differ within one layer (Lava's ``vth``, ``du``, ``dv`` are per
process), biases outside the 13-bit mantissa, non-integer or per-neuron-varying values where integers are needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import nir
import numpy as np

from neurosdm.dynamics import Reset, fixed_point_step
from neurosdm.errors import QuantizationError
from neurosdm.quantize import DECAY_ONE, FixedPointNeuron, bias_units, threshold_units

__all__ = ["LoihiParams", "loihi_params", "loihi_params_from_neuron", "loihi_params_from_nir", "ACT_SHIFT",
           "VTH_SHIFT", "VTH_MAX", "BIAS_MANT_MAX", "BIAS_EXP_MAX", "DECAY_MAX", "STATE_BITS", "NETX_BIAS_EXP"]

ACT_SHIFT = 6          # Lava left-shifts the synaptic input by 6 bits (MSB alignment)
VTH_SHIFT = 6          # ... and the threshold mantissa by 6 bits
VTH_MAX = (1 << 17) - 1  # vth: unsigned 17-bit
BIAS_MANT_MAX = (1 << 12) - 1  # bias_mant: signed 13-bit, -4096..4095 (symmetric bound used: +-4095)
BIAS_EXP_MAX = 7       # bias_exp: 3-bit, 0..7
DECAY_MAX = DECAY_ONE - 1  # du, dv: unsigned 12-bit, 0..4095
STATE_BITS = 24        # u and v are 24-bit
NETX_BIAS_EXP = 6      # lava-dl netx reads the bias as bias_mant with bias_exp = 6


@dataclass(frozen=True)
class LoihiParams:
    """Parameters of one Lava ``LIF`` process (``lava.proc.lif.process.LIF``), bit-accurate model.

    ``bias_mant`` is 0-d or per channel ``[C]`` (int64); ``bias_exp`` is one exponent for the layer. ``unit_exponent``
    is neurosdm's state unit ``E`` (Lava's input ``a`` counts units of ``2**E``, its state units of
    ``2**(E - 6)``)."""

    du: int
    dv: int
    vth: int
    bias_mant: np.ndarray
    bias_exp: int
    unit_exponent: int = 0

    @property
    def effective_threshold(self) -> int:
        """``vth << 6``: Lava fires when ``v > vth << 6``."""
        return self.vth << VTH_SHIFT

    @property
    def effective_bias(self) -> np.ndarray:
        """``bias_mant << bias_exp`` in Lava's internal units (64 times the input's)."""
        return np.asarray(self.bias_mant, np.int64) << self.bias_exp

    def netx_neuron(self) -> dict:
        """The ``neuron`` group of a lava-dl netx layer: netx builds ``LIF(du=iDecay - 1, dv=vDecay,
        vth=vThMant, bias_exp=6)``, so ``iDecay = du + 1``; ``refDelay`` 1 (no refractory period)."""
        if self.bias_exp != NETX_BIAS_EXP:
            raise QuantizationError(f"netx reads biases with exponent {NETX_BIAS_EXP}; this layer needs "
                                    f"{self.bias_exp} (a bias above {BIAS_MANT_MAX} units)")
        return {"type": "CUBA", "iDecay": self.du + 1, "vDecay": self.dv, "vThMant": self.vth, "refDelay": 1,
                "gradedSpike": False}

    def netx_bias(self) -> np.ndarray:
        """The netx ``bias`` (``bias_mant``, exponent 6): the bias in units of the synaptic input."""
        if self.bias_exp != NETX_BIAS_EXP:
            self.netx_neuron()  # raises with the reason
        return np.asarray(self.bias_mant, np.int64)

    def lava_units(self, state_bits: int = STATE_BITS) -> FixedPointNeuron:
        """neurosdm's fixed-point neuron that is bit-exact with this Lava LIF when fed ``a << 6`` (``du = 4095``):
        ``threshold_int = (vth << 6) + 1``, ``bias_int = bias_mant << bias_exp``, ``decay_q12 = 4096 - dv``,
        hard reset, ``state_bits`` (Lava: 24). ``v > vth << 6`` is ``v >= (vth << 6) + 1`` on integers."""
        if self.du != DECAY_MAX:
            raise QuantizationError(f"du = {self.du}: only du = {DECAY_MAX} (no synaptic current) has a neurosdm "
                                    "fixed-point twin")
        return FixedPointNeuron(self.unit_exponent - ACT_SHIFT, self.effective_threshold + 1,
                                self.effective_bias, DECAY_ONE - self.dv, "hard", state_bits)


def _one_value(a, what: str, name: str) -> float:
    u = np.unique(np.asarray(a, np.float64))
    if u.size != 1:
        raise QuantizationError(f"{name}: Lava's LIF has one {what} per layer, got {u.size} different values "
                                f"({', '.join(f'{v:g}' for v in u[:3])}...)")
    return float(u[0])


def _integer(a, what: str, name: str) -> np.ndarray:
    a = np.asarray(a, np.float64)
    if not np.all(np.isfinite(a)) or not np.array_equal(np.rint(a), a):
        raise QuantizationError(f"{name}: {what} must be integers in the state unit, got e.g. "
                                f"{a[np.rint(a) != a].flat[0] if a.size else a!r}")
    return np.rint(a).astype(np.int64)


def loihi_params(threshold_int, decay_q12: int = DECAY_ONE, bias_int=0, reset: str = "hard",
                 current_decay_q12: int = 0, unit_exponent: int = 0, name: str = "neuron") -> LoihiParams:
    """Lava/Loihi LIF parameters of a fixed-point neuron given in integer units of its state (module docstring):
    ``du = 4095 - current_decay_q12``, ``dv = 4096 - decay_q12``, ``vth = T - 1``, ``bias_mant << bias_exp = 64 b``.

    ``threshold_int`` (T) and ``decay_q12`` must be one value per layer (arrays of equal values are accepted),
    ``bias_int`` 0-d or per channel, all integers. ``current_decay_q12`` is the kept fraction of a synaptic
    current in 1/4096 (0: no current, as neurosdm's neurons). Raises :class:`QuantizationError` (naming ``name``)
    for what Loihi's LIF cannot represent."""
    if Reset.parse(reset) is not Reset.ZERO:
        raise QuantizationError(f"{name}: reset {reset!r}: Lava's LIF resets the voltage to 0 (reset by "
                                "subtraction needs Loihi 2 microcode, not lava.proc.lif)")
    t = int(_integer(_one_value(threshold_int, "threshold", name), "thresholds", name))
    if not 1 <= t <= VTH_MAX + 1:
        raise QuantizationError(f"{name}: threshold {t} units is outside Loihi's 1..{VTH_MAX + 1} "
                                f"(vth = T - 1 is an unsigned 17-bit mantissa): the state unit is too fine for Loihi")
    d = int(_integer(_one_value(decay_q12, "decay", name), "decays", name))
    if d == 0:
        raise QuantizationError(f"{name}: decay 0 (the voltage forgets everything each step) has no Loihi "
                                f"form: dv = 4096 - decay_q12 would be 4096, above the 12-bit maximum {DECAY_MAX}")
    if not 1 <= d <= DECAY_ONE:
        raise QuantizationError(f"{name}: decay_q12 {d} is outside 1..{DECAY_ONE}")
    cd = int(_integer(_one_value(current_decay_q12, "current decay", name), "current decays", name))
    if cd == DECAY_ONE:
        raise QuantizationError(f"{name}: a synaptic current that never decays has no Loihi form (du would be -1: "
                                "Lava's u keeps at most 4095/4096 per step)")
    if not 0 <= cd < DECAY_ONE:
        raise QuantizationError(f"{name}: current decay_q12 {cd} is outside 0..{DECAY_MAX}")
    b = _integer(bias_int, "biases", name)
    big = int(np.abs(b).max(initial=0))
    if big <= BIAS_MANT_MAX:
        mant, exp = b, NETX_BIAS_EXP
    elif big <= 2 * BIAS_MANT_MAX and not np.any(b % 2):
        mant, exp = b // 2, BIAS_EXP_MAX
    else:
        raise QuantizationError(f"{name}: a bias of {big} units does not fit Loihi's 13-bit bias mantissa "
                                f"(|bias| <= {BIAS_MANT_MAX} at exponent 6, or even and <= {2 * BIAS_MANT_MAX} "
                                "at exponent 7): the state unit is too fine for this bias on Loihi")
    return LoihiParams(du=DECAY_MAX - cd, dv=DECAY_ONE - d, vth=t - 1, bias_mant=np.asarray(mant, np.int64),
                       bias_exp=exp, unit_exponent=int(unit_exponent))


def loihi_params_from_neuron(neuron: FixedPointNeuron, name: str = "neuron") -> LoihiParams:
    """:func:`loihi_params` of a :class:`neurosdm.quantize.FixedPointNeuron` (24-bit state expected: Loihi's;
    a neuron of another width is refused)."""
    if neuron.state_bits != STATE_BITS:
        raise QuantizationError(f"{name}: a {neuron.state_bits}-bit state; Loihi's is {STATE_BITS}-bit")
    return loihi_params(neuron.threshold_int, neuron.decay_q12, neuron.bias_int, neuron.reset,
                        unit_exponent=neuron.weight_exponent, name=name)


def loihi_params_from_nir(node, dt: float = 1.0, unit_exponent: int = 0, bias=None, reset: str = "zero",
                          name: str = "neuron") -> LoihiParams:
    """:func:`loihi_params` of a NIR ``IF``, ``LIF`` or ``CubaLIF`` node (forward Euler, the rules of
    :mod:`neurosdm.simulators.reference`) whose input, in units of ``2**unit_exponent``, is the weighted sum
    ``x`` (its conv/affine output without bias) and whose bias (``bias``, float, same units as the node's
    input; 0 if None) is added each step::

        IF:      v <- v + r dt x                           gain r dt = 1 needed;  decay 1
        LIF:     v <- (1 - dt/tau) v + dt/tau (v_leak + r x)       gain r dt/tau = 1;  decay_q12 =
                                                                    round(4096 (1 - dt/tau)); v_leak dt/tau joins b
        CubaLIF: i <- (1 - dt/tau_syn) i + dt/tau_syn w_in x;  v <- (1 - dt/tau_mem) v + dt/tau_mem (v_leak + r i)
                 gains w_in dt/tau_syn = 1 and r dt/tau_mem = 1; current_decay_q12 = round(4096 (1 - dt/tau_syn))

    Thresholds become ``T = ceil(v_threshold / 2**E)`` and biases ``round_half_even(b / 2**E)``
    (:func:`neurosdm.quantize.threshold_units`, :func:`~neurosdm.quantize.bias_units`; exact for a quantised
    export, whose values are already integers with ``E = 0``); ``v_reset`` must be 0 and ``reset`` "zero"
    (the graph's reset rule: ``"subtract"`` raises). A CubaLIF's bias enters Lava's ``v`` directly, not through
    the current. Gains other than 1 (fold them into the weights first), other node types and the
    non-representable values of :func:`loihi_params` raise :class:`QuantizationError`."""
    e = int(unit_exponent)
    kind = type(node).__name__
    if not isinstance(node, (nir.IF, nir.LIF, nir.CubaLIF)):
        raise QuantizationError(f"{name}: {kind} has no Loihi LIF form here (IF, LIF and CubaLIF do)")
    dt = float(dt)

    def gain_one(g, what):
        if not np.allclose(np.asarray(g, np.float64), 1.0, rtol=0, atol=1e-9):
            raise QuantizationError(f"{name}: the input gain {what} is {_one_value(g, 'gain', name):g}, not 1: fold "
                                    "it into the weights first (Loihi adds the input unscaled)")

    v_reset = np.asarray(getattr(node, "v_reset", 0.0), np.float64)
    if np.any(v_reset != 0):
        raise QuantizationError(f"{name}: v_reset must be 0 (Lava's LIF resets to 0)")
    b = np.zeros(()) if bias is None else np.asarray(bias, np.float64)
    current = 0
    if isinstance(node, nir.IF):
        gain_one(np.asarray(node.r) * dt, "r dt")
        decay = DECAY_ONE
    else:
        tau = np.asarray(node.tau if isinstance(node, nir.LIF) else node.tau_mem, np.float64)
        gain_one(np.asarray(node.r) * dt / tau, "r dt / tau_mem")
        decay = round((1.0 - dt / _one_value(tau, "tau_mem", name)) * DECAY_ONE)
        b = b + np.asarray(node.v_leak, np.float64) * dt / tau
        if isinstance(node, nir.CubaLIF):
            tau_syn = np.asarray(node.tau_syn, np.float64)
            gain_one(np.asarray(getattr(node, "w_in", 1.0)) * dt / tau_syn, "w_in dt / tau_syn")
            current = round((1.0 - dt / _one_value(tau_syn, "tau_syn", name)) * DECAY_ONE)
    th = threshold_units(node.v_threshold, e)
    b_int = bias_units(b, e)
    if b_int.ndim > 1:  # per-neuron values of a channel-wise quantity: one per channel (axis 0)
        flat = b_int.reshape(b_int.shape[0], -1)
        if np.any(flat != flat[:, :1]):
            raise QuantizationError(f"{name}: the bias varies within a channel; Lava's netx bias is per channel")
        b_int = flat[:, 0]
    return loihi_params(th, decay, b_int, reset, current, e, name)


def run_in_lava_units(a: np.ndarray, params: "LoihiParams") -> tuple[np.ndarray, np.ndarray, int]:
    """neurosdm's fixed-point step in Lava's internal units (:meth:`LoihiParams.lava_units`) on Lava's input
    activations ``a [T, B, C, H, W]`` (int): ``(spikes, v, saturations)``, to compare with
    :func:`neurosdm.hardware.lava.lava_lif_run` bit for bit."""

    n = params.lava_units()
    b = np.asarray(n.bias_int, np.int64)[..., None, None]  # [B, C, 1, 1]
    v = np.zeros(a.shape[1:], np.int64)
    spikes, vs, sat = [], [], 0
    for t in range(a.shape[0]):
        x = (a[t].astype(np.int64) << ACT_SHIFT) + b
        s, v, sat_t = fixed_point_step(v, x, n.threshold_int, n.decay_q12, n.reset, n.state_bits)
        spikes.append(s)
        vs.append(v)
        sat += int(sat_t.sum())
    return np.stack(spikes), np.stack(vs), sat
