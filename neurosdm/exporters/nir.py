"""Export of a :class:`~neurosdm.models.SpikingUNet` (TSM or not, either head) to a core-NIR graph.

``graph, metadata = to_nir_graph(model, diffusion_step)`` builds the whole spiking denoiser out of core NIR nodes
(Input, Conv2d, Scale, IF, LI, Output) with the exact rewrites of :mod:`neurosdm.lowering`. ``metadata`` is also
stored as ``graph.metadata`` (so ``nir.write`` keeps it); every value is a str, a number, an array or a dict of
those (NIR metadata cannot hold None).

Semantics (recorded in the metadata): discrete steps with ``dt = 1``, IF neurons ``v <- v + x``, fire when
``v >= v_threshold`` (comparison ``">="``), then reset to ``v_reset = 0`` (reset ``"zero"``); every neuron starts
at 0 at each network call.

Converted SNNs (:mod:`neurosdm.convert`): one threshold per IF layer, reset by subtraction (``metadata["reset"] =
"subtract"``: ``v <- v - (v_threshold - v_reset)`` where it fires) and an initial membrane ``v(0) = a theta``
(``a = metadata["v_init"]``, 1/2). NIR neurons start at 0, so the membrane is stored shifted by ``-a theta``:
``u = v - a theta`` starts at 0 and the IF node holds ``v_threshold = (1 - a) theta`` and ``v_reset = -a theta``.
Then ``u >= (1 - a) theta  <=>  v >= theta``, a spike removes ``v_threshold - v_reset = theta``, and a hard reset
sets ``u = -a theta``, i.e. ``v = 0``: the same neuron, exactly, per node (no extra input is needed, so IF nodes
shared by several consumers of a stream stay exact). With ``a = 0`` this is the usual ``(theta, 0)``. IF nodes on a
stream are shared by the consumers whose neurons are identical; a consumer with another threshold gets its own
node ``<stream>.if@<block>``. The single Input node ``"input"`` takes the analog image x_t ``(C, H, W)``, the same at
every one of the ``num_steps`` spiking steps (direct encoding). Model semantics are eval-mode (BatchNorm running
statistics).

Lowering (each step exact; the tests compare the graph run by :func:`neurosdm.simulators.reference.run_graph`
with the torch model):

- every BatchNorm is folded into the conv before it (``fold_batchnorm``);
- ResBlock ``h = BN2(conv2(IF2(BN1(conv1(IF1(x))) + temb))) + shortcut(x)``: nodes ``<blk>.conv1`` -> ``<blk>.if2``
  -> ``<blk>.conv2`` -> ``<blk>.sum``; the shortcut (a 1x1 conv node, or the edge from x for the identity) also
  ends in ``<blk>.sum``, an identity ``nir.Scale`` (scale = ones) that is the summing junction: its consumers read
  the float residual stream from it. The IF in front of a stream is shared by all its consumers (``<stream>.if``,
  one node per stream; all IF neurons are identical, so this is exact);
- a concatenated skip ``cat(h, skip)`` is never built: IF1 acts element-wise, so the block reads ``IF(h)`` and
  ``IF(skip)``, and conv1 / the shortcut are split along input channels (``split_concat_conv``) into
  ``<blk>.conv1`` (+ ``<blk>.conv1_skip``) and ``<blk>.shortcut`` (+ ``<blk>.shortcut_skip``), all ending in the
  same node;
- up-sampling: after the L-th ``UpSample`` every map lives space-to-depth packed L times on the grid of the
  lowest resolution (``C * 4**L`` channels, channel ``c * 4**L + phase``, see :mod:`neurosdm.lowering`). The
  up-sampling conv is the polyphase form, convs between packed maps are ``packed_conv``, a skip from the unpacked
  down path into a packed map is a strided ``full_to_packed_conv``. ``metadata["node_packing"]`` gives the
  packing level of every node's output, ``metadata["packed_levels"]`` that of the graph's output;
- the time embedding (non-spiking MLP) is, per ResBlock, a per-channel bias added before IF2: it is put into the
  bias of ``<blk>.conv1`` (after BN folding). ``metadata["bias_tables"][node]`` is ``[num_diffusion_steps, C']``,
  the TOTAL bias of that node at every diffusion step; rule (``metadata["bias_table_rule"]``): at diffusion step
  ``t`` set ``node.bias := bias_tables[node][t]`` (:func:`with_diffusion_step`). The graph as returned holds the
  biases of ``diffusion_step`` (``metadata["diffusion_step"]``).

Heads:

- ``"spiking"``: ``tail_bn -> IF -> tail_conv -> leaky readout (decay d)``. ``tail_bn`` acts on the last junction
  (a sum): its scale is folded into every conv feeding that junction (weights and biases) and its shift added to
  the bias of the block's ``conv2``, so that junction (``<blk>.sum``) carries ``tail_bn(h)``. The readout is a
  ``nir.LI`` with ``tau = dt / (1 - d)``, ``r = 1 / (1 - d)``, ``v_leak = 0``: forward Euler
  ``v <- v + dt/tau (v_leak - v + r x)`` is ``v <- d v + x`` (``nir.I`` with ``r = 1`` if ``d = 1``). The output
  is the LI membrane; eps is its value at the last spiking step (``metadata["readout"] = "last_step"``),
  unpacked by the host with ``depth_to_space`` (:func:`eps_from_outputs`).
- ``"sdm"``: the Swish head is analog and stays on the host: the graph ends at the last junction (the analog
  boundary before ``tail_bn``) and its Output gives that junction's value at every spiking step.
  ``metadata["host_head"]`` holds the head's weights and :func:`host_head` (numpy) finishes the computation.

TSM (a learnable per-spiking-step scale ``p[k]`` on every conv's output, bias included, before its BN): a per-step
scale cannot be a time-invariant NIR weight, so it moves to the conv's input,
``BN(p[k] (W x + b)) = W' (p[k] x) + (p[k] b' + shift)`` (``W' = scale W``, ``b' = scale b``): a ``nir.Scale``
node ``<conv>.tsm`` sits between the conv and its source (for spikes it makes them graded, payload ``p[k]``), and
the conv's bias varies with the spiking step. Both are tables in the metadata: ``scale_tables[<conv>.tsm]`` is
``[num_steps]`` (rule ``scale_table_rule``) and the conv's ``bias_tables`` entry ``[A, num_steps, C]``. A
simulator applies them with :func:`graph_at` / :func:`step_graphs`; the stored nodes hold spiking step 0.

Quantisation to Loihi-style fixed point is a separate pass over this graph
(:mod:`neurosdm.exporters.fixed_point`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nir
import numpy as np
import torch
from torch import nn

import neurosdm
from neurosdm.config import DiffusionConfig
from neurosdm.errors import ConfigError, GraphError, NeuroSDMError
from neurosdm.io import atomic_path, describe_head, first_line
from neurosdm.neurons.functional import leaky_readout
from neurosdm.lowering import (
    affine_of_batchnorm,
    depth_to_space,
    full_to_packed_conv,
    pack_bias,
    packed_weight_overhead,
    pack_phases,
    packed_conv,
    split_concat_conv,
    upsample_conv_phases,
)

__all__ = ["UnsupportedModelError", "to_nir_graph", "graph_at", "step_graphs", "with_diffusion_step", "host_head",
           "eps_from_outputs", "run_reference",
           "graph_size", "export_checkpoint", "default_output_path", "inspect_nir", "QUANTIZE_CHOICES"]

QUANTIZE_CHOICES = ("none", "int8")
MAX_STORED_WEIGHTS = 2**28  # 1 GB of float32 conv weights
JUNCTION_CHOICES = ("scale", "edges")

BIAS_TABLE_RULE = ("at diffusion step t and spiking step k, every node in bias_tables (a table [A, K, C]) gets "
                   "bias := table[t if A > 1 else 0, k if K > 1 else 0] (the total bias: folded BatchNorm, the "
                   "time embedding, TSM's p[k] times the conv bias)")
SCALE_TABLE_RULE = ("at spiking step k, every Scale node in scale_tables (a table [K]) gets scale := table[k] at "
                    "every element (TSM: the per-step scale p[k] of the conv it feeds, applied to its input)")


class UnsupportedModelError(NeuroSDMError, NotImplementedError):
    """The model uses a feature this exporter cannot express in core NIR (yet), e.g. TSM."""


def _np64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


@dataclass
class _Stream:
    """A float feature map: the node whose output it is, its original channels, packing level and stored grid."""

    node: str
    channels: int
    level: int
    hw: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels * 4**self.level, *self.hw)


@dataclass
class _Conv:
    """A conv of the model, BN folded, split from its TSM scale: ``y[k] = W (p[k] x) + p[k] b + shift``."""

    weight: np.ndarray  # [Cout, Cin, k, k], BN scale folded in
    bias: np.ndarray  # [Cout], BN scale folded in; multiplied by p[k]
    shift: np.ndarray  # [Cout], added after p[k] (the BN shift)
    tsm: np.ndarray | None  # p [num_steps], or None without TSM

    def table(self, extra: np.ndarray | None = None) -> np.ndarray:
        """The bias table ``[A, K, Cout]`` (A = diffusion steps or 1, K = spiking steps or 1) of this conv, plus an
        additive per-diffusion-step ``extra [T, Cout]`` (the time embedding)."""
        b = self.bias[None, None, :] * (self.tsm[None, :, None] if self.tsm is not None else 1.0)
        t = b + self.shift[None, None, :]
        return t + extra[:, None, :] if extra is not None else t


def _conv_parts(conv, bn=None) -> _Conv:
    w = _np64(conv.weight)
    b = _np64(conv.bias) if conv.bias is not None else np.zeros(w.shape[0])
    shift = np.zeros(w.shape[0])
    if bn is not None:
        scale, shift = affine_of_batchnorm(bn)
        w = w * scale[:, None, None, None]
        b = b * scale
    p = getattr(conv, "tsmp", None)
    return _Conv(w, b, shift, None if p is None else _np64(p).reshape(-1))


def _pack_table(table: np.ndarray, level: int) -> np.ndarray:
    """A bias table's channel axis (last) for a map packed ``level`` times (see :func:`pack_bias`)."""
    return np.repeat(table, 4**level, axis=-1) if level else table


