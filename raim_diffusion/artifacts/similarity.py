"""Local-statistics similarity maps (SSIM contrast / structure terms) in torch.

All maps are computed in float64 on whatever device the inputs live on: the reference computes
in float64 and the variance ``E[x^2] - E[x]^2`` cancels catastrophically in float32 on flat
8-bit regions (values around 255^2 = 65025 with differences of 1e-3).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "contrast_similarity",
    "contrast_structure_similarity",
    "gaussian_kernel1d",
    "local_moments",
    "structure_similarity",
]


def gaussian_kernel1d(size: int, sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian of odd ``size`` (float64), as ``cv2.getGaussianKernel``.

    The 2-D window of the reference is the outer product of this kernel with itself, so the
    separable implementation here filters with the same weights.
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"window size={size!r}: must be a positive odd integer")
    if not sigma > 0:
        raise ValueError(f"sigma={sigma!r}: must be > 0")
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return k / k.sum()


def _filter(x: torch.Tensor, k: torch.Tensor, padding: str) -> torch.Tensor:
    """Separable filter of N,C,H,W ``x`` with the 1-D kernel ``k``, per channel.

    Written as a sum of shifted slices rather than ``conv2d``: PyTorch's float64 depthwise
    convolution on the CPU is a slow generic path (~50x slower), and the slices are plain
    element-wise ops that run well on any device.
    """
    n = k.numel()
    r = n // 2
    if padding == "reflect":
        # cv2's default BORDER_REFLECT_101 == torch's "reflect" (edge pixel not repeated).
        x = F.pad(x, (r, r, r, r), mode="reflect")
    h, w = x.shape[-2] - 2 * r, x.shape[-1] - 2 * r
    taps = k.tolist()
    rows = x[..., 0:h, :] * taps[0]
    for i in range(1, n):
        rows = rows + x[..., i : i + h, :] * taps[i]
    out = rows[..., 0:w] * taps[0]
    for i in range(1, n):
        out = out + rows[..., i : i + w] * taps[i]
    return out


def local_moments(
    x: torch.Tensor, y: torch.Tensor, size: int = 11, sigma: float = 1.5, padding: str = "valid"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian-weighted local variances of ``x`` and ``y`` and their covariance.

    Args:
        x, y (`torch.Tensor`): N,C,H,W images on the same scale (float64 recommended).
        size (`int`): Odd window size (11 in the reference).
        sigma (`float`): Gaussian sigma (1.5 in the reference).
        padding (`str`): ``"valid"`` crops ``size // 2`` pixels per side (the reference's
            convention); ``"reflect"`` keeps the size with reflect-101 borders.

    Returns:
        `(var_x, var_y, cov_xy)`: variances clamped at 0 (float cancellation can make them
        slightly negative, and a negative variance under a square root is NaN).
    """
    if padding not in ("valid", "reflect"):
        raise ValueError(f"padding={padding!r}: must be 'valid' or 'reflect'")
    if min(x.shape[-2:]) < size:
        raise ValueError(
            f"image of size {tuple(x.shape[-2:])} is smaller than the {size}x{size} window"
        )
    k = torch.from_numpy(gaussian_kernel1d(size, sigma))
    # One filtering pass over the five stacked moment images.
    c = x.shape[1]
    moments = _filter(torch.cat([x, y, x * x, y * y, x * y], dim=1), k, padding)
    mu_x, mu_y, xx, yy, xy = moments.split(c, dim=1)
    var_x = (xx - mu_x * mu_x).clamp_min_(0)
    var_y = (yy - mu_y * mu_y).clamp_min_(0)
    cov = xy - mu_x * mu_y
    return var_x, var_y, cov


