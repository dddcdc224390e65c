"""FusionNet: the stage-4 network that re-restores masked regions seamlessly.

A 1x SRFormer (spec section 2.3) reads ``[LQ upsampled | mask | composite]`` (7 channels), where
the composite is the generated image outside the mask and the upsampled low-quality input inside
it, and predicts a residual that is added to the composite. Away from the mask the best answer is
a zero residual, so the generated detail survives; inside it the network restores the region from
the LQ input and blends it into its surroundings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import logging
from torch import nn

from ..tiling import tiled_apply
from .srformer import RGB_MEAN, SRFormer

logger = logging.get_logger(__name__)

#: Architecture presets. ``light`` / ``base`` are the SRFormer-light / SRFormer bodies of the
#: spec (about 0.851M and 10.15M parameters as 7 -> 3 fusion nets); ``tiny`` is for tests and CPU
#: demos (two blocks, so one of them uses shifted windows).
PRESETS: dict[str, dict[str, Any]] = {
    "light": {"embed_dim": 60, "depths": (6, 6, 6, 6), "num_heads": 6, "window_size": 16},
    "base": {"embed_dim": 180, "depths": (6, 6, 6, 6, 6, 6), "num_heads": 6, "window_size": 24},
    "tiny": {"embed_dim": 16, "depths": (2,), "num_heads": 2, "window_size": 8},
    # Xhs-IAG's fusion network as the NTIRE 2024 RAIM report gives it (trained on 144 px pairs).
    "xhs-iag": {"embed_dim": 360, "depths": (6, 6, 6, 6, 6), "num_heads": 6, "window_size": 24,
                "mlp_ratio": 3.0, "img_size": 144},
}

_ARCH_DEFAULTS: dict[str, Any] = {
    "embed_dim": 60,
    "depths": (6, 6, 6, 6),
    "num_heads": 6,
    "window_size": 16,
    "mlp_ratio": 2.0,
    "img_size": 64,
    "drop_path_rate": 0.1,
    "resi_connection": "1conv",
    "patch_norm": True,
    "subtract_mean": True,
    "zero_init_residual": True,
}


def make_composite(
    generated: torch.Tensor, lq_up: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Composite the generated image (outside the mask) with the upsampled LQ input (inside).

    Args:
        generated (`torch.Tensor`): ``(N, 3, H, W)`` in [0, 1].
        lq_up (`torch.Tensor`): ``(N, 3, H, W)`` low-quality input resized to ``H x W``.
        mask (`torch.Tensor`): ``(N or 1, 1, H, W)`` in [0, 1], 1 = replace.

    Returns:
        `torch.Tensor`: ``(N, 3, H, W)``; exactly ``generated`` where the mask is 0 and exactly
        ``lq_up`` where it is 1.
    """
    _check_triplet(generated, lq_up, mask)
    mask = mask.to(generated.dtype)
    # (1 - m) * g + m * l is exact at m in {0, 1}; g + m * (l - g) is not.
    return (1 - mask) * generated + mask * lq_up


def _check_triplet(image: torch.Tensor, lq_up: torch.Tensor, mask: torch.Tensor) -> None:
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got {tuple(image.shape)}")
    if lq_up.shape != image.shape:
        raise ValueError(
            f"lq_up {tuple(lq_up.shape)} must match the image {tuple(image.shape)}; "
            "resize the LQ input to the output size first"
        )
    if (
        mask.ndim != 4
        or mask.shape[1] != 1
        or mask.shape[-2:] != image.shape[-2:]
        or mask.shape[0] not in (1, image.shape[0])
    ):
        raise ValueError(
            f"mask must be (N or 1, 1, H, W) = (.., 1, {image.shape[2]}, {image.shape[3]}), "
            f"got {tuple(mask.shape)}"
        )


