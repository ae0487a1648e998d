"""Hardware profiles: the schema and the loader of the TOML files in ``neurosdm/hw_profiles/`` (the schema is
documented in that folder's README.md).

A profile prices the terms of :data:`TERMS` (energy, latency), static power, the lower-bound mapping (parallel
cores, hops per spike) and describes the chip's resources (:data:`RESOURCES`: cores, mesh, per-core limits, weight
storage, routing, chips per board and system; read by :mod:`neurosdm.hardware.mapping`); every constant has a
value, a unit, a source and a kind of evidence (:data:`EVIDENCE`), and is stored in its section's canonical unit
(:data:`CANONICAL`; resources: bits, Gbit/s, plain counts). :func:`load_profile` rejects, with one line naming the
key and the file, unknown keys, missing or unknown units, unknown sources or evidence, non-numeric values and
inconsistent resources (:func:`check_resources`).
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from neurosdm.errors import ConfigError
from neurosdm.io import regular_file

__all__ = ["PROFILE_DIR", "TERMS", "SECTIONS", "RESOURCES", "CANONICAL", "EVIDENCE", "TOP_KEYS", "CONST_KEYS",
           "Constant", "Profile", "list_profiles", "load_profile", "check_resources"]

PROFILE_DIR = Path(__file__).parent.parent / "hw_profiles"

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
    "hop": "router hop of a spike (spikes_out x hops per spike: the mapping's, else mapping.hops_per_spike)",
    "chip_hop": "a spike packet crossing a chip boundary (spikes_out x chip hops per spike of the mapping)",
    "sync": "barrier synchronisation, once per spiking step per image",
    "elementwise": "host element-wise operation (host_elementwise)",
}
#: chip resources: key -> (meaning, allowed units); read by the mapper (neurosdm.hardware.mapping)
RESOURCES = {
    "cores_per_chip": ("neuromorphic cores per chip", ("cores",)),
    "mesh_x": ("routers along x of one chip's 2D mesh", ("routers",)),
    "mesh_y": ("routers along y of one chip's 2D mesh", ("routers",)),
    "cores_per_router": ("cores sharing one mesh router (Loihi's tile)", ("cores",)),
    "neurons_per_core": ("neurons (compartments) per core", ("neurons",)),
    "fanin_axons_per_core": ("distinct input axons one core receives", ("axons",)),
    "fanout_axons_per_core": ("output axon entries (neuron -> destination core) per core", ("axons",)),
    "synapse_memory_per_core": ("synaptic memory per core", ("bits", "KiB")),
    "synapse_bits": ("bits of one stored synapse (or shared weight) entry", ("bits",)),
    "conv_weight_sharing": ("1: a convolution's kernel is stored once per core and shared by its input axons; "
                            "0: one entry per synapse", ("flag",)),
    "multicast": ("1: a router forks one packet to many cores; 0: one packet per destination core", ("flag",)),
    "targets_per_neuron": ("destination cores one neuron may reach", ("targets",)),
    "weights_per_neuron": ("distinct synaptic weight values one neuron may use", ("weights",)),
    "chips_per_board": ("chips on one board", ("chips",)),
    "chips_per_system": ("chips in the largest system built", ("chips",)),
    "chip_link_bandwidth": ("inter-chip bandwidth per chip", ("Gbit/s", "GB/s")),
}
#: resources every resource section must give (the others are optional: absent = no such limit)
RESOURCES_REQUIRED = ("cores_per_chip", "mesh_x", "mesh_y", "cores_per_router", "neurons_per_core")
SECTIONS = {
    "energy": ({"fJ": 1e-3, "pJ": 1.0, "nJ": 1e3, "uJ": 1e6}, TERMS),
    "latency": ({"ps": 1e-3, "ns": 1.0, "us": 1e3, "ms": 1e6}, {k: v for k, v in TERMS.items()
                                                                if k != "elementwise"}),
    "power": ({"uW": 1e-3, "mW": 1.0, "W": 1e3}, {"static": "static power of the chip (or board) while it runs"}),
    "mapping": ({"cores": 1.0, "hops": 1.0}, {"parallel_cores": "units working in parallel (time model)",
                                              "hops_per_spike": "mean router hops per spike"}),
    "resources": ({"cores": 1.0, "routers": 1.0, "neurons": 1.0, "axons": 1.0, "bits": 1.0, "KiB": 8192.0,
                   "flag": 1.0, "targets": 1.0, "weights": 1.0, "chips": 1.0, "Gbit/s": 1.0, "GB/s": 8.0},
                  {k: v[0] for k, v in RESOURCES.items()}),
}
CANONICAL = {"energy": "pJ", "latency": "ns", "power": "mW", "mapping": "", "resources": ""}
EVIDENCE = ("silicon", "specification", "pre-silicon simulation", "calibrated model", "derived", "assumption")
TOP_KEYS = {"name", "description", "host", "sources", *SECTIONS}
CONST_KEYS = {"value", "unit", "source", "evidence", "note"}

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
    resources: dict[str, Constant] = field(default_factory=dict)
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


def list_profiles() -> list[str]:
    """Names of the shipped profiles."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def _finite(value) -> bool:
    """A finite number as a float (an integer beyond the float range is not)."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


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
    regular_file(path, "hardware profile", ConfigError)  # not a directory, a FIFO or a device
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        _fail(path, f"not valid TOML: {str(e).splitlines()[0]}")
    except UnicodeDecodeError as e:
        _fail(path, f"not a text file (TOML is UTF-8; byte {e.start} is not)")
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
            if isinstance(c["value"], bool) or not isinstance(c["value"], (int, float)) or c["value"] < 0 or \
                    not _finite(c["value"]):
                shown = repr(c["value"])
                _fail(path, f"key {key!r}: value must be a non-negative finite number, got "
                            f"{shown if len(shown) <= 30 else shown[:27] + '...'}")
            if key == "mapping.parallel_cores" and (c["value"] < 1 or not float(c["value"]).is_integer()):
                _fail(path, f"key {key!r}: value must be a whole number of cores >= 1, got {c['value']!r}")
            allowed = RESOURCES[term][1] if section == "resources" else units
            if c["unit"] not in allowed:
                _fail(path, f"key {key!r}: unit {c['unit']!r} is not one of {', '.join(allowed)}")
            if c["source"] not in sources:
                _fail(path, f"key {key!r}: source {c['source']!r} is not in [sources]")
            if c["evidence"] not in EVIDENCE:
                _fail(path, f"key {key!r}: evidence {c['evidence']!r} is not one of {', '.join(EVIDENCE)}")
            getattr(prof, section)[term] = Constant(float(c["value"]) * units[c["unit"]], c["unit"],
                                                    float(c["value"]), c["source"], c["evidence"],
                                                    str(c.get("note", "")))
    problem = check_resources(prof.resources)
    if problem:
        _fail(path, f"inconsistent [resources]: {problem}")
    return prof


def check_resources(res: dict[str, Constant]) -> str | None:
    """What is inconsistent in a resources table (None if nothing or it is empty): a required key missing, a count
    that is not a whole number >= 1, a flag not 0 or 1, more cores than the mesh holds (or a whole empty mesh row),
    a synapse entry larger than the memory, more chips per board than per system."""
    if not res:
        return None
    for k in RESOURCES_REQUIRED:
        if k not in res:
            return f"resources.{k} is missing (required: {', '.join(RESOURCES_REQUIRED)})"
    for k, c in res.items():
        if RESOURCES[k][1] == ("flag",):
            if c.value not in (0.0, 1.0):
                return f"resources.{k} must be 0 or 1, got {c.raw:g}"
        elif k != "chip_link_bandwidth" and (c.value < 1 or not float(c.value).is_integer()):
            return f"resources.{k} must be a whole number >= 1, got {c.raw:g}"
    v = {k: c.value for k, c in res.items()}
    slots = v["mesh_x"] * v["mesh_y"] * v["cores_per_router"]
    if v["cores_per_chip"] > slots:
        return (f"resources.cores_per_chip = {v['cores_per_chip']:g} > mesh_x x mesh_y x cores_per_router = "
                f"{slots:g}")
    if v["cores_per_chip"] <= v["mesh_x"] * (v["mesh_y"] - 1) * v["cores_per_router"]:
        return (f"resources.cores_per_chip = {v['cores_per_chip']:g} leaves a whole row of the "
                f"{v['mesh_x']:g} x {v['mesh_y']:g} mesh empty")
    if ("synapse_bits" in v) != ("synapse_memory_per_core" in v):
        return "resources.synapse_bits and resources.synapse_memory_per_core go together"
    if "synapse_bits" in v and v["synapse_bits"] > v["synapse_memory_per_core"]:
        return "resources.synapse_bits is larger than resources.synapse_memory_per_core"
    if "chips_per_board" in v and "chips_per_system" in v and v["chips_per_board"] > v["chips_per_system"]:
        return (f"resources.chips_per_board = {v['chips_per_board']:g} > chips_per_system = "
                f"{v['chips_per_system']:g}")
    return None
