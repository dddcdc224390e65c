"""Binary morphology with OpenCV's default border semantics, plus hole filling and components.

Erosion and dilation run in torch (``max_pool2d``) on the device and are exact for binary
masks: ``max_pool2d`` pads with -inf, which is OpenCV's default for dilation (the outside never
dilates inwards); erosion is ``-max_pool2d(-x)``, i.e. the outside behaves as +inf and never
erodes the mask from the image border -- again OpenCV's default. Hole filling and connected
components are sequential by nature and run with ``scipy.ndimage`` on the CPU, where they are
exact and fast enough (a few ms per megapixel).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

__all__ = ["erode", "dilate", "fill_holes", "Components", "connected_components"]

_EIGHT = np.ones((3, 3), dtype=bool)


def _check_size(size: int, iterations: int) -> None:
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size={size!r}: must be a positive odd integer")
    if iterations < 0:
        raise ValueError(f"iterations={iterations!r}: must be >= 0")


def dilate(mask: torch.Tensor, size: int = 5, iterations: int = 1) -> torch.Tensor:
    """Dilate an N,1,H,W {0,1} mask with a ``size``x``size`` square (cv2.dilate defaults).

    Args:
        mask (`torch.Tensor`): float mask, N,1,H,W.
        size (`int`): odd side of the square structuring element.
        iterations (`int`): repetitions.

    Returns:
        `torch.Tensor`: the dilated mask (same dtype).
    """
    _check_size(size, iterations)
    for _ in range(iterations):
        mask = F.max_pool2d(mask, size, stride=1, padding=size // 2)
    return mask


def erode(mask: torch.Tensor, size: int = 5, iterations: int = 1) -> torch.Tensor:
    """Erode an N,1,H,W {0,1} mask with a square (cv2.erode defaults: no erosion from outside).

    Args:
        mask (`torch.Tensor`): float mask, N,1,H,W.
        size (`int`): odd side of the square structuring element.
        iterations (`int`): repetitions.

    Returns:
        `torch.Tensor`: the eroded mask (same dtype).
    """
    _check_size(size, iterations)
    for _ in range(iterations):
        mask = -F.max_pool2d(-mask, size, stride=1, padding=size // 2)
    return mask


def fill_holes(mask: np.ndarray, structure: np.ndarray | None = None) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes`` with a 3x3 ones structure (8-connected background).

    Args:
        mask (`np.ndarray`): H,W bool.
        structure (`np.ndarray`, *optional*): defaults to ``ones((3, 3))`` as in the reference.

    Returns:
        `np.ndarray`: H,W bool with enclosed background filled.
    """
    return ndimage.binary_fill_holes(mask, structure=_EIGHT if structure is None else structure)


@dataclass
class Components:
    """Labelled 8-connected components of one mask.

    Attributes:
        labels (`np.ndarray`): H,W int32, 0 = background, 1..count = component ids.
        areas (`np.ndarray`): pixel count per component id (index 0 = background).
        count (`int`): number of components.
    """

    labels: np.ndarray
    areas: np.ndarray
    count: int


def connected_components(mask: np.ndarray) -> Components:
    """Label 8-connected components (same partition as cv2's connectivity=8)."""
    labels, count = ndimage.label(mask, structure=_EIGHT)
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    return Components(labels=labels.astype(np.int32, copy=False), areas=areas, count=int(count))


def remove_small(mask: np.ndarray, threshold: float) -> tuple[np.ndarray, Components]:
    """Keep the components whose area is strictly greater than ``threshold`` pixels.

    Returns:
        `(kept, components)`: the filtered H,W bool mask and the components of the input.
    """
    comps = connected_components(mask)
    keep = comps.areas > threshold
    keep[0] = False
    return keep[comps.labels], comps
