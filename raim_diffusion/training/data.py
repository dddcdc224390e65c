"""Training data: random crops of a folder of high-quality images, in a reproducible order.

Crops and flips of item ``i`` in epoch ``e`` come from a generator seeded with ``(seed, e, i)``,
and the order of an epoch from a generator seeded with ``(seed, e)``. Nothing depends on worker
processes or on how far an iterator got, so a resumed run sees exactly the same batches as an
uninterrupted one (the trainer just skips the batches it already consumed).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from raim_diffusion.files import find_images
from raim_diffusion.images import load_image

__all__ = [
    "HQImageDataset",
    "EpochSampler",
    "make_dataloader",
    "pad_to_min_size",
    "center_crop",
]

_SEED_MIX = 0x9E3779B1  # spreads (seed, epoch, index) into distinct generator seeds


def _mixed_seed(*parts: int) -> int:
    h = 0
    for p in parts:
        h = (h * _SEED_MIX + int(p) + 1) % (2**63 - 1)
    return h


def pad_to_min_size(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Reflect-101 pad ``(C, H, W)`` on the bottom/right so it is at least ``height x width``.

    Reflect padding needs pad < side, so large pads are applied in several rounds; a 1-pixel side
    (which cannot reflect) is replicated.
    """
    x = x.unsqueeze(0)
    while x.shape[-2] < height or x.shape[-1] < width:
        h, w = x.shape[-2:]
        ph, pw = max(0, min(height - h, h - 1)), max(0, min(width - w, w - 1))
        if ph == 0 and pw == 0:
            x = F.pad(x, (0, max(0, width - w), 0, max(0, height - h)), mode="replicate")
        else:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect")
    return x[0]


def center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Centre crop ``(…, H, W)`` to at most ``height x width``."""
    h, w = x.shape[-2:]
    top, left = max(0, (h - height) // 2), max(0, (w - width) // 2)
    return x[..., top : top + height, left : left + width]


class HQImageDataset(Dataset):
    """Random crops of high-quality images.

    Args:
        root: folder(s), files or globs of images (see ``raim_diffusion.files.find_images``).
        crop_size: side of the square crops; smaller images are reflect-padded first.
        seed: base seed of the crops and flips.
        hflip: random horizontal flips (p = 0.5).
        vflip: random vertical flips (p = 0.5).
        rot90: random transposes (p = 0.5), which with the flips give all 8 orientations.
        length: items per epoch; defaults to the number of images (items wrap around the files,
            so a handful of images can still fill many batches).
    """

    def __init__(
        self,
        root: str | os.PathLike | Sequence[str | os.PathLike],
        crop_size: int,
        *,
        seed: int = 0,
        hflip: bool = True,
        vflip: bool = False,
        rot90: bool = False,
        length: int | None = None,
    ) -> None:
        self.files: list[Path] = find_images(root)
        if not self.files:
            raise FileNotFoundError(f"no images found in {root!r}")
        if crop_size < 1:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        self.crop_size = int(crop_size)
        self.seed = int(seed)
        self.hflip, self.vflip, self.rot90 = hflip, vflip, rot90
        self.length = int(length) if length else len(self.files)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops ``__getitem__`` returns."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_mixed_seed(self.seed, self.epoch, index))
        img = load_image(self.files[index % len(self.files)]).tensor[0]
        s = self.crop_size
        img = pad_to_min_size(img, s, s)
        h, w = img.shape[-2:]
        top = int(torch.randint(0, h - s + 1, (1,), generator=g))
        left = int(torch.randint(0, w - s + 1, (1,), generator=g))
        crop = img[:, top : top + s, left : left + s]
        flips = torch.rand(3, generator=g)
        if self.hflip and flips[0] < 0.5:
            crop = crop.flip(-1)
        if self.vflip and flips[1] < 0.5:
            crop = crop.flip(-2)
        if self.rot90 and flips[2] < 0.5:
            crop = crop.transpose(-2, -1)
        return crop.contiguous()


class EpochSampler(Sampler[int]):
    """Indices of one epoch for one process: a seeded permutation, sharded, optionally skipped.

    Args:
        length: dataset length.
        seed: base seed of the permutation.
        epoch: epoch number (the permutation changes every epoch).
        num_replicas: number of data-parallel processes.
        rank: this process.
        batch_size: per-process batch size; the epoch is cut to whole batches.
        start_batch: batches of this epoch to skip (used when resuming).
    """

    def __init__(
        self,
        length: int,
        seed: int,
        epoch: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        batch_size: int = 1,
        start_batch: int = 0,
    ) -> None:
        self.length, self.seed, self.epoch = length, seed, epoch
        self.num_replicas, self.rank = num_replicas, rank
        self.batch_size, self.start_batch = batch_size, start_batch

    @staticmethod
    def batches_per_epoch(length: int, num_replicas: int, batch_size: int) -> int:
        """Whole per-process batches in one epoch."""
        return (length // num_replicas) // batch_size

    def _indices(self) -> list[int]:
        g = torch.Generator().manual_seed(_mixed_seed(self.seed, self.epoch))
        perm = torch.randperm(self.length, generator=g).tolist()
        n = self.batches_per_epoch(self.length, self.num_replicas, self.batch_size)
        mine = perm[self.rank :: self.num_replicas][: n * self.batch_size]
        return mine[self.start_batch * self.batch_size :]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        n = self.batches_per_epoch(self.length, self.num_replicas, self.batch_size)
        return max(0, n - self.start_batch) * self.batch_size


def make_dataloader(
    dataset: HQImageDataset,
    *,
    batch_size: int,
    epoch: int,
    seed: int,
    num_workers: int = 0,
    num_replicas: int = 1,
    rank: int = 0,
    start_batch: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """DataLoader over one epoch of ``dataset`` (drop-last batches, reproducible order).

    Args:
        dataset: the crop dataset; its epoch is set here.
        batch_size: per-process batch size.
        epoch: epoch number.
        seed: base seed of the order.
        num_workers: loader worker processes.
        num_replicas: data-parallel processes.
        rank: this process.
        start_batch: batches to skip at the start of the epoch.
        pin_memory: pin host memory (for GPU training).

    Returns:
        A ``DataLoader`` yielding ``(batch_size, 3, crop, crop)`` tensors.
    """
    if EpochSampler.batches_per_epoch(len(dataset), num_replicas, batch_size) < 1:
        raise ValueError(
            f"an epoch of {len(dataset)} items cannot fill one batch of {batch_size} on each of "
            f"{num_replicas} processes; lower batch_size or raise data.samples_per_epoch"
        )
    dataset.set_epoch(epoch)
    sampler = EpochSampler(
        len(dataset),
        seed,
        epoch,
        num_replicas=num_replicas,
        rank=rank,
        batch_size=batch_size,
        start_batch=start_batch,
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
