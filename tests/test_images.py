"""Tests of the image edge: every input kind in, every output format out, every bad input."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from raim_diffusion import images
from raim_diffusion.errors import InvalidImageError
from raim_diffusion.images import (
    LoadedImage,
    check_unit_range,
    load_image,
    resize_alpha,
    save_image,
    to_numpy,
    to_pil,
    to_tensor,
)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A real photo crop (HxWx3 uint8): textures and edges, not just noise."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[100:148:, 180:244])  # 48x64


@pytest.fixture(scope="module")
def photo16() -> np.ndarray:
    """A 16-bit RGB image whose low byte matters (it cannot survive an 8-bit detour)."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 65536, size=(20, 24, 3), dtype=np.uint16)


@pytest.fixture
def images_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=images.logger.name)
    return caplog


def _hwc(loaded: LoadedImage) -> np.ndarray:
    return loaded.tensor[0].permute(1, 2, 0).numpy()


def _as8(x: np.ndarray) -> np.ndarray:
    return np.round(x * 255).astype(np.uint8)


def _as16(x: np.ndarray) -> np.ndarray:
    return np.round(x * 65535).astype(np.uint16)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


# --------------------------------------------------------------------------------------------
# Files in, files out
# --------------------------------------------------------------------------------------------


def test_png_8bit_rgb_round_trip_is_exact(tmp_path: Path, photo: np.ndarray) -> None:
    src = tmp_path / "a.png"
    Image.fromarray(photo).save(src)
    loaded = load_image(src)
    assert loaded.tensor.shape == (1, 3, 48, 64) and loaded.tensor.dtype == torch.float32
    assert loaded.alpha is None and loaded.bit_depth == 8
    assert loaded.source == src and loaded.format == "PNG"
    assert np.array_equal(_as8(_hwc(loaded)), photo)
    out = save_image(loaded, tmp_path / "sub" / "b.png")
    assert out == tmp_path / "sub" / "b.png"
    back = Image.open(out)
    assert back.mode == "RGB" and np.array_equal(np.asarray(back), photo)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_rgb_round_trip_is_exact(tmp_path: Path, photo16: np.ndarray, suffix: str) -> None:
    src = tmp_path / f"a{suffix}"
    cv2.imwrite(str(src), photo16[..., ::-1])
    loaded = load_image(src)
    assert loaded.bit_depth == 16 and loaded.alpha is None
    # every one of the 16 bits survives: exact to 1/65535
    assert np.array_equal(_as16(_hwc(loaded)), photo16)
    out = save_image(loaded, tmp_path / f"b{suffix}")
    back = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and np.array_equal(back[..., ::-1], photo16)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_rgba_keeps_alpha(tmp_path: Path, photo16: np.ndarray, suffix: str) -> None:
    rgba = np.dstack([photo16, photo16[..., :1] ^ 0x5A5A])
    src = tmp_path / f"a{suffix}"
    cv2.imwrite(str(src), rgba[..., [2, 1, 0, 3]])
    loaded = load_image(src)
    assert loaded.bit_depth == 16
    assert np.array_equal(_as16(loaded.alpha[0, 0].numpy()), rgba[..., 3])
    out = save_image(loaded, tmp_path / f"b{suffix}")
    again = load_image(out)
    assert torch.equal(again.tensor, loaded.tensor) and torch.equal(again.alpha, loaded.alpha)


def test_16bit_grayscale(tmp_path: Path, photo16: np.ndarray) -> None:
    gray = photo16[..., 0]
    for mode in ("I;16", "I;16B"):
        im = Image.frombytes(
            mode, gray.shape[::-1], gray.astype(">u2" if mode[-1] == "B" else "<u2").tobytes()
        )
        loaded = load_image(im)
        assert loaded.bit_depth == 16
        rgb = _as16(_hwc(loaded))
        assert all(np.array_equal(rgb[..., c], gray) for c in range(3))
    src = tmp_path / "g.png"
    Image.fromarray(gray).save(src)
    assert Image.open(src).mode.startswith("I;16")
    loaded = load_image(src)
    assert loaded.bit_depth == 16 and np.array_equal(_as16(_hwc(loaded))[..., 1], gray)
    # a one-channel tensor is written as a 16-bit grayscale file
    out = save_image(loaded.tensor[:, :1], tmp_path / "g2.png", bit_depth=16)
    back = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    assert back.shape == gray.shape and np.array_equal(back, gray)


