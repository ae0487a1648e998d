"""A graph split into core-sized pieces: populations, their input edges, and the split that respects a chip's
per-core limits (:data:`neurosdm.hardware.profiles.RESOURCES`). :mod:`neurosdm.hardware.routing` places the pieces
on the mesh and routes the spikes.

Populations. Synapses live in the core of the neurons they feed (as on Loihi and TrueNorth): a conv / affine / pool
layer whose only consumer is a neuron layer is *fused* into it (its synapses are stored, and its synaptic work is
done, on that neuron layer's cores). Every other layer that computes on chip (neuron layers, the sums of residual
streams, unfused convs, up-sampling, delays) is a population of its own, one compartment per output element (an
unfused conv: non-spiking accumulators that send graded messages). Flatten is a renaming; the graph's input is the
host. Shapes are ``(C, H, W)``: a flat ``(N,)`` is ``(N, 1, 1)``, a Conv1d's ``(C, L)`` is ``(C, 1, L)``.

Pieces. A population is cut into ``nc x nh x nw`` pieces (channel groups x spatial tiles, ceil-sized, one core
each); the input a piece needs is the window of each edge's source that reaches its outputs (a convolution's halo
included). Per piece: ``neurons``; ``fanin_axons`` (distinct source elements reaching it; with
``conv_weight_sharing`` a convolution's input axons are its input positions, the channel riding on the population
index, as nengo-loihi's population axons); ``synapses`` (the exact nonzero (input, output) pairs, borders and
strides respected); ``stored_entries`` (synapses, or with ``conv_weight_sharing`` the nonzero kernel weights of the
piece's output channels) and ``memory_bits`` (entries x ``synapse_bits``); ``fanout_axons`` (per source element, the
destination pieces it reaches). :func:`split` picks, per population, the fewest pieces whose worst piece fits every
limit (ties: the fewest input axons); producers are split after their consumers so that their fan-out is known.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from neurosdm.errors import ConfigError, GraphError
from neurosdm.graph.nodes import NEURONS

__all__ = ["Edge", "Population", "Piece", "populations", "split", "limits_of", "window", "as_chw"]

SYNAPTIC = ("conv", "gconv", "affine", "pool")
NEURON_KINDS = (*NEURONS, "threshold")
UNPLACED = ("input", "output", "flatten")
#: resource key -> (piece field it bounds, what the error calls it)
LIMITS = {"neurons_per_core": "neurons", "fanin_axons_per_core": "fanin_axons",
          "fanout_axons_per_core": "fanout_axons", "synapse_memory_per_core": "memory_bits"}


def as_chw(shape) -> tuple[int, int, int]:
    s = tuple(int(v) for v in shape)
    if len(s) == 3:
        return s
    if len(s) == 2:
        return (s[0], 1, s[1])
    return (int(np.prod(s)) if s else 1, 1, 1)


@dataclass
class Edge:
    """The input of a population from ``src`` (a population, or ``"input"``: the host) through ``layer`` (the
    synaptic layer whose counts it carries; "" for an element-wise edge). ``kind``: conv (also pool), dense,
    identity or upsample."""

    src: str
    layer: str
    kind: str
    src_shape: tuple[int, int, int]
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    pad: tuple[int, int] = (0, 0)  # before, along H and W
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    factor: tuple[int, int] = (1, 1)
    nonzero: np.ndarray | None = None  # conv [Co, Ci/g, kh, kw] / dense [out, in] bool
    distinct: int = 1  # most distinct nonzero weight values of one output (TrueNorth's axon types)
    cum: np.ndarray | None = None  # prefix sums over output channels: conv [Co+1, kh, kw], dense [out+1]

    def nonzero_taps(self, c0: int, c1: int) -> np.ndarray:
        """Nonzero weights of output channels ``[c0, c1)``: per kernel tap (conv), or in total (dense)."""
        if self.cum is None:
            per = self.nonzero.sum(axis=1) if self.kind == "conv" else self.nonzero.sum(axis=1)
            self.cum = np.concatenate([np.zeros((1, *per.shape[1:]), np.int64), np.cumsum(per, axis=0)])
        return self.cum[c1] - self.cum[c0]


@dataclass
class Population:
    name: str
    shape: tuple[int, int, int]
    spiking: bool
    layers: list[str]  # stats layers whose work runs on its cores: itself and its fused synaptic layers
    edges: list[Edge] = field(default_factory=list)
    order: int = 0


@dataclass
class Piece:
    pop: str
    index: int
    c: tuple[int, int]
    h: tuple[int, int]
    w: tuple[int, int]
    neurons: int = 0
    fanin_axons: int = 0
    fanout_axons: int = 0
    synapses: int = 0
    stored_entries: int = 0
    memory_bits: int = 0
    edge_synapses: dict[str, int] = field(default_factory=dict)  # synaptic layer -> its synapses in this piece


def limits_of(profile) -> dict[str, float]:
    """The profile's resources (canonical units); ConfigError naming the profile if it has none."""
    if not profile.resources:
        raise ConfigError(f"profile {profile.name!r} has no [resources] section: it describes no chip to map onto "
                          "(profiles with resources: loihi, loihi2, loihi-sanafe, truenorth, spinnaker2)")
    return {k: c.value for k, c in profile.resources.items()}


