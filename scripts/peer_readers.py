"""The NIR interop matrix: neurosdm's exported graph features x the peer frameworks' own NIR readers.

    python scripts/peer_readers.py [--doc docs/peer-readers.md] [--json docs/data/peer_readers.json]

The suite (:func:`suite`) is a set of small graphs, one per feature neurosdm writes, cut from exports of tiny
SpikingUNets built in-process (image 8x8, ch 4, ch_mult (1, 2), 4 spiking steps, random BatchNorm statistics and
biases from a fixed seed, so that folding is exercised and the neurons neither stay silent nor all fire), plus one
graph neurosdm's UNet does not write (a LIF with leak, made with ``nir`` directly in neurosdm's conventions, dt 1).

For every installed peer (spikingjelly, Norse, snnTorch; a missing one is reported with the reason) and every
feature, the graph is imported through the peer's own reader twice: as exported ("default") and as rewritten for
that peer by :func:`neurosdm.exporters.rewrite.for_peer` (``neurosdm export ... --peer NAME``, "option"). Each
imported module is stepped on the same input as :func:`neurosdm.simulators.reference.run_graph` (float64, the
exported graph) and its output compared at every step. Each cell is classified (:func:`classify`) and every
cell that is not exact gets its cause, found by a measurement (:func:`diagnose`), labelled "framework limit" or
"neurosdm". Writes a Markdown report and a JSON file with every figure. Needs no network access; about 10 s.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.metadata
import io
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import nir
import numpy as np

import neurosdm
from neurosdm.exporters.nir import meta_value as _meta
from neurosdm.exporters.rewrite import for_peer
from neurosdm.simulators.reference import Discretisation, run_graph

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "neurosdm" / "assets" / "tiny_fashion.pt"
SEED = 0
BATCH = 8
NUM_STEPS = 4
# "exact": spikes identical at every step and element, and analog outputs within EXACT_RTOL * max(1, max |ref|).
# Peers compute in float32 (2**-24 = 6e-8 relative rounding per operation) while the reference is float64; a conv
# output sums hundreds of products (32 * 9 in the tiny graphs, more in the shipped one), so the float32 sum can be
# off by some hundred ulps of its largest terms. 1e-5 (about 170 float32 ulps at the output's scale) allows that;
# what is measured is ~1e-6, and where the peer runs in float64 the same module agrees to ~1e-15
# ("float64_max_abs_diff" in the JSON): the float32 figure is rounding, not a different rule.
EXACT_RTOL = 1e-5
# "within tolerance": at most 0.5% of the output spikes differ at any step (float32 rounding flipping a membrane
# that sits within rounding of its threshold) or analog outputs within 1e-3 relative.
TOL_SPIKES = 0.005
TOL_RTOL = 1e-3


def _err(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}".rstrip(": ")


def _shape(node, key="output") -> tuple[int, ...]:
    types = node.output_type if key == "output" else node.input_type
    return tuple(int(s) for s in np.asarray(next(iter(types.values()))))


# ------------------------------------------------------------------------------------------------------ the suite


def tiny_unet_export(head: str, seed: int = SEED, quantize: bool = False) -> nir.NIRGraph:
    """``to_nir_graph`` of a tiny SpikingUNet (8x8, ch 4, ch_mult (1, 2): one up level, so the polyphase
    up-sampling form and split skip convs; ``head``: "sdm" or "spiking" (LI readout)) with random BatchNorm
    statistics and biases from ``seed``; float32, or int8 fixed point (calibrated on 8 random images)."""
    import torch

    from neurosdm.config import DiffusionConfig, ModelConfig
    from neurosdm.exporters.nir import to_nir_graph
    from neurosdm.models import SpikingUNet

    torch.manual_seed(seed)
    cfg = ModelConfig(img_ch=1, image_size=8, ch=4, ch_mult=(1, 2), num_res_blocks=1, num_steps=NUM_STEPS,
                      num_diffusion_steps=50, head=head, threshold_scale=0.97)
    model = SpikingUNet(cfg)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.3, 0.3)
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)) and mod.bias is not None:
                mod.bias.uniform_(-0.3, 0.3)
        model.tail_conv.weight.normal_(0.0, 0.3)
    graph, md = to_nir_graph(model.eval(), dtype=np.float64 if quantize else np.float32)
    if quantize:
        from neurosdm.exporters.fixed_point import calibrate, calibration_inputs, quantize_graph

        images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        cal = calibrate(graph, md, calibration_inputs(images, DiffusionConfig(num_diffusion_steps=50), steps=2))
        graph, md = quantize_graph(graph, md, cal)
        graph = nir.NIRGraph(nodes=graph.nodes, edges=graph.edges, metadata=md)
    return graph


def shipped_export() -> nir.NIRGraph:
    """``export_checkpoint`` of the shipped checkpoint (float32), written to a temporary file and read back."""
    import tempfile

    from neurosdm.exporters.nir import export_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        return nir.read(export_checkpoint(CKPT, Path(tmp) / "tiny_fashion.nir"))


def cut(graph: nir.NIRGraph, edges: list[tuple[str, str]], input_shape=None) -> nir.NIRGraph:
    """A sub-graph: the nodes named in ``edges`` (read from ``graph``; "input" and "output" are new Input/Output
    nodes, the Input of ``input_shape`` or the exported one, the Output of its feeder's shape)."""
    names = [n for e in edges for n in e if n not in ("input", "output")]
    nodes = {"input": nir.Input(input_type={"input": np.array(input_shape)}) if input_shape is not None
             else graph.nodes["input"]}
    for n in dict.fromkeys(names):
        nodes[n] = graph.nodes[n]
    last = next(a for a, b in edges if b == "output")
    nodes["output"] = nir.Output(output_type={"output": np.array(_shape(graph.nodes[last]))})
    md = {k: v for k, v in graph.metadata.items() if k not in ("bias_tables", "scale_tables", "node_packing")}
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata=md)


