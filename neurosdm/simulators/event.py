"""Event-driven engine: spike-input convs computed by scattering the input events through their nonzero synapses.

``EventEngine(program).run(x, t)`` runs one network call of a :class:`~neurosdm.graph.program.Program` with the
step loop of :mod:`neurosdm.simulators.loop` on :class:`EventBackend`, whose kernels are those of the reference
(:mod:`neurosdm.simulators.reference`) except where events pay:

- **conv, input "spikes" / "graded"** (event-driven): the nonzero input elements are the events. Every event
  ``(b, c, y, x, v)`` adds ``v * W[o, c, ky, kx]`` to the output ``(b, o, oy, ox)`` for every tap ``(ky, kx)``
  whose output position ``oy = (y + pad_top - ky) / sh`` (an integer in ``0..Ho-1``; likewise ``ox``) exists,
  and only for the output channels ``o`` whose weight is nonzero. The kernel (:func:`_scatter`) writes a
  channel-last output buffer ``[B, Hp, Wp, Co]`` with a halo around the map: relative to the buffer address of
  ``(y + pad_top) // sh, (x + pad_left) // sw`` every tap of an event is a fixed offset that depends only on the
  input channel and the phase ``((y + pad_top) % sh, (x + pad_left) % sw)``, and the taps of one kernel row are
  side by side. So per (channel, phase) the nonzero weights of all taps are stored as one list of runs (offset,
  length, weights; output channels reordered per layer to make the runs long), and an event is one loop over
  its list, without bounds checks: taps outside the map land in the halo, which is cropped (and the channels
  put back in order) by :func:`_crop`. The work, and the count ``synops`` (``graded_ops``), is exactly the
  (event, nonzero synapse inside the map) pairs, counted by the kernel itself (the loop's fan-out rule counts the
  other layers: two independent countings, compared by the tests); the stored weights are the program's (int8
  mantissas for an int8 graph, times the layer's power-of-two scale after the sum), the indices int32, the buffer
  shared by the layers. The buffer is float32 where every sum is exact there (spike input, integer mantissas whose
  absolute sum over any output's fan-in is below 2**24: each partial sum is an integer below 2**24, whatever the
  order), half the memory traffic of float64; else float64. Without numba a vectorised numpy path
  (:func:`_scatter_numpy`) does the same additions and counts.
- **conv, input "analog"**: dense, im2col + one float64 matmul.
- **gconv** (Conv1d, groups, dilation): as conv, on the equivalent plain kernel (:func:`_plain_conv`).
- **affine**, spike / graded input: per image, the weight columns of the nonzero inputs times their values.
- everything else (pools, neurons, delays, ...): the reference's kernels.
"""

from __future__ import annotations

import numpy as np

from neurosdm.errors import ConfigError, GraphError
from neurosdm.graph.program import Layer, Program
from neurosdm.simulators.backend import Engine
from neurosdm.simulators.reference import ReferenceBackend

__all__ = ["EventEngine", "EventBackend", "HAVE_NUMBA", "ConvPlan", "scatter_kernel"]

try:  # the kernel; the numpy path below does the same work without it
    from numba import njit

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised by forcing use_numba=False in the tests
    HAVE_NUMBA = False

    def njit(*args, **kwargs):
        def wrap(fn):
            return fn
        return wrap(args[0]) if args and callable(args[0]) else wrap


