"""Norse's NIR reader (``norse.torch.from_nir``; an optional dependency, imported by
:func:`neurosdm.simulators.peers.base.load_peer`), the causes of its mismatches that its import rules and its
executor explain (each confirmed by a measurement), and whether its result depends on the order of the edge
list."""

from __future__ import annotations

import nir
import numpy as np

from neurosdm.graph.dialect import Discretisation
from neurosdm.simulators.peers.base import Peer, classify, try_graph


def load(mod, graph, dt):
    """The module Norse's reader builds for ``graph`` (``mod``: ``norse.torch``)."""
    return mod.from_nir(graph, dt=dt)


def scale_dropped(graph: nir.NIRGraph, model) -> bool:
    """The graph has a ``nir.Scale`` and Norse's executor runs none: ``_import_norse_module`` dropped it."""
    return nir.Scale in {type(n) for n in graph.nodes.values()} and not any(
        type(n.elem).__name__ == "Scale" for n in getattr(model, "execution_order", []))


def measured(graph: nir.NIRGraph, entry: dict, model, matches) -> list[str]:
    """``li_dropped``: the peer equals the reference without the LI; ``norse_ignores_r``: with every LIF's r = 1
    and '>'; ``dfs_order``: edges that run against Norse's execution order (listed in ``entry``)."""
    types = {type(n) for n in graph.nodes.values()}
    causes = []
    if nir.LI in types:
        li = [k for k, n in graph.nodes.items() if isinstance(n, nir.LI)]
        src = [a for a, b in graph.edges if b == li[0]]
        g2 = nir.NIRGraph(nodes={k: n for k, n in graph.nodes.items() if k not in li},
                          edges=[(a, "output") if b in li else (a, b) for a, b in graph.edges if a not in li],
                          metadata=graph.metadata)
        if len(src) == 1 and matches(g2):
            causes.append("li_dropped")
    if nir.LIF in types:  # Norse's LIF: r taken as 1, '>'
        nodes = {k: nir.LIF(tau=n.tau, r=np.ones_like(n.r), v_leak=n.v_leak, v_threshold=n.v_threshold,
                            v_reset=n.v_reset) if isinstance(n, nir.LIF) else n for k, n in graph.nodes.items()}
        g2 = nir.NIRGraph(nodes=nodes, edges=graph.edges, metadata=graph.metadata)
        if matches(g2, disc=Discretisation.from_metadata(graph.metadata, comparison=">")):
            causes.append("norse_ignores_r")
    order = [n.name for n in getattr(model, "execution_order", [])]
    pos = {n: i for i, n in enumerate(order)}
    against = [(a, b) for a, b in graph.edges if a.replace(".", "_") in pos and b.replace(".", "_") in pos
               and pos[a.replace(".", "_")] > pos[b.replace(".", "_")]]
    if against:
        causes.append("dfs_order")
        entry["edges_against_execution_order"] = [f"{a} -> {b}" for a, b in against[:6]]
        entry["edges_against_execution_order_count"] = len(against)
    return causes


def edge_order(peer: Peer, mod, forms: dict[str, nir.NIRGraph], x: np.ndarray, ref: np.ndarray) -> dict:
    """Does Norse's result depend on the order of the edge list? Each of ``forms`` (the same graph with its edge
    list as written, reversed, in topological order, ...; NIR edges are a set: the reference ``ref`` is the same for
    every order) run on ``x``: ``{form: {"status", "spike_mismatch"}}``."""
    out = {}
    for name, g in forms.items():
        res, _ = try_graph(peer, mod, g, x, ref)
        out[name] = {"status": classify(res), "spike_mismatch": res.get("spike_mismatch")}
    return out


PEER = Peer("Norse", "norse", "norse", "norse.torch", "norse.torch.from_nir(graph, dt=metadata['dt'])", load,
            comparison=">", scale_dropped=scale_dropped, measured=measured)
