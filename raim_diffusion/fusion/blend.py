"""Weight-free stage-4 fallback: Laplacian-pyramid blending with exact outer and inner regions.

Without FusionNet weights the masked (artifact) regions of the generated image are replaced by
a faithful image (the prior). A hard cut would leave a visible step wherever the two images
differ in brightness or colour; a wide alpha feather would ghost fine texture. Laplacian-pyramid
blending (Burt & Adelson) does both right: each frequency band is blended with a mask blurred to
the band's scale, so low frequencies (brightness, colour) cross over smoothly while fine detail
switches over a few pixels.

On top of the classic construction, two weights make the untouched parts exact:

- ``outer`` is 1 on the mask support and falls smoothly to exactly 0 beyond ``feather`` pixels
  (Chebyshev distance) from it; where it is 0 the output *is* ``base``, bit for bit;
- ``inner`` is 0 outside the fully-masked region and rises to exactly 1 deeper than ``feather``
  pixels inside it; where it is 1 the output *is* ``fill``.

Both are computed with max-pooling and box sums of 0/1 maps, which are exact in floating point on
every device, so "exactly 0" and "exactly 1" do not depend on rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ops import pad

_BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)


def _blur(x: torch.Tensor) -> torch.Tensor:
    """Separable 5-tap binomial blur, per channel."""
    c = x.shape[1]
    k = torch.tensor(_BINOMIAL, dtype=x.dtype, device=x.device) / 16.0
    x = F.conv2d(pad(x, 2, 2, 0, 0), k.view(1, 1, 1, 5).expand(c, 1, 1, 5), groups=c)
    return F.conv2d(pad(x, 0, 0, 2, 2), k.view(1, 1, 5, 1).expand(c, 1, 5, 1), groups=c)


def _down(x: torch.Tensor) -> torch.Tensor:
    return _blur(x)[..., ::2, ::2]


def _up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _box_sum(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Sum over a ``(2r+1)^2`` window with replicated borders (exact for 0/1 maps)."""
    k = 2 * radius + 1
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.avg_pool2d(x, (1, k), stride=1, divisor_override=1)
    return F.avg_pool2d(x, (k, 1), stride=1, divisor_override=1)


def band_weight(support: torch.Tensor, feather: int) -> torch.Tensor:
    """Smooth weight: 1 on ``support``, exactly 0 farther than ``feather`` pixels from it.

    The support is dilated by ``ceil(feather / 2)`` (max-pool) and then box-averaged with radius
    ``floor(feather / 2)``; the box average is exactly 1 where its window lies inside the dilated
    support (which includes the support itself) and exactly 0 where the window misses it. A
    smoothstep removes the kinks at both ends of the ramp.

    Args:
        support (`torch.Tensor`): ``(N, 1, H, W)`` bool.
        feather (`int`): Band width in pixels (Chebyshev distance).

    Returns:
        `torch.Tensor`: ``(N, 1, H, W)`` float32 in [0, 1].
    """
    s = support.float()
    if feather <= 0:
        return s
    r_dilate, r_box = (feather + 1) // 2, feather // 2
    s = F.max_pool2d(s, 2 * r_dilate + 1, stride=1, padding=r_dilate)
    if r_box == 0:
        return s
    t = _box_sum(s, r_box) / float((2 * r_box + 1) ** 2)
    return t * t * (3.0 - 2.0 * t)


def default_levels(feather: int, height: int, width: int) -> int:
    """Pyramid depth whose coarsest band spans about the feather width and fits the image."""
    levels = max(1, int(math.log2(max(feather, 2) / 2)))
    fit = max(0, int(math.log2(max(min(height, width), 1))) - 2)
    return min(levels, fit)


def pyramid_blend(
    base: torch.Tensor,
    fill: torch.Tensor,
    mask: torch.Tensor,
    *,
    levels: int | None = None,
    feather: int = 16,
) -> torch.Tensor:
    """Blend ``fill`` into ``base`` inside ``mask`` with a Laplacian pyramid, seam-free.

    Args:
        base (`torch.Tensor`): ``(N, C, H, W)`` image kept outside the mask (the generated image).
        fill (`torch.Tensor`): ``(N, C, H, W)`` image used inside the mask (e.g. the prior).
        mask (`torch.Tensor`): ``(N or 1, 1, H, W)`` in [0, 1]; 1 = take ``fill``.
        levels (`int`, *optional*): Laplacian levels below full resolution; by default about
            ``log2(feather / 2)``, limited by the image size.
        feather (`int`, *optional*, defaults to 16): Width in pixels of the transition band on
            each side of the mask border. Pixels farther than this outside the mask equal
            ``base`` exactly; pixels farther than this inside a fully masked (== 1) region equal
            ``fill`` exactly.

    Returns:
        `torch.Tensor`: ``(N, C, H, W)`` blended image in the dtype of ``base`` (not clamped).
    """
    if base.ndim != 4:
        raise ValueError(f"base must be (N, C, H, W), got {tuple(base.shape)}")
    if fill.shape != base.shape:
        raise ValueError(f"fill {tuple(fill.shape)} must match base {tuple(base.shape)}")
    n, _, height, width = base.shape
    if (
        mask.ndim != 4
        or mask.shape[1] != 1
        or mask.shape[-2:] != (height, width)
        or (mask.shape[0] not in (1, n))
    ):
        raise ValueError(f"mask must be (N or 1, 1, {height}, {width}), got {tuple(mask.shape)}")
    if not isinstance(feather, int) or feather < 0:
        raise ValueError(f"feather must be a non-negative int, got {feather!r}")
    if levels is None:
        levels = default_levels(feather, height, width)
    elif not isinstance(levels, int) or levels < 0:
        raise ValueError(f"levels must be a non-negative int or None, got {levels!r}")

    work = torch.promote_types(base.dtype, torch.float32)
    b, f = base.to(work), fill.to(work)
    m = mask.to(device=base.device, dtype=work).clamp(0, 1).expand(n, -1, -1, -1)
    outer = band_weight(m > 0, feather).to(work)
    inner = 1 - band_weight(m < 1, feather).to(work)

    # Blend the difference: base + collapse(sum_l W_l * L_l(fill - base)) equals the classic
    # band-wise blend of the two pyramids and needs one pyramid instead of two.
    gauss, weights = [f - b], [_blur(m)]
    for _ in range(levels):
        gauss.append(_down(gauss[-1]))
        weights.append(_down(weights[-1]))
    delta = weights[-1] * gauss[-1]
    for lev in range(levels - 1, -1, -1):
        size = gauss[lev].shape[-2:]
        laplacian = gauss[lev] - _up(gauss[lev + 1], size)
        delta = _up(delta, size) + weights[lev] * laplacian

    blended = b + outer * (inner * (f - b) + (1 - inner) * delta)
    out = torch.where(outer == 0, b, torch.where(inner == 1, f, blended))
    return out.to(base.dtype)
