"""Energy, time and EDP of a simulated run priced with a hardware profile; ANN baselines; the SDM paper's formula.

Profiles are data (``neurosdm/hw_profiles/*.toml``, schema in that folder's README.md): every constant has a value,
a unit, a source and a kind of evidence. :func:`estimate` is a pure function of a
:class:`~neurosdm.simulators.stats.RunStats` and a profile:

- chip terms, per layer, from the exact counts: ``synop`` (synops), ``graded_op`` (graded_ops), ``mac`` (macs of
  analog-input convs), ``fanin_add`` (fanin_adds), ``scale_op`` (events_in of Scale nodes), ``neuron_update_active``
  (active_neurons) and ``neuron_update_idle`` (neuron_updates - active_neurons), both priced by ``neuron_update``
  when the profile has no active/idle split, ``spike`` (spikes_out) and ``hop`` (spikes_out x
  ``mapping.hops_per_spike``); ``sync``: one barrier per spiking step per image;
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

def _layer_term_counts(kind: str, cs: dict, hops: float) -> dict[str, np.ndarray]:
    """Counts ``[denoising_steps]`` of every chip term of one layer (float for ``hop``)."""
    out = {}

    def d(name):
        return cs[name].sum(axis=1) if name in cs else None

    for counter, term in (("synops", "synop"), ("graded_ops", "graded_op"), ("macs", "mac"),
                          ("fanin_adds", "fanin_add"), ("active_neurons", "neuron_update_active")):
        v = d(counter)
        if v is not None:
            out[term] = v
    if kind == "scale" and "events_in" in cs:
        out["scale_op"] = d("events_in")
    if "neuron_updates" in cs:
        out["neuron_update_idle"] = d("neuron_updates") - out.get("neuron_update_active", 0)
    if "spikes_out" in cs:
        out["spike"] = d("spikes_out")
        out["hop"] = d("spikes_out") * hops
    return out


def _price(profile: Profile, term: str, table: str = "energy") -> Constant | None:
    if term.startswith("neuron_update_"):
        which = term.rsplit("_", 1)[1]
        return profile.neuron_price(which) if table == "energy" else profile.neuron_latency(which)
    return getattr(profile, table).get(term)


def estimate(stats, profile: str | Profile, host_profile: str | Profile | None = None) -> dict:
    """Price a :class:`RunStats` with ``profile`` (host work with ``host_profile``, default the profile's own
    ``host``). Pure: reads only its arguments (and the profile files when given by name). Energies in pJ, times
    in seconds. Returns a dict (JSON-ready): ``layers`` (per layer and term: count, pJ), ``host``, ``static``,
    ``totals`` (by term, total, per image, per denoising step (all images), per network call per image),
    ``time`` (or None), ``edp_per_image_js``, ``unpriced`` and ``assumptions``."""
    prof = load_profile(profile)
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
        counts = _layer_term_counts(kind, cs, hops)
        terms = {}
        for term, v in counts.items():
            v = np.asarray(v, np.float64)
            total = float(v.sum())
            if total == 0:
                continue
            if term == "hop" and hops_c is None:
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
            "assumptions": assumptions, "meta": dict(stats.meta)}


# ------------------------------------------------------------------------------------------------ ANN baselines

def _valid_taps(n: int, pad: int, k: int, s: int, n_out: int) -> int:
    """Input positions ``0..n-1`` that tap ``k`` connects to an output position ``0..n_out-1``."""
    t = np.arange(n) + pad - k
    return int(np.count_nonzero((t >= 0) & (t % s == 0) & (t // s < n_out)))


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
