"""The few tensor image operations every stage shares: resize, pad, crop.

Each exists once so that the prior, the diffusion stage, the detector, the fusion stage, the
metrics and the runner agree on the kernel and on the border rule:

- :func:`resize`: bicubic (Keys, a = -0.75, as PIL/OpenCV/MATLAB), antialiased when shrinking,
  clamped to [0, 1]. Antialiasing is only switched on for shrinking because torch's antialiased
  path uses a softer cubic (a = -0.5) when enlarging.
- :func:`pad` / :func:`pad_to_multiple`: reflection (keeps image statistics at the border, no dark
  frame), replication for whatever reflection cannot reach (a side of n pixels reflects at most
  n - 1).
- :func:`crop`: the inverse of bottom/right padding.

All take and return float tensors ``(..., H, W)`` (NCHW in the pipeline).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["crop", "pad", "pad_to_multiple", "resize", "scaled_size"]


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """``(H, W)`` times ``scale``, rounded, at least 1 pixel: the one rule for output sizes."""
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def resize(x: torch.Tensor, size: tuple[int, int], *, clamp: bool = True) -> torch.Tensor:
    """Bicubic resize of ``(N, C, H, W)`` to ``size = (H', W')``; antialiased when shrinking.

    Args:
        x (`torch.Tensor`): ``(N, C, H, W)`` float images.
        size (`tuple[int, int]`): the output height and width.
        clamp (`bool`, defaults to `True`): clamp to [0, 1] (bicubic overshoots at edges); off
            for tensors that are not images in [0, 1].

    Returns:
        `torch.Tensor`: ``x`` itself when the size already matches, else a new tensor.
    """
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    dtype = x.dtype
    # Half-precision bicubic is not implemented on every device; the kernel runs in float32.
    y = F.interpolate(x.float(), size=size, mode="bicubic", antialias=shrink, align_corners=False)
    if clamp:
        y = y.clamp_(0, 1)
    return y.to(dtype)


def pad(x: torch.Tensor, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0):
    """Pad the last two dimensions: reflection as far as it reaches, replication beyond.

    Args:
        x (`torch.Tensor`): ``(..., H, W)`` with at least 3 dimensions.
        left, right, top, bottom (`int`): pixels to add on each side (>= 0).

    Returns:
        `torch.Tensor`: ``x`` itself when nothing is added.
    """
    if min(left, right, top, bottom) < 0:
        raise ValueError(f"padding must be >= 0, got {(left, right, top, bottom)}")
    if not (left or right or top or bottom):
        return x
    h, w = x.shape[-2:]
    reach = [min(left, w - 1), min(right, w - 1), min(top, h - 1), min(bottom, h - 1)]
    if any(reach):
        x = F.pad(x, tuple(reach), mode="reflect")
    rest = (left - reach[0], right - reach[1], top - reach[2], bottom - reach[3])
    if any(rest):
        x = F.pad(x, rest, mode="replicate")
    return x


def pad_to_multiple(x: torch.Tensor, multiple: int | tuple[int, int]) -> torch.Tensor:
    """Pad bottom/right so that H and W are multiples of ``multiple`` (one int or ``(mh, mw)``).

    The original content stays the top-left ``H x W`` block (undo with :func:`crop`).
    """
    mh, mw = (multiple, multiple) if isinstance(multiple, int) else multiple
    h, w = x.shape[-2:]
    return pad(x, right=(-w) % mw, bottom=(-h) % mh)


def crop(x: torch.Tensor, size: tuple[int, int], top: int = 0, left: int = 0) -> torch.Tensor:
    """The ``size = (H, W)`` block of ``x`` starting at ``(top, left)`` (a view)."""
    h, w = size
    if top < 0 or left < 0 or top + h > x.shape[-2] or left + w > x.shape[-1]:
        raise ValueError(
            f"crop {h}x{w} at ({top}, {left}) does not fit in {tuple(x.shape[-2:])}"
        )
    return x[..., top : top + h, left : left + w]
