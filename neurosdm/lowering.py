"""Exact weight rewrites that put the spiking UNet into core NIR (Conv2d, Affine, IF, ...).

All functions are pure: they take weights (numpy arrays or torch tensors) and return numpy arrays of the
weight's dtype; internal arithmetic is float64, so float64 inputs give results exact to float64 rounding.
Conv weights are ``[Cout, Cin, kh, kw]``; feature maps are ``[..., C, H, W]`` (any leading time/batch axes).

Rewrites (each is exact, the tests check it against the torch computation it replaces):

- eval BatchNorm folds into the preceding conv (:func:`fold_batchnorm`, :func:`affine_of_batchnorm`);
- ``conv(cat(a, b, ...)) == conv_a(a) + conv_b(b) + ...`` (:func:`split_concat_conv`);
- nearest x2 upsampling then conv3x3 is a polyphase low-resolution conv3x3 (:func:`upsample_conv_phases`),
  packed into channels (:func:`pack_phases`) so that it stays one ``Conv2d``;
- a conv between two space-to-depth-packed maps is a conv on the packed maps (:func:`packed_conv`), and a conv
  from an unpacked map into a packed one is a strided conv (:func:`full_to_packed_conv`).

Packing (space-to-depth) convention, the same as ``torch.nn.functional.pixel_unshuffle(x, 2)``::

    packed[c*4 + a*2 + b, i, j] = full[c, 2i + a, 2j + b]          a, b in {0, 1}

Packing ``L`` times nests the phases; the first packing (``a_1``, the lowest bit of the offset) is the most
significant digit after ``c``::

    packed_L[c*4**L + sum_l (a_l*2 + b_l) * 4**(L-l), i, j]
        = full[c, 2**L i + sum_l a_l 2**(l-1), 2**L j + sum_l b_l 2**(l-1)]

so a per-channel vector (bias, BN scale) of the packed map is ``np.repeat(v, 4**L)`` (:func:`pack_bias`).

How a UNet is lowered with these: the down path stays at its own resolutions (stride-2 convs are core NIR).
The up path cannot unpack (NIR has no depth-to-space or transposed conv), so every map after the k-th upsampling
is stored packed k times on the grid of the lowest resolution. At up level L (L upsamplings done):

- a conv3x3 / 1x1 between up-path maps: ``packed_conv(w, L)``: ``[4**L Cout, 4**L Cin, 3, 3]`` (1x1 stays 1x1);
- the skip half of a concat (a down-path map at that level's resolution, unpacked): ``full_to_packed_conv(w, L)``:
  ``[4**L Cout, Cin, 2**L + k - 1, ...]``, stride ``2**L``, padding ``(k-1)//2``;
- the upsampling conv into level L: ``packed_conv(pack_phases(upsample_conv_phases(w)), L-1)``;
- IF neurons, biases, BN and the readout are per element or per channel, so they act on packed maps unchanged
  (channel vectors repeated by :func:`pack_bias`); the network output is packed ``Lmax`` times and the host
  unpacks it with :func:`depth_to_space`.

Weights stored by the packed up path (:func:`neurosdm.exporters.packing.packed_weight_overhead`: conv weights of
``upblocks`` and the
head, "nonzero" = structurally non-zero entries; the stem and the down path are unchanged)::

    preset         up level  original   packed stored           packed nonzero
    tiny           0         54,272     54,272                  54,272
    (ch 16,        1         26,777     276,880        (10.3x)  86,628       (3.2x)
     ch_mult 1,2)  up path   81,049     331,152        (4.1x)   140,900      (1.7x)
                   model     141,609    391,712        (2.8x)
    small          0         356,352    356,352                 356,352
    (ch 32,        1         372,736    4,702,208      (12.6x)  1,409,024    (3.8x)
     ch_mult 1,2,2 2         136,489    22,554,880     (165x)   1,856,144    (13.6x)
     2 res blocks) up path   865,577    27,613,440     (31.9x)  3,621,520    (4.2x)
                   model     1,384,009  28,131,872     (20.3x)
    paper-cifar10  up path   38,358,481 6,877,941,760  (179x)   260,011,072  (6.8x)   (level 3: 2580x stored)

(all with the "sdm" head; "model" = every conv weight of the model.) Per level a packed conv stores 16x (4x on
each side) and holds 4x as many non-zeros (each weight repeated once per phase); the non-zeros equal the
original full-resolution multiply-accumulates per base-grid pixel, so a sparse simulator pays no extra compute,
a dense one pays 4**L times more MACs and 16**L times more weights at level L.

TSM (a per-spiking-step scale ``p[t]`` on a conv's output, bias included: ``y[t] = p[t] (W * s[t] + b)``)
--------------------------------------------------------------------------------------------------------
It cannot be folded into a time-invariant weight: a NIR node applies the same ``W'`` at every step, and
``W' s = p[t] W s`` for all spike maps ``s`` and all ``t`` forces ``p[0] = p[1] = ...`` (or ``W = 0``). Exact
alternatives, checked numerically (IF, hard reset, ``>=`` threshold):

- one weight copy per step, ``(p[t] W, p[t] b)``, selected by the step index: exact, but the graph is then
  time-varying (an extension node or a simulator-side weight bank; core NIR has no step index).
- BatchNorm after TSM: ``BN(p[t] z) = p[t] (scale z) + shift``: fold ``scale`` into ``W, b`` but keep ``shift``
  outside the ``p[t]`` (:func:`fold_batchnorm`'s bias would be wrong there).
- the first conv (its input comes from the host): feed ``p[t] [x; 1]`` and put the bias on the centre tap of an
  extra all-ones input channel (the centre tap never reads padding): exact, time-invariant weights.
- folding ``p[t]`` into the downstream IF neuron's threshold alone (``theta / p[t]``) is NOT exact (the neuron
  integrates ``sum p[tau] z[tau]``; about 5% of spikes differed in a random test). Exact is a neuron whose
  membrane is divided by ``p[t]``: ``v'[t] = (p[t-1]/p[t]) v'[t-1] + z[t]``, threshold ``theta / p[t]``, which
  needs ``p[t] > 0``, time-varying decay and threshold (not a NIR IF/LIF), that every input of that neuron
  carries the same ``p[t]``, and that unscaled inputs (BN shift, time embedding, a residual from another conv)
  are divided by ``p[t]`` too, i.e. time-varying biases. Equal up to float rounding at the threshold.
- if all ``p[t]`` are equal, fold ``p`` into ``W`` and ``b``: exact.
"""

