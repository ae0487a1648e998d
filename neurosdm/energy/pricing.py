"""Energy, time and EDP of a simulated run priced with a hardware profile (:mod:`neurosdm.hardware.profiles`).

Profiles are data (``neurosdm/hw_profiles/*.toml``, schema in that folder's README.md, loaded by
:func:`~neurosdm.hardware.profiles.load_profile`): every constant has a value, a unit, a source and a kind of
evidence. :func:`estimate` is a pure function of a :class:`~neurosdm.simulators.stats.RunStats` and a profile:

- chip terms, per layer, from the exact counts: ``synop`` (synops), ``graded_op`` (graded_ops), ``mac`` (macs of
  analog-input convs), ``fanin_add`` (fanin_adds), ``scale_op`` (events_in of Scale nodes), ``neuron_update_active``
  (active_neurons) and ``neuron_update_idle`` (neuron_updates - active_neurons), both priced by ``neuron_update``
  when the profile has no active/idle split, ``spike`` (spikes_out) and ``hop`` (spikes_out x
  ``mapping.hops_per_spike``); ``sync``: one barrier per spiking step per image;
- two refinements a profile may price: ``message`` (a spike packet sent to a destination core: spikes_out x packets
  per spike, one unless a placement says otherwise; counted only when the profile prices it, since other profiles
  include the message in ``spike``) and ``zero_synop`` (a spike through a zero-weight synapse: ``synapse_events -
  synops``, counted only when the run has the ``synapse_events`` counter of
  :func:`~neurosdm.simulators.activity.add_synapse_events`, for hardware that stores and processes every synapse
  of a layer, as SANA-FE does);
- Loihi's update rule (SANA-FE): with the counter ``updated_neurons``
  (:func:`~neurosdm.simulators.activity.add_state_updates`: any synaptic event or a nonzero membrane) the active
  updates are those instead of ``active_neurons`` (nonzero summed input);
- a placement (``estimate(..., placement=...)``, :func:`estimate`) refines the spike terms per layer: packets and
  hops per spike from a mapping to cores, spike sources that stand for input neurons (only their packets and hops
  are charged), updates charged after the input ends (``extra_updates``), and ``pipeline_steps``: a chip with
  one step of latency per layer runs ``num_steps + pipeline_steps`` steps per call and every neuron pays the idle
  update (the neuron access) in the extra ones;
- host terms (``host_macs``, ``host_elementwise``) priced with the profile's host profile (``mac``, ``elementwise``);
- a mapping (``estimate(..., mapping=...)``: the report of :func:`neurosdm.hardware.routing.map_program`, what
  ``neurosdm energy`` uses by default): packets, hops and chip crossings per spike of every spiking layer from the
  placement (``chip_hop``: a packet crossing a chip boundary, listed unpriced where the profile has no price), the
  time of a spiking step = ``sync`` + the busiest core's work (:mod:`neurosdm.energy.timing`), the static power
  of every chip used, and the cores that limit the time;
- without a mapping, static power x the estimated chip time: per spiking step ``sync`` plus the sum of count x
  latency over ``mapping.parallel_cores`` (a lower bound: every core evenly loaded; host time is not modelled);
- ``unpriced``: every nonzero count the profile has no price for (never silently zero), with its count.

``events_in`` of convs and ``saturations`` describe work already priced (or none) and are not terms.

:func:`report_csv` writes a report as CSV; :func:`price_all` prices one run on every profile, with the ANN
baselines and the SDM paper's formula of :mod:`neurosdm.energy.baselines`.
"""

from __future__ import annotations

import csv
import io

import numpy as np

from neurosdm.energy.baselines import (ann_baseline, ann_per_image, firing_rates, paper_energy, program_macs,
                                       snn_to_ann_ratio)
from neurosdm.energy.timing import SYNAPTIC_TERMS, core_time
from neurosdm.errors import ConfigError
from neurosdm.hardware.profiles import Constant, Profile, list_profiles, load_profile
from neurosdm.hardware.routing import try_map

__all__ = ["PLACEMENT_LAYER_KEYS", "estimate", "price_all", "report_csv"]


# ----------------------------------------------------------------------------------------------------- estimate

PLACEMENT_LAYER_KEYS = {"packets_per_spike", "hops_per_spike", "chip_hops_per_spike", "source", "extra_updates"}