def _edge(layer, src: str, src_shape, through_flatten: bool) -> Edge:
    k = layer.kind
    if k in ("conv", "gconv") and not through_flatten:
        w = np.asarray(layer.weight)
        nz = w != 0
        distinct = max((len(np.unique(w[o][nz[o]])) for o in range(w.shape[0])), default=1)
        return Edge(src, layer.name, "conv", src_shape, tuple(w.shape[2:]), tuple(layer.stride),
                    (layer.padding[0][0], layer.padding[1][0]), tuple(layer.dilation), int(layer.groups),
                    nonzero=nz, distinct=distinct)
    if k == "pool" and not through_flatten:
        c = src_shape[0]
        return Edge(src, layer.name, "conv", src_shape, tuple(layer.kernel), tuple(layer.stride),
                    (layer.padding[0][0], layer.padding[1][0]), (1, 1), c,
                    nonzero=np.ones((c, 1, *layer.kernel), bool))
    w = np.asarray(layer.weight)
    w2 = w.reshape(-1, w.shape[-1]) if w.ndim >= 2 else w.reshape(1, -1)
    nz = w2 != 0
    distinct = max((len(np.unique(w2[o][nz[o]])) for o in range(w2.shape[0])), default=1)
    return Edge(src, layer.name, "dense", src_shape, nonzero=nz, distinct=distinct)


def populations(program) -> dict[str, Population]:
    """The populations of ``program`` in evaluation order (see the module docstring)."""
    by = program.by_name
    consumers: dict[str, list[str]] = {lay.name: [] for lay in program.layers}
    for lay in program.layers:
        for s in lay.sources:
            consumers[s].append(lay.name)

    def resolve(name):  # through flatten renamings; True if one was passed
        flat = False
        while by[name].kind == "flatten":
            name, flat = by[name].sources[0], True
        return name, flat

    def fused(name):
        lay = by[name]
        cons = consumers[name]
        return lay.kind in SYNAPTIC and len(cons) == 1 and by[cons[0]].kind in NEURON_KINDS

    pops: dict[str, Population] = {}
    for lay in program.layers:
        if lay.kind in UNPLACED or fused(lay.name):
            continue
        if lay.kind not in (*SYNAPTIC, *NEURON_KINDS, "scale", "upsample", "delay"):
            raise GraphError(f"layer {lay.name!r} ({lay.kind}) has no mapping rule onto neuromorphic cores")
        pop = Population(lay.name, as_chw(lay.out_shape), lay.spiking, [lay.name], order=len(pops))
        synaptic = [(lay, s) for s in lay.sources] if lay.kind in SYNAPTIC else []
        for s in ([] if lay.kind in SYNAPTIC else lay.sources):
            if fused(s):
                pop.layers.append(s)
                synaptic += [(by[s], ss) for ss in by[s].sources]
            else:
                src, flat = resolve(s)
                kind = "upsample" if lay.kind == "upsample" else ("dense" if flat else "identity")
                pop.edges.append(Edge(src, "", kind, as_chw(by[src].out_shape), factor=tuple(lay.scale_factor)))
        for syn, s in synaptic:
            src, flat = resolve(s)
            pop.edges.append(_edge(syn, src, as_chw(syn.in_shape) if not flat else as_chw(by[src].out_shape),
                                   flat))
        pops[lay.name] = pop
    return pops