class FusionNet(ModelMixin, ConfigMixin):
    """1x SRFormer that fuses a low-quality input into the masked regions of a generated image.

    Input channels: ``[lq_up (3) | mask (1) | composite (3)]``; output: ``composite + residual``.

    Args:
        preset (`str`, *optional*): ``"light"``, ``"base"`` or ``"tiny"``; explicit arguments
            override the preset. Without a preset the ``light`` architecture is used. The saved
            config always holds the resolved values, so ``from_pretrained`` needs no preset table.
        embed_dim (`int`, *optional*): Feature channels (a multiple of 4 and of ``num_heads``).
        depths (`Sequence[int]`, *optional*): Blocks per residual group.
        num_heads (`int`, *optional*): Attention heads in every group.
        window_size (`int`, *optional*): Window side (a multiple of 4).
        mlp_ratio (`float`, *optional*): ConvFFN expansion (default 2).
        img_size (`int`, *optional*): Training patch size; its shift mask is precomputed.
        drop_path_rate (`float`, *optional*): Stochastic depth (default 0.1).
        resi_connection (`str`, *optional*): ``"1conv"`` (default) or ``"3conv"``.
        patch_norm (`bool`, *optional*): LayerNorm after the embedding (default True).
        subtract_mean (`bool`, *optional*): Subtract the DIV2K RGB mean from both RGB triplets
            (and add it back to the output); default True.
        zero_init_residual (`bool`, *optional*): Start the residual head at zero so the untrained
            network returns the composite (default True).

    Example:
        ```py
        net = FusionNet.from_preset("light")
        out = net.restore(lq_up, mask, generated, tile=512)  # (N, 3, H, W) in [0, 1]
        ```
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        preset: str | None = None,
        embed_dim: int | None = None,
        depths: Sequence[int] | None = None,
        num_heads: int | None = None,
        window_size: int | None = None,
        mlp_ratio: float | None = None,
        img_size: int | None = None,
        drop_path_rate: float | None = None,
        resi_connection: str | None = None,
        patch_norm: bool | None = None,
        subtract_mean: bool | None = None,
        zero_init_residual: bool | None = None,
    ) -> None:
        super().__init__()
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)} or None, got {preset!r}")
        arch = {**_ARCH_DEFAULTS, **PRESETS.get(preset or "light", {})}
        given = {
            "embed_dim": embed_dim,
            "depths": depths,
            "num_heads": num_heads,
            "window_size": window_size,
            "mlp_ratio": mlp_ratio,
            "img_size": img_size,
            "drop_path_rate": drop_path_rate,
            "resi_connection": resi_connection,
            "patch_norm": patch_norm,
            "subtract_mean": subtract_mean,
            "zero_init_residual": zero_init_residual,
        }
        arch.update({k: v for k, v in given.items() if v is not None})
        arch["depths"] = [int(dep) for dep in arch["depths"]]
        if not isinstance(arch["num_heads"], int):
            raise ValueError(f"num_heads must be an int, got {arch['num_heads']!r}")
        # Store resolved values so the config is self-contained (from_config / from_pretrained
        # rebuild the same network without the preset table); none of them is a default now.
        self.register_to_config(preset=None, _use_default_values=[], **arch)

        mean = RGB_MEAN if arch["subtract_mean"] else (0.0, 0.0, 0.0)
        self.srformer = SRFormer(
            img_size=arch["img_size"],
            in_chans=7,
            out_chans=3,
            embed_dim=arch["embed_dim"],
            depths=arch["depths"],
            num_heads=arch["num_heads"],
            window_size=arch["window_size"],
            mlp_ratio=arch["mlp_ratio"],
            drop_path_rate=arch["drop_path_rate"],
            patch_norm=arch["patch_norm"],
            upscale=1,
            upsampler="",
            resi_connection=arch["resi_connection"],
            img_mean=(*mean, 0.0, *mean),
            out_mean=mean,
        )
        if arch["zero_init_residual"]:
            nn.init.zeros_(self.srformer.conv_last.weight)
            nn.init.zeros_(self.srformer.conv_last.bias)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> FusionNet:
        """Build a randomly initialised FusionNet from a preset (``light``, ``base``, ``tiny``)."""
        return cls(preset=name, **overrides)

    @property
    def window_size(self) -> int:
        return self.config.window_size

    def forward(
        self, lq: torch.Tensor, mask: torch.Tensor, composite: torch.Tensor
    ) -> torch.Tensor:
        """Predict the fused image.

        Args:
            lq (`torch.Tensor`): ``(N, 3, H, W)`` LQ input upsampled to the output size, [0, 1].
            mask (`torch.Tensor`): ``(N or 1, 1, H, W)`` in [0, 1], 1 = re-restore.
            composite (`torch.Tensor`): ``(N, 3, H, W)`` from [`make_composite`].

        Returns:
            `torch.Tensor`: ``(N, 3, H, W)`` = ``composite`` + predicted residual (not clamped).
        """
        _check_triplet(composite, lq, mask)
        mask = mask.to(composite.dtype).expand(composite.shape[0], -1, -1, -1)
        x = torch.cat([lq, mask, composite], dim=1)  # (N, 7, H, W)
        return self.srformer(x, skip=composite)

    def fuse_images(
        self,
        generated: torch.Tensor,
        prior: torch.Tensor,
        lq_up: torch.Tensor,
        mask: torch.Tensor,
        *,
        tile: int | None = None,
        overlap: int = 32,
    ) -> torch.Tensor:
        """The fusion-architecture interface (see `raim_diffusion.fusion.FUSION_ARCHITECTURES`):
        this network re-restores the masked regions from ``lq_up`` and does not use ``prior``."""
        return self.restore(lq_up, mask, generated, tile=tile, overlap=overlap)

    @torch.no_grad()
    def restore(
        self,
        lq_up: torch.Tensor,
        mask: torch.Tensor,
        generated: torch.Tensor,
        tile: int | None = None,
        overlap: int = 32,
        max_batch: int = 4,
    ) -> torch.Tensor:
        """Inference: composite, run the network (tiled for large images), clamp to [0, 1].

        Args:
            lq_up (`torch.Tensor`): ``(N, 3, H, W)`` LQ input upsampled to the output size.
            mask (`torch.Tensor`): ``(N or 1, 1, H, W)`` artifact mask, 1 = re-restore.
            generated (`torch.Tensor`): ``(N, 3, H, W)`` generated image.
            tile (`int`, *optional*): Tile side; `None` (or a tile covering the image) runs once.
            overlap (`int`, *optional*, defaults to 32): Tile overlap in pixels.
            max_batch (`int`, *optional*, defaults to 4): Tiles per forward pass.

        Returns:
            `torch.Tensor`: ``(N, 3, H, W)`` fused image in [0, 1], dtype of ``generated``.
        """
        _check_triplet(generated, lq_up, mask)
        if tile is not None and (not isinstance(tile, int) or tile <= 0):
            raise ValueError(f"tile must be a positive int or None, got {tile!r}")
        param = next(self.parameters())
        out_dtype = generated.dtype
        lq_up, generated = (t.to(param.device, param.dtype) for t in (lq_up, generated))
        mask = mask.to(param.device, param.dtype).expand(generated.shape[0], -1, -1, -1)
        composite = make_composite(generated, lq_up, mask)
        x = torch.cat([lq_up, mask, composite], dim=1)  # (N, 7, H, W)

        def run(batch: torch.Tensor) -> torch.Tensor:
            return self.srformer(batch, skip=batch[:, 4:])

        out = tiled_apply(run, x, tile, overlap, max_batch=max_batch)
        return out.clamp_(0, 1).to(out_dtype)
