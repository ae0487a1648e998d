"""Sharding ``sample``, ``simulate`` and ``evaluate`` across torchrun processes (one per CPU slot or GPU).

``torchrun --nproc_per_node N -m neurosdm sample CKPT --out DIR ...`` starts N processes; torchrun sets
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in each. :func:`process_group` reads them, joins the process group
(gloo on the CPU, nccl on CUDA, where rank ``r`` takes ``cuda:LOCAL_RANK``) only when ``WORLD_SIZE > 1``, and
yields a :class:`World`. Without torchrun the world has one process and nothing changes.

Which images a rank makes: with ``N`` images in batches of ``B`` there are ``nb = ceil(N / B)`` batches, batch
``b`` holding images ``[b B, min((b + 1) B, N))``; rank ``r`` of ``W`` takes the contiguous batches
``[floor(r nb / W), floor((r + 1) nb / W))`` (:func:`shard_range`). The ranks' image ranges are disjoint,
cover ``0 .. N-1`` and follow the rank order; every image is computed in the same batch as in a one-process run
with the same ``B``. With per-image noise (:mod:`neurosdm.diffusion.noise`) image ``i`` is then bit for bit
the image a single process makes: the batch matters only where the denoiser's float arithmetic depends on the
batch size (a float32 GEMM picks its kernel by batch size), and that batch is the same.

Merging (:func:`gather_shards`): every rank writes its arrays (and a JSON-ready dict, e.g. its RunStats) to
``SHARD_DIR/.neurosdm-shards-<token>/rank<r>.npz`` (atomically), all ranks meet at a barrier, and rank 0 reads
the shards in rank order (= image-index order) and removes them; the caller on rank 0 concatenates, sums and
writes the final outputs atomically. ``SHARD_DIR`` must be visible to every rank (one machine, or a shared file
system across machines); the token is drawn by rank 0 and broadcast, so concurrent runs in one folder do not mix.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from neurosdm.errors import ConfigError
from neurosdm.io import atomic_path

__all__ = ["World", "world_from_env", "process_group", "shard_range", "barrier", "gather_shards"]

_META_KEY = "__meta__"


@dataclass(frozen=True)
class World:
    """This process's place among the torchrun processes: ``rank`` of ``size``, ``local_rank`` on its machine,
    and the ``device`` it computes on."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        """Rank 0: merges the shards, writes the outputs, prints."""
        return self.rank == 0

    def shard(self, num_images: int, batch_size: int) -> range:
        """This rank's images (:func:`shard_range`)."""
        return shard_range(num_images, batch_size, self.rank, self.size)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer (it is set by torchrun)") from None


def world_from_env(device: str = "cpu") -> World:
    """The :class:`World` torchrun describes in ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (absent: one process).
    With ``WORLD_SIZE > 1`` and a CUDA ``device`` the device becomes ``cuda:LOCAL_RANK``."""
    size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if size < 1 or not 0 <= rank < size or local_rank < 0:
        raise ConfigError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={size}, "
                          f"LOCAL_RANK={local_rank}")
    device = str(device)
    if size > 1 and device.startswith("cuda"):
        device = f"cuda:{local_rank}"
    return World(rank, size, local_rank, device)


@contextlib.contextmanager
def process_group(device: str = "cpu"):
    """Yield this process's :class:`World`; when ``WORLD_SIZE > 1`` join the process group first (gloo on the
    CPU, nccl on CUDA with ``torch.cuda.set_device(LOCAL_RANK)``) and leave it at the end, after a barrier
    when the body ended normally. A group that is already initialised is used as it is (and left to its owner)."""
    world = world_from_env(device)
    if world.size == 1:
        yield world
        return
    if dist.is_initialized():
        yield world
        return
    cuda = world.device.startswith("cuda")
    if cuda:
        if not torch.cuda.is_available() or world.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: rank {world.rank} needs cuda:{world.local_rank}, but "
                              f"{torch.cuda.device_count()} CUDA device(s) are visible (use --nproc_per_node <= that)")
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        yield world
        barrier(world)  # no rank leaves (closing its connections, or rank 0 its store) while another still works
    finally:
        dist.destroy_process_group()


def shard_range(num_images: int, batch_size: int, rank: int = 0, size: int = 1) -> range:
    """Images ``[start, stop)`` of rank ``rank`` of ``size``: whole batches of ``batch_size`` (numbered over all
    images), the contiguous block ``[floor(rank nb / size), floor((rank + 1) nb / size))`` of the
    ``nb = ceil(num_images / batch_size)`` batches. Empty when there are fewer batches than ranks."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if num_images < 0:
        raise ConfigError(f"--num-images must be >= 0, got {num_images}")
    nb = -(-num_images // batch_size)
    b0, b1 = rank * nb // size, (rank + 1) * nb // size
    return range(min(b0 * batch_size, num_images), min(b1 * batch_size, num_images))


def barrier(world: World) -> None:
    """Wait for every rank (nothing to do in a one-process world)."""
    if world.size == 1:
        return
    if world.device.startswith("cuda"):
        dist.barrier(device_ids=[world.local_rank])
    else:
        dist.barrier()


def _token(world: World) -> str:
    """A name drawn by rank 0 and broadcast to all ranks (the shard folder of this gather)."""
    box = [uuid.uuid4().hex[:16] if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])


def gather_shards(world: World, shard_dir: str | os.PathLike, arrays: dict[str, np.ndarray],
                  meta: dict | None = None) -> list[tuple[dict[str, np.ndarray], dict]] | None:
    """Collect every rank's ``(arrays, meta)`` on rank 0, in rank order; ``None`` on the other ranks.

    One process: ``[(arrays, meta)]`` at once. Otherwise each rank writes ``arrays`` (numpy, no objects) and
    ``meta`` (JSON-ready) to its shard file in ``shard_dir``, all ranks meet at a barrier, rank 0 reads every
    shard and removes the shard folder."""
    meta = dict(meta or {})
    if world.size == 1:
        return [(dict(arrays), meta)]
    if _META_KEY in arrays:
        raise ValueError(f"{_META_KEY!r} is reserved")
    folder = Path(shard_dir) / f".neurosdm-shards-{_token(world)}"
    with atomic_path(folder / f"rank{world.rank:05d}.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()}, **{_META_KEY: np.array(json.dumps(meta))})
    barrier(world)
    if not world.is_main:
        return None
    parts = []
    for r in range(world.size):
        path = folder / f"rank{r:05d}.npz"
        if not path.is_file():
            raise ConfigError(f"shard of rank {r} not found in {folder}: is {shard_dir} on a file system every rank "
                              "sees?")
        with np.load(path, allow_pickle=False) as z:
            parts.append(({k: z[k] for k in z.files if k != _META_KEY}, json.loads(str(z[_META_KEY]))))
    shutil.rmtree(folder, ignore_errors=True)
    return parts
