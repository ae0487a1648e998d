"""spikingjelly's NIR reader (``spikingjelly.activation_based.nir_exchange.import_from_nir``; an optional
dependency, imported by :func:`neurosdm.simulators.peers.base.load_peer`). It fires on ``v >= v_threshold`` and
resets to ``v_reset``, as neurosdm; with its default ``dt`` (1e-4) it refuses ``IF.r = 1``, so the graph's dt is
passed."""

from __future__ import annotations

from neurosdm.simulators.peers.base import Peer


def load(mod, graph, dt):
    """The module spikingjelly's reader builds for ``graph`` (``mod``: its ``nir_exchange`` module)."""
    return mod.import_from_nir(graph, dt=dt)


PEER = Peer("spikingjelly", "spikingjelly", "spikingjelly", "spikingjelly.activation_based.nir_exchange",
            "spikingjelly.activation_based.nir_exchange.import_from_nir(graph, dt=metadata['dt'])", load)
