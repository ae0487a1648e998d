"""Inspection of NIR graphs and files: stored sizes (:func:`graph_size`) and a per-node summary of a file read
with one-line errors (:func:`inspect_nir`, ``neurosdm inspect``)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import nir
import numpy as np

from neurosdm.errors import GraphError
from neurosdm.graph.checks import check_file
from neurosdm.graph.dialect import FixedPoint, upsample_factor
from neurosdm.graph.structure import order
from neurosdm.io import deferred_interrupts, describe_head, first_line, regular_file

__all__ = ["graph_size", "inspect_nir", "read_nir", "describe_fixed_point"]

_WEIGHTED = (nir.Conv2d, nir.Affine, nir.Linear) + ((nir.Conv1d,) if hasattr(nir, "Conv1d") else ())


def graph_size(graph: nir.NIRGraph) -> dict:
    """Stored array sizes: ``{"nodes", "conv_weights", "conv_biases", "conv_nonzero", "neuron_params",
    "total"}`` (all arrays of all nodes, neuron parameters included in ``total``)."""
    conv_w = conv_b = nonzero = other = 0
    for node in graph.nodes.values():
        if isinstance(node, nir.Conv2d):
            conv_w += node.weight.size
            nonzero += int(np.count_nonzero(node.weight))
            conv_b += np.asarray(node.bias).size
        else:
            for field in ("r", "v_threshold", "v_reset", "tau", "v_leak", "scale"):
                v = getattr(node, field, None)
                if v is not None:
                    other += np.asarray(v).size
    return dict(nodes=len(graph.nodes), conv_weights=conv_w, conv_biases=conv_b, conv_nonzero=nonzero,
                neuron_params=other, total=conv_w + conv_b + other)


def _array_size(v) -> int:
    if isinstance(v, dict):
        return sum(_array_size(x) for x in v.values())
    if isinstance(v, np.ndarray) and v.dtype.kind == "f":  # weights and neuron parameters, not shapes or strides
        return int(v.size)
    return 0


def read_nir(path: str | os.PathLike) -> nir.NIRGraph:
    """``nir.read(path)`` with one-line :class:`GraphError` messages for everything it cannot read."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise GraphError(f"NIR file not found: {path}")
    if path.is_dir():
        raise GraphError(f"{path} is a directory; pass a .nir file")
    regular_file(path, "NIR file", GraphError)  # a FIFO would block: never opened
    if not h5py.is_hdf5(path):
        raise GraphError(f"{path} is not a NIR file (found {describe_head(path)}); expected an HDF5 file written "
                         f"by nir.write")
    check_file(path)  # declared sizes and types, before any array is read
    try:
        with warnings.catch_warnings(), deferred_interrupts():  # nir's type inference warns on absurd values: the
            # error says it once; Ctrl-C inside h5py's callbacks would be printed and lost
            warnings.simplefilter("ignore")
            graph = nir.read(path)
    except Exception as e:  # truncated HDF5, unknown node types, missing fields, ...
        raise GraphError(f"{path} is truncated or not a readable NIR graph: {type(e).__name__}: {first_line(e)}") \
            from None
    if not isinstance(graph, nir.NIRGraph):
        raise GraphError(f"{path} holds a single {type(graph).__name__} node, not a NIR graph")
    return graph


