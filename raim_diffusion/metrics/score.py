"""The NTIRE 2024 RAIM challenge SCORE.

``SCORE = 20*PSNR/50 + 15*(SSIM-0.5)/0.5 + 20*(1-LPIPS)/0.4 + 40*(1-DISTS)/0.3 + 30*(1-NIQE)/10``

The SCORE is an affine function of the five metrics, so the mean of the per-image scores equals
the score of the per-metric means (up to float rounding): the two ways of reporting it over a set
cannot disagree, and it does not matter which one the challenge used. Both are exposed anyway,
and a test checks that they agree.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .conventions import ALL_METRICS

__all__ = [
    "SCORE_TERMS",
    "challenge_score",
    "mean_metrics",
    "mean_of_scores",
    "score_of_means",
]

#: ``metric -> (weight, offset, scale)``: each term is ``weight * (value - offset) / scale``
#: (for PSNR/SSIM) or ``weight * (offset - value) / scale`` (for the lower-is-better ones).
SCORE_TERMS: dict[str, tuple[float, float, float]] = {
    "psnr": (20.0, 0.0, 50.0),
    "ssim": (15.0, 0.5, 0.5),
    "lpips": (20.0, 1.0, 0.4),
    "dists": (40.0, 1.0, 0.3),
    "niqe": (30.0, 1.0, 10.0),
}
_HIGHER_BETTER = ("psnr", "ssim")


def challenge_score(values: Mapping[str, float | np.ndarray]) -> float | np.ndarray:
    """The challenge SCORE of one image (floats) or of many (arrays, elementwise).

    Args:
        values (`Mapping[str, float | np.ndarray]`):
            Must hold all of ``psnr, ssim, lpips, dists, niqe``; extra keys are ignored.

    Returns:
        `float` or `np.ndarray`: the SCORE (arrays give one score per element).
    """
    missing = [m for m in ALL_METRICS if m not in values]
    if missing:
        raise ValueError(
            f"The SCORE needs all of {ALL_METRICS}; missing {missing} (got {sorted(values)})."
        )
    total = 0.0
    for metric, (weight, offset, scale) in SCORE_TERMS.items():
        v = np.asarray(values[metric], dtype=np.float64)
        term = (v - offset) if metric in _HIGHER_BETTER else (offset - v)
        total = total + weight * term / scale
    return float(total) if np.ndim(total) == 0 else total


def mean_metrics(per_image: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Per-metric means over images; a metric must be present for every image.

    Args:
        per_image (`Mapping[str, Mapping[str, float]]`): image -> metric -> value.

    Returns:
        `dict[str, float]`: metric -> mean, in canonical order.
    """
    if not per_image:
        raise ValueError("per_image is empty: there is nothing to average.")
    rows = list(per_image.values())
    names = [m for m in ALL_METRICS if all(m in r for r in rows)]
    return {m: float(np.mean([r[m] for r in rows], dtype=np.float64)) for m in names}


def score_of_means(per_image: Mapping[str, Mapping[str, float]]) -> float:
    """The SCORE of the per-metric means over the set."""
    return challenge_score(mean_metrics(per_image))


def mean_of_scores(per_image: Mapping[str, Mapping[str, float]]) -> float:
    """The mean over the set of the per-image SCOREs (equal to `score_of_means`: affine)."""
    if not per_image:
        raise ValueError("per_image is empty: there is nothing to average.")
    return float(np.mean([challenge_score(r) for r in per_image.values()], dtype=np.float64))
