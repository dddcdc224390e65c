"""Random training masks: STTN Bezier shapes and DeSRA-like blobs, with coverage control.

Masks follow the library contract: float tensors ``(N, 1, H, W)`` in {0, 1}, 1 = hole (the region
the fusion network must re-restore from the low-quality input).

STTN shapes (Zeng et al., "Learning Joint Spatial-Temporal Transformations for Video
Inpainting", ECCV 2020) are drawn the way STTN's ``get_random_shape`` does, but rendered without
matplotlib: the closed Bezier path is sampled densely, mapped into the canvas the way matplotlib's
default axes would place it, and filled with ``cv2.fillPoly``. DeSRA-like blobs mimic the masks the
stage-3 detector produces: a few irregular smooth regions, obtained by thresholding a smooth random
field at the quantile that gives the requested coverage.

All randomness comes from a ``torch.Generator``; the rendering itself is CPU (OpenCV).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch

__all__ = ["sttn_shape", "sttn_mask", "blob_mask", "random_masks", "mask_coverage"]

# matplotlib's default subplot box on a 640x480 figure (left, right, bottom, top fractions);
# STTN renders there and resizes, so the shape never touches the region's border.
_AXES_BOX = (0.125, 0.9, 0.11, 0.88)
_BEZIER_SAMPLES = 48


def _rand(generator: torch.Generator | None) -> float:
    return float(torch.rand(1, generator=generator, dtype=torch.float64).item())


def _randint(lo: int, hi: int, generator: torch.Generator | None) -> int:
    """Inclusive integer in [lo, hi], like Python's random.randint."""
    if hi <= lo:
        return lo
    return int(torch.randint(lo, hi + 1, (1,), generator=generator).item())


def mask_coverage(mask: torch.Tensor) -> torch.Tensor:
    """Fraction of hole pixels per sample.

    Args:
        mask: ``(N, 1, H, W)`` masks.

    Returns:
        ``(N,)`` coverage in [0, 1].
    """
    return mask.flatten(1).float().mean(dim=1)


