"""Which peer frameworks' NIR readers can open (and run) neurosdm's float NIR export?

    python scripts/peer_readers.py [GRAPH.nir] [--doc docs/peer-readers.md] [--json docs/data/peer_readers.json]

GRAPH defaults to the export of the shipped checkpoint, made on the fly (``export_checkpoint`` of
``neurosdm/assets/tiny_fashion.pt``, float, into a temporary directory). The file is opened with ``nir.read``; then,
for every peer framework that is installed (spikingjelly, Norse, snnTorch; a missing one is skipped with the
reason), its NIR importer is tried on the whole graph and on a few sub-graphs cut out of it (:func:`variants`).
Whatever imports is run on the same input as :func:`neurosdm.simulators.reference.run_graph` (batch 2, the same
noisy image at each of ``num_steps`` spiking steps, from a fresh state) and the output node is compared at every
step. Needs no network access. Writes a Markdown report and a JSON file with every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import io
import json
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import nir
import numpy as np

import neurosdm
from neurosdm.exporters.nir import meta_value as _meta
from neurosdm.exporters.rewrite import inline_junctions
from neurosdm.simulators.reference import Discretisation, run_graph

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "neurosdm" / "assets" / "tiny_fashion.pt"
SEED = 0
BATCH = 2


def _err(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}".rstrip(": ")


# ------------------------------------------------------------------------------------------------ graph variants


def _out_shape(node) -> np.ndarray:
    return np.asarray(node.output_type["output"])


def chain(graph: nir.NIRGraph, names: list[str], extra: dict | None = None) -> nir.NIRGraph:
    """``input -> names[0] -> ... -> names[-1] -> output``: the read nodes (and ``extra`` new ones), in a chain."""
    nodes = {"input": graph.nodes["input"]}
    for n in names:
        nodes[n] = (extra or {}).get(n, graph.nodes.get(n))
    last = nodes[names[-1]]
    shape = _out_shape(last) if last.output_type else _out_shape(nodes[names[-2]])
    nodes["output"] = nir.Output(output_type={"output": shape})
    seq = ["input", *names, "output"]
    return nir.NIRGraph(nodes=nodes, edges=list(zip(seq[:-1], seq[1:])), metadata=dict(graph.metadata))


def block_subgraph(graph: nir.NIRGraph) -> nir.NIRGraph:
    """Stem and the first ResBlock with its junction bypassed: the residual fan-in lands on ``down0.sum.if``
    (spiking output)."""
    names = ["stem.conv", "stem.conv.if", "stem.conv_identity", "stem.conv_identity.if", "down0.conv1",
             "down0.if2", "down0.conv2", "down0.sum.if"]
    nodes = {"input": graph.nodes["input"], **{n: graph.nodes[n] for n in names}}
    nodes["output"] = nir.Output(output_type={"output": _out_shape(graph.nodes["down0.sum.if"])})
    edges = [("input", "stem.conv"), ("stem.conv", "stem.conv.if"), ("stem.conv.if", "stem.conv_identity"),
             ("stem.conv_identity", "stem.conv_identity.if"), ("stem.conv_identity.if", "down0.conv1"),
             ("down0.conv1", "down0.if2"), ("down0.if2", "down0.conv2"), ("down0.conv2", "down0.sum.if"),
             ("stem.conv_identity", "down0.sum.if"), ("down0.sum.if", "output")]
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata=dict(graph.metadata))


def readout_li(graph: nir.NIRGraph) -> nir.LI:
    """The leaky readout a ``head="spiking"`` export ends in (``neurosdm.exporters.nir``: tau = dt / (1 - d),
    r = 1 / (1 - d), v_leak = 0, d = metadata ``readout_decay``), sized for ``stem.conv_identity``."""
    d = float(_meta(graph.metadata, "readout_decay", 0.8))
    shape = tuple(_out_shape(graph.nodes["stem.conv_identity"]))
    return nir.LI(tau=np.full(shape, 1.0 / (1.0 - d), np.float32), r=np.full(shape, 1.0 / (1.0 - d), np.float32),
                  v_leak=np.zeros(shape, np.float32))


VARIANT_INFO = {
    "whole": "the whole exported graph, as read",
    "whole_no_scale": "inline_junctions(graph, output_junction='none'): every identity Scale junction rewired away "
                      "(edges a->sum->b become a->b; exact), the Output node then has fan-in 3",
    "whole_edges": "inline_junctions(graph) (default output_junction='scale'): as whole_no_scale, but the junction "
                   "in front of the Output stays an identity Scale, so the output is one tensor",
    "whole_edges_conv": "inline_junctions(graph, output_junction='conv'): as whole_edges, the junction in front of "
                        "the Output an identity 1x1 Conv2d (no Scale node left)",
    "stem": "input -> stem.conv -> stem.conv.if -> stem.conv_identity -> output (analog output)",
    "stem_if": "input -> stem.conv -> stem.conv.if -> output (spikes out)",
    "block": "stem + first ResBlock, junction bypassed: conv2 and the stem stream both feed down0.sum.if "
             "(fan-in 2 at an IF; spikes out)",
    "stem_li": "stem + an LI readout as a head='spiking' export writes it (tau = r = 1/(1-readout_decay), "
               "v_leak 0); the shipped checkpoint (head 'sdm') has no LI node",
}


def variants(graph: nir.NIRGraph) -> dict[str, nir.NIRGraph]:
    return {
        "whole": graph,
        "whole_no_scale": inline_junctions(graph, output_junction="none"),
        "whole_edges": inline_junctions(graph),
        "whole_edges_conv": inline_junctions(graph, output_junction="conv"),
        "stem": chain(graph, ["stem.conv", "stem.conv.if", "stem.conv_identity"]),
        "stem_if": chain(graph, ["stem.conv", "stem.conv.if"]),
        "block": block_subgraph(graph),
        "stem_li": chain(graph, ["stem.conv", "stem.conv.if", "stem.conv_identity", "readout"],
                         extra={"readout": readout_li(graph)}),
    }


# ---------------------------------------------------------------------------------------------------- the peers


@dataclass
class Peer:
    name: str
    dist: str  # distribution name, for the version
    module: str  # the module holding the importer
    call: str  # how the importer is called, for the report
    load: Callable[[Any, nir.NIRGraph, dict], Any]  # (imported module, graph, metadata) -> torch module
    reset: Callable[[Any], None] | None = None


def _sj_load(mod, graph, md):
    return mod.import_from_nir(graph, dt=float(_meta(md, "dt", 1.0)))


def _norse_load(mod, graph, md):
    return mod.from_nir(graph)


def _snn_load(mod, graph, md):
    return mod.import_from_nir(graph)


def _snn_reset(model):
    for m in model.modules():  # Leaky(init_hidden=False) keeps its membrane in the module between calls
        if hasattr(m, "reset_mem") and getattr(m, "mem", None) is not None:
            m.reset_mem()


PEERS = [
    Peer("spikingjelly", "spikingjelly", "spikingjelly.activation_based.nir_exchange",
         "spikingjelly.activation_based.nir_exchange.import_from_nir(graph, dt=metadata['dt'])", _sj_load),
    Peer("Norse", "norse", "norse.torch", "norse.torch.from_nir(graph)", _norse_load),
    Peer("snnTorch", "snntorch", "snntorch.import_nir", "snntorch.import_nir.import_from_nir(graph)", _snn_load,
         reset=_snn_reset),
]


def load_peer(peer: Peer):
    """``(module, version, None)`` or ``(None, version or None, reason)`` when the peer cannot be used."""
    try:
        version = importlib.metadata.version(peer.dist)
    except importlib.metadata.PackageNotFoundError:
        return None, None, f"not installed (pip distribution {peer.dist!r} not found)"
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(peer.module), version, None
    except Exception as e:  # noqa: BLE001 - any import failure is a finding
        return None, version, f"{peer.module} cannot be imported: {_err(e)}"


# ------------------------------------------------------------------------------------------------------ running


def make_input(graph: nir.NIRGraph, seed: int = SEED, batch: int = BATCH) -> np.ndarray:
    """``[batch, C, H, W]`` float32: Fashion-MNIST test images in [-1, 1] (the bundled asset), times 0.8, plus
    0.6 standard Gaussian noise from ``seed``; plain Gaussian noise if the image shape is not (1, 28, 28)."""
    shape = tuple(int(s) for s in np.asarray(graph.nodes["input"].input_type["input"]))
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((batch, *shape))
    asset = Path(neurosdm.__file__).parent / "assets" / "fashion_mnist_mini.npz"
    if shape == (1, 28, 28) and asset.exists():
        with np.load(asset) as d:
            x0 = d["test_images"][:batch].astype(np.float64)[:, None] / 127.5 - 1.0
        return (0.8 * x0 + 0.6 * noise).astype(np.float32)
    return noise.astype(np.float32)


def run_peer(model, x: np.ndarray, num_steps: int, reset=None) -> tuple[list[np.ndarray], dict]:
    """Step an imported module ``num_steps`` times on ``x`` from a fresh state. Returns the per-step outputs (the
    sum of them where the module returns several tensors for one Output node) and notes on the output's form."""
    import torch

    if reset is not None:
        reset(model)
    xt = torch.from_numpy(x)
    param = next(iter(model.parameters()), None)
    if param is not None:
        xt = xt.to(param.dtype)
    state, outs, notes = None, [], {}
    with torch.no_grad():
        for _ in range(num_steps):
            res = model(xt, state)
            if isinstance(res, tuple) and len(res) >= 2:
                parts, state = list(res[:-1]), res[-1]
            else:
                parts = [res]
            if len(parts) > 1:
                notes["unsummed_outputs"] = len(parts)
            vals = []
            for p in parts:
                if isinstance(p, tuple):  # snnTorch Leaky(init_hidden=False): (spk, mem)
                    notes["output_is_tuple"] = len(p)
                    p = p[0]
                vals.append(p.detach().double().numpy())
            outs.append(np.sum(vals, axis=0))
    return outs, notes


