"""The image edge: reading, converting and writing images.

Everything inside raim-diffusion works on float32 tensors, NCHW, RGB, values in [0, 1]. This
module is the only place that knows about files, PIL, numpy, bit depths, grayscale, palettes,
alpha channels, CMYK, ICC profiles and EXIF orientation:

- :func:`load_image` reads one image (a path, bytes, a binary file, a PIL image, a numpy array
  or a torch tensor) into a :class:`LoadedImage`: the RGB tensor plus what is needed to write the
  result back the way the input was (alpha, bit depth, ICC profile, grayscale, EXIF).
- :func:`to_tensor` turns one image or a list of same-sized images into one (N, 3, H, W) batch.
- :func:`save_image` writes PNG / JPEG / WebP / TIFF / BMP atomically, 8- or 16-bit, with alpha;
  ``save_image(x, path, like=loaded)`` writes `x` the way `loaded` was stored.
- :func:`check_unit_range` is the one value check of float images: finite and in [0, 1].
- :func:`to_pil` and :func:`to_numpy` convert tensors for display and for other libraries.

Finding inputs, output paths and atomic writes live in :mod:`raim_diffusion.files`.

Bad input raises :class:`~raim_diffusion.errors.InvalidImageError` (a ``ValueError``) whose message
names the file (or the argument) and the problem; a wrong Python type raises ``TypeError``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import math
import os
import stat
import struct
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, Union

import numpy as np
import torch
from diffusers.utils import logging
from PIL import Image, UnidentifiedImageError

from .errors import InvalidImageError
from .files import IMAGE_SUFFIXES, atomic_write
from .ops import resize

logger = logging.get_logger(__name__)

__all__ = [
    "DEFAULT_MAX_FILE_BYTES",
    "DEFAULT_MAX_PIXELS",
    "RANGE_TOLERANCE",
    "LoadedImage",
    "check_unit_range",
    "load_image",
    "resize_alpha",
    "save_image",
    "to_numpy",
    "to_pil",
    "to_tensor",
]


#: Default limit on width * height for decoded files (about 134 megapixels, e.g. 16384 x 8192).
#: It stays below Pillow's own hard decompression-bomb limit (2 * ``PIL.Image.MAX_IMAGE_PIXELS``,
#: about 179 megapixels by default), so the number documented here is the one enforced.
DEFAULT_MAX_PIXELS: int = 2**27

#: Default limit on the size of an image file read by :func:`load_image` (1 GiB), checked before
#: reading: an entry that claims to be an image must not make the reader exhaust memory.
DEFAULT_MAX_FILE_BYTES: int = 2**30

#: How far float images may stray outside [0, 1] and still be accepted (then clamped) by
#: :func:`check_unit_range`: resampling overshoot and VAE decoding land slightly outside; anything
#: further out is almost always a [0, 255] or [-1, 1] image passed by mistake, so it is refused.
RANGE_TOLERANCE: float = 0.05

_SUFFIX_TO_FORMAT = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
}
_SIXTEEN_BIT_FORMATS = ("PNG", "TIFF")
_ALPHA_FORMATS = ("PNG", "WEBP", "TIFF", "BMP")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
# zlib level 4 writes a 12-megapixel photo about 2.5x faster than Pillow's default 6, for files
# about 5% larger: the better trade for batch outputs.
_PNG_COMPRESS_LEVEL = 4

# EXIF orientation tag value -> PIL transpose that makes the image upright (same table as
# PIL.ImageOps.exif_transpose).
_ORIENTATION_TO_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112
_EXIF_PREFIX = b"Exif\x00\x00"
# The EXIF tags of a TIFF's first directory that describe the photo rather than the pixel
# layout (which belongs to whichever file is written): ImageDescription, Make, Model,
# Orientation, X/YResolution, ResolutionUnit, Software, DateTime, Artist, WhitePoint,
# PrimaryChromaticities, Copyright, and the Exif and GPS sub-directories.
_EXIF_IFD_TAGS = (0x8769, 0x8825)
_EXIF_DESCRIPTIVE_TAGS = (
    0x010E, 0x010F, 0x0110, 0x0112, 0x011A, 0x011B, 0x0128, 0x0131, 0x0132, 0x013B, 0x013E,
    0x013F, 0x8298, *_EXIF_IFD_TAGS,
)  # fmt: skip
# A JPEG APP1 segment holds at most 65535 bytes, 2 of which are its length.
_JPEG_MAX_EXIF_BYTES = 65533
# ITU-R BT.601 luma, the weights of PIL's convert("L").
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)

ImageInput = Union[str, os.PathLike, bytes, IO[bytes], Image.Image, np.ndarray, torch.Tensor]


@dataclass(frozen=True, eq=False)
class LoadedImage:
    """One image read at the edge, in the library's data contract.

    Attributes:
        tensor (`torch.Tensor`):
            RGB image, shape (1, 3, H, W), float32, values in [0, 1]. Grayscale inputs are
            replicated to three channels.
        alpha (`torch.Tensor` or `None`):
            Alpha channel, shape (1, 1, H, W), float32 in [0, 1], or `None` when the input had no
            transparency. Kept aside so stages never see it; pass it to :func:`save_image`.
        bit_depth (`int`):
            8 or 16: the precision of the source (16 for 16-bit PNG/TIFF, ``uint16`` arrays and
            float inputs, 8 otherwise). Pass it to :func:`save_image` to write the same depth.
        source (`pathlib.Path` or `None`):
            The file the image came from, or `None` for in-memory inputs.
        format (`str` or `None`):
            The file format as PIL names it ("PNG", "JPEG", "TIFF", ...), or `None`.
        icc_profile (`bytes` or `None`):
            The embedded ICC colour profile, if any. Pixel values are not colour-converted
            (except CMYK, which must become RGB); :func:`save_image` re-embeds the profile so the
            colours of the output mean what those of the input meant.
        grayscale (`bool`):
            Whether the source had a single colour channel (L, LA, 16-bit gray; its three
            channels are equal). ``save_image(x, path, like=loaded)`` then writes one channel.
        exif (`bytes` or `None`):
            The source's raw EXIF block (starting with ``b"Exif\\0\\0"``) with its orientation
            set to 1, since :attr:`tensor` is already upright; `None` when there is none. For
            TIFF sources only the tags describing the photo are kept (not the pixel layout).
    """

    tensor: torch.Tensor
    alpha: torch.Tensor | None = None
    bit_depth: int = 8
    source: Path | None = None
    format: str | None = None
    icc_profile: bytes | None = None
    grayscale: bool = False
    exif: bytes | None = None

    @property
    def height(self) -> int:
        """Height in pixels."""
        return int(self.tensor.shape[-2])

    @property
    def width(self) -> int:
        """Width in pixels."""
        return int(self.tensor.shape[-1])

    @property
    def name(self) -> str:
        """The source file's name, or ``"<memory>"`` for in-memory inputs."""
        return self.source.name if self.source is not None else "<memory>"

    def to(self, device: torch.device | str | None = None) -> LoadedImage:
        """Return a copy whose tensor and alpha live on `device`."""
        alpha = self.alpha.to(device) if self.alpha is not None else None
        return replace(self, tensor=self.tensor.to(device), alpha=alpha)


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


@dataclass
class _Pixels:
    """Decoded pixels before they become tensors: HxWxC colour (C = 1 or 3) and HxW alpha."""

    color: np.ndarray
    alpha: np.ndarray | None
    bit_depth: int
    icc_profile: bytes | None = None
    format: str | None = None
    exif: bytes | None = None


def _import_cv2() -> Any:
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - opencv is a core dependency
        raise ImportError(
            "16-bit RGB PNG/TIFF files need OpenCV: pip install opencv-python-headless"
        ) from e
    return cv2


