"""The NIR interop matrix: neurosdm's exported graph features x the peer frameworks' own NIR readers.

    python scripts/peer_readers.py [--doc docs/peer-readers.md] [--json docs/data/peer_readers.json]

The suite (:func:`neurosdm.simulators.peers.feature_graphs`) is a set of small graphs, one per feature neurosdm
writes, cut from exports of tiny SpikingUNets built in-process (image 8x8, ch 4, ch_mult (1, 2), 4 spiking steps,
random BatchNorm statistics and biases from a fixed seed, so that folding is exercised and the neurons neither stay
silent nor all fire), plus one graph neurosdm's UNet does not write (a LIF with leak, made with ``nir`` directly in
neurosdm's conventions, dt 1).

For every installed peer (spikingjelly, Norse, snnTorch; a missing one is reported with the reason) and every
feature, the graph is imported through the peer's own reader twice: as exported ("default") and as rewritten for
that peer by :func:`neurosdm.exporters.rewrite.for_peer` (``neurosdm export ... --peer NAME``, "option"). Each
imported module is stepped on the same input as :func:`neurosdm.simulators.reference.run_graph` (float64, the
exported graph) and its output compared at every step. Each cell is classified
(:func:`neurosdm.simulators.peers.classify`) and every cell that is not exact gets its cause, found by a
measurement (:func:`neurosdm.simulators.peers.diagnose`), labelled "framework limit" or "neurosdm"
(:mod:`neurosdm.simulators.peers` holds all of that; this program exports the graphs and writes the report).
Writes a Markdown report and a JSON file with every figure. Needs no network access; about 10 s.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import nir
import numpy as np
import torch

from neurosdm.config import DiffusionConfig
from neurosdm.exporters.fixed_point import calibrate, calibration_inputs, quantize_graph
from neurosdm.exporters.nir import to_nir_graph
from neurosdm.exporters.pipeline import export_checkpoint
from neurosdm.exporters.rewrite import for_peer, inline_junctions, strict_thresholds, topological_edges
from neurosdm.io import atomic_path
from neurosdm.simulators.peers import CAUSES, SEED, feature_graphs, survey

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "neurosdm" / "assets" / "tiny_fashion.pt"


# ------------------------------------------------------------------------------------------------------ exports


def export_tiny(model, quantize: bool = False, upsample: str = "auto", seed: int = SEED) -> nir.NIRGraph:
    """``to_nir_graph`` of a tiny SpikingUNet (:func:`neurosdm.simulators.peers.tiny_unet`): float32, or int8
    fixed point (calibrated on 8 random images from ``seed``)."""
    graph, md = to_nir_graph(model, dtype=np.float64 if quantize else np.float32, upsample=upsample)
    if quantize:
        images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        cal = calibrate(graph, md, calibration_inputs(images, DiffusionConfig(num_diffusion_steps=50), steps=2))
        graph, md = quantize_graph(graph, md, cal)
        graph = nir.NIRGraph(nodes=graph.nodes, edges=graph.edges, metadata=md)
    return graph


def shipped_export() -> nir.NIRGraph:
    """``export_checkpoint`` of the shipped checkpoint (float32), written to a temporary file and read back."""
    with tempfile.TemporaryDirectory() as tmp:
        return nir.read(export_checkpoint(CKPT, Path(tmp) / "tiny_fashion.nir"))


def suite(shipped: bool = True) -> dict[str, tuple[nir.NIRGraph, str]]:
    """``{feature: (graph, input kind)}``; ``shipped``: include the whole shipped checkpoint's export (the slowest
    row) when the checkpoint is in this checkout."""
    return feature_graphs(export_tiny, shipped_export if shipped and CKPT.exists() else None)


def edge_orders(graph: nir.NIRGraph) -> dict[str, nir.NIRGraph]:
    """Does Norse's result depend on the order of the edge list, and does ``topological_edges`` remove that? The
    graph for Norse (junctions as edges, thresholds lowered) without and with :func:`topological_edges`, its edge
    list as written and reversed (NIR edges are a set: the reference result is the same for every order)."""
    base = strict_thresholds(inline_junctions(graph, output_junction="conv"))
    rev = nir.NIRGraph(nodes=base.nodes, edges=list(reversed(base.edges)), metadata=base.metadata)
    return {"as_written": base, "reversed": rev, "as_written_topological": topological_edges(base),
            "reversed_topological": topological_edges(rev)}


# ------------------------------------------------------------------------------------------------------ reports


def _fmt(v) -> str:
    if not isinstance(v, (int, float)):
        return str(v)
    if v == 0:
        return "0"
    return f"{v:.1e}" if abs(v) < 0.01 else f"{v:.3g}"


def _figure(r: dict) -> str:
    if r["status"] in ("cannot read", "cannot run", "no option"):
        return ""
    if "spike_mismatch" in r:
        return f"{r['spike_mismatch']:.1%} spikes differ" if r["spike_mismatch"] else "spikes identical"
    return f"max diff {_fmt(r['max_abs_diff'])}"


def _cell(r: dict) -> str:
    causes = r.get("causes") or []
    tag = f" [{', '.join(causes)}]" if causes else ""
    fig = _figure(r)
    return f"{r['status']}{' (' + fig + ')' if fig else ''}{tag}"


def markdown(result: dict) -> str:
    v, tol = result["versions"], result["tolerances"]
    peers = {k: p for k, p in result["peers"].items()}
    f64 = [f"{k} `{f}` {form}: " + (f"max diff {_fmt(r['float64_max_abs_diff'])}"
                                    if isinstance(r["float64_max_abs_diff"], float) else "cannot run in float64")
           for k, p in peers.items() for f, cell in p.get("cells", {}).items() for form, r in cell.items()
           if r.get("status") == "exact" and "float64_max_abs_diff" in r]
    lines = [
        "# The NIR interop matrix: neurosdm's export in the peers' own readers",
        "",
        f"Generated by `scripts/peer_readers.py` (nir {v['nir']}, nirtorch {v['nirtorch']}, torch {v['torch']}, "
        f"neurosdm {v['neurosdm']}; "
        + ", ".join(f"{k} {p['version']}" for k, p in peers.items() if p.get("version")) +
        "); every figure is in `docs/data/peer_readers.json`. Each feature graph is imported with the peer's own "
        "reader as exported (**default**) and as rewritten by `neurosdm.exporters.rewrite.for_peer(graph, peer)` "
        "(**option**: `neurosdm export ... --peer spikingjelly|norse|snntorch`), stepped "
        f"{result['num_steps']} times on the same input (batch {result['batch']}, seed {result['seed']}, the same "
        "input at every step, fresh state) and compared at every step with "
        "`neurosdm.simulators.reference.run_graph` (float64) on the exported graph.",
        "",
        f"**exact**: spikes identical at every step and element, analog outputs within {tol['exact_rtol']:g} x "
        "max(1, max |ref|) (float32 rounding: the peers compute in float32 and a conv output sums hundreds of "
        "products; the exact analog cells were also run in float64 where the peer allows it: "
        + "; ".join(f64 or ["none"])
        + (" (snnTorch's spike function returns `(mem - threshold > 0).float()`, float32 whatever the module's "
           "dtype, so its modules cannot run in float64)" if any(k.startswith("snnTorch") and "cannot" in k
                                                                 for k in f64) else "")
        + f"); **within tolerance**: at most {tol['tolerance_spike_fraction']:.1%} of the spikes differ at any "
        f"step, or analog within {tol['tolerance_rtol']:g} relative; **mismatch**: more; **cannot read**: the "
        "reader raised; **cannot run**: the module it built raised. Brackets: the cause (below), each found by a "
        "measurement, not assumed.",
        "",
        "## The matrix",
        "",
    ]
    names = list(result["features"])
    head = "| feature | " + " | ".join(f"{k} default | {k} option" for k in peers) + " |"
    lines += [head, "|---|" + "---|---|" * len(peers)]
    for f in names:
        row = [f"`{f}`"]
        for k, p in peers.items():
            if "skipped" in p:
                row += ["skipped", "skipped"]
            else:
                row += [_cell(p["cells"][f]["default"]), _cell(p["cells"][f]["option"])]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Features:", ""]
    for f, info in result["features"].items():
        rate = f", reference spike rate {info['reference_spike_rate']:.2f}" if "reference_spike_rate" in info else ""
        lines.append(f"- `{f}`: {info['description']} ({info['nodes']} nodes, {info['edges']} edges; "
                     f"{info['input']} input{rate})")
    for k, p in peers.items():
        if "skipped" in p:
            lines.append(f"- {k}: skipped, {p['skipped']}")
    used = sorted({c for p in peers.values() for cell in p.get("cells", {}).values() for r in cell.values()
                   for c in r.get("causes", [])}, key=list(CAUSES).index)
    lines += ["", "## Causes", ""]
    for c in used:
        label, text = CAUSES[c]
        lines.append(f"- `{c}` ({label}): {text}")
    lines += ["", "Errors (first line):", ""]
    for k, p in peers.items():
        for f, cell in p.get("cells", {}).items():
            for form, r in cell.items():
                if r.get("error"):
                    lines.append(f"- {k}, `{f}`, {form}: `{r['error']}`")
    order = peers.get("Norse", {}).get("edge_order")
    if order:
        lines += ["", "Norse and the order of the edge list (`residual`, junctions as edges, thresholds lowered; the "
                      "reference is the same for every order): "
                  + "; ".join(f"{k.replace('_', ' ')}: {v['status']} ({v['spike_mismatch']:.1%} spikes differ)"
                              for k, v in order.items()) + "."]
    norse = peers.get("Norse", {}).get("cells", {})
    if norse.get("whole", {}).get("option", {}).get("edges_against_execution_order"):
        r = norse["whole"]["option"]
        lines += ["", f"Norse, `whole`, option: {r['edges_against_execution_order_count']} edges run against "
                      "Norse's execution order, e.g. " + ", ".join(f"`{e}`" for e in r["edges_against_execution_order"])
                  + "."]
    lines += [
        "",
        "## The export options (`for_peer`, `neurosdm export ... --peer NAME`)",
        "",
        "Every option first writes the junctions as edges (`inline_junctions(graph, output_junction=\"conv\")`: "
        "each identity Scale junction removed, its consumers fed by its feeders directly, exact since NIR sums the "
        "edges into a node; the junction before the Output becomes an identity 1x1 Conv2d so that the output stays "
        "one tensor). Then:",
        "",
        "- **spikingjelly**: nothing else; call `import_from_nir(graph, dt=metadata['dt'])` (dt 1: with its default "
        "1e-4 it refuses `IF.r = 1`, which must equal 1/dt). It fires on `v >= v_threshold` and resets to `v_reset`, "
        "as neurosdm, and takes LIF with `r = tau/dt` (`decay_input=False`), so no threshold or gain change is "
        "needed.",
        "- **norse** (call `from_nir(graph, dt=metadata['dt'])`; its default dt is 0.001): thresholds lowered for "
        "its `>` (`strict_thresholds`: theta - 1 on the integer grid of an int8 export, exact; in a float graph the "
        "next float32 below theta, which makes `v > theta'` equal `v >= theta` for every float32 membrane, exact in "
        "a float32 reader); `r` moved into the feeding conv (`fold_input_gain`: Norse ignores `r`; exact when r is a "
        "power of two, as the tau 4 of `lif_leak`); the edge list in topological order (`topological_edges`). "
        "Not fixable: the depth-first execution order on forks with a node on two branches (`dfs_order`), and LI.",
        "- **snntorch**: thresholds lowered (as Norse); every IF written as `LIF(tau = 2**40 dt, r = tau/dt, "
        "v_leak 0)` in time unit dt = 1e-4 (`if_as_lif`): snnTorch's LIF branch builds `Leaky(beta = 1 - 1e-4/tau, "
        "reset_mechanism='zero', init_hidden=True)`, and `1 - 2**-40` is exactly 1.0 in float32, so it is a true "
        "integrator with reset to zero whose spikes reach the next node; every LIF/LI tau is scaled to the 1e-4 time "
        "unit so that its per-step decay is unchanged. In neurosdm's float64 reference the rewritten IF is a LIF that "
        "leaks 2**-40 of v per step (below float32 resolution). No export form makes snnTorch's own IF branch an "
        "integrator: `beta=0.9` is a constant in `_nir_to_snntorch_module` (snntorch/import_nir.py). Not fixable: LI.",
        "",
        "What the options cannot fix is the peers' (framework limit): no reader maps `nir.LI`, and Norse's executor "
        "cannot run a fork with a node on two branches in order. Nothing in the matrix is left to neurosdm's side.",
        "",
        "Notes and limits of this survey:",
        "",
        "- A `--peer` file is for that peer's reader. neurosdm's own engines should read the plain export: they "
        "would read the lowered thresholds with `>` as the metadata says, which in float64 can differ from the "
        "original for a membrane strictly between the two float32 neighbours of theta, and the fixed-point "
        "interpreter has no LIF (the snnTorch form).",
        "- The float threshold shift is exact for float32 readers by construction (`tests/test_peer_readers.py` "
        "checks the comparison on the float32 neighbours of theta), but no float feature here has a membrane "
        "exactly on its threshold, so the float rows cannot show it; the int8 row does (its membranes are "
        "integers).",
        "- Not in the suite: TSM exports (their per-step `<conv>.tsm` Scale nodes are not identities: no reader "
        "maps `nir.Scale`, and no static NIR node holds a per-step scale) and the whole int8 graph (its graded "
        "input conv rounds to the integer grid in neurosdm's fixed-point arithmetic, which none of the readers "
        "does); the spike-input int8 layer (`int8_conv_if`) is what they can run exactly.",
        "",
    ]
    return "\n".join(lines)


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float):
        return float(f"{v:.4g}")
    return v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--doc", default=str(ROOT / "docs" / "peer-readers.md"))
    ap.add_argument("--json", default=str(ROOT / "docs" / "data" / "peer_readers.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # before the exports too (survey runs on one thread)
    result = survey(suite(), for_peer, edge_order_forms=edge_orders)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.json) as tmp:
        Path(tmp).write_text(json.dumps(_jsonable(result), indent=1) + "\n")
    with atomic_path(args.doc) as tmp:
        Path(tmp).write_text(markdown(result))
    for name, p in result["peers"].items():
        if "skipped" in p:
            print(f"{name}: skipped ({p['skipped']})")
            continue
        for f, cell in p["cells"].items():
            print(f"{name:12s} {f:13s} default: {_cell(cell['default'])} | option: {_cell(cell['option'])}")
    print(f"wrote {args.doc} and {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
