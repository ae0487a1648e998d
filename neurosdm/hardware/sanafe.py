"""neurosdm against SANA-FE's Loihi (docs/sanafe.md; with the mapper's placement: :func:`run_mapped`, docs/mapping.md):
the suite of small integrate-and-fire networks, their mapping onto SANA-FE's cores and the placement that models
SANA-FE's accounting, neurosdm's side of a network (counts and energy), and the comparison with what SANA-FE reports
for the same network and input.

SANA-FE itself (GPL-3.0) is never imported: ``scripts/sanafe_compare.py`` runs it in its own environment on the
graphs, inputs and mappings written here (``scripts/sanafe_suite.py`` and ``scripts/sanafe_compare.sh`` run the
steps).

The networks (:data:`SUITE`): weights are int8 integers (about 30% zeros), thresholds integers, the input a seeded
binary spike train ``[num_steps, *shape]``. The graph starts with an encoder IF layer ``spikes_in`` (threshold 0,
comparison ``>``, reset to 0): for a 0/1 input it re-emits the input spikes in the same step, so the first
weighted layer reads spikes (neurosdm counts synops) as SANA-FE's input neurons deliver them. Neurons: ``v <- v +
x``; spike when ``v > threshold``; then ``v <- 0`` (NIR IF with ``r = 1``, ``v_reset = 0``; graph metadata
``reset = "zero"``, ``comparison = ">"``), which is SANA-FE's ``leaky_integrate_fire`` soma with ``leak_decay = 1``,
``reset_mode = "hard"``, ``reset = 0``.

:func:`run_neurosdm` runs a network on the event engine (float64, time-varying input), records every layer and
prices the counts (pricing is a layer above: the caller passes it, e.g. ``estimate(stats, "loihi-sanafe",
placement=...)``) twice: as shipped, and with SANA-FE's accounting modelled one cause at a time
(:func:`neurosdm.simulators.activity.add_synapse_events` for zero-weight synapses,
:func:`neurosdm.simulators.activity.add_state_updates` for Loihi's update rule (any synaptic event or a nonzero
membrane), and :func:`placement`: the encoder is a spike source, every layer sends one packet per spike to each
destination core (none from the last layer), no hops (every core in tile 0), ``pipeline_steps`` = the depth:
SANA-FE adds one step of latency per layer, so it runs ``num_steps + depth`` steps and every mapped neuron pays the
access energy in each, and the neurons whose membrane is nonzero when their input ends are updated in the
remaining steps).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import nir
import numpy as np

from neurosdm.errors import ConfigError
from neurosdm.graph.program import load_program
from neurosdm.hardware.routing import map_program
from neurosdm.io import atomic_buffer, atomic_path
from neurosdm.simulators.activity import add_state_updates, add_synapse_events
from neurosdm.simulators.foreign import simulate_foreign

CORE_NEURONS = 1024  # SANA-FE's Loihi: at most 1024 neurons per core
#: SANA-FE's Loihi parts priced by the profile: synapse (synop, zero_synop), soma (neuron updates, spike), network
PARTS = {"synapse": ("synop", "zero_synop"), "soma": ("neuron_update_active", "neuron_update_idle", "spike"),
         "network": ("message", "hop")}

#: name: (input shape, layers [("dense", n) | ("conv", channels, k) | ("flatten",)], thresholds, num_steps, rate, seed)
SUITE = {
    "dense2": ((64,), [("dense", 48), ("dense", 10)], (12, 12), 12, 0.3, 1),
    "conv2": ((2, 8, 8), [("conv", 4, 3), ("conv", 4, 3)], (9, 12), 10, 0.3, 2),
    "mixed": ((1, 10, 10), [("conv", 6, 3), ("flatten",), ("dense", 12)], (7, 16), 10, 0.35, 3),
}


def _weights(rng, shape, zero_fraction=0.3) -> np.ndarray:
    """int8-grid integers in -8..12 (a positive bias so that the networks spike), about ``zero_fraction`` zeros."""
    w = rng.integers(-8, 13, size=shape).astype(np.float64)
    w[rng.random(shape) < zero_fraction] = 0.0
    return w


def build_graph(name: str) -> tuple[nir.NIRGraph, np.ndarray]:
    """The NIR graph of suite network ``name`` and its input spike train ``[num_steps, 1, *shape]``."""
    in_shape, spec, thresholds, steps, rate, seed = SUITE[name]
    rng = np.random.default_rng(seed)
    shape = tuple(in_shape)
    nodes = {"input": nir.Input({"input": np.array(shape)}),
             "spikes_in": nir.IF(np.ones(shape), np.zeros(shape), np.zeros(shape))}
    edges = [("input", "spikes_in")]
    prev, thr = "spikes_in", iter(thresholds)
    for i, layer in enumerate(spec):
        if layer[0] == "flatten":
            nodes[f"flat{i}"] = nir.Flatten({"input": np.array(shape)}, start_dim=0, end_dim=-1)
            edges.append((prev, f"flat{i}"))
            prev, shape = f"flat{i}", (int(np.prod(shape)),)
            continue
        if layer[0] == "dense":
            w = _weights(rng, (layer[1], shape[0]))
            nodes[f"fc{i}"] = nir.Affine(w, np.zeros(layer[1]))
            syn, shape = f"fc{i}", (layer[1],)
        else:
            _, co, k = layer
            w = _weights(rng, (co, shape[0], k, k))
            nodes[f"conv{i}"] = nir.Conv2d(shape[1:], w, 1, 0, 1, 1, np.zeros(co))
            syn, shape = f"conv{i}", (co, shape[1] - k + 1, shape[2] - k + 1)
        th = float(next(thr))
        nodes[f"if{i}"] = nir.IF(np.ones(shape), np.full(shape, th), np.zeros(shape))
        edges += [(prev, syn), (syn, f"if{i}")]
        prev = f"if{i}"
    nodes["output"] = nir.Output({"output": np.array(shape)})
    edges.append((prev, "output"))
    graph = nir.NIRGraph(nodes, edges, metadata={"dt": 1.0, "reset": "zero", "comparison": ">"})
    x = (rng.random((steps, 1, *in_shape)) < rate).astype(np.float64)
    return graph, x


def mapping(program) -> dict:
    """SANA-FE mapping of the spiking layers (the encoder first): consecutive cores from core 0, each layer on
    ``ceil(size / 1024)`` cores of its own; ``depth`` (steps of latency behind the input), the synaptic layer that
    feeds it and the spiking layer that layer reads (through Flatten), and its destination layers."""
    layers, core = {}, 0
    by = program.by_name

    def spiking_source(name):
        while by[name].kind == "flatten":
            name = by[name].sources[0]
        return name

    for layer in program.layers:
        if not layer.spiking:
            continue
        syn = by[layer.sources[0]]
        src = None if syn.kind == "input" else spiking_source(syn.sources[0])
        n = layer.size
        cores = list(range(core, core + -(-n // CORE_NEURONS)))
        core = cores[-1] + 1
        layers[layer.name] = {"size": n, "shape": list(layer.out_shape), "cores": cores,
                              "depth": 0 if src is None else layers[src]["depth"] + 1,
                              "synapse_layer": None if src is None else syn.name, "source": src,
                              "kind": "input" if src is None else syn.kind,
                              "threshold": float(np.asarray(layer.v_threshold).flat[0])}
    for name, info in layers.items():
        info["destinations"] = [d for d, i in layers.items() if i["source"] == name]
    return {"layers": layers, "depth": max(i["depth"] for i in layers.values()), "cores_used": core}


def placement(mp: dict, nonzero_end: dict[str, int]) -> dict:
    """The pricing placement (``estimate(..., placement=...)``) for mapping ``mp``: packets per spike = destination
    cores (all in tile 0: no hops); the encoder is a spike source; ``pipeline_steps`` = depth (every neuron is
    accessed in the ``num_steps + depth`` steps of the run); ``extra_updates``: a layer at depth ``d`` runs ``depth -
    d`` steps after its last input, updating every neuron whose membrane is nonzero (``nonzero_end``) in each."""
    if mp["cores_used"] > 4:
        raise ConfigError(f"this suite keeps every network in tile 0 (4 cores); {mp['cores_used']} cores needed")
    layers = {name: {"packets_per_spike": float(sum(len(mp["layers"][d]["cores"]) for d in info["destinations"])),
                     "hops_per_spike": 0.0, **({"source": True} if info["depth"] == 0 else
                                               {"extra_updates": nonzero_end[name] * (mp["depth"] - info["depth"])})}
              for name, info in mp["layers"].items()}
    return {"layers": layers, "pipeline_steps": int(mp["depth"])}


def parts(report: dict) -> dict[str, float]:
    """Energy (pJ) of a pricing report by SANA-FE part."""
    by = report["totals"]["by_term_pj"]
    return {part: float(sum(by.get(t, 0.0) for t in terms)) for part, terms in PARTS.items()}


def _write_and_run(name: str, out: Path):
    """Suite network ``name`` written to ``out/<name>.nir`` and ``<name>.input.npz`` (the spike train, uint8
    ``[num_steps, *shape]``), read back and run on the event engine (what is measured is what was written):
    ``(program, input, result, stats, mapping)``."""
    graph, x = build_graph(name)
    with atomic_buffer(out / f"{name}.nir") as buffer:
        nir.write(buffer, graph)
    with atomic_path(out / f"{name}.input.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, spikes=x[:, 0].astype(np.uint8))
    program = load_program(out / f"{name}.nir")
    res, stats = simulate_foreign(program, x, engine="event", record=True)
    return program, x, res, stats, mapping(program)


def run_neurosdm(name: str, out: Path, price: Callable[..., dict]) -> dict:
    """neurosdm's side of suite network ``name``: writes ``out/<name>.nir``, ``<name>.input.npz`` (the spike train,
    uint8 ``[num_steps, *shape]``) and ``<name>.neurosdm.json`` (mapping, placement, counts, spikes per layer and
    step, energy by part as shipped and modelled, and the energy after each modelled cause) and returns the latter.
    ``price(stats, placement=None)``: the pricing report of a :class:`~neurosdm.simulators.stats.RunStats` (e.g.
    ``neurosdm.energy.estimate`` with the ``loihi-sanafe`` profile)."""
    program, x, res, stats, mp = _write_and_run(name, out)
    # SANA-FE's accounting added one cause at a time (the counters accumulate in ``stats``): the change of the total
    # at each step is that cause's size
    steps = [("shipped profile, neurosdm's default accounting", price(stats))]
    add_synapse_events(stats, program, res["records"])
    steps.append(("+ zero-weight synapses charged (synapse_events)", price(stats)))
    enc = next(n for n, i in mp["layers"].items() if i["depth"] == 0)
    steps.append(("+ encoder = input neurons: no soma terms, packets only",
                  price(stats, placement={"layers": {enc: {"source": True}}})))
    ends = add_state_updates(stats, program, res["records"])
    place = placement(mp, ends)
    no_tail = {"layers": {n: {k: v for k, v in p.items() if k != "extra_updates"} for n, p in place["layers"].items()},
               "pipeline_steps": 0}
    stats_rule = {n: cs.pop("updated_neurons") for n, cs in stats.layers.items() if "updated_neurons" in cs}
    steps.append(("+ packets per spike = destination cores (none from the last layer), hops from the mapping (0)",
                  price(stats, placement=no_tail)))
    steps.append(("+ every neuron accessed in the depth extra steps of SANA-FE's pipeline",
                  price(stats, placement=dict(no_tail, pipeline_steps=place["pipeline_steps"]))))
    for n, v in stats_rule.items():
        stats.layers[n]["updated_neurons"] = v
    steps.append(("+ Loihi's update rule (any synaptic event or a nonzero membrane, also after the input ends)",
                  price(stats, placement=place)))
    shipped, modelled = steps[0][1], steps[-1][1]
    spikes = {n: np.asarray(res["records"][n])[:, 0].reshape(x.shape[0], -1).astype(np.uint8).tolist()
              for n in mp["layers"]}
    side = {"network": name, "num_steps": int(x.shape[0]), "mapping": mp, "placement": place,
            "counts": {layer: {c: np.asarray(v)[0].tolist() for c, v in cs.items()} for layer, cs in
                       stats.layers.items()},
            "spikes": spikes,
            "energy_pj": {"shipped": parts(shipped) | {"total": shipped["totals"]["total_pj"]
                                                       - (shipped["static"] or {}).get("pj", 0.0)},
                          "modelled": parts(modelled) | {"total": modelled["totals"]["total_pj"]
                                                         - (modelled["static"] or {}).get("pj", 0.0)}},
            "unpriced": {"shipped": shipped["unpriced"], "modelled": modelled["unpriced"]},
            "steps": [{"change": what, **parts(r),
                       "total": r["totals"]["total_pj"] - (r["static"] or {}).get("pj", 0.0)} for what, r in steps]}
    with atomic_path(out / f"{name}.neurosdm.json") as tmp:
        Path(tmp).write_text(json.dumps(side))
    return side


def rel(a: float, b: float) -> float:
    """Relative difference of neurosdm ``a`` to SANA-FE ``b`` (0 when both are 0)."""
    return 0.0 if a == b else (a - b) / b if b else float("inf")


def compare(ns: dict, sf: dict) -> dict:
    """One network: counts per layer and step aligned for SANA-FE's latency (neurosdm step k of a layer at depth d
    is SANA-FE step k + d), synaptic events, packets, neuron updates, and energy by part. ``ns``: what
    :func:`run_neurosdm` returned; ``sf``: what ``scripts/sanafe_compare.py`` wrote (``<name>.sanafe.json``)."""
    K = ns["num_steps"]
    layers = {}
    for name, info in ns["mapping"]["layers"].items():
        d = info["depth"]
        a = np.asarray(ns["spikes"][name], np.int64)  # [K, N]
        b = np.asarray(sf["spikes"][name], np.int64)  # [S, N]
        window, outside = b[d:d + K], np.delete(b, np.s_[d:d + K], axis=0)
        layers[name] = {"depth": d, "neurons": info["size"], "spikes_neurosdm": int(a.sum()),
                        "spikes_sanafe": int(b.sum()), "spikes_sanafe_outside_window": int(outside.sum()),
                        "spike_trains_identical": bool(np.array_equal(a, window)),
                        "spikes_per_step_neurosdm": a.sum(axis=1).tolist(),
                        "spikes_per_step_sanafe": window.sum(axis=1).tolist()}
    counts = ns["counts"]
    syn_layers = [i["synapse_layer"] for i in ns["mapping"]["layers"].values() if i["synapse_layer"]]
    events = int(sum(sum(counts[s]["synapse_events"]) for s in syn_layers))
    synops = int(sum(sum(counts[s]["synops"]) for s in syn_layers))
    lif = [n for n, i in ns["mapping"]["layers"].items() if i["depth"] > 0]
    active = int(sum(sum(counts[n]["active_neurons"]) for n in lif))
    updated = int(sum(sum(counts[n]["updated_neurons"]) + ns["placement"]["layers"][n].get("extra_updates", 0)
                      for n in lif))
    packets_ns = sum(p.get("packets_per_spike", 1.0) * layers[n]["spikes_neurosdm"]
                     for n, p in ns["placement"]["layers"].items())
    sfc = sf["counts"]
    energy = {}
    for variant in ("shipped", "modelled"):
        e = ns["energy_pj"][variant]
        energy[variant] = {part: {"neurosdm_pj": e[part], "sanafe_pj": sf["energy_pj"][part],
                                  "rel_diff": rel(e[part], sf["energy_pj"][part])}
                           for part in ("synapse", "soma", "network", "total")}
    return {
        "network": ns["network"], "num_steps": K, "sanafe_steps": sf["steps"], "depth": ns["mapping"]["depth"],
        "neurons": {n: i["size"] for n, i in ns["mapping"]["layers"].items()},
        "layers": layers,
        "counts": {
            "synapse_events": {"neurosdm_nonzero_synops": synops, "neurosdm_all_synapses": events,
                               "sanafe": sfc["synapse_events"]},
            "packets": {"neurosdm": packets_ns, "sanafe": sfc["packets"]},
            "hops": {"neurosdm": 0, "sanafe": sfc["hops"]},
            "neuron_updates": {"neurosdm_active": active, "neurosdm_updated_loihi_rule": updated,
                               "sanafe_updated": sfc["lif_updated"],
                               "neurosdm_accesses": int(sum(i["size"] for n, i in ns["mapping"]["layers"].items()
                                                            if n in lif) * (K + ns["mapping"]["depth"])),
                               "sanafe_accesses": sfc["lif_accesses"]},
        },
        "energy": energy,
        "sanafe_by_hand": sf["by_hand"],
        "causes": [dict(st, delta_total_pj=st["total"] - prev["total"],
                        delta_of_sanafe_total=(st["total"] - prev["total"]) / sf["energy_pj"]["total"])
                   for prev, st in zip([ns["steps"][0]] + ns["steps"][:-1], ns["steps"])],
        "sanafe_dense_synapse_unit": sf.get("dense_unit"),
    }


# ---------------------------------------------------------------------------- the mapper's placement on SANA-FE

def _sanafe_cores(m: dict, name: str, shape) -> np.ndarray:
    """Per neuron (NIR's C order) of population ``name``: its SANA-FE core index (SANA-FE numbers the tiles of its
    8 x 4 mesh column by column, tile = x * 4 + y, and the cores of a tile after it: core = tile x 4 + slot)."""
    C, H, W = (list(shape) + [1, 1])[:3] if len(shape) == 3 else (int(np.prod(shape)), 1, 1)
    mx, my, per = m["mesh"]
    out = np.zeros((C, H, W), np.int64)
    for pc in next(p for p in m["populations"] if p["population"] == name)["pieces"]:
        chip, x, y, slot = pc["core"]
        if chip:
            raise ConfigError("the SANA-FE check keeps every network on one chip")
        out[slice(*pc["c"]), slice(*pc["h"]), slice(*pc["w"])] = (x * my + y) * per + slot
    return out.reshape(-1)


def _targets(program, mp: dict, src: str, dst: str, n_src: int) -> list[np.ndarray]:
    """Per neuron of spiking layer ``src``: the neurons of ``dst`` its synapses reach (every pair of a dense layer,
    every kernel position of a stride-1 unpadded conv, as SANA-FE connects them)."""
    syn = program.by_name[mp["layers"][dst]["synapse_layer"]]
    if syn.kind == "affine":
        return [np.arange(mp["layers"][dst]["size"])] * n_src
    co, ci, kh, kw = syn.weight.shape
    _, hi, wi = syn.in_shape
    ho, wo = hi - kh + 1, wi - kw + 1
    out = []
    for j in range(n_src):
        c, y, x = np.unravel_index(j, (ci, hi, wi))
        oy = y - np.arange(kh)
        ox = x - np.arange(kw)
        oy, ox = oy[(oy >= 0) & (oy < ho)], ox[(ox >= 0) & (ox < wo)]
        out.append((np.arange(co)[:, None, None] * ho * wo + oy[None, :, None] * wo + ox[None, None, :]).ravel())
    return out


def run_mapped(name: str, out: Path, profile, price: Callable[..., dict]) -> dict:
    """Suite network ``name`` placed by neurosdm's mapper (:func:`neurosdm.hardware.routing.map_program` on
    ``profile``, a ``loihi-sanafe`` variant) for SANA-FE (``scripts/sanafe_mapped.py``): writes ``<name>.nir``,
    ``<name>.input.npz`` and ``<name>.mapped.json`` (SANA-FE's layer table with each neuron's core, neurosdm's spikes,
    the exact packets and hops of this placement for the simulated spikes, the mapper's per-layer estimate from
    the spike counts, and the time per step of ``price(stats, mapping=...)``) and returns the latter."""
    program, x, res, stats, mp = _write_and_run(name, out)
    m = map_program(program, profile)
    per, my = m["mesh"][2], m["mesh"][1]
    spikes, exact = {}, {"packets": 0, "hops": 0}
    for name_l, info in mp["layers"].items():
        info["core_of_neuron"] = _sanafe_cores(m, name_l, info["shape"]).tolist()
        info["cores"] = [info["core_of_neuron"][0]]
        spikes[name_l] = np.asarray(res["records"][name_l])[:, 0].reshape(x.shape[0], -1).astype(np.int64)
    for name_l, info in mp["layers"].items():
        src_core = np.asarray(info["core_of_neuron"])
        fired = spikes[name_l].sum(axis=0)
        for dst in info["destinations"]:
            dcore = np.asarray(mp["layers"][dst]["core_of_neuron"])
            for j, t in enumerate(_targets(program, mp, name_l, dst, info["size"])):
                cores = np.unique(dcore[t])
                tile, dtile = src_core[j] // per, cores // per
                exact["packets"] += int(fired[j]) * len(cores)
                hops = np.abs(tile // my - dtile // my) + np.abs(tile % my - dtile % my)  # tile = x * my + y
                exact["hops"] += int(fired[j]) * int(hops.sum())
    est = {k: sum(m["spikes"].get(n, {}).get(f"{k}_per_spike", 0) * int(s.sum()) for n, s in spikes.items())
           for k in ("packets", "hops")}
    r = price(stats, mapping=m)
    side = {"network": name, "num_steps": int(x.shape[0]), "mapping": mp, "cores_used": m["cores_used"],
            "spikes": {n: s.sum(axis=1).tolist() for n, s in spikes.items()}, "exact": exact, "mapper": est,
            "time_per_step_s": r["time"]["total_s"] / x.shape[0] if r["time"] else None}
    with atomic_path(out / f"{name}.mapped.json") as tmp:
        Path(tmp).write_text(json.dumps(side))
    return side