def test_8bit_grayscale_and_bilevel(tmp_path: Path, photo: np.ndarray) -> None:
    gray = photo[..., 1]
    Image.fromarray(gray).save(tmp_path / "g.png")
    loaded = load_image(tmp_path / "g.png")
    assert loaded.bit_depth == 8 and loaded.grayscale
    assert not load_image(photo).grayscale and load_image(torch.rand(1, 5, 5)).grayscale
    assert np.array_equal(_as8(_hwc(loaded)), np.repeat(gray[..., None], 3, axis=2))
    Image.fromarray(gray > 128).save(tmp_path / "b.png")
    assert np.array_equal(_as8(_hwc(load_image(tmp_path / "b.png")))[..., 0], (gray > 128) * 255)


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    indices = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    pal = Image.fromarray(indices, "P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    pal.save(tmp_path / "opaque.png")
    pal.save(tmp_path / "clear.png", transparency=1)
    opaque = load_image(tmp_path / "opaque.png")
    assert opaque.alpha is None
    assert np.array_equal(_as8(_hwc(opaque))[0, 2], [0, 0, 255])
    clear = load_image(tmp_path / "clear.png")
    assert np.array_equal(_as8(clear.alpha[0, 0].numpy()), (indices != 1) * 255)
    assert np.array_equal(_as8(_hwc(clear))[1, 0], [0, 0, 255])


@pytest.mark.parametrize(
    ("suffix", "kw"), [(".png", {}), (".webp", {"quality": 100}), (".tif", {})]
)
def test_rgba_alpha_preserved(tmp_path: Path, photo: np.ndarray, suffix: str, kw: dict) -> None:
    alpha = np.tile(np.linspace(0, 255, photo.shape[1]).astype(np.uint8), (photo.shape[0], 1))
    Image.fromarray(np.dstack([photo, alpha]), "RGBA").save(tmp_path / "a.png")
    loaded = load_image(tmp_path / "a.png")
    assert loaded.alpha.shape == (1, 1, 48, 64)
    assert np.array_equal(_as8(loaded.alpha[0, 0].numpy()), alpha)
    out = save_image(loaded, tmp_path / f"b{suffix}", **kw)
    back = Image.open(out)
    assert back.mode == "RGBA"
    back_arr = np.asarray(back)
    assert np.array_equal(back_arr[..., 3], alpha)
    # WebP lossless may change colour under fully transparent pixels; compare visible ones
    visible = alpha > 0
    assert np.array_equal(back_arr[..., :3][visible], photo[visible])


def test_la_alpha_preserved(tmp_path: Path, photo: np.ndarray) -> None:
    gray, alpha = photo[..., 0], photo[..., 2]
    Image.fromarray(np.dstack([gray, alpha]), "LA").save(tmp_path / "la.png")
    loaded = load_image(tmp_path / "la.png")
    assert np.array_equal(_as8(loaded.alpha[0, 0].numpy()), alpha)
    assert np.array_equal(_as8(_hwc(loaded))[..., 2], gray)
    # a grayscale tensor + alpha is written back as LA
    out = save_image(loaded.tensor[:, :1], tmp_path / "la2.png", alpha=loaded.alpha)
    back = Image.open(out)
    assert back.mode == "LA" and np.array_equal(np.asarray(back), np.dstack([gray, alpha]))


def test_tensor_with_alpha_to_16bit_png_keeps_alpha(tmp_path: Path, photo16: np.ndarray) -> None:
    alpha = torch.rand(1, 1, 20, 24, generator=torch.Generator().manual_seed(0))
    x = torch.from_numpy(photo16.astype(np.float32) / 65535).permute(2, 0, 1)[None]
    out = save_image(x, tmp_path / "x.png", bit_depth=16, alpha=alpha)
    back = load_image(out)
    assert back.bit_depth == 16
    assert (back.alpha - alpha).abs().max() <= 0.5 / 65535 + 1e-7
    assert np.array_equal(_as16(_hwc(back)), photo16)


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_becomes_rgb(tmp_path: Path, photo: np.ndarray, fmt: str) -> None:
    src = tmp_path / f"c.{fmt.lower()}"
    Image.fromarray(photo).convert("CMYK").save(src, format=fmt, quality=100)
    assert Image.open(src).mode == "CMYK"
    loaded = load_image(src)
    assert loaded.tensor.shape == (1, 3, 48, 64) and loaded.bit_depth == 8
    got = _as8(_hwc(loaded))
    if fmt == "TIFF":
        assert np.array_equal(got, photo)
    else:
        assert _psnr(got, photo) > 30


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied(tmp_path: Path, photo: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    src = tmp_path / "rot.jpg"
    Image.fromarray(photo).save(src, exif=exif.tobytes(), quality=95)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(src)))
    loaded = load_image(src)
    assert np.array_equal(_as8(_hwc(loaded)), upright)
    assert torch.equal(load_image(Image.open(src)).tensor, loaded.tensor)  # an opened PIL image
    if orientation in (5, 6, 7, 8):
        assert loaded.tensor.shape[-2:] == (64, 48)


def _upright16(arr: np.ndarray, orientation: int) -> np.ndarray:
    """What PIL's exif_transpose makes of a 16-bit image with this orientation, per channel."""
    channels = []
    for c in range(arr.shape[2]):
        im = Image.fromarray(np.ascontiguousarray(arr[..., c]))
        im.getexif()[0x0112] = orientation
        channels.append(np.asarray(ImageOps.exif_transpose(im)))
    return np.stack(channels, axis=2)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_16bit(tmp_path: Path, photo16: np.ndarray, orientation: int) -> None:
    # 16-bit RGB goes through OpenCV, which ignores EXIF in PNG and mishandles the TIFF tag:
    # the orientation must still be applied exactly once.
    expected = _upright16(photo16, orientation)
    ok, buf = cv2.imencode(".png", photo16[..., ::-1])
    data = buf.tobytes()
    exif = Image.Exif()
    exif[0x0112] = orientation
    chunk = _png_chunk(b"eXIf", exif.tobytes()[6:])  # PNG stores EXIF without "Exif\0\0"
    iend = data.rindex(b"IEND") - 4
    (tmp_path / "r.png").write_bytes(data[:iend] + chunk + data[iend:])
    assert np.array_equal(_as16(_hwc(load_image(tmp_path / "r.png"))), expected)
    tifffile = pytest.importorskip("tifffile")
    for byteorder, bigtiff in (("<", False), (">", False), ("<", True)):
        tifffile.imwrite(
            tmp_path / "r.tif",
            photo16,
            photometric="rgb",
            byteorder=byteorder,
            bigtiff=bigtiff,
            extratags=[(274, "H", 1, orientation)],
        )
        assert np.array_equal(_as16(_hwc(load_image(tmp_path / "r.tif"))), expected)


def test_int32_and_float_modes(tmp_path: Path) -> None:
    values = np.array([[0, 1000], [40000, 65535]], dtype=np.int32)
    Image.fromarray(values, "I").save(tmp_path / "i.tif")
    loaded = load_image(tmp_path / "i.tif")
    assert loaded.bit_depth == 16 and np.array_equal(_as16(_hwc(loaded))[..., 0], values)
    floats = np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32)
    Image.fromarray(floats, "F").save(tmp_path / "f.tif")
    assert np.allclose(_hwc(load_image(tmp_path / "f.tif"))[..., 0], floats)
    rgb = np.random.default_rng(0).random((5, 7, 3), dtype=np.float32)
    cv2.imwrite(str(tmp_path / "rgbf.tif"), rgb[..., ::-1])
    loaded = load_image(tmp_path / "rgbf.tif")
    assert loaded.bit_depth == 16 and np.array_equal(_hwc(loaded), rgb)
    Image.fromarray(floats * 300, "F").save(tmp_path / "big.tif")
    with pytest.raises(InvalidImageError, match=r"big\.tif.*\[0, 1\]"):
        load_image(tmp_path / "big.tif")


