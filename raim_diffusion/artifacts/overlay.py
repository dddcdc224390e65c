"""Visual check of detector results: the mask tinted over the image, with outlines and labels."""

from __future__ import annotations

import cv2
import numpy as np
import torch
from PIL import Image

from .detector import ArtifactResult

__all__ = ["overlay", "score_image"]


def overlay(
    image: torch.Tensor,
    result: ArtifactResult,
    index: int = 0,
    color: tuple[int, int, int] = (255, 40, 40),
    alpha: float = 0.4,
    outline: bool = True,
    text: bool = True,
) -> Image.Image:
    """Tint the detected regions of one image and annotate them.

    Args:
        image (`torch.Tensor`): N,3,H,W (or 3,H,W) in [0, 1] -- usually the generated image.
        result (`ArtifactResult`): the detector's output for that batch.
        index (`int`): which batch item to draw.
        color (`tuple`): RGB tint and outline colour.
        alpha (`float`): tint opacity in [0, 1].
        outline (`bool`): draw region contours.
        text (`bool`): write each region's class (or "region") and mean score at its box.

    Returns:
        `PIL.Image.Image`: RGB overlay (displays inline in Jupyter).
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha!r}: must be in [0, 1]")
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if not 0 <= index < image.shape[0] or index >= result.masks.shape[0]:
        raise ValueError(f"index={index!r}: out of range for a batch of {image.shape[0]}")
    if image.shape[-2:] != result.masks.shape[-2:]:
        raise ValueError(
            f"image size {tuple(image.shape[-2:])} differs from the mask size "
            f"{tuple(result.masks.shape[-2:])}"
        )
    img = image[index, :3].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    rgb = np.ascontiguousarray(np.round(img * 255).astype(np.uint8))
    mask = result.masks[index, 0].detach().cpu().numpy() > 0.5
    tint = np.asarray(color, np.float32)
    out = rgb.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * tint
    out = np.ascontiguousarray(np.round(out).astype(np.uint8))
    if outline and mask.any():
        contours, _ = cv2.findContours(
            mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
        )
        cv2.drawContours(out, contours, -1, color, thickness=max(1, min(out.shape[:2]) // 300))
    if text:
        scale = max(0.35, min(out.shape[:2]) / 1200)
        for reg in result.regions[index]:
            label = f"{reg.class_name or 'region'} {reg.mean_score:.2f}"
            x0, y0 = reg.box[0], max(reg.box[1] - 4, 12)
            # Dark halo under the text keeps it readable on any background.
            cv2.putText(
                out, label, (x0, y0), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA
            )
            cv2.putText(
                out, label, (x0, y0), cv2.FONT_HERSHEY_SIMPLEX, scale, color, 1, cv2.LINE_AA
            )
    return Image.fromarray(out)


def score_image(result: ArtifactResult, index: int = 0) -> Image.Image:
    """The weighted similarity map of one image as an 8-bit grayscale image (white = similar)."""
    s = result.scores[index, 0].detach().float().clamp(0, 1).cpu().numpy()
    return Image.fromarray(np.round(s * 255).astype(np.uint8))