def lif_graph(tau: float = 4.0, seed: int = SEED) -> nir.NIRGraph:
    """input (1, 8, 8) -> conv 3x3 (4) -> LIF -> conv 3x3 (4) -> LIF -> output, in neurosdm's conventions: dt 1,
    tau in steps (tau 4: decay 1 - dt/tau = 0.75), r = tau (input gain r dt / tau = 1, ``h = decay v + x``, as
    neurosdm.neurons), v_leak 0, v_reset 0, threshold 1, fire on ``v >= theta``, reset to 0."""
    rng = np.random.default_rng(seed)
    nodes = {"input": nir.Input(input_type={"input": np.array([1, 8, 8])})}
    c_in = 1
    for i in (1, 2):
        w = rng.normal(0.0, 1.2 / np.sqrt(9 * c_in), (4, c_in, 3, 3)).astype(np.float32)
        nodes[f"conv{i}"] = nir.Conv2d(input_shape=(8, 8), weight=w, stride=1, padding=1, dilation=1, groups=1,
                                       bias=rng.uniform(-0.1, 0.3, 4).astype(np.float32))
        full = np.ones((4, 8, 8), np.float32)
        nodes[f"lif{i}"] = nir.LIF(tau=tau * full, r=tau * full, v_leak=0 * full, v_threshold=full, v_reset=0 * full)
        c_in = 4
    nodes["output"] = nir.Output(output_type={"output": np.array([4, 8, 8])})
    edges = [("input", "conv1"), ("conv1", "lif1"), ("lif1", "conv2"), ("conv2", "lif2"), ("lif2", "output")]
    md = {"format": "neurosdm conventions, made with nir", "dt": 1.0, "reset": "zero", "comparison": ">=",
          "discretisation": "euler", "num_steps": NUM_STEPS}
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata=md)