def test_icc_profile_carried_through(
    tmp_path: Path, photo: np.ndarray, photo16: np.ndarray
) -> None:
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(photo).save(tmp_path / "p.png", icc_profile=icc)
    loaded = load_image(tmp_path / "p.png")
    assert loaded.icc_profile == icc
    for name in ("o.png", "o.jpg", "o.webp", "o.tif"):
        assert Image.open(save_image(loaded, tmp_path / name)).info.get("icc_profile") == icc
    out16 = save_image(
        torch.from_numpy(photo16 / 65535).permute(2, 0, 1),
        tmp_path / "16.png",
        bit_depth=16,
        icc_profile=icc,
    )
    again = load_image(out16)
    assert again.icc_profile == icc and np.array_equal(_as16(_hwc(again)), photo16)


def test_jpeg_and_webp_write(tmp_path: Path, photo: np.ndarray, images_log) -> None:
    x = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255
    for name in ("a.jpg", "a.jpeg", "a.webp"):
        out = save_image(x, tmp_path / name, quality=95)
        back = Image.open(out)
        assert back.mode == "RGB" and back.size == (64, 48)
        assert _psnr(np.asarray(back), photo) > 33
    small = save_image(x, tmp_path / "q10.jpg", quality=10)
    assert small.stat().st_size < (tmp_path / "a.jpg").stat().st_size
    # 16 bits asked of an 8-bit-only format: an 8-bit file and a warning, not an error
    save_image(x, tmp_path / "b.jpg", bit_depth=16)
    assert "8 bits per channel only" in images_log.text
    # JPEG has no alpha: dropped with a warning
    save_image(x, tmp_path / "c.jpg", alpha=torch.ones(1, 1, 48, 64))
    assert Image.open(tmp_path / "c.jpg").mode == "RGB"
    assert "no alpha channel" in images_log.text


def test_bmp_write(tmp_path: Path, photo: np.ndarray) -> None:
    out = save_image(photo, tmp_path / "a.bmp")
    assert np.array_equal(np.asarray(Image.open(out)), photo)


# --------------------------------------------------------------------------------------------
# In-memory inputs
# --------------------------------------------------------------------------------------------


def test_numpy_inputs(photo: np.ndarray) -> None:
    expected = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255
    assert torch.equal(to_tensor(photo), expected)
    assert torch.allclose(to_tensor(photo.astype(np.float64) / 255), expected)
    assert torch.allclose(to_tensor(photo.astype(np.uint16) * 257), expected)
    assert load_image(photo.astype(np.uint16) * 257).bit_depth == 16
    assert load_image(photo).bit_depth == 8
    gray = to_tensor(photo[..., 0])
    assert gray.shape == (1, 3, 48, 64) and torch.equal(gray[:, 0], gray[:, 2])
    assert torch.equal(to_tensor(photo[..., :1]), gray)
    rgba = load_image(np.dstack([photo, photo[..., :1]]))
    assert torch.equal(rgba.tensor, expected) and rgba.alpha.shape == (1, 1, 48, 64)
    batch = to_tensor(np.stack([photo, photo[::-1]]))
    assert batch.shape == (2, 3, 48, 64) and torch.equal(batch[1], expected[0].flip(1))
    # big-endian and non-contiguous arrays are fine
    assert torch.allclose(to_tensor((photo.astype(">u2") * 257)[:, ::-1]), expected.flip(-1))


def test_torch_and_pil_inputs(photo: np.ndarray) -> None:
    expected = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255
    assert torch.equal(to_tensor(expected[0]), expected)
    assert torch.equal(to_tensor(expected), expected)
    assert torch.equal(to_tensor(expected.half()), expected.half().float())
    assert torch.equal(to_tensor(torch.from_numpy(photo).permute(2, 0, 1)), expected)
    assert to_tensor(expected[0, 0]).shape == (1, 3, 48, 64)
    assert torch.equal(to_tensor(Image.fromarray(photo)), expected)
    mixed = to_tensor([photo, Image.fromarray(photo), expected[0], load_image(photo)])
    assert mixed.shape == (4, 3, 48, 64) and all(torch.equal(m, expected[0]) for m in mixed)
    loaded = load_image(torch.cat([expected, expected[:, :1]], dim=1))
    assert torch.equal(loaded.tensor, expected) and loaded.alpha.shape == (1, 1, 48, 64)
    # the input is not modified and not aliased in a way that matters
    assert not to_tensor(expected).requires_grad