def contrast_similarity(
    generated: torch.Tensor,
    reference: torch.Tensor,
    size: int = 11,
    sigma: float = 1.5,
    constant: float = (0.03 * 255) ** 2,
    padding: str = "valid",
    band_rows: int | None = 256,
) -> torch.Tensor:
    """SSIM's contrast term averaged over channels: ``(2 s_r s_g + C) / (s_r^2 + s_g^2 + C)``.

    Args:
        generated, reference (`torch.Tensor`): N,C,H,W on the 0..255 scale.
        size, sigma: Gaussian window.
        constant (`float`): ``C``; ``(0.03*255)^2`` on the 0..255 scale.
        padding (`str`): see :func:`local_moments`.
        band_rows (`int`, *optional*): output rows computed at once (bounds memory; the result
            does not depend on it); ``None`` = all.

    Returns:
        `torch.Tensor`: N,1,H',W' float64 in (0, 1]; 1 = equal local variance. ``1 - c`` is
        DeSRA's relative local-variance distance ``(s_r - s_g)^2 / (s_r^2 + s_g^2 + C)``.
    """

    def term(g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        var_g, var_r, _ = local_moments(g, r, size, sigma, "valid")
        num = 2.0 * torch.sqrt(var_r + 1e-8) * torch.sqrt(var_g + 1e-8) + constant
        return (num / (var_r + var_g + constant)).mean(dim=1, keepdim=True)

    return _banded(term, generated, reference, size, padding, band_rows)


def structure_similarity(
    generated: torch.Tensor,
    reference: torch.Tensor,
    size: int = 11,
    sigma: float = 1.5,
    constant: float = (0.03 * 255) ** 2 / 2,
    padding: str = "reflect",
    band_rows: int | None = 256,
) -> torch.Tensor:
    """SSIM's structure (correlation) term ``(cov + C/2) / (s_r s_g + C/2)`` clamped to [0, 1].

    Equal local variance with a different pattern (a wrong periodic texture, invented strokes)
    keeps the contrast term near 1 but drives the correlation towards 0; anticorrelation is
    treated as no correlation.

    Returns:
        `torch.Tensor`: N,1,H',W' float64 in [0, 1], averaged over channels.
    """

    def term(g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        var_g, var_r, cov = local_moments(g, r, size, sigma, "valid")
        s = (cov + constant) / (torch.sqrt(var_g * var_r) + constant)
        return s.clamp(0.0, 1.0).mean(dim=1, keepdim=True)

    return _banded(term, generated, reference, size, padding, band_rows)


def contrast_structure_similarity(
    generated: torch.Tensor,
    reference: torch.Tensor,
    size: int = 11,
    sigma: float = 1.5,
    contrast_constant: float = (0.03 * 255) ** 2,
    structure_constant: float = (0.03 * 255) ** 2 / 2,
    structure_weight: float = 1.0,
    padding: str = "reflect",
    band_rows: int | None = 256,
) -> torch.Tensor:
    """``contrast * structure ** structure_weight`` (channel means), sharing one moment pass.

    Equals ``contrast_similarity(...) * structure_similarity(...) ** structure_weight``.

    Returns:
        `torch.Tensor`: N,1,H',W' float64.
    """

    def term(g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        var_g, var_r, cov = local_moments(g, r, size, sigma, "valid")
        num = 2.0 * torch.sqrt(var_r + 1e-8) * torch.sqrt(var_g + 1e-8) + contrast_constant
        c = (num / (var_r + var_g + contrast_constant)).mean(dim=1, keepdim=True)
        s = (cov + structure_constant) / (torch.sqrt(var_g * var_r) + structure_constant)
        return c * s.clamp(0.0, 1.0).mean(dim=1, keepdim=True).pow(structure_weight)

    return _banded(term, generated, reference, size, padding, band_rows)


def _banded(
    fn: Any, g: torch.Tensor, r: torch.Tensor, size: int, padding: str, band_rows: int | None
) -> torch.Tensor:
    """Apply a valid-mode local-statistics ``fn`` in bands of output rows.

    Each output pixel depends only on its own window, so bands whose inputs overlap by
    ``size - 1`` rows give exactly the unbanded result while bounding the float64 temporaries
    (about 20 full-size copies per channel) on large images.
    """
    if padding not in ("valid", "reflect"):
        raise ValueError(f"padding={padding!r}: must be 'valid' or 'reflect'")
    if band_rows is not None and band_rows < 1:
        raise ValueError(f"band_rows={band_rows!r}: must be >= 1 or None")
    g = g.to(torch.float64)
    r = r.to(torch.float64)
    need = size if padding == "valid" else size // 2 + 1
    if min(g.shape[-2:]) < need:
        raise ValueError(
            f"image of size {tuple(g.shape[-2:])} is too small for the {size}px window "
            f"({padding} padding needs at least {need}px)"
        )
    if padding == "reflect":
        p = size // 2
        # cv2's default BORDER_REFLECT_101 == torch's "reflect" (edge pixel not repeated).
        g = F.pad(g, (p, p, p, p), mode="reflect")
        r = F.pad(r, (p, p, p, p), mode="reflect")
    out_rows = g.shape[-2] - size + 1
    if band_rows is None or band_rows >= out_rows:
        return fn(g, r)
    bands = [
        fn(
            g[..., a : min(a + band_rows, out_rows) + size - 1, :],
            r[..., a : min(a + band_rows, out_rows) + size - 1, :],
        )
        for a in range(0, out_rows, band_rows)
    ]
    return torch.cat(bands, dim=-2)


def window_for_sigma(sigma: float) -> int:
    """Odd window covering +-3.5 sigma (11 for the reference's sigma 1.5)."""
    return 2 * math.ceil(3.5 * sigma - 0.25) + 1
