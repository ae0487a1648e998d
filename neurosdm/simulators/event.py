"""Event-driven engine: spike-input convs computed by scattering the input events through their nonzero synapses.

``EventEngine(program).run(x, t)`` runs one network call of a :class:`~neurosdm.simulators.program.Program`
(``program.num_steps`` spiking steps from a zero state) and returns the outputs, the exact counts of
:mod:`neurosdm.simulators.stats` and, optionally, every layer's output. It reproduces the reference interpreter
(:func:`neurosdm.simulators.reference.run_graph`): in float to rounding, in fixed point bit for bit.

How each layer is computed (numpy float64 throughout; integer-valued in fixed point, exact below 2**53):

- **conv, input "spikes" / "graded"** (event-driven): the nonzero input elements form an event list of flat
  addresses ``((b * C + c) * H + y) * W + x`` and values (1 for a spike, the payload for a graded input). Every
  event ``(b, c, y, x, v)`` adds ``v * W[o, c, ky, kx]`` to the output ``(b, o, oy, ox)`` for every tap
  ``(ky, kx)`` whose output position ``oy = (y + pad_top - ky) / sh`` (an integer in ``0..Ho-1``; likewise
  ``ox``) exists, and only for the output channels ``o`` whose weight is nonzero: per ``(c, ky, kx)`` the
  nonzero weights are stored CSR-like (``ptr``, output-channel index, weight), and the output buffer is
  channel-last ``[B, Ho, Wo, Co]`` so that one event's additions at one position are contiguous. The work, and
  the count ``synops`` (``graded_ops``), is exactly the (event, nonzero synapse inside the map) pairs. The loop is a
  numba kernel (:func:`_scatter`); without numba a vectorised numpy path (:func:`_scatter_numpy`) does the same
  additions and counts.
- **conv, input "analog"** (the image, residual streams, sums of several sources): dense, im2col + one float64
  matmul; ``macs`` = every input position times its nonzero fan-out inside the map (precomputed per layer).
- **rounded conv** (fixed point, ``Layer.rounded``): the output, bias included, is rounded half to even.
- **neurons**: vectorised numpy; float ``v <- decay v + (1 - decay) v_leak + gain x`` then (IF) compare and reset
  per ``program.disc``; fixed point :func:`neurosdm.quantize.fixed_point_step` (int64 state).
- **scale**: ``x * scale`` (the per-step scale of a TSM node from ``program.step_params``); **input/output**:
  identity. A layer's input is the sum of its sources' outputs at the same step.

Counters (per layer, per spiking step, summed over the batch; see :mod:`neurosdm.simulators.stats`): conv
``events_in`` and one of ``synops`` / ``graded_ops`` / ``macs``; scale ``events_in``; neurons ``neuron_updates``,
``active_neurons``, ``spikes_out`` (IF), ``saturations`` (fixed point); ``fanin_adds`` on every layer with several
sources. Input layers and single-source outputs have no counters (no entry in ``counts``).
"""

from __future__ import annotations

import numpy as np

from neurosdm.errors import ConfigError, GraphError
from neurosdm.simulators.program import Layer, Program

