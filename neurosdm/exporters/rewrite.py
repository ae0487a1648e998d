"""Exact rewrites of an exported NIR graph for readers with a smaller node vocabulary.

``inline_junctions(graph, metadata)`` removes the identity ``nir.Scale`` summing junctions (``<blk>.sum``, scale =
ones) that :func:`neurosdm.exporters.nir.to_nir_graph` writes at the end of every residual block: no peer reader
tried in ``docs/peer-readers.md`` (spikingjelly, Norse, snnTorch) maps ``nir.Scale``.

Rule. A junction J is a Scale node whose scale is 1 at every element and which is not named in
``metadata["scale_tables"]`` (a TSM ``<conv>.tsm`` node holds the scale of spiking step 0 only and is not an
identity at other steps, even where the stored value happens to be 1). Every edge ``J -> C`` out of a removed
junction becomes the edges ``f -> C``, one for every feeder ``f`` of J (transitively: a feeder that is itself a
removed junction, e.g. the identity shortcut ``<prev blk>.sum -> <blk>.sum``, contributes its own feeders); the
edges into J and J itself are dropped.

Why it is exact. NIR sums every edge into a node, so ``C`` receives ``sum_f f``, which is what J delivered
(``1 * sum_f f``); J has no state, so the value is the same at every step. A TSM Scale fed by J still sums its
inputs before scaling (``p (a + b)`` from the edges ``a -> tsm``, ``b -> tsm``). In floating point the sums are
evaluated in a reader-dependent order, as they already were at J: in float64 the reference interpreter agrees to
rounding (``tests/test_rewrite.py``).

Exceptions (the junction is kept, unchanged):

- an Output node that would get more than one edge. NIR would still sum them, but readers that build a torch module
  return the incoming tensors of an Output separately (spikingjelly 2.0 returns a tuple, one tensor per edge), so
  the junction in front of the Output stays (named as before, feeding all its consumers) and the graph's output
  stays one tensor. ``output_junction`` chooses its form: ``"scale"`` (default: the identity Scale as exported),
  ``"conv"`` (a 1x1 ``nir.Conv2d`` with identity weights and zero bias: exact, ``C**2`` weights, readable by
  every peer that maps Conv2d) or ``"none"`` (no junction: the Output gets the fan-in, as NIR allows);
- a junction without feeders (its consumers would lose the zeros NIR gives a node without input edges: nothing
  to rewire), or one whose removal would create an edge that is already there (two equal edges cannot express
  ``2 f``). :func:`neurosdm.exporters.nir.to_nir_graph` writes neither.

Cost: edges are duplicated, one per (feeder, consumer) pair instead of one per feeder plus one per consumer. The
shipped export (``neurosdm/assets/tiny_fashion.pt``, head "sdm", 62 nodes, 77 edges, 8 junctions) becomes 55
nodes and 82 edges (7 junctions removed, ``up4.sum`` kept before the Output), or 54 nodes and 81 edges with
``output_junction="none"`` (the Output then has 3 edges). No array is duplicated (edges carry no weights).

The returned graph is new (the input is not mutated); node order and names are those of the input minus the
removed junctions; edges keep their order, each rewired edge replaced in place by its expansion. It carries a
copy of the metadata in which ``node_packing`` and ``bias_tables`` entries of removed nodes are dropped and
``junctions`` records the rewrite.
"""

from __future__ import annotations

from collections import Counter

import nir
import numpy as np

from neurosdm.errors import ConfigError

__all__ = ["inline_junctions", "is_identity_scale", "OUTPUT_JUNCTION_CHOICES"]

OUTPUT_JUNCTION_CHOICES = ("scale", "conv", "none")

JUNCTIONS_RULE = ("identity Scale junctions inlined (neurosdm.exporters.rewrite.inline_junctions): every edge J -> C "
                  "out of a removed junction J became f -> C for every feeder f of J; exact since NIR sums the edges "
                  "into a node")


def is_identity_scale(node) -> bool:
    """A ``nir.Scale`` whose scale is exactly 1 at every element."""
    return isinstance(node, nir.Scale) and bool(np.all(np.asarray(node.scale) == 1))