FEATURES = {
    "conv_if": "conv + IF stack: input -> stem.conv -> IF -> stem.conv_identity -> IF -> output (spikes out)",
    "residual": "residual fan-in: stem + the first ResBlock as exported: conv2 and the identity skip meet at the "
                "Scale junction down0.sum, then down0.sum.if (spikes out)",
    "split_skip": "split skip: the two convs of a concatenation (up0.conv1, up0.conv1_skip) summed at up0.if2; "
                  "here both read the same spike input",
    "upsample": "up-sampling form: up2.conv (the polyphase form of nearest x2 + 3x3 conv: 4 sub-pixel phases "
                "as output channels) -> IF, spike input",
    "lif_leak": "LIF with leak: conv -> LIF (tau 4, r 4, v_leak 0) -> conv -> LIF, made with nir in neurosdm's "
                "conventions (dt 1)",
    "li_readout": "LI readout of a head='spiking' export: tail.conv -> tail.readout (LI, tau = r = 1/(1-0.8)) "
                  "-> output (analog), spike input",
    "whole": "the whole denoiser (head 'sdm', with its Scale junctions; analog output)",
    "whole_shipped": "the whole shipped checkpoint's export (neurosdm/assets/tiny_fashion.pt, head 'sdm', 28x28; "
                     "trained weights), on noised Fashion-MNIST test images",
    "int8_conv_if": "int8 export (fixed point: integer weights, biases and thresholds): mid0.conv1 -> mid0.if2, "
                    "sparse spike input, batch 64 (the membrane is an integer, so it can equal the threshold)",
}


def suite(shipped: bool = True) -> dict[str, tuple[nir.NIRGraph, str]]:
    """``{feature: (graph, input kind)}`` (input kinds: :func:`make_input`); ``shipped``: include the whole
    shipped checkpoint's export (the slowest row) when the checkpoint is in this checkout."""
    sdm, spk, q = tiny_unet_export("sdm"), tiny_unet_export("spiking"), tiny_unet_export("sdm", quantize=True)
    mid = _shape(sdm.nodes["mid1.sum.if"])
    res_edges = [("input", "stem.conv"), ("stem.conv", "stem.conv.if"), ("stem.conv.if", "stem.conv_identity"),
                 ("stem.conv_identity", "stem.conv_identity.if"), ("stem.conv_identity.if", "down0.conv1"),
                 ("down0.conv1", "down0.if2"), ("down0.if2", "down0.conv2"), ("down0.conv2", "down0.sum"),
                 ("stem.conv_identity", "down0.sum"), ("down0.sum", "down0.sum.if"), ("down0.sum.if", "output")]
    return {
        "conv_if": (cut(sdm, [("input", "stem.conv"), ("stem.conv", "stem.conv.if"),
                              ("stem.conv.if", "stem.conv_identity"), ("stem.conv_identity", "stem.conv_identity.if"),
                              ("stem.conv_identity.if", "output")]), "image"),
        "residual": (cut(sdm, res_edges), "image"),
        "split_skip": (cut(sdm, [("input", "up0.conv1"), ("input", "up0.conv1_skip"), ("up0.conv1", "up0.if2"),
                                 ("up0.conv1_skip", "up0.if2"), ("up0.if2", "output")], mid), "spikes"),
        "upsample": (cut(sdm, [("input", "up2.conv"), ("up2.conv", "up2.conv.if"), ("up2.conv.if", "output")],
                         _shape(sdm.nodes["up1.sum.if"])), "spikes"),
        "lif_leak": (lif_graph(), "image"),
        "li_readout": (cut(spk, [("input", "tail.conv"), ("tail.conv", "tail.readout"), ("tail.readout", "output")],
                           _shape(spk.nodes["up4.sum.if"])), "spikes"),
        "whole": (sdm, "image"),
        **({"whole_shipped": (shipped_export(), "fashion")} if shipped and CKPT.exists() else {}),
        "int8_conv_if": (cut(q, [("input", "mid0.conv1"), ("mid0.conv1", "mid0.if2"), ("mid0.if2", "output")],
                             _shape(q.nodes["down2.sum.if"])), "sparse_spikes"),
    }


