"""Peer-framework interop: neurosdm's NIR exports in the peers' own readers (spikingjelly, Norse, snnTorch).

:mod:`~neurosdm.simulators.peers.base` runs a reader against the reference interpreter and classifies the result;
one module per peer (:mod:`~neurosdm.simulators.peers.spikingjelly`, :mod:`~neurosdm.simulators.peers.norse`,
:mod:`~neurosdm.simulators.peers.snntorch`) says how its reader is called and which of its rules explain a
mismatch; :mod:`~neurosdm.simulators.peers.suite` builds the feature graphs and their inputs;
:mod:`~neurosdm.simulators.peers.matrix` runs every peer against every feature (the interop matrix of
docs/peer-readers.md, written by ``scripts/peer_readers.py``). The peer frameworks are optional: each is imported
only when used.
"""

from neurosdm.simulators.peers.base import (BATCH, EXACT_RTOL, NUM_STEPS, SEED, TOL_RTOL, TOL_SPIKES, Peer,
                                            classify, compare, load_peer, reference, run_peer, try_graph)
from neurosdm.simulators.peers.matrix import CAUSES, FW, OURS, PEERS, diagnose, survey
from neurosdm.simulators.peers.suite import FEATURES, cut, feature_graphs, lif_graph, make_input, tiny_unet

__all__ = ["BATCH", "EXACT_RTOL", "NUM_STEPS", "SEED", "TOL_RTOL", "TOL_SPIKES", "Peer", "classify", "compare",
           "load_peer", "reference", "run_peer", "try_graph", "CAUSES", "FW", "OURS", "PEERS", "diagnose", "survey",
           "FEATURES", "cut", "feature_graphs", "lif_graph", "make_input", "tiny_unet"]