class _Builder:
    def __init__(self, threshold_of, v_init: float, dtype):
        self.nodes: dict[str, nir.NIRNode] = {}
        self.edges: list[tuple[str, str]] = []
        self.packing: dict[str, int] = {}
        self.threshold_of = threshold_of  # neuron module -> its firing threshold (threshold guidance included)
        self.v_init = float(v_init)
        self.if_thresholds: dict[str, float] = {}
        self.dtype = dtype
        self.spike_nodes: dict[tuple[str, float], str] = {}
        self.conv_params: dict[str, list] = {}  # name -> [weight, bias table [A, K, C], stride, padding, input hw]
        self.scale_tables: dict[str, np.ndarray] = {}  # TSM scale node -> p [K]
        self.junction_feeders: dict[str, list[str]] = {}

    def edge(self, src: str, dst: str) -> None:
        self.edges.append((src, dst))

    def add(self, name: str, node, level: int) -> str:
        if name in self.nodes:
            raise RuntimeError(f"node {name!r} built twice")
        self.nodes[name] = node
        self.packing[name] = level
        return name

    def if_node(self, name: str, shape, level: int, threshold: float) -> str:
        """An IF node with firing threshold ``threshold`` (already scaled) and the initial membrane
        ``v_init * threshold`` stored as a shift (module docstring): ``v_threshold = (1 - a) theta``,
        ``v_reset = -a theta``."""
        a = self.v_init
        self.if_thresholds[name] = float(threshold)
        return self.add(name, nir.IF(r=np.ones(shape, self.dtype),
                                     v_threshold=np.full(shape, (1.0 - a) * threshold, self.dtype),
                                     v_reset=np.full(shape, -a * threshold, self.dtype)), level)

    def spikes(self, s: _Stream, threshold: float, owner: str) -> _Stream:
        """The IF node reading stream ``s`` with firing threshold ``threshold``, shared by every consumer of ``s``
        with that threshold; the first is ``<stream>.if``, one with another threshold ``<stream>.if@<owner>``."""
        key = (s.node, float(threshold))
        if key not in self.spike_nodes:
            name = f"{s.node}.if" if f"{s.node}.if" not in self.nodes else f"{s.node}.if@{owner}"
            self.spike_nodes[key] = self.if_node(name, s.shape, s.level, threshold)
            self.edge(s.node, self.spike_nodes[key])
        return _Stream(self.spike_nodes[key], s.channels, s.level, s.hw)

    def conv(self, name: str, src: _Stream, weight, table, stride: int, padding: int, out_channels: int,
             out_level: int, tsm: np.ndarray | None = None) -> _Stream:
        """A Conv2d node reading ``src`` (weights already lowered to the stored layout, ``table [A, K, C]``); with
        ``tsm`` a Scale node ``<name>.tsm`` (``p[k]`` at spiking step k) sits between ``src`` and the conv."""
        k = weight.shape[2]
        h, w = src.hw
        hw = ((h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1)
        self.conv_params[name] = [weight, table, stride, padding, src.hw]
        source = src.node
        if tsm is not None:
            source = self.add(f"{name}.tsm", nir.Scale(scale=np.full(src.shape, tsm[0], self.dtype)), src.level)
            self.scale_tables[source] = tsm
            self.edge(src.node, source)
        self.add(name, None, out_level)  # placeholder: nodes are materialised in finish()
        self.edge(source, name)
        return _Stream(name, out_channels, out_level, hw)

    def junction(self, name: str, feeders: list[str], s: _Stream) -> _Stream:
        self.add(name, nir.Scale(scale=np.ones(s.shape, self.dtype)), s.level)
        for f in feeders:
            self.edge(f, name)
        self.junction_feeders[name] = list(feeders)
        return _Stream(name, s.channels, s.level, s.hw)

    def finish(self, diffusion_step: int) -> None:
        for name, (w, table, stride, padding, hw) in self.conv_params.items():
            bias = table[diffusion_step if table.shape[0] > 1 else 0, 0]
            self.nodes[name] = nir.Conv2d(input_shape=tuple(int(v) for v in hw), weight=w.astype(self.dtype),
                                          stride=int(stride), padding=int(padding), dilation=1, groups=1,
                                          bias=bias.astype(self.dtype))


def _lower_3x3_or_1x1(w: np.ndarray, level: int) -> np.ndarray:
    return w if level == 0 else packed_conv(w, level)


def _skip_conv(w: np.ndarray, level: int) -> tuple[np.ndarray, int, int]:
    """A same conv from an unpacked map into a map packed ``level`` times: (weight, stride, padding)."""
    k = w.shape[2]
    if level == 0:
        return w, 1, (k - 1) // 2
    return full_to_packed_conv(w, level), 2**level, (k - 1) // 2


def _check_model(model) -> tuple[float, float, str, float]:
    """``(base threshold, threshold scale, reset, v_init)`` of the model's IF neurons: all IF (decay 1) with one
    reset rule, one initial membrane fraction and one threshold scale; the thresholds may differ per layer (the
    base threshold is the config's)."""
    from neurosdm.neurons import QCFS, SpikingNeurons

    if any(isinstance(m, QCFS) for m in model.modules()):
        raise UnsupportedModelError("this is a QCFS ANN (activation 'qcfs'), which has no spiking form to export; "
                                    "convert it first: neurosdm convert ANN_CKPT --out SNN_CKPT")
    kinds = {(float(m.threshold_scale), float(m.decay), m.reset, float(m.v_init))
             for m in model.modules() if isinstance(m, SpikingNeurons)}
    if len(kinds) != 1:
        raise UnsupportedModelError(f"the exporter expects IF neurons with one threshold scale, reset and initial "
                                    f"membrane everywhere, found {sorted(kinds)}")
    scale, decay, reset, v_init = kinds.pop()
    if decay != 1.0:
        raise UnsupportedModelError(f"the exporter expects IF neurons (decay 1), got decay={decay}")
    return float(model.cfg.threshold), scale, reset, v_init


def _res_block(b: _Builder, name: str, block, x: _Stream, skip: _Stream | None, temb_table: np.ndarray) -> _Stream:
    """Lower one ResBlock (reading ``x`` and, in the up path, the concatenated ``skip``); returns its junction."""
    level = x.level
    out_ch = block.conv1.out_channels
    c1 = _conv_parts(block.conv1, block.bn1)
    c2 = _conv_parts(block.conv2, block.bn2)
    sizes = [x.channels] + ([skip.channels] if skip is not None else [])
    if sum(sizes) != block.conv1.in_channels:
        raise RuntimeError(f"{name}: input channels {sizes} do not match conv1 {block.conv1.in_channels}")
    zero = np.zeros((1, 1, out_ch * 4**level))

    # conv1 (+ its skip part) into IF2; the bias (BN shift and time embedding) sits on the main part
    parts1 = split_concat_conv(c1.weight, sizes)
    theta1 = b.threshold_of(block.neuron1)
    h1 = b.conv(f"{name}.conv1", b.spikes(x, theta1, name), _lower_3x3_or_1x1(parts1[0][0], level),
                _pack_table(c1.table(temb_table), level), 1, 1, out_ch, level, c1.tsm)
    feeders_if2 = [h1.node]
    if skip is not None:
        wq, stride, pad = _skip_conv(parts1[1][0], level)
        feeders_if2.append(b.conv(f"{name}.conv1_skip", b.spikes(skip, theta1, name), wq, zero, stride, pad, out_ch, level,
                                  c1.tsm).node)
    if2 = b.if_node(f"{name}.if2", (out_ch * 4**level, *x.hw), level, b.threshold_of(block.neuron2))
    for f in feeders_if2:
        b.edge(f, if2)
    h2 = b.conv(f"{name}.conv2", _Stream(if2, out_ch, level, x.hw), _lower_3x3_or_1x1(c2.weight, level),
                _pack_table(c2.table(), level), 1, 1, out_ch, level, c2.tsm)

    feeders = [h2.node]
    if isinstance(block.shortcut, nn.Conv2d):
        cs = _conv_parts(block.shortcut)
        parts = split_concat_conv(cs.weight, sizes)
        feeders.append(b.conv(f"{name}.shortcut", x, _lower_3x3_or_1x1(parts[0][0], level),
                              _pack_table(cs.table(), level), 1, 0, out_ch, level, cs.tsm).node)
        if skip is not None:
            wq, stride, pad = _skip_conv(parts[1][0], level)
            feeders.append(b.conv(f"{name}.shortcut_skip", skip, wq, zero, stride, pad, out_ch, level, cs.tsm).node)
    else:
        if skip is not None:
            raise UnsupportedModelError(f"{name}: an identity shortcut over a concatenation is not supported")
        feeders.append(x.node)
    return b.junction(f"{name}.sum", feeders, _Stream("", out_ch, level, x.hw))


def to_nir_graph(model, diffusion_step: int | None = None, diffusion: DiffusionConfig | None = None,
                 dtype=np.float32) -> tuple[nir.NIRGraph, dict]:
    """Export ``model`` (a :class:`~neurosdm.models.SpikingUNet`, eval semantics) as a float NIR graph.

    diffusion_step: the diffusion step whose time-embedding biases the graph holds (default 0); the biases of
        every step are in ``metadata["bias_tables"]`` (:func:`graph_at`).
    diffusion: the diffusion schedule recorded in the metadata (default: the linear DDPM schedule with the
        model's ``num_diffusion_steps``).
    dtype: dtype of the stored arrays (weights are folded and lowered in float64 first).

    Returns ``(graph, metadata)``; ``graph.metadata is metadata``. See the module docstring for the layout.
    """
    from neurosdm.models.spiking_unet import DownSample, ResBlock, UpSample

    cfg = model.cfg
    threshold, threshold_scale, reset, v_init = _check_model(model)
    stored = packed_weight_overhead(model)
    if stored["model_packed_stored"] > MAX_STORED_WEIGHTS:
        raise UnsupportedModelError(
            f"this model's up path has {stored['levels']} up-sampling levels: core NIR has no up-sampling node, and "
            f"the polyphase form stores {stored['model_packed_stored']:,} conv weights "
            f"({stored['model_packed_stored'] * 4 / 1e9:.1f} GB; 16x per level, {stored['model_original']:,} in the "
            f"model), above the limit of {MAX_STORED_WEIGHTS:,}; export models with at most 2 up-sampling levels "
            "(len(ch_mult) <= 3), see docs/export.md")
    n_diff = int(cfg.num_diffusion_steps)
    diffusion_step = 0 if diffusion_step is None else int(diffusion_step)
    if not 0 <= diffusion_step < n_diff:
        raise ConfigError(f"diffusion_step must lie in 0..{n_diff - 1}, got {diffusion_step}")
    if diffusion is None:
        diffusion = DiffusionConfig(num_diffusion_steps=n_diff)
    if int(diffusion.num_diffusion_steps) != n_diff:
        raise ConfigError(f"the diffusion schedule has {diffusion.num_diffusion_steps} steps but the model's time "
                          f"embedding has {n_diff}")
    from neurosdm.diffusion.schedules import make_betas

    b = _Builder(lambda m: float(m.threshold) * threshold_scale, v_init, dtype)
    with torch.no_grad():
        device = next(model.parameters()).device
        temb = model.time_embedding(torch.arange(n_diff, device=device))
        temb_tables = {id(m): _np64(m.temb_proj(temb)) for m in model.modules() if isinstance(m, ResBlock)}

    size = int(cfg.image_size)
    b.add("input", nir.Input(input_type={"input": np.array([cfg.img_ch, size, size])}), 0)
    x = _Stream("input", cfg.img_ch, 0, (size, size))

    def plain(name, src, conv, bn, stride, level_out, weight):
        c = _conv_parts(conv, bn)
        return b.conv(name, src, weight(c.weight), _pack_table(c.table(), level_out), stride, 1, conv.out_channels,
                      level_out, c.tsm)

    same = (lambda w: w)
    h = plain("stem.conv", x, model.conv, model.bn, 1, 0, same)
    h = plain("stem.conv_identity", b.spikes(h, b.threshold_of(model.neuron), "stem"), model.conv_identity,
              model.bn_identity, 1, 0, same)

    hs = [h]
    for i, layer in enumerate(model.downblocks):
        if isinstance(layer, ResBlock):
            h = _res_block(b, f"down{i}", layer, h, None, temb_tables[id(layer)])
        elif isinstance(layer, DownSample):
            h = plain(f"down{i}.conv", b.spikes(h, b.threshold_of(layer.neuron), f"down{i}"), layer.conv, layer.bn,
                      2, 0, same)
        else:
            raise UnsupportedModelError(f"unknown down block {type(layer).__name__}")
        hs.append(h)
    for i, layer in enumerate(model.middleblocks):
        h = _res_block(b, f"mid{i}", layer, h, None, temb_tables[id(layer)])
    for i, layer in enumerate(model.upblocks):
        if isinstance(layer, ResBlock):
            h = _res_block(b, f"up{i}", layer, h, hs.pop(), temb_tables[id(layer)])
        elif isinstance(layer, UpSample):
            lvl = h.level
            h = plain(f"up{i}.conv", b.spikes(h, b.threshold_of(layer.neuron), f"up{i}"), layer.conv, layer.bn, 1,
                      lvl + 1,
                      lambda w, lvl=lvl: packed_conv(pack_phases(upsample_conv_phases(w)), lvl))
        else:
            raise UnsupportedModelError(f"unknown up block {type(layer).__name__}")
    levels = h.level
    last = h

    metadata: dict = {
        "format": "neurosdm NIR export",
        "neurosdm_version": neurosdm.__version__,
        "quantized": "none",
        "dt": 1.0,
        "reset": "zero" if reset == "hard" else "subtract",
        "comparison": ">=",
        "discretisation": "euler",
        "num_steps": int(cfg.num_steps),
        "threshold": float(threshold),
        "threshold_scale": float(threshold_scale),
        "v_threshold": float(threshold * threshold_scale),
        "head": cfg.head,
        "tsm": int(bool(cfg.tsm)),
        "input_encoding": "direct: the analog image x_t (C, H, W) at every spiking step",
        "packed_levels": int(levels),
        "packing": "space_to_depth (pixel_unshuffle) applied packed_levels times; the host applies "
                   "neurosdm.lowering.depth_to_space(levels=packed_levels) to the output",
        "node_packing": {},
        "image_shape": np.array([cfg.img_ch, size, size]),
        "output_shape": np.array(last.shape) if cfg.head == "sdm" else np.array([cfg.img_ch * 4**levels, *last.hw]),
        "diffusion_step": int(diffusion_step),
        "num_diffusion_steps": n_diff,
        "bias_tables": {},
        "bias_table_rule": BIAS_TABLE_RULE,
        "scale_tables": {},
        "scale_table_rule": SCALE_TABLE_RULE,
        "diffusion": {
            "schedule": diffusion.schedule,
            "num_diffusion_steps": int(diffusion.num_diffusion_steps),
            "beta_start": float(diffusion.beta_start),
            "beta_end": float(diffusion.beta_end),
            "betas": make_betas(diffusion).numpy(),
        },
        "readout_decay": float(cfg.readout_decay),
    }

    if cfg.head == "spiking":
        # tail_bn on the last junction: scale into every conv feeding it, shift into conv2's bias
        scale, shift = affine_of_batchnorm(model.tail_bn)
        ps, pt = pack_bias(scale, levels), pack_bias(shift, levels)
        feeders = b.junction_feeders[last.node]
        if not all(f in b.conv_params for f in feeders):
            raise UnsupportedModelError("tail_bn folding needs a last junction fed by convs only")
        for f in feeders:
            p = b.conv_params[f]
            p[0] = p[0] * ps[:, None, None, None]
            p[1] = p[1] * ps
        conv2 = feeders[0]
        b.conv_params[conv2][1] = b.conv_params[conv2][1] + pt
        out = plain("tail.conv", b.spikes(last, b.threshold_of(model.tail_neuron), "tail"), model.tail_conv, None,
                    1, levels, lambda w: _lower_3x3_or_1x1(w, levels))
        d = 1.0 if cfg.readout == "mean" else float(cfg.readout_decay)
        if cfg.readout == "mean":  # eps = (1/K) sum_k tail_conv(s[k]): 1/K goes into the conv, the readout sums
            p = b.conv_params["tail.conv"]
            p[0], p[1] = p[0] / cfg.num_steps, p[1] / cfg.num_steps
        if d == 1.0:
            ro = nir.I(r=np.ones(out.shape, dtype))
        else:
            ro = nir.LI(tau=np.full(out.shape, 1.0 / (1.0 - d), dtype), r=np.full(out.shape, 1.0 / (1.0 - d), dtype),
                        v_leak=np.zeros(out.shape, dtype))
        b.add("tail.readout", ro, levels)
        b.edge(out.node, "tail.readout")
        b.add("output", nir.Output(output_type={"output": np.array(out.shape)}), levels)
        b.edge("tail.readout", "output")
        metadata["readout"] = "last_step"
        metadata["readout_rule"] = ("eps = depth_to_space(output[num_steps - 1], levels=packed_levels): the LI "
                                    "membrane at the last spiking step (tau = dt/(1-decay), r = 1/(1-decay), "
                                    "v_leak = 0, forward Euler, is v <- decay v + x)")
        if cfg.readout == "mean":
            metadata["readout_rule"] += ("; readout 'mean': decay 1 and tail.conv's weight and bias divided by "
                                         "num_steps, so the last step holds the time average")
        metadata["tail_bn_folding"] = (f"tail_bn scale folded into the convs feeding {last.node} "
                                       f"({', '.join(feeders)}), its shift into the bias of {conv2}")
    else:
        b.add("output", nir.Output(output_type={"output": np.array(last.shape)}), levels)
        b.edge(last.node, "output")
        ts, tsh = affine_of_batchnorm(model.tail_bn)
        ls, lsh = affine_of_batchnorm(model.last_bn)
        tail = _conv_parts(model.tail_conv)
        metadata["readout"] = "host_head"
        metadata["readout_rule"] = ("the output is the analog stream before tail_bn at every spiking step; "
                                    "neurosdm.exporters.nir.host_head(outputs, metadata) gives eps")
        metadata["host_head"] = {
            "tail_bn_scale": ts, "tail_bn_shift": tsh,
            "tail_conv_weight": tail.weight, "tail_conv_bias": tail.bias,
            "tail_conv_tsm": tail.tsm if tail.tsm is not None else np.ones(int(cfg.num_steps)),
            "T_output_weight": _np64(model.T_output_layer.weight[..., 0]),
            "T_output_bias": _np64(model.T_output_layer.bias),
            "last_bn_scale": ls, "last_bn_shift": lsh,
            "readout_decay": float(cfg.readout_decay),
            "average_input": float(cfg.readout == "mean"),
            "formula": "x = depth_to_space(output, packed_levels); if average_input: x = mean_k x[k] (one step); "
                       "h[k] = tail_conv_tsm[k] * conv3x3(silu(tail_bn(x[k])), "
                       "tail_conv); h = silu(last_bn(conv3x3(h, T_output))) + h; "
                       "eps = sum_k readout_decay**(num_steps-1-k) h[k]",
        }

    b.finish(diffusion_step)
    metadata["v_init"] = float(v_init)
    metadata["readout_mode"] = cfg.readout
    metadata["v_threshold"] = max(b.if_thresholds.values())  # the largest firing threshold (all equal: the one)
    if cfg.thresholds or v_init:  # per-layer thresholds / shifted membranes: no single base threshold to rescale
        del metadata["threshold"]
        metadata["if_thresholds"] = dict(b.if_thresholds)
    metadata["bias_tables"] = {name: p[1] for name, p in b.conv_params.items() if p[1].shape[:2] != (1, 1)}
    metadata["scale_tables"] = dict(b.scale_tables)
    metadata["node_packing"] = {k: int(v) for k, v in b.packing.items()}
    graph = nir.NIRGraph(nodes=b.nodes, edges=b.edges, metadata=metadata)
    return graph, metadata


def meta_value(metadata: dict, key: str, default=None):
    """A metadata value as written (``nir.read`` returns 0-d arrays and bytes for numbers and strings)."""
    v = metadata.get(key, default)
    if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v.item()
    if isinstance(v, bytes):
        v = v.decode("utf8")
    return v


def _table_index(table: np.ndarray, t: int, k: int):
    return table[t if table.shape[0] > 1 else 0, k if table.shape[1] > 1 else 0]


def graph_at(graph: nir.NIRGraph, metadata: dict | None, t: int, k: int = 0) -> nir.NIRGraph:
    """A copy of ``graph`` holding the parameters of diffusion step ``t`` and spiking step ``k``: every node in
    ``bias_tables`` gets its bias, every Scale node in ``scale_tables`` its scale (``BIAS_TABLE_RULE``,
    ``SCALE_TABLE_RULE``)."""
    metadata = dict(graph.metadata if metadata is None else metadata)
    n = int(meta_value(metadata, "num_diffusion_steps"))
    t, k = int(t), int(k)
    if not 0 <= t < n:
        raise ConfigError(f"diffusion step must lie in 0..{n - 1}, got {t}")
    nodes = dict(graph.nodes)
    for name, table in metadata.get("bias_tables", {}).items():
        node = nodes[name]
        nodes[name] = nir.Conv2d(input_shape=node.input_shape, weight=node.weight, stride=node.stride,
                                 padding=node.padding, dilation=node.dilation, groups=node.groups,
                                 bias=np.asarray(_table_index(np.asarray(table), t, k)).astype(node.weight.dtype))
    for name, table in metadata.get("scale_tables", {}).items():
        node = nodes[name]
        value = np.asarray(table).reshape(-1)
        nodes[name] = nir.Scale(scale=np.full(np.shape(node.scale), value[k if value.size > 1 else 0],
                                              np.asarray(node.scale).dtype))
    metadata["diffusion_step"] = t
    return nir.NIRGraph(nodes=nodes, edges=[tuple(e) for e in graph.edges], metadata=metadata)


def step_graphs(graph: nir.NIRGraph, metadata: dict | None, t: int) -> list[nir.NIRGraph]:
    """The graphs of the spiking steps of diffusion step ``t`` (one graph when no table varies with the spiking
    step), for ``run_graph(..., step_graphs=...)``."""
    metadata = dict(graph.metadata if metadata is None else metadata)
    varying = any(np.asarray(v).shape[1] > 1 for v in metadata.get("bias_tables", {}).values()) or \
        any(np.asarray(v).size > 1 for v in metadata.get("scale_tables", {}).values())
    k_steps = int(meta_value(metadata, "num_steps")) if varying else 1
    return [graph_at(graph, metadata, t, k) for k in range(k_steps)]


def with_diffusion_step(graph: nir.NIRGraph, metadata: dict | None, t: int) -> nir.NIRGraph:
    """``graph_at(graph, metadata, t, 0)``: enough for a graph without per-spiking-step tables (no TSM)."""
    return graph_at(graph, metadata, t, 0)


def _conv3x3(x: np.ndarray, w: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """``conv2d(x, w, bias, padding=1)`` for ``x [..., Cin, H, W]`` (float64 numpy)."""
    h, wd = x.shape[-2:]
    xp = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)])
    out = np.zeros((*x.shape[:-3], w.shape[0], h, wd))
    for ky in range(3):
        for kx in range(3):
            out += np.einsum("oi,...ihw->...ohw", w[:, :, ky, kx], xp[..., ky:ky + h, kx:kx + wd])
    return out + bias[:, None, None]