def make_input(graph: nir.NIRGraph, kind: str, seed: int = SEED) -> np.ndarray:
    """``[batch, *input shape]`` float32, the same at every step, from ``seed``: "image": standard Gaussian noise,
    batch ``BATCH``; "spikes": 0/1 with probability 0.3, batch ``BATCH``; "sparse_spikes": 0/1 with probability
    0.1, batch 64 (enough neuron-steps for a few integer membranes to land exactly on the threshold); "fashion":
    the first ``BATCH`` bundled Fashion-MNIST test images in [-1, 1], times 0.8, plus 0.6 standard Gaussian noise."""
    shape = _shape(graph.nodes["input"], "input")
    rng = np.random.default_rng(seed)
    if kind == "spikes":
        return (rng.random((BATCH, *shape)) < 0.3).astype(np.float32)
    if kind == "sparse_spikes":
        return (rng.random((64, *shape)) < 0.1).astype(np.float32)
    if kind == "fashion":  # the bundled Fashion-MNIST test images in [-1, 1], times 0.8, plus 0.6 N(0, 1)
        with np.load(Path(neurosdm.__file__).parent / "assets" / "fashion_mnist_mini.npz") as d:
            x0 = d["test_images"][:BATCH].astype(np.float64)[:, None] / 127.5 - 1.0
        return (0.8 * x0 + 0.6 * rng.standard_normal((BATCH, *shape))).astype(np.float32)
    return rng.standard_normal((BATCH, *shape)).astype(np.float32)


def reference(graph: nir.NIRGraph, x: np.ndarray, **kw) -> np.ndarray:
    """``run_graph`` (discretisation from the graph's metadata; float64, or the fixed-point arithmetic of an int8
    export), ``[num_steps, batch, ...]``. Keyword arguments go to ``run_graph``."""
    return run_graph(graph, x[None].astype(np.float64), num_steps=NUM_STEPS, **kw)["outputs"]["output"]


# ---------------------------------------------------------------------------------------------------- the peers


@dataclass
class Peer:
    name: str
    key: str  # for_peer's name
    dist: str  # distribution name, for the version
    module: str  # the module holding the importer
    call: str  # how the importer is called, for the report
    load: Callable[[Any, nir.NIRGraph, float], Any]  # (imported module, graph, dt) -> torch module
    reset: Callable[[Any], None] | None = None


def _sj_load(mod, graph, dt):
    return mod.import_from_nir(graph, dt=dt)


def _norse_load(mod, graph, dt):
    return mod.from_nir(graph, dt=dt)


def _snn_load(mod, graph, dt):
    return mod.import_from_nir(copy.deepcopy(graph))  # its RNN search rewrites graph.edges in place


def _snn_reset(model):
    for m in model.modules():  # Leaky keeps its membrane in the module between calls
        if hasattr(m, "reset_mem") and getattr(m, "mem", None) is not None:
            m.reset_mem()


