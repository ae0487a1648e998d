"""Simulators that run a :class:`~neurosdm.graph.program.Program` (a NIR graph translated once by
:mod:`neurosdm.graph.program`, never torch modules): what they measure is exactly what was exported.

- :mod:`neurosdm.simulators.loop`: the one step loop (sums, recurrent edges, delays, records) and the counting rules;
- :mod:`neurosdm.simulators.backend`: the backend interface and :class:`~neurosdm.simulators.backend.Engine`;
- :mod:`neurosdm.simulators.reference`: the dense numpy backend, the oracle (``run_graph``, ``run_reference``);
- :mod:`neurosdm.simulators.event`: the event-driven engine (numpy + a numba kernel; spikes scatter their weights);
- :mod:`neurosdm.simulators.torch_engine`: the clocked, dense, batched torch engine (CPU/CUDA);
- :mod:`neurosdm.simulators.stats`: ``RunStats``, the exact per-layer counts;
- :mod:`neurosdm.simulators.run`: whole generations (an engine inside a sampler), host work counted;
- :mod:`neurosdm.simulators.foreign`: graphs that are not neurosdm denoisers, on inputs read from files;
- :mod:`neurosdm.simulators.activity`: counts derived from recorded spikes (synapse events, state updates);
- :mod:`neurosdm.simulators.peers`: the peer frameworks' NIR readers, for interop checks.
"""