def _silu(z: np.ndarray) -> np.ndarray:
    return z / (1.0 + np.exp(-z))


def host_head(per_step_values: np.ndarray, metadata: dict) -> np.ndarray:
    """Finish the analog "sdm" head on the host: ``per_step_values [num_steps, B, C', H', W']`` (the graph's
    output at every spiking step, packed as the graph stores it) -> eps ``[B, img_ch, H, W]`` (float64)."""
    hh = metadata["host_head"]
    a = {k: np.asarray(v, dtype=np.float64) for k, v in hh.items() if k != "formula"}
    levels = int(meta_value(metadata, "packed_levels"))
    x = np.asarray(per_step_values, dtype=np.float64)
    if levels:
        x = depth_to_space(x, levels=levels)
    if float(a.get("average_input", 0.0)):  # readout "mean": the head runs once on the time-averaged stream
        x = x.mean(axis=0, keepdims=True)
    z = x * a["tail_bn_scale"][:, None, None] + a["tail_bn_shift"][:, None, None]
    p = a["tail_conv_tsm"].reshape(-1)[:x.shape[0]].reshape(-1, *([1] * (x.ndim - 1)))  # (averaged: 1 step)
    h = _conv3x3(_silu(z), a["tail_conv_weight"], a["tail_conv_bias"]) * p
    g = _conv3x3(h, a["T_output_weight"], a["T_output_bias"])
    h = _silu(g * a["last_bn_scale"][:, None, None] + a["last_bn_shift"][:, None, None]) + h
    return leaky_readout(h, float(a["readout_decay"]))