def compare(outs: list[np.ndarray], ref: np.ndarray) -> dict:
    diffs = [float(np.abs(o - r).max()) for o, r in zip(outs, ref)]
    res = {"max_abs_diff_per_step": diffs, "max_abs_diff": max(diffs)}
    if np.isin(ref, (0.0, 1.0)).all():  # spikes: also the fraction that differ
        res["spike_mismatch_per_step"] = [float((o != r).mean()) for o, r in zip(outs, ref)]
    return res


def try_variant(peer: Peer, mod, graph: nir.NIRGraph, md: dict, x: np.ndarray, num_steps: int,
                ref: np.ndarray) -> tuple[dict, Any]:
    entry: dict[str, Any] = {}
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peer.load(mod, graph, md)
        entry["reads"] = True
    except Exception as e:  # noqa: BLE001
        return {"reads": False, "runs": None, "error": _err(e)}, None
    try:
        outs, notes = run_peer(model, x, num_steps, peer.reset)
    except Exception as e:  # noqa: BLE001
        entry.update(runs=False, error=_err(e))
        return entry, model
    entry["runs"] = True
    entry.update(notes)
    if outs[0].shape != ref.shape[1:]:
        entry.update(runs=False, error=f"output shape {outs[0].shape}, expected {ref.shape[1:]}")
        return entry, model
    entry.update(compare(outs, ref))
    return entry, model


