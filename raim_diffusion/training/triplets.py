"""Training triplets ``(I_s1, I_s2, M)`` + GT for the prior-guided alignment fusion network.

So Elegant's fidelity stage (NTIRE 2024 RAIM challenge report, arXiv:2405.09923) learns to warp
the details of the generated image I_s2 to the fidelity of the prior's image I_s1 where the
artifact mask M is set. Two sources of triplets:

- **synthetic**, from HQ photos (`synthesize_triplet`): I_s1 is a faithful but plain version of
  GT (mild Gaussian blur, Gaussian noise and JPEG, as a GAN/CNN restorer's output); I_s2 is GT
  with small smooth geometric misalignments (an elastic warp of a few pixels) and a slight colour
  shift everywhere, as a diffusion model's output, plus diffusion-like failures planted inside a
  random mask (`raim_diffusion.artifacts.planting`: strokes, invented noise, smoothed texture,
  wrong periodic patterns); M is the planted region.
- **real**, from folders (`find_triplets`): ``s1/``, ``s2/``, ``gt/`` (and optionally ``mask/``)
  images matched by file name, for users who ran their own stages 1 and 2; without ``mask/``, M
  is the DeSRA detector's mask on (I_s2, I_s1).

All randomness comes from a seeded `torch.Generator` per item, so items are reproducible.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from raim_diffusion.artifacts.planting import ARTIFACT_KINDS, plant_artifact
from raim_diffusion.files import find_images
from raim_diffusion.images import load_image
from raim_diffusion.training.data import _mixed_seed, pad_to_min_size
from raim_diffusion.training.masks import random_masks

__all__ = [
    "TRIPLET_FOLDERS",
    "TripletConfig",
    "TripletDataset",
    "find_triplets",
    "is_triplet_folder",
    "synthesize_triplet",
]

#: Sub-folders of a folder of real triplets (``mask/`` is optional).
TRIPLET_FOLDERS = ("s1", "s2", "gt")


@dataclass
class TripletConfig:
    """How synthetic triplets are made (ranges are ``[lo, hi]``, drawn uniformly per item).

    Args:
        s1_blur: Gaussian blur sigma of I_s1, in pixels.
        s1_noise: Gaussian noise sigma of I_s1 (in [0, 1] units).
        s1_jpeg: JPEG quality of I_s1 (``[100, 100]`` disables JPEG).
        warp_px: largest displacement of I_s2's elastic warp, in pixels.
        warp_grid: control points per side of the warp (a smooth field between them).
        color_shift: largest per-channel gain and offset change of I_s2.
        coverage: fraction of the crop covered by the mask.
        sttn_prob: share of STTN shapes among the masks (the rest are DeSRA-like blobs).
        kinds: planted failure kinds (`raim_diffusion.artifacts.planting.ARTIFACT_KINDS`).
        strength: amplitude of the planted failures (1 = clearly visible).
        real_ratio: share of real triplets when both triplet folders and HQ photos are given.
        mask_source: M of synthetic triplets: ``"planted"`` (the planted region), ``"detector"``
            (the DeSRA detector's mask on (I_s2, I_s1), as at inference) or ``"union"``.
        s1_prior: a prior (built-in name, weights file or saved folder, as `load_prior` takes
            it): I_s1 is then its same-size output on the GT degraded with Real-ESRGAN's
            second-order degradation, a real stage-1 result, instead of blur/noise/JPEG of GT.
    """

    s1_blur: list[float] = field(default_factory=lambda: [0.4, 1.2])
    s1_noise: list[float] = field(default_factory=lambda: [0.0, 0.02])
    s1_jpeg: list[float] = field(default_factory=lambda: [70.0, 95.0])
    warp_px: list[float] = field(default_factory=lambda: [0.0, 3.0])
    warp_grid: int = 4
    color_shift: float = 0.03
    coverage: list[float] = field(default_factory=lambda: [0.05, 0.3])
    sttn_prob: float = 0.5
    kinds: list[str] = field(default_factory=lambda: list(ARTIFACT_KINDS))
    strength: list[float] = field(default_factory=lambda: [0.6, 1.0])
    real_ratio: float = 0.5
    mask_source: str = "planted"
    s1_prior: str | None = None

    def check(self) -> None:
        """Raise `ValueError` naming the first field out of range."""
        for name in ("s1_blur", "s1_noise", "s1_jpeg", "warp_px", "coverage", "strength"):
            pair = getattr(self, name)
            if len(pair) != 2 or not 0 <= pair[0] <= pair[1]:
                raise ValueError(f"triplets.{name} must be [lo, hi] with 0 <= lo <= hi, got {pair}")
        if self.s1_jpeg[1] > 100 or self.coverage[1] > 1:
            raise ValueError(
                "triplets.s1_jpeg must lie in [0, 100] and triplets.coverage in [0, 1], got "
                f"{self.s1_jpeg} and {self.coverage}"
            )
        if self.warp_grid < 2:
            raise ValueError(f"triplets.warp_grid must be >= 2, got {self.warp_grid}")
        unknown = [k for k in self.kinds if k not in ARTIFACT_KINDS]
        if not self.kinds or unknown:
            raise ValueError(
                f"triplets.kinds must be a non-empty subset of {ARTIFACT_KINDS}, got {self.kinds}"
            )
        if self.mask_source not in ("planted", "detector", "union"):
            raise ValueError(
                "triplets.mask_source must be 'planted', 'detector' or 'union', got "
                f"{self.mask_source!r}"
            )
        if not 0 <= self.real_ratio <= 1 or not 0 <= self.color_shift < 1:
            raise ValueError(
                "triplets.real_ratio must lie in [0, 1] and triplets.color_shift in [0, 1), got "
                f"{self.real_ratio} and {self.color_shift}"
            )


def _uniform(pair: Sequence[float], g: torch.Generator) -> float:
    lo, hi = float(pair[0]), float(pair[1])
    return lo + (hi - lo) * float(torch.rand(1, generator=g, dtype=torch.float64))


def _plain(gt: np.ndarray, cfg: TripletConfig, g: torch.Generator) -> np.ndarray:
    """I_s1: GT made faithful but plain (blur, noise, JPEG), H,W,3 float32 in [0, 1]."""
    out = gt
    sigma = _uniform(cfg.s1_blur, g)
    if sigma > 0:
        out = cv2.GaussianBlur(out, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    noise = _uniform(cfg.s1_noise, g)
    if noise > 0:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
        out = out + np.random.default_rng(seed).normal(0.0, noise, out.shape).astype(np.float32)
    out = np.clip(out, 0.0, 1.0)
    quality = int(round(_uniform(cfg.s1_jpeg, g)))
    if quality < 100:
        bgr = np.ascontiguousarray((out[..., ::-1] * 255.0 + 0.5).astype(np.uint8))
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if ok:
            out = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].astype(np.float32) / 255.0
    return np.ascontiguousarray(out, dtype=np.float32)


def _elastic_warp(image: np.ndarray, cfg: TripletConfig, g: torch.Generator) -> np.ndarray:
    """A smooth random displacement of at most ``warp_px`` pixels (bicubic between points)."""
    amount = _uniform(cfg.warp_px, g)
    if amount <= 0:
        return image
    h, w = image.shape[:2]
    n = cfg.warp_grid
    coarse = (torch.rand(2, 1, n, n, generator=g) * 2 - 1) * amount
    field_ = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic",
                                             align_corners=True).clamp(-amount, amount)
    dy, dx = field_[0, 0].numpy(), field_[1, 0].numpy()
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return cv2.remap(image, xx + dx, yy + dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def synthesize_triplet(
    gt: torch.Tensor, generator: torch.Generator, config: TripletConfig | None = None
) -> dict[str, torch.Tensor]:
    """A synthetic training triplet from one GT crop.

    Args:
        gt (`torch.Tensor`): ``(3, H, W)`` float in [0, 1] (CPU).
        generator (`torch.Generator`): CPU source of all randomness.
        config (`TripletConfig`, *optional*): ranges of the corruptions; defaults when omitted.

    Returns:
        `dict`: ``s1`` (I_s1), ``s2`` (I_s2) ``(3, H, W)`` float32 in [0, 1], ``mask``
        ``(1, H, W)`` float32 in {0, 1} (the planted region) and ``gt``.
    """
    cfg = config or TripletConfig()
    if gt.ndim != 3 or gt.shape[0] != 3:
        raise ValueError(f"gt must be a (3, H, W) tensor, got {tuple(gt.shape)}")
    h, w = gt.shape[-2:]
    img = np.ascontiguousarray(gt.detach().float().cpu().permute(1, 2, 0).numpy())
    s1 = _plain(img, cfg, generator)
    s2 = _elastic_warp(img, cfg, generator)
    gain = 1 + (torch.rand(3, generator=generator).numpy() * 2 - 1) * cfg.color_shift
    bias = (torch.rand(3, generator=generator).numpy() * 2 - 1) * cfg.color_shift / 2
    s2 = np.clip(s2 * gain.astype(np.float32) + bias.astype(np.float32), 0.0, 1.0)
    mask = random_masks(1, h, w, tuple(cfg.coverage), generator, sttn_prob=cfg.sttn_prob)[0, 0]
    region = mask.numpy() > 0.5
    if region.any():
        kind = cfg.kinds[int(torch.randint(0, len(cfg.kinds), (1,), generator=generator))]
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        s2 = plant_artifact(s2, region, kind, np.random.default_rng(seed),
                            strength=_uniform(cfg.strength, generator))
    return {
        "s1": torch.from_numpy(np.ascontiguousarray(s1)).permute(2, 0, 1).float(),
        "s2": torch.from_numpy(np.ascontiguousarray(s2)).permute(2, 0, 1).float(),
        "mask": torch.from_numpy(region[None].astype(np.float32)),
        "gt": gt.detach().float().cpu().clone(),
    }


def is_triplet_folder(root: str | os.PathLike) -> bool:
    """Whether ``root`` holds the ``s1/``, ``s2/`` and ``gt/`` sub-folders of real triplets."""
    path = Path(root)
    return all((path / name).is_dir() for name in TRIPLET_FOLDERS)


def find_triplets(root: str | os.PathLike) -> list[dict[str, Path | None]]:
    """Real triplets of a folder: ``s1/``, ``s2/``, ``gt/`` (and optional ``mask/``) by name.

    Returns:
        `list[dict]`: per name (sorted), the paths ``s1``, ``s2``, ``gt`` and ``mask`` (`None`
        without a ``mask/`` folder).

    Raises:
        FileNotFoundError: a sub-folder is missing or holds no images.
        ValueError: the names do not match one to one (the message lists examples).
    """
    path = Path(root)
    names = (*TRIPLET_FOLDERS, "mask") if (path / "mask").is_dir() else TRIPLET_FOLDERS
    found: dict[str, dict[str, Path]] = {}
    for name in names:
        folder = path / name
        if not folder.is_dir():
            raise FileNotFoundError(
                f"triplet folder {str(path)!r} has no {name}/ sub-folder (needs "
                f"{', '.join(f + '/' for f in TRIPLET_FOLDERS)} and optionally mask/)"
            )
        found[name] = {p.stem: p for p in find_images(folder)}
        if not found[name]:
            raise FileNotFoundError(f"no images found in {str(folder)!r}")
    stems = set(found["gt"])
    for name in names:
        if set(found[name]) != stems:
            extra = sorted(set(found[name]) ^ stems)
            raise ValueError(
                f"triplet folder {str(path)!r}: {name}/ and gt/ must hold the same file names; "
                f"{len(extra)} differ (e.g. {extra[:3]})"
            )
    return [
        {
            "s1": found["s1"][k],
            "s2": found["s2"][k],
            "gt": found["gt"][k],
            "mask": found["mask"][k] if "mask" in found else None,
        }
        for k in sorted(stems)
    ]


class TripletDataset(Dataset):
    """Random aligned crops of real triplets and/or synthetic triplets from HQ photos.

    Every item is a dict of ``s1``, ``s2``, ``gt`` ``(3, crop, crop)`` and ``mask``
    ``(1, crop, crop)``, all float32 in [0, 1].

    Args:
        triplets: real triplets (`find_triplets`).
        hq_files: HQ photos for synthetic triplets.
        crop_size: side of the square crops (smaller images are reflect-padded).
        config: the synthetic corruptions and the real/synthetic mix.
        seed: base seed of crops, flips and corruptions.
        hflip, vflip, rot90: random flips and transposes (the same for the whole triplet).
        length: items per epoch; defaults to the number of images.
        detector: builds the mask of real triplets without ``mask/`` (called with
            ``(s2, s1)`` as ``(1, 3, H, W)``, returns an object with ``.masks``); default: the
            DeSRA detector without segmentation (`raim_diffusion.artifacts.ArtifactDetector`).
    """

    def __init__(
        self,
        triplets: Sequence[dict[str, Path | None]],
        hq_files: Sequence[Path],
        crop_size: int,
        config: TripletConfig | None = None,
        *,
        seed: int = 0,
        hflip: bool = True,
        vflip: bool = False,
        rot90: bool = False,
        length: int | None = None,
        detector: Any = None,
    ) -> None:
        if not triplets and not hq_files:
            raise ValueError("give folders of real triplets (s1/, s2/, gt/), HQ photos, or both")
        if crop_size < 1:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        self.config = config or TripletConfig()
        self.config.check()
        self.triplets, self.hq_files = list(triplets), list(hq_files)
        self.files = [t["gt"] for t in self.triplets] + self.hq_files
        self.crop_size, self.seed = int(crop_size), int(seed)
        self.hflip, self.vflip, self.rot90 = hflip, vflip, rot90
        self.length = int(length) if length else len(self.files)
        self.epoch = 0
        self._detector = detector
        self._s1_model: Any = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops ``__getitem__`` returns."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def _mask_of(self, s2: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        if self._detector is None:
            from raim_diffusion.artifacts import ArtifactDetector

            self._detector = ArtifactDetector(segmenter="none")
        return self._detector(s2[None], s1[None]).masks[0].float().cpu()

    @torch.no_grad()
    def _prior_s1(self, gt: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """I_s1 = the configured prior's same-size output on the degraded GT (loaded once per
        worker process)."""
        if self._s1_model is None:
            from raim_diffusion.prior import load_prior

            from .degradations import RealESRGANDegradation

            self._s1_model = (load_prior(self.config.s1_prior), RealESRGANDegradation())
        prior, degrade = self._s1_model
        lq = degrade(gt[None], g).clamp(0, 1)
        return prior(lq, upscale=1).clamp(0, 1)[0].float()

    def _real(self, index: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        paths = self.triplets[index % len(self.triplets)]
        images = {k: load_image(paths[k]).tensor[0] for k in TRIPLET_FOLDERS}
        size = images["gt"].shape[-2:]
        for k in ("s1", "s2"):
            if images[k].shape[-2:] != size:
                raise ValueError(
                    f"{paths[k]}: {images[k].shape[-1]}x{images[k].shape[-2]}, but its GT "
                    f"{paths['gt'].name} is {size[1]}x{size[0]}; triplets must have one size"
                )
        if paths["mask"] is not None:
            mask = load_image(paths["mask"]).tensor[0].mean(0, keepdim=True)
            if mask.shape[-2:] != size:
                raise ValueError(f"{paths['mask']}: the mask must have the size of its GT")
            mask = (mask > 0.5).float()
        stack = torch.cat([images["s1"], images["s2"], images["gt"]]
                          + ([mask] if paths["mask"] is not None else []))
        c = self.crop_size
        stack = pad_to_min_size(stack, c, c)
        h, w = stack.shape[-2:]
        top = int(torch.randint(0, h - c + 1, (1,), generator=g))
        left = int(torch.randint(0, w - c + 1, (1,), generator=g))
        stack = stack[:, top : top + c, left : left + c]
        s1, s2, gt = stack[:3], stack[3:6], stack[6:9]
        mask = stack[9:10] if paths["mask"] is not None else self._mask_of(s2, s1)
        return {"s1": s1, "s2": s2, "gt": gt, "mask": mask}

    def _synthetic(self, index: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        gt = load_image(self.hq_files[index % len(self.hq_files)]).tensor[0]
        c = self.crop_size
        gt = pad_to_min_size(gt, c, c)
        h, w = gt.shape[-2:]
        top = int(torch.randint(0, h - c + 1, (1,), generator=g))
        left = int(torch.randint(0, w - c + 1, (1,), generator=g))
        item = synthesize_triplet(gt[:, top : top + c, left : left + c], g, self.config)
        if self.config.s1_prior is not None:
            item["s1"] = self._prior_s1(item["gt"], g)
        if self.config.mask_source != "planted":
            found = (self._mask_of(item["s2"], item["s1"]) > 0.5).float()
            planted = item["mask"] if self.config.mask_source == "union" else 0 * found
            item["mask"] = torch.maximum(found, planted)
        return item

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(_mixed_seed(self.seed, self.epoch, index))
        draw = float(torch.rand(1, generator=g))
        real = bool(self.triplets) and (not self.hq_files or draw < self.config.real_ratio)
        item = self._real(index, g) if real else self._synthetic(index, g)
        flips = torch.rand(3, generator=g)
        for flag, p, op in (
            (self.hflip, flips[0], lambda t: t.flip(-1)),
            (self.vflip, flips[1], lambda t: t.flip(-2)),
            (self.rot90, flips[2], lambda t: t.transpose(-2, -1)),
        ):
            if flag and p < 0.5:
                item = {k: op(v) for k, v in item.items()}
        return {k: v.contiguous().float() for k, v in item.items()}