def eps_from_outputs(outputs: np.ndarray, metadata: dict) -> np.ndarray:
    """eps ``[B, img_ch, H, W]`` from the graph's output at every spiking step ``[num_steps, B, ...]``, for
    either head (spiking: the last step, unpacked; sdm: :func:`host_head`); a quantised export's integer output
    is first scaled by ``2**quant.output_exponent``."""
    out = np.asarray(outputs, dtype=np.float64)
    quant = metadata.get("quant")
    if isinstance(quant, dict):
        out = out * 2.0 ** int(np.asarray(quant["output_exponent"]))
    if meta_value(metadata, "head") == "sdm":
        return host_head(out, metadata)
    levels = int(meta_value(metadata, "packed_levels"))
    return depth_to_space(out[-1], levels=levels) if levels else out[-1]


def run_reference(graph: nir.NIRGraph, metadata: dict | None, x_t, t: int, record: bool = False, fixed="auto"):
    """One denoiser call of an exported graph in the reference interpreter: ``(eps [B, C, H, W], run_graph's
    result)`` for ``x_t [B, C, H, W]`` at diffusion step ``t``, with the per-step tables applied; a quantised
    export gets the host's input encoding and (``fixed="auto"``) its fixed-point arithmetic."""
    from neurosdm.exporters.fixed_point import quantize_input
    from neurosdm.simulators.reference import FixedPoint, run_graph

    md = graph.metadata if metadata is None else metadata
    if isinstance(fixed, str) and fixed == "auto":
        fixed = FixedPoint.from_metadata(md)
    x = np.asarray(x_t, np.float64)
    if isinstance(md.get("quant"), dict):
        x, _ = quantize_input(x, md)
    res = run_graph(graph, x[None], num_steps=int(meta_value(md, "num_steps")), record=record,
                    step_graphs=step_graphs(graph, md, t), fixed=fixed)
    return eps_from_outputs(res["outputs"]["output"], md), res


