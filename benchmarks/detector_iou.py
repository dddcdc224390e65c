"""IoU of the artifact detector's masks with planted artifacts: reference vs improved mode.

Pairs are made from skimage's bundled photos: the reference is the photo, the generated image is
the photo after a mild perturbation (noise, or JPEG) with one artifact of a known kind planted in
an ellipse at a random position (``raim_diffusion.artifacts.planting``). Clean pairs (only the
mild perturbation) measure false positives. No segmentation is used (uniform class weights), so
the numbers compare the detectors themselves.

Usage::

    python benchmarks/detector_iou.py [--size 256] [--regions 3] [--params improved]

Prints a markdown table: mean IoU per artifact kind and mode, and the flagged fraction on
clean pairs.
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np
import skimage.data
import torch

from raim_diffusion.artifacts.detector import ArtifactDetector
from raim_diffusion.artifacts.planting import (
    ARTIFACT_KINDS,
    ellipse_region,
    mild_perturbation,
    plant_artifact,
)

PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "cat",
    "retina",
    "hubble_deep_field",
)


def _photo(name: str, size: int) -> np.ndarray:
    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    img = img[..., :3]
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA).astype(np.float64) / 255


def _jpeg(img: np.ndarray, quality: int = 90) -> np.ndarray:
    u8 = np.round(img * 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", u8, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED).astype(np.float64) / 255


def _tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.round(img * 255) / 255).permute(2, 0, 1)[None].float()


def make_pairs(
    size: int, regions: int, seed: int = 0, photos: tuple[str, ...] = PHOTOS
) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """``(kind, generated, reference, region)`` for every photo, kind and random region."""
    rng = np.random.default_rng(seed)
    pairs = []
    for name in photos:
        ref = _photo(name, size)
        for _ in range(regions):
            ax = (
                int(rng.integers(size // 10, size // 5)),
                int(rng.integers(size // 10, size // 5)),
            )
            c = (
                int(rng.integers(ax[0] + 8, size - ax[0] - 8)),
                int(rng.integers(ax[1] + 8, size - ax[1] - 8)),
            )
            region = ellipse_region(size, size, c, ax, float(rng.uniform(0, 180)))
            for kind in ARTIFACT_KINDS:
                base = mild_perturbation(ref, rng)
                pairs.append((kind, plant_artifact(base, region, kind, rng), ref, region))
        pairs.append(
            ("clean-noise", mild_perturbation(ref, rng), ref, np.zeros((size, size), bool))
        )
        pairs.append(("clean-jpeg", _jpeg(ref), ref, np.zeros((size, size), bool)))
    return pairs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--regions", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", nargs="+", default=["desra-default", "improved"])
    parser.add_argument("--photos", type=int, default=len(PHOTOS), help="use the first N photos")
    args = parser.parse_args(argv)

    photos = PHOTOS[: args.photos]
    pairs = make_pairs(args.size, args.regions, args.seed, photos)
    kinds = list(ARTIFACT_KINDS) + ["clean-noise", "clean-jpeg"]
    table: dict[str, dict[str, list[float]]] = {p: {k: [] for k in kinds} for p in args.params}
    timing: dict[str, float] = {}
    for params in args.params:
        det = ArtifactDetector.from_config(params, segmenter="none")
        t0 = time.perf_counter()
        for kind, gen, ref, region in pairs:
            mask = det(_tensor(gen), _tensor(ref)).masks[0, 0].numpy() > 0.5
            if kind.startswith("clean"):
                table[params][kind].append(float(mask.mean()))
            else:
                union = (mask | region).sum()
                table[params][kind].append(float((mask & region).sum() / max(union, 1)))
        timing[params] = (time.perf_counter() - t0) / len(pairs)

    n = len(photos) * args.regions
    print(
        f"Planted-artifact IoU ({len(photos)} photos x {args.regions} regions = {n} pairs per "
        f"kind, {args.size}x{args.size}, no segmentation); clean rows: flagged fraction"
    )
    print()
    print("| kind | " + " | ".join(args.params) + " |")
    print("|---|" + "---|" * len(args.params))
    for k in kinds:
        label = k if not k.startswith("clean") else f"{k} (flagged)"
        print(
            f"| {label} | " + " | ".join(f"{np.mean(table[p][k]):.3f}" for p in args.params) + " |"
        )
    mean_iou = {p: np.mean([np.mean(table[p][k]) for k in ARTIFACT_KINDS]) for p in args.params}
    print("| **mean IoU** | " + " | ".join(f"**{mean_iou[p]:.3f}**" for p in args.params) + " |")
    print("| s / image (CPU) | " + " | ".join(f"{timing[p]:.3f}" for p in args.params) + " |")


if __name__ == "__main__":
    main()
