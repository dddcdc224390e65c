"""Colour correction of the generated image against the prior (StableSR / DiffBIR / SUPIR).

Diffusion decoders drift in colour and low-frequency tone; these fixes keep the generated
image's detail while taking colour from a faithful reference (the prior's output).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from ..ops import resize

ColorFix = Literal["wavelet", "adain", "none"]


def _check_pair(x: torch.Tensor, ref: torch.Tensor) -> None:
    if x.ndim != 4 or ref.ndim != 4:
        raise ValueError(f"x and ref must be NCHW, got {tuple(x.shape)} and {tuple(ref.shape)}")
    if x.shape[:2] != ref.shape[:2]:
        raise ValueError(
            f"x and ref must have the same batch and channels, got {tuple(x.shape)} and "
            f"{tuple(ref.shape)}"
        )


def adain_color_fix(x: torch.Tensor, ref: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Match each channel's mean and standard deviation of ``x`` to those of ``ref``.

    Args:
        x (`torch.Tensor`): Image to correct, NCHW.
        ref (`torch.Tensor`): Reference, NCHW with the same batch and channels (any size).
        eps (`float`, *optional*, defaults to 1e-5): Added to the unbiased variance.

    Returns:
        `torch.Tensor`: ``(x - mu_x) / sigma_x * sigma_ref + mu_ref``, in ``x``'s dtype.
    """
    _check_pair(x, ref)
    xf, rf = x.float().flatten(2), ref.float().flatten(2)
    mu_x, mu_r = xf.mean(-1, keepdim=True), rf.mean(-1, keepdim=True)
    sd_x = (xf.var(-1, keepdim=True, unbiased=True) + eps).sqrt()
    sd_r = (rf.var(-1, keepdim=True, unbiased=True) + eps).sqrt()
    out = (xf - mu_x) / sd_x * sd_r + mu_r
    return out.view_as(x).to(x.dtype)


def wavelet_lowpass(x: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """Low-frequency part of ``x`` after ``levels`` à-trous steps (dilations 1, 2, 4, ...).

    Each step is a depthwise ``[1, 2, 1]^T [1, 2, 1] / 16`` blur with replicate padding equal
    to its dilation; five levels reach about +-31 pixels.
    """
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    channels = x.shape[1]
    k1 = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float32, device=x.device)
    kernel = (k1[:, None] * k1[None, :] / 16).expand(channels, 1, 3, 3).contiguous()
    low = x.float()
    for i in range(levels):
        d = 2**i
        low = F.conv2d(F.pad(low, (d, d, d, d), mode="replicate"), kernel, dilation=d,
                       groups=channels)
    return low


def wavelet_color_fix(x: torch.Tensor, ref: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """Keep the high frequencies of ``x`` and take the low frequencies from ``ref``.

    Args:
        x (`torch.Tensor`): Image to correct, NCHW.
        ref (`torch.Tensor`): Reference aligned with ``x``; resized (bicubic, antialiased) to
            ``x``'s size when it differs.
        levels (`int`, *optional*, defaults to 5): À-trous levels.

    Returns:
        `torch.Tensor`: ``x - low(x) + low(ref)``, in ``x``'s dtype (linear in both inputs).
    """
    _check_pair(x, ref)
    ref = resize(ref, tuple(x.shape[-2:]))
    out = x.float() - wavelet_lowpass(x, levels) + wavelet_lowpass(ref, levels)
    return out.to(x.dtype)


#: Colour fixes by name: ``fn(x, ref) -> corrected x`` (not yet clamped).
COLOR_FIXES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "wavelet": wavelet_color_fix,
    "adain": adain_color_fix,
    "none": lambda x, ref: x,
}


def color_fix(x: torch.Tensor, ref: torch.Tensor, method: ColorFix = "wavelet") -> torch.Tensor:
    """Colour-correct ``x`` against ``ref`` with ``method`` and clamp to [0, 1].

    Args:
        x (`torch.Tensor`): Generated image, NCHW in [0, 1].
        ref (`torch.Tensor`): Faithful reference (the prior's output), NCHW in [0, 1].
        method (`str`, *optional*, defaults to `"wavelet"`): a name in `COLOR_FIXES`
            (`"wavelet"`, `"adain"` or `"none"`).
    """
    if method not in COLOR_FIXES:
        raise ValueError(f"color_fix must be one of {tuple(COLOR_FIXES)}, got {method!r}")
    if method == "none":
        return x
    return COLOR_FIXES[method](x, ref).clamp_(0, 1)