def _check_placement(placement: dict | None, stats) -> dict:
    """``placement`` validated: ``{"layers": {layer: {packets_per_spike, hops_per_spike, source}}, "pipeline_steps":
    int}`` (every key optional); ConfigError naming an unknown key or layer, or a negative number."""
    if placement is None:
        return {"layers": {}, "pipeline_steps": 0}
    if not isinstance(placement, dict) or set(placement) - {"layers", "pipeline_steps"}:
        raise ConfigError(f"placement must be a dict with keys 'layers' and 'pipeline_steps', got "
                          f"{sorted(placement) if isinstance(placement, dict) else type(placement).__name__}")
    layers = dict(placement.get("layers", {}))
    for name, p in layers.items():
        if name not in stats.layers:
            raise ConfigError(f"placement names layer {name!r}, which the run has no counts for "
                              f"(layers: {', '.join(stats.layers)})")
        if not isinstance(p, dict) or set(p) - PLACEMENT_LAYER_KEYS:
            raise ConfigError(f"placement of layer {name!r}: allowed keys are {sorted(PLACEMENT_LAYER_KEYS)}, got "
                              f"{sorted(p) if isinstance(p, dict) else p!r}")
        for k in ("packets_per_spike", "hops_per_spike", "chip_hops_per_spike", "extra_updates"):
            if k in p and (isinstance(p[k], bool) or not isinstance(p[k], (int, float)) or p[k] < 0):
                raise ConfigError(f"placement of layer {name!r}: {k} must be a number >= 0, got {p[k]!r}")
    steps = placement.get("pipeline_steps", 0)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ConfigError(f"placement: pipeline_steps must be an integer >= 0, got {steps!r}")
    return {"layers": layers, "pipeline_steps": int(steps)}


def _layer_term_counts(kind: str, cs: dict, hops: float | None, place: dict | None = None,
                       messages: bool = False, pipeline_steps: int = 0,
                       per_step: bool = False) -> dict[str, np.ndarray]:
    """Counts ``[denoising_steps]`` (``per_step``: ``[denoising_steps, num_steps]``; pipeline updates in the last
    step) of every chip term of one layer (float for ``hop``, ``chip_hop`` and ``message``).

    ``hops``: the profile's hops per spike (None: no mapping, no hop term); ``place``: this layer's placement
    (``packets_per_spike`` (default 1), ``hops_per_spike`` (default ``hops``), ``source``: only ``message`` and
    ``hop`` are charged; ``extra_updates``: updates per call charged in the pipeline steps); ``messages``: count
    ``message`` = spikes x packets per spike; ``pipeline_steps``: idle updates added per neuron (the updates of one
    spiking step x ``pipeline_steps``). With the counter ``updated_neurons``
    (:func:`~neurosdm.simulators.activity.add_state_updates`) the active updates are those, not ``active_neurons``."""
    out = {}
    place = place or {}

    def d(name):
        return (cs[name] if per_step else cs[name].sum(axis=1)) if name in cs else None

    active = "updated_neurons" if "updated_neurons" in cs else "active_neurons"
    for counter, term in (("synops", "synop"), ("graded_ops", "graded_op"), ("macs", "mac"),
                          ("fanin_adds", "fanin_add"), (active, "neuron_update_active")):
        v = d(counter)
        if v is not None:
            out[term] = v
    if kind == "scale" and "events_in" in cs:
        out["scale_op"] = d("events_in")
    if "synapse_events" in cs and "synops" in cs:
        out["zero_synop"] = d("synapse_events") - d("synops")
    if "neuron_updates" in cs:
        extra = float(place.get("extra_updates", 0))
        if extra:
            out["neuron_update_active"] = out.get("neuron_update_active", 0) + extra
        pipe = pipeline_steps * cs["neuron_updates"][:, 0]
        if per_step:
            pipe = np.concatenate([np.zeros((len(pipe), cs["neuron_updates"].shape[1] - 1)), pipe[:, None]], axis=1)
        out["neuron_update_idle"] = d("neuron_updates") - out.get("neuron_update_active", 0) + pipe
    if "spikes_out" in cs:
        spikes = d("spikes_out").astype(np.float64)
        out["spike"] = spikes
        if messages:
            out["message"] = spikes * float(place.get("packets_per_spike", 1.0))
        h = place.get("hops_per_spike", hops)
        if h is not None:
            out["hop"] = spikes * float(h)
        if place.get("chip_hops_per_spike"):
            out["chip_hop"] = spikes * float(place["chip_hops_per_spike"])
    if place.get("source"):  # an input neuron: no soma work, only its packets and hops
        for term in ("neuron_update_active", "neuron_update_idle", "spike"):
            out.pop(term, None)
    return out


def _price(profile: Profile, term: str, table: str = "energy") -> Constant | None:
    if term.startswith("neuron_update_"):
        which = term.rsplit("_", 1)[1]
        return profile.neuron_price(which) if table == "energy" else profile.neuron_latency(which)
    return getattr(profile, table).get(term)