__all__ = ["EventEngine", "HAVE_NUMBA", "ConvPlan"]

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
def _scatter(addr, vals, out, rptr, rstart, rlen, roff, wv, tap_nnz, C, H, W, kh, kw, sh, sw, pt, pl, Ho, Wo,
             Co):  # pragma: no cover - compiled
    """Scatter the events ``addr`` (flat input addresses, ``((b*C + c)*H + y)*W + x``) with values ``vals`` into
    ``out`` (flat ``[B, Ho, Wo, Co]``, channels in the plan's order) through the weight runs of each ``(c, ky, kx)``
    (``rptr``: the runs of a tap; run ``q`` adds ``wv[roff[q]:roff[q] + rlen[q]]`` to the channels
    ``rstart[q]...``). Returns the synapses used: the nonzero weights ``tap_nnz`` of every tap reached."""
    ops = 0
    HW = H * W
    CHW = C * HW
    for e in range(addr.shape[0]):
        a = addr[e]
        b = a // CHW
        r = a - b * CHW
        c = r // HW
        r -= c * HW
        y = r // W
        x = r - y * W
        v = vals[e]
        for ky in range(kh):
            ty = y + pt - ky
            if ty < 0:
                break  # ty only decreases with ky
            oy = ty // sh
            if oy * sh != ty or oy >= Ho:
                continue
            for kx in range(kw):
                tx = x + pl - kx
                if tx < 0:
                    break
                ox = tx // sw
                if ox * sw != tx or ox >= Wo:
                    continue
                base = ((b * Ho + oy) * Wo + ox) * Co
                tap = (c * kh + ky) * kw + kx
                for q in range(rptr[tap], rptr[tap + 1]):
                    o0 = np.uint64(base + rstart[q])  # unsigned: no negative-index wraparound, so it vectorises
                    j0 = np.uint64(roff[q])
                    for i in range(rlen[q]):
                        out[o0 + np.uint64(i)] += v * wv[j0 + np.uint64(i)]
                ops += tap_nnz[tap]
    return ops


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


def _runs(rows: np.ndarray, max_gap: int):
    """Per row (a tap ``(c, ky, kx)``: its weights over the output channels), the runs of nonzero weights, runs
    closer than ``max_gap + 1`` channels merged (the zeros between them are then stored and multiplied: exact, and
    cheaper than starting a run). Returns ``(rptr, rstart, rlen, roff, wv)`` (CSR over rows)."""
    rptr, rstart, rlen, roff, wv = [0], [], [], [], []
    n = 0
    for row in rows:
        idx = np.flatnonzero(row)
        if idx.size:
            cut = np.flatnonzero(np.diff(idx) > max_gap + 1) + 1
            starts, ends = idx[np.r_[0, cut]], idx[np.r_[cut - 1, idx.size - 1]] + 1
            for a, b in zip(starts, ends):
                rstart.append(a)
                rlen.append(b - a)
                roff.append(n)
                wv.append(row[a:b])
                n += b - a
        rptr.append(len(rstart))
    i64 = (lambda v: np.asarray(v, np.int64))
    return i64(rptr), i64(rstart), i64(rlen), i64(roff), (np.concatenate(wv) if wv else np.zeros(0))


def _cost(nz_rows: np.ndarray, max_gap: int, run_cost: int = 8) -> int:
    """Work of the runs of ``nz_rows`` (boolean, taps x channels): stored weights plus ``run_cost`` per run."""
    total = 0
    for row in nz_rows:
        idx = np.flatnonzero(row)
        if idx.size:
            gaps = np.diff(idx)
            merged = gaps <= max_gap + 1
            total += idx.size + int(np.sum(gaps[merged] - 1)) + run_cost * (1 + int(np.count_nonzero(~merged)))
    return total