PEERS = [
    Peer("spikingjelly", "spikingjelly", "spikingjelly", "spikingjelly.activation_based.nir_exchange",
         "spikingjelly.activation_based.nir_exchange.import_from_nir(graph, dt=metadata['dt'])", _sj_load),
    Peer("Norse", "norse", "norse", "norse.torch", "norse.torch.from_nir(graph, dt=metadata['dt'])", _norse_load),
    Peer("snnTorch", "snntorch", "snntorch", "snntorch.import_nir", "snntorch.import_nir.import_from_nir(graph)",
         _snn_load, reset=_snn_reset),
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


def run_peer(model, x: np.ndarray, num_steps: int, reset=None) -> tuple[list[np.ndarray], dict]:
    """Step an imported module ``num_steps`` times on ``x`` from a fresh state. Returns the per-step outputs (the
    sum of them where the module returns several tensors for one Output node) and notes on the output's form."""
    import torch

    if reset is not None:
        reset(model)
    xt = torch.from_numpy(x)
    param = next(iter(model.parameters()), None)
    if param is not None and x.dtype != np.float64:
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


def compare(outs, ref: np.ndarray) -> dict:
    diffs = [float(np.abs(o - r).max()) for o, r in zip(outs, ref)]
    res = {"max_abs_diff": max(diffs), "ref_max_abs": float(np.abs(ref).max())}
    if np.isin(ref, (0.0, 1.0)).all():  # spikes: the largest fraction that differ at one step
        res["spike_mismatch"] = max(float((o != r).mean()) for o, r in zip(outs, ref))
    return res


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


def try_graph(peer: Peer, mod, graph: nir.NIRGraph, x: np.ndarray, ref: np.ndarray) -> tuple[dict, Any]:
    """Import ``graph`` with the peer's reader, run it, compare with ``ref``. Returns (entry, module or None)."""
    dt = float(_meta(graph.metadata, "dt", 1.0))
    try:
        model = _quiet(peer.load, mod, graph, dt)
    except Exception as e:  # noqa: BLE001
        return {"reads": False, "runs": None, "error": _err(e)}, None
    entry: dict[str, Any] = {"reads": True}
    try:
        outs, notes = _quiet(run_peer, model, x, NUM_STEPS, peer.reset)
    except Exception as e:  # noqa: BLE001
        entry.update(runs=False, error=_err(e))
        return entry, model
    entry.update(runs=True, **notes)
    if outs[0].shape != ref.shape[1:]:
        entry.update(runs=False, error=f"output shape {outs[0].shape}, expected {ref.shape[1:]}")
        return entry, model
    entry.update(compare(outs, ref))
    if "spike_mismatch" not in entry:  # analog output: the same module in float64 (is the gap rounding?)
        try:
            m64 = copy.deepcopy(model).double()
            outs64, _ = _quiet(run_peer, m64, x.astype(np.float64), NUM_STEPS, peer.reset)
            entry["float64_max_abs_diff"] = compare(outs64, ref)["max_abs_diff"]
        except Exception as e:  # noqa: BLE001
            entry["float64_max_abs_diff"] = _err(e)
    return entry, model


def classify(entry: dict) -> str:
    """"exact", "within tolerance", "mismatch", "cannot read" (the reader raised) or "cannot run" (the module it
    built raised, or returned the wrong shape); thresholds: EXACT_RTOL, TOL_SPIKES, TOL_RTOL."""
    if not entry.get("reads"):
        return "cannot read"
    if not entry.get("runs"):
        return "cannot run"
    if "spike_mismatch" in entry:
        m = entry["spike_mismatch"]
        return "exact" if m == 0 else "within tolerance" if m <= TOL_SPIKES else "mismatch"
    rel = entry["max_abs_diff"] / max(1.0, entry["ref_max_abs"])
    return "exact" if rel <= EXACT_RTOL else "within tolerance" if rel <= TOL_RTOL else "mismatch"


# ------------------------------------------------------------------------------------------------------- causes

FW, OURS = "framework limit", "neurosdm"
CAUSES = {
    "scale_unmapped": (FW, "its reader has no mapping for `nir.Scale`, the identity summing junction of a residual "
                           "stream (spikingjelly, snnTorch: `nirtorch.nir_to_torch` raises 'Unknown node type'; "
                           "Norse: `_import_norse_module` returns None and the node is dropped: an edge that names it "
                           "raises `KeyError` (`whole`), or the nodes behind it are never reached and the module "
                           "returns the last node it ran (`residual`: `down0.conv2`, measured from its execution "
                           "order)). Worked around by `--peer` (the junctions become edges)."),
    "li_unmapped": (FW, "no mapping for `nir.LI` (spikingjelly's `_NodeMapper.map_dict`, snnTorch's `node_map` in "
                        "`import_from_nir`); nothing in NIR's core set that these readers map expresses a "
                        "non-spiking leaky readout (their LIF modules output spikes)."),
    "li_dropped": (FW, "Norse's `_import_norse_module` has no `nir.LI` branch: the node is dropped without an error "
                       "and the module returns the value of the node before it (measured: equal to the "
                       "reference without the LI)."),
    "snn_if_leaky": (FW, "snnTorch imports `nir.IF` as `snn.Leaky(beta=0.9, reset_mechanism='subtract')` "
                         "(snntorch/import_nir.py, `_nir_to_snntorch_module`, IF branch: beta is a constant): a "
                         "leaky neuron with reset by subtraction (measured: its spikes equal neurosdm's reference "
                         "of a LIF with beta 0.9, subtract, '>'). Worked around by `--peer snntorch` (IF written as "
                         "a LIF whose float32 beta is 1)."),
    "snn_if_tuple": (FW, "the same IF branch builds the Leaky with `init_hidden=False`: it returns `(spk, mem)` and "
                         "takes no state argument, so `nirtorch.nir_to_torch` hands the tuple to the next node "
                         "(`conv2d() received ... got (tuple, ...)`): an IF followed by another node cannot run. "
                         "Worked around by `--peer snntorch` (its LIF branch uses `init_hidden=True`)."),
    "snn_lif_dt": (FW, "snnTorch's LIF branch fixes `dt = 1e-4` (`_nir_to_snntorch_module`): beta = 1 - 1e-4/tau "
                       "and the threshold divided by w_scale = r 1e-4/tau, so a graph written with dt = 1 (tau in "
                       "steps) barely leaks and its threshold grows 1e4-fold (measured: the peer equals neurosdm's "
                       "reference of that reading). Worked around by `--peer snntorch` (time unit 1e-4: tau scaled "
                       "by 1e-4, the same per-step decay and gain)."),
    "norse_ignores_r": (FW, "Norse's `LIFBoxCell`/`IAFCell` ignore `r` (a warning): `v <- v + dt/tau (v_leak - v "
                            "+ x)`, where neurosdm's LIF has input gain r dt / tau = 1 (measured: the peer equals "
                            "neurosdm's reference with r = 1 and '>'). Worked around by "
                            "`--peer norse` (r moved into the feeding conv's weights: exact for r a power of two)."),
    "comparison": (FW, "the reader fires on `v > theta` (Norse: `heaviside(v - v_th)` = `v - v_th > 0`; snnTorch: "
                       "`mem - threshold > 0`), neurosdm on `v >= theta`; they differ where a membrane equals the "
                       "threshold, which on an integer grid happens (measured: the peer equals neurosdm's reference "
                       "run with '>'). Worked around by `--peer` (theta - 1 on the integer grid; the next float32 "
                       "below theta in a float graph)."),
    "dfs_order": (FW, "Norse's `from_nir` uses the deprecated `nirtorch.load`, whose GraphExecutor runs the nodes in "
                      "depth-first pre-order from the Input along the edge list (`nirtorch.graph_utils."
                      "trace_execution`); a node then runs before one of its inputs, which arrives from the previous "
                      "step (nothing at step 0), and the module returns the last node it ran. `--peer norse` writes "
                      "the edges in topological order, which fixes a fork whose other branch is a direct edge into "
                      "the join (the identity skip of `residual`), but no edge order can fix a fork with a node on "
                      "two branches (`split_skip`, the 1x1 shortcut and split-skip convs of `whole`): pre-order "
                      "reaches the join through the first branch before it has visited the second."),
    "float32_rounding_spikes": (FW, "float32 arithmetic in the peer: a membrane within rounding of its threshold "
                                    "fires on one side and not the other."),
}


def diagnose(peer: Peer, graph: nir.NIRGraph, entry: dict, model, x) -> list[str]:
    """Cause keys (``CAUSES``) for a cell that is not exact, each confirmed by a measurement or an error text."""
    causes: list[str] = []
    err = entry.get("error") or ""
    types = {type(n) for n in graph.nodes.values()}
    if "nir.ir.linear.Scale" in err or (peer.key == "norse" and nir.Scale in types and not any(
            type(n.elem).__name__ == "Scale" for n in getattr(model, "execution_order", []))):
        causes.append("scale_unmapped")
    if "nir.ir.neuron.LI'" in err:
        causes.append("li_unmapped")
    if "got (tuple" in err:
        causes.append("snn_if_tuple")
    if entry.get("runs") and classify(entry) != "exact":
        outs = None

        def peer_outs():
            nonlocal outs
            if outs is None:
                outs, _ = _quiet(run_peer, model, x, NUM_STEPS, peer.reset)
            return outs

        def equals(alt_ref) -> bool:
            c = compare(peer_outs(), alt_ref)
            return c.get("spike_mismatch", 0.0) == 0 and c["max_abs_diff"] <= EXACT_RTOL * max(1.0, c["ref_max_abs"])

        if peer.key == "norse" and nir.LI in types:
            li = [k for k, n in graph.nodes.items() if isinstance(n, nir.LI)]
            src = [a for a, b in graph.edges if b == li[0]]
            g2 = nir.NIRGraph(nodes={k: n for k, n in graph.nodes.items() if k not in li},
                              edges=[(a, "output") if b in li else (a, b) for a, b in graph.edges if a not in li],
                              metadata=graph.metadata)
            if len(src) == 1 and equals(reference(g2, x, fixed=None)):
                causes.append("li_dropped")
        if peer.key == "norse" and nir.LIF in types:  # Norse's LIF: r taken as 1, '>'
            nodes = {k: nir.LIF(tau=n.tau, r=np.ones_like(n.r), v_leak=n.v_leak, v_threshold=n.v_threshold,
                                v_reset=n.v_reset) if isinstance(n, nir.LIF) else n for k, n in graph.nodes.items()}
            g2 = nir.NIRGraph(nodes=nodes, edges=graph.edges, metadata=graph.metadata)
            if equals(reference(g2, x, disc=Discretisation.from_metadata(graph.metadata, comparison=">"),
                                fixed=None)):
                causes.append("norse_ignores_r")
        if peer.key == "norse":
            order = [n.name for n in getattr(model, "execution_order", [])]
            pos = {n: i for i, n in enumerate(order)}
            against = [(a, b) for a, b in graph.edges if a.replace(".", "_") in pos and b.replace(".", "_") in pos
                       and pos[a.replace(".", "_")] > pos[b.replace(".", "_")]]
            if against:
                causes.append("dfs_order")
                entry["edges_against_execution_order"] = [f"{a} -> {b}" for a, b in against[:6]]
                entry["edges_against_execution_order_count"] = len(against)
        if peer.key == "snntorch" and nir.IF in types:
            ifs = [k for k, n in graph.nodes.items() if isinstance(n, nir.IF)]
            nodes = dict(graph.nodes)
            for k in ifs:
                n = graph.nodes[k]
                nodes[k] = nir.LIF(tau=np.full_like(n.r, 10.0), r=np.full_like(n.r, 10.0),
                                   v_leak=np.zeros_like(n.r), v_threshold=n.v_threshold, v_reset=n.v_reset)
            g2 = nir.NIRGraph(nodes=nodes, edges=graph.edges, metadata=graph.metadata)
            if equals(reference(g2, x, disc=Discretisation(reset="subtract", comparison=">"), fixed=None)):
                causes.append("snn_if_leaky")
        if peer.key == "snntorch" and nir.LIF in types:  # snnTorch's LIF: dt 1e-4, gain 1, threshold / w_scale
            dt_s = 1e-4
            nodes = {}
            for k, n in graph.nodes.items():
                if isinstance(n, nir.LIF):
                    w_scale = np.asarray(n.r) * dt_s / np.asarray(n.tau)
                    n = nir.LIF(tau=n.tau, r=np.asarray(n.tau) / dt_s, v_leak=n.v_leak,
                                v_threshold=np.asarray(n.v_threshold) / w_scale, v_reset=n.v_reset)
                nodes[k] = n
            g2 = nir.NIRGraph(nodes=nodes, edges=graph.edges, metadata=graph.metadata)
            if equals(reference(g2, x, disc=Discretisation(dt=dt_s, comparison=">"), fixed=None)):
                causes.append("snn_lif_dt")
        if peer.key in ("norse", "snntorch") and not causes and str(_meta(graph.metadata, "comparison", ">=")) == ">=":
            disc = Discretisation.from_metadata(graph.metadata, comparison=">")
            if equals(reference(graph, x, disc=disc, fixed=None)):
                causes.append("comparison")
        if not causes and entry.get("spike_mismatch", 1.0) <= TOL_SPIKES:
            causes.append("float32_rounding_spikes")
    return causes


def norse_edge_order(peer: Peer, mod, graph: nir.NIRGraph, kind: str) -> dict:
    """Does Norse's result depend on the order of the edge list, and does ``topological_edges`` remove that? The
    ``residual`` graph for Norse without and with :func:`topological_edges`, its edge list as written and
    reversed (NIR edges are a set: the reference result is the same for every order)."""
    from neurosdm.exporters.rewrite import inline_junctions, strict_thresholds, topological_edges

    x = make_input(graph, kind)
    ref = reference(graph, x)
    base = strict_thresholds(inline_junctions(graph, output_junction="conv"))
    rev = nir.NIRGraph(nodes=base.nodes, edges=list(reversed(base.edges)), metadata=base.metadata)
    out = {}
    for name, g in {"as_written": base, "reversed": rev, "as_written_topological": topological_edges(base),
                    "reversed_topological": topological_edges(rev)}.items():
        res, _ = try_graph(peer, mod, g, x, ref)
        out[name] = {"status": classify(res), "spike_mismatch": res.get("spike_mismatch")}
    return out


def _torch_threads():
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        pass


def survey(features: dict[str, tuple[nir.NIRGraph, str]] | None = None, peers: list[Peer] | None = None) -> dict:
    """Every peer against every feature, default export and ``for_peer`` form. Returns the JSON-able result."""
    _torch_threads()
    features = suite() if features is None else features
    result: dict[str, Any] = {
        "num_steps": NUM_STEPS, "batch": BATCH, "seed": SEED,
        "tolerances": {"exact_rtol": EXACT_RTOL, "tolerance_spike_fraction": TOL_SPIKES, "tolerance_rtol": TOL_RTOL},
        "versions": {"nir": importlib.metadata.version("nir"), "neurosdm": neurosdm.__version__,
                     "nirtorch": _version("nirtorch"), "torch": _version("torch"), "python": sys.version.split()[0]},
        "features": {}, "peers": {},
    }
    inputs, refs = {}, {}
    for name, (g, kind) in features.items():
        inputs[name] = make_input(g, kind)
        refs[name] = reference(g, inputs[name])
        info = {"description": FEATURES.get(name, name), "input": kind, "nodes": len(g.nodes), "edges": len(g.edges),
                "node_types": sorted({type(n).__name__ for n in g.nodes.values()})}
        if np.isin(refs[name], (0.0, 1.0)).all():
            info["reference_spike_rate"] = float(refs[name].mean())
        result["features"][name] = info
    for peer in peers or PEERS:
        mod, version, reason = load_peer(peer)
        entry: dict[str, Any] = {"version": version, "importer": peer.call}
        if mod is None:
            entry["skipped"] = reason
            result["peers"][peer.name] = entry
            continue
        cells = {}
        for name, (g, _) in features.items():
            cell = {}
            for form in ("default", "option"):
                try:
                    gf = g if form == "default" else for_peer(g, peer.key)
                except Exception as e:  # noqa: BLE001 - an option that cannot be applied is a finding
                    cell[form] = {"status": "no option", "error": _err(e)}
                    continue
                res, model = try_graph(peer, mod, gf, inputs[name], refs[name])
                res["status"] = classify(res)
                if res["status"] != "exact":
                    res["causes"] = diagnose(peer, gf, res, model, inputs[name])
                cell[form] = res
            cells[name] = cell
        entry["cells"] = cells
        if peer.key == "norse" and "residual" in features:
            entry["edge_order"] = norse_edge_order(peer, mod, *features["residual"])
        result["peers"][peer.name] = entry
    return result


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


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
    from neurosdm.io import atomic_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--doc", default=str(ROOT / "docs" / "peer-readers.md"))
    ap.add_argument("--json", default=str(ROOT / "docs" / "data" / "peer_readers.json"))
    args = ap.parse_args(argv)
    result = survey()
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