def _torch_threads():
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        pass


def diagnostics(peer: Peer, mod, vs: dict[str, nir.NIRGraph], md: dict, x: np.ndarray, num_steps: int,
                models: dict) -> dict:
    """Checks that pin down why a peer differs (each value is measured, not assumed)."""
    out: dict[str, Any] = {}
    if peer.name == "spikingjelly":
        try:  # the default dt (1e-4 s) against r = 1
            mod.import_from_nir(vs["stem_if"])
            out["default_dt_import"] = "ok"
        except Exception as e:  # noqa: BLE001
            out["default_dt_import"] = _err(e)
        try:  # the Scale-free whole graph in float64: are the float32 differences only rounding?
            import torch

            m64 = mod.import_from_nir(vs["whole_no_scale"], dt=float(_meta(md, "dt", 1.0)), dtype=torch.float64)
            ref = run_graph(vs["whole_no_scale"], x[None].astype(np.float64), num_steps=num_steps)["outputs"]["output"]
            outs, _ = run_peer(m64, x.astype(np.float64), num_steps)
            out["whole_no_scale_float64_max_abs_diff"] = compare(outs, ref)["max_abs_diff"]
        except Exception as e:  # noqa: BLE001
            out["whole_no_scale_float64_max_abs_diff"] = _err(e)
        try:  # the recommended form for peers: one output tensor
            import torch

            g = vs["whole_edges_conv"]
            m64 = mod.import_from_nir(g, dt=float(_meta(md, "dt", 1.0)), dtype=torch.float64)
            ref = run_graph(g, x[None].astype(np.float64), num_steps=num_steps)["outputs"]["output"]
            outs, notes = run_peer(m64, x.astype(np.float64), num_steps)
            out["whole_edges_conv_float64_max_abs_diff"] = compare(outs, ref)["max_abs_diff"]
            out["whole_edges_conv_output_tensors"] = int(notes.get("unsummed_outputs", 1))
        except Exception as e:  # noqa: BLE001
            out["whole_edges_conv_float64_max_abs_diff"] = _err(e)
    if peer.name == "snnTorch" and models.get("stem_if") is not None:
        ifn = vs["stem_if"].nodes["stem.conv.if"]
        # what snnTorch builds for nir.IF: Leaky(beta=0.9, reset 'subtract') = LIF with dt/tau = 0.1, r dt/tau = 1
        beta = np.unique([float(m.beta) for m in models["stem_if"].modules() if hasattr(m, "beta")])
        mech = sorted({m.reset_mechanism for m in models["stem_if"].modules() if hasattr(m, "reset_mechanism")})
        out["if_maps_to"] = {"beta": beta.tolist(), "reset_mechanism": mech}
        tau = 1.0 / (1.0 - float(beta[0]))
        lif = nir.LIF(tau=np.full_like(ifn.r, tau), r=np.full_like(ifn.r, tau), v_leak=np.zeros_like(ifn.r),
                      v_threshold=ifn.v_threshold, v_reset=ifn.v_reset)
        g_lif = nir.NIRGraph(nodes={**vs["stem_if"].nodes, "stem.conv.if": lif}, edges=vs["stem_if"].edges)
        ref_lif = run_graph(g_lif, x[None], num_steps=num_steps,
                            disc=Discretisation(reset="subtract", comparison=">"))["outputs"]["output"]
        outs, _ = run_peer(models["stem_if"], x, num_steps, peer.reset)
        out["stem_if_vs_LIF_beta_subtract"] = compare(outs, ref_lif)["max_abs_diff"]
        again, _ = run_peer(models["stem_if"], x, num_steps, reset=None)  # no reset between two calls
        out["state_persists_without_reset"] = bool(any((a != b).any() for a, b in zip(outs, again)))
    if peer.name == "Norse":
        def order_of(model):
            return [n.name for n in getattr(model, "execution_order", [])]

        def against(model, graph):  # edges whose destination runs before their source
            pos = {n: i for i, n in enumerate(order_of(model))}
            edges = [(a.replace(".", "_"), b.replace(".", "_")) for a, b in graph.edges]
            return [f"{a} -> {b}" for a, b in edges if a in pos and b in pos and pos[a] > pos[b]]

        if models.get("block") is not None:
            out["block_execution_order"] = order_of(models["block"])
            out["block_edges_against_order"] = against(models["block"], vs["block"])
            # the same graph with its edge list reordered (NIR edges are a set): the skip edge first
            skip = ("stem.conv_identity", "down0.sum.if")
            g2 = nir.NIRGraph(nodes=vs["block"].nodes, edges=[skip] + [e for e in vs["block"].edges if e != skip],
                              metadata=dict(vs["block"].metadata))
            ref2 = run_graph(g2, x[None].astype(np.float64), num_steps=num_steps)["outputs"]["output"]
            entry, m2 = try_variant(peer, mod, g2, md, x, num_steps, ref2)
            info = {"max_abs_diff": entry.get("max_abs_diff"), "error": entry.get("error"),
                    "execution_order": order_of(m2) if m2 is not None else None}
            if entry.get("runs") and info["execution_order"]:  # is the result the last node it ran?
                last = next(k for k in g2.nodes if k.replace(".", "_") == info["execution_order"][-1])
                rec = run_graph(g2, x[None].astype(np.float64), num_steps=num_steps, record=True)["records"][last]
                outs, _ = run_peer(m2, x, num_steps, peer.reset)
                info[f"max_abs_diff_vs_{last}"] = compare(outs, rec)["max_abs_diff"]
            out["block_skip_edge_listed_first"] = info
        if models.get("whole_no_scale") is not None:
            bad = against(models["whole_no_scale"], vs["whole_no_scale"])
            out["whole_no_scale_edges_against_order"] = f"{len(bad)} of {len(vs['whole_no_scale'].edges)}, e.g. " \
                                                         + ", ".join(bad[:4])
        if models.get("stem_li") is not None:  # is the LI simply dropped?
            ref_stem = run_graph(vs["stem"], x[None].astype(np.float64), num_steps=num_steps)["outputs"]["output"]
            outs, _ = run_peer(models["stem_li"], x, num_steps, peer.reset)
            out["stem_li_vs_stem_without_LI"] = compare(outs, ref_stem)["max_abs_diff"]
            out["stem_li_execution_order"] = order_of(models["stem_li"])
    return out


