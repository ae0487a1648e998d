"""Export of the feed-forward part of a quantised NIR graph as a lava-dl netx HDF5 file (``--to lava``).

netx (``lava.lib.dl.netx.hdf5.Network``, lava-dl 0.6) loads a *sequential* network: layer ``i`` reads layer
``i - 1`` only. It has no add layer, and cannot load concat, transposed-conv, unpool, pool or average layers.
neurosdm's denoiser is a UNet: residual sums (``<blk>.sum``), concatenated skips (split convs summed into one
neuron), time-varying TSM scales and per-step biases. So "the feed-forward part" here is the longest chain

    spikes S_0 -> conv C_1 -> neuron N_1 -> conv C_2 -> neuron N_2 -> ...

in which each conv reads only the spikes of the neuron before it and each neuron (IF, LIF or CubaLIF) reads only
its conv (other consumers of a conv's output or of a neuron's spikes are other branches, not exported). The chain
starts at the graph's Input when every conv reading it reads binary values (a foreign spiking graph; netx's
input is binary spikes), else at the first spiking node fed through a conv by the Input: for neurosdm's denoiser
that is ``stem.conv.if``, because ``stem.conv`` reads the analog image with a rounding netx cannot express (it
stays on the host, as the input encoder). It ends at the first node that breaks the pattern; the reason is
recorded (``/neurosdm`` attributes ``stop_node``, ``stop_reason``). For the shipped tiny model the chain is
``stem.conv.if -> stem.conv_identity -> stem.conv_identity.if -> down0.conv1 -> down0.if2`` and it stops at
``down0.conv2``, which feeds the residual sum ``down0.sum``.

Units: a quantised export holds integers in its state unit ``U = 2**E`` (:mod:`neurosdm.exporters.fixed_point`):
conv weights (``m 2**(e - E)`` for a conv reading spikes), biases and thresholds. They are written unchanged: a
conv's output is Lava's synaptic input ``a``; neuron parameters come from :func:`neurosdm.loihi.loihi_params_from_nir`
(``vThMant = T - 1``, ``vDecay = 4096 - decay_q12``, ``iDecay = du + 1 = 4096``, bias = netx's ``bias_mant`` at
exponent 6). Lava's CPU Conv uses the integer weights as they are (no 8-bit clip); on Loihi the compiler would
store the 8-bit mantissa ``m`` with weight exponent ``e - E`` (``/neurosdm/layers`` records both).

HDF5 layout (what netx reads; ``shape`` is ``[C, H, W]``, netx reverses it to its ``(x, y, z)``)::

    /layer/0   type "input", shape [C, H, W]                        (the spikes of the start node)
    /layer/i   type "conv", shape [C_out, H_out, W_out], inChannels, outChannels, kernelSize [kh, kw],
               stride [sy, sx], padding [py, px], dilation [dy, dx], groups, weight [C_out, C_in/groups, kh, kw]
               (int32, cross-correlation as torch), bias [C_out] (int32),
               neuron {type "CUBA", iDecay, vDecay, vThMant, refDelay 1, gradedSpike 0}
    /simulation  Ts 1, tSample num_steps
    /neurosdm  attrs: format, source, input_node, layer nodes, stop_node, stop_reason, state_exponent,
               diffusion_step, num_steps, reset_interval (run netx with reset_interval = num_steps and
               reset_offset = 1 so every layer starts from 0 at each network call, as neurosdm's neurons do)
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nir
import numpy as np

from neurosdm.errors import ConfigError, GraphError, QuantizationError
from neurosdm.exporters.pipeline import export_checkpoint
from neurosdm.graph.dialect import Discretisation, graph_at, meta_value
from neurosdm.graph.inspect import inspect_nir
from neurosdm.io import atomic_buffer
from neurosdm.loihi import loihi_params_from_nir

__all__ = ["Chain", "ChainLayer", "feedforward_chain", "write_netx", "export_lava", "NEURON_TYPES"]

NEURON_TYPES = (nir.IF, nir.LIF, nir.CubaLIF)
_LOIHI_WEIGHT_BITS = 8


@dataclass
class ChainLayer:
    """One netx layer: the conv node ``conv`` and the neuron node ``neuron`` it drives."""

    conv: str
    neuron: str


@dataclass
class Chain:
    """The exportable chain of a graph: its start (``input_node``, whose binary output is netx's input), the layers,
    and where and why it stopped."""

    input_node: str
    layers: list[ChainLayer] = field(default_factory=list)
    stop_node: str = ""
    stop_reason: str = ""
    dropped_branches: list[str] = field(default_factory=list)


def _edges(graph: nir.NIRGraph) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    srcs: dict[str, list[str]] = {n: [] for n in graph.nodes}
    dsts: dict[str, list[str]] = {n: [] for n in graph.nodes}
    for s, d in graph.edges:
        if s not in graph.nodes or d not in graph.nodes:
            raise GraphError(f"edge ({s!r}, {d!r}) names a node that is not in the graph (nested graphs are not "
                             "exported to netx)")
        srcs[d].append(s)
        dsts[s].append(d)
    return srcs, dsts


def _kind(node) -> str:
    return type(node).__name__


def _why_not(graph, name: str, srcs, dsts, metadata: dict) -> str:
    """Why ``name`` (a consumer of the chain's last spikes) cannot extend the chain."""
    node = graph.nodes[name]
    scale_tables = metadata.get("scale_tables", {}) or {}
    if isinstance(node, nir.Scale) and name in scale_tables:
        return "a TSM scale (per-spiking-step gain): netx has no time-varying scale"
    if isinstance(node, nir.Output):
        return "the graph's output"
    if not isinstance(node, nir.Conv2d):
        return f"a {_kind(node)} node: netx holds conv layers followed by a neuron"
    if len(srcs[name]) != 1:
        return f"it sums {len(srcs[name])} inputs: netx layers read one layer"
    outs = dsts[name]
    neurons = [d for d in outs if isinstance(graph.nodes[d], NEURON_TYPES)]
    for d in outs:
        dn = graph.nodes[d]
        if isinstance(dn, NEURON_TYPES) and len(srcs[d]) > 1:
            return (f"it feeds {d!r}, a neuron summing {len(srcs[d])} convs (a concatenated skip split into "
                    "convs): netx cannot hold concat")
        if isinstance(dn, nir.Scale) and len(srcs[d]) > 1:
            return f"it feeds {d!r}, a residual sum of {len(srcs[d])} streams: netx has no add layer"
    if not neurons:
        kinds = ", ".join(f"{d!r} ({_kind(graph.nodes[d])})" for d in outs) or "nothing"
        return f"it feeds {kinds}, not a spiking neuron"
    bias_tables = metadata.get("bias_tables", {}) or {}
    if name in bias_tables and np.asarray(bias_tables[name]).ndim == 3 and np.asarray(bias_tables[name]).shape[1] > 1:
        return "its bias varies with the spiking step (TSM): netx holds one bias per layer"
    return "it does not continue the chain"


def _binary_reader(metadata: dict, conv: str) -> bool:
    q = metadata.get("quant")
    return not (isinstance(q, dict) and conv in (q.get("round_nodes") or {}))


def feedforward_chain(graph: nir.NIRGraph, metadata: dict | None = None) -> Chain:
    """The longest sequential conv -> neuron chain of ``graph`` (module docstring). Raises :class:`GraphError`
    when there is none (naming the node where it fails and why)."""
    metadata = dict(graph.metadata if metadata is None else metadata)
    srcs, dsts = _edges(graph)
    inputs = sorted(n for n, node in graph.nodes.items() if isinstance(node, nir.Input))
    if len(inputs) != 1:
        raise GraphError(f"netx export needs a graph with one Input node, found {len(inputs)}")
    start = inputs[0]
    readers = dsts[start]
    if not readers or not all(isinstance(graph.nodes[c], nir.Conv2d) and _binary_reader(metadata, c)
                              for c in readers):
        # the Input is analog (or feeds something other than convs): everything up to the spiking node nearest
        # to it stays on the host as the input encoder, and that node's spikes are netx's input
        depth, frontier = {start: 0}, [start]
        while frontier:
            frontier = sorted({d for n in frontier for d in dsts[n] if d not in depth})
            for d in frontier:
                depth[d] = depth[min(s for s in srcs[d] if s in depth)] + 1
        neurons = sorted((depth[n], n) for n in depth if isinstance(graph.nodes[n], NEURON_TYPES))
        if not neurons:
            raise GraphError(f"netx export: no spiking neuron (IF, LIF, CubaLIF) is reachable from the Input {start!r}")
        start = neurons[0][1]
    chain = Chain(input_node=start)
    current = start
    while True:
        candidates, refused = [], []
        for c in sorted(dsts[current]):
            node = graph.nodes[c]
            ok = isinstance(node, nir.Conv2d) and srcs[c] == [current]
            nxt = [d for d in sorted(dsts[c]) if isinstance(graph.nodes[d], NEURON_TYPES) and srcs[d] == [c]] \
                if ok else []
            bt = np.asarray((metadata.get("bias_tables") or {}).get(c, np.zeros((1, 1, 1))))
            if nxt and not (bt.ndim == 3 and bt.shape[1] > 1):
                candidates.append((c, nxt[0]))
            else:
                refused.append(c)
        if not candidates:
            if refused:
                chain.stop_node = refused[0]
                chain.stop_reason = _why_not(graph, refused[0], srcs, dsts, metadata)
            else:
                chain.stop_node = current
                chain.stop_reason = "nothing reads its spikes"
            break
        conv, neuron = candidates[0]
        chain.dropped_branches += [c for c in refused] + [c for c, _ in candidates[1:]]
        chain.layers.append(ChainLayer(conv, neuron))
        current = neuron
    if not chain.layers:
        raise GraphError(f"netx export: nothing after {start!r} can be held by netx: {chain.stop_node!r} is "
                         f"{chain.stop_reason}")
    return chain


def _pairs(value, name: str, what: str) -> np.ndarray:
    a = np.asarray(value).reshape(-1)
    if a.dtype.kind in "SUO":
        raise GraphError(f"node {name!r}: {what} {value!r}: netx needs integer {what}")
    if a.size == 1:
        a = np.repeat(a, 2)
    if a.size != 2:
        raise GraphError(f"node {name!r}: {what} {value!r} is not 2-D")
    return a.astype(np.int64)


def _integers(a, name: str, what: str) -> np.ndarray:
    a = np.asarray(a, np.float64)
    if not np.all(np.isfinite(a)) or not np.array_equal(np.rint(a), a):
        raise QuantizationError(f"node {name!r}: netx needs integer {what}; export with --quantize int8 first")
    return np.rint(a).astype(np.int64)


def _loihi_weight_exponent(w: np.ndarray, name: str) -> tuple[int, int]:
    """``(mantissa bits needed, exponent k)``: the largest ``k`` with every weight a multiple of ``2**k`` and the
    8-bit mantissa ``w >> k``; raises when the weights need more than Loihi's 8 bits."""
    nz = w[w != 0]
    if nz.size == 0:
        return 0, 0
    k = 0
    while np.all(nz % (1 << (k + 1)) == 0):
        k += 1
    m = nz >> k
    if m.max() > 127 or m.min() < -128:
        raise QuantizationError(f"node {name!r}: weights need {int(np.ceil(np.log2(np.abs(m).max() + 1))) + 1}-bit "
                                f"mantissas; Loihi's are {_LOIHI_WEIGHT_BITS}-bit")
    return _LOIHI_WEIGHT_BITS, k


def _str_dataset(group, key: str, value: str) -> None:
    group.create_dataset(key, (1,), f"S{max(10, len(value))}", [value.encode("ascii")])


def write_netx(path: str | os.PathLike, graph: nir.NIRGraph, metadata: dict | None = None,
               diffusion_step: int | None = None, source: str = "") -> tuple[Path, Chain]:
    """Write the chain of :func:`feedforward_chain` as a netx HDF5 file at ``path`` (atomically; module docstring
    for the layout). ``diffusion_step``: for a neurosdm denoiser export, the step whose biases (time embedding) the
    layers get (default: the graph's stored step). Returns ``(path, chain)``."""
    import h5py

    metadata = dict(graph.metadata if metadata is None else metadata)
    if diffusion_step is not None:
        if not metadata.get("bias_tables"):
            raise ConfigError("--diffusion-step needs a neurosdm denoiser export (a graph with bias tables)")
        graph = graph_at(graph, metadata, int(diffusion_step), 0)
        metadata = dict(graph.metadata)
    disc = Discretisation.from_metadata(metadata)
    if disc.comparison != ">=":
        raise QuantizationError(f"the graph fires on v {disc.comparison} threshold; the conversion to Loihi's "
                                "v > vth << 6 is exact for neurosdm's '>=' rule on integers")
    chain = feedforward_chain(graph, metadata)
    quant = metadata.get("quant") if isinstance(metadata.get("quant"), dict) else {}
    e_state = int(meta_value(quant, "state_exponent", 0))
    w_exps = quant.get("weight_exponents", {}) or {}
    num_steps = int(meta_value(metadata, "num_steps", 1))

    in_shape = _output_shape(graph, chain.input_node)
    layers = []
    shape = in_shape
    for layer in chain.layers:
        conv = graph.nodes[layer.conv]
        w = _integers(conv.weight, layer.conv, "weights")
        if w.ndim != 4:
            raise GraphError(f"node {layer.conv!r}: netx conv layers are 2-D")
        bias = _integers(np.zeros(w.shape[0]) if conv.bias is None else conv.bias, layer.conv, "biases")
        stride = _pairs(conv.stride, layer.conv, "stride")
        dilation = _pairs(conv.dilation, layer.conv, "dilation")
        pad = _pairs(conv.padding, layer.conv, "padding")
        groups = int(np.asarray(conv.groups).reshape(-1)[0])
        if shape[0] != w.shape[1] * groups:
            raise GraphError(f"node {layer.conv!r}: reads {shape[0]} channels, weight expects {w.shape[1] * groups}")
        out_hw = [(shape[1 + i] + 2 * pad[i] - dilation[i] * (w.shape[2 + i] - 1) - 1) // stride[i] + 1
                  for i in range(2)]
        out_shape = (w.shape[0], *out_hw)
        neuron = graph.nodes[layer.neuron]
        params = loihi_params_from_nir(neuron, disc.dt, 0, bias=bias.astype(np.float64), reset=disc.reset,
                                       name=layer.neuron)
        _, k = _loihi_weight_exponent(w, layer.conv)
        layers.append(dict(conv=layer.conv, neuron=layer.neuron, weight=w, bias=params.netx_bias(), stride=stride,
                           padding=pad, dilation=dilation, groups=groups, shape=out_shape, in_channels=shape[0],
                           params=params, loihi_weight_exponent=k,
                           weight_exponent=int(meta_value(w_exps, layer.conv, 0))))
        shape = out_shape

    path = Path(path)
    with atomic_buffer(path) as buffer:  # HDF5 in memory: a full disk is a clean error, not a crash
        with h5py.File(buffer, "w") as f:
            lay = f.create_group("layer")
            g0 = lay.create_group("0")
            _str_dataset(g0, "type", "input")
            g0.create_dataset("shape", data=np.asarray(in_shape, np.int64))
            for i, L in enumerate(layers, start=1):
                g = lay.create_group(str(i))
                _str_dataset(g, "type", "conv")
                g.create_dataset("shape", data=np.asarray(L["shape"], np.int64))
                g.create_dataset("inChannels", data=int(L["in_channels"]))
                g.create_dataset("outChannels", data=int(L["shape"][0]))
                g.create_dataset("kernelSize", data=np.asarray(L["weight"].shape[2:], np.int64))
                g.create_dataset("stride", data=L["stride"])
                g.create_dataset("padding", data=L["padding"])
                g.create_dataset("dilation", data=L["dilation"])
                g.create_dataset("groups", data=int(L["groups"]))
                g.create_dataset("weight", data=L["weight"].astype(np.int32))
                g.create_dataset("bias", data=np.asarray(L["bias"], np.int32).reshape(-1))
                n = g.create_group("neuron")
                for key, value in L["params"].netx_neuron().items():
                    if isinstance(value, str):
                        _str_dataset(n, key, value)
                    else:
                        n.create_dataset(key, data=int(value))
                g.attrs["nir_conv"] = L["conv"]
                g.attrs["nir_neuron"] = L["neuron"]
                g.attrs["weight_exponent"] = L["weight_exponent"]
                g.attrs["loihi_weight_exponent"] = L["loihi_weight_exponent"]
            sim = f.create_group("simulation")
            sim.create_dataset("Ts", data=1)
            sim.create_dataset("tSample", data=num_steps)
            meta = f.create_group("neurosdm")
            meta.attrs["format"] = "lava-dl netx HDF5, written by neurosdm (feed-forward chain of a NIR graph)"
            meta.attrs["source"] = str(source)
            meta.attrs["input_node"] = chain.input_node
            meta.attrs["convs"] = np.array([L.conv for L in chain.layers], dtype="S")
            meta.attrs["neurons"] = np.array([L.neuron for L in chain.layers], dtype="S")
            meta.attrs["stop_node"] = chain.stop_node
            meta.attrs["stop_reason"] = chain.stop_reason
            meta.attrs["state_exponent"] = e_state
            meta.attrs["diffusion_step"] = int(meta_value(metadata, "diffusion_step", 0))
            meta.attrs["num_steps"] = num_steps
            meta.attrs["reset_interval"] = num_steps
            meta.attrs["reset_offset"] = 1
    return path, chain


def _output_shape(graph: nir.NIRGraph, name: str) -> tuple[int, ...]:
    """``(C, H, W)`` of a neuron or Input node (its parameter or declared shape)."""
    node = graph.nodes[name]
    for attr in ("v_threshold", "tau", "r"):
        v = getattr(node, attr, None)
        if v is not None and np.ndim(v) == 3:
            return tuple(int(s) for s in np.shape(v))
    types = getattr(node, "output_type", None) or getattr(node, "input_type", None) or {}
    for v in types.values():
        shp = tuple(int(s) for s in np.asarray(v).reshape(-1))
        if len(shp) == 3:
            return shp
    raise GraphError(f"node {name!r}: netx input needs a (C, H, W) shape; found none")


def export_lava(source: str | os.PathLike, out: str | os.PathLike | None = None, force: bool = False,
                diffusion_step: int | None = None, **quant_options) -> tuple[Path, Chain]:
    """``neurosdm export SOURCE --to lava``: SOURCE is a checkpoint (exported and quantised to int8 first, with
    ``quant_options`` as :func:`neurosdm.exporters.pipeline.export_checkpoint` takes them) or a ``.nir`` file with
    integer weights (a ``--quantize int8`` export, or a foreign spiking conv chain). Writes ``out`` (default:
    SOURCE with suffix ``.net``; ``DIR/model.net`` for a run directory). Returns ``(path, chain)``."""
    source = Path(source)
    if out is None:
        out = source / "model.net" if source.is_dir() else source.with_suffix(".net")
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"output {out} is a directory; pass a file name such as {out / 'model.net'}")
    if out.exists() and not force:
        raise ConfigError(f"output {out} already exists; use --force to overwrite it")
    if source.suffix == ".nir":
        if not source.is_file():
            raise GraphError(f"NIR file not found: {source}")
        inspect_nir(source)  # one-line errors for files nir cannot read
        graph = nir.read(source)
        return write_netx(out, graph, diffusion_step=diffusion_step, source=source.name)
    with tempfile.TemporaryDirectory(prefix="neurosdm-lava-") as tmp:
        nir_path = export_checkpoint(source, Path(tmp) / "model.nir", quantize="int8", **quant_options)
        graph = nir.read(nir_path)
    return write_netx(out, graph, diffusion_step=diffusion_step, source=source.name)
