"""Energy, time and EDP of a simulated run priced with a hardware profile; ANN baselines; the SDM paper's formula.

Profiles are data (``neurosdm/hw_profiles/*.toml``, schema in that folder's README.md): every constant has a value,
a unit, a source and a kind of evidence. :func:`estimate` is a pure function of a
:class:`~neurosdm.simulators.stats.RunStats` and a profile:

- chip terms, per layer, from the exact counts: ``synop`` (synops), ``graded_op`` (graded_ops), ``mac`` (macs of
  analog-input convs), ``fanin_add`` (fanin_adds), ``scale_op`` (events_in of Scale nodes), ``neuron_update_active``
  (active_neurons) and ``neuron_update_idle`` (neuron_updates - active_neurons), both priced by ``neuron_update``
  when the profile has no active/idle split, ``spike`` (spikes_out) and ``hop`` (spikes_out x
  ``mapping.hops_per_spike``); ``sync``: one barrier per spiking step per image;
- two refinements a profile may price: ``message`` (a spike packet sent to a destination core: spikes_out x packets
  per spike, one unless a placement says otherwise; counted only when the profile prices it, since other profiles
  include the message in ``spike``) and ``zero_synop`` (a spike through a zero-weight synapse: ``synapse_events -
  synops``, counted only when the run has the ``synapse_events`` counter of :func:`add_synapse_events`, for
  hardware that stores and processes every synapse of a layer, as SANA-FE does);
- Loihi's update rule (SANA-FE): with the counter ``updated_neurons`` (:func:`add_state_updates`: any synaptic
  event or a nonzero membrane) the active updates are those instead of ``active_neurons`` (nonzero summed input);
- a placement (``estimate(..., placement=...)``, :func:`estimate`) refines the spike terms per layer: packets and
  hops per spike from a mapping to cores, spike sources that stand for input neurons (only their packets and hops
  are charged), updates charged after the input ends (``extra_updates``), and ``pipeline_steps``: a chip with
  one step of latency per layer runs ``num_steps + pipeline_steps`` steps per call and every neuron pays the idle
  update (the neuron access) in the extra ones;
- host terms (``host_macs``, ``host_elementwise``) priced with the profile's host profile (``mac``, ``elementwise``);
- static power x the estimated chip time: per spiking step ``sync`` plus the sum of count x latency over
  ``mapping.parallel_cores`` (host time is not modelled);
- ``unpriced``: every nonzero count the profile has no price for (never silently zero), with its count.

``events_in`` of convs and ``saturations`` describe work already priced (or none) and are not terms.

ANN baselines (:func:`ann_baseline`): the same architecture with every synapse a dense MAC, evaluated once per
network call (not once per spiking step), from an exported :class:`~neurosdm.simulators.program.Program`
(:func:`program_macs`: nonzero weights x valid positions, structural zeros and padding excluded, i.e. RunStats'
``macs`` formula with an all-ones input) or from a torch model (:func:`model_macs`, forward hooks; ``padding``
"dense" counts every tap as thop-style FLOP counters do, "valid" skips the taps on padding).

The SDM paper's formula (:func:`paper_energy`): ``E = 4.6 pJ x FLOPs(first conv) + 0.9 pJ x sum_l fr_l x T x
FLOPs_l``. :func:`paper_check` gives its ANN figure on the paper-cifar10 architecture (29.23 mJ in the paper).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neurosdm.errors import ConfigError

__all__ = ["PROFILE_DIR", "TERMS", "Constant", "Profile", "list_profiles", "load_profile", "estimate",
           "synapse_events", "add_synapse_events", "state_updates", "add_state_updates",
           "program_macs", "model_macs", "ann_baseline", "firing_rates", "paper_energy", "paper_check",
           "PAPER_ANN_MJ", "PAPER_SNN_MJ"]

PROFILE_DIR = Path(__file__).parent / "hw_profiles"

# energy/latency terms a profile may price; (RunStats counter it comes from, what one unit is)
TERMS = {
    "synop": "binary spike x nonzero synapse (RunStats synops)",
    "graded_op": "graded spike x nonzero synapse (graded_ops)",
    "mac": "analog input position x nonzero synapse (macs; as host term: host_macs)",
    "fanin_add": "addition summing the edges into a layer (fanin_adds)",
    "scale_op": "nonzero element through a Scale node (events_in of scale layers)",
    "neuron_update": "any neuron update (used when the active/idle split is not priced)",
    "neuron_update_active": "update of a neuron with nonzero input (active_neurons)",
    "neuron_update_idle": "update of a neuron without input (neuron_updates - active_neurons)",
    "spike": "spike emitted (spikes_out)",
    "message": "spike packet to a destination core (spikes_out x packets per spike; only when priced)",
    "zero_synop": "binary spike x zero-weight synapse (synapse_events - synops; only with synapse_events)",
    "hop": "router hop of a spike (spikes_out x mapping.hops_per_spike)",
    "sync": "barrier synchronisation, once per spiking step per image",
    "elementwise": "host element-wise operation (host_elementwise)",
}
SECTIONS = {
    "energy": ({"fJ": 1e-3, "pJ": 1.0, "nJ": 1e3, "uJ": 1e6}, TERMS),
    "latency": ({"ps": 1e-3, "ns": 1.0, "us": 1e3, "ms": 1e6}, {k: v for k, v in TERMS.items()
                                                                if k != "elementwise"}),
    "power": ({"uW": 1e-3, "mW": 1.0, "W": 1e3}, {"static": "static power of the chip (or board) while it runs"}),
    "mapping": ({"cores": 1.0, "hops": 1.0}, {"parallel_cores": "units working in parallel (time model)",
                                              "hops_per_spike": "mean router hops per spike"}),
}
CANONICAL = {"energy": "pJ", "latency": "ns", "power": "mW", "mapping": ""}
EVIDENCE = ("silicon", "pre-silicon simulation", "calibrated model", "derived", "assumption")
TOP_KEYS = {"name", "description", "host", "sources", *SECTIONS}
CONST_KEYS = {"value", "unit", "source", "evidence", "note"}

PAPER_ANN_MJ = 29.23  # DDPM-ANN per network evaluation of one CIFAR-10 image (SDDPM/SDM papers)
PAPER_SNN_MJ = {4: 10.97, 8: 22.96}  # SDDPM-4T, SDDPM-8T


@dataclass(frozen=True)
class Constant:
    value: float  # in the section's canonical unit (pJ, ns, mW, or a plain number)
    unit: str  # as written in the file
    raw: float  # as written in the file
    source: str
    evidence: str
    note: str = ""


@dataclass
class Profile:
    name: str
    description: str
    host: str
    sources: dict[str, str]
    energy: dict[str, Constant] = field(default_factory=dict)
    latency: dict[str, Constant] = field(default_factory=dict)
    power: dict[str, Constant] = field(default_factory=dict)
    mapping: dict[str, Constant] = field(default_factory=dict)
    path: str = ""

    def constants(self):
        """``(section, term, Constant)`` for every constant."""
        for section in SECTIONS:
            for term, c in getattr(self, section).items():
                yield section, term, c

    def assumptions(self) -> list[str]:
        return [f"{s}.{t} = {c.raw:g} {c.unit}: {c.note or 'assumption'}" for s, t, c in self.constants()
                if c.evidence == "assumption"]

    def neuron_price(self, which: str) -> Constant | None:
        """Energy of an active/idle neuron update: the split term, else ``neuron_update``."""
        return self.energy.get(f"neuron_update_{which}") or self.energy.get("neuron_update")

    def neuron_latency(self, which: str) -> Constant | None:
        return self.latency.get(f"neuron_update_{which}") or self.latency.get("neuron_update")


# ----------------------------------------------------------------------------------------------------- profiles

def list_profiles() -> list[str]:
    """Names of the shipped profiles."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def _fail(path, msg: str):
    raise ConfigError(f"{path}: {msg}")


