"""Exporters of trained spiking denoisers: graph builders (:mod:`~neurosdm.exporters.nir`: core-NIR graphs;
:mod:`~neurosdm.exporters.lava`: lava-dl netx files), the fixed-point pass (:mod:`~neurosdm.exporters.fixed_point`),
exact rewrites for other readers (:mod:`~neurosdm.exporters.rewrite`), and the export pipeline on top
(:mod:`~neurosdm.exporters.pipeline`: load, calibrate, quantise, rewrite, write).

The metadata conventions of an export (tables, fixed point, host head) are :mod:`neurosdm.graph.dialect` and
:mod:`neurosdm.graph.host`; inspection is :mod:`neurosdm.graph.inspect`."""
