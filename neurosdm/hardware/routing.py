"""Placement of a graph's pieces (:mod:`neurosdm.hardware.mapping`) on a chip's mesh, routing of its spikes, and
the mapping report (``mapping.json``).

Placement: one piece per core, the populations in evaluation order, cores taken along a serpentine over each
chip's routers (row 0 west to east, row 1 east to west, ...; the ``cores_per_router`` cores of a router one after
the other), a chip filled before the next; so a producer's last pieces sit beside its consumer's first. Chips are
joined edge to edge in one row (Loihi extends its mesh to neighbouring chips; the global x of a core is
``chip x mesh_x + x``). The host (the graph's input) attaches west of router (0, 0) of chip 0 (an assumption).

Routing: dimension order, X then Y, over the global mesh. Per edge and source piece ``s``, ``f(s, d)`` = the fraction
of ``s``'s elements that reach destination piece ``d`` (the overlap of ``s`` with ``d``'s input window over
``s``'s size: a population's spikes are taken as spread evenly over its elements). Without multicast a spike sends
one packet to every destination core it reaches: packets per spike ``sum_d f``, hops ``sum_d f x manhattan(s, d)``,
chip crossings ``sum_d f x |chip(s) - chip(d)|``. With multicast a spike sends one packet that forks along the
union of the X-then-Y routes to every core some element of ``s`` reaches (an upper bound on the tree of one spike).
Per edge the figures are averaged over the source pieces, weighted by their neurons.

Work per core (:func:`core_shares`): a layer's counts are spread over its pieces in proportion to the piece's
neurons (neuron updates, spikes and their packets) or, for a synaptic layer, to the piece's synapses of that layer.
"""

from __future__ import annotations

import numpy as np

from neurosdm.errors import ConfigError, GraphError
from neurosdm.hardware.mapping import (LIMITS, Piece, channel_window, destination_counts, limits_of, populations, split,
                                       window)
from neurosdm.hardware.profiles import load_profile

__all__ = ["map_program", "try_map", "core_slots", "SCHEME"]

SCHEME = "one piece per core, serpentine placement, dimension-order (X then Y) routing"
UTILISATION = {"neurons": "neurons_per_core", "fanin_axons": "fanin_axons_per_core",
               "fanout_axons": "fanout_axons_per_core", "memory_bits": "synapse_memory_per_core"}


def core_slots(lim: dict, n: int) -> np.ndarray:
    """``[n, 4]`` int: chip, global x, y, slot of the first ``n`` cores in placement order."""
    mx, my, per, cores = (int(lim[k]) for k in ("mesh_x", "mesh_y", "cores_per_router", "cores_per_chip"))
    chip_slots = []
    for y in range(my):
        for x in (range(mx) if y % 2 == 0 else range(mx - 1, -1, -1)):
            chip_slots += [(x, y, s) for s in range(per)]
    chip_slots = chip_slots[:cores]
    out = np.zeros((n, 4), np.int64)
    for k in range(n):
        chip, (x, y, s) = divmod(k, cores)[0], chip_slots[k % cores]
        out[k] = (chip, chip * mx + x, y, s)
    return out


def _overlap(a0, a1, b0, b1):
    return np.clip(np.minimum(a1[:, None], b1[None, :]) - np.maximum(a0[:, None], b0[None, :]), 0, None)


def _fractions(e, src_pieces, dst_pieces) -> np.ndarray:
    """``f[s, d]``: the fraction of source piece ``s``'s elements that reach destination piece ``d``."""
    C, H, W = e.src_shape
    arr = {a: np.array([getattr(p, a) for p in dst_pieces]) for a in ("c", "h", "w")}
    win = {"c": channel_window(e, arr["c"][:, 0], arr["c"][:, 1], C),
           "h": window(e, 0, arr["h"][:, 0], arr["h"][:, 1], H),
           "w": window(e, 1, arr["w"][:, 0], arr["w"][:, 1], W)}
    f = np.ones((len(src_pieces), len(dst_pieces)))
    for a in ("c", "h", "w"):
        s = np.array([getattr(p, a) for p in src_pieces])
        size = (s[:, 1] - s[:, 0]).astype(np.float64)
        f *= _overlap(s[:, 0], s[:, 1], win[a][0], win[a][1]) / size[:, None]
    return f


