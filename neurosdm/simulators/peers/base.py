"""Running a peer framework's NIR reader against the reference interpreter: the peer's description
(:class:`Peer`), loading its module, stepping what its reader built, comparing with :func:`reference`, classifying.

The peer frameworks are optional dependencies: :func:`load_peer` imports one by name and reports why it cannot.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.metadata
import io
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import nir
import numpy as np
import torch

from neurosdm.graph.dialect import meta_value
from neurosdm.simulators.reference import run_graph

SEED = 0
BATCH = 8
NUM_STEPS = 4
# "exact": spikes identical at every step and element, and analog outputs within EXACT_RTOL * max(1, max |ref|).
# Peers compute in float32 (2**-24 = 6e-8 relative rounding per operation) while the reference is float64; a conv
# output sums hundreds of products (32 * 9 in the tiny graphs, more in the shipped one), so the float32 sum can be
# off by some hundred ulps of its largest terms. 1e-5 (about 170 float32 ulps at the output's scale) allows that;
# what is measured is ~1e-6, and where the peer runs in float64 the same module agrees to ~1e-15
# ("float64_max_abs_diff" in the JSON): the float32 figure is rounding, not a different rule.
EXACT_RTOL = 1e-5
# "within tolerance": at most 0.5% of the output spikes differ at any step (float32 rounding flipping a membrane
# that sits within rounding of its threshold) or analog outputs within 1e-3 relative.
TOL_SPIKES = 0.005
TOL_RTOL = 1e-3


def error_text(e: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}".rstrip(": ")


def io_shape(node, key: str = "output") -> tuple[int, ...]:
    """The shape of a node's (first) output type, or of its input type with ``key="input"``."""
    types = node.output_type if key == "output" else node.input_type
    return tuple(int(s) for s in np.asarray(next(iter(types.values()))))


def version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def reference(graph: nir.NIRGraph, x: np.ndarray, **kw) -> np.ndarray:
    """``run_graph`` (discretisation from the graph's metadata; float64, or the fixed-point arithmetic of an int8
    export) on ``x`` held for ``NUM_STEPS`` steps, ``[num_steps, batch, ...]``. Keyword arguments go to
    ``run_graph``."""
    return run_graph(graph, x[None].astype(np.float64), num_steps=NUM_STEPS, **kw)["outputs"]["output"]


@dataclass
class Peer:
    """A peer framework and how its NIR reader is called.

    ``load(module, graph, dt)`` -> torch module; ``reset(model)``: clear state kept in the module between calls;
    ``comparison``: how its neurons fire (``">"``: ``v > theta``); ``scale_dropped(graph, model)``: whether its
    reader dropped a ``nir.Scale`` junction without an error; ``measured(graph, entry, model, matches)``: the causes
    of a mismatch this peer's rules explain, each confirmed by ``matches(graph2, **run_graph_kw)`` (does the peer's
    output equal the reference of ``graph2``?)."""

    name: str
    key: str  # for_peer's name
    dist: str  # distribution name, for the version
    module: str  # the module holding the importer
    call: str  # how the importer is called, for the report
    load: Callable[[Any, nir.NIRGraph, float], Any]  # (imported module, graph, dt) -> torch module
    reset: Callable[[Any], None] | None = None
    comparison: str = ">="
    scale_dropped: Callable[[nir.NIRGraph, Any], bool] | None = None
    measured: Callable[..., list[str]] | None = None


