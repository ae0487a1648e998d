"""Geometry of convolutions and pools, once: padding, output sizes, which taps reach the output map, fan-out,
MACs, and the plain numpy convolution and window sum every numpy path uses.

Conventions (those of ``torch.nn.functional.conv2d``): cross-correlation, ``weight [C_out, C_in / groups, kh, kw]``,
padding per axis ``(before, after)``; output size per axis ``floor((n + before + after - d (k - 1) - 1) / s) + 1``.
An input position ``i`` reaches output ``o`` through tap ``j`` when ``i + before - j d = o s`` with
``0 <= o < n_out``.
"""

from __future__ import annotations

import numpy as np

from neurosdm.errors import GraphError
from neurosdm.graph.dialect import as_str

__all__ = ["as_tuple", "conv_padding", "out_size", "tap_mask", "valid_taps", "taps_per_position", "fanout",
           "conv2d", "sum_pool2d"]


def as_tuple(value, n: int, what: str, name: str) -> tuple[int, ...]:
    """An int or a per-axis sequence (list, numpy array as nir.read returns it) as ``n`` ints."""
    arr = np.asarray(value).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, n)
    if arr.size != n:
        raise GraphError(f"node {name!r}: {what} {value!r} must be an int or {n} ints")
    return tuple(int(v) for v in arr)


def conv_padding(padding, kernel, dilation, stride, name: str) -> tuple[tuple[int, int], ...]:
    """Per axis ``(before, after)`` zero padding for an int / per-axis / 'same' / 'valid' padding (torch rules:
    'same' puts ``floor(total / 2)`` of ``total = dilation (k - 1)`` before and needs stride 1)."""
    n = len(kernel)
    if isinstance(padding, np.ndarray) and padding.dtype.kind in "SUO" and padding.size == 1:
        padding = padding.reshape(-1)[0]
    if isinstance(padding, (bytes, str)):
        mode = as_str(padding).lower()
        if mode == "valid":
            return tuple((0, 0) for _ in range(n))
        if mode == "same":
            if any(s != 1 for s in stride):
                raise GraphError(f"node {name!r}: padding 'same' needs stride 1, got stride {stride}")
            total = [d * (k - 1) for k, d in zip(kernel, dilation)]
            return tuple((t // 2, t - t // 2) for t in total)
        raise GraphError(f"node {name!r}: padding must be 'same', 'valid' or ints, got {padding!r}")
    return tuple((p, p) for p in as_tuple(padding, n, "padding", name))


def out_size(n: int, pad: tuple[int, int], k: int, d: int, s: int) -> int:
    return (n + pad[0] + pad[1] - d * (k - 1) - 1) // s + 1


def tap_mask(n: int, pad: int, k: int, s: int, n_out: int, d: int = 1) -> np.ndarray:
    """``[n, k]`` bool: input position ``i`` and tap ``j`` reach an output position ``0..n_out-1``
    (``(i + pad - j d) % s == 0`` and ``0 <= (i + pad - j d) / s < n_out``)."""
    t = np.arange(n)[:, None] + pad - d * np.arange(k)[None, :]
    return (t >= 0) & (t % s == 0) & (t // s < n_out)


def valid_taps(n: int, pad: int, k: int, s: int, n_out: int) -> int:
    """Input positions ``0..n-1`` that tap ``k`` connects to an output position ``0..n_out-1``."""
    return int(np.count_nonzero(tap_mask(n, pad, k + 1, s, n_out)[:, k]))


def taps_per_position(n: int, pad: int, k: int, s: int, n_out: int) -> np.ndarray:
    """For every input position ``0..n-1``: how many of the ``k`` taps connect it to an output position."""
    return tap_mask(n, pad, k, s, n_out).sum(axis=1)


def fanout(weight: np.ndarray, in_shape: tuple[int, ...], stride, padding, dilation=(1, 1),
           groups: int = 1) -> np.ndarray:
    """``F`` int64 of the input's shape: per input element, the nonzero weights connecting it to output positions
    inside the output map. ``sum(F)`` is the dense MACs of one image and ``sum(F[x != 0])`` the synaptic
    operations of an input ``x``. ``in_shape`` is ``(Ci, H, W)``, or ``(Ci, W)`` for a Conv1d stored as a height-1
    Conv2d (``weight [Co, Ci / groups, 1, k]``, ``stride``, ``padding``, ``dilation`` of both axes)."""
    w = np.asarray(weight)
    co, cg, kh, kw = w.shape
    shape3 = tuple(in_shape) if len(in_shape) == 3 else (in_shape[0], 1, *in_shape[1:])
    ci, h, wd = shape3
    (pt, pb), (pl, pr) = padding
    ho = out_size(h, (pt, pb), kh, dilation[0], stride[0])
    wo = out_size(wd, (pl, pr), kw, dilation[1], stride[1])
    per = co // groups
    nz = (w != 0).reshape(groups, per, cg, kh, kw).sum(axis=1).reshape(ci, kh, kw).astype(np.int64)
    rows = tap_mask(h, pt, kh, stride[0], ho, dilation[0]).astype(np.int64)  # [H, kh]
    cols = tap_mask(wd, pl, kw, stride[1], wo, dilation[1]).astype(np.int64)  # [W, kw]
    return np.einsum("cab,ya,xb->cyx", nz, rows, cols).reshape(in_shape)


def conv2d(x: np.ndarray, weight: np.ndarray, bias, stride, padding, dilation=(1, 1), groups: int = 1) -> np.ndarray:
    """Cross-correlation of ``x [B, C_in, H, W]`` with ``weight [C_out, C_in/groups, kh, kw]`` (float64).

    ``padding`` is ``((top, bottom), (left, right))`` zeros. One einsum per kernel tap (``kh * kw`` of them) over
    the strided, dilated window of the padded input; the bias is added after the sum.
    """
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    B, C, H, W = x.shape
    c_out, c_g, kh, kw = w.shape
    (pt, pb), (pl, pr) = padding
    sh, sw = stride
    dh, dw = dilation
    ho, wo = out_size(H, (pt, pb), kh, dh, sh), out_size(W, (pl, pr), kw, dw, sw)
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    xg = xp.reshape(B, groups, c_g, xp.shape[2], xp.shape[3])
    wg = w.reshape(groups, c_out // groups, c_g, kh, kw)
    out = np.zeros((B, groups, c_out // groups, ho, wo))
    for ky in range(kh):
        for kx in range(kw):
            y0, x0 = ky * dh, kx * dw
            window = xg[:, :, :, y0:y0 + sh * (ho - 1) + 1:sh, x0:x0 + sw * (wo - 1) + 1:sw]
            out += np.einsum("goc,bgchw->bgohw", wg[:, :, :, ky, kx], window)
    out = out.reshape(B, c_out, ho, wo)
    if bias is not None:
        out = out + np.asarray(bias, dtype=np.float64).reshape(-1, 1, 1)
    return out


def sum_pool2d(x: np.ndarray, kernel, stride, padding) -> np.ndarray:
    """Sum over ``kernel`` windows of ``x [B, C, H, W]`` zero-padded by ``padding = (ph, pw)`` on each side."""
    x = np.asarray(x, dtype=np.float64)
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    B, C, H, W = x.shape
    ho, wo = out_size(H, (ph, ph), kh, 1, sh), out_size(W, (pw, pw), kw, 1, sw)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    out = np.zeros((B, C, ho, wo))
    for ky in range(kh):
        for kx in range(kw):
            out += xp[:, :, ky:ky + sh * (ho - 1) + 1:sh, kx:kx + sw * (wo - 1) + 1:sw]
    return out