def _trees(src_xy: np.ndarray, dst_xy: np.ndarray, reach: np.ndarray) -> np.ndarray:
    """Per source ``i``: the links of the union of X-then-Y routes from ``src_xy[i]`` to every destination ``d`` with
    ``reach[i, d]`` (the x span through the source row, then per destination column its y span from that row)."""
    x0, y0 = src_xy[:, 0].astype(float), src_xy[:, 1].astype(float)
    dx, dy = dst_xy[:, 0].astype(float), dst_xy[:, 1].astype(float)
    hi = np.where(reach, dx[None, :], -np.inf).max(axis=1, initial=-np.inf)
    lo = np.where(reach, dx[None, :], np.inf).min(axis=1, initial=np.inf)
    any_ = reach.any(axis=1)
    links = np.where(any_, np.maximum(hi - x0, 0) + np.maximum(x0 - lo, 0), 0.0)
    for x in np.unique(dst_xy[:, 0]):
        col = dst_xy[:, 0] == x
        r = reach[:, col]
        yh = np.where(r, dy[col][None, :], -np.inf).max(axis=1, initial=-np.inf)
        yl = np.where(r, dy[col][None, :], np.inf).min(axis=1, initial=np.inf)
        links += np.where(r.any(axis=1), np.maximum(yh - y0, 0) + np.maximum(y0 - yl, 0), 0.0)
    return links


def _route(e, src_pieces, dst_pieces, src_pos, dst_pos, multicast: bool) -> dict:
    """Per-spike packets, hops and chip crossings of one edge (averaged over the source pieces by neurons), the
    fan-out entries of every source piece, and the most destination cores one source piece reaches."""
    f = _fractions(e, src_pieces, dst_pieces)
    n = np.array([p.neurons for p in src_pieces], np.float64)
    dist = np.abs(src_pos[:, None, 1] - dst_pos[None, :, 1]) + np.abs(src_pos[:, None, 2] - dst_pos[None, :, 2])
    chips = np.abs(src_pos[:, None, 0] - dst_pos[None, :, 0])
    if multicast:
        reach = f > 0
        packets = reach.any(axis=1).astype(np.float64)
        hops = _trees(src_pos[:, 1:3], dst_pos[:, 1:3], reach)
        chip_x = _trees(np.c_[src_pos[:, 0], np.zeros(len(src_pos))], np.c_[dst_pos[:, 0], np.zeros(len(dst_pos))],
                        reach)  # chips in one row: the span of the chip indices
    else:
        packets, hops, chip_x = f.sum(axis=1), (f * dist).sum(axis=1), (f * chips).sum(axis=1)
    w = n / n.sum()
    return {"packets_per_spike": float(w @ packets), "hops_per_spike": float(w @ hops),
            "chip_hops_per_spike": float(w @ chip_x), "fanout": np.rint(f * n[:, None]).sum(axis=1),
            "targets": int((f > 0).sum(axis=1).max())}


def map_program(program, profile) -> dict:
    """Map ``program`` onto ``profile``'s chips (see the module docstring and :mod:`neurosdm.hardware.mapping`).
    Returns the mapping report (JSON-ready): ``fits`` and ``violations`` (limit, layer, need, allowed), cores and
    chips used, utilisation per resource, ``populations`` (pieces with core coordinates and resources), ``edges``
    (packets, hops and chip hops per spike), ``spikes`` (per spiking layer, the sums over its out edges) and
    ``layers`` (per counted layer, its cores and the shares of its work: :func:`core_shares`)."""
    prof = load_profile(profile)
    lim = limits_of(prof)
    pops = populations(program)
    if not pops:
        raise GraphError("the graph has no layer that runs on neuromorphic cores (nothing to map)")
    pieces = split(pops, lim, destination_counts(pops))
    order = sorted(pops.values(), key=lambda p: p.order)
    flat = [pc for p in order for pc in pieces[p.name]]
    pos = core_slots(lim, len(flat))
    where = {}
    for k, pc in enumerate(flat):
        where[(pc.pop, pc.index)] = k
    pos_of = {p.name: pos[[where[(p.name, pc.index)] for pc in pieces[p.name]]] for p in order}
    host = np.array([[0, -1, 0, 0]])
    multicast = bool(lim.get("multicast", 0))
    violations = []
    edges, spikes = [], {}
    fanout = {p.name: np.zeros(len(pieces[p.name])) for p in order}
    targets = {p.name: 0 for p in order}
    for q in order:
        for e in q.edges:
            src = pieces.get(e.src)
            if src is None:  # the host's input
                from_pos, src = host, [_host_piece(e)]
            else:
                from_pos = pos_of[e.src]
            r = _route(e, src, pieces[q.name], from_pos, pos_of[q.name], multicast)
            edges.append({"src": e.src, "dst": q.name, "layer": e.layer or None, "kind": e.kind,
                          **{k: round(r[k], 6) for k in ("packets_per_spike", "hops_per_spike",
                                                         "chip_hops_per_spike")}})
            if e.src in pops:
                fanout[e.src] += r["fanout"]
                targets[e.src] += r["targets"]
                s = spikes.setdefault(e.src, {"packets_per_spike": 0.0, "hops_per_spike": 0.0,
                                              "chip_hops_per_spike": 0.0})
                for k in s:
                    s[k] += r[k]
    for p in order:
        for pc, fo in zip(pieces[p.name], fanout[p.name]):
            pc.fanout_axons = int(fo)
        for key, fieldname in LIMITS.items():  # every piece checked (the split bounded its worst piece)
            worst = max(getattr(pc, fieldname) for pc in pieces[p.name])
            if key in lim and worst > lim[key]:
                violations.append(_violation(key, p.name, worst, lim))
        if "targets_per_neuron" in lim and targets[p.name] > lim["targets_per_neuron"]:
            violations.append(_violation("targets_per_neuron", p.name, targets[p.name], lim))
        distinct = max((e.distinct for e in p.edges), default=1)
        if "weights_per_neuron" in lim and distinct > lim["weights_per_neuron"]:
            violations.append(_violation("weights_per_neuron", p.name, distinct, lim))
    cores = len(flat)
    chips = int(pos[:, 0].max()) + 1
    if "chips_per_system" in lim and chips > lim["chips_per_system"]:
        violations.append(_violation("chips_per_system", "(whole graph)", chips, lim))
    return _report(prof, lim, order, pieces, pos_of, cores, chips, violations, edges, spikes, multicast)