def quiet(fn, *args):
    """``fn(*args)`` with stdout and warnings silenced (the readers print and warn)."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


def load_peer(peer: Peer):
    """``(module, version, None)`` or ``(None, version or None, reason)`` when the peer cannot be used."""
    try:
        ver = importlib.metadata.version(peer.dist)
    except importlib.metadata.PackageNotFoundError:
        return None, None, f"not installed (pip distribution {peer.dist!r} not found)"
    try:
        return quiet(importlib.import_module, peer.module), ver, None
    except Exception as e:  # noqa: BLE001 - any import failure is a finding
        return None, ver, f"{peer.module} cannot be imported: {error_text(e)}"


def run_peer(model, x: np.ndarray, num_steps: int, reset=None) -> tuple[list[np.ndarray], dict]:
    """Step an imported module ``num_steps`` times on ``x`` from a fresh state. Returns the per-step outputs (the
    sum of them where the module returns several tensors for one Output node) and notes on the output's form."""
    if reset is not None:
        reset(model)
    xt = torch.from_numpy(x)
    param = next(iter(model.parameters()), None)
    if param is not None and x.dtype != np.float64:
        xt = xt.to(param.dtype)
    state, outs, notes = None, [], {}
    with torch.no_grad():
        for _ in range(num_steps):
            res = model(xt, state)
            if isinstance(res, tuple) and len(res) >= 2:
                parts, state = list(res[:-1]), res[-1]
            else:
                parts = [res]
            if len(parts) > 1:
                notes["unsummed_outputs"] = len(parts)
            vals = []
            for p in parts:
                if isinstance(p, tuple):  # snnTorch Leaky(init_hidden=False): (spk, mem)
                    notes["output_is_tuple"] = len(p)
                    p = p[0]
                vals.append(p.detach().double().numpy())
            outs.append(np.sum(vals, axis=0))
    return outs, notes


def compare(outs, ref: np.ndarray) -> dict:
    """Largest absolute difference over the steps, the reference's scale, and for a spike output the largest
    fraction of elements that differ at one step."""
    diffs = [float(np.abs(o - r).max()) for o, r in zip(outs, ref)]
    res = {"max_abs_diff": max(diffs), "ref_max_abs": float(np.abs(ref).max())}
    if np.isin(ref, (0.0, 1.0)).all():  # spikes: the largest fraction that differ at one step
        res["spike_mismatch"] = max(float((o != r).mean()) for o, r in zip(outs, ref))
    return res


def try_graph(peer: Peer, mod, graph: nir.NIRGraph, x: np.ndarray, ref: np.ndarray) -> tuple[dict, Any]:
    """Import ``graph`` with the peer's reader, run it, compare with ``ref``. Returns (entry, module or None)."""
    dt = float(meta_value(graph.metadata, "dt", 1.0))
    try:
        model = quiet(peer.load, mod, graph, dt)
    except Exception as e:  # noqa: BLE001
        return {"reads": False, "runs": None, "error": error_text(e)}, None
    entry: dict[str, Any] = {"reads": True}
    try:
        outs, notes = quiet(run_peer, model, x, NUM_STEPS, peer.reset)
    except Exception as e:  # noqa: BLE001
        entry.update(runs=False, error=error_text(e))
        return entry, model
    entry.update(runs=True, **notes)
    if outs[0].shape != ref.shape[1:]:
        entry.update(runs=False, error=f"output shape {outs[0].shape}, expected {ref.shape[1:]}")
        return entry, model
    entry.update(compare(outs, ref))
    if "spike_mismatch" not in entry:  # analog output: the same module in float64 (is the gap rounding?)
        try:
            m64 = copy.deepcopy(model).double()
            outs64, _ = quiet(run_peer, m64, x.astype(np.float64), NUM_STEPS, peer.reset)
            entry["float64_max_abs_diff"] = compare(outs64, ref)["max_abs_diff"]
        except Exception as e:  # noqa: BLE001
            entry["float64_max_abs_diff"] = error_text(e)
    return entry, model


def classify(entry: dict) -> str:
    """"exact", "within tolerance", "mismatch", "cannot read" (the reader raised) or "cannot run" (the module it
    built raised, or returned the wrong shape); thresholds: EXACT_RTOL, TOL_SPIKES, TOL_RTOL."""
    if not entry.get("reads"):
        return "cannot read"
    if not entry.get("runs"):
        return "cannot run"
    if "spike_mismatch" in entry:
        m = entry["spike_mismatch"]
        return "exact" if m == 0 else "within tolerance" if m <= TOL_SPIKES else "mismatch"
    rel = entry["max_abs_diff"] / max(1.0, entry["ref_max_abs"])
    return "exact" if rel <= EXACT_RTOL else "within tolerance" if rel <= TOL_RTOL else "mismatch"