def load_profile(name_or_path: str | os.PathLike | Profile) -> Profile:
    """A shipped profile by name (:func:`list_profiles`) or a TOML file; ConfigError (one line naming the key and
    the file) on unknown keys, missing units, unknown units/evidence/sources, or a non-numeric value."""
    if isinstance(name_or_path, Profile):
        return name_or_path
    s = str(name_or_path)
    path = Path(s) if (s.endswith(".toml") or os.sep in s) else PROFILE_DIR / f"{s}.toml"
    if not path.exists():
        raise ConfigError(f"unknown hardware profile {s!r}; shipped: {', '.join(list_profiles())} "
                          f"(or give a .toml file)")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        _fail(path, f"not valid TOML: {str(e).splitlines()[0]}")
    for key in data:
        if key not in TOP_KEYS:
            _fail(path, f"unknown key {key!r} (allowed: {', '.join(sorted(TOP_KEYS))})")
    for key in ("name", "description", "sources"):
        if key not in data:
            _fail(path, f"missing key {key!r}")
    sources = data["sources"]
    if not isinstance(sources, dict) or not all(isinstance(v, str) for v in sources.values()):
        _fail(path, "key 'sources' must be a table of name = \"citation\"")
    prof = Profile(str(data["name"]), str(data["description"]), str(data.get("host", "")), dict(sources),
                   path=str(path))
    for section, (units, terms) in SECTIONS.items():
        table = data.get(section, {})
        if not isinstance(table, dict):
            _fail(path, f"key {section!r} must be a table")
        for term, c in table.items():
            key = f"{section}.{term}"
            if term not in terms:
                _fail(path, f"unknown key {key!r} (allowed in [{section}]: {', '.join(sorted(terms))})")
            if not isinstance(c, dict):
                _fail(path, f"key {key!r} must be a table with value, unit, source, evidence")
            for k in c:
                if k not in CONST_KEYS:
                    _fail(path, f"unknown key {key}.{k!r} (allowed: {', '.join(sorted(CONST_KEYS))})")
            for k in ("value", "unit", "source", "evidence"):
                if k not in c:
                    _fail(path, f"missing {k} in key {key!r}")
            if isinstance(c["value"], bool) or not isinstance(c["value"], (int, float)) or c["value"] < 0:
                _fail(path, f"key {key!r}: value must be a non-negative number, got {c['value']!r}")
            if c["unit"] not in units:
                _fail(path, f"key {key!r}: unit {c['unit']!r} is not one of {', '.join(units)}")
            if c["source"] not in sources:
                _fail(path, f"key {key!r}: source {c['source']!r} is not in [sources]")
            if c["evidence"] not in EVIDENCE:
                _fail(path, f"key {key!r}: evidence {c['evidence']!r} is not one of {', '.join(EVIDENCE)}")
            getattr(prof, section)[term] = Constant(float(c["value"]) * units[c["unit"]], c["unit"],
                                                    float(c["value"]), c["source"], c["evidence"],
                                                    str(c.get("note", "")))
    return prof


