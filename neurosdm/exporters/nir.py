"""Export of a :class:`~neurosdm.models.SpikingUNet` (TSM or not, either head) to a core-NIR graph.

``graph, metadata = to_nir_graph(model, diffusion_step)`` builds the whole spiking denoiser out of core NIR nodes
(Input, Conv2d, Scale, IF, LI, Output) with the exact rewrites of :mod:`neurosdm.lowering`. ``metadata`` is also
stored as ``graph.metadata`` (so ``nir.write`` keeps it); every value is a str, a number, an array or a dict of
those (NIR metadata cannot hold None).

Semantics (recorded in the metadata; :mod:`neurosdm.graph.dialect` reads them): discrete steps with ``dt = 1``,
IF neurons ``v <- v + x`` firing on ``v >= v_threshold``, reset to ``v_reset``, every neuron starting at 0 at each
network call; converted SNNs (:mod:`neurosdm.convert`: per-layer thresholds, reset by subtraction, initial membrane
``a theta``) store the membrane shifted by ``-a theta`` (``v_threshold = (1 - a) theta``, ``v_reset = -a theta``).
IF nodes on a stream are shared by the consumers whose neurons are identical; a consumer with another threshold
gets its own node ``<stream>.if@<block>``. The single Input node ``"input"`` takes the analog image x_t ``(C, H,
W)`` at every one of the ``num_steps`` spiking steps (direct encoding). Model semantics are eval-mode (BatchNorm
running statistics).

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
- up-sampling (``upsample``, :func:`neurosdm.exporters.packing.upsample_form`): ``"extension"`` writes the dialect's
  up-sampling node (:data:`neurosdm.graph.dialect.UPSAMPLE_RULE`) ``up<i>.upsample`` between the IF node and the
  model's own 3x3 conv, so the file stores the model's weights; ``"polyphase"`` stays in core NIR: after the L-th
  ``UpSample`` every map lives space-to-depth packed L times on the grid of the
  lowest resolution (``C * 4**L`` channels, channel ``c * 4**L + phase``, see :mod:`neurosdm.lowering`). The
  up-sampling conv is the polyphase form, convs between packed maps are ``packed_conv``, a skip from the unpacked
  down path into a packed map is a strided ``full_to_packed_conv``. ``metadata["node_packing"]`` gives the
  packing level of every node's output, ``metadata["packed_levels"]`` that of the graph's output;
- the time embedding (non-spiking MLP) is, per ResBlock, a per-channel bias added before IF2: it is put into the
  bias of ``<blk>.conv1`` (after BN folding). ``metadata["bias_tables"][node]`` is ``[num_diffusion_steps, C']``,
  the TOTAL bias of that node at every diffusion step; rule (``metadata["bias_table_rule"]``): at diffusion step
  ``t`` set ``node.bias := bias_tables[node][t]`` (:func:`neurosdm.graph.dialect.graph_at`). The graph as returned
  holds the biases of ``diffusion_step`` (``metadata["diffusion_step"]``).

Heads:

- ``"spiking"``: ``tail_bn -> IF -> tail_conv -> leaky readout (decay d)``. ``tail_bn`` acts on the last junction
  (a sum): its scale is folded into every conv feeding that junction (weights and biases) and its shift added to
  the bias of the block's ``conv2``, so that junction (``<blk>.sum``) carries ``tail_bn(h)``. The readout is a
  ``nir.LI`` with ``tau = dt / (1 - d)``, ``r = 1 / (1 - d)``, ``v_leak = 0``: forward Euler
  ``v <- v + dt/tau (v_leak - v + r x)`` is ``v <- d v + x`` (``nir.I`` with ``r = 1`` if ``d = 1``). The output
  is the LI membrane; eps is its value at the last spiking step (``metadata["readout"] = "last_step"``),
  unpacked by the host with ``depth_to_space`` (:func:`neurosdm.graph.host.eps_from_outputs`).
- ``"sdm"``: the Swish head is analog and stays on the host: the graph ends at the last junction (the analog
  boundary before ``tail_bn``) and its Output gives that junction's value at every spiking step.
  ``metadata["host_head"]`` holds the head's weights and :func:`neurosdm.graph.host.host_head` (numpy) finishes
  the computation.

TSM (a learnable per-spiking-step scale ``p[k]`` on every conv's output, bias included, before its BN): a per-step
scale cannot be a time-invariant NIR weight, so it moves to the conv's input,
``BN(p[k] (W x + b)) = W' (p[k] x) + (p[k] b' + shift)`` (``W' = scale W``, ``b' = scale b``): a ``nir.Scale``
node ``<conv>.tsm`` sits between the conv and its source (for spikes it makes them graded, payload ``p[k]``), and
the conv's bias varies with the spiking step. Both are tables in the metadata: ``scale_tables[<conv>.tsm]`` is
``[num_steps]`` (rule ``scale_table_rule``) and the conv's ``bias_tables`` entry ``[A, num_steps, C]``. A
simulator applies them with :func:`neurosdm.graph.dialect.table_entry` (``Program.step_params``, ``graph_at``);
the stored nodes hold spiking step 0.

Quantisation to Loihi-style fixed point is a separate pass over this graph
(:mod:`neurosdm.exporters.fixed_point`); loading, calibration, quantisation, rewrites and writing a file are
:mod:`neurosdm.exporters.pipeline`.
"""

