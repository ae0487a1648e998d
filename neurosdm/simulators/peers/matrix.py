"""The NIR interop matrix: every peer's own reader against every feature graph, as exported and as rewritten for
that peer (``neurosdm export ... --peer NAME``). Each cell is classified (:func:`~neurosdm.simulators.peers.base.
classify`) and every cell that is not exact gets its cause (``CAUSES``), found by a measurement (:func:`diagnose`),
labelled "framework limit" or "neurosdm". ``scripts/peer_readers.py`` writes the result as docs/peer-readers.md and
docs/data/peer_readers.json.

The export options are a layer above the simulators: :func:`survey` takes them as functions
(``neurosdm.exporters.rewrite.for_peer`` and the edge-list variants of Norse's edge-order check).
"""

from __future__ import annotations

import importlib.metadata
import sys
from typing import Any, Callable

import nir
import numpy as np
import torch

import neurosdm
from neurosdm.graph.dialect import Discretisation, meta_value, upsample_factor
from neurosdm.simulators.peers import norse, snntorch, spikingjelly
from neurosdm.simulators.peers.base import (BATCH, EXACT_RTOL, NUM_STEPS, SEED, TOL_RTOL, TOL_SPIKES, Peer,
                                            classify, compare, error_text, load_peer, quiet, reference, run_peer,
                                            try_graph, version)
from neurosdm.simulators.peers.suite import FEATURES, make_input

PEERS = [spikingjelly.PEER, norse.PEER, snntorch.PEER]

FW, OURS = "framework limit", "neurosdm"
CAUSES = {
    "scale_unmapped": (FW, "its reader has no mapping for `nir.Scale`, the identity summing junction of a residual "
                           "stream (spikingjelly, snnTorch: `nirtorch.nir_to_torch` raises 'Unknown node type'; "
                           "Norse: `_import_norse_module` returns None and the node is dropped: an edge that names it "
                           "raises `KeyError` (`whole`), or the nodes behind it are never reached and the module "
                           "returns the last node it ran (`residual`: `down0.conv2`, measured from its execution "
                           "order)). Worked around by `--peer` (the junctions become edges)."),
    "li_unmapped": (FW, "no mapping for `nir.LI` (spikingjelly's `_NodeMapper.map_dict`, snnTorch's `node_map` in "
                        "`import_from_nir`); nothing in NIR's core set that these readers map expresses a "
                        "non-spiking leaky readout (their LIF modules output spikes)."),
    "li_dropped": (FW, "Norse's `_import_norse_module` has no `nir.LI` branch: the node is dropped without an error "
                       "and the module returns the value of the node before it (measured: equal to the "
                       "reference without the LI)."),
    "snn_if_leaky": (FW, "snnTorch imports `nir.IF` as `snn.Leaky(beta=0.9, reset_mechanism='subtract')` "
                         "(snntorch/import_nir.py, `_nir_to_snntorch_module`, IF branch: beta is a constant): a "
                         "leaky neuron with reset by subtraction (measured: its spikes equal neurosdm's reference "
                         "of a LIF with beta 0.9, subtract, '>'). Worked around by `--peer snntorch` (IF written as "
                         "a LIF whose float32 beta is 1)."),
    "snn_if_tuple": (FW, "the same IF branch builds the Leaky with `init_hidden=False`: it returns `(spk, mem)` and "
                         "takes no state argument, so `nirtorch.nir_to_torch` hands the tuple to the next node "
                         "(`conv2d() received ... got (tuple, ...)`): an IF followed by another node cannot run. "
                         "Worked around by `--peer snntorch` (its LIF branch uses `init_hidden=True`)."),
    "snn_lif_dt": (FW, "snnTorch's LIF branch fixes `dt = 1e-4` (`_nir_to_snntorch_module`): beta = 1 - 1e-4/tau "
                       "and the threshold divided by w_scale = r 1e-4/tau, so a graph written with dt = 1 (tau in "
                       "steps) barely leaks and its threshold grows 1e4-fold (measured: the peer equals neurosdm's "
                       "reference of that reading). Worked around by `--peer snntorch` (time unit 1e-4: tau scaled "
                       "by 1e-4, the same per-step decay and gain)."),
    "norse_ignores_r": (FW, "Norse's `LIFBoxCell`/`IAFCell` ignore `r` (a warning): `v <- v + dt/tau (v_leak - v "
                            "+ x)`, where neurosdm's LIF has input gain r dt / tau = 1 (measured: the peer equals "
                            "neurosdm's reference with r = 1 and '>'). Worked around by "
                            "`--peer norse` (r moved into the feeding conv's weights: exact for r a power of two)."),
    "comparison": (FW, "the reader fires on `v > theta` (Norse: `heaviside(v - v_th)` = `v - v_th > 0`; snnTorch: "
                       "`mem - threshold > 0`), neurosdm on `v >= theta`; they differ where a membrane equals the "
                       "threshold, which on an integer grid happens (measured: the peer equals neurosdm's reference "
                       "run with '>'). Worked around by `--peer` (theta - 1 on the integer grid; the next float32 "
                       "below theta in a float graph)."),
    "dfs_order": (FW, "Norse's `from_nir` uses the deprecated `nirtorch.load`, whose GraphExecutor runs the nodes in "
                      "depth-first pre-order from the Input along the edge list (`nirtorch.graph_utils."
                      "trace_execution`); a node then runs before one of its inputs, which arrives from the previous "
                      "step (nothing at step 0), and the module returns the last node it ran. `--peer norse` writes "
                      "the edges in topological order, which fixes a fork whose other branch is a direct edge into "
                      "the join (the identity skip of `residual`), but no edge order can fix a fork with a node on "
                      "two branches (`split_skip`, the 1x1 shortcut and split-skip convs of `whole`): pre-order "
                      "reaches the join through the first branch before it has visited the second."),
    "upsample_extension": (OURS, "the graph holds neurosdm's up-sampling extension node (a sub-graph whose metadata "
                                 "names the operator; NIR has no up-sampling primitive): the reader reads and runs "
                                 "its core-NIR placeholder, a conv of zeros (measured: the peer equals neurosdm's "
                                 "reference of the graph read without the extension). `--peer` refuses such a graph; "
                                 "`neurosdm export --peer` writes the core-NIR polyphase form instead, where it fits."),
    "float32_rounding_spikes": (FW, "float32 arithmetic in the peer: a membrane within rounding of its threshold "
                                    "fires on one side and not the other."),
}


