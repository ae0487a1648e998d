"""A small image classifier trained on the dataset itself: the feature extractor of "classifier FID" and the
label model of the classifier Inception Score (see ``neurosdm.metrics`` and ``docs/metrics.md``).

Architecture (``ClassifierConfig`` defaults, input ``[N, C, 28, 28]`` in [-1, 1])::

    conv3x3(C->16) BN ReLU | conv3x3(16->32) BN ReLU | maxpool 2      28 -> 14
    conv3x3(32->64) BN ReLU | maxpool 2                                14 -> 7
    conv3x3(64->128) BN ReLU | global average pool  -> 128-d features (the penultimate layer)
    linear(128 -> num_classes)                      -> logits

About 100k parameters (0.4 MB in float32). ``scripts/train_classifier.py`` trains it; the shipped checkpoint
``neurosdm/assets/fashion_classifier.pt`` is a plain dict of tensors and numbers (``torch.load(...,
weights_only=True)``): ``{"format": "neurosdm-classifier", "version": 1, "config": {...}, "state_dict": {...},
"dataset": ..., "test_accuracy": ...}``.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from neurosdm import data as D
from neurosdm.errors import CheckpointError, DatasetError
from neurosdm.io import atomic_path, first_line

__all__ = ["ClassifierConfig", "SmallClassifier", "load_classifier", "save_classifier", "load_labels",
           "SHIPPED_CLASSIFIER", "shipped_classifier_path"]

FORMAT = "neurosdm-classifier"
#: The checkpoint shipped with the package (Fashion-MNIST).
SHIPPED_CLASSIFIER = "fashion_classifier.pt"


@dataclass
class ClassifierConfig:
    img_ch: int = 1
    image_size: int = 28
    num_classes: int = 10
    widths: tuple[int, ...] = (16, 32, 64, 128)

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SmallClassifier(nn.Module):
    """Conv net with a ``features(x) -> [N, feature_dim]`` penultimate layer and ``forward(x) -> logits``."""

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = config = config or ClassifierConfig()
        w1, w2, w3, w4 = config.widths
        self.body = nn.Sequential(
            *_block(config.img_ch, w1), *_block(w1, w2), nn.MaxPool2d(2),
            *_block(w2, w3), nn.MaxPool2d(2),
            *_block(w3, w4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(w4, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.body(x)
        return f, self.head(f)


def shipped_classifier_path() -> Path:
    return Path(str(importlib.resources.files("neurosdm") / "assets" / SHIPPED_CLASSIFIER))


def save_classifier(path: str | os.PathLike, model: SmallClassifier, **info) -> None:
    """Write a weights-only checkpoint (atomically). ``info``: plain values (dataset, accuracy, epochs...)."""
    cfg = dataclasses.asdict(model.config)
    cfg["widths"] = list(cfg["widths"])
    payload = {"format": FORMAT, "version": 1, "config": cfg,
               "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, **info}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_classifier(path: str | os.PathLike | None = None, device: str | torch.device = "cpu"
                    ) -> tuple[SmallClassifier, dict]:
    """Load a classifier checkpoint (default: the shipped Fashion-MNIST one) in eval mode.

    Returns ``(model, info)``; ``info`` holds everything in the file but the weights (dataset, test accuracy...).
    Raises :class:`CheckpointError` for a missing or foreign file.
    """
    path = Path(path) if path is not None else shipped_classifier_path()
    if not path.is_file():
        raise CheckpointError(f"classifier checkpoint not found: {path}; train one with scripts/train_classifier.py")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not our file"
        raise CheckpointError(f"{path} is not a loadable classifier checkpoint: {first_line(e)}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a neurosdm classifier checkpoint (no format {FORMAT!r}); train one "
                              "with scripts/train_classifier.py")
    cfg = dict(payload["config"])
    cfg["widths"] = tuple(cfg["widths"])
    model = SmallClassifier(ClassifierConfig(**cfg))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the stored config: {str(e).splitlines()[0]}") from None
    model.to(device).eval()
    info = {k: v for k, v in payload.items() if k != "state_dict"}
    return model, info


def load_labels(name: str, split: str = "train", data_dir: str | None = None) -> np.ndarray:
    """Class labels (uint8 ``[N]``) of ``builtin`` or ``fashion-mnist``/``mnist`` IDX data, in the order of
    ``neurosdm.data.load_dataset(name, data_dir, split)``."""
    key = D.normalise_name(name)
    if key == "builtin":
        resource = importlib.resources.files("neurosdm") / "assets" / D.BUILTIN_ASSET
        with importlib.resources.as_file(resource) as p, np.load(p, allow_pickle=False) as npz:
            return npz[f"{split}_labels"]
    if key not in ("fashion-mnist", "mnist"):
        raise DatasetError(f"labels are only read for builtin, fashion-mnist and mnist, not {key!r}")
    prefix = D._IDX_PREFIX[split]
    for directory in D._idx_search_dirs(key, data_dir):
        for stem in (f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"):
            for suffix in (".gz", ""):
                path = directory / (stem + suffix)
                if path.is_file():
                    labels = D.read_idx(path)
                    if labels.ndim != 1:
                        raise DatasetError(f"{path} is not a label file (shape {labels.shape})")
                    return labels
    raise DatasetError(f"{key} {split} labels not found next to the images; apt-get install dataset-fashion-mnist, "
                       "or put the *-labels-idx1-ubyte[.gz] files in --data-dir")


@torch.no_grad()
def accuracy(model: SmallClassifier, images: torch.Tensor, labels, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``images`` ``[N, C, H, W]`` in [-1, 1]."""
    model.eval()
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    correct = 0
    for s in range(0, len(images), batch_size):
        correct += int((model(images[s:s + batch_size]).argmax(1) == labels[s:s + batch_size]).sum())
    return correct / len(images)

