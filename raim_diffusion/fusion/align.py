"""AlignFusionNet: So Elegant's prior-guided deformable alignment, a stage-4 fusion architecture.

So Elegant (NTIRE 2024 "Restore Any Image Model in the Wild", rank 3) ends with a fidelity
stage in which "the contextual information from I_s1 guides the refined image I_s2 ... deformable
convolution is employed to warp the details in I_s2 to match the fidelity of I_s1", with the
artifact mask M as an additional condition (NTIRE 2024 RAIM challenge report, arXiv:2405.09923).

The network follows the pyramid, cascading and deformable (PCD) alignment of EDVR (Wang et al.,
"EDVR: Video Restoration with Enhanced Deformable Convolutional Networks", CVPRW 2019,
https://github.com/xinntao/EDVR) with modulated deformable convolutions (DCNv2, Zhu et al.,
"Deformable ConvNets v2", CVPR 2019) from `torchvision.ops.deform_conv2d`:

1. two feature pyramids, one of I_s2 and one of the condition ``[I_s1 | I_s2 | M (| LQ)]``;
2. from the coarsest level to the finest, offsets and modulation masks are predicted from both
   pyramids (and the upsampled offset features of the coarser level), and the I_s2 features are
   warped by a modulated deformable convolution;
3. the aligned I_s2 features and the condition features are decoded into a residual added to
   I_s2 (the last layer starts at zero, so the untrained network returns I_s2).

With ``paste_back`` (the default) the output is I_s2 bit for bit outside a feathered band around
the mask (`raim_diffusion.fusion.blend.band_weight`), so nothing the detector passed is touched.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import logging
from torch import nn
from torchvision.ops import deform_conv2d

from ..tiling import tiled_apply
from .blend import band_weight

logger = logging.get_logger(__name__)

__all__ = ["ALIGN_PRESETS", "AlignFusionNet", "DeformableAlignment", "ModulatedDeformConv2d"]

#: Architecture presets. ``base`` is sized for So Elegant's recipe (batch 2 of 1024 px patches on
#: one GPU): 64 channels, a three-level pyramid and 8 deformable groups, as EDVR's PCD module;
#: ``tiny`` is for tests and CPU demos.
ALIGN_PRESETS: dict[str, dict[str, Any]] = {
    "base": {
        "channels": 64,
        "levels": 3,
        "encoder_blocks": 2,
        "decoder_blocks": 4,
        "deformable_groups": 8,
    },
    "tiny": {
        "channels": 16,
        "levels": 2,
        "encoder_blocks": 1,
        "decoder_blocks": 1,
        "deformable_groups": 2,
    },
}

_ARCH_DEFAULTS: dict[str, Any] = {
    **ALIGN_PRESETS["base"],
    "kernel_size": 3,
    "lq_input": False,
    "paste_back": True,
    "feather": 16,
}


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.1)


class _ResBlock(nn.Module):
    """conv-LReLU-conv with identity skip and no normalisation (EDVR's ``ResidualBlockNoBN``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(_lrelu(self.conv1(x)))


class _Pyramid(nn.Module):
    """Features at ``levels`` scales (1, 1/2, 1/4, ...): a conv and residual blocks per level."""

    def __init__(self, in_channels: int, channels: int, levels: int, blocks: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Conv2d(in_channels if i == 0 else channels, channels, 3, stride=1 if i == 0 else 2,
                      padding=1)
            for i in range(levels)
        )
        self.bodies = nn.ModuleList(
            nn.Sequential(*(_ResBlock(channels) for _ in range(blocks))) for _ in range(levels)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for head, body in zip(self.heads, self.bodies, strict=True):
            x = body(_lrelu(head(x)))
            feats.append(x)
        return feats


class ModulatedDeformConv2d(nn.Module):
    """A modulated deformable convolution (DCNv2) with explicit offsets and modulation.

    A thin module around `torchvision.ops.deform_conv2d` (stride 1, "same" padding). With zero
    offsets and a modulation of one it is exactly the plain convolution ``F.conv2d(x, weight,
    bias, padding=kernel_size // 2)``.

    Args:
        in_channels (`int`): Input channels.
        out_channels (`int`): Output channels.
        kernel_size (`int`, *optional*, defaults to 3): Odd kernel side.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(
        self, x: torch.Tensor, offset: torch.Tensor, modulation: torch.Tensor
    ) -> torch.Tensor:
        """Apply the convolution.

        Args:
            x (`torch.Tensor`): ``(N, C_in, H, W)`` features.
            offset (`torch.Tensor`): ``(N, 2 * G * k * k, H, W)`` sampling offsets (y, x pairs per
                kernel tap, as `torchvision.ops.deform_conv2d` lays them out) of ``G`` groups.
            modulation (`torch.Tensor`): ``(N, G * k * k, H, W)`` per-tap weights.

        Returns:
            `torch.Tensor`: ``(N, C_out, H, W)``.
        """
        pad = self.kernel_size // 2
        return deform_conv2d(
            x, offset, self.weight, self.bias, padding=(pad, pad), mask=modulation
        )


class DeformableAlignment(nn.Module):
    """Offsets and modulation predicted from condition features, then a DCNv2 on the features.

    As BasicSR's ``DCNv2Pack`` (EDVR), except that the modulation is ``2 * sigmoid``, so the
    zero-initialised offset head makes the layer exactly a plain convolution at the start of
    training (offsets 0, modulation 1) and alignment is learnt as a deviation from it.

    Args:
        channels (`int`): Feature channels (input, condition and output).
        deformable_groups (`int`): Offset groups; must divide ``channels``.
        kernel_size (`int`, *optional*, defaults to 3): Kernel side.
    """

    def __init__(self, channels: int, deformable_groups: int, kernel_size: int = 3) -> None:
        super().__init__()
        if channels % deformable_groups:
            raise ValueError(
                f"deformable_groups={deformable_groups} must divide channels={channels}"
            )
        taps = deformable_groups * kernel_size * kernel_size
        self.taps = taps
        self.conv_offset = nn.Conv2d(channels, 3 * taps, 3, padding=1)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)
        self.dcn = ModulatedDeformConv2d(channels, channels, kernel_size)

    def offsets(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(offset, modulation)`` predicted from the condition features ``cond``."""
        out = self.conv_offset(cond)
        offset, logits = out[:, : 2 * self.taps], out[:, 2 * self.taps :]
        return offset, 2 * torch.sigmoid(logits)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        offset, modulation = self.offsets(cond)
        return self.dcn(x, offset, modulation)


class AlignFusionNet(ModelMixin, ConfigMixin):
    """Prior-guided deformable alignment (So Elegant's fidelity stage) as a fusion network.

    Inputs: the generated image I_s2, the prior's image I_s1, the artifact mask M and optionally
    the LQ input; output: the fused image (I_s2 plus a predicted residual, and with ``paste_back``
    exactly I_s2 outside a ``feather``-pixel band around M).

    Args:
        preset (`str`, *optional*): ``"base"`` (the default, for 1024 px patches) or ``"tiny"``;
            explicit arguments override the preset. The saved config holds the resolved values,
            so ``from_pretrained`` needs no preset table.
        channels (`int`, *optional*): Feature channels (a multiple of ``deformable_groups``).
        levels (`int`, *optional*): Pyramid levels (1 = full resolution only).
        encoder_blocks (`int`, *optional*): Residual blocks per pyramid level.
        decoder_blocks (`int`, *optional*): Residual blocks of the decoder.
        deformable_groups (`int`, *optional*): Offset groups of every deformable convolution.
        kernel_size (`int`, *optional*): Kernel side of the deformable convolutions (odd).
        lq_input (`bool`, *optional*): Also condition on the LQ input (resized to the output
            size); then ``lq`` is required. Default False (So Elegant conditions on I_s1, I_s2, M).
        paste_back (`bool`, *optional*): Keep I_s2 bit for bit outside the band around the mask
            (default True).
        feather (`int`, *optional*): Band width in pixels (default 16).

    Example:
        ```py
        net = AlignFusionNet.from_preset("base")
        fused = net(generated, prior, mask)  # (N, 3, H, W) in [0, 1]
        fused = net.fuse_images(generated, prior, lq_up, mask, tile=512)  # inference, tiled
        ```
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        preset: str | None = None,
        channels: int | None = None,
        levels: int | None = None,
        encoder_blocks: int | None = None,
        decoder_blocks: int | None = None,
        deformable_groups: int | None = None,
        kernel_size: int | None = None,
        lq_input: bool | None = None,
        paste_back: bool | None = None,
        feather: int | None = None,
    ) -> None:
        super().__init__()
        if preset is not None and preset not in ALIGN_PRESETS:
            raise ValueError(
                f"preset must be one of {sorted(ALIGN_PRESETS)} or None, got {preset!r}"
            )
        arch = {**_ARCH_DEFAULTS, **ALIGN_PRESETS.get(preset or "base", {})}
        given = {
            "channels": channels,
            "levels": levels,
            "encoder_blocks": encoder_blocks,
            "decoder_blocks": decoder_blocks,
            "deformable_groups": deformable_groups,
            "kernel_size": kernel_size,
            "lq_input": lq_input,
            "paste_back": paste_back,
            "feather": feather,
        }
        arch.update({k: v for k, v in given.items() if v is not None})
        for key in ("channels", "levels", "deformable_groups", "kernel_size"):
            if not isinstance(arch[key], int) or arch[key] < 1:
                raise ValueError(f"{key} must be a positive int, got {arch[key]!r}")
        for key in ("encoder_blocks", "decoder_blocks", "feather"):
            if not isinstance(arch[key], int) or arch[key] < 0:
                raise ValueError(f"{key} must be a non-negative int, got {arch[key]!r}")
        # Resolved values make the config self-contained (see FusionNet).
        self.register_to_config(preset=None, _use_default_values=[], **arch)

        c, levels = arch["channels"], arch["levels"]
        cond_in = 7 + (3 if arch["lq_input"] else 0)
        self.image_pyramid = _Pyramid(3, c, levels, arch["encoder_blocks"])
        self.cond_pyramid = _Pyramid(cond_in, c, levels, arch["encoder_blocks"])
        # Offset features per level: from [I_s2 features | condition features] (+ the coarser
        # level's offset features, upsampled), as EDVR's PCD cascade.
        self.offset_in = nn.ModuleList(nn.Conv2d(2 * c, c, 3, padding=1) for _ in range(levels))
        self.offset_merge = nn.ModuleList(
            nn.Conv2d(2 * c, c, 3, padding=1) for _ in range(levels - 1)
        )
        self.align = nn.ModuleList(
            DeformableAlignment(c, arch["deformable_groups"], arch["kernel_size"])
            for _ in range(levels)
        )
        self.feat_merge = nn.ModuleList(
            nn.Conv2d(2 * c, c, 3, padding=1) for _ in range(levels - 1)
        )
        self.decoder_in = nn.Conv2d(2 * c, c, 3, padding=1)
        self.decoder = nn.Sequential(*(_ResBlock(c) for _ in range(arch["decoder_blocks"])))
        self.conv_last = nn.Conv2d(c, 3, 3, padding=1)
        nn.init.zeros_(self.conv_last.weight)
        nn.init.zeros_(self.conv_last.bias)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> AlignFusionNet:
        """Build a randomly initialised network from a preset (``base``, ``tiny``)."""
        return cls(preset=name, **overrides)

    @property
    def multiple(self) -> int:
        """Inputs are padded to a multiple of this (the pyramid halves ``levels - 1`` times)."""
        return 2 ** (self.config.levels - 1)

    # ---------------------------------------------------------------- checks

    def _check(
        self,
        generated: torch.Tensor,
        prior: torch.Tensor | None,
        mask: torch.Tensor,
        lq: torch.Tensor | None,
    ) -> None:
        if generated.ndim != 4 or generated.shape[1] != 3:
            raise ValueError(
                f"generated must be a (N, 3, H, W) tensor, got {tuple(generated.shape)}"
            )
        if prior is None:
            raise ValueError(
                "prior is None: AlignFusionNet aligns the generated image to the prior's image "
                "I_s1, so the pipeline's prior stage (or a prior image) is required"
            )
        if prior.shape != generated.shape:
            raise ValueError(
                f"prior {tuple(prior.shape)} must match generated {tuple(generated.shape)}"
            )
        if (
            mask.ndim != 4
            or mask.shape[1] != 1
            or mask.shape[-2:] != generated.shape[-2:]
            or mask.shape[0] not in (1, generated.shape[0])
        ):
            raise ValueError(
                f"mask must be (N or 1, 1, H, W) = (.., 1, {generated.shape[2]}, "
                f"{generated.shape[3]}), got {tuple(mask.shape)}"
            )
        if self.config.lq_input:
            if lq is None:
                raise ValueError("lq is required: this network was built with lq_input=True")
            if lq.shape != generated.shape:
                raise ValueError(
                    f"lq {tuple(lq.shape)} must match generated {tuple(generated.shape)}; "
                    "resize the LQ input to the output size first"
                )

    # ---------------------------------------------------------------- network

    def _inputs(
        self,
        generated: torch.Tensor,
        prior: torch.Tensor,
        mask: torch.Tensor,
        lq: torch.Tensor | None,
    ) -> torch.Tensor:
        """``[I_s2 | I_s1 | M (| LQ)]`` on the parameters' device and dtype."""
        param = self.conv_last.weight
        parts = [generated, prior, mask.expand(generated.shape[0], -1, -1, -1)]
        if self.config.lq_input:
            parts.append(lq)
        return torch.cat([t.to(param.device, param.dtype) for t in parts], dim=1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The network without paste-back: ``(N, 7 or 10, H, W)`` stacked inputs (see
        `AlignFusionNet.forward`) to the unclamped ``I_s2 + residual``, ``(N, 3, H, W)``."""
        h, w = x.shape[-2:]
        m = self.multiple
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        generated = x[:, :3]
        cond = torch.cat([generated, x[:, 3:]], dim=1)  # [I_s2 | I_s1 | M (| LQ)]
        feats = self.image_pyramid(generated)
        conds = self.cond_pyramid(cond)
        offset_feat: torch.Tensor | None = None
        aligned: torch.Tensor | None = None
        for level in reversed(range(self.config.levels)):
            off = _lrelu(self.offset_in[level](torch.cat([feats[level], conds[level]], dim=1)))
            if offset_feat is not None:
                # Offsets double with the resolution (EDVR's ``upsampled_offset * 2``).
                up = 2 * F.interpolate(offset_feat, size=off.shape[-2:], mode="bilinear",
                                       align_corners=False)
                off = _lrelu(self.offset_merge[level](torch.cat([off, up], dim=1)))
            feat = self.align[level](feats[level], off)
            if aligned is not None:
                up = F.interpolate(aligned, size=feat.shape[-2:], mode="bilinear",
                                   align_corners=False)
                feat = self.feat_merge[level](torch.cat([feat, up], dim=1))
            feat = _lrelu(feat)
            offset_feat, aligned = off, feat
        y = _lrelu(self.decoder_in(torch.cat([aligned, conds[0]], dim=1)))
        out = generated + self.conv_last(self.decoder(y))
        return out[..., :h, :w]

    def paste(
        self, fused: torch.Tensor, generated: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Keep ``generated`` exactly outside a ``feather`` band around ``mask > 0``."""
        weight = band_weight(mask > 0, self.config.feather).to(fused.dtype)
        weight = weight.expand(fused.shape[0], -1, -1, -1)
        blended = generated + weight * (fused - generated)
        # torch.where, not the arithmetic alone: 0 * inf or rounding must not leak outside.
        return torch.where(weight > 0, blended, generated)

    def forward(
        self,
        generated: torch.Tensor,
        prior: torch.Tensor,
        mask: torch.Tensor,
        lq: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fuse (differentiable; the training forward).

        Args:
            generated (`torch.Tensor`): ``(N, 3, H, W)`` generated image I_s2 in [0, 1].
            prior (`torch.Tensor`): ``(N, 3, H, W)`` prior's image I_s1 in [0, 1].
            mask (`torch.Tensor`): ``(N or 1, 1, H, W)`` artifact mask M in [0, 1].
            lq (`torch.Tensor`, *optional*): ``(N, 3, H, W)`` LQ input resized to the output size;
                required with ``lq_input=True``, not used otherwise.

        Returns:
            `torch.Tensor`: ``(N, 3, H, W)`` fused image in [0, 1] (parameters' dtype); with
            ``paste_back``, exactly ``generated`` outside the band around the mask.
        """
        self._check(generated, prior, mask, lq)
        x = self._inputs(generated, prior, mask, lq)
        fused = self.predict(x).clamp(0, 1)
        if not self.config.paste_back:
            return fused
        return self.paste(fused, x[:, :3], x[:, 6:7])

    def fuse_images(
        self,
        generated: torch.Tensor,
        prior: torch.Tensor | None,
        lq_up: torch.Tensor | None,
        mask: torch.Tensor,
        *,
        tile: int | None = None,
        overlap: int = 32,
    ) -> torch.Tensor:
        """The fusion-architecture interface (see `raim_diffusion.fusion.FUSION_ARCHITECTURES`):
        aligns ``generated`` to ``prior``; ``lq_up`` is used only with ``lq_input=True``."""
        return self.restore(generated, prior, mask, lq_up, tile=tile, overlap=overlap)

    @torch.no_grad()
    def restore(
        self,
        generated: torch.Tensor,
        prior: torch.Tensor | None,
        mask: torch.Tensor,
        lq: torch.Tensor | None = None,
        *,
        tile: int | None = None,
        overlap: int = 32,
        max_batch: int = 4,
    ) -> torch.Tensor:
        """Inference: the network (tiled for large images) and the paste-back on the whole image.

        Args:
            generated (`torch.Tensor`): ``(N, 3, H, W)`` generated image I_s2.
            prior (`torch.Tensor`): ``(N, 3, H, W)`` prior's image I_s1.
            mask (`torch.Tensor`): ``(N or 1, 1, H, W)`` artifact mask.
            lq (`torch.Tensor`, *optional*): LQ input at the output size (``lq_input=True`` only).
            tile (`int`, *optional*): Tile side; `None` (or a tile covering the image) runs once.
            overlap (`int`, *optional*, defaults to 32): Tile overlap in pixels.
            max_batch (`int`, *optional*, defaults to 4): Tiles per forward pass.

        Returns:
            `torch.Tensor`: ``(N, 3, H, W)`` fused image in [0, 1], dtype of ``generated``.
        """
        self._check(generated, prior, mask, lq)
        if tile is not None and (not isinstance(tile, int) or isinstance(tile, bool) or tile <= 0):
            raise ValueError(f"tile must be a positive int or None, got {tile!r}")
        out_dtype = generated.dtype
        if self.config.paste_back and not bool((mask > 0).any()):
            return generated.clone()  # nothing to fuse: the network would be pasted away anyway
        x = self._inputs(generated, prior, mask, lq)
        fused = tiled_apply(self.predict, x, tile, overlap, max_batch=max_batch).clamp_(0, 1)
        fused = fused.to(generated.device, out_dtype)
        if self.config.paste_back:
            # Against the caller's own tensor, so the kept pixels are its bits in its dtype.
            fused = self.paste(fused, generated, mask.to(generated.device))
        return fused