def survey(graph: nir.NIRGraph, num_steps: int | None = None, peers: list[Peer] | None = None) -> dict:
    """Every peer against every variant of ``graph``. Returns the JSON-able result."""
    _torch_threads()
    md = dict(graph.metadata or {})
    num_steps = int(num_steps or _meta(md, "num_steps", 4))
    vs = variants(graph)
    x = make_input(graph)
    refs = {k: run_graph(g, x[None].astype(np.float64), num_steps=num_steps)["outputs"]["output"]
            for k, g in vs.items()}
    result: dict[str, Any] = {
        "graph": {"nodes": len(graph.nodes), "edges": len(graph.edges),
                  "node_types": sorted({type(n).__name__ for n in graph.nodes.values()}),
                  "metadata": {k: _meta(md, k) for k in ("format", "head", "dt", "reset", "comparison",
                                                          "discretisation", "num_steps", "diffusion_step")
                               if k in md}},
        "input": f"batch {BATCH}, {tuple(x.shape[1:])}, float32, seed {SEED}; the same image at each of "
                 f"{num_steps} steps",
        "num_steps": num_steps,
        "variants": VARIANT_INFO,
        "variant_sizes": {k: {"nodes": len(g.nodes), "edges": len(g.edges)} for k, g in vs.items()},
        "output_junction_conv_params": sum(  # the identity Conv2d that replaced the Output's junction
            int(np.asarray(n.weight).size + np.asarray(n.bias).size) for k, n in vs["whole_edges_conv"].nodes.items()
            if isinstance(n, nir.Conv2d) and not isinstance(graph.nodes[k], nir.Conv2d)),
        "reference_spike_rate": {k: float(r.mean()) for k, r in refs.items() if np.isin(r, (0.0, 1.0)).all()},
        "versions": {"nir": importlib.metadata.version("nir"), "neurosdm": neurosdm.__version__,
                     "nirtorch": _version("nirtorch"), "torch": _version("torch"), "python": sys.version.split()[0]},
        "peers": {},
    }
    for peer in peers or PEERS:
        mod, version, reason = load_peer(peer)
        entry: dict[str, Any] = {"version": version, "importer": peer.call}
        if mod is None:
            entry["skipped"] = reason
            result["peers"][peer.name] = entry
            continue
        models = {}
        entry["results"] = {}
        for k, g in vs.items():
            entry["results"][k], models[k] = try_variant(peer, mod, g, md, x, num_steps, refs[k])
        entry["diagnostics"] = diagnostics(peer, mod, vs, md, x, num_steps, models)
        result["peers"][peer.name] = entry
    return result


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------------------ reports