@njit(cache=True, nogil=True)
def _scatter(x, out, rptr, rstart, rlen, roff, wv, nnz, cls_nnz, sh, sw, pt, pl, Ho, Wo, Hp, Wp, tY, tX,
             Co):  # pragma: no cover - compiled
    """Scatter the nonzero elements (events) of ``x [B, C, H, W]`` into ``out`` (flat ``[B, Hp, Wp, Co]``: the
    output map with a halo of ``tY`` rows / ``tX`` columns before it, channels in the plan's order) and count them.

    An event at ``(b, c, y, x)`` with ``ty = y + pt = qy * sh + py`` (likewise ``tx = qx * sw + px``) reaches the
    taps ``ky = py + sh * j``, ``kx = px + sw * i`` at the outputs ``(qy - j, qx - i)``: relative to the address
    ``base`` of ``(qy, qx)`` these are fixed offsets, so all its taps are the weight runs of one list ``g = (c,
    phase (py, px))`` (``rptr``; run ``q`` adds ``v * wv[roff[q]:roff[q] + rlen[q]]`` at ``base + rstart[q]``).
    Taps that fall outside the map land in the halo (discarded) and are not counted: the returned ``ops`` are the
    nonzero weights of the taps inside the map (``cls_nnz[g]`` for an event whose taps are all inside, else summed
    from ``nnz [C, kh, kw]``). The events are taken position by position (every channel of one input position
    before the next), so that consecutive events write the same output neighbourhood. Returns ``(events, ops)``."""
    B, C, H, W = x.shape
    kh, kw = nnz.shape[1], nnz.shape[2]
    S = sh * sw
    events = 0
    ops = 0
    for b in range(B):
        for y in range(H):
            ty = y + pt
            qy = ty // sh
            py = ty - qy * sh
            nj = (kh - py + sh - 1) // sh
            yin = qy - nj + 1 >= 0 and qy < Ho
            for xx in range(W):
                tx = xx + pl
                qx = tx // sw
                px = tx - qx * sw
                ni = (kw - px + sw - 1) // sw
                inside = yin and qx - ni + 1 >= 0 and qx < Wo
                base = ((b * Hp + qy + tY) * Wp + qx + tX) * Co
                cls = py * sw + px
                for c in range(C):
                    v = x[b, c, y, xx]
                    if v == 0.0:
                        continue
                    events += 1
                    g = c * S + cls
                    for q in range(rptr[g], rptr[g + 1]):
                        o0 = np.uint64(base + rstart[q])  # unsigned: no wraparound check, so it vectorises
                        j0 = np.uint64(roff[q])
                        for i in range(rlen[q]):
                            out[o0 + np.uint64(i)] += v * wv[j0 + np.uint64(i)]
                    if inside:
                        ops += cls_nnz[g]
                    else:
                        for j in range(nj):
                            oy = qy - j
                            if oy < 0 or oy >= Ho:
                                continue
                            for i in range(ni):
                                ox = qx - i
                                if ox >= 0 and ox < Wo:
                                    ops += nnz[c, py + sh * j, px + sw * i]
    return events, ops


@njit(cache=True, nogil=True)
def _crop(out, y, inv, Hp, Wp, tY, tX):  # pragma: no cover - compiled
    """``y [B, Co, Ho, Wo] = out [B, Hp, Wp, Co]`` without the halo, channel ``o`` read from slot ``inv[o]``."""
    B, Co, Ho, Wo = y.shape
    for b in range(B):
        for oy in range(Ho):
            for ox in range(Wo):
                base = ((b * Hp + oy + tY) * Wp + ox + tX) * Co
                for o in range(Co):
                    y[b, o, oy, ox] = out[base + inv[o]]


def _scatter_numpy(addr, vals, out, plan: "ConvPlan") -> int:
    """The same additions as :func:`_scatter`, vectorised over the events one tap at a time (dense over the output
    channels: adding the zero weights changes nothing); counts only the nonzero synapses."""
    p = plan
    out4 = out.reshape(-1, p.Ho, p.Wo, p.Co)
    b, r = np.divmod(addr, p.C * p.H * p.W)
    c, r = np.divmod(r, p.H * p.W)
    y, x = np.divmod(r, p.W)
    ops = 0
    for ky in range(p.kh):
        ty = y + p.pt - ky
        oy = ty // p.sh
        okh = (ty >= 0) & (ty % p.sh == 0) & (oy < p.Ho)
        for kx in range(p.kw):
            tx = x + p.pl - kx
            ox = tx // p.sw
            ok = okh & (tx >= 0) & (tx % p.sw == 0) & (ox < p.Wo)
            if not ok.any():
                continue
            cc = c[ok]
            np.add.at(out4, (b[ok], oy[ok], ox[ok]), vals[ok, None] * p.wt[cc, ky, kx])
            ops += int(p.nnz[cc, ky, kx].sum())
    return ops


