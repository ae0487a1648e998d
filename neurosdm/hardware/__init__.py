"""Hardware descriptions: the profiles that price a run (:mod:`neurosdm.hardware.profiles`: schema and loading of
``neurosdm/hw_profiles/*.toml``) and, beside them, chip resources and the mapping of a graph onto cores."""