REASONS = {
    "spikingjelly": [
        "Its importer (`nirtorch.nir_to_torch` with spikingjelly's node map: Affine, Linear, Conv1d/2d, AvgPool2d, "
        "Flatten, IF, LIF, CubaLIF) has no mapping for `nir.Scale`, so the whole graph fails on the first identity "
        "junction (`<blk>.sum`). It has no mapping for `nir.LI` either (the readout of a head='spiking' export).",
        "It ignores the graph metadata and takes the step from its own `dt` argument (default 1e-4 s): with the "
        "default it refuses neurosdm's IF nodes (`r = 1` must equal `1 / dt`); with `dt = metadata['dt'] = 1` it "
        "imports them as `IFNode(v_threshold, v_reset)`: hard reset, fire on `v >= v_threshold`, the same rule as "
        "neurosdm, so spikes match exactly (neuron parameters must be uniform per node, which they are).",
        "Fan-in into a neuron or conv is summed correctly (the `block` sub-graph and the Scale-free whole graph "
        "match), but an Output node with several incoming edges is not summed: the module returns one tensor per "
        "edge (the `whole_no_scale` figures are for their sum). With the junction in front of the Output kept as "
        "an identity 1x1 Conv2d (`whole_edges_conv`) it returns one tensor; kept as a Scale (`whole_edges`, the "
        "default of `inline_junctions`) the import fails on that one Scale.",
        "It computes in float32 by default; the float32 differences are rounding of the analog streams (with "
        "`dtype=torch.float64` the Scale-free whole graph agrees to the figure in the diagnostics below).",
    ],
    "Norse": [
        "`norse.torch.from_nir` still uses the deprecated `nirtorch.load` (GraphExecutor). Its node map returns "
        "nothing for `nir.Scale` (and for `nir.LI`), such nodes are dropped, and the graph then fails with "
        "`KeyError` on the first edge that names a dropped node (`down0_sum`).",
        "`nir.IF` becomes `IAFCell(v_th)`: `v <- v + x`, fire on `v - v_th > 0` (strictly greater; neurosdm "
        "writes `>=`; no membrane sat exactly on the threshold on this input), reset to 0; `r` and `dt` are not "
        "used. Chains of Conv2d and IF (the stem) match.",
        "The GraphExecutor runs the nodes in depth-first pre-order from the Input, following the edge list's "
        "order, which is not a topological order when a stream forks and joins again (residual connections): a "
        "node can run before one of its inputs, which then arrives from the previous step (nothing at step 0), and "
        "the module returns the value of the last node it ran, which need not be the Output. Whether a graph "
        "comes out right therefore depends on the order of the edge list (NIR edges are a set): the `block` "
        "sub-graph matches as exported, the same graph with the skip edge listed first runs `down0.sum.if` and the Output before `down0.conv2` and "
        "returns `down0.conv2`'s value, and the "
        "Scale-free whole graphs (`whole_no_scale`, `whole_edges_conv`; also `whole_edges`, whose one Scale, "
        "in front of the Output, is dropped without a `KeyError`) run but compute something else (diagnostics "
        "below).",
        "An `nir.LI` node is dropped without an error: the `stem_li` module returns the value of "
        "`stem.conv_identity` (it matches the `stem` reference, not the LI readout).",
    ],
    "snnTorch": [
        "Its importer (`nirtorch.nir_to_torch` with snnTorch's map: Affine, Linear, Conv2d, Flatten, AvgPool2d, IF, "
        "LIF, CubaLIF) has no mapping for `nir.Scale` (nor `nir.LI`): the whole graph fails on the first junction.",
        "`nir.IF` becomes `snn.Leaky(beta=0.9, threshold=v_threshold, init_hidden=False)` with the default "
        "`reset_mechanism='subtract'` (fire on `mem - threshold > 0`): a leaky neuron with reset by subtraction, not the integrator neurosdm "
        "writes (the diagnostics show its spikes equal a LIF with dt/tau = 0.1, r = tau, subtract reset, `>`).",
        "With `init_hidden=False` the Leaky returns `(spk, mem)` and takes no `state` argument, so nirtorch treats "
        "it as stateless and hands the tuple to the next node: any IF followed by another node fails at run time "
        "(`conv2d() received an invalid combination of arguments - got (tuple, ...)`). Only a graph where an IF "
        "feeds the Output directly runs; its membrane then lives inside the module across calls (reset it with "
        "`reset_mem()` before each sample).",
    ],
}


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    return f"{v:.1e}" if v < 0.01 else f"{v:.3g}"