def _check_pixels(width: int, height: int, name: str, max_pixels: int | None) -> None:
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"{name}: image has zero size ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise InvalidImageError(
            f"{name}: image is {width}x{height} = {width * height} pixels, more than the limit "
            f"of {max_pixels} (possible decompression bomb); pass a larger max_pixels to allow it"
        )


def _file_bit_depth(im: Image.Image, data: bytes) -> int:
    """Bits per sample stored in the file, which PIL may have reduced to 8 when opening."""
    if im.format == "PNG" and data[12:16] == b"IHDR":
        return 16 if data[24] == 16 else 8
    if im.format == "TIFF":
        bits = getattr(im, "tag_v2", {}).get(258)
        if bits is not None:
            bits = bits if isinstance(bits, tuple) else (bits,)
            return 16 if max(int(b) for b in bits) > 8 else 8
    return 16 if im.mode in _SIXTEEN_BIT_MODES else 8


def _exif_orientation(im: Image.Image, name: str) -> int:
    try:
        orientation = int(im.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception as e:  # malformed EXIF must not make an otherwise good photo unreadable
        logger.warning(f"{name}: ignoring unreadable EXIF data ({e})")
        return 1
    return orientation if orientation in _ORIENTATION_TO_TRANSPOSE else 1


def _with_exif_prefix(raw: bytes) -> bytes:
    return raw if raw.startswith(_EXIF_PREFIX) else _EXIF_PREFIX + raw


def _raw_exif_orientation(raw: bytes | None, name: str) -> int:
    """The orientation stored in a raw EXIF block (with or without the "Exif" prefix)."""
    if not raw:
        return 1
    exif = Image.Exif()
    try:
        exif.load(_with_exif_prefix(raw))
        orientation = int(exif.get(_EXIF_ORIENTATION_TAG, 1))
    except Exception as e:
        logger.warning(f"{name}: ignoring unreadable EXIF data ({e})")
        return 1
    return orientation if orientation in _ORIENTATION_TO_TRANSPOSE else 1


def _png_exif(data: bytes) -> bytes | None:
    """The payload of a PNG's eXIf chunk, found by walking the chunk headers.

    PIL's PNG getexif() would decode the whole image (to 8 bits) to find a trailing eXIf chunk;
    reading the chunk directly avoids that second decode.
    """
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"eXIf":
            return data[pos + 8 : pos + 8 + length]
        if kind == b"IEND":
            break
        pos += 12 + length
    return None


def _upright_exif(raw: bytes) -> bytes:
    """A raw EXIF block, prefixed with "Exif\\0\\0", whose orientation says "upright" (1).

    The block is patched in place rather than parsed and rebuilt, so every other tag (maker
    notes included) keeps its exact bytes and offsets.
    """
    raw = _with_exif_prefix(raw)
    return _EXIF_PREFIX + _tiff_without_orientation(raw[len(_EXIF_PREFIX) :])


def _descriptive_exif(exif: Image.Exif, sub_ifds: bool = True) -> bytes | None:
    """The tags of `exif` that describe the photo (see _EXIF_DESCRIPTIVE_TAGS), orientation 1.

    A TIFF's own directory mixes EXIF tags with its pixel layout (size, strips, compression);
    only the former may travel to another file. `sub_ifds=False` leaves out the Exif and GPS
    sub-directories.
    """
    keep = Image.Exif()
    for tag in _EXIF_DESCRIPTIVE_TAGS:
        if tag not in exif or (tag in _EXIF_IFD_TAGS and not sub_ifds):
            continue
        value = exif.get_ifd(tag) if tag in _EXIF_IFD_TAGS else exif[tag]
        if value not in (None, {}):
            keep[tag] = value
    if not len(keep):
        return None
    if _EXIF_ORIENTATION_TAG in keep:
        keep[_EXIF_ORIENTATION_TAG] = 1
    return keep.tobytes()


def _exif_of(im: Image.Image, name: str) -> bytes | None:
    """The EXIF block of an opened image, orientation reset to 1; `None` when it has none."""
    try:
        raw = im.info.get("exif")
        if isinstance(raw, (bytes, bytearray)) and raw:
            return _upright_exif(bytes(raw))
        if im.format == "PNG" and "exif" not in im.info:
            return None  # (PIL's getexif would decode the image to look for a trailing chunk)
        return _descriptive_exif(im.getexif())  # TIFF tags, or EXIF set on an in-memory image
    except Exception as e:  # malformed EXIF must not make an otherwise good photo unreadable
        logger.warning(f"{name}: ignoring unreadable EXIF data ({e})")
        return None


# Bytes per value of each TIFF field type (BYTE, ASCII, SHORT, LONG, RATIONAL, ..., LONG8, IFD8).
_TIFF_TYPE_SIZES = {
    1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8,
    17: 8, 18: 8,
}  # fmt: skip
_TIFF_INT_FORMATS = {3: "H", 4: "I", 16: "Q"}
_TIFF_ICC_TAG = 34675


@dataclass
class _TiffDirectory:
    """The first directory (IFD) of a TIFF: byte order, BigTIFF flag and its entries."""

    order: str
    big: bool
    # (tag, field type, value count, position of the value field in the file)
    entries: list[tuple[int, int, int, int]]

    def int_value(self, data: bytes, tag: int) -> int | None:
        for entry_tag, kind, count, at in self.entries:
            if entry_tag == tag and count >= 1 and kind in _TIFF_INT_FORMATS:
                return int(struct.unpack_from(self.order + _TIFF_INT_FORMATS[kind], data, at)[0])
        return None

    def raw_value(self, data: bytes, tag: int) -> bytes | None:
        for entry_tag, kind, count, at in self.entries:
            if entry_tag == tag:
                size = _TIFF_TYPE_SIZES.get(kind, 1) * count
                if size <= (8 if self.big else 4):
                    return data[at : at + size]
                (offset,) = struct.unpack_from(self.order + ("Q" if self.big else "I"), data, at)
                value = data[offset : offset + size]
                return value if len(value) == size else None
        return None


def _tiff_directory(data: bytes) -> _TiffDirectory | None:
    """Parse a classic or BigTIFF's first directory from its header; `None` if it is damaged."""
    order = {b"II": "<", b"MM": ">"}.get(data[:2])
    if order is None:
        return None
    try:
        (magic,) = struct.unpack_from(order + "H", data, 2)
        if magic == 42:  # classic TIFF: 2-byte entry count, 12-byte entries, 4-byte values
            (ifd,) = struct.unpack_from(order + "I", data, 4)
            count_fmt, entry_size, value_at, count_at = "H", 12, 8, "I"
        elif magic == 43:  # BigTIFF: 8-byte entry count, 20-byte entries, 8-byte values
            (ifd,) = struct.unpack_from(order + "Q", data, 8)
            count_fmt, entry_size, value_at, count_at = "Q", 20, 12, "Q"
        else:
            return None
        (n,) = struct.unpack_from(order + count_fmt, data, ifd)
        first = ifd + struct.calcsize(count_fmt)
        if first + n * entry_size > len(data):
            return None
        entries = []
        for i in range(n):
            at = first + i * entry_size
            tag, kind = struct.unpack_from(order + "HH", data, at)
            (count,) = struct.unpack_from(order + count_at, data, at + 4)
            entries.append((tag, kind, count, at + value_at))
    except struct.error:
        return None
    return _TiffDirectory(order, magic == 43, entries)


def _tiff_without_orientation(data: bytes) -> bytes:
    """A copy of a TIFF whose first directory's Orientation tag is reset to 1 (top-left).

    OpenCV applies the TIFF orientation itself (even with IMREAD_IGNORE_ORIENTATION) and fails
    on the transposing ones (5-8), so the tag is neutralised and the orientation applied here,
    the same way as for every other format. EXIF blocks have the same layout.
    """
    directory = _tiff_directory(data)
    if directory is None:
        return data
    for tag, kind, count, at in directory.entries:
        if tag == _EXIF_ORIENTATION_TAG and kind == 3 and count >= 1:  # 0x0112, type SHORT
            patched = bytearray(data)
            struct.pack_into(directory.order + "H", patched, at, 1)
            return bytes(patched)
    return data


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) read from the file header alone, without decoding any pixel."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    if data[:2] in (b"II", b"MM"):
        directory = _tiff_directory(data)
        if directory is None:
            return None
        width, height = directory.int_value(data, 256), directory.int_value(data, 257)
        return (width, height) if width is not None and height is not None else None
    with contextlib.suppress(Exception), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    return None


