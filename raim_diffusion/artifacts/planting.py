"""Planted artifacts: known-position test pairs for the detector (tests, benchmarks, notebooks).

A pair is ``(generated, reference, region)``: the reference is a real photo, the generated image
is the same photo (optionally mildly perturbed everywhere, as a restorer's output would be) with
one artifact pasted inside ``region`` (an H,W bool mask). The kinds mimic what diffusion models
get wrong:

* ``"strokes"``  -- hallucinated strokes / pseudo-text drawn over the content;
* ``"noise"``    -- invented fine noise texture;
* ``"smooth"``   -- texture smoothed away (over-smoothing / "waxy" regions);
* ``"periodic"`` -- a wrong periodic pattern with the *same* local contrast as the original.

Randomness only through a `numpy.random.Generator` argument (seeded by the caller).
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["ARTIFACT_KINDS", "plant_artifact", "ellipse_region", "mild_perturbation"]

ARTIFACT_KINDS = ("strokes", "noise", "smooth", "periodic")


def ellipse_region(
    height: int, width: int, center: tuple[int, int], axes: tuple[int, int], angle: float = 0.0
) -> np.ndarray:
    """H,W bool mask of a filled ellipse (``center`` = (x, y), ``axes`` = half-axes)."""
    m = np.zeros((height, width), np.uint8)
    cv2.ellipse(m, center, axes, angle, 0, 360, 1, thickness=-1)
    return m.astype(bool)


def mild_perturbation(
    image: np.ndarray, rng: np.random.Generator, sigma: float = 1.5
) -> np.ndarray:
    """Slight Gaussian noise everywhere (a faithful restorer's output differs this much)."""
    return np.clip(image + rng.normal(0.0, sigma / 255.0, image.shape), 0.0, 1.0)


def _local_std(gray: np.ndarray, sigma: float = 3.0) -> np.ndarray:
    mu = cv2.GaussianBlur(gray, (0, 0), sigma)
    return np.sqrt(np.maximum(cv2.GaussianBlur(gray * gray, (0, 0), sigma) - mu * mu, 0.0))


def plant_artifact(
    image: np.ndarray,
    region: np.ndarray,
    kind: str,
    rng: np.random.Generator,
    strength: float = 1.0,
) -> np.ndarray:
    """Copy of ``image`` (H,W,3 float in [0, 1]) with an artifact of ``kind`` in ``region``.

    Args:
        image (`np.ndarray`): H,W,3 float64/float32 in [0, 1].
        region (`np.ndarray`): H,W bool; the artifact is confined to it (soft 1-px edge).
        kind (`str`): one of :data:`ARTIFACT_KINDS`.
        rng (`np.random.Generator`): randomness source.
        strength (`float`): amplitude multiplier (1 = clearly visible).

    Returns:
        `np.ndarray`: H,W,3 float64 in [0, 1].
    """
    if kind not in ARTIFACT_KINDS:
        raise ValueError(f"kind={kind!r}: must be one of {ARTIFACT_KINDS}")
    img = image.astype(np.float64)
    h, w = region.shape
    ys, xs = np.nonzero(region)
    if ys.size == 0:
        raise ValueError("region: empty")
    if kind == "strokes":
        layer = np.zeros((h, w), np.float64)
        y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
        n = max(4, (y1 - y0) * (x1 - x0) // 150)
        for _ in range(n):
            p = (int(rng.integers(x0, x1 + 1)), int(rng.integers(y0, y1 + 1)))
            d = rng.normal(size=2)
            d = d / (np.linalg.norm(d) + 1e-9) * rng.uniform(6, 20)
            q = (int(p[0] + d[0]), int(p[1] + d[1]))
            cv2.line(layer, p, q, float(rng.choice([-1.0, 1.0])), thickness=int(rng.integers(1, 3)))
        delta = layer[..., None] * 0.45 * strength
        out = img + delta
    elif kind == "noise":
        noise = rng.normal(0.0, 1.0, (h, w, 1))
        noise = cv2.GaussianBlur(noise[..., 0], (0, 0), 0.7)[..., None]
        noise = noise / (noise.std() + 1e-9)
        out = img + noise * 0.12 * strength
    elif kind == "smooth":
        blurred = cv2.GaussianBlur(img, (0, 0), 4.0 * strength)
        out = blurred
    else:  # periodic: grating with the original's local contrast, different structure
        gray = img.mean(axis=2)
        std = np.maximum(_local_std(gray), 0.04)[..., None]
        mean = cv2.GaussianBlur(img, (0, 0), 3.0)
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(4.0, 7.0)
        yy, xx = np.mgrid[0:h, 0:w]
        grating = np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
        out = mean + (np.sqrt(2.0) * std * strength) * grating[..., None]
    alpha = cv2.GaussianBlur(region.astype(np.float64), (0, 0), 0.7)[..., None]
    alpha = np.where(region[..., None], np.maximum(alpha, 0.5), alpha)
    return np.clip(img * (1 - alpha) + out * alpha, 0.0, 1.0)
