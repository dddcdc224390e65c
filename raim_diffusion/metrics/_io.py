"""Image and file access for the metrics, all through `raim_diffusion.images` (the one edge)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch
from PIL import Image

from .. import files as _files
from .. import images as _images
from ..errors import InvalidImageError

__all__ = ["atomic_write", "find_images", "image_size", "load_rgb"]


def load_rgb(path: str | os.PathLike) -> torch.Tensor:
    """Read an image as a (1, 3, H, W) float32 tensor in [0, 1] (alpha dropped, EXIF applied)."""
    return _images.load_image(path).tensor


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image as it will be loaded (EXIF rotation applied), from its header.

    Reading only the header keeps the up-front size check of a whole folder cheap.
    """
    try:
        with Image.open(path) as im:
            w, h = im.size
            try:
                orientation = im.getexif().get(0x0112, 1)
            except Exception:  # a broken EXIF block only loses the rotation, as on load
                orientation = 1
    except (OSError, ValueError) as exc:
        raise InvalidImageError(f"{path}: cannot read image ({exc}).") from exc
    # EXIF orientations 5-8 include a quarter turn.
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def find_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive, hidden files skipped), sorted."""
    try:
        return list(_files.find_images([folder]))
    except FileNotFoundError:
        return []


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Atomic file write (`raim_diffusion.files.atomic_write`); text mode keeps newlines as is."""
    extra = {} if "b" in mode else {"newline": ""}
    with _files.atomic_write(path, mode, **extra) as fh:
        yield fh
