"""Graph structure, once: nested graphs flattened, the one evaluation order, back edges.

- **Nested graphs** are flattened: a ``NIRGraph`` node ``sub`` with nodes ``a, b`` becomes nodes ``sub.a, sub.b``
  (names joined with ``.``, recursively). The sub-graph's ``Input`` and ``Output`` nodes stay as identity nodes: a
  parent edge ``(x, sub)`` ends at the sub-graph's Input node and a parent edge ``(sub, y)`` starts at its Output
  node, so a sub-graph used in an edge needs exactly one Input (resp. Output) node. A sub-graph that is an
  extension operator of the neurosdm dialect (up-sampling, :data:`neurosdm.graph.dialect.UPSAMPLE_RULE`) is not
  flattened: it is one node.
- **Evaluation order** (:func:`order`): a depth-first search over the edges marks the edges that close a cycle
  (back edges: an edge into a node still on the DFS stack, self-loops included). The search starts from the given
  roots (the ``Input`` nodes) in sorted name order, then from every node not yet visited (nodes without incoming
  edges first), each in sorted name order, and visits successors in sorted name order, so the result does not
  depend on the order of ``graph.nodes`` (``nir.read`` returns nodes alphabetically). The order is the reverse
  DFS post-order: a topological order of the remaining (feed-forward) edges. A back edge delivers its source's
  output of the previous step (one step of delay around every cycle, as NIR's torch readers evaluate recurrent
  graphs).
"""

from __future__ import annotations

from typing import Any

import nir

from neurosdm.errors import GraphError
from neurosdm.graph.dialect import upsample_factor

__all__ = ["flatten", "order", "flat_nodes"]


def flatten(graph: nir.NIRGraph, prefix: str = "") -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Inline nested graphs: ``(nodes, edges)``, flattened node names -> nodes and the edges between them."""
    nodes, edges, _, _ = _flatten(graph, prefix)
    return nodes, edges


def flat_nodes(graph: nir.NIRGraph, prefix: str = ""):
    """``(flattened name, node)`` of every leaf node, nested graphs included (no edge checks)."""
    for key, node in graph.nodes.items():
        if _nested(node):
            yield from flat_nodes(node, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", node


def _flatten(graph: nir.NIRGraph, prefix: str):
    nodes: dict[str, Any] = {}
    edges: list[tuple[str, str]] = []
    entry: dict[str, str | None] = {}
    exit_: dict[str, str | None] = {}
    for key, node in graph.nodes.items():
        full = f"{prefix}{key}"
        if _nested(node):
            sub_nodes, sub_edges, _, _ = _flatten(node, f"{full}.")
            for sub_name in sub_nodes:
                if sub_name in nodes:
                    raise GraphError(f"flattening nested graph {full!r} gives node name {sub_name!r} twice")
            nodes.update(sub_nodes)
            edges.extend(sub_edges)
            ins = [k for k, n in node.nodes.items() if isinstance(n, nir.Input)]
            outs = [k for k, n in node.nodes.items() if isinstance(n, nir.Output)]
            entry[key] = f"{full}.{ins[0]}" if len(ins) == 1 else None
            exit_[key] = f"{full}.{outs[0]}" if len(outs) == 1 else None
        else:
            if full in nodes:
                raise GraphError(f"node name {full!r} occurs twice after flattening nested graphs")
            nodes[full] = node
            entry[key] = exit_[key] = full
    for src, dst in graph.edges:
        src, dst = str(src), str(dst)
        for end, table in ((src, exit_), (dst, entry)):
            if end not in table:
                raise GraphError(f"edge ({src!r}, {dst!r}) names node {prefix}{end!r}, which is not in the graph")
            if table[end] is None:
                port = "Output" if table is exit_ else "Input"
                raise GraphError(f"edge ({src!r}, {dst!r}) attaches to nested graph {prefix}{end!r}, which must then "
                                 f"have exactly one {port} node")
        edges.append((exit_[src], entry[dst]))
    return nodes, edges, entry, exit_


def _nested(node) -> bool:
    """A sub-graph to flatten (an extension node of the dialect, such as up-sampling, is an operator: a leaf)."""
    return isinstance(node, nir.NIRGraph) and upsample_factor(node) is None


def order(names: list[str], edges: list[tuple[str, str]], roots: list[str] = (),
          skip: set[int] = frozenset()) -> tuple[list[str], set[int]]:
    """The evaluation order (module docstring) over the edges whose index is not in ``skip`` (e.g. those into
    Delays of at least one step, which do not constrain the order). Returns ``(order, back-edge indices)``."""
    succ: dict[str, list[tuple[str, int]]] = {n: [] for n in names}
    has_pred = set()
    for idx, (src, dst) in enumerate(edges):
        if idx in skip:
            continue
        succ[src].append((dst, idx))
        has_pred.add(dst)
    for n in succ:
        succ[n].sort()
    state: dict[str, int] = {}  # 1: on the stack, 2: finished
    post: list[str] = []
    back: set[int] = set()
    starts = sorted(roots) + sorted(n for n in names if n not in has_pred) + sorted(names)
    for start in starts:
        if start in state:
            continue
        state[start] = 1
        stack = [(start, iter(succ[start]))]
        while stack:
            node, it = stack[-1]
            for dst, idx in it:
                if state.get(dst) == 1:
                    back.add(idx)
                elif dst not in state:
                    state[dst] = 1
                    stack.append((dst, iter(succ[dst])))
                    break
            else:
                stack.pop()
                state[node] = 2
                post.append(node)
    return post[::-1], back