def _round(v):
    if isinstance(v, float):
        return float(f"{v:.3g}")
    if isinstance(v, dict):
        return {k: _round(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_round(x) for x in v]
    return v


def _cell(r: dict) -> str:
    if not r.get("reads"):
        return "no"
    if not r.get("runs"):
        return "reads; run fails"
    diff = _fmt(r.get("max_abs_diff"))
    extra = ""
    if "spike_mismatch_per_step" in r:
        extra = f", {max(r['spike_mismatch_per_step']):.1%} spikes differ"
    if r.get("unsummed_outputs"):
        extra += f"; {r['unsummed_outputs']} unsummed outputs"
    return f"runs, diff {diff}{extra}"


def markdown(result: dict, source: str) -> str:
    v = result["versions"]
    sizes = result["variant_sizes"]
    conv_params = result["output_junction_conv_params"]
    lines = [
        "# Peer NIR readers on neurosdm's float export",
        "",
        f"Generated by `scripts/peer_readers.py` from `{source}` ({result['graph']['nodes']} nodes, "
        f"{result['graph']['edges']} edges; node types {', '.join(result['graph']['node_types'])}). "
        f"nir {v['nir']}, nirtorch {v['nirtorch']}, torch {v['torch']}, neurosdm {v['neurosdm']}; "
        "all figures are in `docs/data/peer_readers.json`.",
        "",
        f"Input: {result['input']}; each imported module is stepped from a fresh state and its output compared "
        "with `neurosdm.simulators.reference.run_graph` on the same graph (max abs difference of the output node "
        "over the steps; for spiking outputs also the largest fraction of spikes that differ at one step).",
        "",
        "Graphs tried:",
        "",
    ]
    for k, text in result["variants"].items():
        lines.append(f"- `{k}`: {text}")
    names = list(result["variants"])
    lines += ["", "| framework | " + " | ".join(f"`{k}`" for k in names) + " |",
              "|---|" + "---|" * len(names)]
    for name, p in result["peers"].items():
        label = f"{name} {p['version'] or ''}".strip()
        if "skipped" in p:
            lines.append(f"| {label} | " + " | ".join(["skipped"] * len(names)) + " |")
        else:
            lines.append(f"| {label} | " + " | ".join(_cell(p["results"][k]) for k in names) + " |")
    lines += ["", "\"no\": the importer raised; \"reads; run fails\": it returned a module that raised when run. "
              "Errors (first line):", ""]
    for name, p in result["peers"].items():
        if "skipped" in p:
            lines.append(f"- {name}: skipped, {p['skipped']}")
            continue
        for k in names:
            if p["results"][k].get("error"):
                lines.append(f"- {name}, `{k}`: `{p['results'][k]['error']}`")
    lines += ["", "## Why", ""]
    for name, p in result["peers"].items():
        lines.append(f"### {name} {p['version'] or ''} (`{p['importer']}`)")
        lines.append("")
        if "skipped" in p:
            lines += [f"Skipped: {p['skipped']}.", ""]
            continue
        lines += [f"- {t}" for t in REASONS.get(name, [])]
        diag = p.get("diagnostics") or {}
        if diag:
            lines += ["", "Measured:", ""]
            for k, val in diag.items():
                val = _round(val)
                if isinstance(val, list) and len(val) > 8:
                    val = ", ".join(map(str, val))
                lines.append(f"- `{k}`: {val}")
        lines.append("")
    lines += [
        "## What this means for neurosdm's export",
        "",
        "- None of the three readers opens the whole export: all fail on `nir.Scale`, the identity summing "
        "junction of the residual stream (a Scale node with fan-in). Rewiring the junctions away is exact in NIR "
        "(edges into a node are summed) and lets spikingjelly run the whole network to float32 rounding, except "
        "that its Output node must then have a single incoming edge (it returns the incoming tensors unsummed).",
        "- The graph metadata (dt, reset, comparison, bias tables) is read by none of them; neurosdm's choice "
        "`dt = 1`, `r = 1`, reset to 0 is what spikingjelly (given `dt = 1`) and Norse assume for IF. "
        "snnTorch's IF import is a leaky neuron with subtractive reset and cannot reproduce the export.",
        "- `nir.LI` (the readout of head='spiking' exports) is mapped by none of the three.",
        "",
        "**Recommendation for peers.** Export with the junctions as edges: "
        "`neurosdm.exporters.rewrite.inline_junctions(graph, output_junction=\"conv\")` (the CLI flag "
        "`neurosdm export ... --junctions edges`). It removes every identity Scale junction exactly (each edge "
        "`J -> C` becomes `f -> C` for every feeder `f` of J; TSM Scale nodes named in `scale_tables` stay) and "
        "keeps one junction in front of the Output so that the output stays one tensor; `output_junction=\"conv\"` "
        "makes that junction an identity 1x1 Conv2d (no Scale left: spikingjelly reads and runs the whole graph, "
        f"`whole_edges_conv`), the default `\"scale\"` keeps the exported Scale. The cost is edges: "
        f"{sizes['whole']['edges']} edges become {sizes['whole_edges_conv']['edges']} "
        f"({sizes['whole']['nodes']} nodes become {sizes['whole_edges_conv']['nodes']}); no array is copied, the "
        f"Output's identity conv adds {conv_params} weights and biases. It does not help Norse (edge-order "
        "execution) or snnTorch (IF import), and no reader maps `nir.LI`.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("graph", nargs="?", help="a .nir file (default: export the shipped checkpoint)")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "peer-readers.md"))
    ap.add_argument("--json", default=str(ROOT / "docs" / "data" / "peer_readers.json"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.graph:
            path, source = Path(args.graph), args.graph
        else:
            from neurosdm.exporters.nir import export_checkpoint
            path = Path(tmp) / "tiny_fashion.nir"
            export_checkpoint(CKPT, path)
            source = "neurosdm export neurosdm/assets/tiny_fashion.pt --to nir (float)"
        graph = nir.read(path)
    result = survey(graph)
    result["source"] = source
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    Path(args.doc).write_text(markdown(result, source))
    for name, p in result["peers"].items():
        if "skipped" in p:
            print(f"{name}: skipped ({p['skipped']})")
        else:
            print(f"{name} {p['version']}: " + "; ".join(f"{k}: {_cell(r)}" for k, r in p["results"].items()))
    print(f"wrote {args.doc} and {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
