"""Make the small low-quality example photos in this folder.

The photos come from scikit-image's bundled test images (no download), degraded the way real
photos found "in the wild" are: a soft lens (Gaussian blur), a small sensor or a resize (bicubic
downscale), sensor noise (signal-dependent Gaussian), and a web re-save (JPEG at quality 40-60).
Everything is seeded, so running the script again gives the same files.

They feed the README's main command::

    raim restore examples -o outputs

Besides the four JPEG photos there is an RGBA PNG (the alpha must come back in the output) and
a 16-bit RGB PNG (the output must stay 16-bit).

Run from the repository root::

    python examples/make_examples.py
"""

from __future__ import annotations

import argparse
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raim_diffusion.images import load_image, save_image  # noqa: E402


@dataclass(frozen=True)
class Degradation:
    """One photo's recipe: where it comes from and how it is damaged."""

    name: str
    source: str  # name of a function in skimage.data
    side: int  # long side of the low-quality output, in pixels
    blur: float  # Gaussian blur radius applied at twice the output size
    noise: float  # noise standard deviation at mid-grey, in 8-bit levels
    jpeg_quality: int | None  # None: no JPEG re-save
    seed: int
    crop: tuple[int, int, int, int] | None = None  # (top, left, height, width) of the source


PHOTOS = (
    Degradation("astronaut.jpg", "astronaut", 176, 1.2, 5.0, 45, seed=1),
    Degradation("chelsea.jpg", "chelsea", 192, 1.0, 6.0, 50, seed=2),
    Degradation("coffee.jpg", "coffee", 192, 1.4, 4.0, 40, seed=3),
    Degradation("rocket.jpg", "rocket", 192, 0.8, 7.0, 55, seed=4),
)
LOGO = Degradation("logo_rgba.png", "logo", 144, 1.0, 4.0, 60, seed=5)
MICROSCOPE = Degradation(
    "microscope_16bit.png", "immunohistochemistry", 128, 1.0, 3.0, None, seed=6
)


def degrade(rgb: np.ndarray, recipe: Degradation) -> np.ndarray:
    """HxWx3 uint8 photo -> float32 HxWx3 in [0, 1] at the recipe's size, degraded."""
    rng = np.random.default_rng(recipe.seed)
    im = Image.fromarray(rgb)
    scale = 2 * recipe.side / max(im.size)
    # A clean image at twice the output size, then the lens, then the sensor's resolution.
    mid = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
    mid = mid.filter(ImageFilter.GaussianBlur(recipe.blur))
    low = mid.resize((mid.width // 2, mid.height // 2), Image.Resampling.BICUBIC)
    x = np.asarray(low, dtype=np.float32) / 255.0
    # Shot noise grows with brightness; read noise does not; a little of it is colour noise.
    sigma = recipe.noise / 255.0 * np.sqrt(0.3 + x)
    luma_noise = rng.standard_normal(x.shape[:2] + (1,), dtype=np.float32)
    chroma_noise = rng.standard_normal(x.shape, dtype=np.float32)
    x = x + sigma * (0.8 * luma_noise + 0.45 * chroma_noise)
    x = np.clip(x, 0.0, 1.0)
    if recipe.jpeg_quality is not None:
        buf = io.BytesIO()
        Image.fromarray(np.round(x * 255).astype(np.uint8)).save(
            buf, format="JPEG", quality=recipe.jpeg_quality
        )
        x = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255.0
    return x


def _disc_alpha(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Alpha of the disc that holds the non-white pixels of `rgb`, at `size` (height, width)."""
    ys, xs = np.nonzero(rgb.min(axis=2) < 240)
    cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
    radius = max(ys.max() - ys.min(), xs.max() - xs.min()) / 2
    sy, sx = size[0] / rgb.shape[0], size[1] / rgb.shape[1]
    yy, xx = np.mgrid[0 : size[0], 0 : size[1]].astype(np.float32)
    dist = np.hypot((yy + 0.5) / sy - cy, (xx + 0.5) / sx - cx) * sy
    return np.clip(radius * sy - dist + 0.5, 0.0, 1.0).astype(np.float32)


def _chw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def make_examples(out_dir: Path) -> list[Path]:
    """Write every example into `out_dir` and return the paths."""
    import torch

    written = []
    for recipe in PHOTOS:
        x = degrade(getattr(data, recipe.source)(), recipe)
        # The degradation already ended with a JPEG re-save at the recipe's quality; writing at
        # the same quality keeps the file small without changing its character.
        written.append(
            save_image(
                torch.from_numpy(_chw(x)), out_dir / recipe.name, quality=recipe.jpeg_quality
            )
        )

    # The bundled logo is fully opaque; cut the round badge out of its white background so the
    # example has real transparency (with an anti-aliased edge) for the output to preserve.
    logo = data.logo()[..., :3]
    x = degrade(np.ascontiguousarray(logo), LOGO)
    alpha_t = torch.from_numpy(_disc_alpha(logo, x.shape[:2]))[None, None]
    written.append(save_image(torch.from_numpy(_chw(x)), out_dir / LOGO.name, alpha=alpha_t))

    # 16-bit: keep the degradation in float and quantise to 16 bits, so the low byte is real.
    slide = getattr(data, MICROSCOPE.source)()[96:416, 96:416]
    x = degrade(slide, MICROSCOPE)
    written.append(save_image(torch.from_numpy(_chw(x)), out_dir / MICROSCOPE.name, bit_depth=16))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent, help="output folder"
    )
    args = parser.parse_args()
    for path in make_examples(args.out):
        with Image.open(path) as im:
            size = path.stat().st_size
            depth = load_image(path).bit_depth
            print(
                f"{path.name:22s} {im.width}x{im.height} {im.mode:5s} {depth:2d}-bit "
                f"{size / 1024:5.1f} KB"
            )


if __name__ == "__main__":
    main()
