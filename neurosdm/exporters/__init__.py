"""Exporters of trained spiking denoisers to other formats (currently: float NIR graphs)."""

from neurosdm.exporters.nir import (  # noqa: F401
    UnsupportedModelError,
    eps_from_outputs,
    export_checkpoint,
    graph_size,
    host_head,
    inspect_nir,
    to_nir_graph,
    graph_at,
    step_graphs,
    with_diffusion_step,
)
from neurosdm.exporters.rewrite import inline_junctions  # noqa: F401