# ------------------------------------------------------------------------------------------------ geometry

def window(edge: Edge, axis: int, lo, hi, n: int):
    """Input rows ``[a, b)`` (arrays) of ``edge``'s source along spatial ``axis`` (0: H, 1: W) that reach the output
    rows ``[lo, hi)`` of its population; ``n``: the source's size along that axis."""
    lo, hi = np.asarray(lo), np.asarray(hi)
    if edge.kind == "dense":
        return np.zeros_like(lo), np.full_like(lo, n)
    if edge.kind == "identity":
        return lo, hi
    if edge.kind == "upsample":
        f = edge.factor[axis]
        return lo // f, (hi - 1) // f + 1
    k, s, p, d = edge.kernel[axis], edge.stride[axis], edge.pad[axis], edge.dilation[axis]
    return np.clip(lo * s - p, 0, n), np.clip((hi - 1) * s - p + (k - 1) * d + 1, 0, n)


def channel_window(edge: Edge, c0, c1, n: int):
    """Source channels ``[a, b)`` reaching output channels ``[c0, c1)``."""
    c0, c1 = np.asarray(c0), np.asarray(c1)
    if edge.kind == "dense":
        return np.zeros_like(c0), np.full_like(c0, n)
    if edge.kind in ("identity", "upsample"):
        return c0, c1
    co = edge.nonzero.shape[0]
    per_out, per_in = co // edge.groups, n // edge.groups
    return (c0 // per_out) * per_in, ((c1 - 1) // per_out + 1) * per_in


def _valid_taps(edge: Edge, axis: int, lo: int, hi: int, n: int) -> np.ndarray:
    """Per kernel tap along ``axis``: how many output rows in ``[lo, hi)`` read a source row inside ``[0, n)``."""
    k, s, p, d = edge.kernel[axis], edge.stride[axis], edge.pad[axis], edge.dilation[axis]
    rows = np.arange(lo, hi)[:, None] * s - p + np.arange(k)[None, :] * d
    return ((rows >= 0) & (rows < n)).sum(axis=0)


def piece_resources(pop: Population, pc: Piece, sharing: bool, synapse_bits: float) -> Piece:
    """Fill ``pc``'s neurons, fan-in axons, synapses, stored entries and memory (not its fan-out)."""
    (c0, c1), (h0, h1), (w0, w1) = pc.c, pc.h, pc.w
    pc.neurons = (c1 - c0) * (h1 - h0) * (w1 - w0)
    pc.fanin_axons = pc.synapses = pc.stored_entries = 0
    for e in pop.edges:
        C, H, W = e.src_shape
        a_h, b_h = window(e, 0, h0, h1, H)
        a_w, b_w = window(e, 1, w0, w1, W)
        a_c, b_c = channel_window(e, c0, c1, C)
        positions = int(b_h - a_h) * int(b_w - a_w)
        if e.kind == "conv":
            per_tap = e.nonzero_taps(c0, c1)
            syn = int(_valid_taps(e, 0, h0, h1, H) @ per_tap @ _valid_taps(e, 1, w0, w1, W))
            axons = positions if sharing else positions * int(b_c - a_c)
            stored = int(per_tap.sum()) if sharing else syn
        elif e.kind == "dense":
            syn = int(e.nonzero_taps(c0, c1))
            axons = int(e.nonzero[c0:c1].any(axis=0).sum())
            stored = syn
        else:
            syn = pc.neurons
            axons = positions * int(b_c - a_c)
            stored = syn
        pc.fanin_axons += axons
        pc.synapses += syn
        pc.stored_entries += stored
        if e.layer:
            pc.edge_synapses[e.layer] = pc.edge_synapses.get(e.layer, 0) + syn
    pc.memory_bits = int(pc.stored_entries * synapse_bits)
    return pc


def bounds(n: int, parts: int) -> list[tuple[int, int]]:
    t = math.ceil(n / parts)
    return [(i, min(i + t, n)) for i in range(0, n, t)]


def _sizes(n: int) -> list[int]:
    """The distinct tile sizes ``ceil(n / k)``, largest first."""
    return sorted({math.ceil(n / k) for k in range(1, n + 1)}, reverse=True)


def _channel_weight(pop: Population) -> np.ndarray:
    """Per output channel of ``pop``: the nonzero weights of its synaptic edges (what makes a channel group big)."""
    wc = np.zeros(pop.shape[0])
    for e in pop.edges:
        if e.nonzero is not None and e.nonzero.shape[0] == pop.shape[0]:
            wc += e.nonzero.reshape(e.nonzero.shape[0], -1).sum(axis=1)
    return wc


def _worst_piece(pop: Population, tiles, sharing, bits, fanout_cnt, wc) -> Piece:
    """The resources of the largest piece of the split into tiles ``(tc, th, tw)``: an interior spatial tile (its
    input window and synapses bound the border tiles') of the first and of the heaviest channel group; fan-out from
    the per-axis destination counts."""
    C, H, W = pop.shape
    tc, th, tw = tiles
    hh = min(max(0, (H - th) // 2), H - th)
    ww = min(max(0, (W - tw) // 2), W - tw)
    starts = np.arange(0, C, tc)
    cs = np.concatenate([[0], np.cumsum(wc)])
    heavy = int(starts[int(np.argmax(cs[np.minimum(starts + tc, C)] - cs[starts]))])
    worst = None
    for c0 in sorted({0, heavy}):
        pc = piece_resources(pop, Piece(pop.name, 0, (c0, min(c0 + tc, C)), (hh, hh + th), (ww, ww + tw)),
                             sharing, bits)
        if worst is None or (pc.memory_bits, pc.fanin_axons) > (worst.memory_bits, worst.fanin_axons):
            worst = pc
    worst.fanout_axons = _max_fanout(fanout_cnt, tiles, pop.shape)
    return worst


def _max_fanout(cnt, tiles, shape) -> int:
    """Most output-axon entries of one piece: per out edge, the sums over the piece of the per-channel, per-row and
    per-column destination counts (a product: the edge's pieces are separable), the largest aligned tile taken.
    ``cnt``: per out edge the three prefix sums of those counts."""
    total = 0
    for sums in cnt:
        best = 1
        for cs, t in zip(sums, tiles):
            n = len(cs) - 1
            starts = np.arange(0, n, t)
            best *= int((cs[np.minimum(starts + t, n)] - cs[starts]).max())
        total += best
    return total


def _producer_cores(pop: Population, tiles, lim: dict) -> float:
    """Cores the producers of ``pop`` need for their output axons if ``pop`` is cut into ``tiles``: per edge, the
    source elements x the mean number of pieces each reaches / the output-axon limit (0 without that limit). A
    split into many channel groups makes every source element reach all of them."""
    if "fanout_axons_per_core" not in lim:
        return 0.0
    C, H, W = pop.shape
    lo = {a: np.array([b[0] for b in bounds(n, math.ceil(n / t))]) for a, n, t in zip("chw", (C, H, W), tiles)}
    hi = {a: np.array([b[1] for b in bounds(n, math.ceil(n / t))]) for a, n, t in zip("chw", (C, H, W), tiles)}
    total = 0.0
    for e in pop.edges:
        if e.src == "input":
            continue
        Cs, Hs, Ws = e.src_shape
        reach = 1.0
        for (a, b), n in ((channel_window(e, lo["c"], hi["c"], Cs), Cs), (window(e, 0, lo["h"], hi["h"], Hs), Hs),
                          (window(e, 1, lo["w"], hi["w"], Ws), Ws)):
            reach *= float((np.asarray(b) - np.asarray(a)).sum()) / n
        total += Cs * Hs * Ws * reach / lim["fanout_axons_per_core"]
    return total


def _violation(pc: Piece, lim: dict) -> str | None:
    for key, fieldname in LIMITS.items():
        if key in lim and getattr(pc, fieldname) > lim[key]:
            return key
    return None


def split(pops: dict[str, Population], lim: dict, fanout_counts) -> dict[str, list[Piece]]:
    """Pieces of every population (see the module docstring); producers after their consumers.
    ``fanout_counts(pop, pieces_so_far)`` gives per out edge the per-axis destination counts. GraphError naming
    the layer and the limit when even one neuron does not fit a core."""
    sharing = bool(lim.get("conv_weight_sharing", 0))
    bits = lim.get("synapse_bits", 0)
    pieces: dict[str, list[Piece]] = {}
    for pop in sorted(pops.values(), key=lambda p: -p.order):
        C, H, W = pop.shape
        cnt = [tuple(np.concatenate([[0], np.cumsum(a)]) for a in edge) for edge in fanout_counts(pop, pieces)]
        wc = _channel_weight(pop)
        cands = sorted(((math.ceil(C / tc) * math.ceil(H / th) * math.ceil(W / tw), tc, th, tw)
                        for tc in _sizes(C) for th in _sizes(H) for tw in _sizes(W)
                        if tc * th * tw <= lim["neurons_per_core"]), key=lambda t: (t[0], -t[1]))
        chosen, best = None, None
        for n, tc, th, tw in cands:
            if chosen is not None and n > min(limit_n, best[0]):  # the cost is at least n
                break
            producers = _producer_cores(pop, (tc, th, tw), lim)
            if best is not None and n + producers > best[0]:
                continue
            pc = _worst_piece(pop, (tc, th, tw), sharing, bits, cnt, wc)
            if _violation(pc, lim) is not None:
                continue
            cost = (n + producers, pc.fanin_axons)
            if best is None or cost < best:
                chosen, best = (n, tc, th, tw), cost
                limit_n = 4 * n if "fanout_axons_per_core" in lim else n
        if chosen is None:
            one = _worst_piece(pop, (1, 1, 1), sharing, bits, cnt, wc)
            key = _violation(one, lim) or "neurons_per_core"
            raise GraphError(f"layer {pop.name!r} cannot be mapped: one neuron needs {getattr(one, LIMITS[key]):,} "
                             f"{LIMITS[key].replace('_', ' ')}, a core allows {lim[key]:,.0f} "
                             f"(resources.{key})")
        _, tc, th, tw = chosen
        out = []
        for c in bounds(C, math.ceil(C / tc)):
            for h in bounds(H, math.ceil(H / th)):
                for w in bounds(W, math.ceil(W / tw)):
                    out.append(piece_resources(pop, Piece(pop.name, len(out), c, h, w), sharing, bits))
        pieces[pop.name] = out
    return pieces


def _cover(a, b, n: int) -> np.ndarray:
    """Per source row in ``[0, n)``: how many of the windows ``[a_i, b_i)`` contain it."""
    d = np.zeros(n + 1, np.int64)
    np.add.at(d, np.clip(np.asarray(a), 0, n), 1)
    np.add.at(d, np.clip(np.asarray(b), 0, n), -1)
    return np.cumsum(d)[:n]


def destination_counts(pops: dict[str, Population]):
    """``fanout_counts`` for :func:`split`: per out edge of a population whose consumer is already split, the
    number of destination pieces reaching each source channel, row and column (the consumer's pieces are a grid of
    channel groups x row tiles x column tiles, so an element reaches the product of the three)."""
    def counts(pop: Population, done: dict[str, list[Piece]]):
        out = []
        for q in pops.values():
            if q.name not in done:
                continue
            grid = done[q.name]
            cs, hs, ws = (sorted({getattr(p, a) for p in grid}) for a in ("c", "h", "w"))
            for e in q.edges:
                if e.src != pop.name:
                    continue
                if tuple(e.src_shape) != tuple(pop.shape):  # a reshaped source: every piece reached
                    out.append((np.full(pop.shape[0], len(grid)), np.ones(pop.shape[1], np.int64),
                                np.ones(pop.shape[2], np.int64)))
                    continue
                C, H, W = e.src_shape
                out.append((_cover(*channel_window(e, [c[0] for c in cs], [c[1] for c in cs], C), C),
                            _cover(*window(e, 0, [h[0] for h in hs], [h[1] for h in hs], H), H),
                            _cover(*window(e, 1, [w[0] for w in ws], [w[1] for w in ws], W), W)))
        return out
    return counts
