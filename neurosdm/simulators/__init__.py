"""Simulators that read a NIR graph (never torch modules): what they measure is exactly what was exported.

- :mod:`neurosdm.simulators.reference`: the plain, dense numpy reference interpreter, the semantic baseline that
  exports are checked against and that the real engines must match (float and fixed point).
- :mod:`neurosdm.simulators.program`: the engines' form of a graph (layers in order, parameters, per-step tables).
- :mod:`neurosdm.simulators.event`: the event-driven engine (numpy + a numba kernel; spikes scatter their weights).
- :mod:`neurosdm.simulators.torch_engine`: the clocked, dense, batched torch engine (CPU/CUDA).
- :mod:`neurosdm.simulators.stats`: ``RunStats``, the exact per-layer counts both engines fill.
- :mod:`neurosdm.simulators.run`: whole generations (an engine inside the DDPM/DDIM sampler), host work counted.
"""