def estimate(stats, profile: str | Profile, host_profile: str | Profile | None = None,
             placement: dict | None = None, mapping: dict | None = None) -> dict:
    """Price a :class:`RunStats` with ``profile`` (host work with ``host_profile``, default the profile's own
    ``host``). Pure: reads only its arguments (and the profile files when given by name). Energies in pJ, times
    in seconds. Returns a dict (JSON-ready): ``layers`` (per layer and term: count, pJ), ``host``, ``static``,
    ``totals`` (by term, total, per image, per denoising step (all images), per network call per image),
    ``time`` (or None), ``edp_per_image_js``, ``unpriced`` and ``assumptions``. A run with a steps schedule
    (``stats.meta["spiking_steps_per_call"]``) pays each call's own spiking steps in barriers, time and static
    power, not the widest call's.

    ``placement`` (optional; e.g. SANA-FE's mapping, ``scripts/sanafe_suite.py``): ``{"layers": {layer:
    {"packets_per_spike": p, "hops_per_spike": h, "source": bool, "extra_updates": u}}, "pipeline_steps": n}``.
    Per layer, a spike costs ``spike + p x message + h x hop`` (defaults ``p = 1``, ``h = mapping.hops_per_spike``;
    ``message`` only when the profile prices it); a ``source`` layer (input neurons: spikes injected into the chip)
    pays only its ``p x message + h x hop``; ``pipeline_steps``: every neuron pays ``n`` more idle updates per call
    (a chip with one step of latency per layer runs ``num_steps + n`` steps), ``u`` of which are active updates
    (neurons that a chip updates after their input ended, e.g. a nonzero membrane under Loihi's rule).
    ``neuron_update_active`` + ``neuron_update_idle`` per call = ``neuron_updates + n x neurons``.

    ``mapping`` (optional; :func:`neurosdm.hardware.routing.map_program` on the same graph and profile): packets,
    hops and chip hops per spike of every spiking layer from the placement (a ``placement`` entry wins), the time
    per spiking step = ``sync`` + the busiest core's work (:func:`neurosdm.energy.timing.core_time`), static power
    x the chips used; the report gains ``mapping`` (cores, chips, fits, the limiting cores)."""
    prof = load_profile(profile)
    place = _check_placement(placement, stats)
    if mapping is not None:
        for name, s in mapping.get("spikes", {}).items():
            if name in stats.layers:
                place["layers"][name] = {**s, **place["layers"].get(name, {})}
    messages = "message" in prof.energy
    host_name = host_profile if host_profile is not None else (prof.host or None)
    host = load_profile(host_name) if host_name else None
    D = len(stats.timesteps) or (next(iter(next(iter(stats.layers.values())).values())).shape[0]
                                 if stats.layers else 0)
    images = max(int(stats.images), 1)
    K = int(stats.num_steps)
    hops_c = prof.mapping.get("hops_per_spike")
    hops = hops_c.value if hops_c else 0.0
    cores_c = prof.mapping.get("parallel_cores")
    cores = max(cores_c.value, 1.0) if cores_c else 1.0
    unpriced: dict[tuple[str, str], dict] = {}
    untimed: set[str] = set()
    by_term: dict[str, np.ndarray] = {}
    busy_ns = np.zeros(D)  # chip latency sum (before dividing by the cores)
    work: dict[str, dict[str, np.ndarray]] = {}  # with a mapping: per layer, ns [D, K] by kind of term
    any_latency = bool(prof.latency)
    layers = []
    for name, cs in stats.layers.items():
        kind = stats.layer_kinds.get(name, "")
        counts = _layer_term_counts(kind, cs, hops if hops_c is not None else None, place["layers"].get(name),
                                    messages, place["pipeline_steps"])
        terms = {}
        if mapping is not None:
            per_k = _layer_term_counts(kind, cs, hops if hops_c is not None else None, place["layers"].get(name),
                                       messages, place["pipeline_steps"], per_step=True)
            w = work.setdefault(name, {"synaptic": np.zeros((D, K)), "neuron": np.zeros((D, K))})
            for term, v in per_k.items():
                lat = _price(prof, term, "latency")
                if lat is not None and _price(prof, term) is not None:
                    w["synaptic" if term in SYNAPTIC_TERMS else "neuron"] += np.asarray(v, np.float64) * lat.value
        for term, v in counts.items():
            v = np.asarray(v, np.float64)
            total = float(v.sum())
            if total == 0:
                continue
            if term == "hop" and hops_c is None and "hops_per_spike" not in place["layers"].get(name, {}):
                continue  # no mapping: spikes are priced by "spike" alone (listed unpriced there if needed)
            c = _price(prof, term)
            if c is None:
                u = unpriced.setdefault((term, "chip"), {"term": term, "where": "chip", "count": 0, "layers": 0})
                u["count"] += total
                u["layers"] += 1
                continue
            pj = v * c.value
            terms[term] = {"count": total, "pj": float(pj.sum())}
            by_term[term] = by_term.get(term, 0) + pj
            lat = _price(prof, term, "latency")
            if lat is not None:
                busy_ns += v * lat.value
            elif any_latency and c.value > 0:
                untimed.add(term)
        layers.append({"layer": name, "kind": kind, "terms": terms,
                       "total_pj": float(sum(t["pj"] for t in terms.values()))})
    # barrier synchronisation: once per spiking step per image; a run with a steps schedule made each call's own
    # number of steps (its counters are zero-padded to the widest, K)
    per_call = stats.meta.get("spiking_steps_per_call")
    steps = np.asarray(per_call, np.float64) if per_call and len(per_call) == D else np.full(D, float(K))
    syncs = steps * images
    if "sync" in prof.energy:
        by_term["sync"] = syncs * prof.energy["sync"].value
    elif "sync" in prof.latency:  # a barrier exists (it has a latency) but its energy is not published
        unpriced[("sync", "chip")] = {"term": "sync", "where": "chip", "count": float(syncs.sum()), "layers": 0}
    sync_ns = syncs * (prof.latency["sync"].value if "sync" in prof.latency else 0.0)
    # host work
    host_terms = {}
    for counter, term in (("host_macs", "mac"), ("host_elementwise", "elementwise")):
        v = np.asarray(stats.host.get(counter, np.zeros(D)), np.float64)
        if v.sum() == 0:
            continue
        c = host.energy.get(term) if host is not None else None
        if c is None:
            unpriced[(term, "host")] = {"term": term, "where": "host", "count": float(v.sum()), "layers": 0}
            continue
        host_terms[term] = {"count": float(v.sum()), "pj": float((v * c.value).sum())}
        by_term[f"host_{term}"] = v * c.value
    # time and static power
    time = None
    mapped = None
    chips = 1
    if mapping is not None:
        chips = int(mapping["chips_used"])
        mapped = {k: mapping[k] for k in ("profile", "scheme", "fits", "violations", "cores_used", "chips_used",
                                          "boards_used")}
    if any_latency:
        if mapping is not None:
            busiest, limiting, _ = core_time(work, mapping, (D, K))
            step_ns = sync_ns + busiest.sum(axis=1)
            mapped["limiting_cores"] = limiting
            model = (f"per spiking step: sync + the busiest core's work ({mapping['cores_used']} cores on {chips} "
                     f"chip(s); each layer's counts spread over its pieces by neurons or synapses); host time not "
                     f"modelled")
        else:
            step_ns = sync_ns + busy_ns / cores
            model = (f"per spiking step: sync + sum(count x latency) / {cores:g} parallel cores (a lower bound: no "
                     f"mapping, every core evenly loaded); host time not modelled")
        time = {"total_s": float(step_ns.sum() * 1e-9), "per_image_s": float(step_ns.sum() * 1e-9 / images),
                "per_denoising_step_s": (step_ns * 1e-9).tolist(), "untimed_terms": sorted(untimed),
                "model": model}
    static = None
    if "static" in prof.power:
        p_mw = prof.power["static"].value * chips
        if time is None:
            unpriced[("static", "chip")] = {"term": "static", "where": "chip (no time estimate: no latencies)",
                                            "count": p_mw, "layers": 0}
        else:
            st = np.asarray(time["per_denoising_step_s"]) * p_mw * 1e-3 * 1e12  # W x s -> J -> pJ
            by_term["static"] = st
            static = {"power_mw": p_mw, "chips": chips, "time_s": time["total_s"], "pj": float(st.sum())}
    per_step = np.zeros(D)
    for v in by_term.values():
        per_step = per_step + v
    total = float(per_step.sum())
    calls = D  # network calls per image
    totals = {"by_term_pj": {k: float(np.sum(v)) for k, v in by_term.items()}, "total_pj": total,
              "per_image_pj": total / images, "per_denoising_step_pj": per_step.tolist(),
              "per_call_per_image_pj": total / images / max(calls, 1)}
    edp = (total / images * 1e-12) * time["per_image_s"] if time else None
    assumptions = prof.assumptions() + ([f"host {a}" for a in host.assumptions()] if host is not None else [])
    return {"profile": prof.name, "description": prof.description, "host_profile": host.name if host else None,
            "images": int(stats.images), "denoising_steps": D, "num_steps": K, "layers": layers,
            "host": {"terms": host_terms, "total_pj": float(sum(t["pj"] for t in host_terms.values()))},
            "static": static, "totals": totals, "time": time, "edp_per_image_js": edp,
            "unpriced": [dict(v, count=(int(v["count"]) if float(v["count"]).is_integer() else v["count"]))
                         for v in unpriced.values()],
            "assumptions": assumptions, "meta": dict(stats.meta),
            **({"placement": place} if placement is not None else {}),
            **({"mapping": mapped} if mapped is not None else {})}