# ----------------------------------------------------------------------------------------------------- estimate

PLACEMENT_LAYER_KEYS = {"packets_per_spike", "hops_per_spike", "source", "extra_updates"}


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
        for k in ("packets_per_spike", "hops_per_spike", "extra_updates"):
            if k in p and (isinstance(p[k], bool) or not isinstance(p[k], (int, float)) or p[k] < 0):
                raise ConfigError(f"placement of layer {name!r}: {k} must be a number >= 0, got {p[k]!r}")
    steps = placement.get("pipeline_steps", 0)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ConfigError(f"placement: pipeline_steps must be an integer >= 0, got {steps!r}")
    return {"layers": layers, "pipeline_steps": int(steps)}


def _layer_term_counts(kind: str, cs: dict, hops: float | None, place: dict | None = None,
                       messages: bool = False, pipeline_steps: int = 0) -> dict[str, np.ndarray]:
    """Counts ``[denoising_steps]`` of every chip term of one layer (float for ``hop`` and ``message``).

    ``hops``: the profile's hops per spike (None: no mapping, no hop term); ``place``: this layer's placement
    (``packets_per_spike`` (default 1), ``hops_per_spike`` (default ``hops``), ``source``: only ``message`` and
    ``hop`` are charged; ``extra_updates``: updates per call charged in the pipeline steps); ``messages``: count
    ``message`` = spikes x packets per spike; ``pipeline_steps``: idle updates added per neuron (the updates of one
    spiking step x ``pipeline_steps``). With the counter ``updated_neurons`` (:func:`add_state_updates`) the active
    updates are those, not ``active_neurons``."""
    out = {}
    place = place or {}

    def d(name):
        return cs[name].sum(axis=1) if name in cs else None

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
        out["neuron_update_idle"] = d("neuron_updates") - out.get("neuron_update_active", 0) + \
            pipeline_steps * cs["neuron_updates"][:, 0]
    if "spikes_out" in cs:
        spikes = d("spikes_out").astype(np.float64)
        out["spike"] = spikes
        if messages:
            out["message"] = spikes * float(place.get("packets_per_spike", 1.0))
        h = place.get("hops_per_spike", hops)
        if h is not None:
            out["hop"] = spikes * float(h)
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
             placement: dict | None = None) -> dict:
    """Price a :class:`RunStats` with ``profile`` (host work with ``host_profile``, default the profile's own
    ``host``). Pure: reads only its arguments (and the profile files when given by name). Energies in pJ, times
    in seconds. Returns a dict (JSON-ready): ``layers`` (per layer and term: count, pJ), ``host``, ``static``,
    ``totals`` (by term, total, per image, per denoising step (all images), per network call per image),
    ``time`` (or None), ``edp_per_image_js``, ``unpriced`` and ``assumptions``.

    ``placement`` (optional; e.g. SANA-FE's mapping, ``scripts/sanafe_suite.py``): ``{"layers": {layer:
    {"packets_per_spike": p, "hops_per_spike": h, "source": bool, "extra_updates": u}}, "pipeline_steps": n}``.
    Per layer, a spike costs ``spike + p x message + h x hop`` (defaults ``p = 1``, ``h = mapping.hops_per_spike``;
    ``message`` only when the profile prices it); a ``source`` layer (input neurons: spikes injected into the chip)
    pays only its ``p x message + h x hop``; ``pipeline_steps``: every neuron pays ``n`` more idle updates per call
    (a chip with one step of latency per layer runs ``num_steps + n`` steps), ``u`` of which are active updates
    (neurons that a chip updates after their input ended, e.g. a nonzero membrane under Loihi's rule).
    ``neuron_update_active`` + ``neuron_update_idle`` per call = ``neuron_updates + n x neurons``."""
    prof = load_profile(profile)
    place = _check_placement(placement, stats)
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
    any_latency = bool(prof.latency)
    layers = []
    for name, cs in stats.layers.items():
        kind = stats.layer_kinds.get(name, "")
        counts = _layer_term_counts(kind, cs, hops if hops_c is not None else None, place["layers"].get(name),
                                    messages, place["pipeline_steps"])
        terms = {}
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
    # barrier synchronisation: once per spiking step per image
    syncs = np.full(D, float(K * images))
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
    if any_latency:
        step_ns = sync_ns + busy_ns / cores
        time = {"total_s": float(step_ns.sum() * 1e-9), "per_image_s": float(step_ns.sum() * 1e-9 / images),
                "per_denoising_step_s": (step_ns * 1e-9).tolist(), "untimed_terms": sorted(untimed),
                "model": f"per spiking step: sync + sum(count x latency) / {cores:g} parallel cores; host time "
                         f"not modelled"}
    static = None
    if "static" in prof.power:
        p_mw = prof.power["static"].value
        if time is None:
            unpriced[("static", "chip")] = {"term": "static", "where": "chip (no time estimate: no latencies)",
                                            "count": p_mw, "layers": 0}
        else:
            st = np.asarray(time["per_denoising_step_s"]) * p_mw * 1e-3 * 1e12  # W x s -> J -> pJ
            by_term["static"] = st
            static = {"power_mw": p_mw, "time_s": time["total_s"], "pj": float(st.sum())}
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
            **({"placement": place} if placement is not None else {})}


