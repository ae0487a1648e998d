"""Validation of NIR files and graphs before anything is built from them, with one-line :class:`GraphError`
messages naming the node and the value:

- :func:`check_file`: what an HDF5 file declares (dataset shapes and types, read from its headers; no array is
  loaded): no complex arrays, a bounded number of nodes, and arrays that fit in memory
  (:func:`neurosdm.config.check_memory`);
- :func:`check_graph`: a graph's node count, every node's parameters (:func:`check_node`: finite real values,
  positive time constants, thresholds above the reset value), the sizes its Input nodes and convs declare, and
  the dialect's sizes in the metadata (``num_steps``, ``num_diffusion_steps``, the per-step tables' shapes).

:func:`neurosdm.graph.inspect.inspect_nir` runs :func:`check_file` on every file it reads;
:func:`neurosdm.graph.program.load_program` runs :func:`check_graph` on every graph.
"""

from __future__ import annotations

import os
from pathlib import Path

import nir
import numpy as np

from neurosdm.config import LIMITS, check_memory
from neurosdm.errors import GraphError
from neurosdm.graph import structure
from neurosdm.graph.dialect import meta_value
from neurosdm.io import deferred_interrupts

__all__ = ["MAX_NODES", "BYTES_PER_ELEMENT", "check_file", "check_graph", "check_node"]

#: most nodes a graph may have (nested graphs' nodes included)
MAX_NODES = 100_000
#: largest conv stride or dilation
MAX_STEP = 1 << 16
#: memory planned per stored array element: nir's copy, the program's float64 copy and its fan-out counts
BYTES_PER_ELEMENT = 24
#: memory planned per element of a declared input (state, inputs, outputs and fan-out of a layer, one image)
BYTES_PER_STATE = 64
_TIME_CONSTANTS = ("tau", "tau_mem", "tau_syn")
_SKIP = ("input_type", "output_type", "metadata")
_TEXT = ("padding",)  # parameters that may be words


def check_file(path: str | os.PathLike) -> None:
    """The sizes and types an HDF5 file declares, before ``nir.read`` loads it (see the module docstring)."""
    import h5py

    path = Path(path)
    found = {"elements": 0, "nodes": 0}

    def visit(name: str, obj) -> None:
        if isinstance(obj, h5py.Group):
            found["nodes"] += "type" in obj
            return
        if obj.dtype.kind == "c":
            raise GraphError(f"{path}: {name} holds complex numbers ({obj.dtype}); NIR parameters are real")
        found["elements"] += int(np.prod(obj.shape, dtype=np.float64)) if obj.shape else 1

    try:
        with deferred_interrupts(), h5py.File(path, "r") as f:  # Ctrl-C in h5py's callbacks would be lost
            f.visititems(visit)
    except GraphError:
        raise
    except Exception as e:  # damaged headers
        raise GraphError(f"{path} is truncated or not a readable HDF5 file: {type(e).__name__}") from None
    if found["nodes"] > MAX_NODES:
        raise GraphError(f"{path} declares {found['nodes']:,} nodes, more than neurosdm runs ({MAX_NODES:,})")
    check_memory(f"{path} (arrays of {found['elements']:,} elements)", BYTES_PER_ELEMENT * found["elements"])


