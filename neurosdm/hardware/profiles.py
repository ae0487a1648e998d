"""Hardware profiles: the schema and the loader of the TOML files in ``neurosdm/hw_profiles/`` (the schema is
documented in that folder's README.md).

A profile prices the terms of :data:`TERMS` (energy, latency), static power and a mapping (parallel cores, hops
per spike); every constant has a value, a unit, a source and a kind of evidence (:data:`EVIDENCE`), and is stored
in its section's canonical unit (:data:`CANONICAL`). :func:`load_profile` rejects, with one line naming the key and
the file, unknown keys, missing or unknown units, unknown sources or evidence, and non-numeric values.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from neurosdm.errors import ConfigError
from neurosdm.io import regular_file

__all__ = ["PROFILE_DIR", "TERMS", "SECTIONS", "CANONICAL", "EVIDENCE", "TOP_KEYS", "CONST_KEYS", "Constant",
           "Profile", "list_profiles", "load_profile"]

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
                    not math.isfinite(c["value"]):
                _fail(path, f"key {key!r}: value must be a non-negative finite number, got {c['value']!r}")
            if key == "mapping.parallel_cores" and (c["value"] < 1 or not float(c["value"]).is_integer()):
                _fail(path, f"key {key!r}: value must be a whole number of cores >= 1, got {c['value']!r}")
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