def report_csv(report: dict) -> str:
    """A report of :func:`estimate` as CSV text (what ``neurosdm energy --csv`` writes): the header
    ``layer,kind,term,count,pJ``, one row per layer and term, then the host terms (layer and kind ``host``), the
    static energy (``chip,static,static,,pJ``) and every unpriced count (``where,unpriced,term,count,``)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["layer", "kind", "term", "count", "pJ"])
    for layer in report["layers"]:
        for term, v in layer["terms"].items():
            w.writerow([layer["layer"], layer["kind"], term, v["count"], v["pj"]])
    for term, v in report["host"]["terms"].items():
        w.writerow(["host", "host", term, v["count"], v["pj"]])
    if report["static"]:
        w.writerow(["chip", "static", "static", "", report["static"]["pj"]])
    for u in report["unpriced"]:
        w.writerow([u["where"], "unpriced", u["term"], u["count"], ""])
    return buf.getvalue()


# -------------------------------------------------------------------------------------- a run on every profile

def price_all(stats, program, profiles=None, baselines=("cmos45-fp32", "cmos45-int8")) -> dict:
    """A simulated run priced on every profile (default: all shipped), with the ANN baselines of the same
    architecture and the SDM paper's formula on the measured firing rates; each profile with resources on the
    mapping of ``program`` (:func:`neurosdm.hardware.routing.try_map`). JSON-ready dict: ``counts``,
    ``host``, ``firing_rates``, ``summary`` (per profile: mJ per image, time, EDP, ratio to the fp32 ANN, unpriced,
    energy by term, cores and chips of the mapping), ``ann_baseline``, ``paper_formula_on_measured_rates`` and the
    full ``reports``."""
    calls = len(stats.timesteps)
    reports = {}
    for name in profiles or list_profiles():
        mapping, note = try_map(program, name)
        reports[name] = dict(estimate(stats, name, mapping=mapping), mapping_note=note)
    base = {name: ann_per_image(ann_baseline(program, name), calls) for name in baselines}
    rates = firing_rates(stats, program)
    # the paper formula's first layer (priced as MACs): the first conv in evaluation order, which reads the image
    # (directly, or through a TSM scale node)
    first = next(layer.name for layer in program.layers if layer.kind == "conv")
    paper = paper_energy(program_macs(program), rates, program.num_steps, first)
    paper["per_image_pj"] = paper["total_pj"] * calls
    ref = base.get("cmos45-fp32")
    summary = {
        name: {"per_image_mj": r["totals"]["per_image_pj"] * 1e-9,
               "per_call_per_image_uj": r["totals"]["per_call_per_image_pj"] * 1e-6,
               "time_per_image_ms": r["time"]["per_image_s"] * 1e3 if r["time"] else None,
               "edp_per_image_js": r["edp_per_image_js"],
               "vs_ann_fp32": snn_to_ann_ratio(r, ref) if ref else None,
               "unpriced": {f"{u['term']} ({u['where']})": u["count"] for u in r["unpriced"]},
               "cores": r["mapping"]["cores_used"] if r.get("mapping") else None,
               "chips": r["mapping"]["chips_used"] if r.get("mapping") else None,
               "by_term_mj": {k: v * 1e-9 for k, v in r["totals"]["by_term_pj"].items()}}
        for name, r in reports.items()}
    return {
        "counts": {c: stats.total(c) for c in ("synops", "graded_ops", "macs", "fanin_adds", "neuron_updates",
                                               "active_neurons", "spikes_out")},
        "host": {k: int(v.sum()) for k, v in stats.host.items()},
        "firing_rates": rates,
        "summary": summary,
        "ann_baseline": {k: {kk: v[kk] for kk in ("macs", "mac_pj", "pj_per_call", "pj_per_image", "convention")}
                         for k, v in base.items()},
        "paper_formula_on_measured_rates": {k: paper[k] for k in ("total_pj", "first_pj", "sops", "mean_rate",
                                                                   "per_image_pj")},
        "reports": reports,
    }