def graph_size(graph: nir.NIRGraph) -> dict:
    """Stored array sizes: ``{"nodes", "conv_weights", "conv_biases", "conv_nonzero", "neuron_params",
    "total"}`` (all arrays of all nodes, neuron parameters included in ``total``)."""
    conv_w = conv_b = nonzero = other = 0
    for node in graph.nodes.values():
        if isinstance(node, nir.Conv2d):
            conv_w += node.weight.size
            nonzero += int(np.count_nonzero(node.weight))
            conv_b += np.asarray(node.bias).size
        else:
            for field in ("r", "v_threshold", "v_reset", "tau", "v_leak", "scale"):
                v = getattr(node, field, None)
                if v is not None:
                    other += np.asarray(v).size
    return dict(nodes=len(graph.nodes), conv_weights=conv_w, conv_biases=conv_b, conv_nonzero=nonzero,
                neuron_params=other, total=conv_w + conv_b + other)


def default_output_path(ckpt_path: str | os.PathLike) -> Path:
    """``CKPT.nir`` next to a checkpoint file; ``DIR/model.nir`` for a run directory holding ``ckpt.pt``."""
    ckpt_path = Path(ckpt_path)
    if ckpt_path.is_dir():
        return ckpt_path / "model.nir"
    return ckpt_path.with_suffix(".nir")