def _identity_conv(scale_node: nir.Scale) -> nir.Conv2d:
    scale = np.asarray(scale_node.scale)
    if scale.ndim != 3:
        raise ConfigError(f"output_junction='conv' needs a (C, H, W) junction, got shape {scale.shape}")
    c, h, w = scale.shape
    return nir.Conv2d(input_shape=(int(h), int(w)), weight=np.eye(c, dtype=scale.dtype)[:, :, None, None],
                      stride=1, padding=0, dilation=1, groups=1, bias=np.zeros(c, scale.dtype))


def _rewire(edges: list[tuple[str, str]], removed: set[str]) -> list[tuple[str, str]]:
    feeders: dict[str, list[str]] = {}
    for src, dst in edges:
        if dst in removed:
            feeders.setdefault(dst, []).append(src)
    memo: dict[str, list[str]] = {}

    def expand(name: str, path: tuple[str, ...] = ()) -> list[str]:
        if name not in removed:
            return [name]
        if name in path:
            raise ConfigError(f"junctions form a cycle through {name!r}; cannot inline them")
        if name not in memo:
            memo[name] = [f for src in feeders.get(name, []) for f in expand(src, path + (name,))]
        return memo[name]

    out = []
    for src, dst in edges:
        if dst in removed:
            continue
        out.extend((f, dst) for f in expand(src))
    return out


def inline_junctions(graph: nir.NIRGraph, metadata: dict | None = None,
                     output_junction: str = "scale") -> nir.NIRGraph:
    """``graph`` without its identity Scale junctions (see the module docstring for the rule, why it is exact and
    what it costs). ``metadata`` defaults to ``graph.metadata``; the returned graph carries a copy of it.

    output_junction: the form of the junction kept in front of an Output node that would otherwise get several
        edges: ``"scale"`` (the identity Scale as exported), ``"conv"`` (an identity 1x1 Conv2d of the same name)
        or ``"none"`` (no junction; the Output gets the fan-in).
    """
    if output_junction not in OUTPUT_JUNCTION_CHOICES:
        raise ConfigError(f"unknown output_junction {output_junction!r}; expected one of "
                          f"{', '.join(OUTPUT_JUNCTION_CHOICES)}")
    md = dict(graph.metadata if metadata is None else metadata)
    pinned = set(md.get("scale_tables", {}) or {})
    edges = [(str(a), str(b)) for a, b in graph.edges]
    fed = {dst for _, dst in edges}
    removed = {k for k, n in graph.nodes.items() if is_identity_scale(n) and k not in pinned and k in fed}
    outputs = {k for k, n in graph.nodes.items() if isinstance(n, nir.Output)}

    before = Counter(edges)
    kept_for_output: list[str] = []
    while True:
        new = _rewire(edges, removed)
        keep = set()
        # an Output fed by one removed junction that would expand to several edges: keep that junction
        for out in sorted(outputs):
            into = [src for src, dst in edges if dst == out]
            n_new = sum(1 for _, dst in new if dst == out)
            if output_junction != "none" and len(into) == 1 and into[0] in removed and n_new > 1:
                keep.add(into[0])
                kept_for_output.append(into[0])
        # two equal edges cannot express 2 f: keep the removed junctions feeding the node that would get them
        dup_dst = {dst for (src, dst), c in Counter(new).items() if c > max(1, before[(src, dst)])}
        keep |= {src for src, dst in edges if src in removed and dst in dup_dst}
        if not keep:
            break
        removed -= keep

    nodes = {}
    for k, n in graph.nodes.items():
        if k in removed:
            continue
        if k in kept_for_output and output_junction == "conv":
            n = _identity_conv(n)
        nodes[k] = n
    for key in ("node_packing", "bias_tables"):
        if isinstance(md.get(key), dict):
            md[key] = {k: v for k, v in md[key].items() if k not in removed}
    md["junctions"] = "edges"
    md["junctions_rule"] = JUNCTIONS_RULE
    md["junctions_removed"] = ", ".join(k for k in graph.nodes if k in removed)
    md["junctions_kept_for_output"] = ", ".join(f"{k} ({output_junction})" for k in kept_for_output)
    return nir.NIRGraph(nodes=nodes, edges=new, metadata=md)