def describe_fixed_point(metadata: dict) -> str | None:
    """The fixed-point line of ``neurosdm inspect`` (None for a float graph): bit widths and units from
    :meth:`FixedPoint.from_metadata` (a one-line :class:`GraphError` for a damaged ``quant`` table), the weight
    mantissas' width and exponents as the export records them."""
    fixed = FixedPoint.from_metadata(metadata)
    if fixed is None:
        return None
    q = metadata["quant"]
    bits, exps = np.asarray(q.get("weight_bits")), q.get("weight_exponents")
    exps = [np.asarray(v) for v in exps.values()] if isinstance(exps, dict) else []
    if bits.size != 1 or bits.dtype.kind not in "iu" or not exps or \
            any(v.size != 1 or v.dtype.kind not in "iu" for v in exps):
        got = [str(q.get(k))[:40] for k in ("weight_bits", "weight_exponents")]
        raise GraphError(f"metadata quant.weight_bits and quant.weight_exponents must be integers (a table of them "
                         f"per node), got {got[0]!r} and {got[1]!r}")
    exps = [int(v.reshape(-1)[0]) for v in exps]
    return (f"fixed point: {int(bits.reshape(-1)[0])}-bit weight mantissas (exponents {min(exps)}..{max(exps)}), "
            f"{fixed.state_bits}-bit state in units of 2^{fixed.unit('state_exponent')}, "
            f"{fixed.unit('input_bits')}-bit input in units of 2^{fixed.unit('input_exponent')}, "
            f"{len(fixed.round_nodes)} convs rounding graded inputs")


def inspect_nir(path: str | os.PathLike) -> tuple[list[dict], dict]:
    """Read a NIR file and summarise it: one row per node ``{"name", "type", "shape", "synapses", "fan_in",
    "params"}`` in evaluation order (:func:`neurosdm.graph.structure.order`, from the inputs to the outputs) and
    totals ``{"nodes", "edges", "synapses", "params", "file_bytes", "metadata"}``.

    type: the node's NIR type, or ``Upsample x2x2 (neurosdm)`` for the dialect's up-sampling node
    (:data:`neurosdm.graph.dialect.UPSAMPLE_RULE`); synapses: the weight size of Conv2d/Affine/Linear nodes (0
    otherwise; an up-sampling node's placeholder is not counted); fan_in: incoming edges; params: the
    size of every float array of the node (weights, biases, neuron parameters; not shapes or strides).
    Raises :class:`GraphError` (one line) for a file nir cannot read and for an invalid graph (an edge to a
    missing node, no Input or no Output node; ``nir.read`` already rejects most of these)."""
    path = Path(path)
    graph = read_nir(path)
    edges = [tuple(e) for e in graph.edges]
    missing = sorted({n for e in edges for n in e if n not in graph.nodes})
    if missing:
        raise GraphError(f"{path}: edges refer to nodes that do not exist: {', '.join(missing[:5])}")
    kinds = {type(n) for n in graph.nodes.values()}
    for needed in (nir.Input, nir.Output):
        if needed not in kinds:
            raise GraphError(f"{path}: the graph has no {needed.__name__} node")
    fan_in = {name: 0 for name in graph.nodes}
    for _, dst in edges:
        fan_in[dst] += 1
    rows = []
    roots = [k for k, n in graph.nodes.items() if isinstance(n, nir.Input)]
    for name in order(list(graph.nodes), edges, roots)[0]:
        node = graph.nodes[name]
        out_types = (getattr(node, "output_type", None) or {}).values()
        shapes = [tuple(int(d) for d in np.asarray(v).ravel()) for v in out_types]
        synapses = int(np.asarray(node.weight).size) if isinstance(node, _WEIGHTED) else 0
        params = sum(_array_size(v) for k, v in vars(node).items()
                     if k not in ("input_type", "output_type", "metadata"))
        factor = upsample_factor(node)
        kind = type(node).__name__ if factor is None else f"Upsample x{factor[0]}x{factor[1]} (neurosdm)"
        rows.append(dict(name=name, type=kind,
                         shape=" ".join("x".join(map(str, s)) for s in shapes) or "-",
                         synapses=synapses, fan_in=fan_in[name], params=params))
    totals = dict(nodes=len(rows), edges=len(edges), synapses=sum(r["synapses"] for r in rows),
                  params=sum(r["params"] for r in rows), file_bytes=path.stat().st_size,
                  metadata=dict(graph.metadata or {}))
    return rows, totals