def _channel_order(nz_rows: np.ndarray, max_gap: int) -> np.ndarray:
    """An order of the output channels that makes the nonzero weights of each tap contiguous: the identity or a
    stride-``P`` regrouping (channel ``o = i * P + j`` moved to ``j * (Co / P) + i``), whichever runs cheapest.
    The polyphase (packed) convs of neurosdm's up path interleave their phases this way."""
    co = nz_rows.shape[1]
    best, best_cost = np.arange(co), _cost(nz_rows, max_gap)
    for p in range(2, co):
        if co % p:
            continue
        order = np.arange(co).reshape(co // p, p).T.reshape(-1)
        cost = _cost(nz_rows[:, order], max_gap)
        if cost < best_cost:
            best, best_cost = order, cost
    return best


class ConvPlan:
    """A conv layer prepared for both paths: per ``(c, ky, kx)`` the runs of nonzero weights over the output
    channels (in a channel order that keeps them contiguous, ``perm``), the dense weights for the numpy path and
    the im2col matrix, and the per-call constants (``macs_per_image``)."""

    max_gap = 3  # zeros inside a run up to this many (stored and multiplied; never counted)

    def __init__(self, layer: Layer):
        w = np.ascontiguousarray(layer.weight, np.float64)
        self.Co, self.C, self.kh, self.kw = w.shape
        _, self.H, self.W = layer.in_shape
        _, self.Ho, self.Wo = layer.out_shape
        self.sh, self.sw = layer.stride
        (self.pt, self.pb), (self.pl, self.pr) = layer.padding
        wt = np.ascontiguousarray(w.transpose(1, 2, 3, 0))  # [C, kh, kw, Co]
        self.wt = wt
        nz = wt != 0
        self.nnz = nz.sum(axis=3).astype(np.int64)  # [C, kh, kw]
        self.tap_nnz = self.nnz.reshape(-1).copy()
        self.event = layer.input in ("spikes", "graded")
        if self.event:  # the kernel's weight runs
            self.perm = _channel_order(nz.reshape(-1, self.Co), self.max_gap)
            self.inv = None if np.array_equal(self.perm, np.arange(self.Co)) else np.argsort(self.perm)
            self.rptr, self.rstart, self.rlen, self.roff, self.wv = _runs(wt.reshape(-1, self.Co)[:, self.perm],
                                                                         self.max_gap)
            self.wmat = np.zeros((0, self.Co))
        else:  # [C*kh*kw, Co] for the dense path
            self.wmat = np.ascontiguousarray(w.reshape(self.Co, -1).T)
            self.rptr = self.rstart = self.rlen = self.roff = self.wv = np.zeros(0, np.int64)
        # macs: every input position times its nonzero fan-out inside the output map
        rows = np.array([self._valid(self.H, self.pt, k, self.sh, self.Ho) for k in range(self.kh)], np.int64)
        cols = np.array([self._valid(self.W, self.pl, k, self.sw, self.Wo) for k in range(self.kw)], np.int64)
        self.macs_per_image = int((self.nnz * rows[None, :, None] * cols[None, None, :]).sum())

    @staticmethod
    def _valid(n: int, pad: int, k: int, s: int, n_out: int) -> int:
        """How many input positions ``0..n-1`` tap ``k`` connects to an output position ``0..n_out-1``."""
        t = np.arange(n) + pad - k
        return int(np.count_nonzero((t >= 0) & (t % s == 0) & (t // s < n_out)))

    @property
    def weight_bytes(self) -> int:
        return int(sum(a.nbytes for a in (self.rptr, self.rstart, self.rlen, self.roff, self.wv, self.tap_nnz,
                                           self.wt, self.wmat)))

    def scatter(self, x: np.ndarray, use_numba: bool) -> tuple[np.ndarray, int, int]:
        """Event-driven conv of ``x [B, C, H, W]`` (bias excluded). Returns ``(y [B, Co, Ho, Wo], events, ops)``."""
        batch = x.shape[0]
        flat = x.reshape(-1)
        addr = np.flatnonzero(flat)
        vals = flat[addr]
        out = np.zeros(batch * self.Ho * self.Wo * self.Co)
        if use_numba:
            ops = _scatter(addr, vals, out, self.rptr, self.rstart, self.rlen, self.roff, self.wv, self.tap_nnz,
                           self.C, self.H, self.W, self.kh, self.kw, self.sh, self.sw, self.pt, self.pl, self.Ho,
                           self.Wo, self.Co)
            y = out.reshape(batch, self.Ho, self.Wo, self.Co)
            if self.inv is not None:
                y = y[..., self.inv]  # back to the graph's channel order
        else:
            ops = _scatter_numpy(addr, vals, out, self)
            y = out.reshape(batch, self.Ho, self.Wo, self.Co)
        return np.ascontiguousarray(y.transpose(0, 3, 1, 2)), int(addr.size), int(ops)

    def dense(self, x: np.ndarray) -> np.ndarray:
        """Dense conv of ``x [B, C, H, W]`` (bias excluded): im2col and one float64 matmul."""
        batch = x.shape[0]
        xp = np.pad(x, ((0, 0), (0, 0), (self.pt, self.pb), (self.pl, self.pr)))
        win = np.lib.stride_tricks.sliding_window_view(xp, (self.kh, self.kw), axis=(2, 3))
        win = win[:, :, ::self.sh, ::self.sw][:, :, :self.Ho, :self.Wo]  # [B, C, Ho, Wo, kh, kw]
        cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(batch * self.Ho * self.Wo, -1)
        y = (cols @ self.wmat).reshape(batch, self.Ho, self.Wo, self.Co).transpose(0, 3, 1, 2)
        return np.ascontiguousarray(y)


class EventEngine:
    """Event-driven simulator of a :class:`Program` (numpy + a numba kernel; module docstring).

    ``use_numba``: None (default) uses the kernel when numba is installed; False forces the numpy path."""

    name = "event"

    def __init__(self, program: Program, use_numba: bool | None = None):
        if not isinstance(program, Program):
            raise ConfigError(f"EventEngine needs a Program (neurosdm.simulators.program.load_program), got "
                              f"{type(program).__name__}")
        if len(program.inputs) != 1:
            raise GraphError(f"the engines run graphs with one Input node; this one has {sorted(program.inputs)}")
        if use_numba and not HAVE_NUMBA:
            raise ConfigError("use_numba=True but numba is not installed (pip install numba)")
        self.program = program
        self.use_numba = HAVE_NUMBA if use_numba is None else bool(use_numba)
        self.plans = {layer.name: ConvPlan(layer) for layer in program.layers if layer.kind == "conv"}
        self.fixed = program.fixed
        if self.fixed is not None:
            from neurosdm.quantize import state_limit

            self._never = state_limit(self.fixed.state_bits) + 1  # threshold of I/LI: never fires
            self._thr_int = {}
            for layer in program.layers:
                if layer.kind == "if":
                    thr = np.asarray(layer.threshold, np.float64)
                    if not np.array_equal(thr, np.rint(thr)):
                        raise GraphError(f"node {layer.name!r}: fixed-point mode needs integer thresholds")
                    self._thr_int[layer.name] = thr.astype(np.int64)

    # ----------------------------------------------------------------------------------------------- one call

    def run(self, x: np.ndarray, t: int, record: bool = False) -> dict:
        """Run ``program.num_steps`` spiking steps on ``x [B, *input_shape]`` (the encoded input, the same at every
        step) at diffusion step ``t``. Returns ``{"outputs": {output: [K, B, *shape]}, "counts": {layer:
        {counter: int64 [K]}}, "records": {layer: [K, B, *shape]}}`` (``records`` empty unless ``record``)."""
        prog = self.program
        inp = prog.by_name[prog.inputs[0]]
        x = np.asarray(x, np.float64)
        if x.ndim != 1 + len(inp.in_shape) or tuple(x.shape[1:]) != tuple(inp.in_shape):
            raise GraphError(f"input for Input node {inp.name!r} has shape {x.shape}; expected [batch, *{inp.in_shape}]")
        batch = x.shape[0]
        K = prog.num_steps
        params = prog.step_params(t)
        fixed = self.fixed
        counts: dict[str, dict[str, np.ndarray]] = {}

        def counter(layer: str, name: str) -> np.ndarray:
            return counts.setdefault(layer, {}).setdefault(name, np.zeros(K, np.int64))

        state = {}
        for layer in prog.layers:
            if layer.kind in ("if", "li", "i"):
                state[layer.name] = np.zeros((batch, *layer.in_shape), np.int64 if fixed is not None else np.float64)
        outs = {name: [] for name in prog.outputs}
        recs = {layer.name: [] for layer in prog.layers} if record else {}

        for k in range(K):
            p = params[min(k, len(params) - 1)]
            cur: dict[str, np.ndarray] = {}
            for layer in prog.layers:
                name = layer.name
                if layer.kind == "input":
                    y = x
                else:
                    if len(layer.sources) == 0:
                        xin = np.zeros((batch, *layer.in_shape))
                    else:
                        xin = cur[layer.sources[0]]
                        for src in layer.sources[1:]:
                            xin = xin + cur[src]
                        if len(layer.sources) > 1:
                            counter(name, "fanin_adds")[k] = (len(layer.sources) - 1) * batch * \
                                int(np.prod(layer.in_shape))
                    y = self._layer(layer, xin, k, p.get(name, {}), counter, batch, state)
                cur[name] = y
                if record:
                    recs[name].append(y)
                if name in outs:
                    outs[name].append(y)

        def stack(lst, layer):
            return np.stack(lst) if lst else np.zeros((0, batch, *layer.out_shape))

        return {"outputs": {n: stack(v, prog.by_name[n]) for n, v in outs.items()},
                "counts": counts,
                "records": {n: stack(v, prog.by_name[n]) for n, v in recs.items()}}

    def _layer(self, layer: Layer, x: np.ndarray, k: int, over: dict, counter, batch: int, state: dict) -> np.ndarray:
        kind, name = layer.kind, layer.name
        if kind == "output":
            return x
        if kind == "scale":
            counter(name, "events_in")[k] = np.count_nonzero(x)
            return x * over.get("scale", layer.scale)
        if kind == "conv":
            plan = self.plans[name]
            if layer.input in ("spikes", "graded"):
                y, events, ops = plan.scatter(x, self.use_numba)
                counter(name, "synops" if layer.input == "spikes" else "graded_ops")[k] = ops
                counter(name, "events_in")[k] = events
            else:
                y = plan.dense(x)
                counter(name, "macs")[k] = plan.macs_per_image * batch
                counter(name, "events_in")[k] = np.count_nonzero(x)
            bias = over.get("bias", layer.bias)
            y += np.asarray(bias, np.float64).reshape(-1, 1, 1)
            if layer.rounded and self.fixed is not None:
                y = np.round(y)  # half to even
            return y
        if kind in ("if", "li", "i"):
            return self._neuron(layer, x, k, counter, batch, state)
        raise GraphError(f"node {name!r}: the event engine cannot run layers of kind {kind!r}")

    def _neuron(self, layer: Layer, x: np.ndarray, k: int, counter, batch: int, state: dict) -> np.ndarray:
        name, kind = layer.name, layer.kind
        counter(name, "neuron_updates")[k] = batch * layer.size
        counter(name, "active_neurons")[k] = np.count_nonzero(x)
        v = state[name]
        if self.fixed is not None:
            from neurosdm.quantize import fixed_point_step

            xi = np.rint(x)
            if not np.array_equal(xi, x):
                raise GraphError(f"node {name!r}: fixed-point mode got a non-integer value {x[xi != x].flat[0]!r}")
            if kind == "if":
                thr, reset = self._thr_int[name], "hard" if self.program.disc.reset == "zero" else "subtract"
            else:
                thr, reset = self._never, "hard"
            s, v, sat = fixed_point_step(v, xi.astype(np.int64), thr, layer.decay_q12, reset, self.fixed.state_bits)
            state[name] = v
            counter(name, "saturations")[k] = np.count_nonzero(sat)
            if kind == "if":
                counter(name, "spikes_out")[k] = np.count_nonzero(s)
                return s.astype(np.float64)
            return v.astype(np.float64)
        if kind == "if":
            v = v + layer.gain * x  # decay 1, no leak
        else:
            v = layer.decay * v + (1.0 - layer.decay) * layer.v_leak + layer.gain * x
        if kind != "if":
            state[name] = v
            return v
        disc = self.program.disc
        s = (v >= layer.threshold) if disc.comparison == ">=" else (v > layer.threshold)
        if disc.reset == "zero":
            v = np.where(s, layer.v_reset, v)
        else:
            v = v - (layer.threshold - layer.v_reset) * s
        state[name] = v
        counter(name, "spikes_out")[k] = np.count_nonzero(s)
        return s.astype(np.float64)
