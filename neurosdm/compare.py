"""GPU path against simulated neuromorphic hardware, on the same seeds: ``neurosdm compare``.

Columns: the float torch model (the GPU path; only when a checkpoint is given), the quantised graph on the clocked
torch engine, and the same graph on the event engine. The event engine's run is checked in lockstep: at every
denoiser call the torch engine runs on the same input and every IF layer's spikes are compared, so the spike
agreement is measured on the event engine's own trajectory. Outputs: ``compare.png`` (side by side, with the
absolute difference), ``compare.json`` (per-image PSNR and max abs difference for every pair, spike agreement per
layer, counts equality, seconds per image), ``images_<path>.npy`` and the engines' ``stats_<engine>.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from neurosdm.checkpoint import build_model, load_checkpoint
from neurosdm.errors import ConfigError
from neurosdm.exporters.nir import to_nir_graph
from neurosdm.exporters.pipeline import quantize_export
from neurosdm.graph.program import load_program
from neurosdm.io import atomic_path, image_grid, save_npy
from neurosdm.sample import generate
from neurosdm.simulators.run import make_engine, simulate

__all__ = ["compare", "psnr"]

LABELS = {"gpu_float32": "GPU path: the torch model, float32", "torch_engine": "exported graph, clocked torch engine",
          "event_engine": "exported graph, event-driven engine"}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of images in [-1, 1] (peak-to-peak 2); inf for equal images."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(4.0 / mse))


def _program_from(source: Path, calibration, data_dir, calibration_images: int, graph_file=None):
    """(program, float model + config or None, description) for a checkpoint (with its exported ``graph_file``,
    else an int8 export made in memory) or a .nir file."""
    if source.suffix == ".nir":
        return load_program(source), None, f"{source.name}"
    ckpt = load_checkpoint(source)
    state = ckpt.ema_state if ckpt.ema_state is not None else ckpt.model_state
    model = build_model(ckpt.config.model, state, source=str(source)).eval()
    if graph_file is not None:
        return load_program(graph_file), (model, ckpt.config), f"{source.name}, {Path(graph_file).name}"
    graph, md = to_nir_graph(model, diffusion=ckpt.config.diffusion, dtype=np.float64)
    graph, md = quantize_export(graph, md, ckpt.config, calibration, data_dir, calibration_images, seed=0)
    return load_program(graph), (model, ckpt.config), f"{source.name}, int8 export in memory"


def _plot(columns: dict[str, np.ndarray], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(columns)
    last = names[-1]
    n = columns[names[0]].shape[0]
    panels = [(LABELS.get(name, name), image_grid(columns[name], nrow=n)) for name in names]  # a row per path
    if len(names) > 1:
        ref = names[0]
        diff = np.abs(columns[last] - columns[ref]) * 2 - 1  # |difference| x2 on the image scale: 0 black, 1 white
        panels.append((f"|{last} - {ref}| x2", image_grid(np.clip(diff, -1, 1), nrow=n)))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(4.0, 0.9 * n), 1.3 * len(panels)))
    axes = np.atleast_1d(axes)
    for ax, (name, grid) in zip(axes, panels):
        ax.imshow(grid, vmin=0, vmax=255)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def compare(source, out_dir, num_images: int = 4, steps: int = 20, seed: int = 0, sampler: str = "ddim",
            batch_size: int = 16, calibration: str | None = None, data_dir: str | None = None,
            calibration_images: int = 64, progress=None, graph_file=None) -> dict:
    """Run every path on the same seeds and write the report into ``out_dir``; returns the compare.json dict.
    ``graph_file``: the checkpoint's exported .nir file to simulate (default: an int8 export made in memory)."""
    source = Path(source)
    if not source.exists():
        raise ConfigError(f"not found: {source}")
    out = Path(out_dir)
    program, float_model, what = _program_from(source, calibration, data_dir, calibration_images, graph_file)
    columns: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    kw = dict(num_images=num_images, sampler=sampler, steps=steps, seed=seed, batch_size=batch_size)

    if float_model is not None:
        model, config = float_model
        t0 = time.perf_counter()
        columns["gpu_float32"] = generate(model, config, num_images, seed=seed, sampler=sampler,
                                          num_sample_steps=steps, batch_size=batch_size).numpy()
        seconds["gpu_float32"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    img_t, stats_t, _ = simulate(program, "torch", progress=progress, **kw)
    seconds["torch_engine"] = time.perf_counter() - t0
    columns["torch_engine"] = img_t.numpy()

    checker = make_engine("torch", program)
    spiking = [layer.name for layer in program.layers if layer.kind == "if"]
    agree = {name: [0, 0] for name in spiking}  # equal, total
    outputs_equal = [True]

    def check(step, xs, res):
        ref = checker.run(xs, step, record=True)
        for name in spiking:
            a, b = res["records"][name], ref["records"][name]
            agree[name][0] += int(np.count_nonzero(a == b))
            agree[name][1] += int(a.size)
        for name, v in res["outputs"].items():
            outputs_equal[0] &= bool(np.array_equal(v, ref["outputs"][name]))

    t0 = time.perf_counter()
    img_e, stats_e, _ = simulate(program, "event", progress=progress, on_result=check, **kw)
    seconds["event_engine"] = time.perf_counter() - t0  # includes the lockstep torch check
    columns["event_engine"] = img_e.numpy()

    names = list(columns)
    pairs = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            per = [psnr(columns[a][j], columns[b][j]) for j in range(num_images)]
            pairs[f"{a}_vs_{b}"] = {
                "psnr": per,
                "max_abs": [float(np.abs(columns[a][j] - columns[b][j]).max()) for j in range(num_images)],
                "identical": bool(np.array_equal(columns[a], columns[b])),
            }
    counts_equal = {layer: all(np.array_equal(stats_t.layers[layer][c], stats_e.layers[layer].get(c))
                               for c in stats_t.layers[layer]) for layer in stats_t.layers}
    result = {
        "source": str(source), "program": what, "num_images": num_images, "sampler": sampler, "steps": steps,
        "seed": seed, "quantized": str(program.metadata.get("quantized", "none")),
        "pairs": pairs,
        "spike_agreement": {name: (eq / tot if tot else 1.0) for name, (eq, tot) in agree.items()},
        "spikes_compared": int(sum(tot for _, tot in agree.values())),
        "engine_outputs_bit_identical": outputs_equal[0],
        "counts_equal": all(counts_equal.values()),
        "counts_differ": [layer for layer, ok in counts_equal.items() if not ok],
        "seconds": seconds,
        "seconds_per_image": {k: v / num_images for k, v in seconds.items()},
        "totals": {"torch_engine": stats_t.to_dict()["totals"], "event_engine": stats_e.to_dict()["totals"]},
    }
    for name, arr in columns.items():
        save_npy(arr, out / f"images_{name}.npy")
    stats_t.save(out / "stats_torch.json")
    stats_e.save(out / "stats_event.json")
    _plot(columns, out / "compare.png", f"{what}: {sampler} {steps} steps, seed {seed}")
    with atomic_path(out / "compare.json") as tmp:
        Path(tmp).write_text(json.dumps(result, indent=1))
    return result
