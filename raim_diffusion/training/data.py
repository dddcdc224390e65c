"""Training data: random crops of HQ folders or of LQ/GT pairs, in a reproducible order.

Crops and flips of item ``i`` in epoch ``e`` come from a generator seeded with ``(seed, e, i)``,
and the order of an epoch from a generator seeded with ``(seed, e)``. Nothing depends on worker
processes or on how far an iterator got, so a resumed run sees exactly the same batches as an
uninterrupted one (the trainer just skips the batches it already consumed).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from raim_diffusion.files import find_images
from raim_diffusion.images import load_image

__all__ = [
    "HQImageDataset",
    "PairedCropDataset",
    "find_pairs",
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
        first_step: when given, yield ``(index, step)`` with the training step of each item's
            batch (``first_step`` for the first batch yielded), for data sets whose items
            depend on the step (multi-phase data mixes).
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
        first_step: int | None = None,
    ) -> None:
        self.length, self.seed, self.epoch = length, seed, epoch
        self.num_replicas, self.rank = num_replicas, rank
        self.batch_size, self.start_batch = batch_size, start_batch
        self.first_step = first_step

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

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        indices = self._indices()
        if self.first_step is None:
            return iter(indices)
        return iter(
            (index, self.first_step + pos // self.batch_size) for pos, index in enumerate(indices)
        )

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
    first_step: int | None = None,
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
        first_step: tag items with their training step (see [`EpochSampler`]).

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
        first_step=first_step,
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


def find_pairs(
    lq_dir: str | os.PathLike, gt_dir: str | os.PathLike
) -> list[tuple[Path, Path]]:
    """LQ/GT image pairs of two folders, matched by file name without extension.

    Raises:
        FileNotFoundError: a folder holds no images.
        ValueError: the names do not match one to one (the message lists examples).
    """
    lq = {p.stem: p for p in find_images(lq_dir)}
    gt = {p.stem: p for p in find_images(gt_dir)}
    for name, found, root in (("LQ", lq, lq_dir), ("GT", gt, gt_dir)):
        if not found:
            raise FileNotFoundError(f"no {name} images found in {str(root)!r}")
    only_lq, only_gt = sorted(set(lq) - set(gt)), sorted(set(gt) - set(lq))
    if only_lq or only_gt:
        raise ValueError(
            f"LQ folder {str(lq_dir)!r} and GT folder {str(gt_dir)!r} must hold the same file "
            f"names: {len(only_lq)} LQ without GT (e.g. {only_lq[:3]}), {len(only_gt)} GT "
            f"without LQ (e.g. {only_gt[:3]})"
        )
    return [(lq[k], gt[k]) for k in sorted(lq)]


class PairedCropDataset(Dataset):
    """Aligned random crops of LQ/GT pairs and/or GT crops of HQ photos to degrade on the fly.

    Every item is a dict: ``gt`` ``(3, crop, crop)``, ``lq`` ``(3, crop/scale, crop/scale)``
    (zeros for synthetic items, which the trainer degrades on the device), ``synthetic`` (0/1)
    and ``weak`` (0/1: use the weak degradation). Items are keyed ``(index, step)`` (see
    [`EpochSampler`]'s ``first_step``) so the paired share can change with the training phase.

    Args:
        pairs: ``(lq_path, gt_path)`` pairs; GT must be ``scale`` times the LQ size.
        hq_files: HQ photos for synthetic pairs.
        crop_size: GT crop side, a multiple of ``scale``.
        scale: GT size / LQ size.
        paired_ratio: share of paired items when both kinds exist, or a function of the step.
        weak_ratio: share of synthetic items to degrade weakly.
        seed, hflip, vflip, rot90, length: as for [`HQImageDataset`].
        niqe_candidates: MiAlgo's patch selection: draw this many crop positions and keep the
            one whose GT crop has the lowest NIQE (the most natural-looking); 1 disables it.
            NIQE is pyiqa's (the ``eval`` extra) on the CPU.
        patch_scorer: replaces NIQE as the score to minimise: ``(K, 3, h, w) -> (K,)``.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        hq_files: Sequence[Path],
        crop_size: int,
        scale: int = 1,
        *,
        paired_ratio: float | Callable[[int], float] = 0.5,
        weak_ratio: float = 0.0,
        seed: int = 0,
        hflip: bool = True,
        vflip: bool = False,
        rot90: bool = False,
        length: int | None = None,
        niqe_candidates: int = 1,
        patch_scorer: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if not pairs and not hq_files:
            raise ValueError("give paired LQ/GT folders, HQ photos, or both")
        if niqe_candidates < 1:
            raise ValueError(f"data.niqe_candidates must be >= 1, got {niqe_candidates}")
        if crop_size % scale:
            raise ValueError(f"data.crop_size={crop_size} must be a multiple of the scale {scale}")
        self.pairs, self.hq_files = list(pairs), list(hq_files)
        self.files = [gt for _, gt in self.pairs] + self.hq_files
        self.crop_size, self.scale = int(crop_size), int(scale)
        self._ratio = paired_ratio if callable(paired_ratio) else (lambda step: paired_ratio)
        self.weak_ratio = float(weak_ratio)
        self.seed = int(seed)
        self.hflip, self.vflip, self.rot90 = hflip, vflip, rot90
        self.length = int(length) if length else len(self.files)
        self.epoch = 0
        self.candidates = int(niqe_candidates)
        self._scorer = patch_scorer

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops ``__getitem__`` returns."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def _position(
        self, gt: torch.Tensor, unit: int, g: torch.Generator
    ) -> tuple[int, int]:
        """Top-left of the crop in units of ``unit`` GT pixels (the LQ grid for pairs): one
        random draw, or the best of ``niqe_candidates`` draws by the patch score."""
        c = self.crop_size
        rows, cols = (gt.shape[-2] - c) // unit + 1, (gt.shape[-1] - c) // unit + 1
        tops = torch.randint(0, rows, (self.candidates,), generator=g).tolist()
        lefts = torch.randint(0, cols, (self.candidates,), generator=g).tolist()
        if self.candidates == 1:
            return tops[0], lefts[0]
        if self._scorer is None:
            from raim_diffusion.metrics.iqa import IQAMetrics

            niqe = IQAMetrics("niqe", device="cpu")
            self._scorer = lambda crops: niqe(crops)["niqe"]
        crops = torch.stack([gt[:, t * unit : t * unit + c, x * unit : x * unit + c]
                             for t, x in zip(tops, lefts, strict=True)])
        # NIQE is undefined (NaN) on flat patches: those are never the most natural.
        scores = torch.nan_to_num(self._scorer(crops).double(), nan=float("inf"))
        best = int(torch.argmin(scores))
        return tops[best], lefts[best]

    def _load_pair(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        lq_path, gt_path = self.pairs[i]
        lq, gt = load_image(lq_path).tensor[0], load_image(gt_path).tensor[0]
        lh, lw = lq.shape[-2:]
        if gt.shape[-2:] != (lh * self.scale, lw * self.scale):
            raise ValueError(
                f"{gt_path.name}: GT is {gt.shape[-1]}x{gt.shape[-2]} but its LQ "
                f"{lq_path.name} is {lw}x{lh}; at scale {self.scale} GT must be "
                f"{lw * self.scale}x{lh * self.scale}"
            )
        return lq, gt

    def check_first_pair(self) -> None:
        """Load the first pair now, so a size mismatch is reported before training starts."""
        if self.pairs:
            self._load_pair(0)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, step = key if isinstance(key, tuple) else (key, 0)
        g = torch.Generator().manual_seed(_mixed_seed(self.seed, self.epoch, index))
        draws = torch.rand(2, generator=g)
        use_pair = bool(self.pairs) and (
            not self.hq_files or float(draws[0]) < float(self._ratio(step))
        )
        s, c = self.scale, self.crop_size
        if use_pair:
            lq, gt = self._load_pair(index % len(self.pairs))
            lq = pad_to_min_size(lq, c // s, c // s)
            gt = pad_to_min_size(gt, lq.shape[-2] * s, lq.shape[-1] * s)
            top, left = self._position(gt, s, g)
            lq = lq[:, top : top + c // s, left : left + c // s]
            gt = gt[:, top * s : top * s + c, left * s : left * s + c]
        else:
            gt = load_image(self.hq_files[index % len(self.hq_files)]).tensor[0]
            gt = pad_to_min_size(gt, c, c)
            top, left = self._position(gt, 1, g)
            gt = gt[:, top : top + c, left : left + c]
            lq = torch.zeros(gt.shape[0], c // s, c // s)
        flips = torch.rand(3, generator=g)
        for flag, p, op in (
            (self.hflip, flips[0], lambda t: t.flip(-1)),
            (self.vflip, flips[1], lambda t: t.flip(-2)),
            (self.rot90, flips[2], lambda t: t.transpose(-2, -1)),
        ):
            if flag and p < 0.5:
                lq, gt = op(lq), op(gt)
        return {
            "lq": lq.contiguous(),
            "gt": gt.contiguous(),
            "synthetic": torch.tensor(0 if use_pair else 1),
            "weak": torch.tensor(int(float(draws[1]) < self.weak_ratio)),
        }