def without_extensions(graph: nir.NIRGraph) -> nir.NIRGraph:
    """``graph`` as a reader without neurosdm's extensions reads it: every up-sampling node an ordinary sub-graph
    (its placeholder body runs)."""
    nodes = {k: (nir.NIRGraph(nodes=n.nodes, edges=n.edges, metadata={}) if upsample_factor(n) is not None else n)
             for k, n in graph.nodes.items()}
    return nir.NIRGraph(nodes=nodes, edges=list(graph.edges), metadata=dict(graph.metadata or {}))


def diagnose(peer: Peer, graph: nir.NIRGraph, entry: dict, model, x) -> list[str]:
    """Cause keys (``CAUSES``) for a cell that is not exact, each confirmed by a measurement or an error text."""
    causes: list[str] = []
    err = entry.get("error") or ""
    if "nir.ir.linear.Scale" in err or (peer.scale_dropped is not None and peer.scale_dropped(graph, model)):
        causes.append("scale_unmapped")
    if "nir.ir.neuron.LI'" in err:
        causes.append("li_unmapped")
    if "got (tuple" in err:
        causes.append("snn_if_tuple")
    if entry.get("runs") and classify(entry) != "exact":
        outs = None

        def peer_outs():
            nonlocal outs
            if outs is None:
                outs, _ = quiet(run_peer, model, x, NUM_STEPS, peer.reset)
            return outs

        def matches(alt: nir.NIRGraph, **kw) -> bool:  # the peer's output equals the reference of ``alt``
            c = compare(peer_outs(), reference(alt, x, fixed=None, **kw))
            return c.get("spike_mismatch", 0.0) == 0 and c["max_abs_diff"] <= EXACT_RTOL * max(1.0, c["ref_max_abs"])

        # a reader without neurosdm's extensions runs their placeholders: measure the other causes on that reading
        extended = any(upsample_factor(n) is not None for n in graph.nodes.values())
        read = without_extensions(graph) if extended else graph
        if peer.measured is not None:
            causes += peer.measured(read, entry, model, matches)
        if (peer.comparison == ">" and not causes
                and str(meta_value(graph.metadata, "comparison", ">=")) == ">="):
            if matches(read, disc=Discretisation.from_metadata(graph.metadata, comparison=">")):
                causes.append("comparison")
        if extended and (causes or matches(read)):
            causes.append("upsample_extension")
        if not causes and entry.get("spike_mismatch", 1.0) <= TOL_SPIKES:
            causes.append("float32_rounding_spikes")
    return causes


