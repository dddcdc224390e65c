"""Tiling: identity is exact, one tile when the tile covers the image, seam-free blending."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raim_diffusion.tiling import TileGrid, blend_weights, tile_starts, tiled_apply


@pytest.mark.parametrize("length,tile,stride", [(10, 4, 3), (37, 16, 12), (16, 16, 8), (5, 8, 4)])
def test_tile_starts_cover_and_stay_inside(length, tile, stride):
    starts = tile_starts(length, tile, stride)
    covered = torch.zeros(length, dtype=torch.bool)
    for s in starts:
        assert s >= 0 and s + min(tile, length) <= length
        covered[s : s + tile] = True
    assert covered.all()
    assert starts == sorted(set(starts))


@pytest.mark.parametrize("tile,overlap", [(8, 2), (16, 4), (17, 8), (24, 0), ((12, 20), (3, 5))])
@pytest.mark.parametrize("weight", ["gaussian", "cosine", "uniform"])
def test_identity_is_exact(tile, overlap, weight):
    x = torch.rand(2, 3, 37, 53, generator=torch.Generator().manual_seed(0))
    y = tiled_apply(lambda t: t, x, tile, overlap, weight=weight, max_batch=3)
    assert torch.equal(x, y)


def test_pointwise_function_is_exact_with_scale():
    x = torch.rand(1, 3, 29, 31, generator=torch.Generator().manual_seed(1))

    def up(t):
        return F.interpolate(t, scale_factor=4, mode="nearest") * 2 - 0.5

    assert torch.equal(tiled_apply(up, x, 12, 4, scale=4), up(x))


def test_tile_larger_than_image_is_one_tile():
    calls = []

    def fn(t):
        calls.append(t.shape)
        return t + 1

    x = torch.rand(2, 3, 20, 30)
    assert torch.equal(tiled_apply(fn, x, 64, 16), x + 1)
    assert calls == [x.shape]
    grid = TileGrid(20, 30, tile=64, overlap=16)
    assert len(grid) == 1 and grid.tiles == [(0, 0, 20, 30)]


def test_split_merge_roundtrip_and_tile_major_order():
    x = torch.arange(2 * 1 * 10 * 12, dtype=torch.float32).reshape(2, 1, 10, 12)
    grid = TileGrid(10, 12, tile=6, overlap=2)
    tiles = grid.split(x)
    assert tiles.shape == (len(grid) * 2, 1, 6, 6)
    y0, x0, h, w = grid.tiles[1]
    assert torch.equal(tiles[2:4], x[..., y0 : y0 + h, x0 : x0 + w])
    assert torch.equal(grid.merge(tiles), x)


@pytest.mark.parametrize(
    "weight,max_step", [("cosine", 0.12), ("gaussian", 0.4), ("uniform", 0.51)]
)
def test_blend_is_a_convex_combination_and_seam_free(weight, max_step):
    """Tiles that disagree by a constant give a smooth, bounded transition (no hard seam)."""
    x = torch.zeros(1, 1, 1, 64)
    grid = TileGrid(1, 64, tile=(1, 40), overlap=(0, 16), weight=weight)
    tiles = grid.split(x)
    tiles[1] += 1.0  # second tile says 1 where the first says 0
    out = grid.merge(tiles)[0, 0, 0]
    assert out.min() >= 0 and out.max() <= 1
    assert torch.all(out[:24] == 0) and torch.all(out[40:] == 1)
    steps = out.diff()
    assert torch.all(steps >= 0)  # monotone through the overlap
    # Spread over the overlap, not one jump: the Gaussian (sigma = 0.1 tile, as SUPIR) is the
    # sharpest of the smooth kinds; uniform weights are a plain average (one step of 1/2).
    assert steps.max() < max_step


def test_blend_weights_shape_and_positivity():
    w = blend_weights(7, 9, "gaussian")
    assert w.shape == (1, 1, 7, 9) and torch.all(w > 0)
    assert torch.argmax(w[0, 0]).item() == 3 * 9 + 4
    with pytest.raises(ValueError, match="weight"):
        blend_weights(4, 4, "triangle")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="overlap"):
        TileGrid(32, 32, tile=8, overlap=8)
    with pytest.raises(ValueError, match="tile"):
        TileGrid(32, 32, tile=0)
    with pytest.raises(ValueError, match="4-D"):
        tiled_apply(lambda t: t, torch.rand(3, 8, 8), 4)
    with pytest.raises(ValueError, match="tiles"):
        TileGrid(16, 16, tile=8, overlap=2).merge(torch.rand(3, 1, 8, 8))
