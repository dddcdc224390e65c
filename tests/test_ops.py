"""The shared image ops: the resize kernel is pinned against OpenCV and PIL on a real photo,
padding and cropping are inverse, and every stage uses the one implementation."""

from __future__ import annotations

import ast
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from raim_diffusion.ops import crop, pad, pad_to_multiple, resize, scaled_size

PACKAGE = Path(__file__).resolve().parents[1] / "raim_diffusion"


@pytest.fixture(scope="module")
def camera() -> np.ndarray:
    return data.camera()[100:164, 100:196].astype(np.float32) / 255  # 64 x 96, real texture


def test_enlarging_is_opencv_bicubic(camera):
    """Keys cubic with a = -0.75 and half-pixel centres, no antialiasing (cv2.INTER_CUBIC)."""
    x = torch.from_numpy(camera)[None, None]
    got = resize(x, (128, 192), clamp=False)[0, 0].numpy()
    want = cv2.resize(camera, (192, 128), interpolation=cv2.INTER_CUBIC)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("size", [(32, 48), (21, 31)])
def test_shrinking_is_pil_antialiased_bicubic(camera, size):
    """Shrinking is antialiased: PIL's BICUBIC resample (a = -0.5, stretched by the factor)."""
    x = torch.from_numpy(camera)[None, None]
    got = resize(x, size, clamp=False)[0, 0].numpy()
    pil = Image.fromarray(camera, mode="F").resize(size[::-1], Image.Resampling.BICUBIC)
    np.testing.assert_allclose(got, np.asarray(pil), atol=1e-5)


def test_resize_identity_clamp_and_dtype(camera):
    x = torch.from_numpy(camera)[None, None].expand(2, 3, -1, -1).contiguous()
    assert resize(x, tuple(x.shape[-2:])) is x
    edge = torch.zeros(1, 1, 8, 8)
    edge[..., 4:] = 1.0
    up = resize(edge, (16, 16))
    assert up.min() >= 0 and up.max() <= 1  # bicubic overshoot clamped
    assert resize(edge, (16, 16), clamp=False).max() > 1
    assert resize(x.half(), (32, 48)).dtype == torch.float16


def test_scaled_size_rounds_and_never_reaches_zero():
    assert scaled_size((101, 57), 2.0) == (202, 114)
    assert scaled_size((101, 57), 0.5) == (50, 28)  # Python rounds half to even
    assert scaled_size((3, 3), 0.01) == (1, 1)


@pytest.mark.parametrize(("h", "w", "m"), [(5, 7, 8), (16, 16, 8), (1, 3, 4), (9, 2, 16)])
def test_pad_to_multiple_then_crop_round_trip(h, w, m):
    x = torch.rand(1, 3, h, w)
    y = pad_to_multiple(x, m)
    assert y.shape[-2] % m == 0 and y.shape[-1] % m == 0
    assert torch.equal(crop(y, (h, w)), x)


def test_pad_reflects_then_replicates():
    x = torch.arange(3.0).view(1, 1, 1, 3)  # [0, 1, 2]
    # reflection reaches 2 pixels on a 3-pixel side; the third is replicated
    assert pad(x, right=3)[0, 0, 0].tolist() == [0, 1, 2, 1, 0, 0]
    assert pad(x, left=1, right=1)[0, 0, 0].tolist() == [1, 0, 1, 2, 1]
    assert pad(x) is x
    with pytest.raises(ValueError, match="padding must be >= 0"):
        pad(x, left=-1)
    with pytest.raises(ValueError, match="does not fit"):
        crop(x, (1, 4))


def test_every_stage_uses_the_one_resize_and_pad():
    """No module but ops.py calls bicubic interpolation or builds its own padding helper."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("ops.py", "ncnn.py", "builtin.py") or "training" in path.parts:
            # training's degradations resize with random kernels on purpose; the ncnn
            # converter reproduces the ncnn runtime's own Interp layer
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name.lstrip("_") in (
                "resize", "pad_to_multiple", "resize_to", "match_size", "pad"
            ):
                offenders.append(f"{path.name}:{node.lineno} defines {node.name}")
            if (isinstance(node, ast.keyword) and node.arg == "mode"
                    and isinstance(node.value, ast.Constant) and node.value.value == "bicubic"):
                offenders.append(f"{path.name}:{node.value.lineno} resizes bicubic itself")
    assert not offenders, offenders
