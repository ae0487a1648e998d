"""Simulators that read a NIR graph (never torch modules): what they measure is exactly what was exported.

- :mod:`neurosdm.simulators.reference`: the plain, dense numpy reference interpreter, the semantic baseline that
  exports are checked against and that the real engines must match.
"""
