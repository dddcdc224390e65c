"""VAE encode/decode between [0, 1] images and scaled latents, tiled for large images.

Tiles overlap and are blended with smooth weights through [`~raim_diffusion.tiling.TileGrid`].
A VAE normalises with GroupNorm over the whole image; a tile alone would use its own statistics
and come out in a different tone from its neighbours. So a tiled pass runs twice: the
first pass pools every GroupNorm's per-group sums over all tiles into image-wide statistics, the
second normalises every tile with them. The pooled statistics are those of the first pass's
(tile-normalised) features, a close approximation of the untiled ones at twice the cost; SUPIR
synchronises exact statistics layer by layer instead, at the cost of a task queue holding every
tile's activations. Attention in the mid block still sees one tile at a time.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from raim_diffusion.tiling import TileGrid

# Rough activation memory of an SD/SDXL VAE pass per output pixel (fp32, measured order of
# magnitude: 128-channel full-resolution feature maps, a few alive at once).
_BYTES_PER_PIXEL = 3 * 1024


def vae_scale_factor(vae: torch.nn.Module) -> int:
    """Spatial down-sampling factor of a diffusers ``AutoencoderKL`` (8 for SD and SDXL)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def auto_vae_tile(height: int, width: int, device: torch.device | str) -> int | None:
    """Pixel tile size that fits in free device memory, or ``None`` when no tiling is needed.

    On the CPU images up to 2048 x 2048 run untiled (host memory is plentiful but slow to fill);
    on CUDA half of the free memory is budgeted.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free // 2
    else:
        budget = 2048 * 2048 * _BYTES_PER_PIXEL
    if height * width * _BYTES_PER_PIXEL <= budget:
        return None
    side = int(math.sqrt(budget / _BYTES_PER_PIXEL)) // 64 * 64
    return max(256, side)


class _GroupNormStats:
    """Pool GroupNorm statistics over all tiles in one pass, impose them in the next.

    While recording, each GroupNorm call adds its per-group sums (per batch item; tiles are
    stacked tile-major, so tile ``i`` belongs to item ``i % batch``) to that layer's pool.
    While applying, every tile is normalised with the pooled image-wide mean and variance.
    """

    def __init__(self, module: torch.nn.Module, batch: int) -> None:
        self.batch = batch
        self.recording = True
        self._sums: list[torch.Tensor] = []  # per layer: (batch, groups, 3) count, sum, sum sq
        self._stats: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._calls = 0
        norms = [m for m in module.modules() if isinstance(m, torch.nn.GroupNorm)]
        self._handles = [n.register_forward_hook(self._hook) for n in norms]
        # Every pass of the whole module walks the GroupNorms in the same order.
        self._handles.append(module.register_forward_pre_hook(self._reset))

    def _reset(self, module: torch.nn.Module, inputs: tuple) -> None:
        self._calls = 0

    def apply(self) -> None:
        """Switch from recording to imposing the pooled statistics."""
        self.recording = False
        for sums in self._sums:
            count, total, total_sq = sums.unbind(-1)
            mean = total / count
            self._stats.append((mean, (total_sq / count - mean**2).clamp_min(0)))

    def _hook(self, norm: torch.nn.GroupNorm, inputs: tuple, output: torch.Tensor):
        x = inputs[0]
        n, c = x.shape[:2]
        layer, self._calls = self._calls, self._calls + 1
        grouped = x.double().reshape(n, norm.num_groups, -1)
        owner = torch.arange(n, device=x.device) % self.batch
        if self.recording:
            sums = torch.stack(
                [torch.full_like(grouped[..., 0], grouped.shape[-1]), grouped.sum(-1),
                 (grouped**2).sum(-1)], dim=-1,
            )
            pooled = sums.new_zeros(self.batch, *sums.shape[1:]).index_add_(0, owner, sums)
            if layer == len(self._sums):
                self._sums.append(pooled)
            else:
                self._sums[layer] += pooled
            return None
        mean, var = self._stats[layer]
        mean, var = mean[owner, :, None], var[owner, :, None]
        out = ((grouped - mean) * torch.rsqrt(var + norm.eps)).reshape(x.shape).to(output.dtype)
        if norm.affine:
            shape = (1, c) + (1,) * (x.ndim - 2)
            out = out * norm.weight.view(shape) + norm.bias.view(shape)
        return out

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _tiled_pass(module: torch.nn.Module, fn, tiles: torch.Tensor, batch: int, tile_batch: int):
    """Run ``fn`` over ``tiles`` twice: once to pool ``module``'s GroupNorm statistics over the
    whole image, once normalising every tile with them."""
    stats = _GroupNormStats(module, batch)
    # Chunks of whole multiples of the batch keep "tile i belongs to item i % batch" true inside
    # every chunk of the tile-major stack.
    step = max(batch, tile_batch // batch * batch)
    try:
        for chunk in tiles.split(step):
            fn(chunk)
        stats.apply()
        return torch.cat([fn(chunk) for chunk in tiles.split(step)], dim=0)
    finally:
        stats.close()


@contextlib.contextmanager
def _upcast_if_needed(vae: torch.nn.Module) -> Iterator[torch.dtype]:
    """Run an fp16 VAE that overflows in half precision (SDXL's, ``force_upcast``) in fp32."""
    dtype = vae.dtype
    upcast = dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        yield torch.float32 if upcast else dtype
    finally:
        if upcast:
            vae.to(dtype)


def _check_size(x: torch.Tensor, factor: int, name: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{name} must be NCHW, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(
            f"{name} size {h}x{w} must be a multiple of the VAE factor {factor}; pad it first"
        )


def encode_latents(
    vae: torch.nn.Module,
    x: torch.Tensor,
    *,
    tile: int | None = None,
    overlap: int = 64,
    sample: bool = False,
    generator: torch.Generator | None = None,
    tile_batch: int = 4,
) -> torch.Tensor:
    """Encode ``x`` (NCHW in [0, 1]) into scaled latents.

    Args:
        vae (`AutoencoderKL`): The pipeline's VAE.
        x (`torch.Tensor`): Images whose sides are multiples of the VAE factor.
        tile (`int`, *optional*): Pixel tile size (rounded down to the VAE factor); `None` runs
            untiled.
        overlap (`int`, *optional*, defaults to 64): Pixel overlap between tiles.
        sample (`bool`, *optional*, defaults to `False`): Sample the posterior with
            ``generator`` instead of taking its mean (the mean is seed-independent).
        generator (`torch.Generator`, *optional*): Randomness for ``sample=True``.
        tile_batch (`int`, *optional*, defaults to 4): Tiles encoded together.

    Returns:
        `torch.Tensor`: ``(latent - shift_factor) * scaling_factor``, in the VAE's dtype.
    """
    factor = vae_scale_factor(vae)
    _check_size(x, factor, "x")
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    scaling = vae.config.scaling_factor

    with _upcast_if_needed(vae) as dtype:

        def encode(pixels: torch.Tensor) -> torch.Tensor:
            dist = vae.encode(pixels.to(vae.device, dtype) * 2 - 1).latent_dist
            return dist.sample(generator) if sample else dist.mean

        h, w = x.shape[-2:]
        if tile is None or (tile >= h and tile >= w):
            z = encode(x)
        else:
            t, o = max(tile // factor, 1), max(overlap // factor, 0)
            latent_grid = TileGrid(h // factor, w // factor, t, min(o, t - 1))
            pixel_grid = TileGrid(h, w, t * factor, min(o, t - 1) * factor)
            tiles = pixel_grid.split(x)
            z = latent_grid.merge(_tiled_pass(vae.encoder, encode, tiles, len(x), tile_batch))
    return ((z - shift) * scaling).to(vae.dtype)


def decode_latents(
    vae: torch.nn.Module,
    z: torch.Tensor,
    *,
    tile: int | None = None,
    overlap: int = 8,
    tile_batch: int = 4,
) -> torch.Tensor:
    """Decode scaled latents into images in [0, 1] (float32).

    Args:
        vae (`AutoencoderKL`): The pipeline's VAE.
        z (`torch.Tensor`): Scaled latents ``(N, C, h, w)``.
        tile (`int`, *optional*): Latent tile size; `None` runs untiled.
        overlap (`int`, *optional*, defaults to 8): Latent overlap between tiles.
        tile_batch (`int`, *optional*, defaults to 4): Tiles decoded together.
    """
    if z.ndim != 4:
        raise ValueError(f"z must be NCHW latents, got shape {tuple(z.shape)}")
    factor = vae_scale_factor(vae)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    z = z / vae.config.scaling_factor + shift
    with _upcast_if_needed(vae) as dtype:

        def decode(latents: torch.Tensor) -> torch.Tensor:
            return vae.decode(latents.to(vae.device, dtype)).sample.float()

        h, w = z.shape[-2:]
        if tile is None or (tile >= h and tile >= w):
            x = decode(z)
        else:
            grid = TileGrid(h, w, tile, min(overlap, tile - 1), scale=factor)
            x = grid.merge(_tiled_pass(vae.decoder, decode, grid.split(z), len(z), tile_batch))
    return ((x + 1) / 2).clamp_(0, 1)