def sttn_shape(
    edge_num: int = 9,
    ratio: float = 0.7,
    width: int = 432,
    height: int = 240,
    generator: torch.Generator | None = None,
) -> np.ndarray:
    """One random closed Bezier blob, cropped to its bounding box.

    Args:
        edge_num: number of cubic Bezier segments (corners).
        ratio: radius jitter; radii are drawn from ``[1 - ratio, 1 + ratio)``.
        width: width of the drawing box.
        height: height of the drawing box.
        generator: source of randomness.

    Returns:
        ``(h, w)`` uint8 array in {0, 1} with ``h <= height`` and ``w <= width``; 1 = hole.
    """
    if edge_num < 1 or not 0 <= ratio < 1 or width < 2 or height < 2:
        raise ValueError(
            "sttn_shape needs edge_num >= 1, 0 <= ratio < 1 and a box of at least 2x2, got "
            f"edge_num={edge_num}, ratio={ratio}, width={width}, height={height}"
        )
    n = 3 * edge_num + 1
    angles = np.linspace(0, 2 * np.pi, n)
    u = torch.rand(n, generator=generator, dtype=torch.float64).numpy()
    radii = (1 - ratio) + 2 * ratio * u
    pts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    pts[-1] = pts[0]

    t = np.linspace(0, 1, _BEZIER_SAMPLES, endpoint=False)[:, None]
    basis = [(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3]
    curve = np.concatenate(
        [sum(bk * pts[3 * i + j] for j, bk in enumerate(basis)) for i in range(edge_num)]
    )

    # Axis limits are 1.1 * [min, max] of all path vertices (control points included).
    lo = 1.1 * pts.min(axis=0)
    hi = 1.1 * pts.max(axis=0)
    left, right, bottom, top = _AXES_BOX
    fx = (curve[:, 0] - lo[0]) / (hi[0] - lo[0])
    fy = (curve[:, 1] - lo[1]) / (hi[1] - lo[1])
    px = (left + fx * (right - left)) * width
    py = (1 - (bottom + fy * (top - bottom))) * height  # image rows grow downwards
    poly = np.round(np.stack([px, py], axis=1) * 16).astype(np.int32)  # 4 fractional bits

    canvas = np.zeros((height, width), np.uint8)
    cv2.fillPoly(canvas, [poly], 1, lineType=cv2.LINE_8, shift=4)
    rows = np.flatnonzero(canvas.any(axis=1))
    cols = np.flatnonzero(canvas.any(axis=0))
    if rows.size == 0:
        return np.ones((1, 1), np.uint8)
    return canvas[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def sttn_mask(height: int, width: int, generator: torch.Generator | None = None) -> np.ndarray:
    """An STTN-style mask: one random Bezier blob pasted at a random position.

    Args:
        height: mask height.
        width: mask width.
        generator: source of randomness.

    Returns:
        ``(height, width)`` uint8 array in {0, 1}.
    """
    h = _randint(max(1, height // 3), max(1, height - 1), generator)
    w = _randint(max(1, width // 3), max(1, width - 1), generator)
    edge_num = _randint(6, 8, generator)
    ratio = (0.6, 0.7, 0.8)[_randint(0, 2, generator)]
    shape = sttn_shape(edge_num, ratio, max(w, 2), max(h, 2), generator)
    sh, sw = shape.shape
    top = _randint(0, height - sh, generator)
    left = _randint(0, width - sw, generator)
    out = np.zeros((height, width), np.uint8)
    out[top : top + sh, left : left + sw] = shape[: height - top, : width - left]
    return out


def _smooth_field(height: int, width: int, generator: torch.Generator | None) -> torch.Tensor:
    """A smooth random field with a few bumps, (height, width) float64."""
    cells = _randint(2, 6, generator)
    grid = torch.rand(1, 1, cells + 1, cells + 1, generator=generator, dtype=torch.float64)
    field = torch.nn.functional.interpolate(
        grid, size=(height, width), mode="bicubic", align_corners=True
    )[0, 0]
    # A Gaussian envelope around a random centre keeps the blobs together, like real artifacts.
    cy, cx = _rand(generator) * height, _rand(generator) * width
    spread = (0.25 + 0.5 * _rand(generator)) * max(height, width)
    yy = torch.arange(height, dtype=torch.float64)[:, None]
    xx = torch.arange(width, dtype=torch.float64)[None, :]
    env = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * spread**2))
    # Tiny noise breaks ties so the quantile threshold selects an exact pixel count.
    noise = torch.rand(height, width, generator=generator, dtype=torch.float64) * 1e-9
    return field * env + noise


def _top_n(score: torch.Tensor, n: int) -> np.ndarray:
    """Binary mask of the n highest-scoring pixels."""
    flat = score.flatten()
    out = torch.zeros_like(flat, dtype=torch.uint8)
    if n > 0:
        out[torch.topk(flat, n).indices] = 1
    return out.view(score.shape).numpy()


def blob_mask(
    height: int, width: int, coverage: float, generator: torch.Generator | None = None
) -> np.ndarray:
    """A DeSRA-like mask: irregular smooth blobs covering ``round(coverage * H * W)`` pixels.

    Args:
        height: mask height.
        width: mask width.
        coverage: target hole fraction in [0, 1].
        generator: source of randomness.

    Returns:
        ``(height, width)`` uint8 array in {0, 1}.
    """
    if not 0 <= coverage <= 1:
        raise ValueError(f"coverage must lie in [0, 1], got {coverage}")
    n = int(round(coverage * height * width))
    return _top_n(_smooth_field(height, width, generator), n)


def _fit_coverage(mask: np.ndarray, n: int, generator: torch.Generator | None) -> np.ndarray:
    """Grow or shrink a mask along its signed distance so exactly n pixels are holes."""
    inside = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    outside = cv2.distanceTransform((1 - mask).astype(np.uint8), cv2.DIST_L2, 5)
    sdf = torch.from_numpy((inside - outside).astype(np.float64))
    # Ties along iso-distance contours are broken at random, which only affects one pixel ring.
    sdf = sdf + torch.rand(sdf.shape, generator=generator, dtype=torch.float64) * 1e-3
    return _top_n(sdf, n)


def random_masks(
    batch: int,
    height: int,
    width: int,
    coverage: tuple[float, float] = (0.05, 0.5),
    generator: torch.Generator | None = None,
    *,
    sttn_prob: float = 0.5,
    max_shapes: int = 4,
) -> torch.Tensor:
    """Random hole masks whose coverage is guaranteed to lie in ``coverage``.

    Each sample is an STTN shape (with probability ``sttn_prob``; shapes are added while the
    coverage is too low, and a shape that still misses the range is grown or shrunk along its
    distance transform) or a DeSRA-like blob mask with a coverage drawn from the range.

    Args:
        batch: number of masks.
        height: mask height.
        width: mask width.
        coverage: ``(lo, hi)`` inclusive range of the hole fraction, ``0 <= lo <= hi <= 1``.
        generator: source of randomness (CPU).
        sttn_prob: probability of an STTN shape per sample.
        max_shapes: most STTN shapes combined in one mask.

    Returns:
        ``(batch, 1, height, width)`` float32 masks in {0, 1}, 1 = hole.
    """
    lo, hi = (float(c) for c in coverage)
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"coverage must be (lo, hi) with 0 <= lo <= hi <= 1, got {coverage!r}")
    if height < 1 or width < 1 or batch < 0:
        raise ValueError(f"need batch >= 0 and a positive size, got {batch}, {height}x{width}")
    total = height * width
    n_lo, n_hi = math.ceil(lo * total - 1e-9), math.floor(hi * total + 1e-9)
    if n_lo > n_hi:
        raise ValueError(
            f"coverage range {coverage!r} contains no whole pixel count for a {height}x{width} mask"
        )
    out = np.zeros((batch, 1, height, width), np.float32)
    for i in range(batch):
        if _rand(generator) < sttn_prob:
            m = sttn_mask(height, width, generator)
            for _ in range(max_shapes - 1):
                if m.sum() >= n_lo:
                    break
                m = np.maximum(m, sttn_mask(height, width, generator))
            count = int(m.sum())
            if not n_lo <= count <= n_hi:
                target = n_lo + int(round(_rand(generator) * (n_hi - n_lo)))
                m = _fit_coverage(m, target, generator)
        else:
            target = n_lo + int(round(_rand(generator) * (n_hi - n_lo)))
            m = _top_n(_smooth_field(height, width, generator), target)
        out[i, 0] = m
    return torch.from_numpy(out)