def _host_piece(e) -> Piece:
    C, H, W = e.src_shape
    return Piece("input", 0, (0, C), (0, H), (0, W), neurons=C * H * W)


def _violation(key: str, layer: str, need, lim) -> dict:
    return {"limit": f"resources.{key}", "layer": layer, "need": int(need), "allowed": int(lim[key])}


def _report(prof, lim, order, pieces, pos_of, cores, chips, violations, edges, spikes, multicast) -> dict:
    util = {k: [] for k in UTILISATION}
    pops, layers = [], {}
    for p in order:
        rows = []
        for pc, (chip, x, y, slot) in zip(pieces[p.name], pos_of[p.name].tolist()):
            u = {k: getattr(pc, k) / lim[r] for k, r in UTILISATION.items() if r in lim}
            for k, v in u.items():
                util[k].append(v)
            rows.append({"core": [chip, x, y, slot], "c": list(pc.c), "h": list(pc.h), "w": list(pc.w),
                         "neurons": pc.neurons, "fanin_axons": pc.fanin_axons, "fanout_axons": pc.fanout_axons,
                         "synapses": pc.synapses, "memory_bits": pc.memory_bits,
                         "utilisation": {k: round(v, 4) for k, v in u.items()}})
        pops.append({"population": p.name, "shape": list(p.shape), "spiking": p.spiking, "layers": p.layers,
                     "pieces": rows})
        ids = [_core_id(r["core"], lim) for r in rows]
        n = np.array([pc.neurons for pc in pieces[p.name]], np.float64)
        for name in p.layers:
            syn = np.array([pc.edge_synapses.get(name, 0) for pc in pieces[p.name]], np.float64)
            share = syn / syn.sum() if syn.sum() > 0 else n / n.sum()
            layers[name] = {"cores": ids, "neuron_share": (n / n.sum()).tolist(), "work_share": share.tolist()}
    boards = -(-chips // int(lim["chips_per_board"])) if "chips_per_board" in lim else None
    return {
        "format": "neurosdm mapping v1", "profile": prof.name, "scheme": SCHEME, "multicast": multicast,
        "fits": not violations, "violations": violations, "cores_used": cores, "chips_used": chips,
        "boards_used": boards, "cores_per_chip": int(lim["cores_per_chip"]),
        "mesh": [int(lim["mesh_x"]), int(lim["mesh_y"]), int(lim["cores_per_router"])],
        "utilisation": {k: {"mean": round(float(np.mean(v)), 4), "max": round(float(np.max(v)), 4),
                            "limit": f"resources.{UTILISATION[k]}"} for k, v in util.items() if v},
        "populations": pops, "edges": edges,
        "spikes": {k: {kk: round(vv, 6) for kk, vv in v.items()} for k, v in spikes.items()},
        "layers": layers,
    }


def _core_id(core, lim) -> int:
    """A core's number in placement order (chip-major) from ``[chip, global x, y, slot]``."""
    chip, x, y, slot = core
    mx, per = int(lim["mesh_x"]), int(lim["cores_per_router"])
    lx = x - chip * mx
    col = lx if y % 2 == 0 else mx - 1 - lx
    return int(chip * lim["cores_per_chip"] + (y * mx + col) * per + slot)


def try_map(program, profile) -> tuple[dict | None, str]:
    """:func:`map_program`, or None and the reason (one line) when the profile describes no chip or the graph cannot
    be mapped: what ``neurosdm energy`` falls back on (the lower bound) instead of failing."""
    try:
        m = map_program(program, profile)
    except (ConfigError, GraphError) as e:
        return None, f"no mapping ({e}): the time is the profile's lower bound"
    fit = "fits" if m["fits"] else "does NOT fit (" + "; ".join(
        f"{v['layer']}: {v['limit']} needs {v['need']:,}, allows {v['allowed']:,}" for v in m["violations"][:3]) + ")"
    return m, (f"mapped: {m['cores_used']:,} cores on {m['chips_used']} chip(s), {fit}; {SCHEME}")
