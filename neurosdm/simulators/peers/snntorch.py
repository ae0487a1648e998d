"""snnTorch's NIR reader (``snntorch.import_nir.import_from_nir``; an optional dependency, imported by
:func:`neurosdm.simulators.peers.base.load_peer`) and the causes of its mismatches that its import rules explain,
each confirmed by a run of the reference on the graph as snnTorch reads it."""

from __future__ import annotations

import copy

import nir
import numpy as np

from neurosdm.graph.dialect import Discretisation
from neurosdm.simulators.peers.base import Peer


def load(mod, graph, dt):
    """The module snnTorch's reader builds for ``graph`` (``mod``: ``snntorch.import_nir``; ``dt`` unused: the
    reader takes none)."""
    return mod.import_from_nir(copy.deepcopy(graph))  # its RNN search rewrites graph.edges in place


def reset(model):
    """Clear the membranes a ``Leaky`` keeps in the module between calls."""
    for m in model.modules():
        if hasattr(m, "reset_mem") and getattr(m, "mem", None) is not None:
            m.reset_mem()


def measured(graph: nir.NIRGraph, entry: dict, model, matches) -> list[str]:
    """``snn_if_leaky``: the peer equals the reference with every IF read as a LIF with beta 0.9, reset by
    subtraction, '>'; ``snn_lif_dt``: with every LIF read with snnTorch's fixed dt 1e-4 (gain 1, threshold divided
    by w_scale)."""
    types = {type(n) for n in graph.nodes.values()}
    causes = []
    if nir.IF in types:
        ifs = [k for k, n in graph.nodes.items() if isinstance(n, nir.IF)]
        nodes = dict(graph.nodes)
        for k in ifs:
            n = graph.nodes[k]
            nodes[k] = nir.LIF(tau=np.full_like(n.r, 10.0), r=np.full_like(n.r, 10.0),
                               v_leak=np.zeros_like(n.r), v_threshold=n.v_threshold, v_reset=n.v_reset)
        g2 = nir.NIRGraph(nodes=nodes, edges=graph.edges, metadata=graph.metadata)
        if matches(g2, disc=Discretisation(reset="subtract", comparison=">")):
            causes.append("snn_if_leaky")
    if nir.LIF in types:  # snnTorch's LIF: dt 1e-4, gain 1, threshold / w_scale
        dt_s = 1e-4
        nodes = {}
        for k, n in graph.nodes.items():
            if isinstance(n, nir.LIF):
                w_scale = np.asarray(n.r) * dt_s / np.asarray(n.tau)
                n = nir.LIF(tau=n.tau, r=np.asarray(n.tau) / dt_s, v_leak=n.v_leak,
                            v_threshold=np.asarray(n.v_threshold) / w_scale, v_reset=n.v_reset)
            nodes[k] = n
        g2 = nir.NIRGraph(nodes=nodes, edges=graph.edges, metadata=graph.metadata)
        if matches(g2, disc=Discretisation(dt=dt_s, comparison=">")):
            causes.append("snn_lif_dt")
    return causes


PEER = Peer("snnTorch", "snntorch", "snntorch", "snntorch.import_nir", "snntorch.import_nir.import_from_nir(graph)",
            load, reset=reset, comparison=">", measured=measured)
