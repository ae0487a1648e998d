"""The exchange format: ``export`` (to NIR or lava-dl netx) and ``inspect``."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from neurosdm.cli.common import FORCE_HELP, console, say
from neurosdm.io import check_outputs


class ExportFormat(str, Enum):
    nir = "nir"
    lava = "lava"


class Quantize(str, Enum):
    none = "none"
    int8 = "int8"


class Junctions(str, Enum):
    scale = "scale"
    edges = "edges"


class Upsample(str, Enum):
    auto = "auto"
    extension = "extension"
    polyphase = "polyphase"


class PeerReader(str, Enum):
    spikingjelly = "spikingjelly"
    norse = "norse"
    snntorch = "snntorch"


def export(
    ckpt: Path = typer.Argument(..., help="checkpoint (neurosdm, SDM or SDDPM layout, TSM or not)"),
    to: ExportFormat = typer.Option(..., "--to", help="output format (nir: core-NIR graph | lava: lava-dl netx HDF5 "
                                    "of the feed-forward chain, int8; CKPT may then be an int8 .nir file)"),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="output file (default: CKPT with suffix .nir; "
                                       "DIR/model.nir for a run directory)"),
    quantize: Quantize = typer.Option(Quantize.none, help="none: float32 graph | int8: Loihi-style fixed point "
                                      "(8-bit weights, 24-bit state), calibrated on real images"),
    calibration: Optional[str] = typer.Option(None, help="dataset for int8 calibration (default: the checkpoint's "
                                              "training set, else the built-in sample)"),
    data_dir: Optional[str] = typer.Option(None, help="where the calibration dataset lives"),
    calibration_images: int = typer.Option(64, help="images for int8 calibration (noised at 8 diffusion steps)"),
    junctions: Junctions = typer.Option(Junctions.scale, help="scale: identity Scale nodes sum residual streams | "
                                        "edges: sums as fan-in edges (for NIR readers without Scale)"),
    upsample: Upsample = typer.Option(Upsample.auto, help="auto: polyphase for at most one up-sampling level, the "
                                      "extension beyond | extension: neurosdm's up-sampling node (the model's own "
                                      "weights) | polyphase: core NIR only (weights grow 16x per level)"),
    peer: Optional[PeerReader] = typer.Option(None, "--peer", help="rewrite the graph for this framework's own NIR "
                                              "reader (docs/peer-readers.md); neurosdm's engines read the plain "
                                              "export"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    steps_schedule: Optional[str] = typer.Option(None, "--steps-schedule", help="spiking steps per network call by "
                                                 "diffusion step: rules 't<A:K' then a default K, e.g. "
                                                 "'t<300:4,t<700:3,2' (docs/pareto.md); written into the metadata, "
                                                 "honoured by both engines"),
):
    """Export a checkpoint as a NIR graph (EMA weights, biases of diffusion step 0, all steps in metadata), or with
    --to lava its feed-forward chain as a lava-dl netx file (docs/lava.md)."""
    check_outputs(out, (), force, sources=(ckpt,))  # the default output is checked by the exporter
    if to == ExportFormat.lava:
        from neurosdm.exporters.lava import export_lava

        path, chain = export_lava(ckpt, out, force=force, calibration=calibration, data_dir=data_dir,
                                  calibration_images=calibration_images)
        layers = ", ".join(f"{layer.conv} -> {layer.neuron}" for layer in chain.layers)
        say(f"wrote {path}: lava-dl netx, input = spikes of {chain.input_node}, {len(chain.layers)} layers "
            f"({layers}); stopped at {chain.stop_node}: {chain.stop_reason}")
        return
    from neurosdm import jobs

    path, totals = jobs.export_nir(ckpt, out, quantize=quantize.value, force=force, calibration=calibration,
                                   data_dir=data_dir, calibration_images=calibration_images,
                                   junctions=junctions.value, peer=peer.value if peer is not None else None,
                                   upsample=upsample.value, steps_schedule=steps_schedule)
    q = totals["metadata"].get("quant")
    detail = (f"; int8, state unit 2^{int(q['state_exponent'])}, calibrated on {int(q['calibration']['images'])} "
              f"images" if isinstance(q, dict) else "")
    say(f"wrote {path}: {totals['nodes']} nodes, {totals['edges']} edges, {totals['file_bytes'] / 1e6:.2f} MB{detail}")


def inspect(file: Path = typer.Argument(..., help="NIR file (.nir)")):
    """List the nodes of a NIR file (type, shape, synapses, fan-in, parameters) and check its edges."""
    from neurosdm.graph.inspect import describe_fixed_point, inspect_nir

    rows, totals = inspect_nir(file)
    table = Table(title=str(file))
    for col in ("node", "type", "shape", "synapses", "fan-in", "params"):
        table.add_column(col, justify="right" if col in ("synapses", "fan-in", "params") else "left")
    for r in rows:
        table.add_row(r["name"], r["type"], r["shape"], f"{r['synapses']:,}", str(r["fan_in"]), f"{r['params']:,}")
    console.print(table)
    md = totals["metadata"]
    src = md.get("source_checkpoint")
    say(f"{totals['nodes']} nodes, {totals['edges']} edges, {totals['synapses']:,} synapses, {totals['params']:,} "
        f"stored parameters, {totals['file_bytes'] / 1e6:.2f} MB; edges valid" + (f"; from {src}" if src else ""))
    fixed = describe_fixed_point(md)  # one-line errors for a damaged quant table
    if fixed is not None:
        say(fixed)
    ups = [r["name"] for r in rows if r["type"].startswith("Upsample")]
    if ups:
        say(f"up-sampling: {len(ups)} neurosdm extension node(s) ({', '.join(ups)}): nearest neighbour, "
            "y[c, 2i+a, 2j+b] = x[c, i, j]; NIR readers without the extension run their placeholder as zeros")
    if md.get("scale_tables"):
        say(f"TSM: {len(md['scale_tables'])} per-step input scales and per-step biases in the metadata "
            "(apply with neurosdm.graph.dialect.graph_at)")
