"""One tiling helper for every stage that tiles (prior, latents, VAE, segmentation, fusion).

An image (or latent) of size ``H x W`` is covered by equally sized, overlapping tiles. Tile
starts follow the sliding rule used by SUPIR/DiffBIR (``0, stride, 2*stride, ...`` plus a last
tile snapped to the far edge), so every tile has the same shape and all of them can be stacked
into one batch. Results are blended back with smooth weights that fall off towards each tile's
edges, which hides seams.

The blend is written as ``first + sum_i w_i * (y_i - first) / sum_i w_i`` where ``first`` is,
per pixel, the value of one covering tile. It equals the usual weighted mean, but when every
tile agrees (an identity or any pointwise function) the correction term is exactly zero, so
tiled processing reproduces untiled processing bit for bit instead of to within rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

WeightKind = Literal["gaussian", "cosine", "uniform"]
_WEIGHT_KINDS = ("gaussian", "cosine", "uniform")


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)`` with step ``stride``.

    The last tile is snapped to ``length - tile`` so no tile leaves the image. A tile at least as
    long as ``length`` gives the single start ``0``.
    """
    if tile >= length:
        return [0]
    if stride <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _profile(n: int, kind: WeightKind, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """1-D blend profile of length ``n``, positive everywhere, highest at the centre."""
    if kind == "uniform" or n == 1:
        return torch.ones(n, dtype=dtype, device=device)
    pos = torch.arange(n, dtype=torch.float64, device=device)
    if kind == "gaussian":
        # sigma = 0.1 * tile, as in SUPIR's and DiffBIR's tiled samplers.
        u = (pos - (n - 1) / 2) / n
        prof = torch.exp(-(u**2) / 0.02)
    else:
        # Raised cosine that stays strictly positive at the ends so every pixel gets weight.
        prof = 0.5 - 0.5 * torch.cos(2 * math.pi * (pos + 0.5) / n)
    return prof.to(dtype)


def blend_weights(
    height: int,
    width: int,
    kind: WeightKind = "gaussian",
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Separable 2-D blend weights of shape ``(1, 1, height, width)``.

    Args:
        height (`int`): Tile height.
        width (`int`): Tile width.
        kind (`str`, *optional*, defaults to `"gaussian"`):
            `"gaussian"` (sigma = 0.1 * tile), `"cosine"` (raised cosine) or `"uniform"`.
        dtype (`torch.dtype`, *optional*): Dtype of the weights.
        device (`torch.device`, *optional*): Device of the weights.

    Returns:
        `torch.Tensor`: Strictly positive weights, largest at the tile centre.
    """
    if kind not in _WEIGHT_KINDS:
        raise ValueError(f"weight must be one of {_WEIGHT_KINDS}, got {kind!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    wy = _profile(height, kind, dtype, device)
    wx = _profile(width, kind, dtype, device)
    return (wy[:, None] * wx[None, :])[None, None]


def _as_pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, int) or v <= 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    return pair  # type: ignore[return-value]


class TileGrid:
    """Overlapping tiles of an ``H x W`` map and the smooth blend that puts them back together.

    Args:
        height (`int`): Height of the map to tile.
        width (`int`): Width of the map to tile.
        tile (`int` or `tuple[int, int]`): Tile size; clipped to the map, so a tile larger than
            the map means one tile.
        overlap (`int` or `tuple[int, int]`): Overlap between neighbouring tiles, smaller than the
            tile size.
        weight (`str`, *optional*, defaults to `"gaussian"`): Blend weight kind, see
            [`blend_weights`].
        scale (`int`, *optional*, defaults to 1): Ratio between the size of processed tiles and
            input tiles (4 for a x4 super-resolution prior, 8 for a VAE decoder).

    Example:
        ```py
        grid = TileGrid(h, w, tile=512, overlap=64, scale=4)
        out = grid.merge(model(grid.split(x)))
        ```
    """

    def __init__(
        self,
        height: int,
        width: int,
        tile: int | tuple[int, int],
        overlap: int | tuple[int, int] = 0,
        *,
        weight: WeightKind = "gaussian",
        scale: int = 1,
    ) -> None:
        if height <= 0 or width <= 0:
            raise ValueError(f"cannot tile an empty map of size {height}x{width}")
        tile_h, tile_w = _as_pair(tile, "tile")
        ov = (overlap, overlap) if isinstance(overlap, int) else tuple(overlap)
        if len(ov) != 2 or any(not isinstance(v, int) or v < 0 for v in ov):
            raise ValueError(f"overlap must be a non-negative int or pair, got {overlap!r}")
        if not isinstance(scale, int) or scale < 1:
            raise ValueError(f"scale must be a positive int, got {scale!r}")
        if weight not in _WEIGHT_KINDS:
            raise ValueError(f"weight must be one of {_WEIGHT_KINDS}, got {weight!r}")
        self.height, self.width, self.scale, self.weight = height, width, scale, weight
        self.tile_h, self.tile_w = min(tile_h, height), min(tile_w, width)
        if self.tile_h < height and ov[0] >= self.tile_h:
            raise ValueError(f"overlap {ov[0]} must be smaller than the tile height {tile_h}")
        if self.tile_w < width and ov[1] >= self.tile_w:
            raise ValueError(f"overlap {ov[1]} must be smaller than the tile width {tile_w}")
        ys = tile_starts(height, self.tile_h, self.tile_h - ov[0])
        xs = tile_starts(width, self.tile_w, self.tile_w - ov[1])
        self.tiles: list[tuple[int, int, int, int]] = [
            (y, x, self.tile_h, self.tile_w) for y in ys for x in xs
        ]
        self._weights: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.tiles)

    def __repr__(self) -> str:
        return (
            f"TileGrid({self.height}x{self.width}, tile={self.tile_h}x{self.tile_w}, "
            f"tiles={len(self)}, scale={self.scale}, weight={self.weight!r})"
        )

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """Cut ``x`` (N, C, H, W) into tiles stacked tile-major: ``(T * N, C, tile_h, tile_w)``."""
        if x.ndim != 4 or x.shape[-2:] != (self.height, self.width):
            raise ValueError(
                f"expected a (N, C, {self.height}, {self.width}) tensor, got {tuple(x.shape)}"
            )
        return torch.cat([x[..., y : y + h, x0 : x0 + w] for y, x0, h, w in self.tiles], dim=0)

    def _weight(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        if key not in self._weights:
            self._weights[key] = blend_weights(
                self.tile_h * self.scale, self.tile_w * self.scale, self.weight,
                dtype=dtype, device=device,
            )
        return self._weights[key]

    def merge(self, tiles: torch.Tensor) -> torch.Tensor:
        """Blend processed tiles ``(T * N, C, tile_h * scale, tile_w * scale)`` into one map.

        Returns:
            `torch.Tensor`: ``(N, C, H * scale, W * scale)`` in the dtype of ``tiles``.
        """
        n_tiles, s = len(self.tiles), self.scale
        th, tw = self.tile_h * s, self.tile_w * s
        if tiles.ndim != 4 or tiles.shape[0] % n_tiles or tiles.shape[-2:] != (th, tw):
            raise ValueError(
                f"expected ({n_tiles} * N, C, {th}, {tw}) tiles, got {tuple(tiles.shape)}"
            )
        if n_tiles == 1:
            return tiles
        chunks = tiles.chunk(n_tiles, dim=0)
        n, c = chunks[0].shape[:2]
        out = tiles.new_empty(n, c, self.height * s, self.width * s)
        # Pass 1: every pixel takes the value of the last tile covering it (the reference).
        for (y, x, _, _), chunk in zip(self.tiles, chunks, strict=False):
            out[..., y * s : y * s + th, x * s : x * s + tw] = chunk
        # Pass 2: weighted mean of the deviations from that reference.
        weight = self._weight(tiles.device, tiles.dtype)
        num = torch.zeros_like(out)
        den = tiles.new_zeros(1, 1, *out.shape[-2:])
        for (y, x, _, _), chunk in zip(self.tiles, chunks, strict=False):
            region = (..., slice(y * s, y * s + th), slice(x * s, x * s + tw))
            num[region] += weight * (chunk - out[region])
            den[region] += weight
        return out + num / den


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int | tuple[int, int] | None,
    overlap: int | tuple[int, int] = 32,
    *,
    scale: int = 1,
    weight: WeightKind = "gaussian",
    max_batch: int = 4,
) -> torch.Tensor:
    """Apply ``fn`` to overlapping tiles of ``x`` and blend the results.

    Args:
        fn (`Callable`): Maps a ``(B, C, h, w)`` batch to ``(B, C', h * scale, w * scale)``.
        x (`torch.Tensor`): Input of shape ``(N, C, H, W)``.
        tile (`int`, `tuple[int, int]` or `None`): Tile size; `None`, or a tile covering the
            whole input, calls ``fn`` once on ``x``.
        overlap (`int` or `tuple[int, int]`, *optional*, defaults to 32): Tile overlap, clipped
            to a quarter of the tile when larger than half of it.
        scale (`int`, *optional*, defaults to 1): Output/input size ratio of ``fn``.
        weight (`str`, *optional*, defaults to `"gaussian"`): Blend weight kind.
        max_batch (`int`, *optional*, defaults to 4): Most images (tiles times batch items)
            passed to ``fn`` at once; bounds peak memory while keeping the device busy.

    Returns:
        `torch.Tensor`: ``(N, C', H * scale, W * scale)``.
    """
    if x.ndim != 4:
        raise ValueError(f"x must be a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    height, width = x.shape[-2:]
    if tile is None:
        return fn(x)
    tile_h, tile_w = _as_pair(tile, "tile")
    if tile_h >= height and tile_w >= width:
        return fn(x)
    ov_h, ov_w = (overlap, overlap) if isinstance(overlap, int) else overlap
    ov_h = ov_h if ov_h * 2 <= tile_h else tile_h // 4
    ov_w = ov_w if ov_w * 2 <= tile_w else tile_w // 4
    grid = TileGrid(height, width, (tile_h, tile_w), (ov_h, ov_w), weight=weight, scale=scale)
    tiles = grid.split(x)
    step = max(1, min(max_batch, tiles.shape[0]))
    outputs = [fn(tiles[i : i + step]) for i in range(0, tiles.shape[0], step)]
    return grid.merge(torch.cat(outputs, dim=0))
