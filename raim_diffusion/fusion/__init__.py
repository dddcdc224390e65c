"""Stage 4: fuse a faithful restoration into the artifact regions of the generated image.

With trained weights, [`FusionNet`] (a 1x SRFormer) re-restores the masked regions from the
low-quality input; without them, [`pyramid_blend`] blends the prior in seam-free.
"""

from __future__ import annotations

import torch

from ..ops import resize
from .blend import band_weight, pyramid_blend
from .model import PRESETS, FusionNet, make_composite
from .srformer import SRFormer, strip_official_buffers

__all__ = [
    "PRESETS",
    "FusionNet",
    "SRFormer",
    "band_weight",
    "fuse",
    "make_composite",
    "pyramid_blend",
    "strip_official_buffers",
]


def fuse(
    generated: torch.Tensor,
    prior: torch.Tensor | None,
    lq_up: torch.Tensor | None,
    mask: torch.Tensor,
    fusion: FusionNet | None = None,
    *,
    tile: int | None = None,
    overlap: int = 32,
    feather: int = 16,
    levels: int | None = None,
) -> torch.Tensor:
    """Stage 4 of the pipeline: replace the masked regions of ``generated``.

    Args:
        generated (`torch.Tensor`): ``(N, 3, H, W)`` generated image in [0, 1].
        prior (`torch.Tensor`, *optional*): ``(N, 3, H, W)`` prior result; the fill image of the
            blend fallback.
        lq_up (`torch.Tensor`, *optional*): ``(N, 3, h, w)`` LQ input; resized to ``H x W``
            (`raim_diffusion.ops.resize`) when its size differs. Required by ``fusion``, and
            the fallback's fill when there is no prior.
        mask (`torch.Tensor`): ``(N or 1, 1, H, W)`` in [0, 1], 1 = artifact.
        fusion (`FusionNet`, *optional*): Trained network; without it the pyramid blend is used.
        tile (`int`, *optional*): Tile size for ``fusion``; `None` runs the whole image at once.
        overlap (`int`, *optional*, defaults to 32): Tile overlap for ``fusion``.
        feather (`int`, *optional*, defaults to 16): Transition width of the blend fallback.
        levels (`int`, *optional*): Pyramid levels of the blend fallback.

    Returns:
        `torch.Tensor`: ``(N, 3, H, W)`` in [0, 1], dtype of ``generated``.
    """
    if lq_up is not None and lq_up.shape[-2:] != generated.shape[-2:]:
        if lq_up.ndim != 4:
            raise ValueError(f"lq_up must be (N, 3, h, w), got {tuple(lq_up.shape)}")
        lq_up = resize(lq_up, tuple(generated.shape[-2:])).to(generated.dtype)
    if fusion is not None:
        if lq_up is None:
            raise ValueError("lq_up is required when a fusion network is given")
        return fusion.restore(lq_up, mask, generated, tile=tile, overlap=overlap)
    fill = prior if prior is not None else lq_up
    if fill is None:
        raise ValueError("the blend fallback needs prior or lq_up as the fill image, got neither")
    fill = fill.to(device=generated.device, dtype=generated.dtype)
    return pyramid_blend(generated, fill, mask, levels=levels, feather=feather).clamp(0, 1)