# ------------------------------------------------------------------------------------------------ ANN baselines

def _tap_mask(n: int, pad: int, k: int, s: int, n_out: int) -> np.ndarray:
    """``[n, k]`` bool: input position ``i`` and tap ``j`` reach an output position ``0..n_out-1``
    (``(i + pad - j) % s == 0`` and ``0 <= (i + pad - j) / s < n_out``)."""
    t = np.arange(n)[:, None] + pad - np.arange(k)[None, :]
    return (t >= 0) & (t % s == 0) & (t // s < n_out)


def _valid_taps(n: int, pad: int, k: int, s: int, n_out: int) -> int:
    """Input positions ``0..n-1`` that tap ``k`` connects to an output position ``0..n_out-1``."""
    return int(np.count_nonzero(_tap_mask(n, pad, k + 1, s, n_out)[:, k]))


def program_macs(program) -> dict[str, int]:
    """Per conv layer of an exported :class:`Program`: the dense MACs of one spiking step of one image, i.e. every
    input position times its nonzero fan-out inside the output map (structural zeros of packed/polyphase weights
    and padding taps excluded; equals RunStats' ``macs`` formula with an all-ones input)."""
    out = {}
    for layer in program.layers:
        if layer.kind != "conv":
            continue
        w = np.asarray(layer.weight)
        _, H, W = layer.in_shape
        _, Ho, Wo = layer.out_shape
        (pt, _), (pl, _) = layer.padding
        nnz = (w != 0).sum(axis=0)  # [Ci, kh, kw]
        rows = np.array([_valid_taps(H, pt, k, layer.stride[0], Ho) for k in range(w.shape[2])])
        cols = np.array([_valid_taps(W, pl, k, layer.stride[1], Wo) for k in range(w.shape[3])])
        out[layer.name] = int((nnz * rows[None, :, None] * cols[None, None, :]).sum())
    return out


def _taps_per_position(n: int, pad: int, k: int, s: int, n_out: int) -> np.ndarray:
    """For every input position ``0..n-1``: how many of the ``k`` taps connect it to an output position."""
    return _tap_mask(n, pad, k, s, n_out).sum(axis=1)


def synapse_events(program, records: dict) -> dict[str, np.ndarray]:
    """Per conv (groups 1, dilation 1) and affine layer with a spike input: the (spike, synapse) pairs of every
    spiking step, zero weights included, summed over the batch (int64 ``[K]``): ``sum over input spikes of the
    structural fan-out``, i.e. RunStats' ``synops`` with every weight counted. Conv: an input at ``(c, y, x)``
    reaches ``Co x taps_y(y) x taps_x(x)`` outputs inside the map; affine ``W [..., out, in]``: every input reaches
    all ``prod(W.shape[:-1])`` outputs. ``records``: an engine's recorded outputs ``{layer: [K, B, *shape]}``
    (``run(..., record=True)``); the input of a layer is the record of its one source."""
    out = {}
    for layer in program.layers:
        if layer.input != "spikes" or layer.kind not in ("conv", "affine"):
            continue
        x = np.asarray(records[layer.sources[0]]) != 0
        K, B = x.shape[:2]
        if layer.kind == "conv":
            _, H, W = layer.in_shape
            _, Ho, Wo = layer.out_shape
            (pt, _), (pl, _) = layer.padding
            kh, kw = layer.weight.shape[2:]
            fan = (layer.weight.shape[0] * _taps_per_position(H, pt, kh, layer.stride[0], Ho)[:, None]
                   * _taps_per_position(W, pl, kw, layer.stride[1], Wo)[None, :])  # [H, W]
            x = x.reshape(K, B, *layer.in_shape)
            out[layer.name] = (x * fan[None, None, None]).reshape(K, -1).sum(axis=1).astype(np.int64)
        else:
            fan = int(np.prod(layer.weight.shape[:-1]))
            out[layer.name] = x.reshape(K, -1).sum(axis=1).astype(np.int64) * fan
    return out


def state_updates(program, records: dict) -> dict[str, dict]:
    """Loihi's update rule as SANA-FE models it, per IF layer fed by one conv/affine layer that reads spikes: a
    neuron is updated at a step when it receives at least one synaptic event (zero weights and inputs that sum to
    zero included) or its membrane is nonzero before the step (bias 0 here). Returns per layer ``updated`` (int64
    ``[K]``, summed over the batch) and ``nonzero_end`` (neurons whose membrane is nonzero after the last step: a
    chip that keeps running updates them at every further step). The membrane is replayed from the recorded input
    with the event engine's neuron step (:func:`neurosdm.simulators.event._neuron_float`), checked against the
    recorded spikes."""
    from neurosdm.simulators.event import _neuron_float

    out = {}
    for layer in program.layers:
        if layer.kind != "if" or len(layer.sources) != 1:
            continue
        syn = program.by_name[layer.sources[0]]
        if syn.kind not in ("conv", "affine") or syn.input != "spikes":
            continue
        xin = np.asarray(records[syn.sources[0]]) != 0  # [K, B, *in_shape] the spikes reaching syn
        x = np.asarray(records[syn.name], np.float64)  # [K, B, *shape] the summed input of the neurons
        s = np.asarray(records[layer.name]) != 0
        K, B = x.shape[:2]
        if syn.kind == "affine":
            reached = np.broadcast_to(xin.reshape(K, B, -1).any(axis=2).reshape(K, B, *([1] * (x.ndim - 2))),
                                      x.shape)
        else:
            if syn.stride != (1, 1) or syn.padding != ((0, 0), (0, 0)):
                raise ConfigError(f"state_updates: conv {syn.name!r} needs stride 1 and no padding")
            kh, kw = syn.weight.shape[2:]
            win = np.lib.stride_tricks.sliding_window_view(xin.any(axis=2), (kh, kw), axis=(2, 3))
            reached = np.broadcast_to(win.any(axis=(-2, -1))[:, :, None], x.shape)
        v = np.zeros(x.shape[1:])
        updated = np.zeros(K, np.int64)
        for k in range(K):
            updated[k] = np.count_nonzero(reached[k] | (v != 0))
            _, v, fired = _neuron_float(layer, x[k], v, program.disc.comparison, program.disc.reset)
            if not np.array_equal(fired, s[k]):
                raise ConfigError(f"state_updates: the replayed membrane of {layer.name!r} does not give the "
                                  f"recorded spikes at step {k} (records from another run or graph?)")
        out[layer.name] = {"updated": updated, "nonzero_end": int(np.count_nonzero(v))}
    return out


def add_state_updates(stats, program, records: dict) -> dict[str, int]:
    """Add :func:`state_updates`' ``updated`` to a one-call :class:`RunStats` as the counter ``updated_neurons``
    (which :func:`estimate` then prices as the active updates); returns ``{layer: nonzero_end}``."""
    if len(stats.timesteps) != 1:
        raise ConfigError(f"add_state_updates needs the counts of one network call; this run has "
                          f"{len(stats.timesteps)}")
    ends = {}
    for name, r in state_updates(program, records).items():
        stats.layers[name]["updated_neurons"] = r["updated"].reshape(1, -1)
        ends[name] = r["nonzero_end"]
    return ends


def add_synapse_events(stats, program, records: dict):
    """Add :func:`synapse_events` to a one-call :class:`RunStats` as the counter ``synapse_events`` (what the
    ``zero_synop`` term prices: ``synapse_events - synops``). Returns ``stats``."""
    if len(stats.timesteps) != 1:
        raise ConfigError(f"add_synapse_events needs the counts of one network call; this run has "
                          f"{len(stats.timesteps)}")
    for name, v in synapse_events(program, records).items():
        if name in stats.layers:
            stats.layers[name]["synapse_events"] = v.reshape(1, -1)
    return stats


def model_macs(model, image_shape=None, padding: str = "dense", include_linear: bool = False) -> dict[str, int]:
    """Per layer of a torch :class:`SpikingUNet` (forward hooks; built on the meta device it costs no memory): the
    MACs of ONE network evaluation of one image as an ANN (every conv once, not once per spiking step).
    ``padding="dense"``: every tap of every output (thop-style); ``"valid"``: taps on padding excluded. The SDM
    head's Conv3d (``T_output_layer``, applied functionally) is added by hand; the time-embedding MLP and the
    ``temb_proj`` linears only with ``include_linear``."""
    import torch
    from torch import nn

    if padding not in ("dense", "valid"):
        raise ConfigError(f"padding must be 'dense' or 'valid', got {padding!r}")
    cfg = model.cfg
    c, s = (cfg.img_ch, cfg.image_size) if image_shape is None else (image_shape[0], image_shape[1])
    device = next(model.parameters()).device
    rec: dict[str, int] = {}

    def conv_macs(mod, H, W, Ho, Wo):
        if padding == "dense":
            return Ho * Wo * mod.in_channels * mod.out_channels * int(np.prod(mod.kernel_size)) // mod.groups
        rows = sum(_valid_taps(H, mod.padding[0], k, mod.stride[0], Ho) for k in range(mod.kernel_size[0]))
        cols = sum(_valid_taps(W, mod.padding[1], k, mod.stride[1], Wo) for k in range(mod.kernel_size[1]))
        return rows * cols * mod.in_channels * mod.out_channels // mod.groups

    def hook(name):
        def fn(mod, inp, out):
            if isinstance(mod, nn.Conv2d):
                H, W = inp[0].shape[-2:]
                Ho, Wo = out.shape[-2:]
                rec[name] = rec.get(name, 0) + conv_macs(mod, H, W, Ho, Wo)  # per image per step
            elif include_linear:
                rec[name] = rec.get(name, 0) + mod.in_features * mod.out_features  # once per call
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(torch.zeros(1, c, s, s, device=device), torch.zeros(1, dtype=torch.long, device=device))
    finally:
        for h in handles:
            h.remove()
    t_out = getattr(model, "T_output_layer", None)
    if t_out is not None:  # a per-step 2-D 3x3 conv, applied with F.conv2d (no hook sees it)
        conv2d = nn.Conv2d(t_out.in_channels, t_out.out_channels, 3, padding=1, device="meta")
        rec["T_output_layer"] = conv_macs(conv2d, s, s, s, s)
    return rec


def ann_baseline(source, profile: str | Profile = "cmos45-fp32", padding: str = "dense") -> dict:
    """The ANN of the same architecture, priced with ``profile``'s ``mac``: per network call of one image.
    ``source``: a Program (:func:`program_macs`, plus the SDM head's host convs once) or a torch model
    (:func:`model_macs` with ``padding``). Returns ``layers`` (MACs), ``macs``, ``mac_pj``, ``pj_per_call``."""
    prof = load_profile(profile)
    if "mac" not in prof.energy:
        raise ConfigError(f"profile {prof.name!r} has no 'mac' price: it cannot price an ANN baseline")
    from neurosdm.simulators.program import Program

    if isinstance(source, Program):
        from neurosdm.simulators.run import host_counts

        layers = program_macs(source)
        try:
            head = host_counts(source, 1)["host_macs"] // max(source.num_steps, 1)
        except (KeyError, ConfigError):
            head = 0
        if head:
            layers["host_head"] = int(head)
        convention = "exported graph: nonzero weights x valid positions, once per call; SDM host head once"
    else:
        layers = model_macs(source, padding=padding)
        convention = f"torch model: every conv once per call ({padding} taps); time-embedding MLP excluded"
    macs = int(sum(layers.values()))
    e = prof.energy["mac"].value
    return {"profile": prof.name, "mac_pj": e, "layers": layers, "macs": macs, "pj_per_call": macs * e,
            "convention": convention}


# ------------------------------------------------------------------------------------------- the paper's formula

def firing_rates(stats, program) -> dict[str, float]:
    """Per conv layer of ``program``: the fraction of its input elements that are nonzero, averaged over spiking
    steps, denoising steps and images (``events_in / (input size x steps x images)``): the firing rate for a
    spike input."""
    D = len(stats.timesteps)
    n = max(int(stats.images), 1) * D * int(stats.num_steps)
    out = {}
    for layer in program.layers:
        if layer.kind == "conv" and layer.name in stats.layers and "events_in" in stats.layers[layer.name]:
            size = int(np.prod(layer.in_shape))
            out[layer.name] = float(stats.layers[layer.name]["events_in"].sum()) / (size * n)
    return out


def paper_energy(flops: dict[str, int], rates: dict[str, float] | float, num_steps: int, first: str,
                 e_mac_pj: float = 4.6, e_ac_pj: float = 0.9) -> dict:
    """The SDDPM/SDM papers' energy of one network evaluation of one image:
    ``E = e_mac x FLOPs(first) + e_ac x sum_{l != first} rate_l x num_steps x FLOPs_l``.
    ``flops``: per layer MACs of one evaluation (e.g. :func:`model_macs`, :func:`program_macs`); ``rates``: per
    layer firing rate of its input, or one rate for all. Returns ``total_pj``, ``first_pj``, ``sops``, per-layer
    ``layers_pj`` and ``mean_rate`` (FLOPs-weighted)."""
    if first not in flops:
        raise ConfigError(f"first layer {first!r} is not among the layers")
    layers = {first: e_mac_pj * flops[first]}
    sops = 0.0
    weighted = 0.0
    for name, f in flops.items():
        if name == first:
            continue
        r = float(rates) if not isinstance(rates, dict) else rates.get(name)
        if r is None:
            raise ConfigError(f"no firing rate for layer {name!r}")
        s = r * num_steps * f
        sops += s
        weighted += r * f
        layers[name] = e_ac_pj * s
    rest = sum(f for n, f in flops.items() if n != first)
    return {"total_pj": float(sum(layers.values())), "first_pj": layers[first], "sops": sops,
            "layers_pj": layers, "mean_rate": weighted / rest if rest else 0.0}


def paper_check(include_conv_identity: bool = True, padding: str = "dense", include_linear: bool = False,
                num_steps: int = 4) -> dict:
    """The paper-cifar10 architecture built on the meta device: the ANN energy per network evaluation of one
    image with the paper's 4.6 pJ per MAC (``ann_mj``, against :data:`PAPER_ANN_MJ`) and the implied firing rate
    of the SNN figure (:data:`PAPER_SNN_MJ`) under the same FLOPs. ``include_conv_identity=False`` drops the
    stem's second conv (an ANN whose stem is one conv, as the pytorch-ddpm UNet)."""
    import dataclasses

    import torch

    from neurosdm.config import preset
    from neurosdm.models.spiking_unet import SpikingUNet

    cfg = dataclasses.replace(preset("paper-cifar10").model, num_steps=num_steps)
    with torch.device("meta"):
        model = SpikingUNet(cfg)
    flops = model_macs(model, padding=padding, include_linear=include_linear)
    if not include_conv_identity:
        flops.pop("conv_identity")
    ann_pj = 4.6 * sum(flops.values())
    rest = sum(flops.values()) - flops["conv"]
    implied = {t: (mj * 1e9 - 4.6 * flops["conv"]) / (0.9 * t * rest) for t, mj in PAPER_SNN_MJ.items()}
    return {"flops": flops, "macs": int(sum(flops.values())), "ann_mj": ann_pj * 1e-9,
            "ann_error": ann_pj * 1e-9 / PAPER_ANN_MJ - 1, "implied_rate": implied}


# -------------------------------------------------------------------------------------- a run on every profile

def price_all(stats, program, profiles=None, baselines=("cmos45-fp32", "cmos45-int8")) -> dict:
    """A simulated run priced on every profile (default: all shipped), with the ANN baselines of the same
    architecture and the SDM paper's formula on the measured firing rates. JSON-ready dict: ``counts``,
    ``host``, ``firing_rates``, ``summary`` (per profile: mJ per image, time, EDP, ratio to the fp32 ANN, unpriced,
    energy by term), ``ann_baseline``, ``paper_formula_on_measured_rates`` and the full ``reports``."""
    calls = len(stats.timesteps)
    reports = {name: estimate(stats, name) for name in (profiles or list_profiles())}
    base = {}
    for name in baselines:
        b = ann_baseline(program, name)
        b["pj_per_image"] = b["pj_per_call"] * calls
        base[name] = b
    rates = firing_rates(stats, program)
    first = next(layer.name for layer in program.layers if layer.kind == "conv" and layer.sources == program.inputs)
    paper = paper_energy(program_macs(program), rates, program.num_steps, first)
    paper["per_image_pj"] = paper["total_pj"] * calls
    ref = base.get("cmos45-fp32")
    summary = {
        name: {"per_image_mj": r["totals"]["per_image_pj"] * 1e-9,
               "per_call_per_image_uj": r["totals"]["per_call_per_image_pj"] * 1e-6,
               "time_per_image_ms": r["time"]["per_image_s"] * 1e3 if r["time"] else None,
               "edp_per_image_js": r["edp_per_image_js"],
               "vs_ann_fp32": r["totals"]["per_image_pj"] / ref["pj_per_image"] if ref else None,
               "unpriced": {f"{u['term']} ({u['where']})": u["count"] for u in r["unpriced"]},
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


def write_plots(priced: dict, stats, out_dir, profile: str = "loihi2") -> dict[str, Path]:
    """The three energy plots of a :func:`price_all` result into ``out_dir``; returns ``{name: path}``."""
    from neurosdm.energy_plots import plot_layer_terms, plot_profiles, plot_spikes

    out = Path(out_dir)
    return {
        "layers": plot_layer_terms(priced["reports"][profile], out / f"energy_layers_{profile}.png"),
        "spikes": plot_spikes(stats, out / "energy_spikes.png"),
        "profiles": plot_profiles({k: v["totals"]["per_image_pj"] for k, v in priced["reports"].items()},
                                  {k: v["pj_per_image"] for k, v in priced["ann_baseline"].items()},
                                  out / "energy_profiles.png"),
    }