def export_checkpoint(ckpt_path: str | os.PathLike, out_path: str | os.PathLike | None = None,
                      quantize: str = "none", force: bool = False, calibration: str | None = None,
                      data_dir: str | None = None, calibration_images: int = 64, seed: int = 0,
                      junctions: str = "scale") -> Path:
    """Export a checkpoint (any layout, EMA weights when present) as a NIR file; returns the written path.

    quantize: ``"none"`` (float32 graph) or ``"int8"`` (:mod:`neurosdm.exporters.fixed_point`, calibrated on
        ``calibration_images`` images of the dataset ``calibration`` (default: the checkpoint's training dataset)
        noised at 8 diffusion steps from ``seed``).
    junctions: ``"scale"`` (identity Scale nodes sum residual streams) or ``"edges"`` (the sums as fan-in edges
        into every consumer and an identity 1x1 conv before the Output, for readers without Scale:
        :func:`neurosdm.exporters.rewrite.inline_junctions`; see docs/peer-readers.md).

    The graph holds the biases of diffusion step 0 (all steps are in ``metadata["bias_tables"]``) and records the
    checkpoint's diffusion schedule, ``source_checkpoint`` (file name) and ``source_checkpoint_sha256``. The file
    is written atomically: an error or Ctrl-C leaves no partial output. An existing output is kept unless
    ``force``."""
    from neurosdm.checkpoint import build_model, file_sha256, load_checkpoint

    if quantize not in QUANTIZE_CHOICES:
        raise ConfigError(f"unknown --quantize {quantize!r}; expected one of {', '.join(QUANTIZE_CHOICES)}")
    if junctions not in JUNCTION_CHOICES:
        raise ConfigError(f"unknown --junctions {junctions!r}; expected one of {', '.join(JUNCTION_CHOICES)}")
    if calibration_images < 1:
        raise ConfigError(f"--calibration-images must be at least 1, got {calibration_images}")
    ckpt_path = Path(ckpt_path)
    out_path = default_output_path(ckpt_path) if out_path is None else Path(out_path)
    if out_path.is_dir():
        raise ConfigError(f"output {out_path} is a directory; pass a file name such as {out_path / 'model.nir'}")
    if out_path.exists() and not force:
        raise ConfigError(f"output {out_path} already exists; use --force to overwrite it")
    ckpt = load_checkpoint(ckpt_path)
    state = ckpt.ema_state if ckpt.ema_state is not None else ckpt.model_state
    model = build_model(ckpt.config.model, state, source=str(ckpt_path)).eval()
    graph, metadata = to_nir_graph(model, diffusion=ckpt.config.diffusion,
                                   dtype=np.float32 if quantize == "none" else np.float64)
    if quantize == "int8":
        graph, metadata = _quantize(graph, metadata, ckpt.config, calibration, data_dir, calibration_images, seed)
    if junctions == "edges":
        from neurosdm.exporters.rewrite import inline_junctions

        graph = inline_junctions(graph, metadata, output_junction="conv")  # no Scale left: spikingjelly reads it
        metadata = graph.metadata
    ckpt_file = ckpt_path / "ckpt.pt" if ckpt_path.is_dir() else ckpt_path
    metadata["source_checkpoint"] = ckpt_file.name
    metadata["source_checkpoint_sha256"] = file_sha256(ckpt_file)
    metadata["weights"] = "ema" if ckpt.ema_state is not None else "model"
    with atomic_path(out_path) as tmp:
        nir.write(tmp, graph)
    return out_path