def _runs(groups, max_gap: int, wdtype):
    """Per group (an input channel and phase: a list of segments ``(offset, weights)``, each a stretch of the
    output buffer relative to an event's base address), the runs of nonzero weights, runs closer than
    ``max_gap + 1`` slots merged (the zeros between them are then stored and multiplied: exact, and cheaper than
    starting a run). Returns ``(rptr, rstart, rlen, roff, wv)`` (CSR over groups; int32 indices, ``wv`` in
    ``wdtype``)."""
    rptr, rstart, rlen, roff, wv = [0], [], [], [], []
    n = 0
    for segs in groups:
        for off, row in segs:
            idx = np.flatnonzero(row)
            if idx.size:
                cut = np.flatnonzero(np.diff(idx) > max_gap + 1) + 1
                starts, ends = idx[np.r_[0, cut]], idx[np.r_[cut - 1, idx.size - 1]] + 1
                for a, b in zip(starts, ends):
                    rstart.append(off + a)
                    rlen.append(b - a)
                    roff.append(n)
                    wv.append(row[a:b])
                    n += b - a
        rptr.append(len(rstart))
    if n >= 2**31:
        raise GraphError("a conv layer with more than 2**31 stored weights")
    i32 = (lambda v: np.asarray(v, np.int32))
    return (i32(rptr), i32(rstart), i32(rlen), i32(roff),
            (np.concatenate(wv) if wv else np.zeros(0)).astype(wdtype))


RUN_COST = 8  # the work of starting a run, in stored weights (the channel-order search weighs runs by it)


def _cost(nz_rows: np.ndarray, max_gap: int, run_cost: int = RUN_COST) -> int:
    """Work of the runs of ``nz_rows`` (boolean, segments x slots): stored weights plus ``run_cost`` per run."""
    r, c = np.nonzero(nz_rows)  # row-major: the nonzeros of each row in ascending order
    gaps = np.diff(c)
    inside = r[1:] == r[:-1]  # gaps within one row
    merged = inside & (gaps <= max_gap + 1)
    rows = int(r.size > 0) + int(np.count_nonzero(~inside))  # rows with a nonzero: each starts a run
    runs = rows + int(np.count_nonzero(inside & ~merged))
    return int(r.size + np.sum(gaps[merged] - 1) + run_cost * runs)


