"""The feature suite of the interop matrix: one small graph per feature neurosdm writes, cut from exports of tiny
SpikingUNets (image 8x8, ch 4, ch_mult (1, 2), 4 spiking steps, random BatchNorm statistics and biases from a fixed
seed, so that folding is exercised and the neurons neither stay silent nor all fire), plus one graph neurosdm's UNet
does not write (a LIF with leak, made with ``nir`` directly in neurosdm's conventions, dt 1); and their inputs.

Exporting is a layer above the simulators: :func:`feature_graphs` takes the export as a function
(``neurosdm.exporters.nir.to_nir_graph``, and the fixed-point calibration for the int8 row) and cuts the features
from what it returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import nir
import numpy as np
import torch

import neurosdm
from neurosdm.config import ModelConfig
from neurosdm.models import SpikingUNet
from neurosdm.simulators.peers.base import BATCH, NUM_STEPS, SEED, io_shape

FEATURES = {
    "conv_if": "conv + IF stack: input -> stem.conv -> IF -> stem.conv_identity -> IF -> output (spikes out)",
    "residual": "residual fan-in: stem + the first ResBlock as exported: conv2 and the identity skip meet at the "
                "Scale junction down0.sum, then down0.sum.if (spikes out)",
    "split_skip": "split skip: the two convs of a concatenation (up0.conv1, up0.conv1_skip) summed at up0.if2; "
                  "here both read the same spike input",
    "upsample": "up-sampling form: up2.conv (the polyphase form of nearest x2 + 3x3 conv: 4 sub-pixel phases "
                "as output channels) -> IF, spike input",
    "upsample_extension": "up-sampling extension node (neurosdm's, for deep UNets; neurosdm.graph.dialect."
                          "UPSAMPLE_RULE): up2.upsample (nearest x2) -> up2.conv (the model's 3x3 conv) -> IF, spike "
                          "input",
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


def perturb_batchnorm(mod) -> None:
    """Random running statistics and affine parameters for a BatchNorm2d (anything else is left alone), so that
    folding BN into the convs is exercised (call under ``torch.no_grad()``)."""
    if isinstance(mod, torch.nn.BatchNorm2d):
        mod.running_mean.uniform_(-0.5, 0.5)
        mod.running_var.uniform_(0.5, 2.0)
        mod.weight.uniform_(0.5, 1.5)
        mod.bias.uniform_(-0.3, 0.3)


def tiny_unet(head: str, seed: int = SEED) -> SpikingUNet:
    """A tiny SpikingUNet in eval mode (8x8, ch 4, ch_mult (1, 2): one up level, so the polyphase up-sampling form
    and split skip convs; ``head``: "sdm" or "spiking" (LI readout); ``NUM_STEPS`` spiking steps) with random
    BatchNorm statistics, Conv2d/Linear biases and tail conv weights from ``seed``."""
    torch.manual_seed(seed)
    cfg = ModelConfig(img_ch=1, image_size=8, ch=4, ch_mult=(1, 2), num_res_blocks=1, num_steps=NUM_STEPS,
                      num_diffusion_steps=50, head=head, threshold_scale=0.97)
    model = SpikingUNet(cfg)
    with torch.no_grad():
        for mod in model.modules():
            perturb_batchnorm(mod)
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)) and mod.bias is not None:
                mod.bias.uniform_(-0.3, 0.3)
        model.tail_conv.weight.normal_(0.0, 0.3)
    return model.eval()


def cut(graph: nir.NIRGraph, edges: list[tuple[str, str]], input_shape=None) -> nir.NIRGraph:
    """A sub-graph: the nodes named in ``edges`` (read from ``graph``; "input" and "output" are new Input/Output
    nodes, the Input of ``input_shape`` or the exported one, the Output of its feeder's shape)."""
    names = [n for e in edges for n in e if n not in ("input", "output")]
    nodes = {"input": nir.Input(input_type={"input": np.array(input_shape)}) if input_shape is not None
             else graph.nodes["input"]}
    for n in dict.fromkeys(names):
        nodes[n] = graph.nodes[n]
    last = next(a for a, b in edges if b == "output")
    nodes["output"] = nir.Output(output_type={"output": np.array(io_shape(graph.nodes[last]))})
    # a cut is not a denoiser: it keeps the discretisation and fixed-point keys, not the denoiser's own
    md = {k: v for k, v in graph.metadata.items() if k not in ("bias_tables", "scale_tables", "node_packing",
                                                                 "image_shape", "diffusion", "host_head",
                                                                 "output_shape", "packed_levels")}
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


def feature_graphs(export: Callable[[SpikingUNet, bool], nir.NIRGraph],
                   shipped: Callable[[], nir.NIRGraph] | None = None) -> dict[str, tuple[nir.NIRGraph, str]]:
    """``{feature: (graph, input kind)}`` (input kinds: :func:`make_input`; descriptions: ``FEATURES``).
    ``export(model, quantize, upsample)``: the NIR graph of a :func:`tiny_unet` (float32, or with ``quantize`` int8
    fixed point; ``upsample`` as ``to_nir_graph``'s); ``shipped()``: the whole shipped checkpoint's export (the
    ``whole_shipped`` row; left out when None)."""
    sdm, spk, q = (export(tiny_unet("sdm"), False, "auto"), export(tiny_unet("spiking"), False, "auto"),
                   export(tiny_unet("sdm"), True, "auto"))
    ext = export(tiny_unet("sdm"), False, "extension")
    mid = io_shape(sdm.nodes["mid1.sum.if"])
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
                         io_shape(sdm.nodes["up1.sum.if"])), "spikes"),
        "upsample_extension": (cut(ext, [("input", "up2.upsample"), ("up2.upsample", "up2.conv"),
                                         ("up2.conv", "up2.conv.if"), ("up2.conv.if", "output")],
                                   io_shape(ext.nodes["up1.sum.if"])), "spikes"),
        "lif_leak": (lif_graph(), "image"),
        "li_readout": (cut(spk, [("input", "tail.conv"), ("tail.conv", "tail.readout"), ("tail.readout", "output")],
                           io_shape(spk.nodes["up4.sum.if"])), "spikes"),
        "whole": (sdm, "image"),
        **({"whole_shipped": (shipped(), "fashion")} if shipped is not None else {}),
        "int8_conv_if": (cut(q, [("input", "mid0.conv1"), ("mid0.conv1", "mid0.if2"), ("mid0.if2", "output")],
                             io_shape(q.nodes["down2.sum.if"])), "sparse_spikes"),
    }


def make_input(graph: nir.NIRGraph, kind: str, seed: int = SEED) -> np.ndarray:
    """``[batch, *input shape]`` float32, the same at every step, from ``seed``: "image": standard Gaussian noise,
    batch ``BATCH``; "spikes": 0/1 with probability 0.3, batch ``BATCH``; "sparse_spikes": 0/1 with probability
    0.1, batch 64 (enough neuron-steps for a few integer membranes to land exactly on the threshold); "fashion":
    the first ``BATCH`` bundled Fashion-MNIST test images in [-1, 1], times 0.8, plus 0.6 standard Gaussian noise."""
    shape = io_shape(graph.nodes["input"], "input")
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
