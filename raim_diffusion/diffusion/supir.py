"""SUPIR's restoration adaptor on diffusers building blocks.

SUPIR (Yu et al., "Scaling Up to Excellence: Practicing Model Scaling for Photo-Realistic Image
Restoration In the Wild", CVPR 2024, https://arxiv.org/abs/2401.13627) conditions SDXL on the
degraded image with a large adaptor, trained while SDXL stays frozen:

* a *control model* (SUPIR's ``GLVControl``): a trainable copy of SDXL's encoder that reads the
  noisy latent, adds the low-quality (LQ) latent through a zero-initialised 3x3 convolution after
  its input convolution, and returns one hint per encoder feature (every skip plus the middle
  block) -- [`SupirControlModel`];
* *connectors* inside the SDXL decoder (SUPIR's ``LightGLVUNet``): ZeroSFT modules in place of the
  skip concatenations and of the middle block output, and two ZeroCrossAttn modules before the
  decoder's upsamplers -- [`SupirUNet2DConditionModel`], a subclass of diffusers'
  `UNet2DConditionModel` that keeps SDXL's weights and key names unchanged;
* a *degradation-robust encoder*: a fine-tuned copy of the VAE encoder that maps the LQ image to
  a clean latent -- [`SupirDenoiseEncoder`].

[`load_supir`] reads a SUPIR checkpoint in SUPIR's own key layout (``model.control_model.*``,
``model.diffusion_model.project_modules.*``, ``first_stage_model.denoise_encoder.*``; see the
public code at https://github.com/Fanghua-Yu/SUPIR, ``SUPIR/modules/SUPIR_v0.py``) strictly on
top of a diffusers SDXL UNet, and [`to_supir_state_dict`] writes that layout back.

Licence: SUPIR's architecture and weights are released by SupPixel under a **non-commercial**
licence (see the SUPIR repository's ``LICENSE``). This library ships **no** SUPIR weights: users
bring their own checkpoint (e.g. ``SUPIR-v0Q.ckpt``) and are responsible for honouring its terms.

Example:

```py
from raim_diffusion.diffusion.supir import load_supir

comps = load_supir("SUPIR-v0Q.ckpt", pipe.unet)
hints = comps.control(sample, t, encoder_hidden_states, added_cond_kwargs, lq_latent)
eps = comps.unet(sample, t, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                 supir_hints=hints, control_scale=1.0).sample
```
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import Attention
from diffusers.models.autoencoders.vae import Encoder
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2DCrossAttn, get_down_block
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from diffusers.utils import logging
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn

logger = logging.get_logger(__name__)

__all__ = [
    "SUPIR_CONTROL_PREFIX",
    "SUPIR_DENOISE_ENCODER_PREFIX",
    "SUPIR_PROJECT_PREFIX",
    "SupirComponents",
    "SupirControlModel",
    "SupirDenoiseEncoder",
    "SupirUNet2DConditionModel",
    "ZeroCrossAttn",
    "ZeroSFT",
    "load_supir",
    "load_supir_state_dict",
    "to_supir_state_dict",
]

SUPIR_CONTROL_PREFIX = "model.control_model."
SUPIR_PROJECT_PREFIX = "model.diffusion_model.project_modules."
SUPIR_DENOISE_ENCODER_PREFIX = "first_stage_model.denoise_encoder."
# Hidden width of ZeroSFT's shared MLP, fixed in SUPIR.
_SFT_HIDDEN = 128
# ZeroCrossAttn uses 64-channel heads, as SUPIR does.
_CROSS_ATTN_HEAD_DIM = 64


def _group_norm32(x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    # SUPIR's normalisation runs in float32 and casts back (stable under fp16 autocast).
    return F.group_norm(
        x.float(),
        norm.num_groups,
        None if norm.weight is None else norm.weight.float(),
        None if norm.bias is None else norm.bias.float(),
        norm.eps,
    ).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Connectors


class ZeroSFT(nn.Module):
    r"""SUPIR's zero-initialised spatial feature transform connector.

    With the hint ``c``, the encoder skip ``h`` and the decoder state ``h_ori`` (or no decoder state
    for the middle block), and the control scale ``s``:

    ``h_raw = cat(h_ori, h)``; ``h' = cat(h_ori, h + zero_conv(c))``;
    ``out = GN(h') * (1 + zero_mul(a)) + zero_add(a)`` with ``a = SiLU(mlp_shared(c))``;
    returns ``s * out + (1 - s) * h_raw``, so ``s = 0`` is exactly the plain concatenation of the
    base UNet (Yu et al., 2024, Sec. 3.2; SUPIR's public ``ZeroSFT``).

    Args:
        hint_channels (`int`): Channels of the hint ``c``.
        skip_channels (`int`): Channels of the skip ``h``.
        concat_channels (`int`, *optional*, defaults to 0): Channels of the decoder state
            concatenated in front of the skip (0 for the middle block).
        norm_num_groups (`int`, *optional*, defaults to 32): Groups of the normalisation.
    """

    def __init__(
        self,
        hint_channels: int,
        skip_channels: int,
        concat_channels: int = 0,
        norm_num_groups: int = 32,
    ) -> None:
        super().__init__()
        total = skip_channels + concat_channels
        self.param_free_norm = nn.GroupNorm(norm_num_groups, total, eps=1e-5, affine=True)
        self.mlp_shared = nn.Sequential(
            nn.Conv2d(hint_channels, _SFT_HIDDEN, 3, padding=1), nn.SiLU()
        )
        self.zero_mul = nn.Conv2d(_SFT_HIDDEN, total, 3, padding=1)
        self.zero_add = nn.Conv2d(_SFT_HIDDEN, total, 3, padding=1)
        self.zero_conv = nn.Conv2d(hint_channels, skip_channels, 1)
        for conv in (self.zero_mul, self.zero_add, self.zero_conv):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(
        self,
        hint: torch.Tensor,
        skip: torch.Tensor,
        state: torch.Tensor | None = None,
        control_scale: float = 1.0,
    ) -> torch.Tensor:
        h_raw = skip if state is None else torch.cat([state, skip], dim=1)
        h = skip + self.zero_conv(hint)
        if state is not None:
            h = torch.cat([state, h], dim=1)
        actv = self.mlp_shared(hint)
        h = _group_norm32(h, self.param_free_norm) * (1 + self.zero_mul(actv)) + self.zero_add(actv)
        return h * control_scale + h_raw * (1 - control_scale)


class ZeroCrossAttn(nn.Module):
    r"""SUPIR's cross-attention connector: decoder features attend to the hint.

    ``x + to_out(attention(q = GN(x), k = v = GN(hint))) * s`` over row-major tokens, with
    64-channel heads and bias-free q/k/v projections (SUPIR's public ``ZeroCrossAttn``). Its output
    projection is *not* zero-initialised, so only ``s = 0`` reproduces the base UNet.

    Args:
        context_channels (`int`): Channels of the hint.
        query_channels (`int`): Channels of the decoder features.
        norm_num_groups (`int`, *optional*, defaults to 32): Groups of both normalisations.
    """

    def __init__(
        self, context_channels: int, query_channels: int, norm_num_groups: int = 32
    ) -> None:
        super().__init__()
        heads = max(1, query_channels // _CROSS_ATTN_HEAD_DIM)
        self.attn = Attention(
            query_dim=query_channels,
            cross_attention_dim=context_channels,
            heads=heads,
            dim_head=_CROSS_ATTN_HEAD_DIM,
            bias=False,
            out_bias=True,
        )
        self.norm1 = nn.GroupNorm(norm_num_groups, query_channels, eps=1e-5, affine=True)
        self.norm2 = nn.GroupNorm(norm_num_groups, context_channels, eps=1e-5, affine=True)

    def forward(
        self, hint: torch.Tensor, x: torch.Tensor, control_scale: float = 1.0
    ) -> torch.Tensor:
        b, c, h, w = x.shape
        q = _group_norm32(x, self.norm1).flatten(2).transpose(1, 2)
        ctx = _group_norm32(hint, self.norm2).flatten(2).transpose(1, 2)
        out = self.attn(q, encoder_hidden_states=ctx)
        out = out.transpose(1, 2).reshape(b, c, h, w)
        return x + out * control_scale


# ---------------------------------------------------------------------------------------------
# UNet with connectors


@dataclass(frozen=True)
class _Connector:
    kind: str  # "sft" or "attn"
    hint: int  # index into the hints
    channels: tuple[int, ...]  # constructor channels


def _skip_channels(config: Mapping[str, Any]) -> list[int]:
    """Channels of the encoder skips of a diffusers UNet, in the order they are produced."""
    channels = list(config["block_out_channels"])
    layers = config["layers_per_block"]
    layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    skips = [channels[0]]
    for level, ch in enumerate(channels):
        skips += [ch] * layers[level]
        if level != len(channels) - 1:
            skips.append(ch)
    return skips


def supir_connector_layout(config: Mapping[str, Any]) -> list[_Connector]:
    """SUPIR's ``project_modules`` for a diffusers UNet config, in index order.

    The connectors are listed in the order the decoder uses them (middle block, then every decoder
    resnet, each followed by a ZeroCrossAttn where the decoder level has attention and an
    upsampler) and numbered backwards, as ``LightGLVUNet`` numbers them; for SDXL this gives
    ZeroSFT at 0-2, 4-6, 8-11 and ZeroCrossAttn at 3 and 7. A connector's hint has the index of the
    skip it replaces (the middle block's is the last one).
    """
    skips = _skip_channels(config)
    channels = list(config["block_out_channels"])
    rev = list(reversed(channels))
    layers = config["layers_per_block"]
    layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    rev_layers = list(reversed(layers))
    n = len(skips)
    used: list[_Connector] = [_Connector("sft", n, (channels[-1], channels[-1], 0))]
    state_ch = channels[-1]
    skip_idx = n - 1
    for i, up_type in enumerate(config["up_block_types"]):
        out_ch = rev[i]
        has_attn = "CrossAttn" in up_type
        has_up = i != len(channels) - 1
        for j in range(rev_layers[i] + 1):
            skip_ch = skips[skip_idx]
            used.append(_Connector("sft", skip_idx, (skip_ch, skip_ch, state_ch)))
            state_ch = out_ch
            if j == rev_layers[i] and has_attn and has_up:
                used.append(_Connector("attn", skip_idx, (skip_ch, out_ch)))
            skip_idx -= 1
    return list(reversed(used))


class SupirUNet2DConditionModel(UNet2DConditionModel):
    r"""SDXL's UNet with SUPIR's connectors (``LightGLVUNet`` in SUPIR's public code).

    Same constructor and config as [`UNet2DConditionModel`] (whose ``@register_to_config``
    records it), same parameter names for the base weights, plus ``project_modules.0..N``: the
    [`ZeroSFT`] and [`ZeroCrossAttn`] connectors laid out by [`supir_connector_layout`]. Without
    ``supir_hints`` the forward is the base UNet's, unchanged. With hints, the encoder and middle
    block run as in SDXL, the middle output goes through the last ZeroSFT, every decoder resnet
    receives ``ZeroSFT(hint, skip, state)`` instead of ``cat(state, skip)``, and the decoder levels
    with attention and an upsampler apply a ZeroCrossAttn just before upsampling (Yu et al., 2024,
    Fig. 2). Inputs are cast to the hints' dtype, as in SUPIR.

    Build one over existing SDXL weights with [`SupirUNet2DConditionModel.from_unet`].
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.project_modules = self._build_connectors()

    def _build_connectors(self) -> nn.ModuleList:
        groups = self.config.norm_num_groups
        modules = []
        for conn in supir_connector_layout(self.config):
            if conn.kind == "sft":
                modules.append(ZeroSFT(*conn.channels, norm_num_groups=groups))
            else:
                modules.append(ZeroCrossAttn(*conn.channels, norm_num_groups=groups))
        return nn.ModuleList(modules)

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel) -> SupirUNet2DConditionModel:
        """Wrap a diffusers UNet's weights, unchanged and not copied, with fresh connectors.

        Args:
            unet (`UNet2DConditionModel`): An SDXL UNet (``addition_embed_type="text_time"``).

        Returns:
            `SupirUNet2DConditionModel`: Shares every base parameter with ``unet``; the connectors
            are zero-initialised as in SUPIR and live on ``unet``'s device and dtype.
        """
        if not isinstance(unet, UNet2DConditionModel):
            raise TypeError(
                f"unet must be a diffusers UNet2DConditionModel, got {type(unet).__name__}"
            )
        with torch.device("meta"):
            model = cls.from_config(unet.config)
        model.load_state_dict(unet.state_dict(), strict=False, assign=True)
        model.project_modules = model._build_connectors().to(device=unet.device, dtype=unet.dtype)
        return model.train(unet.training)

    def forward(  # type: ignore[override]
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        *args: Any,
        supir_hints: Sequence[torch.Tensor] | None = None,
        control_scale: float = 1.0,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> UNet2DConditionOutput | tuple:
        r"""The base UNet's forward, or SUPIR's controlled forward when ``supir_hints`` is given.

        Args:
            sample (`torch.Tensor`): Noisy latent ``(B, 4, H, W)``.
            timestep (`torch.Tensor` or `float` or `int`): Diffusion timestep(s).
            encoder_hidden_states (`torch.Tensor`): Text embeddings ``(B, L, D)``.
            supir_hints (`Sequence[torch.Tensor]`, *optional*): The control model's hints, one per
                encoder skip plus the middle block.
            control_scale (`float`, *optional*, defaults to 1.0): SUPIR's ``s_stage2``; 0 is the
                base UNet.
            added_cond_kwargs (`dict`, *optional*): SDXL's ``text_embeds`` and ``time_ids``.
            cross_attention_kwargs (`dict`, *optional*): Passed to the attention processors.
            return_dict (`bool`, *optional*, defaults to `True`): Return a `UNet2DConditionOutput`.

        Returns:
            `UNet2DConditionOutput` or `tuple`: The noise prediction, in the hints' dtype when
            hints are given.
        """
        if supir_hints is None:
            return super().forward(
                sample,
                timestep,
                encoder_hidden_states,
                *args,
                added_cond_kwargs=added_cond_kwargs,
                cross_attention_kwargs=cross_attention_kwargs,
                return_dict=return_dict,
                **kwargs,
            )
        if args or kwargs:
            raise TypeError(
                "SUPIR's controlled forward takes only sample, timestep, encoder_hidden_states, "
                f"added_cond_kwargs and cross_attention_kwargs; got also {sorted(kwargs)}"
                + (f" and {len(args)} positional" if args else "")
            )
        hints = list(supir_hints)
        expected = len(self.project_modules) - self._num_cross_attn()
        if len(hints) != expected:
            raise ValueError(
                f"supir_hints must hold {expected} tensors "
                f"(one per encoder skip plus the middle block), got {len(hints)}"
            )
        dtype = hints[0].dtype
        sample = sample.to(dtype)
        encoder_hidden_states = encoder_hidden_states.to(dtype)
        if added_cond_kwargs is not None:
            added_cond_kwargs = {
                k: v.to(dtype) if v.is_floating_point() else v for k, v in added_cond_kwargs.items()
            }

        # 1. time and SDXL's added conditioning
        t_emb = self.get_time_embed(sample=sample, timestep=timestep)
        emb = self.time_embedding(t_emb, None)
        aug_emb = self.get_aug_embed(
            emb=emb,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=added_cond_kwargs or {},
        )
        emb = emb + aug_emb if aug_emb is not None else emb
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        encoder_hidden_states = self.process_encoder_hidden_states(
            encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
        )
        xattn = dict(
            encoder_hidden_states=encoder_hidden_states,
            cross_attention_kwargs=cross_attention_kwargs,
        )

        # 2. encoder, unchanged
        h = self.conv_in(sample)
        skips: list[torch.Tensor] = [h]
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = block(hidden_states=h, temb=emb, **xattn)
            else:
                h, res = block(hidden_states=h, temb=emb)
            skips += list(res)
        h = self.mid_block(h, emb, **xattn)

        # 3. decoder with connectors, consumed from the last index down
        connectors = list(self.project_modules)
        h = connectors.pop()(hints[len(skips)], h, control_scale=control_scale)
        for block in self.up_blocks:
            attentions = getattr(block, "attentions", None)
            for j, resnet in enumerate(block.resnets):
                skip = skips.pop()
                hint = hints[len(skips)]
                h = connectors.pop()(hint, skip, h, control_scale=control_scale)
                h = resnet(h, emb)
                if attentions is not None:
                    h = attentions[j](
                        h,
                        encoder_hidden_states=encoder_hidden_states,
                        cross_attention_kwargs=cross_attention_kwargs,
                        return_dict=False,
                    )[0]
            if block.upsamplers is not None:
                if attentions is not None:
                    h = connectors.pop()(hint, h, control_scale=control_scale)
                size = skips[-1].shape[2:] if skips else None
                for upsampler in block.upsamplers:
                    h = upsampler(h, size)

        # 4. output
        if self.conv_norm_out is not None:
            h = self.conv_act(self.conv_norm_out(h))
        h = self.conv_out(h)
        if not return_dict:
            return (h,)
        return UNet2DConditionOutput(sample=h)

    def _num_cross_attn(self) -> int:
        return sum(isinstance(m, ZeroCrossAttn) for m in self.project_modules)


# The subclass keeps UNet2DConditionModel's constructor; expose its signature so that diffusers'
# from_config / from_pretrained find every config key.
SupirUNet2DConditionModel.__init__.__signature__ = inspect.signature(UNet2DConditionModel.__init__)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# Control model


class SupirControlModel(ModelMixin, ConfigMixin):
    r"""SUPIR's control model (``GLVControl``): a trainable SDXL encoder that emits the hints.

    The noisy latent goes through ``conv_in``; the LQ latent through the zero-initialised
    ``lq_conv_in`` (SUPIR's ``input_hint_block``), added to the first feature; then SDXL's down
    blocks and middle block run with the model's own time and added-condition embeddings. The
    hints are every encoder feature (the first one included) and the middle block's output (Yu et
    al., 2024, Sec. 3.2). Inputs are cast to the LQ latent's dtype, as in SUPIR.

    The config mirrors the encoder half of [`UNet2DConditionModel`]; build one for a given UNet
    with [`SupirControlModel.from_unet_config`].

    Args:
        in_channels (`int`, defaults to 4): Latent channels.
        down_block_types (`tuple[str, ...]`): diffusers down block types.
        block_out_channels (`tuple[int, ...]`): Channels per level.
        layers_per_block (`int` or `tuple[int, ...]`): Resnets per level.
        transformer_layers_per_block (`int` or `tuple[int, ...]`): Transformer depth per level
            (the last one is also the middle block's).
        num_attention_heads (`int` or `tuple[int, ...]`): Attention heads per level.
        cross_attention_dim (`int`): Text embedding width (2048 for SDXL).
        use_linear_projection (`bool`): Linear ``proj_in``/``proj_out`` in the transformers.
        addition_time_embed_dim (`int`): Width of each micro-conditioning sinusoidal embedding.
        projection_class_embeddings_input_dim (`int`): Width of SDXL's added vector (2816).
        norm_num_groups (`int`), norm_eps (`float`), act_fn (`str`), flip_sin_to_cos (`bool`),
        freq_shift (`int`): As in [`UNet2DConditionModel`].
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        down_block_types: tuple[str, ...] = (
            "DownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
        ),
        block_out_channels: tuple[int, ...] = (320, 640, 1280),
        layers_per_block: int | tuple[int, ...] = 2,
        transformer_layers_per_block: int | tuple[int, ...] = (1, 2, 10),
        num_attention_heads: int | tuple[int, ...] = (5, 10, 20),
        cross_attention_dim: int = 2048,
        use_linear_projection: bool = True,
        addition_time_embed_dim: int = 256,
        projection_class_embeddings_input_dim: int = 2816,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        act_fn: str = "silu",
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
    ) -> None:
        super().__init__()
        levels = len(block_out_channels)
        layers = (
            [layers_per_block] * levels
            if isinstance(layers_per_block, int)
            else list(layers_per_block)
        )
        depth = (
            [transformer_layers_per_block] * levels
            if isinstance(transformer_layers_per_block, int)
            else list(transformer_layers_per_block)
        )
        heads = (
            [num_attention_heads] * levels
            if isinstance(num_attention_heads, int)
            else list(num_attention_heads)
        )
        ch0 = block_out_channels[0]
        temb = ch0 * 4
        self.conv_in = nn.Conv2d(in_channels, ch0, 3, padding=1)
        self.lq_conv_in = nn.Conv2d(in_channels, ch0, 3, padding=1)
        nn.init.zeros_(self.lq_conv_in.weight)
        nn.init.zeros_(self.lq_conv_in.bias)
        self.time_proj = Timesteps(ch0, flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(ch0, temb, act_fn=act_fn)
        self.add_time_proj = Timesteps(addition_time_embed_dim, flip_sin_to_cos, freq_shift)
        self.add_embedding = TimestepEmbedding(projection_class_embeddings_input_dim, temb)
        self.down_blocks = nn.ModuleList()
        out_ch = ch0
        for i, block_type in enumerate(down_block_types):
            in_ch, out_ch = out_ch, block_out_channels[i]
            self.down_blocks.append(
                get_down_block(
                    block_type,
                    num_layers=layers[i],
                    transformer_layers_per_block=depth[i],
                    in_channels=in_ch,
                    out_channels=out_ch,
                    temb_channels=temb,
                    add_downsample=i != levels - 1,
                    resnet_eps=norm_eps,
                    resnet_act_fn=act_fn,
                    resnet_groups=norm_num_groups,
                    cross_attention_dim=cross_attention_dim,
                    num_attention_heads=heads[i],
                    downsample_padding=1,
                    use_linear_projection=use_linear_projection,
                    attention_head_dim=heads[i],
                )
            )
        self.mid_block = UNetMidBlock2DCrossAttn(
            in_channels=block_out_channels[-1],
            temb_channels=temb,
            transformer_layers_per_block=depth[-1],
            resnet_eps=norm_eps,
            resnet_act_fn=act_fn,
            resnet_groups=norm_num_groups,
            num_attention_heads=heads[-1],
            cross_attention_dim=cross_attention_dim,
            use_linear_projection=use_linear_projection,
        )

    @classmethod
    def from_unet_config(cls, config: Mapping[str, Any]) -> SupirControlModel:
        """A randomly initialised control model shaped like the encoder of the given UNet config.

        Args:
            config (`Mapping[str, Any]`): A diffusers SDXL UNet config (``unet.config``).

        Returns:
            `SupirControlModel`: On the CPU in float32.
        """
        if config.get("addition_embed_type") != "text_time":
            raise ValueError(
                "SUPIR needs an SDXL UNet (addition_embed_type='text_time'), got "
                f"addition_embed_type={config.get('addition_embed_type')!r}"
            )
        heads = config.get("num_attention_heads") or config["attention_head_dim"]
        cross = config["cross_attention_dim"]
        if not isinstance(cross, int):
            raise ValueError(f"SUPIR needs one cross_attention_dim, got {cross!r}")
        return cls(
            in_channels=config["in_channels"],
            down_block_types=tuple(config["down_block_types"]),
            block_out_channels=tuple(config["block_out_channels"]),
            layers_per_block=config["layers_per_block"],
            transformer_layers_per_block=config["transformer_layers_per_block"],
            num_attention_heads=heads if isinstance(heads, int) else tuple(heads),
            cross_attention_dim=cross,
            use_linear_projection=config["use_linear_projection"],
            addition_time_embed_dim=config["addition_time_embed_dim"],
            projection_class_embeddings_input_dim=config["projection_class_embeddings_input_dim"],
            norm_num_groups=config["norm_num_groups"],
            norm_eps=config["norm_eps"],
            act_fn=config["act_fn"],
            flip_sin_to_cos=config["flip_sin_to_cos"],
            freq_shift=config["freq_shift"],
        )

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor],
        lq_latent: torch.Tensor,
    ) -> list[torch.Tensor]:
        r"""Compute SUPIR's hints.

        Args:
            sample (`torch.Tensor`): Noisy latent ``(B, 4, H, W)`` (already scaled by
                ``1/sqrt(1+sigma^2)``, as the UNet sees it).
            timestep (`torch.Tensor` or `float` or `int`): Diffusion timestep(s).
            encoder_hidden_states (`torch.Tensor`): Text embeddings ``(B, L, 2048)``.
            added_cond_kwargs (`dict`): ``text_embeds`` ``(B, 1280)`` and ``time_ids`` ``(B, 6)``.
            lq_latent (`torch.Tensor`): The degradation-robust encoder's latent ``(B, 4, H, W)``
                (scaled by the VAE's scaling factor).

        Returns:
            `list[torch.Tensor]`: One hint per encoder feature, then the middle block output, in
            ``lq_latent``'s dtype.
        """
        if "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
            raise ValueError(
                "added_cond_kwargs must hold 'text_embeds' and 'time_ids' (SDXL conditioning)"
            )
        dtype = lq_latent.dtype
        sample = sample.to(dtype)
        encoder_hidden_states = encoder_hidden_states.to(dtype)
        batch = sample.shape[0]
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], dtype=torch.float32, device=sample.device)
        elif timestep.ndim == 0:
            timestep = timestep[None].to(sample.device)
        timestep = timestep.expand(batch)
        emb = self.time_embedding(self.time_proj(timestep).to(dtype))
        time_ids = added_cond_kwargs["time_ids"]
        time_embeds = self.add_time_proj(time_ids.flatten()).reshape(time_ids.shape[0], -1)
        add = torch.cat([added_cond_kwargs["text_embeds"].to(dtype), time_embeds.to(dtype)], dim=-1)
        emb = emb + self.add_embedding(add)

        h = self.conv_in(sample) + self.lq_conv_in(lq_latent)
        hints = [h]
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = block(
                    hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states
                )
            else:
                h, res = block(hidden_states=h, temb=emb)
            hints += list(res)
        hints.append(self.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states))
        return hints


# ---------------------------------------------------------------------------------------------
# Degradation-robust encoder


class SupirDenoiseEncoder(ModelMixin, ConfigMixin):
    r"""SUPIR's degradation-robust encoder: a fine-tuned copy of the SDXL VAE encoder.

    It maps the LQ image to the latent moments the VAE's ``quant_conv`` expects; SUPIR encodes the
    LQ input with it and the base VAE's ``quant_conv``, takes the mode and scales it (Yu et al.,
    2024, Sec. 3.2). Use [`SupirDenoiseEncoder.encode`] with the pipeline's VAE.

    Args:
        in_channels (`int`, defaults to 3), latent_channels (`int`, defaults to 4),
        block_out_channels (`tuple[int, ...]`), layers_per_block (`int`), norm_num_groups (`int`),
        act_fn (`str`), mid_block_add_attention (`bool`): As in diffusers' `AutoencoderKL`.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 4,
        block_out_channels: tuple[int, ...] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        act_fn: str = "silu",
        mid_block_add_attention: bool = True,
    ) -> None:
        super().__init__()
        self.encoder = Encoder(
            in_channels=in_channels,
            out_channels=latent_channels,
            down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            act_fn=act_fn,
            double_z=True,
            mid_block_add_attention=mid_block_add_attention,
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Moments (before ``quant_conv``) of an image in [-1, 1]: ``(B, 2C, H/f, W/f)``."""
        return self.encoder(image)

    @apply_forward_hook  # model CPU offload moves the encoder on for encode, as for a forward
    @torch.no_grad()
    def encode(self, image: torch.Tensor, vae: nn.Module) -> torch.Tensor:
        """SUPIR's LQ latent: ``mode(quant_conv(E_denoise(image))) * scaling_factor``.

        Args:
            image (`torch.Tensor`): ``(B, 3, H, W)`` in [0, 1] (the library's image contract).
            vae (`AutoencoderKL`): The pipeline's VAE (its ``quant_conv`` and ``scaling_factor``).

        Returns:
            `torch.Tensor`: The scaled latent, in this encoder's dtype.
        """
        param = next(self.parameters())
        moments = self.encoder(image.to(param.device, param.dtype) * 2 - 1)
        quant = getattr(vae, "quant_conv", None)
        if quant is not None:
            moments = quant(moments.to(quant.weight.dtype)).to(param.dtype)
        mean = moments.chunk(2, dim=1)[0]
        return mean * vae.config.scaling_factor


# ---------------------------------------------------------------------------------------------
# Key layout (SGM <-> diffusers)

_RESNET_TO_SGM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTN_TO_SGM = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _sub_resnet(rest: str, table: Mapping[str, str]) -> str:
    for src, dst in table.items():
        if rest.startswith(src + "."):
            return dst + rest[len(src) :]
    raise KeyError(rest)


def _control_key_to_sgm(key: str, layers: Sequence[int]) -> str:
    """SUPIR's ``GLVControl`` name of a [`SupirControlModel`] parameter."""
    fixed = {
        "conv_in.": "input_blocks.0.0.",
        "lq_conv_in.": "input_hint_block.0.",
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "add_embedding.linear_1.": "label_emb.0.0.",
        "add_embedding.linear_2.": "label_emb.0.2.",
    }
    for src, dst in fixed.items():
        if key.startswith(src):
            return dst + key[len(src) :]
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", key)
    if m:
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        base = 1 + sum(n + 1 for n in layers[:level])
        if kind == "resnets":
            return f"input_blocks.{base + j}.0.{_sub_resnet(rest, _RESNET_TO_SGM)}"
        if kind == "attentions":
            return f"input_blocks.{base + j}.1.{rest}"
        return f"input_blocks.{base + layers[level]}.0.{rest.replace('conv.', 'op.', 1)}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{0 if j == 0 else 2}.{_sub_resnet(rest, _RESNET_TO_SGM)}"
    raise KeyError(f"no SUPIR name for control model parameter {key!r}")


def _encoder_key_to_sgm(key: str) -> str:
    """The LDM/SGM VAE-encoder name of a diffusers `Encoder` parameter (without ``encoder.``)."""
    for src, dst in (
        ("conv_in.", "conv_in."),
        ("conv_out.", "conv_out."),
        ("conv_norm_out.", "norm_out."),
    ):
        if key.startswith(src):
            return dst + key[len(src) :]
    m = re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)
    if m:
        rest = m[3].replace("conv_shortcut.", "nin_shortcut.")
        return f"down.{m[1]}.block.{m[2]}.{rest}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key)
    if m:
        return f"down.{m[1]}.downsample.conv.{m[2]}"
    m = re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key)
    if m:
        return f"mid.block_{int(m[1]) + 1}.{m[2].replace('conv_shortcut.', 'nin_shortcut.')}"
    m = re.match(r"mid_block\.attentions\.0\.(.+)", key)
    if m:
        return "mid.attn_1." + _sub_resnet(m[1], _VAE_ATTN_TO_SGM)
    raise KeyError(f"no SUPIR name for denoise encoder parameter {key!r}")


def _layers(config: Mapping[str, Any]) -> list[int]:
    layers = config["layers_per_block"]
    return [layers] * len(config["block_out_channels"]) if isinstance(layers, int) else list(layers)


def _control_name_map(control: SupirControlModel) -> dict[str, str]:
    layers = _layers(control.config)
    return {k: SUPIR_CONTROL_PREFIX + _control_key_to_sgm(k, layers) for k in control.state_dict()}


def _encoder_name_map(encoder: SupirDenoiseEncoder) -> dict[str, str]:
    return {
        k: SUPIR_DENOISE_ENCODER_PREFIX + _encoder_key_to_sgm(k[len("encoder.") :])
        for k in encoder.state_dict()
    }


def _is_vae_attn_matrix(sgm_key: str) -> bool:
    # The LDM VAE's attention uses 1x1 convs for q/k/v/proj_out; diffusers uses linears.
    return bool(re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", sgm_key))


def to_supir_state_dict(
    control: SupirControlModel,
    unet: SupirUNet2DConditionModel,
    denoise_encoder: SupirDenoiseEncoder,
) -> dict[str, torch.Tensor]:
    """The SUPIR-specific weights in SUPIR's checkpoint layout (the inverse of [`load_supir`]).

    Args:
        control (`SupirControlModel`): The control model.
        unet (`SupirUNet2DConditionModel`): The UNet whose ``project_modules`` are written (the
            SDXL base weights are not).
        denoise_encoder (`SupirDenoiseEncoder`): The degradation-robust encoder.

    Returns:
        `dict[str, torch.Tensor]`: ``model.control_model.*``,
        ``model.diffusion_model.project_modules.*`` and ``first_stage_model.denoise_encoder.*``.
    """
    out: dict[str, torch.Tensor] = {}
    state = control.state_dict()
    for key, name in _control_name_map(control).items():
        out[name] = state[key].detach().clone()
    for key, value in unet.project_modules.state_dict().items():
        out[SUPIR_PROJECT_PREFIX + key] = value.detach().clone()
    state = denoise_encoder.state_dict()
    for key, name in _encoder_name_map(denoise_encoder).items():
        value = state[key].detach().clone()
        out[name] = value[:, :, None, None] if _is_vae_attn_matrix(name) else value
    return out


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass
class SupirComponents:
    """What [`load_supir`] returns.

    Attributes:
        control (`SupirControlModel`): The control model (hints).
        unet (`SupirUNet2DConditionModel`): The SDXL UNet with SUPIR's connectors.
        denoise_encoder (`SupirDenoiseEncoder`): The degradation-robust encoder.
        unused_keys (`tuple[str, ...]`): Checkpoint keys outside SUPIR's three parts (the SDXL base,
            training leftovers such as ``mask_LQ``), reported, not loaded.
    """

    control: SupirControlModel
    unet: SupirUNet2DConditionModel
    denoise_encoder: SupirDenoiseEncoder
    unused_keys: tuple[str, ...] = field(default_factory=tuple)


def load_supir_state_dict(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Read a SUPIR checkpoint: ``.safetensors`` or a pickled ``.ckpt``/``.pth``/``.pt``.

    Pickled checkpoints load with ``weights_only=True`` only; a Lightning ``state_dict`` entry is
    unwrapped.

    Args:
        checkpoint (`str`, `os.PathLike` or `Mapping[str, torch.Tensor]`): A path or a state dict.

    Returns:
        `dict[str, torch.Tensor]`: The flat state dict.
    """
    if isinstance(checkpoint, Mapping):
        state = dict(checkpoint)
    elif isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        if not os.path.isfile(path):
            raise ValueError(f"checkpoint {path!r} is not a file")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        elif path.endswith((".ckpt", ".pth", ".pt")):
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"checkpoint {path!r} must end in .safetensors, .ckpt, .pth or .pt")
    else:
        raise TypeError(
            f"checkpoint must be a path or a state dict, got {type(checkpoint).__name__}"
        )
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = dict(state["state_dict"])
    bad = [k for k, v in state.items() if not torch.is_tensor(v)]
    if bad:
        raise ValueError(f"checkpoint holds non-tensor entries, e.g. {bad[:3]}")
    return state


def _infer_encoder_config(
    state: Mapping[str, torch.Tensor], norm_num_groups: int, act_fn: str
) -> dict[str, Any]:
    p = SUPIR_DENOISE_ENCODER_PREFIX
    if p + "conv_in.weight" not in state:
        raise ValueError(f"checkpoint has no {p}conv_in.weight: not a SUPIR checkpoint")
    levels = sorted(
        {int(m[1]) for k in state if (m := re.match(re.escape(p) + r"down\.(\d+)\.", k))}
    )
    blocks = sorted(
        {int(m[1]) for k in state if (m := re.match(re.escape(p) + r"down\.0\.block\.(\d+)\.", k))}
    )
    channels = tuple(int(state[f"{p}down.{i}.block.0.conv1.weight"].shape[0]) for i in levels)
    return dict(
        in_channels=int(state[p + "conv_in.weight"].shape[1]),
        latent_channels=int(state[p + "conv_out.weight"].shape[0]) // 2,
        block_out_channels=channels,
        layers_per_block=len(blocks),
        norm_num_groups=norm_num_groups,
        act_fn=act_fn,
        mid_block_add_attention=any(k.startswith(p + "mid.attn_1.") for k in state),
    )


def _load_mapped(
    model: nn.Module, name_map: Mapping[str, str], state: Mapping[str, torch.Tensor], what: str
) -> None:
    own = model.state_dict()
    missing = [name for name in name_map.values() if name not in state]
    if missing:
        raise ValueError(
            f"SUPIR checkpoint is missing {len(missing)} {what} keys, e.g. {missing[:5]}"
        )
    new = {}
    for key, name in name_map.items():
        value = state[name]
        if _is_vae_attn_matrix(name) and value.ndim == 4:
            value = value[:, :, 0, 0]
        if value.shape != own[key].shape:
            raise ValueError(
                f"SUPIR checkpoint key {name!r} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(own[key].shape)}: the checkpoint does not match this SDXL UNet"
            )
        new[key] = value
    model.load_state_dict(new, strict=True)


def load_supir(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    unet: UNet2DConditionModel,
    *,
    vae: nn.Module | None = None,
) -> SupirComponents:
    r"""Build SUPIR's components over an SDXL UNet and load a SUPIR checkpoint strictly.

    Every parameter of the three SUPIR parts must come from the checkpoint and every checkpoint key
    under their prefixes must be used (a mismatch raises `ValueError`); keys outside them (the SDXL
    base, ``mask_LQ`` and other training leftovers) are logged and returned in
    ``unused_keys``. The SDXL base weights are those of ``unet``, shared, not copied.

    Args:
        checkpoint (`str`, `os.PathLike` or `Mapping[str, torch.Tensor]`): ``SUPIR-v0Q.ckpt`` /
            ``.safetensors`` or a state dict in SUPIR's layout (see the module docstring).
        unet (`UNet2DConditionModel`): The diffusers SDXL UNet (e.g. SDXL base or Juggernaut-XL).
        vae (`AutoencoderKL`, *optional*): The pipeline's VAE; its ``norm_num_groups`` and
            ``act_fn`` shape the denoise encoder (SDXL's 32 and SiLU when not given).

    Returns:
        [`SupirComponents`]: ``control`` and ``unet`` on ``unet``'s device and dtype,
        ``denoise_encoder`` on ``unet``'s device in float32 (SUPIR runs it in bf16; fp16
        overflows), and ``unused_keys``.
    """
    if not isinstance(unet, UNet2DConditionModel):
        raise TypeError(f"unet must be a diffusers UNet2DConditionModel, got {type(unet).__name__}")
    state = load_supir_state_dict(checkpoint)
    prefixes = (SUPIR_CONTROL_PREFIX, SUPIR_PROJECT_PREFIX, SUPIR_DENOISE_ENCODER_PREFIX)
    unused = tuple(sorted(k for k in state if not k.startswith(prefixes)))
    if not any(k.startswith(SUPIR_CONTROL_PREFIX) for k in state):
        raise ValueError(f"checkpoint has no {SUPIR_CONTROL_PREFIX}* keys: not a SUPIR checkpoint")

    with torch.device("meta"):
        control = SupirControlModel.from_unet_config(unet.config)
    control = control.to_empty(device="cpu")
    control_map = _control_name_map(control)
    _load_mapped(control, control_map, state, "control model")

    supir_unet = (
        unet
        if isinstance(unet, SupirUNet2DConditionModel)
        else SupirUNet2DConditionModel.from_unet(unet)
    )
    project_state = {
        k[len(SUPIR_PROJECT_PREFIX) :]: v
        for k, v in state.items()
        if k.startswith(SUPIR_PROJECT_PREFIX)
    }
    own = supir_unet.project_modules.state_dict()
    missing = sorted(set(own) - set(project_state))
    extra = sorted(set(project_state) - set(own))
    if missing or extra:
        raise ValueError(
            "SUPIR checkpoint's connectors do not match this UNet: "
            f"missing {[SUPIR_PROJECT_PREFIX + k for k in missing[:5]]}, "
            f"unexpected {[SUPIR_PROJECT_PREFIX + k for k in extra[:5]]}"
        )
    for key, value in project_state.items():
        if value.shape != own[key].shape:
            raise ValueError(
                f"SUPIR checkpoint key {SUPIR_PROJECT_PREFIX + key!r} has shape "
                f"{tuple(value.shape)}, the UNet expects {tuple(own[key].shape)}"
            )
    supir_unet.project_modules.load_state_dict(project_state, strict=True)

    vae_config = getattr(vae, "config", None) or {}
    groups = vae_config.get("norm_num_groups", 32)
    act = vae_config.get("act_fn", "silu")
    encoder = SupirDenoiseEncoder(**_infer_encoder_config(state, groups, act))
    _load_mapped(encoder, _encoder_name_map(encoder), state, "denoise encoder")

    used = set(control_map.values()) | set(_encoder_name_map(encoder).values())
    used |= {SUPIR_PROJECT_PREFIX + k for k in project_state}
    leftover = sorted(k for k in state if k.startswith(prefixes) and k not in used)
    if leftover:
        raise ValueError(
            f"SUPIR checkpoint has {len(leftover)} unexpected keys, e.g. {leftover[:5]}"
        )
    if unused:
        logger.warning(
            "SUPIR checkpoint: %d keys outside SUPIR's components were not loaded, e.g. %s",
            len(unused),
            list(unused[:5]),
        )

    # nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast, even with nothing to
    # keep in float32.
    control = nn.Module.to(control, device=unet.device, dtype=unet.dtype).eval()
    encoder = encoder.to(device=unet.device).eval()
    return SupirComponents(
        control=control, unet=supir_unet, denoise_encoder=encoder, unused_keys=unused
    )