def _orient_array(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply the EXIF orientation transform to an HxW[xC] array (as PIL's exif_transpose)."""
    if orientation == 2:
        arr = arr[:, ::-1]
    elif orientation == 3:
        arr = arr[::-1, ::-1]
    elif orientation == 4:
        arr = arr[::-1]
    elif orientation == 5:
        arr = arr.swapaxes(0, 1)
    elif orientation == 6:
        arr = np.rot90(arr, k=-1)
    elif orientation == 7:
        arr = arr.swapaxes(0, 1)[::-1, ::-1]
    elif orientation == 8:
        arr = np.rot90(arr, k=1)
    return np.ascontiguousarray(arr)


def _split_channels(arr: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """HxW or HxWxC (C in 1..4, RGB order) -> (HxWxC' colour with C' in {1, 3}, HxW alpha)."""
    if arr.ndim == 2:
        return arr[..., None], None
    channels = arr.shape[2]
    if channels == 1:
        return arr, None
    if channels == 2:
        return arr[..., :1], arr[..., 1]
    if channels == 3:
        return arr, None
    if channels == 4:
        return arr[..., :3], arr[..., 3]
    raise InvalidImageError(f"{name}: unsupported number of channels {channels} (allowed: 1-4)")


def _decode_with_cv2(data: bytes, name: str, orientation: int, max_pixels: int | None) -> _Pixels:
    # PIL silently reduces 16-bit RGB(A) PNG/TIFF to 8 bits (and cannot open float RGB TIFF);
    # OpenCV keeps every bit. OpenCV has no header-only API, so the size is read from the
    # header here and checked before a single pixel is decoded.
    size = _header_size(data)
    if size is None:
        raise InvalidImageError(f"{name}: cannot read the image size from its damaged header")
    _check_pixels(size[0], size[1], name, max_pixels)
    cv2 = _import_cv2()
    arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise InvalidImageError(
            f"{name}: image data is truncated or corrupt (OpenCV could not decode it)"
        )
    _check_pixels(arr.shape[1], arr.shape[0], name, max_pixels)
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = arr[..., ::-1]
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., [2, 1, 0, 3]]
    if arr.dtype.kind == "f":  # 32/64-bit float TIFF: values are meant to be in [0, 1]
        arr = _check_float_array(arr.astype(np.float32), name)
    elif arr.dtype not in (np.uint8, np.uint16):
        arr = _integer_to_uint16(arr, name)
    color, alpha = _split_channels(_orient_array(arr, orientation), name)
    return _Pixels(color, alpha, 8 if arr.dtype == np.uint8 else 16)


def _integer_to_uint16(arr: np.ndarray, name: str) -> np.ndarray:
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > 65535:
        logger.warning(f"{name}: integer pixel values span [{lo}, {hi}]; clipping to [0, 65535]")
    return np.clip(arr, 0, 65535).astype(np.uint16)


def _pil_to_pixels(im: Image.Image, name: str) -> _Pixels:
    """Decode a loaded, upright PIL image of any mode into colour + alpha arrays."""
    mode = im.mode
    has_transparency = im.info.get("transparency") is not None
    if mode in ("P", "PA"):
        im = im.convert("RGBA" if (has_transparency or mode == "PA") else "RGB")
    elif mode in ("L", "RGB") and has_transparency:
        # A tRNS colour key: PIL turns it into a real alpha channel.
        im = im.convert("LA" if mode == "L" else "RGBA")
    elif mode == "1":
        im = im.convert("L")
    elif mode == "La":
        im = im.convert("LA")
    elif mode == "RGBa":
        im = im.convert("RGBA")
    elif mode in ("CMYK", "RGBX", "YCbCr", "LAB", "HSV"):
        # Without a colour-management pipeline the plain CMYK formula is the honest choice; any
        # embedded CMYK profile does not describe the RGB result, so it is not carried over.
        im = im.convert("RGB")
    elif mode not in ("L", "LA", "RGB", "RGBA", *_SIXTEEN_BIT_MODES):
        try:
            im = im.convert("RGBA" if "A" in mode else "RGB")
        except (ValueError, OSError) as e:
            raise InvalidImageError(f"{name}: unsupported image mode {mode!r} ({e})") from e

    icc = im.info.get("icc_profile") if mode != "CMYK" else None
    arr = np.asarray(im)
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return _Pixels(arr.astype(np.uint16)[..., None], None, 16, icc)
    if im.mode == "I":
        return _Pixels(_integer_to_uint16(arr, name)[..., None], None, 16, icc)
    if im.mode == "F":
        color = _check_float_array(arr.astype(np.float32), name)
        return _Pixels(color[..., None], None, 16, icc)
    color, alpha = _split_channels(arr, name)
    return _Pixels(color, alpha, 8, icc)


def _decode_bytes(data: bytes, name: str, max_pixels: int | None) -> _Pixels:
    if not data:
        raise InvalidImageError(f"{name}: file is empty (0 bytes)")
    # Our own max_pixels is the limit; PIL's warning would only duplicate it (its hard error
    # above 2 * Image.MAX_IMAGE_PIXELS is still reported below).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise InvalidImageError(
                f"{name}: {e} (Pillow's own limit; raise PIL.Image.MAX_IMAGE_PIXELS to allow it)"
            ) from e
        except UnidentifiedImageError as e:
            if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
                return _decode_tiff_with_cv2(data, name, max_pixels)
            raise InvalidImageError(
                f"{name}: cannot identify the image format: not an image, an unsupported "
                f"format or a damaged header ({len(data)} bytes)"
            ) from e
        except Exception as e:
            raise InvalidImageError(
                f"{name}: cannot read image header ({type(e).__name__}: {e})"
            ) from e
        with im:
            _check_pixels(im.width, im.height, name, max_pixels)
            with contextlib.suppress(Exception):  # counting frames may walk a damaged file
                if getattr(im, "n_frames", 1) > 1:
                    logger.info(f"{name}: has {im.n_frames} frames; using the first")
            file_format = im.format
            icc = im.info.get("icc_profile")
            if _file_bit_depth(im, data) == 16 and im.mode not in _SIXTEEN_BIT_MODES:
                if im.format == "PNG":
                    raw_exif = _png_exif(data)
                    orientation = _raw_exif_orientation(raw_exif, name)
                    exif = _upright_exif(raw_exif) if raw_exif else None
                else:
                    orientation = _exif_orientation(im, name)
                    exif = _exif_of(im, name)
                if im.format == "TIFF" and orientation != 1:
                    data = _tiff_without_orientation(data)
                pixels = _decode_with_cv2(data, name, orientation, max_pixels)
                pixels.icc_profile = icc
                pixels.exif = exif
            else:
                pixels = _upright_pixels(im, name)
    pixels.format = file_format
    return pixels


def _decode_tiff_with_cv2(data: bytes, name: str, max_pixels: int | None) -> _Pixels:
    """A TIFF layout Pillow cannot open (e.g. float RGB): OpenCV can."""
    directory = _tiff_directory(data)
    orientation = directory.int_value(data, _EXIF_ORIENTATION_TAG) if directory else None
    orientation = orientation if orientation in _ORIENTATION_TO_TRANSPOSE else 1
    if orientation != 1:
        data = _tiff_without_orientation(data)
    pixels = _decode_with_cv2(data, name, orientation, max_pixels)
    pixels.format = "TIFF"
    if directory is not None:
        pixels.icc_profile = directory.raw_value(data, _TIFF_ICC_TAG) or None
    return pixels


def _check_float_array(arr: np.ndarray, name: str) -> np.ndarray:
    lo, hi = float(arr.min()), float(arr.max())  # NaN and infinities show here too
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InvalidImageError(f"{name}: contains NaN or infinite values")
    _check_range(lo, hi, name)
    return np.clip(arr, 0.0, 1.0)


def _check_range(lo: float, hi: float, name: str) -> None:
    if lo >= -RANGE_TOLERANCE and hi <= 1.0 + RANGE_TOLERANCE:
        return
    if lo >= -RANGE_TOLERANCE and hi <= 255.0 + RANGE_TOLERANCE:
        hint = "it looks like [0, 255]: divide by 255"
    elif lo >= -1.0 - RANGE_TOLERANCE and hi <= 1.0 + RANGE_TOLERANCE:
        hint = "it looks like [-1, 1]: use (x + 1) / 2"
    else:
        hint = "rescale it to [0, 1]"
    raise InvalidImageError(
        f"{name}: float values span [{lo:.4g}, {hi:.4g}] but must lie in [0, 1]; {hint}"
    )


# --------------------------------------------------------------------------------------------
# Arrays and tensors
# --------------------------------------------------------------------------------------------


def _unit_float_from_numpy(arr: np.ndarray, name: str) -> tuple[np.ndarray, int]:
    """Any accepted numpy dtype -> float32 in [0, 1], plus the bit depth it implies."""
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0, 8
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0, 16
    if arr.dtype in (np.float16, np.float32, np.float64):
        return _check_float_array(arr.astype(np.float32, copy=False), f"`{name}`"), 16
    raise TypeError(
        f"`{name}` has dtype {arr.dtype}; allowed: uint8, uint16, or float16/32/64 in [0, 1]"
    )


def _numpy_to_pixels(arr: np.ndarray, name: str) -> _Pixels:
    """HW or HWC numpy image (C in 1..4) -> _Pixels in float32."""
    if arr.ndim not in (2, 3):
        raise InvalidImageError(
            f"`{name}` has shape {arr.shape}; expected HW or HWC (C = 1, 2, 3 or 4)"
        )
    if arr.ndim == 3 and arr.shape[2] not in (1, 2, 3, 4):
        hint = (
            "; it looks like CHW: use arr.transpose(1, 2, 0)" if arr.shape[0] in (1, 3, 4) else ""
        )
        raise InvalidImageError(
            f"`{name}` has shape {arr.shape}; numpy images are HWC with C = 1, 2, 3 or 4{hint}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidImageError(f"`{name}` has zero size (shape {arr.shape})")
    if arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype == np.uint8 or arr.dtype == np.uint16:
        # Integers stay integers until they are on the target device: less to copy.
        color, alpha = _split_channels(arr, name)
        return _Pixels(color, alpha, 8 if arr.dtype == np.uint8 else 16)
    unit, depth = _unit_float_from_numpy(arr, name)
    color, alpha = _split_channels(unit, name)
    return _Pixels(color, alpha, depth)


def check_unit_range(x: torch.Tensor, name: str) -> torch.Tensor:
    """Check that a float image is finite and in [0, 1]; return it clamped to [0, 1].

    This is the one value check of the library, made once where images enter it. Values up to
    :data:`RANGE_TOLERANCE` outside [0, 1] (resampling overshoot, VAE decoding) are accepted
    and clamped; anything further out is refused with a hint ([0, 255] and [-1, 1] images are
    recognised). It costs one pass over the tensor (``torch.aminmax``) and one transfer of two
    numbers to the host, whatever the device: NaN and infinities show in the minimum or
    maximum, so finiteness needs no pass of its own.

    Args:
        x (`torch.Tensor`): a floating-point tensor of any shape and device, not empty.
        name (`str`): the argument's name, used in error messages (e.g. `"image"`).

    Returns:
        `torch.Tensor`: ``x.clamp(0, 1)``, a new tensor (never `x` itself, so callers may
        work on it in place without touching the caller's image).

    Raises:
        InvalidImageError: NaN or infinite values, or values outside the tolerance (a
            ``ValueError`` naming `name` and the range found).
        TypeError: `x` is not a floating-point tensor.

    Example:
        ```py
        image = check_unit_range(image, "image")
        ```
    """
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        kind = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"`{name}` must be a floating-point tensor in [0, 1], got {kind}")
    if x.numel() == 0:
        raise InvalidImageError(f"`{name}` has zero size (shape {tuple(x.shape)})")
    lo, hi = torch.aminmax(x.detach())
    lo, hi = torch.stack([lo, hi]).float().tolist()  # the one host synchronisation
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InvalidImageError(f"`{name}` contains NaN or infinite values")
    _check_range(lo, hi, f"`{name}`")
    return x.clamp(0.0, 1.0)


def _tensor_to_unit_float(t: torch.Tensor, name: str) -> tuple[torch.Tensor, int]:
    """Any accepted torch dtype -> float32 in [0, 1] (same device), plus the bit depth."""
    if t.dtype == torch.uint8:
        return t.to(torch.float32) / 255.0, 8
    if t.dtype == torch.uint16:  # bare-bones dtype off the CPU: convert there
        return (t.cpu().to(torch.float32) / 65535.0).to(t.device), 16
    if t.dtype.is_floating_point:
        return check_unit_range(t.to(torch.float32), name), 16
    raise TypeError(
        f"`{name}` has dtype {t.dtype}; allowed: uint8, uint16, or a float dtype in [0, 1]"
    )


def _tensor_to_nchw(t: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """HW / CHW / NCHW tensor (C in 1..4) -> (N,3,H,W) float32, (N,1,H,W) alpha or None, depth."""
    if t.ndim == 2:
        t = t[None, None]
    elif t.ndim == 3:
        t = t[None]
    elif t.ndim != 4:
        raise InvalidImageError(
            f"`{name}` has shape {tuple(t.shape)}; expected HW, CHW or NCHW (C = 1, 2, 3 or 4)"
        )
    channels = t.shape[1]
    if channels not in (1, 2, 3, 4):
        hint = "; it looks like HWC: use t.permute(2, 0, 1)" if t.shape[-1] in (1, 3, 4) else ""
        raise InvalidImageError(
            f"`{name}` has shape {tuple(t.shape)}; tensors are CHW/NCHW with C = 1, 2, 3 or 4{hint}"
        )
    if t.numel() == 0:
        raise InvalidImageError(f"`{name}` has zero size (shape {tuple(t.shape)})")
    t, depth = _tensor_to_unit_float(t.detach(), name)
    alpha = None
    if channels in (2, 4):
        alpha = t[:, -1:].contiguous()
        t = t[:, :-1]
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    return t.contiguous(), alpha, depth


def _unit_tensor(arr: np.ndarray, device: torch.device | str | None, channels: int) -> torch.Tensor:
    """HxWxC uint8 / uint16 / float32 array -> (1, channels, H, W) float32 in [0, 1].

    Integers travel to the device as integers (less to copy), and the layout change, the type
    conversion and the broadcast of grayscale to RGB happen in one strided copy.
    """
    if not arr.flags.writeable:  # np.asarray(PIL image) is read-only; torch warns about it
        arr = arr.copy()
    src = torch.from_numpy(np.ascontiguousarray(arr))
    # torch.uint16 has only bare-bones kernels off the CPU: 16-bit data is converted here first.
    if arr.dtype != np.uint16:
        src = src.to(device)
    out = torch.empty((1, channels, *arr.shape[:2]), dtype=torch.float32, device=src.device)
    out[0].copy_(src.permute(2, 0, 1).expand(channels, -1, -1))
    if arr.dtype == np.uint8:
        out.div_(255.0)
    elif arr.dtype == np.uint16:
        out = out.div_(65535.0).to(device)
    return out


def _pixels_to_loaded(
    pixels: _Pixels, source: Path | None, device: torch.device | str | None
) -> LoadedImage:
    alpha = None
    if pixels.alpha is not None:
        alpha = _unit_tensor(pixels.alpha[..., None], device, 1)
    return LoadedImage(
        tensor=_unit_tensor(pixels.color, device, 3),
        alpha=alpha,
        bit_depth=pixels.bit_depth,
        source=source,
        format=pixels.format,
        icc_profile=pixels.icc_profile,
        grayscale=pixels.color.shape[2] == 1,
        exif=pixels.exif,
    )


def load_image(
    src: ImageInput | LoadedImage,
    *,
    device: torch.device | str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_bytes: int | None = DEFAULT_MAX_FILE_BYTES,
) -> LoadedImage:
    """Read one image into the library's data contract.

    Files are fully decoded here, so truncated or corrupt data fails now with a clear message
    rather than deep inside a pipeline. EXIF orientation is applied (the result is upright).
    16-bit PNG/TIFF keep all 16 bits (RGB ones are decoded with OpenCV, because Pillow reduces
    them to 8 bits). Grayscale is replicated to RGB; palette images with transparency and
    RGBA/LA images keep their alpha in :attr:`LoadedImage.alpha`; CMYK becomes RGB; Pillow's
    32-bit "I" mode is read as 16-bit values (clipped to [0, 65535]) and "F" as floats in [0, 1].

    Args:
        src (path, `bytes`, binary file, `PIL.Image.Image`, `np.ndarray` or `torch.Tensor`):
            The image. Arrays are HW or HWC (C = 1, 2, 3 or 4; channel 2 or 4 is alpha) with dtype
            uint8, uint16 or float in [0, 1]; tensors are HW, CHW or 1CHW with the same rules.
            A :class:`LoadedImage` is returned unchanged (moved to `device` if given).
        device (`torch.device` or `str`, *optional*):
            Where to put the tensors; CPU by default (a tensor input keeps its device).
        max_pixels (`int` or `None`, defaults to `DEFAULT_MAX_PIXELS`):
            Refuse files or PIL images with more than this many pixels (decompression bombs);
            `None` disables the check. Pillow's own hard limit (twice
            ``PIL.Image.MAX_IMAGE_PIXELS``) still applies to files. The size is read from the
            file header and checked before any pixel is decoded, whichever decoder is used.
        max_bytes (`int` or `None`, defaults to `DEFAULT_MAX_FILE_BYTES`):
            Refuse files and file objects larger than this (checked before reading where the
            size is known; at most ``max_bytes + 1`` bytes are ever read); `None` disables it.
            Only regular files are read: a FIFO, device or socket is refused.

    Returns:
        :class:`LoadedImage`: `tensor` (1, 3, H, W) float32 in [0, 1], `alpha` (1, 1, H, W) or
        `None`, `bit_depth`, `source`, `format`, `icc_profile`, `grayscale` and `exif`.

    Raises:
        InvalidImageError: missing, empty, truncated, corrupt, zero-sized or too large files,
            files that are not images, broken links, FIFOs, devices and sockets, arrays or
            tensors with a wrong shape or value range.
        TypeError: an unsupported input type or array/tensor dtype.
    """
    if isinstance(src, LoadedImage):
        return src.to(device) if device is not None else src
    if max_bytes is not None and (isinstance(max_bytes, bool) or int(max_bytes) < 0):
        raise ValueError(f"`max_bytes` must be a number of bytes >= 0 or None, got {max_bytes!r}")
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        return _pixels_to_loaded(
            _decode_bytes(_read_file(path, max_bytes), str(path), max_pixels), path, device
        )
    if isinstance(src, (bytes, bytearray, memoryview)):
        pixels = _decode_bytes(bytes(src), "<bytes>", max_pixels)
        return _pixels_to_loaded(pixels, None, device)
    if hasattr(src, "read"):
        name = str(getattr(src, "name", "<file object>"))
        data = src.read() if max_bytes is None else src.read(max_bytes + 1)
        if not isinstance(data, bytes):
            raise TypeError(f"`src` file object {name} must be opened in binary mode ('rb')")
        if max_bytes is not None and len(data) > max_bytes:
            raise InvalidImageError(_too_large(name, len(data), max_bytes))
        return _pixels_to_loaded(_decode_bytes(data, name, max_pixels), None, device)
    if isinstance(src, Image.Image):
        return _pixels_to_loaded(_decode_pil(src, max_pixels), None, device)
    if isinstance(src, np.ndarray):
        return _pixels_to_loaded(_numpy_to_pixels(src, "src"), None, device)
    if isinstance(src, torch.Tensor):
        if src.ndim == 4 and src.shape[0] != 1:
            raise InvalidImageError(
                f"`src` holds a batch of {src.shape[0]} images; load_image takes one "
                "(use to_tensor for batches)"
            )
        tensor, alpha, depth = _tensor_to_nchw(src, "src")
        if device is not None:
            tensor = tensor.to(device)
            alpha = alpha.to(device) if alpha is not None else None
        gray = src.ndim == 2 or src.shape[-3] in (1, 2)
        return LoadedImage(tensor=tensor, alpha=alpha, bit_depth=depth, grayscale=gray)
    raise TypeError(
        f"`src` has type {type(src).__name__}; expected a path, bytes, a binary file, "
        "a PIL image, a numpy array or a torch tensor"
    )


_FILE_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _not_regular(mode: int) -> str:
    return next((kind for test, kind in _FILE_KINDS if test(mode)), "not a regular file")


def _read_file(path: Path, max_bytes: int | None) -> bytes:
    """Read a regular file of at most `max_bytes` bytes.

    The file is opened first and then examined through the open descriptor (no race with a
    swapped entry), non-blocking so that opening a FIFO cannot hang; a FIFO, device or socket
    named like an image is refused, and so is a file larger than the limit, before reading.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        if os.path.islink(path):
            target = os.readlink(path)
            raise InvalidImageError(
                f"{path}: is a broken symbolic link (its target {target} does not exist)"
            ) from None
        raise InvalidImageError(f"{path}: file does not exist") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InvalidImageError(f"{path}: is a symbolic link loop") from e
        try:
            st_mode: int | None = os.stat(path).st_mode
        except OSError:
            st_mode = None
        if st_mode is not None and stat.S_ISDIR(st_mode):  # opening a folder fails on Windows
            raise InvalidImageError(f"{path}: is a folder, not an image file") from e
        if st_mode is not None and not stat.S_ISREG(st_mode):  # e.g. a socket: ENXIO
            raise InvalidImageError(f"{path}: is {_not_regular(st_mode)}, not an image file") from e
        raise InvalidImageError(f"{path}: cannot open file ({e.strerror or e})") from e
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise InvalidImageError(f"{path}: is a folder, not an image file")
        if not stat.S_ISREG(info.st_mode):
            raise InvalidImageError(f"{path}: is {_not_regular(info.st_mode)}, not an image file")
        if max_bytes is not None and info.st_size > max_bytes:
            raise InvalidImageError(_too_large(path, info.st_size, max_bytes))
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        try:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        except OSError as e:
            raise InvalidImageError(f"{path}: cannot read file ({e.strerror or e})") from e
    if max_bytes is not None and len(data) > max_bytes:  # it grew while being read
        raise InvalidImageError(_too_large(path, len(data), max_bytes))
    return data


def _too_large(name: object, size: int, max_bytes: int) -> str:
    return (
        f"{name}: file is {size} bytes, more than the limit of {max_bytes}; pass a larger "
        "max_bytes to allow it"
    )


def _decode_pil(im: Image.Image, max_pixels: int | None) -> _Pixels:
    name = str(getattr(im, "filename", "") or "<PIL image>")
    _check_pixels(im.width, im.height, name, max_pixels)
    pixels = _upright_pixels(im, name)
    pixels.format = im.format
    return pixels


def _upright_pixels(im: Image.Image, name: str) -> _Pixels:
    """Fully decode ``im`` (so truncated data fails here, not later) and apply its EXIF
    orientation."""
    try:
        im.load()
    except Exception as e:
        raise InvalidImageError(
            f"{name}: image data is truncated or corrupt ({type(e).__name__}: {e})"
        ) from e
    orientation = _exif_orientation(im, name)
    exif = _exif_of(im, name)
    if orientation != 1:
        im = im.transpose(_ORIENTATION_TO_TRANSPOSE[orientation])
    pixels = _pil_to_pixels(im, name)
    pixels.exif = exif
    return pixels


def to_tensor(
    images: ImageInput | LoadedImage | Sequence[ImageInput | LoadedImage],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Convert one image or a list of same-sized images into one RGB batch.

    Alpha channels are dropped here (use :func:`load_image` to keep them).

    Args:
        images:
            A path, bytes, PIL image, numpy array (HW, HWC or NHWC; uint8, uint16 or float in
            [0, 1]), torch tensor (HW, CHW or NCHW; same dtypes), :class:`LoadedImage`, or a
            list/tuple of those. All images must have the same height and width.
        device (`torch.device` or `str`, *optional*):
            Target device. By default tensors keep their device and everything else is on CPU.

    Returns:
        `torch.Tensor`: shape (N, 3, H, W), float32, values in [0, 1].

    Raises:
        InvalidImageError: an unreadable file, a wrong shape or value range, or images of
            different sizes in one list.
        TypeError: an unsupported input type or dtype.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise InvalidImageError("`images` is an empty list; give at least one image")
        batches = [_to_batch(item, f"images[{i}]", device) for i, item in enumerate(images)]
        first = batches[0].shape[-2:]
        for i, b in enumerate(batches):
            if b.shape[-2:] != first:
                raise InvalidImageError(
                    f"`images[{i}]` is {b.shape[-1]}x{b.shape[-2]} but `images[0]` is "
                    f"{first[1]}x{first[0]}; a batch needs images of one size"
                )
        if len({b.device for b in batches}) > 1:
            batches = [b.to(batches[0].device) for b in batches]
        return torch.cat(batches, dim=0)
    return _to_batch(images, "images", device)


def _to_batch(item: Any, name: str, device: torch.device | str | None) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        tensor, _, _ = _tensor_to_nchw(item, name)
        return tensor.to(device) if device is not None else tensor
    if isinstance(item, np.ndarray) and item.ndim == 4:
        return torch.cat([_to_batch(a, f"{name}[{i}]", device) for i, a in enumerate(item)])
    if isinstance(item, np.ndarray):
        return _pixels_to_loaded(_numpy_to_pixels(item, name), None, device).tensor
    return load_image(item, device=device).tensor


# --------------------------------------------------------------------------------------------
# Tensors out
# --------------------------------------------------------------------------------------------


def _as_nchw_float(t: torch.Tensor, name: str) -> torch.Tensor:
    """CHW or NCHW float/uint tensor (any C) -> NCHW float32 on CPU, clamped to [0, 1]."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim == 2:
        t = t[None, None]
    elif t.ndim == 3:
        t = t[None]
    elif t.ndim != 4:
        raise InvalidImageError(f"`{name}` has shape {tuple(t.shape)}; expected CHW or NCHW")
    if t.shape[1] not in (1, 2, 3, 4):
        raise InvalidImageError(
            f"`{name}` has shape {tuple(t.shape)}; channels must be 1, 2, 3 or 4 (NCHW)"
        )
    out, _ = _tensor_to_unit_float(t.detach().cpu(), name)
    return out


def to_pil(images: torch.Tensor, alpha: torch.Tensor | None = None) -> list[Image.Image]:
    """Convert a batch of images to 8-bit PIL images.

    Args:
        images (`torch.Tensor`):
            (N, C, H, W) or (C, H, W), C = 1 (grayscale, "L"), 3 ("RGB") or 4 ("RGBA"), float in
            [0, 1] (or uint8/uint16).
        alpha (`torch.Tensor`, *optional*):
            (N, 1, H, W) alpha to attach (RGB becomes "RGBA", grayscale "LA").

    Returns:
        `list[PIL.Image.Image]`: one image per batch item.
    """
    x = _as_nchw_float(images, "images")
    if alpha is not None:
        a = _as_nchw_float(alpha, "alpha")
        if a.shape[1] != 1 or a.shape[-2:] != x.shape[-2:] or a.shape[0] not in (1, x.shape[0]):
            raise InvalidImageError(
                f"`alpha` has shape {tuple(a.shape)}; expected (N, 1, {x.shape[-2]}, {x.shape[-1]})"
            )
        x = torch.cat([x, a.expand(x.shape[0], -1, -1, -1)], dim=1)
    arr = _quantize(x, 8)
    modes = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
    return [Image.fromarray(a if a.shape[2] > 1 else a[..., 0], modes[a.shape[2]]) for a in arr]


def to_numpy(images: torch.Tensor) -> np.ndarray:
    """Convert a (N, C, H, W) or (C, H, W) tensor to a float32 NHWC numpy array on the CPU.

    Args:
        images (`torch.Tensor`): the images, float in [0, 1] (or uint8/uint16).

    Returns:
        `np.ndarray`: shape (N, H, W, C), float32, values in [0, 1].
    """
    return _as_nchw_float(images, "images").permute(0, 2, 3, 1).contiguous().numpy()


def _quantize(x: torch.Tensor, bit_depth: int) -> np.ndarray:
    """NCHW float in [0, 1] -> NHWC uint8/uint16 numpy, round to nearest."""
    peak = 255.0 if bit_depth == 8 else 65535.0
    q = (x.to(torch.float32) * peak).round_().clamp_(0.0, peak)
    # Narrow before the NCHW -> NHWC copy: it moves 1 or 2 bytes per value instead of 4.
    q = q.to(torch.uint8 if bit_depth == 8 else torch.uint16)
    return q.permute(0, 2, 3, 1).contiguous().numpy()


def resize_alpha(alpha: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor | None:
    """Resize an alpha channel to the output size, the way images are resized
    (`raim_diffusion.ops.resize`).

    Use it when a stage changed the image size (e.g. a x4 prior): the input's alpha is brought
    to the output size and clamped back to [0, 1] (bicubic overshoots at hard edges).

    Args:
        alpha (`torch.Tensor` or `None`): (N, 1, h, w) or (1, h, w) alpha in [0, 1]; `None` is
            passed through.
        size (`tuple[int, int]`): target (height, width).

    Returns:
        `torch.Tensor` or `None`: (N, 1, height, width) float alpha, or `None`.
    """
    if alpha is None:
        return None
    if len(size) != 2 or min(int(s) for s in size) <= 0:
        raise ValueError(f"`size` must be (height, width) with positive sides, got {size!r}")
    size = (int(size[0]), int(size[1]))
    a = alpha[None] if alpha.ndim == 3 else alpha
    if a.ndim != 4 or a.shape[1] != 1:
        raise ValueError(f"`alpha` must have shape (N, 1, h, w), got {tuple(alpha.shape)}")
    if tuple(a.shape[-2:]) == size:
        return a
    dtype = a.dtype if a.dtype.is_floating_point else torch.float32
    return resize(a.to(torch.float32), size).to(dtype)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _image_format_for(path: Path) -> str:
    fmt = _SUFFIX_TO_FORMAT.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"`path` {path} has suffix {path.suffix!r}; allowed: {', '.join(IMAGE_SUFFIXES)}"
        )
    return fmt


def _png_with_chunk(png: bytes, kind: bytes, body: bytes) -> bytes:
    """Insert a chunk right after IHDR (OpenCV cannot embed profiles or EXIF itself)."""
    chunk = struct.pack(">I", len(body)) + kind + body
    chunk += struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr_end = 8 + 4 + 4 + 13 + 4  # signature, length, type, IHDR data, CRC
    return png[:ihdr_end] + chunk + png[ihdr_end:]


def _tiff_with_icc(tiff: bytes, icc_profile: bytes) -> bytes | None:
    """A classic TIFF with an ICC profile tag added to its first directory (OpenCV cannot).

    The profile and a copy of the directory, with the new entry in tag order, are appended
    and the header pointed at the copy; every existing offset stays valid. `None` if the file
    is not a classic TIFF this can patch.
    """
    directory = _tiff_directory(tiff)
    if directory is None or directory.big:
        return None
    order = directory.order
    (ifd,) = struct.unpack_from(order + "I", tiff, 4)
    count = len(directory.entries)
    entries = [tiff[ifd + 2 + 12 * i : ifd + 14 + 12 * i] for i in range(count)]
    (next_ifd,) = struct.unpack_from(order + "I", tiff, ifd + 2 + 12 * count)
    entries = [e for e in entries if struct.unpack_from(order + "H", e)[0] != _TIFF_ICC_TAG]
    out = bytearray(tiff)
    out += b"\0" * (len(out) % 2)  # TIFF values and directories start on word boundaries
    icc_at = len(out)
    out += icc_profile + b"\0" * (len(icc_profile) % 2)
    entries.append(struct.pack(order + "HHII", _TIFF_ICC_TAG, 7, len(icc_profile), icc_at))
    entries.sort(key=lambda e: struct.unpack_from(order + "H", e)[0])
    new_ifd = len(out)
    out += struct.pack(order + "H", len(entries)) + b"".join(entries)
    out += struct.pack(order + "I", next_ifd)
    struct.pack_into(order + "I", out, 4, new_ifd)
    return bytes(out)


def _encode_16bit(
    arr: np.ndarray, fmt: str, icc_profile: bytes | None, exif: bytes | None, path: Path
) -> bytes:
    cv2 = _import_cv2()
    channels = arr.shape[2]
    if channels == 1:
        arr = arr[..., 0]
    elif channels == 2:  # OpenCV writes 1, 3 or 4 channels: gray + alpha becomes BGRA
        arr = np.concatenate([arr[..., :1]] * 3 + [arr[..., 1:]], axis=2)
    elif channels == 3:
        arr = arr[..., ::-1]
    else:
        arr = arr[..., [2, 1, 0, 3]]
    arr = np.ascontiguousarray(arr)
    if fmt == "PNG":
        ok, buf = cv2.imencode(".png", arr, [cv2.IMWRITE_PNG_COMPRESSION, _PNG_COMPRESS_LEVEL])
    else:
        ok, buf = cv2.imencode(".tiff", arr)
    if not ok:
        raise OSError(f"{path}: OpenCV failed to encode a 16-bit {fmt}")
    data = buf.tobytes()
    if fmt == "PNG":
        if icc_profile:
            data = _png_with_chunk(data, b"iCCP", b"icc\x00\x00" + zlib.compress(icc_profile))
        if exif:  # PNG stores EXIF without the "Exif\0\0" prefix
            data = _png_with_chunk(data, b"eXIf", exif[len(_EXIF_PREFIX) :])
        return data
    if icc_profile:
        patched = _tiff_with_icc(data, icc_profile)
        if patched is None:
            logger.warning(f"{path}: the ICC profile is not embedded in this 16-bit TIFF")
        data = patched or data
    if exif:
        logger.warning(f"{path}: EXIF data is not embedded in 16-bit TIFF output")
    return data


def _luma(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB -> (N, 1, H, W) luma with PIL's convert("L") weights (ITU-R BT.601)."""
    weights = torch.tensor(_LUMA_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True).clamp_(0.0, 1.0)


def _exif_for_format(exif: bytes, fmt: str, path: Path) -> bytes | None:
    """The EXIF block to write into a `fmt` file, orientation 1; `None` to write none."""
    try:
        exif = _upright_exif(exif)
        if fmt == "TIFF":  # its tags go into the TIFF's own directory: keep the descriptive ones
            parsed = Image.Exif()
            parsed.load(exif)
            if any(tag in parsed for tag in _EXIF_IFD_TAGS):
                # Pillow's compressed (libtiff) TIFF writer cannot write sub-directories.
                logger.warning(
                    f"{path}: the EXIF and GPS sub-directories (e.g. capture date, location) "
                    "are not written to TIFF; only the main EXIF tags are"
                )
            return _descriptive_exif(parsed, sub_ifds=False)
        if fmt == "JPEG" and len(exif) > _JPEG_MAX_EXIF_BYTES:
            logger.warning(f"{path}: EXIF data of {len(exif)} bytes is too large for JPEG; dropped")
            return None
    except Exception as e:
        logger.warning(f"{path}: not writing unreadable EXIF data ({e})")
        return None
    return exif


def save_image(
    image: torch.Tensor | LoadedImage | Image.Image | np.ndarray,
    path: str | os.PathLike,
    *,
    bit_depth: int | None = None,
    alpha: torch.Tensor | np.ndarray | None = None,
    quality: int = 95,
    icc_profile: bytes | None = None,
    like: LoadedImage | None = None,
) -> Path:
    """Write one image atomically; the format comes from the suffix of `path`.

    PNG and TIFF are written with 8 or 16 bits per channel. JPEG, WebP and BMP are 8-bit
    only: asking for 16 bits there logs a warning and writes 8 bits. Alpha is written where the
    format supports it (PNG, WebP, TIFF, BMP); JPEG has no alpha, so it is dropped with a logged
    warning. The file appears complete under `path` or not at all (see :func:`atomic_write`).

    ``save_image(x, path, like=loaded)`` writes a result the way its input was stored: with
    `loaded`'s bit depth, alpha (resized with :func:`resize_alpha` if `x` has another size),
    ICC profile, grayscale (three channels become one, as luma with ITU-R BT.601 weights like
    PIL's ``convert("L")``) and EXIF block (orientation 1, as pixels are upright). EXIF is
    written into JPEG, PNG and WebP; into 8-bit TIFF only its main tags (make, model, date,
    ...; not the Exif and GPS sub-directories, with a logged warning); not into BMP or 16-bit
    TIFF (logged). The keyword arguments `bit_depth`, `alpha` and `icc_profile`
    override `like`.

    Args:
        image (`torch.Tensor`, :class:`LoadedImage`, `PIL.Image.Image` or `np.ndarray`):
            One image. Tensors are (1, C, H, W) or (C, H, W) with C = 1 (written as grayscale),
            3 (RGB) or 4 (RGBA), float in [0, 1] (slight overshoot is clamped). A
            :class:`LoadedImage` brings its own metadata along, as if passed as `like`; arrays
            follow :func:`load_image`'s rules.
        path (`str` or `os.PathLike`):
            Output file; suffix .png, .jpg/.jpeg, .webp, .tif/.tiff or .bmp. Parent folders are
            created.
        bit_depth (`int`, *optional*):
            8 or 16. By default `like`'s depth, else the input's own depth for a
            :class:`LoadedImage`, a uint16 array or a 16-bit PIL image, and 8 otherwise.
        alpha (`torch.Tensor` or `np.ndarray`, *optional*):
            (1, 1, H, W), (1, H, W) or (H, W) alpha in [0, 1] (or uint8/uint16) at the image's
            size; use :func:`resize_alpha` first if the image was rescaled. By default the
            image's own alpha channel, else `like`'s alpha.
        quality (`int`, defaults to 95):
            JPEG/WebP quality, 1-100. At 90 and above JPEG keeps full chroma resolution (4:4:4);
            WebP at 100 is lossless.
        icc_profile (`bytes`, *optional*):
            ICC profile to embed (defaults to `like`'s, else the image's own). Not embedded in
            BMP.
        like (:class:`LoadedImage`, *optional*):
            The loaded input whose storage to reproduce (see above).

    Returns:
        `pathlib.Path`: the written path.

    Example:
        ```py
        loaded = load_image("in/photo.jpg")
        result = pipe(loaded.tensor, output_type="pt").images
        save_image(result, "out/photo.jpg", like=loaded)
        ```
    """
    path = Path(path)
    fmt = _image_format_for(path)
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"`quality` must be in 1..100, got {quality}")
    if bit_depth not in (None, 8, 16):
        raise ValueError(f"`bit_depth` must be 8 or 16, got {bit_depth!r}")
    if like is not None and not isinstance(like, LoadedImage):
        raise TypeError(
            f"`like` must be a LoadedImage (from load_image), got {type(like).__name__}"
        )

    x, own_alpha, own_depth, own_icc = _image_for_saving(image)
    meta = like if like is not None else image if isinstance(image, LoadedImage) else None
    if alpha is not None and own_alpha is not None:
        raise ValueError("`alpha` was given but `image` already has an alpha channel")
    if alpha is not None:
        a = _alpha_for_saving(alpha, x.shape[-2:])
    elif own_alpha is not None:
        a = own_alpha
    elif like is not None and like.alpha is not None:
        a = resize_alpha(_as_nchw_float(like.alpha, "like.alpha"), tuple(x.shape[-2:]))
    else:
        a = None
    depth = bit_depth if bit_depth is not None else meta.bit_depth if meta else own_depth
    icc = icc_profile if icc_profile is not None else meta.icc_profile if meta else own_icc
    if meta is not None and meta.grayscale and x.shape[1] == 3:
        x = _luma(x)
    exif = _exif_for_format(meta.exif, fmt, path) if meta is not None and meta.exif else None

    if depth == 16 and fmt not in _SIXTEEN_BIT_FORMATS:
        logger.warning(f"{path}: {fmt} holds 8 bits per channel only; writing 8-bit")
        depth = 8
    if a is not None and fmt not in _ALPHA_FORMATS:
        logger.warning(f"{path}: {fmt} has no alpha channel; the alpha is dropped")
        a = None
    if a is not None:
        x = torch.cat([x, a], dim=1)
    arr = _quantize(x, depth)[0]

    if depth == 16:
        data = _encode_16bit(arr, fmt, icc, exif, path)
        with atomic_write(path, "wb") as f:
            f.write(data)
        return path

    modes = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
    pil = Image.fromarray(arr if arr.shape[2] > 1 else arr[..., 0], modes[arr.shape[2]])
    params: dict[str, Any] = {}
    if icc and fmt != "BMP":
        params["icc_profile"] = icc
    if exif and fmt != "BMP":
        params["exif"] = exif
    if fmt == "JPEG":
        params.update(quality=int(quality), subsampling=0 if quality >= 90 else 2)
    elif fmt == "WEBP":
        params.update(quality=int(quality), lossless=quality == 100, method=4)
        if pil.mode in ("L", "LA"):
            pil = pil.convert("RGBA" if pil.mode == "LA" else "RGB")
    elif fmt == "PNG":
        params.update(compress_level=_PNG_COMPRESS_LEVEL)
    elif fmt == "TIFF":
        params.update(compression="tiff_adobe_deflate")
    elif fmt == "BMP" and pil.mode == "LA":
        pil = pil.convert("RGBA")
    with atomic_write(path, "wb") as f:
        pil.save(f, format=fmt, **params)
    return path


def _image_for_saving(
    image: Any,
) -> tuple[torch.Tensor, torch.Tensor | None, int, bytes | None]:
    """-> (1, C, H, W) float colour (C = 1 or 3), (1, 1, H, W) alpha or None, depth, ICC."""
    if isinstance(image, LoadedImage):
        return (
            _as_nchw_float(image.tensor, "image"),
            (_as_nchw_float(image.alpha, "image.alpha") if image.alpha is not None else None),
            image.bit_depth,
            image.icc_profile,
        )
    if isinstance(image, torch.Tensor):
        x = _as_nchw_float(image, "image")
        own_depth = 8
    elif isinstance(image, (np.ndarray, Image.Image)):
        pixels = (
            _numpy_to_pixels(image, "image")
            if isinstance(image, np.ndarray)
            else (_decode_pil(image, None))
        )
        loaded = _pixels_to_loaded(pixels, None, None)
        gray = pixels.color.shape[2] == 1
        x = loaded.tensor[:, :1] if gray else loaded.tensor
        if loaded.alpha is not None:
            x = torch.cat([x, loaded.alpha], dim=1)
        own_depth = (
            16
            if pixels.bit_depth == 16
            and (isinstance(image, Image.Image) or image.dtype == np.uint16)
            else 8
        )
        icc = pixels.icc_profile
        return _split_saved_alpha(x) + (own_depth, icc)
    else:
        raise TypeError(
            f"`image` has type {type(image).__name__}; expected a tensor, LoadedImage, PIL image "
            "or numpy array"
        )
    if x.shape[0] != 1:
        raise InvalidImageError(
            f"`image` holds {x.shape[0]} images; save_image writes one (loop over the batch)"
        )
    return _split_saved_alpha(x) + (own_depth, None)


def _split_saved_alpha(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    if x.shape[1] in (2, 4):
        return x[:, :-1], x[:, -1:]
    return x, None


def _alpha_for_saving(alpha: torch.Tensor | np.ndarray, size: torch.Size) -> torch.Tensor:
    if isinstance(alpha, np.ndarray):
        if alpha.ndim == 3 and alpha.shape[2] == 1:
            alpha = alpha[..., 0]
        if alpha.ndim != 2:
            raise InvalidImageError(f"`alpha` array has shape {alpha.shape}; expected HW")
        unit, _ = _unit_float_from_numpy(alpha, "alpha")
        a = torch.from_numpy(np.ascontiguousarray(unit))[None, None]
    elif isinstance(alpha, torch.Tensor):
        a = _as_nchw_float(alpha, "alpha")
    else:
        raise TypeError(f"`alpha` must be a tensor or numpy array, got {type(alpha).__name__}")
    if a.shape[0] != 1 or a.shape[1] != 1 or a.shape[-2:] != size:
        raise InvalidImageError(
            f"`alpha` has shape {tuple(a.shape)} but the image is {size[1]}x{size[0]}; expected "
            f"(1, 1, {size[0]}, {size[1]}) (use resize_alpha after rescaling)"
        )
    return a