def _quantize(graph, metadata, config, calibration, data_dir, n_images: int, seed: int):
    """PTQ of an exported graph on real images (see :func:`export_checkpoint`)."""
    from neurosdm.data import load_dataset
    from neurosdm.exporters.fixed_point import calibrate, calibration_inputs, quantize_graph

    from neurosdm.errors import DatasetError

    cfg = config.model
    name = calibration or config.train.dataset
    try:
        images = load_dataset(name, data_dir or config.train.data_dir, split="train", image_size=cfg.image_size,
                              limit=n_images)
    except DatasetError:
        if calibration is not None or (cfg.img_ch, cfg.image_size) != (1, 28):
            raise
        name = "builtin"  # the training set is not on this machine: the shipped Fashion-MNIST sample (recorded)
        images = load_dataset(name, split="train", limit=n_images)
    if tuple(images.shape[1:]) != (cfg.img_ch, cfg.image_size, cfg.image_size):
        raise ConfigError(f"calibration data {name!r} has images {tuple(images.shape[1:])}, the model takes "
                          f"{(cfg.img_ch, cfg.image_size, cfg.image_size)}; pass --calibration DATASET")
    cal = calibrate(graph, metadata, calibration_inputs(images, config.diffusion, seed=seed))
    graph, metadata = quantize_graph(graph, metadata, cal)
    metadata["quant"]["calibration"]["dataset"] = str(name)
    return graph, metadata


