"""Weight-free fallback: Laplacian-pyramid blending, exact outside/inside the band, seam-free."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage import data

from raim_diffusion.fusion import band_weight, pyramid_blend


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    img = data.astronaut()[:128, 200:328].copy()  # face, hair, background: real texture
    return torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255


def _prior_like(img: torch.Tensor, gain: float = 0.8, offset: float = 0.15) -> torch.Tensor:
    """A plausible prior: smoother and with a different tone than the generated image."""
    k = torch.tensor([1.0, 2.0, 1.0]) / 4
    blur = F.conv2d(
        F.pad(img, (1, 1, 1, 1), mode="reflect"),
        (k[:, None] * k[None, :]).expand(3, 1, 3, 3),
        groups=3,
    )
    return (gain * blur + offset).clamp(0, 1)


def _rect_mask(h: int, w: int, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    mask = torch.zeros(1, 1, h, w)
    mask[..., top:bottom, left:right] = 1
    return mask


def _chessboard_distances(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = mask[0, 0].numpy() > 0
    outside = ndimage.distance_transform_cdt(~m, metric="chessboard")  # distance to the mask
    inside = ndimage.distance_transform_cdt(m, metric="chessboard")  # distance to the outside
    return torch.from_numpy(outside), torch.from_numpy(inside)


@pytest.mark.parametrize("feather", [4, 9, 16])
def test_exact_outside_band_and_deep_inside(photo: torch.Tensor, feather: int) -> None:
    fill = _prior_like(photo)
    mask = _rect_mask(128, 128, 30, 100, 20, 110)
    out = pyramid_blend(photo, fill, mask, feather=feather)
    dist_out, dist_in = _chessboard_distances(mask)
    far, deep = dist_out > feather, dist_in > feather
    assert far.any() and deep.any()
    assert torch.equal(out[..., far], photo[..., far])
    assert torch.equal(out[..., deep], fill[..., deep])
    # and the band really is used: pixels just outside the mask changed
    ring = (dist_out > 0) & (dist_out <= 2)
    assert (out[..., ring] != photo[..., ring]).any()


def test_empty_and_full_masks(photo: torch.Tensor) -> None:
    fill = _prior_like(photo)
    assert torch.equal(pyramid_blend(photo, fill, torch.zeros(1, 1, 128, 128)), photo)
    assert torch.equal(pyramid_blend(photo, fill, torch.ones(1, 1, 128, 128)), fill)


def test_flat_images_give_a_smooth_monotone_ramp() -> None:
    base, fill = torch.full((1, 3, 64, 64), 0.2), torch.full((1, 3, 64, 64), 0.8)
    mask = _rect_mask(64, 64, 20, 44, 20, 44)
    feather = 8
    out = pyramid_blend(base, fill, mask, feather=feather)
    # no halo: stays between the two levels
    assert out.min() >= 0.2 - 1e-6 and out.max() <= 0.8 + 1e-6
    row = out[0, 0, 32]
    assert (row[:33].diff() >= -1e-6).all() and (row[32:].diff() <= 1e-6).all()
    # the 0.6 step is spread over the band instead of one pixel
    step = max(out.diff(dim=-1).abs().max(), out.diff(dim=-2).abs().max())
    assert step <= 3 * 0.6 / feather


def _border_profile(x: torch.Tensor, cols: tuple[int, int], rows: slice) -> torch.Tensor:
    """Mean |d/dx| at offsets -4..4 from two vertical mask borders (the pixel pair (c-1, c))."""
    gx = (x[..., 1:] - x[..., :-1]).abs().mean(1)[0]  # gx[:, c] = |x[c + 1] - x[c]|
    return torch.stack(
        [
            0.5 * (gx[rows, cols[0] - 1 + o].mean() + gx[rows, cols[1] - 1 + o].mean())
            for o in range(-4, 5)
        ]
    )


@pytest.mark.parametrize(("gain", "offset"), [(1.0, 0.1), (0.6, 0.3)])
def test_seam_free_on_a_real_photo(photo: torch.Tensor, gain: float, offset: float) -> None:
    fill = _prior_like(photo, gain, offset)
    mask = _rect_mask(128, 128, 30, 90, 40, 100)
    out = pyramid_blend(photo, fill, mask, feather=8)
    naive = photo * (1 - mask) + fill * mask
    rows, cols = slice(35, 85), (40, 100)
    reference = torch.maximum(_border_profile(photo, cols, rows), _border_profile(fill, cols, rows))
    # seam metric: the gradient across the mask border is no larger than inside either image
    assert (_border_profile(out, cols, rows) <= 1.1 * reference).all()
    # the metric does detect seams: a hard cut-and-paste fails it
    assert (_border_profile(naive, cols, rows) > 1.5 * reference).any()


def test_batched_soft_masks_and_dtypes(photo: torch.Tensor) -> None:
    fill = _prior_like(photo)
    base2, fill2 = torch.cat([photo, fill]), torch.cat([fill, photo])
    masks = torch.cat([_rect_mask(128, 128, 10, 50, 10, 50), _rect_mask(128, 128, 60, 120, 30, 90)])
    masks[1] *= 0.5  # soft mask: half-way blend inside
    out = pyramid_blend(base2, fill2, masks, feather=6)
    for i in range(2):
        single = pyramid_blend(base2[i : i + 1], fill2[i : i + 1], masks[i : i + 1], feather=6)
        torch.testing.assert_close(out[i : i + 1], single, atol=1e-6, rtol=0)
    dist_out, dist_in = _chessboard_distances(masks[1:])
    deep = dist_in > 6
    torch.testing.assert_close(out[1:, :, deep], 0.5 * (fill + photo)[..., deep], atol=2e-2, rtol=0)
    # a single mask broadcasts over the batch; float64 and float16 keep the exact regions
    shared = pyramid_blend(base2, fill2, masks[:1], feather=6)
    assert shared.shape == base2.shape
    for dtype in (torch.float64, torch.float16):
        res = pyramid_blend(photo.to(dtype), fill.to(dtype), masks[:1], feather=6)
        far = _chessboard_distances(masks[:1])[0] > 6
        assert res.dtype == dtype and torch.equal(res[..., far], photo.to(dtype)[..., far])


def test_band_weight_properties() -> None:
    support = torch.zeros(1, 1, 40, 40, dtype=torch.bool)
    support[..., 15:25, 0:10] = True  # touches the image border
    w = band_weight(support, 7)
    dist_out, _ = _chessboard_distances(support.float())
    assert torch.equal(w[0, 0][support[0, 0]], torch.ones(int(support.sum())))
    assert (w[0, 0][dist_out > 7] == 0).all()
    assert ((w > 0) & (w < 1)).any()


def test_small_images_and_validation() -> None:
    base, fill = torch.rand(1, 3, 5, 7), torch.rand(1, 3, 5, 7)
    mask = _rect_mask(5, 7, 1, 3, 2, 5)
    assert pyramid_blend(base, fill, mask, feather=2).shape == base.shape
    assert pyramid_blend(base, fill, mask, feather=0, levels=0).shape == base.shape
    with pytest.raises(ValueError, match="mask"):
        pyramid_blend(base, fill, mask[..., :4, :])
    with pytest.raises(ValueError, match="fill"):
        pyramid_blend(base, fill[..., :4], mask)
    with pytest.raises(ValueError, match="feather"):
        pyramid_blend(base, fill, mask, feather=-1)
