"""ANN baselines and the SDM paper's energy formula, beside the pricing of a run (:mod:`neurosdm.energy.pricing`).

ANN baselines (:func:`ann_baseline`): the same architecture with every synapse a dense MAC, evaluated once per
network call (not once per spiking step), from an exported :class:`~neurosdm.graph.program.Program`
(:func:`program_macs`: nonzero weights x valid positions, structural zeros and padding excluded, i.e. RunStats'
``macs`` formula with an all-ones input: :func:`neurosdm.graph.geometry.fanout` summed) or from a torch model
(:func:`model_macs`, forward hooks; ``padding`` "dense" counts every tap as thop-style FLOP counters do, "valid"
skips the taps on padding). Per image, a baseline costs ``pj_per_call`` x the network calls of the run
(:func:`ann_per_image`), and a priced run's ratio to it is :func:`snn_to_ann_ratio`; :func:`with_ann_baseline`
adds both to a report of :func:`neurosdm.energy.estimate`.

The SDM paper's formula (:func:`paper_energy`): ``E = 4.6 pJ x FLOPs(first conv) + 0.9 pJ x sum_l fr_l x T x
FLOPs_l``. :func:`paper_check` gives its ANN figure on the paper-cifar10 architecture (29.23 mJ in the paper).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from neurosdm.config import preset
from neurosdm.errors import ConfigError
from neurosdm.graph.geometry import fanout, valid_taps
from neurosdm.graph.program import Program
from neurosdm.hardware.profiles import Profile, load_profile
from neurosdm.models.spiking_unet import SpikingUNet
from neurosdm.simulators.run import host_counts

__all__ = ["program_macs", "model_macs", "ann_baseline", "ann_per_image", "snn_to_ann_ratio", "with_ann_baseline",
           "firing_rates", "paper_energy", "paper_check", "PAPER_ANN_MJ", "PAPER_SNN_MJ"]

PAPER_ANN_MJ = 29.23  # DDPM-ANN per network evaluation of one CIFAR-10 image (SDDPM/SDM papers)
PAPER_SNN_MJ = {4: 10.97, 8: 22.96}  # SDDPM-4T, SDDPM-8T


# ------------------------------------------------------------------------------------------------ ANN baselines

def program_macs(program) -> dict[str, int]:
    """Per conv layer of an exported :class:`Program`: the dense MACs of one spiking step of one image, i.e. every
    input position times its nonzero fan-out inside the output map (structural zeros of packed/polyphase weights
    and padding taps excluded; equals RunStats' ``macs`` formula with an all-ones input):
    ``sum(fanout(weight, in_shape, stride, padding))`` (:func:`neurosdm.graph.geometry.fanout`)."""
    return {layer.name: int(fanout(layer.weight, layer.in_shape, layer.stride, layer.padding).sum())
            for layer in program.layers if layer.kind == "conv"}


def model_macs(model, image_shape=None, padding: str = "dense", include_linear: bool = False) -> dict[str, int]:
    """Per layer of a torch :class:`SpikingUNet` (forward hooks; built on the meta device it costs no memory): the
    MACs of ONE network evaluation of one image as an ANN (every conv once, not once per spiking step).
    ``padding="dense"``: every tap of every output (thop-style); ``"valid"``: taps on padding excluded. The SDM
    head's Conv3d (``T_output_layer``, applied functionally) is added by hand; the time-embedding MLP and the
    ``temb_proj`` linears only with ``include_linear``."""
    if padding not in ("dense", "valid"):
        raise ConfigError(f"padding must be 'dense' or 'valid', got {padding!r}")
    cfg = model.cfg
    c, s = (cfg.img_ch, cfg.image_size) if image_shape is None else (image_shape[0], image_shape[1])
    device = next(model.parameters()).device
    rec: dict[str, int] = {}

    def conv_macs(mod, H, W, Ho, Wo):
        if padding == "dense":
            return Ho * Wo * mod.in_channels * mod.out_channels * int(np.prod(mod.kernel_size)) // mod.groups
        rows = sum(valid_taps(H, mod.padding[0], k, mod.stride[0], Ho) for k in range(mod.kernel_size[0]))
        cols = sum(valid_taps(W, mod.padding[1], k, mod.stride[1], Wo) for k in range(mod.kernel_size[1]))
        return rows * cols * mod.in_channels * mod.out_channels // mod.groups

    def hook(name):
        def fn(mod, inp, out):
            if isinstance(mod, nn.Conv2d):
                H, W = inp[0].shape[-2:]
                Ho, Wo = out.shape[-2:]
                rec[name] = rec.get(name, 0) + conv_macs(mod, H, W, Ho, Wo)  # per image per step
            elif include_linear:
                rec[name] = rec.get(name, 0) + mod.in_features * mod.out_features  # once per call
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(torch.zeros(1, c, s, s, device=device), torch.zeros(1, dtype=torch.long, device=device))
    finally:
        for h in handles:
            h.remove()
    t_out = getattr(model, "T_output_layer", None)
    if t_out is not None:  # a per-step 2-D 3x3 conv, applied with F.conv2d (no hook sees it)
        conv2d = nn.Conv2d(t_out.in_channels, t_out.out_channels, 3, padding=1, device="meta")
        rec["T_output_layer"] = conv_macs(conv2d, s, s, s, s)
    return rec


def ann_baseline(source, profile: str | Profile = "cmos45-fp32", padding: str = "dense") -> dict:
    """The ANN of the same architecture, priced with ``profile``'s ``mac``: per network call of one image.
    ``source``: a Program (:func:`program_macs`, plus the SDM head's host convs once) or a torch model
    (:func:`model_macs` with ``padding``). Returns ``layers`` (MACs), ``macs``, ``mac_pj``, ``pj_per_call``."""
    prof = load_profile(profile)
    if "mac" not in prof.energy:
        raise ConfigError(f"profile {prof.name!r} has no 'mac' price: it cannot price an ANN baseline")
    if isinstance(source, Program):
        layers = program_macs(source)
        try:
            head = host_counts(source, 1)["host_macs"] // max(source.num_steps, 1)
        except (KeyError, ConfigError):
            head = 0
        if head:
            layers["host_head"] = int(head)
        convention = "exported graph: nonzero weights x valid positions, once per call; SDM host head once"
    else:
        layers = model_macs(source, padding=padding)
        convention = f"torch model: every conv once per call ({padding} taps); time-embedding MLP excluded"
    macs = int(sum(layers.values()))
    e = prof.energy["mac"].value
    return {"profile": prof.name, "mac_pj": e, "layers": layers, "macs": macs, "pj_per_call": macs * e,
            "convention": convention}


def ann_per_image(base: dict, calls: int) -> dict:
    """Set ``base["pj_per_image"]``: an :func:`ann_baseline` (priced per network call of one image) times the
    ``calls`` network calls (denoising steps) of one image. Returns ``base``."""
    base["pj_per_image"] = base["pj_per_call"] * calls
    return base


def snn_to_ann_ratio(report: dict, base: dict) -> float | None:
    """Energy per image of a priced run (a report of :func:`neurosdm.energy.estimate`) over that of an ANN
    baseline with ``pj_per_image`` (:func:`ann_per_image`); None when the baseline costs nothing."""
    return report["totals"]["per_image_pj"] / base["pj_per_image"] if base["pj_per_image"] else None


def with_ann_baseline(report: dict, program, baseline: str) -> dict:
    """Add to ``report`` (of :func:`neurosdm.energy.estimate`) ``ann_baseline``: :func:`ann_baseline` of
    ``program`` priced with the profile ``baseline``, with ``pj_per_image`` (per call x the report's denoising
    steps) and ``ratio_snn_to_ann`` (the run's energy per image over the baseline's; None if that is 0). Returns
    ``report``."""
    base = ann_per_image(ann_baseline(program, baseline), report["denoising_steps"])
    base["ratio_snn_to_ann"] = snn_to_ann_ratio(report, base)
    report["ann_baseline"] = base
    return report


# ------------------------------------------------------------------------------------------- the paper's formula

def firing_rates(stats, program) -> dict[str, float]:
    """Per conv layer of ``program``: the fraction of its input elements that are nonzero, averaged over spiking
    steps, denoising steps and images (``events_in / (input size x steps x images)``): the firing rate for a
    spike input."""
    D = len(stats.timesteps)
    n = max(int(stats.images), 1) * D * int(stats.num_steps)
    out = {}
    for layer in program.layers:
        if layer.kind == "conv" and layer.name in stats.layers and "events_in" in stats.layers[layer.name]:
            size = int(np.prod(layer.in_shape))
            out[layer.name] = float(stats.layers[layer.name]["events_in"].sum()) / (size * n)
    return out


def paper_energy(flops: dict[str, int], rates: dict[str, float] | float, num_steps: int, first: str,
                 e_mac_pj: float = 4.6, e_ac_pj: float = 0.9) -> dict:
    """The SDDPM/SDM papers' energy of one network evaluation of one image:
    ``E = e_mac x FLOPs(first) + e_ac x sum_{l != first} rate_l x num_steps x FLOPs_l``.
    ``flops``: per layer MACs of one evaluation (e.g. :func:`model_macs`, :func:`program_macs`); ``rates``: per
    layer firing rate of its input, or one rate for all. Returns ``total_pj``, ``first_pj``, ``sops``, per-layer
    ``layers_pj`` and ``mean_rate`` (FLOPs-weighted)."""
    if first not in flops:
        raise ConfigError(f"first layer {first!r} is not among the layers")
    layers = {first: e_mac_pj * flops[first]}
    sops = 0.0
    weighted = 0.0
    for name, f in flops.items():
        if name == first:
            continue
        r = float(rates) if not isinstance(rates, dict) else rates.get(name)
        if r is None:
            raise ConfigError(f"no firing rate for layer {name!r}")
        s = r * num_steps * f
        sops += s
        weighted += r * f
        layers[name] = e_ac_pj * s
    rest = sum(f for n, f in flops.items() if n != first)
    return {"total_pj": float(sum(layers.values())), "first_pj": layers[first], "sops": sops,
            "layers_pj": layers, "mean_rate": weighted / rest if rest else 0.0}


def paper_check(include_conv_identity: bool = True, padding: str = "dense", include_linear: bool = False,
                num_steps: int = 4) -> dict:
    """The paper-cifar10 architecture built on the meta device: the ANN energy per network evaluation of one
    image with the paper's 4.6 pJ per MAC (``ann_mj``, against :data:`PAPER_ANN_MJ`) and the implied firing rate
    of the SNN figure (:data:`PAPER_SNN_MJ`) under the same FLOPs. ``include_conv_identity=False`` drops the
    stem's second conv (an ANN whose stem is one conv, as the pytorch-ddpm UNet)."""
    cfg = dataclasses.replace(preset("paper-cifar10").model, num_steps=num_steps)
    with torch.device("meta"):
        model = SpikingUNet(cfg)
    flops = model_macs(model, padding=padding, include_linear=include_linear)
    if not include_conv_identity:
        flops.pop("conv_identity")
    ann_pj = 4.6 * sum(flops.values())
    rest = sum(flops.values()) - flops["conv"]
    implied = {t: (mj * 1e9 - 4.6 * flops["conv"]) / (0.9 * t * rest) for t, mj in PAPER_SNN_MJ.items()}
    return {"flops": flops, "macs": int(sum(flops.values())), "ann_mj": ann_pj * 1e-9,
            "ann_error": ann_pj * 1e-9 / PAPER_ANN_MJ - 1, "implied_rate": implied}