from __future__ import annotations

from dataclasses import dataclass

import nir
import numpy as np
import torch
from torch import nn

import neurosdm
from neurosdm.config import DiffusionConfig
from neurosdm.diffusion.schedules import make_betas
from neurosdm.dynamics import Reset
from neurosdm.errors import ConfigError, NeuroSDMError
from neurosdm.exporters.packing import UnsupportedModelError, upsample_form
from neurosdm.graph.dialect import BIAS_TABLE_RULE, SCALE_TABLE_RULE, UPSAMPLE_RULE, upsample_node
from neurosdm.lowering import (
    affine_of_batchnorm,
    full_to_packed_conv,
    pack_bias,
    pack_phases,
    packed_conv,
    split_concat_conv,
    upsample_conv_phases,
)
from neurosdm.models.spiking_unet import DownSample, ResBlock, UpSample
from neurosdm.neurons import QCFS, SpikingNeurons

__all__ = ["UnsupportedModelError", "to_nir_graph"]



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

    def upsample(self, name: str, src: _Stream) -> _Stream:
        """The dialect's up-sampling node (nearest, x2) reading ``src`` (an unpacked map)."""
        self.add(name, upsample_node(src.shape, (2, 2), self.dtype), 0)
        self.edge(src.node, name)
        return _Stream(name, src.channels, 0, (2 * src.hw[0], 2 * src.hw[1]))

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
                 dtype=np.float32, upsample: str = "auto") -> tuple[nir.NIRGraph, dict]:
    """Export ``model`` (a :class:`~neurosdm.models.SpikingUNet`, eval semantics) as a float NIR graph.

    diffusion_step: the diffusion step whose time-embedding biases the graph holds (default 0); the biases of
        every step are in ``metadata["bias_tables"]`` (:func:`neurosdm.graph.dialect.graph_at`).
    diffusion: the diffusion schedule recorded in the metadata (default: the linear DDPM schedule with the
        model's ``num_diffusion_steps``).
    dtype: dtype of the stored arrays (weights are folded and lowered in float64 first).
    upsample: the up-sampling form, :func:`upsample_form` (``"auto"``, ``"polyphase"``, ``"extension"``).

    Returns ``(graph, metadata)``; ``graph.metadata is metadata``. See the module docstring for the layout.
    """
    cfg = model.cfg
    threshold, threshold_scale, reset, v_init = _check_model(model)
    form = upsample_form(model, upsample)
    n_diff = int(cfg.num_diffusion_steps)
    diffusion_step = 0 if diffusion_step is None else int(diffusion_step)
    if not 0 <= diffusion_step < n_diff:
        raise ConfigError(f"diffusion_step must lie in 0..{n_diff - 1}, got {diffusion_step}")
    if diffusion is None:
        diffusion = DiffusionConfig(num_diffusion_steps=n_diff)
    if int(diffusion.num_diffusion_steps) != n_diff:
        raise ConfigError(f"the diffusion schedule has {diffusion.num_diffusion_steps} steps but the model's time "
                          f"embedding has {n_diff}")
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
        elif isinstance(layer, UpSample) and form == "extension":
            u = b.upsample(f"up{i}.upsample", b.spikes(h, b.threshold_of(layer.neuron), f"up{i}"))
            h = plain(f"up{i}.conv", u, layer.conv, layer.bn, 1, 0, same)
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
        "reset": Reset.parse(reset).value,
        "comparison": ">=",
        "discretisation": "euler",
        "num_steps": int(cfg.num_steps),
        "threshold": float(threshold),
        "threshold_scale": float(threshold_scale),
        "v_threshold": float(threshold * threshold_scale),
        "head": cfg.head,
        "tsm": int(bool(cfg.tsm)),
        "input_encoding": "direct: the analog image x_t (C, H, W) at every spiking step",
        "upsample": form,
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
                                    "neurosdm.graph.host.host_head(outputs, metadata) gives eps")
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
    if form == "extension":
        metadata["upsample_rule"] = UPSAMPLE_RULE
    graph = nir.NIRGraph(nodes=b.nodes, edges=b.edges, metadata=metadata)
    return graph, metadata