def test_bytes_and_file_object_inputs(tmp_path: Path, photo: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG")
    assert np.array_equal(_as8(_hwc(load_image(buf.getvalue()))), photo)
    buf.seek(0)
    assert np.array_equal(_as8(_hwc(load_image(buf))), photo)
    with pytest.raises(TypeError, match="binary mode"), open(tmp_path / "t.txt", "w+") as f:
        load_image(f)


@pytest.mark.parametrize(
    ("value", "error", "pattern"),
    [
        (np.zeros((4, 4, 3), np.int64), TypeError, r"`images` has dtype int64"),
        (torch.zeros(3, 4, 4, dtype=torch.int32), TypeError, r"`images` has dtype torch.int32"),
        (np.zeros((3, 8, 8), np.uint8), InvalidImageError, r"looks like CHW"),
        (torch.zeros(8, 8, 3), InvalidImageError, r"looks like HWC"),
        (np.zeros((0, 4, 3), np.uint8), InvalidImageError, r"zero size"),
        (torch.zeros(1, 3, 0, 4), InvalidImageError, r"zero size"),
        (np.full((4, 4, 3), 200.0), InvalidImageError, r"looks like \[0, 255\]"),
        (torch.full((3, 4, 4), -0.8), InvalidImageError, r"looks like \[-1, 1\]"),
        (np.full((4, 4), np.nan, np.float32), InvalidImageError, r"NaN"),
        (np.zeros((2, 2, 2, 2, 2), np.uint8), InvalidImageError, r"shape"),
        ("no/such/file.png", InvalidImageError, r"no/such/file\.png: file does not exist"),
        (12, TypeError, r"type int"),
        ([], InvalidImageError, r"empty list"),
    ],
)
def test_bad_in_memory_inputs(value, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        to_tensor(value)


def test_small_overshoot_is_clamped_and_sizes_must_match() -> None:
    x = torch.linspace(-0.02, 1.02, 48).reshape(1, 3, 4, 4)
    y = to_tensor(x)
    assert y.min() == 0 and y.max() == 1
    with pytest.raises(InvalidImageError, match=r"`images\[1\]` is 5x4 but `images\[0\]` is 4x4"):
        to_tensor([torch.rand(3, 4, 4), torch.rand(3, 4, 5)])
    with pytest.raises(InvalidImageError, match="batch of 2"):
        load_image(torch.rand(2, 3, 4, 4))


# --------------------------------------------------------------------------------------------
# Bad files: one InvalidImageError naming the file
# --------------------------------------------------------------------------------------------


def _encoded(photo: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format=fmt)
    return buf.getvalue()


def _bad_files(tmp_path: Path, photo: np.ndarray) -> dict[str, tuple[Path, str]]:
    png, jpg = _encoded(photo, "PNG"), _encoded(photo, "JPEG")
    ok, png16 = cv2.imencode(".png", np.zeros((30, 30, 3), np.uint16) + 1234)
    png16 = png16.tobytes()
    header = b"\x89PNG\r\n\x1a\n"
    zero = header + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 10, 8, 2, 0, 0, 0))
    huge = header + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
    tif16 = io.BytesIO()
    pytest.importorskip("tifffile").imwrite(tif16, np.zeros((30, 30, 3), np.uint16) + 1234)
    tif16 = tif16.getvalue()  # directory first, pixel data last: the cut hits the pixels
    cases = {
        "empty": (b"", "empty"),
        "truncated_tif16": (tif16[: len(tif16) // 2], "truncated or corrupt"),
        "truncated_png": (png[: len(png) // 2], "truncated or corrupt"),
        "truncated_jpg": (jpg[: len(jpg) // 2], "truncated or corrupt"),
        "truncated_png16": (png16[: len(png16) // 2], "truncated or corrupt"),
        "garbage_png": (png[:60] + bytes(range(256)) * 4, "truncated or corrupt"),
        "text": (b"this is not an image\n", "cannot identify the image format"),
        "zero_sized": (zero + _png_chunk(b"IEND", b""), "image format"),
        "bomb": (huge + _png_chunk(b"IEND", b""), "decompression bomb"),
    }
    out = {}
    for name, (data, problem) in cases.items():
        path = tmp_path / f"{name}.png"
        path.write_bytes(data)
        out[name] = (path, problem)
    out["missing"] = (tmp_path / "missing.png", "does not exist")
    (tmp_path / "folder.png").mkdir()
    out["folder"] = (tmp_path / "folder.png", "is a folder")
    return out


def test_bad_files_raise_invalid_image_error_naming_the_file(
    tmp_path: Path, photo: np.ndarray
) -> None:
    for name, (path, problem) in _bad_files(tmp_path, photo).items():
        with pytest.raises(InvalidImageError) as info:
            load_image(path)
        message = str(info.value)
        assert str(path) in message, name
        assert problem in message, (name, message)
        assert isinstance(info.value, ValueError)
        # the same through to_tensor and with a str path
        with pytest.raises(InvalidImageError, match=re.escape(str(path))):
            to_tensor([str(path)])


def test_max_pixels_limit(tmp_path: Path, photo: np.ndarray) -> None:
    src = tmp_path / "p.png"
    Image.fromarray(photo).save(src)
    with pytest.raises(InvalidImageError, match=r"p\.png: image is 64x48 = 3072 pixels.*3000"):
        load_image(src, max_pixels=3000)
    with pytest.raises(InvalidImageError, match="3072 pixels"):
        load_image(Image.fromarray(photo), max_pixels=3000)
    assert load_image(src, max_pixels=3072).width == 64
    assert load_image(src, max_pixels=None).height == 48
    # the default refuses a file declaring ~150 megapixels before decoding a single pixel
    header = struct.pack(">IIBBBBB", 12300, 12300, 8, 2, 0, 0, 0)
    (tmp_path / "big.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b"")
    )
    with pytest.raises(InvalidImageError, match=r"big\.png: .*more than the limit"):
        load_image(tmp_path / "big.png")


# --------------------------------------------------------------------------------------------
# Writing: failures and argument errors
# --------------------------------------------------------------------------------------------


def test_save_image_failing_mid_write_leaves_no_partial_file(
    tmp_path: Path, photo: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\npartial")
        raise OSError("encoder crashed")

    target = tmp_path / "out.png"
    target.write_bytes(b"previous result")
    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="encoder crashed"):
        save_image(photo, target)
    assert target.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    monkeypatch.undo()
    save_image(photo, target)
    assert np.array_equal(np.asarray(Image.open(target)), photo)


def test_save_image_argument_errors(tmp_path: Path) -> None:
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"suffix '\.gif'"):
        save_image(x, tmp_path / "a.gif")
    with pytest.raises(ValueError, match="`bit_depth`"):
        save_image(x, tmp_path / "a.png", bit_depth=12)
    with pytest.raises(ValueError, match="`quality`"):
        save_image(x, tmp_path / "a.jpg", quality=0)
    with pytest.raises(InvalidImageError, match="holds 2 images"):
        save_image(torch.rand(2, 3, 8, 8), tmp_path / "a.png")
    with pytest.raises(InvalidImageError, match="resize_alpha"):
        save_image(x, tmp_path / "a.png", alpha=torch.rand(1, 1, 4, 4))
    with pytest.raises(InvalidImageError, match=r"\[-1, 1\]"):
        save_image(x * 2 - 1, tmp_path / "a.png")
    with pytest.raises(InvalidImageError, match="NaN"):
        save_image(torch.full((3, 4, 4), float("nan")), tmp_path / "a.png")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Conversions and helpers
# --------------------------------------------------------------------------------------------


def test_to_pil_to_numpy_round_trip(photo: np.ndarray) -> None:
    x = to_tensor([photo, photo[::-1]])
    pils = to_pil(x)
    assert [p.mode for p in pils] == ["RGB", "RGB"]
    assert np.array_equal(np.asarray(pils[1]), photo[::-1])
    assert torch.equal(to_tensor(pils), x)
    arr = to_numpy(x)
    assert arr.shape == (2, 48, 64, 3) and arr.dtype == np.float32
    assert np.array_equal(_as8(arr[0]), photo)
    assert to_numpy(x[0]).shape == (1, 48, 64, 3)
    assert to_pil(x[:, :1])[0].mode == "L"
    assert to_pil(x, alpha=torch.ones(2, 1, 48, 64))[0].mode == "RGBA"


def test_resize_alpha() -> None:
    g = torch.Generator().manual_seed(0)
    alpha = (torch.rand(1, 1, 8, 10, generator=g) > 0.5).float()  # hard edges overshoot
    up = resize_alpha(alpha, (32, 40))
    assert up.shape == (1, 1, 32, 40) and up.min() >= 0 and up.max() <= 1
    # the same resampling as an image upscale (plain bicubic when enlarging, see ops.resize),
    # then clamped (which is needed here)
    ref = torch.nn.functional.interpolate(alpha, size=(32, 40), mode="bicubic", antialias=False)
    assert ref.min() < 0 and ref.max() > 1
    assert torch.allclose(up, ref.clamp(0, 1))
    opaque = resize_alpha(torch.ones(1, 1, 8, 10), (31, 17))
    assert torch.allclose(opaque, torch.ones(1, 1, 31, 17), atol=1e-6)  # stays 255 when written
    assert resize_alpha(alpha, (8, 10)) is alpha
    assert resize_alpha(None, (4, 4)) is None
    down = resize_alpha(alpha[0], (4, 5))
    assert down.shape == (1, 1, 4, 5)
    with pytest.raises(ValueError, match="`size`"):
        resize_alpha(alpha, (0, 4))
    with pytest.raises(ValueError, match="`alpha`"):
        resize_alpha(torch.rand(1, 3, 4, 4), (8, 8))


def test_loaded_image_helpers(photo: np.ndarray) -> None:
    loaded = load_image(np.dstack([photo, photo[..., :1]]))
    assert (loaded.height, loaded.width, loaded.name) == (48, 64, "<memory>")
    moved = loaded.to("cpu")
    assert moved.tensor.device.type == "cpu" and moved.alpha is not None
    assert load_image(loaded) is loaded


# --------------------------------------------------------------------------------------------
# save_image(..., like=loaded): the output stored the way the input was
# --------------------------------------------------------------------------------------------


def _icc(kind: str) -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile(kind)).tobytes()


def test_like_keeps_the_icc_profile_of_a_jpeg(
    tmp_path: Path, photo: np.ndarray, images_log
) -> None:
    xyz = _icc("XYZ")  # anything but sRGB: dropping it would change what the colours mean
    src = tmp_path / "in.jpg"
    Image.fromarray(photo).save(src, icc_profile=xyz, quality=95)
    loaded = load_image(src)
    assert loaded.icc_profile == xyz
    result = loaded.tensor * 0.9
    for name in ("o.jpg", "o.png", "o.webp", "o.tif"):
        out = save_image(result, tmp_path / name, like=loaded)
        assert Image.open(out).info.get("icc_profile") == xyz, name
    # 16-bit outputs go through OpenCV, which cannot embed profiles itself
    for name in ("o16.png", "o16.tif"):
        out = save_image(result, tmp_path / name, like=loaded, bit_depth=16)
        assert Image.open(out).info.get("icc_profile") == xyz, name
        back = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
        assert back.dtype == np.uint16
        assert np.array_equal(back[..., ::-1], _as16(result[0].permute(1, 2, 0).numpy()))
        assert load_image(out).icc_profile == xyz
    assert "not embedded" not in images_log.text
    # an explicit profile overrides like's
    srgb = _icc("sRGB")
    out = save_image(result, tmp_path / "s.png", like=loaded, icc_profile=srgb)
    assert Image.open(out).info.get("icc_profile") == srgb


def test_like_writes_grayscale_as_luma_8bit(tmp_path: Path, photo: np.ndarray) -> None:
    gray = photo[..., 1]
    Image.fromarray(gray).save(tmp_path / "g.png")
    loaded = load_image(tmp_path / "g.png")
    assert loaded.grayscale and loaded.tensor.shape[1] == 3
    out = save_image(loaded.tensor, tmp_path / "same.png", like=loaded)
    back = Image.open(out)
    assert back.mode == "L" and np.array_equal(np.asarray(back), gray)
    # a result that picked up colour is written as its luma, the way PIL's convert("L") would
    tint = torch.tensor([1.0, 0.8, 0.5]).view(1, 3, 1, 1)
    colour = loaded.tensor * tint
    out = save_image(colour, tmp_path / "luma.png", like=loaded)
    back = Image.open(out)
    assert back.mode == "L"
    rgb8 = _as8(colour[0].permute(1, 2, 0).numpy())
    expected = np.asarray(Image.fromarray(rgb8).convert("L")).astype(int)
    diff = np.abs(np.asarray(back).astype(int) - expected)
    assert diff.max() <= 1 and diff.mean() < 0.5
    # without like, three channels stay three
    assert Image.open(save_image(colour, tmp_path / "rgb.png")).mode == "RGB"
    # grayscale with alpha is written back as LA
    Image.fromarray(np.dstack([gray, photo[..., 2]]), "LA").save(tmp_path / "la.png")
    la = load_image(tmp_path / "la.png")
    back = Image.open(save_image(la.tensor, tmp_path / "la_out.png", like=la))
    assert back.mode == "LA" and np.array_equal(np.asarray(back), np.dstack([gray, photo[..., 2]]))


def test_like_writes_grayscale_16bit(tmp_path: Path, photo16: np.ndarray) -> None:
    gray = photo16[..., 0]
    Image.fromarray(gray).save(tmp_path / "g16.png")
    loaded = load_image(tmp_path / "g16.png")
    assert loaded.grayscale and loaded.bit_depth == 16
    out = save_image(loaded.tensor, tmp_path / "same.png", like=loaded)
    back = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and back.shape == gray.shape and np.array_equal(back, gray)
    colour = torch.from_numpy(photo16.astype(np.float32) / 65535).permute(2, 0, 1)[None]
    out = save_image(colour, tmp_path / "luma.tif", like=loaded)
    back = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and back.shape == gray.shape
    r, g, b = (photo16[..., c].astype(np.float64) / 65535 for c in range(3))
    expected = np.round((0.299 * r + 0.587 * g + 0.114 * b) * 65535)
    assert np.abs(back.astype(np.float64) - expected).max() <= 1


def _exif_jpeg(path: Path, photo: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "RaimCam"
    exif[0x0110] = "X1"
    exif.get_ifd(0x8769)[0x9003] = "2024:06:01 12:00:00"  # DateTimeOriginal
    Image.fromarray(photo).save(path, exif=exif.tobytes(), quality=95)


def test_like_keeps_exif_with_orientation_reset(
    tmp_path: Path, photo: np.ndarray, images_log
) -> None:
    _exif_jpeg(tmp_path / "in.jpg", photo, orientation=6)
    loaded = load_image(tmp_path / "in.jpg")
    assert loaded.tensor.shape[-2:] == (64, 48)  # upright
    exif = Image.Exif()
    exif.load(loaded.exif)
    assert exif.get(0x0112) == 1 and exif[0x010F] == "RaimCam" and exif[0x0110] == "X1"
    result = loaded.tensor.flip(-1)
    for name, kw in [
        ("o.jpg", {}),
        ("o.png", {}),
        ("o.webp", {"quality": 100}),
        ("o.tif", {}),
        ("o16.png", {"bit_depth": 16}),
    ]:
        out = save_image(result, tmp_path / name, like=loaded, **kw)
        written = Image.open(out).getexif()
        assert written.get(0x0112, 1) == 1, name
        assert (written.get(0x010F), written.get(0x0110)) == ("RaimCam", "X1"), name
        if name != "o.tif":  # TIFF: main tags only (said in a warning)
            assert written.get_ifd(0x8769).get(0x9003) == "2024:06:01 12:00:00", name
        # read back upright as written: the orientation is not applied a second time
        again = load_image(out)
        assert again.tensor.shape[-2:] == (64, 48), name
        if name != "o.jpg":  # lossless
            assert (again.tensor - result).abs().max() <= 0.5 / 255 + 1e-6, name
        reread = Image.Exif()
        reread.load(again.exif)
        assert reread.get(0x0112, 1) == 1 and reread[0x010F] == "RaimCam", name
    # the JPEG's EXIF block travels byte for byte, apart from the orientation value
    raw = Image.open(tmp_path / "in.jpg").info["exif"]
    assert Image.open(tmp_path / "o.jpg").info["exif"] == loaded.exif
    assert len(loaded.exif) == len(raw)
    assert sum(a != b for a, b in zip(loaded.exif, raw, strict=True)) == 1
    # what TIFF cannot carry is said, not silently dropped
    assert "sub-directories (e.g. capture date, location) are not written" in images_log.text
    save_image(result, tmp_path / "o16.tif", like=loaded, bit_depth=16)
    assert "EXIF data is not embedded" in images_log.text


def test_exif_too_large_for_jpeg_is_dropped_with_a_warning(tmp_path: Path, images_log) -> None:
    exif = Image.Exif()
    exif[0x010F] = "RaimCam"
    exif[0x010E] = "x" * 70000  # fits a PNG eXIf chunk, not a JPEG APP1 segment
    Image.new("RGB", (8, 6), (10, 20, 30)).save(tmp_path / "in.png", exif=exif.tobytes())
    loaded = load_image(tmp_path / "in.png")
    assert len(loaded.exif) > 70000
    out = save_image(loaded, tmp_path / "out.jpg")
    assert Image.open(out).size == (8, 6) and "exif" not in Image.open(out).info
    assert "too large for JPEG" in images_log.text
    assert Image.open(save_image(loaded, tmp_path / "out.png")).getexif()[0x010F] == "RaimCam"


def test_exif_of_a_tiff_keeps_only_the_tags_about_the_photo(
    tmp_path: Path, photo: np.ndarray
) -> None:
    exif = Image.Exif()
    exif[0x010F] = "RaimCam"
    exif[0x0110] = "X1"
    exif[0x0112] = 8
    Image.fromarray(photo).save(tmp_path / "in.tif", exif=exif)
    loaded = load_image(tmp_path / "in.tif")
    assert loaded.tensor.shape[-2:] == (64, 48)
    kept = Image.Exif()
    kept.load(loaded.exif)
    assert kept[0x010F] == "RaimCam" and kept[0x0110] == "X1" and kept.get(0x0112, 1) == 1
    assert not {256, 257, 258, 273, 279} & set(kept)  # size, bits, strips: the old layout
    # written into a smaller TIFF, the layout tags are the new file's own
    small = torch.rand(1, 3, 10, 12, generator=torch.Generator().manual_seed(0))
    out = save_image(small, tmp_path / "out.tif", like=loaded)
    written = Image.open(out)
    assert written.size == (12, 10) and written.getexif()[0x010F] == "RaimCam"
    assert np.array_equal(np.asarray(written), _as8(small[0].permute(1, 2, 0).numpy()))


def test_like_keeps_alpha_and_resizes_it(tmp_path: Path, photo: np.ndarray) -> None:
    alpha = np.tile(np.linspace(0, 255, photo.shape[1]).astype(np.uint8), (photo.shape[0], 1))
    alpha[10:20, 10:20] = 0  # hard edges
    Image.fromarray(np.dstack([photo, alpha]), "RGBA").save(tmp_path / "a.png")
    loaded = load_image(tmp_path / "a.png")
    out = save_image(loaded.tensor, tmp_path / "same.png", like=loaded)
    back = np.asarray(Image.open(out))
    assert back.shape == (48, 64, 4) and np.array_equal(back[..., 3], alpha)
    # a x2 result: like's alpha is brought to the result's size (bicubic, clamped)
    big = torch.nn.functional.interpolate(loaded.tensor, size=(96, 128), mode="nearest")
    out = save_image(big, tmp_path / "x2.png", like=loaded)
    back = np.asarray(Image.open(out))
    assert back.shape == (96, 128, 4)
    a = torch.from_numpy(alpha.astype(np.float32) / 255)[None, None]
    ref = torch.nn.functional.interpolate(a, size=(96, 128), mode="bicubic", align_corners=False)
    assert np.abs(back[..., 3].astype(int) - _as8(ref.clamp(0, 1)[0, 0].numpy())).max() <= 1
    # explicit arguments override like
    out = save_image(big, tmp_path / "o.png", like=loaded, alpha=torch.ones(1, 1, 96, 128))
    assert np.asarray(Image.open(out))[..., 3].min() == 255
    out = save_image(loaded.tensor, tmp_path / "o16.png", like=loaded, bit_depth=16)
    assert cv2.imread(str(out), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    with pytest.raises(TypeError, match="`like`"):
        save_image(loaded.tensor, tmp_path / "x.png", like=loaded.tensor)


def test_like_keeps_16bit(tmp_path: Path, photo16: np.ndarray) -> None:
    cv2.imwrite(str(tmp_path / "a.png"), photo16[..., ::-1])
    loaded = load_image(tmp_path / "a.png")
    out = save_image(loaded.tensor, tmp_path / "b.png", like=loaded)
    back = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and np.array_equal(back[..., ::-1], photo16)
    out = save_image(loaded.tensor, tmp_path / "b8.png", like=loaded, bit_depth=8)
    assert cv2.imread(str(out), cv2.IMREAD_UNCHANGED).dtype == np.uint8


# --------------------------------------------------------------------------------------------
# check_unit_range: the one value check, one pass and one host transfer
# --------------------------------------------------------------------------------------------

_HOST_TRANSFERS = {
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "item",
    "tolist",
    "cpu",
    "numpy",
}


class _CallLog(torch.overrides.TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))

    @property
    def transfers(self) -> list[str]:
        return [n for n in self.names if n in _HOST_TRANSFERS]


def test_check_unit_range_accepts_clamps_and_refuses() -> None:
    assert images.RANGE_TOLERANCE == 0.05
    x = torch.linspace(-0.04, 1.04, 60).reshape(1, 3, 4, 5)
    before = x.clone()
    y = check_unit_range(x, "image")
    assert torch.equal(y, before.clamp(0, 1)) and torch.equal(x, before)  # input untouched
    inside = torch.rand(2, 3, 4, 4)
    out = check_unit_range(inside, "image")
    assert torch.equal(out, inside) and out is not inside  # a new tensor, safe to modify
    assert check_unit_range(inside.to(torch.bfloat16), "image").dtype == torch.bfloat16
    tol = images.RANGE_TOLERANCE
    check_unit_range(torch.tensor([-0.9 * tol, 1 + 0.9 * tol]), "image")
    cases = [
        (torch.tensor([0.5, float("nan")]), r"`image` contains NaN or infinite"),
        (torch.tensor([0.5, float("inf")]), r"`image` contains NaN or infinite"),
        (torch.tensor([-float("inf"), 0.5]), r"`image` contains NaN or infinite"),
        (torch.tensor([0.0, 1 + 1.1 * tol]), r"`image`: float values span \[0, 1.0\d*\]"),
        (torch.tensor([-1.1 * tol, 1.0]), r"must lie in \[0, 1\]"),
        (torch.tensor([0.0, 200.0]), r"looks like \[0, 255\]"),
        (torch.tensor([-0.8, 0.9]), r"looks like \[-1, 1\]"),
        (torch.tensor([0.0, 1e6]), r"rescale it"),
        (torch.zeros(0), r"`image` has zero size"),
    ]
    for value, pattern in cases:
        with pytest.raises(InvalidImageError, match=pattern):
            check_unit_range(value, "image")
    with pytest.raises(TypeError, match="`image` must be a floating-point tensor"):
        check_unit_range(torch.zeros(3, dtype=torch.uint8), "image")


def test_check_unit_range_syncs_once() -> None:
    x = torch.rand(1, 3, 16, 16)
    x[0, 0, 0, 0] = float("nan")
    for value in (torch.rand(1, 3, 16, 16), x):
        with _CallLog() as log, contextlib.suppress(InvalidImageError):
            check_unit_range(value, "image")
        assert log.transfers == ["tolist"], log.names
        assert "isfinite" not in log.names
    # the tensor path of to_tensor / load_image checks values once, with the same rule
    with _CallLog() as log:
        to_tensor(torch.rand(3, 16, 16))
    assert log.transfers == ["tolist"], log.names
    with _CallLog() as log:
        load_image(torch.rand(4, 16, 16))
    assert log.transfers == ["tolist"], log.names


# --------------------------------------------------------------------------------------------
# Reading regular files only, with a size bound
# --------------------------------------------------------------------------------------------


def test_file_size_limit_is_checked_before_reading(tmp_path: Path, photo: np.ndarray) -> None:
    src = tmp_path / "p.png"
    Image.fromarray(photo).save(src)
    size = src.stat().st_size
    with pytest.raises(InvalidImageError, match=rf"p\.png: file is {size} bytes.*max_bytes"):
        load_image(src, max_bytes=size - 1)
    assert load_image(src, max_bytes=size).width == 64
    assert load_image(src, max_bytes=None).width == 64
    # a 2 GiB sparse file is refused at once by the default limit, not read into memory
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:
        f.truncate(2**31)
    start = time.perf_counter()
    with pytest.raises(InvalidImageError, match=rf"huge\.png: .*limit of {2**30}"):
        load_image(huge)
    assert time.perf_counter() - start < 1.0
    assert images.DEFAULT_MAX_FILE_BYTES == 2**30
    # file objects are bounded the same way
    with pytest.raises(InvalidImageError, match="more than the limit of 100"):
        load_image(io.BytesIO(src.read_bytes()), max_bytes=100)
    with pytest.raises(ValueError, match="`max_bytes`"):
        load_image(src, max_bytes=-1)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_special_files_are_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    done: dict = {}

    def read() -> None:
        try:
            load_image(fifo)
        except InvalidImageError as e:
            done["error"] = str(e)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "reading a FIFO hung"
    assert done["error"] == f"{fifo}: is a FIFO (named pipe), not an image file"
    if os.path.exists("/dev/zero"):
        link = tmp_path / "zero.png"
        link.symlink_to("/dev/zero")
        with pytest.raises(InvalidImageError, match=r"zero\.png: is a character device"):
            load_image(link)
    sock_path = tmp_path / "s.png"
    if hasattr(socket, "AF_UNIX") and len(str(sock_path)) < 100:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(sock_path))
            with pytest.raises(InvalidImageError, match=r"s\.png: is a socket"):
                load_image(sock_path)


# --------------------------------------------------------------------------------------------
# The pixel limit is checked from the header, before any decoder runs
# --------------------------------------------------------------------------------------------


def _no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the image was decoded before its size was checked")

    monkeypatch.setattr(cv2, "imdecode", refuse)


def _float_rgb_tiff_header(width: int, height: int, order: str) -> bytes:
    """A classic TIFF directory declaring float32 RGB pixels (the data itself is absent)."""
    tags = [
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 1, 32),
        (259, 3, 1, 8),  # deflate
        (262, 3, 1, 2),  # RGB
        (273, 4, 1, 8),
        (277, 3, 1, 3),
        (278, 4, 1, height),
        (279, 4, 1, 1000),
        (339, 3, 1, 3),  # float samples
    ]
    ifd = struct.pack(order + "H", len(tags))
    for tag, kind, count, value in tags:
        field = struct.pack(order + ("H2x" if kind == 3 else "I"), value)
        ifd += struct.pack(order + "HHI", tag, kind, count) + field
    magic = b"II*\x00" if order == "<" else b"MM\x00*"
    return magic + struct.pack(order + "I", 8) + ifd + b"\x00" * 4


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow probing a BigTIFF
def test_pixel_limit_before_decoding_float_tiff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rgb = np.random.default_rng(0).random((30, 40, 3), dtype=np.float32)
    cv2.imwrite(str(tmp_path / "f.tif"), rgb[..., ::-1])
    with pytest.raises(UnidentifiedImageError):
        Image.open(tmp_path / "f.tif")  # so OpenCV is the decoder that would be used
    assert np.array_equal(_hwc(load_image(tmp_path / "f.tif")), rgb)
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(
        tmp_path / "big.tif", rgb, photometric="rgb", bigtiff=True, byteorder=">",
        compression="zlib",
    )  # fmt: skip
    for order in "<>":
        header = _float_rgb_tiff_header(12000, 12000, order)
        (tmp_path / f"huge{order == '>'}.tif").write_bytes(header)
    _no_decoding(monkeypatch)
    for name in ("f.tif", "big.tif"):
        with pytest.raises(InvalidImageError, match=r"image is 40x30 = 1200 pixels.*1000"):
            load_image(tmp_path / name, max_pixels=1000)
    for name in ("hugeFalse.tif", "hugeTrue.tif"):
        with pytest.raises(InvalidImageError, match=r"12000x12000 = 144000000 pixels"):
            load_image(tmp_path / name)
    (tmp_path / "cut.tif").write_bytes(_float_rgb_tiff_header(12000, 12000, "<")[:20])
    with pytest.raises(InvalidImageError, match=r"cut\.tif"):
        load_image(tmp_path / "cut.tif")


def test_pixel_limit_before_decoding_16bit_png(
    tmp_path: Path, photo16: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    cv2.imwrite(str(tmp_path / "a.png"), photo16[..., ::-1])
    _no_decoding(monkeypatch)
    with pytest.raises(InvalidImageError, match=r"image is 24x20 = 480 pixels"):
        load_image(tmp_path / "a.png", max_pixels=479)


def test_float_tiff_via_opencv_keeps_orientation_and_icc(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    rgb = np.random.default_rng(1).random((6, 9, 3), dtype=np.float32)
    icc = _icc("sRGB")
    for orientation in (3, 6, 8):
        tifffile.imwrite(
            tmp_path / "r.tif", rgb, photometric="rgb", iccprofile=icc,
            extratags=[(274, "H", 1, orientation)],
        )  # fmt: skip
        loaded = load_image(tmp_path / "r.tif")
        assert np.array_equal(_hwc(loaded), _upright16(rgb, orientation)), orientation
        assert loaded.icc_profile == icc and loaded.bit_depth == 16