def check_node(name: str, node, strict: bool = False) -> None:
    """One node's parameters: real, finite; time constants positive; spiking neurons' ``v_threshold`` above
    ``v_reset`` (at least ``v_reset`` when they fire on ``>``, ``strict``: a neuron at its reset value must not
    fire). :class:`GraphError` naming the node and the parameter."""
    kind = type(node).__name__
    if isinstance(node, nir.NIRGraph):  # an extension node (up-sampling): its parameters are in its metadata
        return
    for field, value in vars(node).items():
        if field in _SKIP or value is None or isinstance(value, (dict, nir.NIRNode)):
            continue
        arr = np.asarray(value)
        if arr.dtype.kind in "USO":
            if field in _TEXT or arr.dtype.kind == "O":  # padding "same"; nested values are nir's own
                continue
            raise GraphError(f"node {name!r} ({kind}): {field} must be numbers, got {str(value)[:40]!r}")
        if arr.dtype.kind == "c":
            raise GraphError(f"node {name!r} ({kind}): {field} holds complex numbers; NIR parameters are real")
        if arr.dtype.kind not in "biuf":
            raise GraphError(f"node {name!r} ({kind}): {field} must be numbers, got {arr.dtype}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise GraphError(f"node {name!r} ({kind}): {field} holds NaN or infinite values")
        if field in _TIME_CONSTANTS and not (arr > 0).all():
            raise GraphError(f"node {name!r} ({kind}): {field} must be positive, got {arr[arr <= 0].flat[0]!r}")
    if isinstance(node, (nir.Conv1d, nir.Conv2d, nir.Affine)):
        w = np.asarray(node.weight)
        out = w.shape[:1] if not isinstance(node, nir.Affine) else w.shape[:-1]
        if getattr(node, "bias", None) is not None and w.ndim >= 2:
            try:
                np.broadcast_to(np.asarray(node.bias), out)
            except ValueError:
                raise GraphError(f"node {name!r} ({kind}): bias of shape {list(np.shape(node.bias))} does not fit "
                                 f"the {list(out)} outputs of its weight {list(w.shape)}") from None
    for field in ("stride", "dilation"):
        value = getattr(node, field, None) if isinstance(node, (nir.Conv1d, nir.Conv2d)) else None
        arr = np.asarray(value if value is not None else 1)
        if arr.dtype.kind not in "iuf" or not ((arr >= 1) & (arr <= MAX_STEP) & (arr == np.rint(arr))).all():
            raise GraphError(f"node {name!r} ({kind}): {field} must be whole numbers in 1..{MAX_STEP}, got "
                             f"{str(value)[:40]}")
    if isinstance(node, (nir.IF, nir.LIF, nir.CubaLIF)):
        reset = np.asarray(node.v_reset if getattr(node, "v_reset", None) is not None else 0.0, np.float64)
        try:
            thr = np.asarray(node.v_threshold, np.float64)
            low = thr < reset if strict else thr <= reset
        except ValueError:
            raise GraphError(f"node {name!r} ({kind}): v_threshold and v_reset have incompatible shapes") from None
        if low.any():
            bad = np.broadcast_to(thr, low.shape)[low].flat[0]
            raise GraphError(f"node {name!r} ({kind}): v_threshold must be above v_reset (a neuron at its reset "
                             f"value would fire at every step; comparison '{'>' if strict else '>='}'), got "
                             f"v_threshold {float(bad)!r}")


def _meta_count(metadata: dict, key: str) -> int | None:
    if key not in metadata:
        return None
    value = meta_value(metadata, key)
    arr = np.asarray(value)
    hi = LIMITS[key]
    if arr.size != 1 or arr.dtype.kind not in "iuf" or not float(arr.reshape(-1)[0]).is_integer() or \
            not 1 <= float(arr.reshape(-1)[0]) <= hi:
        raise GraphError(f"metadata {key} must be an integer in 1..{hi:,}, got {value!r}")
    return int(arr.reshape(-1)[0])


def _check_tables(metadata: dict, nodes: dict, num_steps: int, num_diffusion: int | None) -> None:
    for key, node_type in (("bias_tables", (nir.Conv2d, nir.Conv1d)), ("scale_tables", (nir.Scale,))):
        tables = metadata.get(key, {})
        if not isinstance(tables, dict):
            raise GraphError(f"metadata {key} must be a table of node names, got {type(tables).__name__}")
        for name, table in tables.items():
            node = nodes.get(name)
            if not isinstance(node, node_type):
                raise GraphError(f"metadata {key} names {name!r}, which is not a {node_type[0].__name__} node of "
                                 f"the graph")
            t = np.asarray(table)
            if t.dtype.kind not in "iuf" or not np.isfinite(t).all():
                raise GraphError(f"metadata {key}[{name!r}] must hold finite real numbers")
            steps_ok = (1, num_steps)
            if key == "bias_tables":
                channels = int(np.asarray(node.weight).shape[0])
                ok = t.ndim == 3 and t.shape[0] in (1, num_diffusion or t.shape[0]) and t.shape[1] in steps_ok \
                    and t.shape[2] == channels
                want = f"[1 or {num_diffusion}, 1 or {num_steps}, {channels}]"
            else:
                ok, want = t.size in steps_ok, f"1 or {num_steps} values"
            if not ok:
                raise GraphError(f"metadata {key}[{name!r}] has shape {list(t.shape)}; the graph needs {want}")


def _meta_real(metadata: dict, key: str, value=None) -> float:
    arr = np.asarray(metadata.get(key) if value is None else value)
    if arr.size != 1 or arr.dtype.kind not in "iuf" or not np.isfinite(arr).all():
        raise GraphError(f"metadata {key} must be a finite number, got {str(metadata.get(key, value))[:60]!r}")
    return float(arr.reshape(-1)[0])


def _meta_ints(metadata: dict, key: str, n: int, lo: int, hi: int) -> tuple[int, ...]:
    arr = np.asarray(metadata.get(key))
    if arr.size != n or arr.dtype.kind not in "iu" or (arr < lo).any() or (arr > hi).any():
        raise GraphError(f"metadata {key} must be {n} integer(s) in {lo}..{hi}, got {str(metadata.get(key))[:60]!r}")
    return tuple(int(v) for v in arr.reshape(-1))


def _check_export_metadata(metadata: dict, graph) -> None:
    """The keys of a neurosdm export that the host reads (:mod:`.dialect`, :mod:`.host`, the sampler), typed and
    consistent with the graph's output."""
    for key in ("dt", "threshold", "threshold_scale", "v_init", "v_threshold", "readout_decay", "diffusion_step"):
        if key in metadata:
            _meta_real(metadata, key)
    if "if_thresholds" in metadata:
        table = metadata["if_thresholds"]
        if not isinstance(table, dict) or not table:
            raise GraphError("metadata if_thresholds must be a table of node names to thresholds")
        for value in table.values():
            _meta_real(metadata, "if_thresholds", value)
    head_arrays = metadata.get("host_head", {})
    if isinstance(head_arrays, dict):  # the analog head's weights (graph.host reads which ones it needs)
        for name, value in head_arrays.items():
            arr = np.asarray(value) if not isinstance(value, dict) else np.zeros(0)
            if name != "formula" and (arr.dtype.kind not in "biuf" or not np.isfinite(arr).all()):
                raise GraphError(f"metadata host_head[{name!r}] must hold finite real numbers, got "
                                 f"{str(value)[:40]!r}")
    if "image_shape" not in metadata:
        return  # not a denoiser export: the rest is the host's
    c, h, w = _meta_ints(metadata, "image_shape", 3, 1, LIMITS["image_size"])
    d = metadata.get("diffusion")
    if not isinstance(d, dict) or any(k not in d for k in ("schedule", "num_diffusion_steps", "beta_start",
                                                          "beta_end")):
        raise GraphError("metadata diffusion must be a table with schedule, num_diffusion_steps, beta_start and "
                         "beta_end (the export's diffusion schedule)")
    _meta_ints(d, "num_diffusion_steps", 1, 1, LIMITS["num_diffusion_steps"])
    _meta_real(d, "beta_start"), _meta_real(d, "beta_end")
    if not isinstance(meta_value(d, "schedule"), str):
        raise GraphError(f"metadata diffusion.schedule must be a name, got {str(d['schedule'])[:40]!r}")
    head = meta_value(metadata, "head")
    if not isinstance(head, str) or head not in ("sdm", "spiking"):
        raise GraphError(f"metadata head must be 'sdm' or 'spiking' in a denoiser export, got {str(head)[:40]!r}")
    levels = _meta_ints(metadata, "packed_levels", 1, 0, LIMITS["levels"])[0] if "packed_levels" in metadata else 0
    outputs = [n for n in graph.nodes.values() if isinstance(n, nir.Output)]
    shape = np.asarray(next(iter((outputs[0].output_type or {}).values()), []) if len(outputs) == 1 else [])
    f = 2 ** levels
    if shape.size != 3 or (int(shape[1]) * f, int(shape[2]) * f) != (h, w) or \
            (head == "spiking" and int(shape[0]) != c * f * f):
        raise GraphError(f"metadata image_shape {[c, h, w]}, packed_levels {levels} and head {head!r} do not fit the "
                         f"graph's output {shape.tolist()}")


def check_graph(graph, strict: bool = False) -> None:
    """A graph, before it is translated (see the module docstring); ``strict``: its neurons fire on ``>``."""
    if not isinstance(graph, nir.NIRGraph):
        raise GraphError(f"expected a nir.NIRGraph, got {type(graph).__name__}")
    flat = list(structure.flat_nodes(graph))
    if len(flat) > MAX_NODES:
        raise GraphError(f"the graph has {len(flat):,} nodes, more than neurosdm runs ({MAX_NODES:,})")
    declared = 0
    for name, node in flat:
        check_node(name, node, strict)
        if isinstance(node, nir.Input):
            declared += sum(int(np.prod(np.asarray(s, np.float64))) for s in (node.input_type or {}).values())
        elif isinstance(node, (nir.Conv2d, nir.Conv1d)) and getattr(node, "input_shape", None) is not None:
            w = np.asarray(node.weight)
            declared += int(np.prod(np.asarray(node.input_shape, np.float64))) * (w.shape[1] if w.ndim > 1 else 1)
    check_memory(f"the graph's declared layer inputs ({declared:,} elements)", BYTES_PER_STATE * declared)
    metadata = dict(graph.metadata or {})
    num_steps = _meta_count(metadata, "num_steps") or 1
    num_diffusion = _meta_count(metadata, "num_diffusion_steps")
    _check_tables(metadata, graph.nodes, num_steps, num_diffusion)
    _check_export_metadata(metadata, graph)
