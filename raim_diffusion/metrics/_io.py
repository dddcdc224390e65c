"""Image and file access for the metrics, all through `raim_diffusion.images` (the one edge)."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import torch
from PIL import Image

from .. import files as _files
from .. import images as _images

__all__ = ["atomic_write", "check_not_input", "find_images", "image_size", "load_rgb"]


def load_rgb(path: str | os.PathLike) -> torch.Tensor:
    """Read an image as a (1, 3, H, W) float32 tensor in [0, 1] (alpha dropped, EXIF applied)."""
    return _images.load_image(path).tensor


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image as it will be loaded (EXIF rotation applied), from its header.

    Reading only the header keeps the up-front size check of a whole folder cheap. A file whose
    header PIL cannot read is loaded in full the way `load_rgb` loads it (the edge also decodes
    some files PIL cannot), so it fails here exactly when it would fail to load.

    Raises:
        `InvalidImageError`: the file cannot be read as an image (the message names it).
    """
    try:
        # The edge applies its own pixel limit on load; PIL's warning would only duplicate it.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                try:
                    orientation = im.getexif().get(0x0112, 1)
                except Exception:  # a broken EXIF block only loses the rotation, as on load
                    orientation = 1
    except Exception:  # any header PIL rejects: let the edge decide
        return tuple(load_rgb(path).shape[-2:])
    # EXIF orientations 5-8 include a quarter turn.
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def find_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive, hidden files skipped), sorted."""
    try:
        return list(_files.find_images([folder]))
    except FileNotFoundError:
        return []


def check_not_input(
    path: str | os.PathLike,
    what: str,
    *,
    folders: Sequence[str | os.PathLike] = (),
    files: Sequence[str | os.PathLike] = (),
) -> None:
    """Refuse an output file that would overwrite an input or be read back as one.

    Args:
        path (`str` or `os.PathLike`): The output file.
        what (`str`): How the message names it (e.g. ``"--json"``).
        folders (`Sequence`): Input folders: an output with an image suffix inside one would be
            found as an input image by the next run (and may overwrite one now).
        files (`Sequence`): Input files the output must not be (key, judge files).

    Raises:
        `ValueError`: naming the output and the input it collides with.
    """
    real = os.path.realpath(path)
    for f in files:
        if os.path.realpath(f) == real:
            raise ValueError(f"{what} {path} is the input file {f}; choose another file name")
    if Path(path).suffix.lower() not in _files.IMAGE_SUFFIXES:
        return
    for folder in folders:
        top = os.path.realpath(folder)
        if os.path.isdir(top) and real.startswith(top.rstrip(os.sep) + os.sep):
            raise ValueError(
                f"{what} {path} is an image name inside the input folder {folder}: it would "
                "overwrite or join the inputs; choose a file outside it"
            )


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Atomic file write (`raim_diffusion.files.atomic_write`); text mode keeps newlines as is."""
    extra = {} if "b" in mode else {"newline": ""}
    with _files.atomic_write(path, mode, **extra) as fh:
        yield fh