from __future__ import annotations

import numpy as np


def _np(x) -> np.ndarray:
    """A numpy array from a numpy array or a torch tensor (detached, on the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


# --------------------------------------------------------------------------------------------------- BatchNorm


def affine_of_batchnorm(bn) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode BatchNorm as a per-channel affine map ``BN(z) = scale * z + shift``::

        scale = gamma / sqrt(running_var + eps),    shift = beta - running_mean * scale

    (``gamma = 1, beta = 0`` without ``affine``). Returns float64 ``(scale, shift)``, each ``[C]``.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm without running statistics cannot be folded (track_running_stats=False)")
    mean = _np(bn.running_mean).astype(np.float64)
    var = _np(bn.running_var).astype(np.float64)
    gamma = _np(bn.weight).astype(np.float64) if bn.weight is not None else np.ones_like(mean)
    beta = _np(bn.bias).astype(np.float64) if bn.bias is not None else np.zeros_like(mean)
    scale = gamma / np.sqrt(var + float(bn.eps))
    return scale, beta - mean * scale


def fold_batchnorm(weight, bias, bn) -> tuple[np.ndarray, np.ndarray]:
    """Fold eval-mode ``bn`` into the conv before it: ``BN(W * x + b) = W' * x + b'`` with::

        W'[o] = scale[o] * W[o],    b'[o] = scale[o] * b[o] + shift[o]      (see affine_of_batchnorm)

    ``bias`` may be None (zero). Works for any weight ``[Cout, ...]`` (conv or linear). Not for a TSM conv, whose
    ``p[t]`` sits between conv and BN: there ``BN(p[t] (W x + b)) = p[t] (W' x + scale b) + shift``.
    """
    w = _np(weight)
    scale, shift = affine_of_batchnorm(bn)
    b = np.zeros(w.shape[0]) if bias is None else _np(bias).astype(np.float64)
    w_new = w.astype(np.float64) * scale.reshape(-1, *([1] * (w.ndim - 1)))
    return w_new.astype(w.dtype), (scale * b + shift).astype(w.dtype)


# ------------------------------------------------------------------------------------------------------ concat


def split_concat_conv(weight, sizes, bias=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split a conv over concatenated inputs into one conv per input, summed::

        conv(cat(x_0, ..., x_n), W, b) = sum_i conv(x_i, W[:, o_i : o_i + sizes[i]], b_i)

    with ``o_i = sizes[0] + ... + sizes[i-1]``, ``b_0 = b`` and ``b_i = 0`` for ``i > 0`` (the bias goes to the
    first part only). Returns ``[(weight_i, bias_i), ...]``; stride and padding are those of the original conv.
    """
    w = _np(weight)
    if sum(sizes) != w.shape[1]:
        raise ValueError(f"sizes {list(sizes)} do not add up to the {w.shape[1]} input channels")
    b = np.zeros(w.shape[0], w.dtype) if bias is None else _np(bias).astype(w.dtype)
    parts, start = [], 0
    for i, n in enumerate(sizes):
        parts.append((w[:, start:start + n].copy(), b.copy() if i == 0 else np.zeros_like(b)))
        start += n
    return parts


# ------------------------------------------------------------------------------------------ space-to-depth maps


def space_to_depth(full, levels: int = 1) -> np.ndarray:
    """``[..., C, H, W] -> [..., 4C, H/2, W/2]``: ``out[c*4 + a*2 + b, i, j] = full[c, 2i + a, 2j + b]``
    (``pixel_unshuffle(x, 2)``), applied ``levels`` times."""
    x = _np(full)
    for _ in range(levels):
        *lead, c, h, w = x.shape
        x = x.reshape(*lead, c, h // 2, 2, w // 2, 2)
        x = np.moveaxis(x, (-3, -1), (-4, -3))  # [..., c, 2(a), 2(b), h/2, w/2]
        x = x.reshape(*lead, c * 4, h // 2, w // 2)
    return x


def depth_to_space(packed, channels: int | None = None, levels: int = 1) -> np.ndarray:
    """Inverse of :func:`space_to_depth`: ``[..., 4C, H, W] -> [..., C, 2H, 2W]`` (``pixel_shuffle(x, 2)``),
    applied ``levels`` times. ``channels``, if given, is the expected final C (a check)."""
    x = _np(packed)
    for _ in range(levels):
        *lead, c4, h, w = x.shape
        x = x.reshape(*lead, c4 // 4, 2, 2, h, w)
        x = np.moveaxis(x, (-4, -3), (-3, -1))  # [..., c, h, 2(a), w, 2(b)]
        x = x.reshape(*lead, c4 // 4, 2 * h, 2 * w)
    if channels is not None and x.shape[-3] != channels:
        raise ValueError(f"expected {channels} channels after depth_to_space, got {x.shape[-3]}")
    return x


def pack_bias(vector, levels: int = 1) -> np.ndarray:
    """A per-channel vector (bias, BN scale or shift) of a map packed ``levels`` times: ``v[c]`` for every
    packed channel ``c * 4**levels + k``, i.e. ``np.repeat(v, 4**levels)``."""
    return np.repeat(_np(vector), 4**levels)


# ---------------------------------------------------------------------------------------- nearest x2 + conv3x3


def _phase_taps(a: int) -> np.ndarray:
    """``M[ky, d] = 1`` when tap ``ky`` of a conv3x3 at output row ``2i + a`` of a nearest-x2 map reads low-res
    row ``i + d - 1``: ``d - 1 = floor((a + ky - 1) / 2)``."""
    m = np.zeros((3, 3))
    for ky in range(3):
        m[ky, (a + ky - 1) // 2 + 1] = 1.0
    return m


def upsample_conv_phases(weight) -> np.ndarray:
    """Polyphase form of ``conv3x3(nearest_x2(x), W)`` (stride 1, padding 1) ``-> [2, 2, Cout, Cin, 3, 3]``.

    With ``u[p, q] = x[p // 2, q // 2]``, output pixel ``(2i + a, 2j + b)`` reads ``x[i + dy, j + dx]`` through
    tap ``(ky, kx)`` with ``dy = floor((a + ky - 1) / 2)``, ``dx = floor((b + kx - 1) / 2)``, so::

        y[c, 2i + a, 2j + b] = bias[c] + conv3x3(x, P[a, b], padding 1)[c, i, j]
        P[a, b][:, :, dy + 1, dx + 1] = sum of W[:, :, ky, kx] over the taps with that (dy, dx)

    (padding agrees: u's row -1 and row 2H are x's rows -1 and H). Each phase keeps 2 x 2 of its 9 taps (a=0:
    ky 1, 2 merge; a=1: ky 0, 1 merge), so 16 of the 36 taps per output position are non-zero.
    """
    w = _np(weight)
    if w.shape[2:] != (3, 3):
        raise ValueError(f"expected a 3x3 kernel, got {w.shape[2:]}")
    m = [_phase_taps(0), _phase_taps(1)]
    phases = np.empty((2, 2, *w.shape), np.float64)
    for a in range(2):
        for b in range(2):
            phases[a, b] = np.einsum("yd,xe,oiyx->oide", m[a], m[b], w.astype(np.float64))
    return phases.astype(w.dtype)


def pack_phases(phase_weights) -> np.ndarray:
    """``[2, 2, Cout, Cin, 3, 3] -> [4 Cout, Cin, 3, 3]``: packed output channel ``c*4 + a*2 + b`` is phase
    ``(a, b)`` of channel ``c``, so ``depth_to_space(conv3x3(x, packed)) == conv3x3(nearest_x2(x), W)``. The bias
    is ``pack_bias(bias)``."""
    p = _np(phase_weights)
    _, _, cout, cin, kh, kw = p.shape
    return np.ascontiguousarray(p.transpose(2, 0, 1, 3, 4, 5)).reshape(4 * cout, cin, kh, kw)


# ------------------------------------------------------------------------------------------ convs on packed maps


def _packed_conv_once(w: np.ndarray) -> np.ndarray:
    cout, cin, k, _ = w.shape
    pad = (k - 1) // 2
    r = (pad + 1) // 2  # packed offsets run over -r..r
    kp = 2 * r + 1
    q = np.zeros((cout, 4, cin, 4, kp, kp), np.float64)
    for a in range(2):
        for b in range(2):
            for ky in range(k):
                di, a_in = divmod(a + ky - pad, 2)
                for kx in range(k):
                    dj, b_in = divmod(b + kx - pad, 2)
                    q[:, a * 2 + b, :, a_in * 2 + b_in, di + r, dj + r] += w[:, :, ky, kx]
    return q.reshape(4 * cout, 4 * cin, kp, kp)


def packed_conv(weight, levels: int = 1) -> np.ndarray:
    """A "same" conv (odd k, stride 1, padding (k-1)/2) at full resolution, rewritten to act on packed maps:
    ``space_to_depth(conv(x, W)) == conv(space_to_depth(x), Q)``, ``Q: [4 Cout, 4 Cin, K, K]``, padding (K-1)/2.

    Output phase ``a`` tap ``ky`` reads full row ``2i + a + ky - pad = 2 (i + di) + a'`` with
    ``(di, a') = divmod(a + ky - pad, 2)``, so (likewise for columns)::

        Q[o*4 + a*2 + b, c*4 + a'*2 + b', di + r, dj + r] = W[o, c, ky, kx],     r = ceil(pad / 2)

    k = 3 gives K = 3 (each output phase spreads its 9 taps over 4 input phases: 36 non-zero of 144 per
    (o, c)); k = 1 gives K = 1 (block diagonal). Zero padding agrees because a packed row is out of range exactly
    when its full rows are. ``levels`` applies the rewrite repeatedly (maps packed ``levels`` times).
    """
    w = _np(weight)
    if w.shape[2] != w.shape[3] or w.shape[2] % 2 == 0:
        raise ValueError(f"expected a square odd kernel, got {w.shape[2:]}")
    q = w.astype(np.float64)
    for _ in range(levels):
        q = _packed_conv_once(q)
    return q.astype(w.dtype)


def packed_conv3x3(weight, levels: int = 1) -> np.ndarray:
    """:func:`packed_conv` for a 3x3 kernel (padding 1): ``[4**L Cout, 4**L Cin, 3, 3]``, padding 1."""
    if _np(weight).shape[2:] != (3, 3):
        raise ValueError("expected a 3x3 kernel")
    return packed_conv(weight, levels)


def packed_conv1x1(weight, levels: int = 1) -> np.ndarray:
    """:func:`packed_conv` for a 1x1 kernel: ``[4**L Cout, 4**L Cin, 1, 1]``, block diagonal over phases."""
    if _np(weight).shape[2:] != (1, 1):
        raise ValueError("expected a 1x1 kernel")
    return packed_conv(weight, levels)


def _phase_channel(a: int, b: int, levels: int) -> int:
    """Packed channel offset (within one original channel) of full-res offset ``(a, b)`` in ``[0, 2**L)^2``."""
    k = 0
    for lvl in range(levels):  # the first packing (lowest bit) is the most significant below c
        k = k * 4 + ((a >> lvl) & 1) * 2 + ((b >> lvl) & 1)
    return k


def full_to_packed_conv(weight, levels: int = 1) -> np.ndarray:
    """A "same" conv (odd k, padding p = (k-1)/2) reading an unpacked map and writing it packed ``levels`` times:
    ``space_to_depth(conv(x, W), levels) == conv(x, Q, stride=S, padding=p)`` with ``S = 2**levels`` and
    ``Q: [4**L Cout, Cin, S + k - 1, S + k - 1]``.

    Output (i, j) with full-res offset (A, B) in [0, S)^2 reads rows ``S i + A + ky - p``; the strided conv reads
    ``S i - p + u``, so ``Q[o * 4**L + phase(A, B), c, A + ky, B + kx] = W[o, c, ky, kx]`` (phase: the nested
    packing order of the module docstring). A 3x3 conv into a once-packed map is a stride-2 4x4 conv.
    """
    w = _np(weight)
    cout, cin, k, k2 = w.shape
    if k != k2 or k % 2 == 0:
        raise ValueError(f"expected a square odd kernel, got {w.shape[2:]}")
    s, n = 2**levels, 4**levels
    q = np.zeros((cout, n, cin, s + k - 1, s + k - 1), w.dtype)
    for a in range(s):
        for b in range(s):
            q[:, _phase_channel(a, b, levels), :, a:a + k, b:b + k] = w
    return q.reshape(cout * n, cin, s + k - 1, s + k - 1)