def _channel_order(nz_segs: np.ndarray, max_gap: int) -> np.ndarray:
    """An order of the output channels that makes the nonzero weights of each segment (``nz_segs``: boolean,
    segments x taps x channels, the taps of a segment side by side in the buffer) contiguous: the identity or a
    stride-``P`` regrouping (channel ``o = i * P + j`` moved to ``j * (Co / P) + i``), whichever runs cheapest.
    The polyphase (packed) convs of neurosdm's up path interleave their phases this way. No order beats one run per
    non-empty segment: once the best order found is within 2 % of that bound nothing else is tried (a dense
    kernel's identity; the search costs more than it could save)."""
    co = nz_segs.shape[-1]
    flat = (lambda order: nz_segs[..., order].reshape(nz_segs.shape[0], -1))
    rows = nz_segs.reshape(nz_segs.shape[0], -1)
    bound = int(np.count_nonzero(rows)) + RUN_COST * int(np.count_nonzero(rows.any(axis=1)))
    best, best_cost = np.arange(co), _cost(rows, max_gap)
    for p in range(2, co):
        if best_cost <= 1.02 * bound:
            break
        if co % p:
            continue
        order = np.arange(co).reshape(co // p, p).T.reshape(-1)
        cost = _cost(flat(order), max_gap)
        if cost < best_cost:
            best, best_cost = order, cost
    return best


class ConvPlan:
    """A conv layer prepared for both paths: for the kernel, per input channel and input phase ``(py, px)`` (the
    input position modulo the stride, after padding) the runs of nonzero weights of all the taps it reaches, as
    offsets in a haloed channel-last output buffer (channel order ``perm`` chosen to keep the runs contiguous);
    the graph's weights (a view, not a copy) for the numpy path and the im2col matrix; the per-call constants
    (``macs_per_image``). The runs store the weights in the program's dtype (:func:`neurosdm.graph.nodes.compact`:
    int8 for an int8 graph); the kernels widen each weight to float64 as they multiply (exact)."""

    max_gap = 3  # zeros inside a run up to this many (stored and multiplied; never counted)

    def __init__(self, layer: Layer):
        w = np.asarray(layer.weight)  # the program's array (its compact dtype): no copy
        self.scale = float(layer.weight_scale)  # the weights are w * scale (a power of two: exact after the sums)
        self.Co, self.C, self.kh, self.kw = w.shape
        _, self.H, self.W = layer.in_shape
        _, self.Ho, self.Wo = layer.out_shape
        self.sh, self.sw = layer.stride
        (self.pt, self.pb), (self.pl, self.pr) = layer.padding
        wt = w.transpose(1, 2, 3, 0)  # [C, kh, kw, Co] (a view)
        self.wt = wt
        nz = wt != 0
        self.nnz = nz.sum(axis=3).astype(np.int32)  # [C, kh, kw]
        self.event = layer.input in ("spikes", "graded") and min(self.pt, self.pl) >= 0
        # float32 sums are exact: 0/1 inputs times integers whose absolute sum per output stays below 2**24
        self.acc32 = self.event and layer.input == "spikes" and w.dtype.kind == "i" and \
            int(np.abs(w.reshape(self.Co, -1)).sum(axis=1, dtype=np.int64).max(initial=0)) < 2**24
        self.acc_dtype = np.float32 if self.acc32 else np.float64  # the kernel's output buffer
        if self.event:
            self._build_runs(wt, nz)
            self.wmat = np.zeros((0, self.Co))
        else:  # [C*kh*kw, Co] for the dense path (a transposed view)
            self.wmat = w.reshape(self.Co, -1).T
            self.rptr = self.rstart = self.rlen = self.roff = self.cls_nnz = np.zeros(0, np.int32)
            self.wv = np.zeros(0, w.dtype)
        self.macs_per_image = layer.macs  # every input position times its nonzero fan-out inside the output map

    def _build_runs(self, wt: np.ndarray, nz: np.ndarray) -> None:
        sh, sw, Co = self.sh, self.sw, self.Co
        self.tY, self.tX = -(-self.kh // sh) - 1, -(-self.kw // sw) - 1  # halo: the most taps behind an event
        self.Hp = self.tY + max((self.H - 1 + self.pt) // sh, self.Ho - 1) + 1
        self.Wp = self.tX + max((self.W - 1 + self.pl) // sw, self.Wo - 1) + 1
        # per phase: the taps (ky rows j, kx columns i, kx descending so that the buffer addresses ascend)
        phases = []
        for py in range(sh):
            for px in range(sw):
                kys = list(range(py, self.kh, sh))
                kxs = list(range(px, self.kw, sw))[::-1]
                phases.append((kys, kxs))
        ni = max(len(kxs) for _, kxs in phases)
        segs_nz = np.zeros((self.C, sum(len(kys) for kys, _ in phases), ni, Co), bool)
        for c in range(self.C):
            r = 0
            for kys, kxs in phases:
                for ky in kys:
                    segs_nz[c, r, :len(kxs)] = nz[c, ky][kxs]
                    r += 1
        self.perm = _channel_order(segs_nz.reshape(-1, ni, Co), self.max_gap)
        self.inv = np.argsort(self.perm).astype(np.int32)  # slot of each channel
        wp = wt[..., self.perm]
        groups, cls_nnz = [], []
        for c in range(self.C):
            for kys, kxs in phases:
                segs = []
                for j, ky in enumerate(kys):
                    if kxs:
                        off = -j * self.Wp * Co - (len(kxs) - 1) * Co
                        segs.append((off, wp[c, ky][kxs].reshape(-1)))
                groups.append(segs)
                cls_nnz.append(sum(int(self.nnz[c, ky, kx]) for ky in kys for kx in kxs))
        self.rptr, self.rstart, self.rlen, self.roff, self.wv = _runs(groups, self.max_gap, wp.dtype)
        self.cls_nnz = np.asarray(cls_nnz, np.int64)

    @property
    def buffer_size(self) -> int:
        """Elements of the kernel's output buffer per image (0 for a dense layer)."""
        return self.Hp * self.Wp * self.Co if self.event else 0

    @property
    def weight_bytes(self) -> int:
        """Bytes the plan holds beyond the program's own arrays (the weights it views)."""
        return int(sum(a.nbytes for a in (self.rptr, self.rstart, self.rlen, self.roff, self.wv, self.cls_nnz,
                                           self.nnz)) + (self.inv.nbytes + self.perm.nbytes if self.event else 0))

    def scatter(self, x: np.ndarray, use_numba: bool, buf: np.ndarray | None = None) -> tuple[np.ndarray, int, int]:
        """Event-driven conv of ``x [B, C, H, W]`` (bias excluded). Returns ``(y [B, Co, Ho, Wo], events, ops)``.
        ``buf``: optional scratch of at least ``B * buffer_size`` elements for the kernel (reused), float32 where
        ``acc32`` else float64."""
        batch = x.shape[0]
        if use_numba and self.event:
            n = batch * self.buffer_size
            dtype = self.acc_dtype
            if buf is None or buf.size < n or buf.dtype != dtype:
                buf = np.zeros(n, dtype)
            else:
                buf = buf[:n]
                buf.fill(0.0)
            x = np.ascontiguousarray(x, dtype)
            events, ops = _scatter(x, buf, self.rptr, self.rstart, self.rlen, self.roff, self.wv, self.nnz,
                                   self.cls_nnz, self.sh, self.sw, self.pt, self.pl, self.Ho, self.Wo, self.Hp,
                                   self.Wp, self.tY, self.tX, self.Co)
            y = np.empty((batch, self.Co, self.Ho, self.Wo))
            _crop(buf, y, self.inv, self.Hp, self.Wp, self.tY, self.tX)
            return self._scaled(y), int(events), int(ops)
        flat = x.reshape(-1)
        addr = np.flatnonzero(flat)
        vals = flat[addr]
        out = np.zeros(batch * self.Ho * self.Wo * self.Co)
        ops = _scatter_numpy(addr, vals, out, self)
        y = out.reshape(batch, self.Ho, self.Wo, self.Co)
        return self._scaled(np.ascontiguousarray(y.transpose(0, 3, 1, 2))), int(addr.size), int(ops)

    def dense(self, x: np.ndarray) -> np.ndarray:
        """Dense conv of ``x [B, C, H, W]`` (bias excluded): im2col and one float64 matmul."""
        batch = x.shape[0]
        xp = np.pad(x, ((0, 0), (0, 0), (self.pt, self.pb), (self.pl, self.pr)))
        win = np.lib.stride_tricks.sliding_window_view(xp, (self.kh, self.kw), axis=(2, 3))
        win = win[:, :, ::self.sh, ::self.sw][:, :, :self.Ho, :self.Wo]  # [B, C, Ho, Wo, kh, kw]
        cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(batch * self.Ho * self.Wo, -1)
        y = (cols @ self.wmat).reshape(batch, self.Ho, self.Wo, self.Co).transpose(0, 3, 1, 2)
        return self._scaled(np.ascontiguousarray(y))

    def _scaled(self, y: np.ndarray) -> np.ndarray:
        if self.scale != 1.0:
            y *= self.scale
        return y


def _plain_conv(layer: Layer) -> Layer:
    """A ``gconv`` layer (Conv1d, groups > 1 or dilation > 1) as an equivalent plain conv (groups 1, dilation 1,
    ``(C, H, W)`` shapes) for :class:`ConvPlan`: the grouped weight placed block-diagonally in a full
    ``[Co, Ci, kh, kw]`` weight and the dilated kernel spread out with zeros between its taps. Exact: the zeros are
    never stored as runs, never multiplied where they would matter and never counted (the counters see only the
    nonzero synapses, as for any conv)."""
    w = np.asarray(layer.weight)  # [Co, Ci / groups, kh, kw] (a Conv1d: kh = 1)
    co, cg, kh, kw = w.shape
    g = int(layer.groups)
    dh, dw = layer.dilation
    full = np.zeros((co, cg * g, (kh - 1) * dh + 1, (kw - 1) * dw + 1), w.dtype)
    per = co // g
    for j in range(g):
        full[j * per:(j + 1) * per, j * cg:(j + 1) * cg, ::dh, ::dw] = w[j * per:(j + 1) * per]
    shape3 = (lambda s: tuple(s) if len(s) == 3 else (s[0], 1, *s[1:]))
    return Layer(layer.name, "conv", layer.sources, shape3(layer.in_shape), shape3(layer.out_shape),
                 input=layer.input, weight=full, weight_scale=layer.weight_scale, bias=layer.bias, stride=layer.stride,
                 padding=layer.padding,
                 rounded=layer.rounded, fanout=layer.fanout)



#: the compiled scatter kernel (benchmarks time it alone)
scatter_kernel = _scatter


class EventBackend(ReferenceBackend):
    """The reference's kernels, with event-driven convs and affine layers (module docstring).

    ``use_numba``: None (default) uses the kernel when numba is installed; False forces the numpy path.
    ``force_rate`` (benchmarks only, not for results): when a rate in [0, 1], every IF layer outputs random spikes
    at that rate (drawn from ``numpy.random.default_rng(force_seed)``) instead of its own; the state evolves as
    usual. The kernels' output buffer is shared by the layers and kept between calls: one backend must not run
    two calls at once (one engine per thread)."""

    name = "event"

    def __init__(self, use_numba: bool | None = None, force_rate: float | None = None, force_seed: int = 0):
        if use_numba and not HAVE_NUMBA:
            raise ConfigError("use_numba=True but numba is not installed (pip install numba)")
        if force_rate is not None and not 0.0 <= float(force_rate) <= 1.0:
            raise ConfigError(f"force_rate must lie in [0, 1], got {force_rate}")
        self.use_numba = HAVE_NUMBA if use_numba is None else bool(use_numba)
        self.force_rate = None if force_rate is None else float(force_rate)
        self.force_rng = np.random.default_rng(force_seed)

    def prepare(self, program: Program) -> None:
        super().prepare(program)
        self.plans = {layer.name: ConvPlan(layer if layer.kind == "conv" else _plain_conv(layer))
                      for layer in program.layers if layer.kind in ("conv", "gconv")}
        self.buf_per_image = max([p.buffer_size for p in self.plans.values()] + [0])
        self.bufs = {np.float32: np.zeros(0, np.float32), np.float64: np.zeros(0)}

    def scratch(self, plan: ConvPlan, batch: int) -> np.ndarray:
        """The kernel's output buffer for ``plan`` (float32 or float64, :attr:`ConvPlan.acc32`), shared by the
        layers and grown to ``batch`` images when needed."""
        dtype = plan.acc_dtype
        if self.use_numba and self.bufs[dtype].size < batch * self.buf_per_image:
            self.bufs[dtype] = np.zeros(batch * self.buf_per_image, dtype)
        return self.bufs[dtype]

    def conv(self, layer: Layer, x, bias, count: bool = True):
        plan = self.plans[layer.name]
        x4 = x if layer.nd == 2 else x[:, :, None, :]
        ops = None
        if layer.input in ("spikes", "graded"):
            y, _, ops = plan.scatter(x4, self.use_numba, self.scratch(plan, x.shape[0]))
        else:
            y = plan.dense(x4)
        y += np.asarray(layer.bias if bias is None else bias, np.float64).reshape(-1, 1, 1)
        if layer.rounded and self.fixed is not None:
            y = np.round(y)  # half to even
        return (y if layer.nd == 2 else y[:, :, 0, :]), ops

    def affine(self, layer: Layer, x):
        w = layer.weight
        if layer.input == "analog" or w.ndim != 2:
            return super().affine(layer, x)
        y = np.empty((x.shape[0], w.shape[0]))
        for b in range(x.shape[0]):
            idx = np.flatnonzero(x[b])
            y[b] = w[:, idx] @ x[b, idx]
        return y * layer.weight_scale + layer.bias

    def _forced(self, layer: Layer, y, s):
        if self.force_rate is None or layer.kind != "if":
            return y, s
        s = np.zeros(s.shape, bool) if self.force_rate == 0.0 else self.force_rng.random(s.shape) < self.force_rate
        return s.astype(np.float64), s

    def neuron(self, layer: Layer, x, state):
        y, state, s = super().neuron(layer, x, state)
        y, s = self._forced(layer, y, s)
        return y, state, s

    def fixed_neuron(self, layer: Layer, x, state):
        y, state, s, sat = super().fixed_neuron(layer, x, state)
        if s is not None:
            y, s = self._forced(layer, y, s)
        return y, state, s, sat


class EventEngine(Engine):
    """Event-driven simulator of a :class:`Program` (module docstring); ``use_numba``, ``force_rate`` and
    ``force_seed`` as :class:`EventBackend`."""

    name = "event"

    def __init__(self, program: Program, use_numba: bool | None = None, force_rate: float | None = None,
                 force_seed: int = 0):
        super().__init__(program, EventBackend(use_numba, force_rate, force_seed))

    @property
    def plans(self) -> dict:
        return self.backend.plans
