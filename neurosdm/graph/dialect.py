"""The neurosdm NIR dialect: what a graph's metadata means, read once into typed objects.

- :class:`Discretisation`: how continuous-time NIR neurons become one discrete step (``dt``, method, reset,
  comparison), from the keys ``dt``, ``discretisation``, ``reset``, ``comparison``;
- :class:`FixedPoint`: the integer arithmetic of a quantised export (``metadata["quant"]``);
- the per-step tables (``bias_tables``, ``scale_tables``) and their one rule, :func:`table_entry`;
- :func:`meta_value` / :func:`as_str`: values as ``nir.read`` returns them (0-d arrays, bytes) as Python values.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from neurosdm.dynamics import METHODS, Reset, parse_method
from neurosdm.errors import ConfigError

__all__ = ["Discretisation", "FixedPoint", "COMPARISONS", "RESETS", "METHODS", "as_str", "meta_value",
           "table_entry", "BIAS_TABLE_RULE", "SCALE_TABLE_RULE"]

RESETS = tuple(r.value for r in Reset)
COMPARISONS = (">=", ">")

BIAS_TABLE_RULE = ("at diffusion step t and spiking step k, every node in bias_tables (a table [A, K, C]) gets "
                   "bias := table[t if A > 1 else 0, k if K > 1 else 0]")
SCALE_TABLE_RULE = ("at spiking step k, every Scale node in scale_tables (a table [K]) gets scale := table[k] at "
                    "every element (table[0] if K = 1)")


def as_str(value: Any) -> str:
    """A string from metadata as ``nir.read`` returns it (str, bytes, 0-d numpy array)."""
    if isinstance(value, np.ndarray):
        value = value.item() if value.ndim == 0 else value.tolist()
    if isinstance(value, bytes):
        value = value.decode("utf8")
    return str(value).strip()


def meta_value(metadata: dict, key: str, default=None):
    """A metadata value as written (``nir.read`` returns 0-d arrays and bytes for numbers and strings)."""
    v = metadata.get(key, default)
    if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v.item()
    if isinstance(v, bytes):
        v = v.decode("utf8")
    return v


def table_entry(table, t: int, k: int) -> np.ndarray:
    """The one table rule (:data:`BIAS_TABLE_RULE`, :data:`SCALE_TABLE_RULE`): entry ``[t, k]`` of a bias table
    ``[A, K, ...]`` (``A`` or ``K`` of 1: the same at every diffusion / spiking step), or entry ``k`` of a scale
    table ``[K]``."""
    table = np.asarray(table)
    if table.ndim == 1:
        return table[k if table.size > 1 else 0]
    return table[t if table.shape[0] > 1 else 0, k if table.shape[1] > 1 else 0]


def tables_vary_per_step(metadata: dict) -> bool:
    """Whether any table changes with the spiking step (TSM exports)."""
    return any(np.asarray(v).shape[1] > 1 for v in metadata.get("bias_tables", {}).values()) or \
        any(np.asarray(v).size > 1 for v in metadata.get("scale_tables", {}).values())


@dataclass
class Discretisation:
    """How the continuous-time NIR neurons become one discrete step (:mod:`neurosdm.dynamics` has the equations).

    dt:         step length, in the unit of the graph's time constants (neurosdm writes ``tau`` in steps: dt = 1).
    method:     ``"euler"`` (forward Euler, as NIR's reference frameworks) or ``"exp"`` (exact exponential decay
                for an input held constant over the step).
    reset:      ``"zero"``: a neuron that fires is set to ``v_reset``; ``"subtract"``: ``v -= v_threshold - v_reset``.
    comparison: ``">="`` (neurosdm, spikingjelly) or ``">"`` (NIR's equations, Norse, snnTorch), for the spiking
                neurons and the ``Threshold`` node.
    """

    dt: float = 1.0
    method: str = "euler"
    reset: str = "zero"
    comparison: str = ">="

    def __post_init__(self):
        try:
            self.dt = float(self.dt)
        except (TypeError, ValueError):
            raise ConfigError(f"dt must be a number, got {self.dt!r}") from None
        if not np.isfinite(self.dt) or self.dt <= 0:
            raise ConfigError(f"dt must be a positive number, got {self.dt}")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.reset not in RESETS:
            raise ConfigError(f"reset must be one of {RESETS}, got {self.reset!r}")
        if self.comparison not in COMPARISONS:
            raise ConfigError(f"comparison must be one of {COMPARISONS}, got {self.comparison!r}")

    @property
    def reset_kind(self) -> Reset:
        return Reset(self.reset)

    @property
    def strict(self) -> bool:
        """Fire on ``>`` rather than ``>=``."""
        return self.comparison == ">"

    @classmethod
    def from_metadata(cls, metadata: dict | None, **overrides) -> "Discretisation":
        """Read ``dt``, ``reset``, ``comparison`` and ``discretisation`` (the method) from a graph's metadata.

        Missing keys keep the defaults; values may be as ``nir.read`` returns them (bytes, numpy scalars).
        Accepted spellings: those of :meth:`neurosdm.dynamics.Reset.parse` and :func:`neurosdm.dynamics.parse_method`.
        Keyword ``overrides`` (the dataclass fields) win over the metadata.
        """
        metadata = dict(metadata or {})
        kwargs: dict[str, Any] = {}
        if "dt" in metadata:
            dt = metadata["dt"]
            kwargs["dt"] = float(np.asarray(dt).reshape(-1)[0]) if np.size(dt) == 1 else dt
        if "reset" in metadata:
            try:
                kwargs["reset"] = Reset.parse(as_str(metadata["reset"])).value
            except ConfigError as e:
                raise ConfigError(f"metadata {e}") from None
        if "comparison" in metadata:
            kwargs["comparison"] = as_str(metadata["comparison"])
        if "discretisation" in metadata:
            try:
                kwargs["method"] = parse_method(as_str(metadata["discretisation"]))
            except ConfigError as e:
                raise ConfigError(f"metadata {e}") from None
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise ConfigError(f"unknown Discretisation field(s) {sorted(unknown)}; known: {sorted(known)}")
        kwargs.update(overrides)
        return cls(**kwargs)


@dataclass
class FixedPoint:
    """Integer arithmetic of a quantised neurosdm export (``metadata["quant"]``; written by
    :mod:`neurosdm.exporters.fixed_point`). Values are integers held in float64 (exact below 2**53):

    - nodes in ``round_nodes`` (convs reading graded values) round their output half to even;
    - ``IF``, ``I`` and ``LI`` run :func:`neurosdm.dynamics.fixed_point_step`: state saturating at
      ``+-(2**(state_bits-1) - 1)``; ``LI`` decays by ``decay_q12 = round(4096 (1 - dt/tau))`` with the product
      rounded toward zero (Loihi); its input gain ``r dt / tau`` (1 for ``IF``/``I``: ``r dt``) must be 1;
      thresholds must be integers; IF fires on ``>=`` and resets to 0 or by subtraction;
    - other neuron types are refused. Saturations are counted per node.
    """

    state_bits: int = 24
    round_nodes: frozenset = frozenset()

    @classmethod
    def from_metadata(cls, metadata: dict | None) -> "FixedPoint | None":
        """The fixed-point rules of a quantised export, or None for a float graph."""
        q = (metadata or {}).get("quant")
        if not isinstance(q, dict):
            return None
        rounded = q.get("round_nodes", {})
        return cls(int(np.asarray(q["state_bits"]).reshape(-1)[0]), frozenset(rounded))