_WEIGHTED = (nir.Conv2d, nir.Affine, nir.Linear) + ((nir.Conv1d,) if hasattr(nir, "Conv1d") else ())


def _array_size(v) -> int:
    if isinstance(v, dict):
        return sum(_array_size(x) for x in v.values())
    if isinstance(v, np.ndarray) and v.dtype.kind == "f":  # weights and neuron parameters, not shapes or strides
        return int(v.size)
    return 0


def _topological_order(names: list[str], edges: list[tuple]) -> list[str]:
    """Nodes from the inputs to the outputs (``nir.read`` returns them sorted by name); nodes on a cycle come
    last, in name order."""
    indeg = {n: 0 for n in names}
    succ: dict[str, list[str]] = {n: [] for n in names}
    for src, dst in edges:
        succ[src].append(dst)
        indeg[dst] += 1
    ready = [n for n in names if indeg[n] == 0]
    order = []
    while ready:
        n = ready.pop(0)
        order.append(n)
        for m in succ[n]:
            indeg[m] -= 1
            if indeg[m] == 0:
                ready.append(m)
    return order + [n for n in names if n not in set(order)]


def inspect_nir(path: str | os.PathLike) -> tuple[list[dict], dict]:
    """Read a NIR file and summarise it: one row per node ``{"name", "type", "shape", "synapses", "fan_in",
    "params"}`` and totals ``{"nodes", "edges", "synapses", "params", "file_bytes", "metadata"}``.

    synapses: the weight size of Conv2d/Affine/Linear nodes (0 otherwise); fan_in: incoming edges; params: the
    size of every float array of the node (weights, biases, neuron parameters; not shapes or strides).
    Raises :class:`GraphError` (one line) for a file nir cannot read and for an invalid graph (an edge to a
    missing node, no Input or no Output node; ``nir.read`` already rejects most of these)."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise GraphError(f"NIR file not found: {path}")
    if path.is_dir():
        raise GraphError(f"{path} is a directory; pass a .nir file")
    if not h5py.is_hdf5(path):
        raise GraphError(f"{path} is not a NIR file (found {describe_head(path)}); expected an HDF5 file written "
                         f"by nir.write")
    try:
        graph = nir.read(path)
    except Exception as e:  # truncated HDF5, unknown node types, missing fields, ...
        raise GraphError(f"{path} is truncated or not a readable NIR graph: {type(e).__name__}: {first_line(e)}") \
            from None
    if not isinstance(graph, nir.NIRGraph):
        raise GraphError(f"{path} holds a single {type(graph).__name__} node, not a NIR graph")
    edges = [tuple(e) for e in graph.edges]
    missing = sorted({n for e in edges for n in e if n not in graph.nodes})
    if missing:
        raise GraphError(f"{path}: edges refer to nodes that do not exist: {', '.join(missing[:5])}")
    kinds = {type(n) for n in graph.nodes.values()}
    for needed in (nir.Input, nir.Output):
        if needed not in kinds:
            raise GraphError(f"{path}: the graph has no {needed.__name__} node")
    fan_in = {name: 0 for name in graph.nodes}
    for _, dst in edges:
        fan_in[dst] += 1
    rows = []
    for name in _topological_order(list(graph.nodes), edges):
        node = graph.nodes[name]
        out_types = (getattr(node, "output_type", None) or {}).values()
        shapes = [tuple(int(d) for d in np.asarray(v).ravel()) for v in out_types]
        synapses = int(np.asarray(node.weight).size) if isinstance(node, _WEIGHTED) else 0
        params = sum(_array_size(v) for k, v in vars(node).items()
                     if k not in ("input_type", "output_type", "metadata"))
        rows.append(dict(name=name, type=type(node).__name__,
                         shape=" ".join("x".join(map(str, s)) for s in shapes) or "-",
                         synapses=synapses, fan_in=fan_in[name], params=params))
    totals = dict(nodes=len(rows), edges=len(edges), synapses=sum(r["synapses"] for r in rows),
                  params=sum(r["params"] for r in rows), file_bytes=path.stat().st_size,
                  metadata=dict(graph.metadata or {}))
    return rows, totals
