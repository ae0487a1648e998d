"""Plots of energy reports (matplotlib, Agg): each function writes one PNG atomically and returns its path.

- :func:`plot_layer_terms`: per-layer energy by term (stacked bars) of one :func:`neurosdm.energy.estimate` report;
- :func:`plot_spikes`: spikes per layer per spiking step of a RunStats (summed over denoising steps and images);
- :func:`plot_profiles`: energy per image per profile against the ANN baseline(s), log scale;
- :func:`plot_core_loads`: the cores of a mapping on their meshes, coloured by utilisation;
- :func:`write_plots`: the three of a :func:`neurosdm.energy.price_all` result into a folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from neurosdm.io import atomic_path

__all__ = ["plot_layer_terms", "plot_spikes", "plot_profiles", "plot_core_loads", "write_plots"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def plot_layer_terms(report: dict, path: str | os.PathLike) -> Path:
    """Stacked bars: one bar per layer with priced terms, one colour per term (uJ, all images)."""
    plt = _plt()
    layers = [layer for layer in report["layers"] if layer["terms"]]
    terms = sorted({t for layer in layers for t in layer["terms"]})
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(layers) + 2), 4.5))
    x = np.arange(len(layers))
    bottom = np.zeros(len(layers))
    for term in terms:
        v = np.array([layer["terms"].get(term, {}).get("pj", 0.0) for layer in layers]) * 1e-6
        ax.bar(x, v, bottom=bottom, label=term)
        bottom += v
    ax.set_xticks(x, [layer["layer"] for layer in layers], rotation=90, fontsize=7)
    ax.set_ylabel("energy (uJ, all images)")
    ax.set_title(f"{report['profile']}: energy per layer by term")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_spikes(stats, path: str | os.PathLike) -> Path:
    """Spikes per IF layer per spiking step (summed over denoising steps and images), one line per layer."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, cs in stats.layers.items():
        if "spikes_out" in cs:
            ax.plot(np.arange(stats.num_steps), cs["spikes_out"].sum(axis=0), marker="o", label=name)
    ax.set_xlabel("spiking step")
    ax.set_ylabel("spikes")
    ax.set_xticks(np.arange(stats.num_steps))
    ax.set_title("spikes per layer per spiking step")
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def plot_profiles(per_image_pj: dict[str, float], baselines: dict[str, float], path: str | os.PathLike) -> Path:
    """Bars of energy per image per profile (log scale), the ANN baseline(s) as horizontal lines."""
    plt = _plt()
    names = list(per_image_pj)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(names) + 2), 4.5))
    ax.bar(np.arange(len(names)), [per_image_pj[n] * 1e-9 for n in names], color="tab:blue")
    for i, (label, pj) in enumerate(baselines.items()):
        ax.axhline(pj * 1e-9, color=f"C{i + 1}", linestyle="--", label=f"ANN baseline: {label}")
    ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("energy per image (mJ)")
    ax.set_title("SNN energy per image by profile vs the ANN baseline")
    if baselines:
        ax.legend(fontsize=8)
    return _save(fig, path)


def write_plots(priced: dict, stats, out_dir, profile: str = "loihi2") -> dict[str, Path]:
    """The three energy plots of a :func:`neurosdm.energy.price_all` result into ``out_dir``; returns
    ``{name: path}``."""
    out = Path(out_dir)
    return {
        "layers": plot_layer_terms(priced["reports"][profile], out / f"energy_layers_{profile}.png"),
        "spikes": plot_spikes(stats, out / "energy_spikes.png"),
        "profiles": plot_profiles({k: v["totals"]["per_image_pj"] for k, v in priced["reports"].items()},
                                  {k: v["pj_per_image"] for k, v in priced["ann_baseline"].items()},
                                  out / "energy_profiles.png"),
    }


def plot_core_loads(mapping: dict, path: str | os.PathLike, max_chips: int = 16) -> Path:
    """The cores of a mapping (:func:`neurosdm.hardware.routing.map_program`) on their meshes, coloured by each
    core's highest utilisation over its resources (neurons, axons, synaptic memory); chips side by side, at most
    ``max_chips`` of them (the title says how many are shown)."""
    plt = _plt()
    mx, my, per = mapping["mesh"]
    chips = min(mapping["chips_used"], max_chips)
    grid = np.full((my, chips * mx * per), np.nan)
    for p in mapping["populations"]:
        for pc in p["pieces"]:
            chip, x, y, slot = pc["core"]
            if chip < chips:
                grid[y, x * per + slot] = max(pc["utilisation"].values(), default=0.0)
    fig, ax = plt.subplots(figsize=(min(18, 2 + chips * mx * per * 0.12), 1.5 + my * 0.3))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    for c in range(1, chips):
        ax.axvline(c * mx * per - 0.5, color="red", lw=1)
    ax.set_xlabel(f"core (x x {per} + slot); red lines: chip boundaries")
    ax.set_ylabel("mesh y")
    shown = f"{chips} of {mapping['chips_used']} chips shown" if chips < mapping["chips_used"] else \
        f"{chips} chip(s)"
    ax.set_title(f"{mapping['profile']}: {mapping['cores_used']:,} cores, {shown}; colour: highest utilisation "
                 "per core (white: unused)")
    fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
    return _save(fig, path)