def survey(features: dict[str, tuple[nir.NIRGraph, str]], rewrite: Callable[[nir.NIRGraph, str], nir.NIRGraph],
           peers: list[Peer] | None = None,
           edge_order_forms: Callable[[nir.NIRGraph], dict[str, nir.NIRGraph]] | None = None) -> dict:
    """Every peer against every feature (:func:`neurosdm.simulators.peers.suite.feature_graphs`), default export
    and ``rewrite(graph, peer.key)`` form (``neurosdm.exporters.rewrite.for_peer``). ``edge_order_forms(graph)``:
    the ``residual`` graph with its edge list in several orders, for Norse's edge-order check
    (:func:`neurosdm.simulators.peers.norse.edge_order`; skipped when None). Runs torch on one thread. Returns
    the JSON-able result."""
    torch.set_num_threads(1)
    result: dict[str, Any] = {
        "num_steps": NUM_STEPS, "batch": BATCH, "seed": SEED,
        "tolerances": {"exact_rtol": EXACT_RTOL, "tolerance_spike_fraction": TOL_SPIKES, "tolerance_rtol": TOL_RTOL},
        "versions": {"nir": importlib.metadata.version("nir"), "neurosdm": neurosdm.__version__,
                     "nirtorch": version("nirtorch"), "torch": version("torch"), "python": sys.version.split()[0]},
        "features": {}, "peers": {},
    }
    inputs, refs = {}, {}
    for name, (g, kind) in features.items():
        inputs[name] = make_input(g, kind)
        refs[name] = reference(g, inputs[name])
        info = {"description": FEATURES.get(name, name), "input": kind, "nodes": len(g.nodes), "edges": len(g.edges),
                "node_types": sorted({type(n).__name__ for n in g.nodes.values()})}
        if np.isin(refs[name], (0.0, 1.0)).all():
            info["reference_spike_rate"] = float(refs[name].mean())
        result["features"][name] = info
    for peer in peers or PEERS:
        mod, ver, reason = load_peer(peer)
        entry: dict[str, Any] = {"version": ver, "importer": peer.call}
        if mod is None:
            entry["skipped"] = reason
            result["peers"][peer.name] = entry
            continue
        cells = {}
        for name, (g, _) in features.items():
            cell = {}
            for form in ("default", "option"):
                try:
                    gf = g if form == "default" else rewrite(g, peer.key)
                except Exception as e:  # noqa: BLE001 - an option that cannot be applied is a finding
                    cell[form] = {"status": "no option", "error": error_text(e)}
                    continue
                res, model = try_graph(peer, mod, gf, inputs[name], refs[name])
                res["status"] = classify(res)
                if res["status"] != "exact":
                    res["causes"] = diagnose(peer, gf, res, model, inputs[name])
                cell[form] = res
            cells[name] = cell
        entry["cells"] = cells
        if peer.key == "norse" and "residual" in features and edge_order_forms is not None:
            g, kind = features["residual"]
            x = make_input(g, kind)
            entry["edge_order"] = norse.edge_order(peer, mod, edge_order_forms(g), x, reference(g, x))
        result["peers"][peer.name] = entry
    return result
