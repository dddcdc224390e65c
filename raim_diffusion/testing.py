"""Tiny random components for tests, notebooks and CPU demos.

Everything here is built from configs with random weights, the way diffusers' own fast tests do,
so it runs offline, on the CPU, in a fraction of a second, and needs nothing beyond the core
install. That includes the tokenizers: they use a small byte-level BPE vocabulary generated in
code (:func:`tiny_clip_tokenizer`), not CLIP's 49408-token one, so any prompt (unicode and emoji
included) is tokenized and truncated to 77 positions exactly as the real tokenizers do, only with
other token ids -- which do not matter for random embeddings.

* :func:`tiny_components`, :func:`save_tiny_pipeline`, :func:`tiny_controlnet`: SD 1.x / 2.x /
  SDXL at toy size.
* :func:`random_components`: SD 1.5 / SDXL at full size with random weights (benchmarks).
* :func:`tiny_prior`, :func:`tiny_segformer_segmenter`, :func:`tiny_sam`: the other stages.
* :func:`tiny_supir_components`, :func:`tiny_supir_state_dict`, :func:`save_tiny_supir_checkpoint`:
  SUPIR's adaptor for the tiny SDXL UNet, as modules or as a checkpoint in SUPIR's own layout.

Example:

```py
from raim_diffusion.testing import save_tiny_pipeline, tiny_prior
from raim_diffusion.pipeline import RaimPipeline

folder = save_tiny_pipeline("/tmp/tiny-sd15", kind="sd15")
pipe = RaimPipeline.from_pretrained(folder, prior=tiny_prior())
```
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import spandrel
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from spandrel.architectures.Compact import Compact
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    SegformerConfig,
    SegformerForSemanticSegmentation,
)

from .artifacts.sam import build_sam
from .artifacts.segmentation import TransformersSegmenter
from .artifacts.tables import ADE20K_CLASSES
from .diffusion.supir import (
    SupirComponents,
    SupirControlModel,
    SupirDenoiseEncoder,
    SupirUNet2DConditionModel,
    to_supir_state_dict,
)
from .prior import PriorModel

__all__ = [
    "RANDOM_REPOS",
    "TINY_CLIP_VOCAB_SIZE",
    "TinyKind",
    "random_components",
    "save_tiny_pipeline",
    "save_tiny_supir_checkpoint",
    "tiny_clip_tokenizer",
    "tiny_clip_vocabulary",
    "tiny_components",
    "tiny_controlnet",
    "tiny_prior",
    "tiny_sam",
    "tiny_segformer_segmenter",
    "tiny_supir_components",
    "tiny_supir_state_dict",
]

TinyKind = Literal["sd15", "sd2", "sdxl"]
_KINDS = ("sd15", "sd2", "sdxl")

# ---------------------------------------------------------------------------------------------
# Tokenizer

# A few merges of common English pairs, in priority order, so that the BPE merge step is
# exercised too ("photo" is one token, "the" is one token); each result is a vocabulary entry.
_TINY_MERGES = (
    "t h", "th e</w>", "a n", "an d</w>", "i n", "in g</w>", "o f</w>", "o n</w>",
    "e r</w>", "e d</w>", "t o</w>", "i s</w>", "a t</w>", "o r</w>", "e n", "r e",
    "o u", "a l", "s t", "p h", "ph o", "pho to</w>", "c a", "ca t</w>",
    "h i", "g h", "d e", "l y</w>", "e s</w>", "a r", "c o", "l i",
)  # fmt: skip
_BOS_TOKEN = "<|startoftext|>"
_EOS_TOKEN = "<|endoftext|>"
# 256 byte characters, the same with the end-of-word mark, the merges, then bos and eos last,
# as in CLIP (whose legacy text configs pool at the highest token id, i.e. at eos).
TINY_CLIP_VOCAB_SIZE = 2 * 256 + len(_TINY_MERGES) + 2
_BOS_ID = TINY_CLIP_VOCAB_SIZE - 2
_EOS_ID = TINY_CLIP_VOCAB_SIZE - 1


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level mapping: printable bytes map to themselves, the rest to code points
    # from 256 upwards, so every byte has a visible, non-whitespace character.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def tiny_clip_vocabulary() -> tuple[dict[str, int], list[str]]:
    """The tiny byte-level BPE vocabulary of :func:`tiny_clip_tokenizer`, in CLIP's layout.

    Every byte has a token (alone and word-final, ``"</w>"``), so any UTF-8 text is encoded
    without unknown tokens; a few merges join common English pairs. ``"!"`` is token 0 (the pad
    token of SD 2.x), ``"<|startoftext|>"`` and ``"<|endoftext|>"`` are the last two ids.

    Returns:
        `tuple[dict[str, int], list[str]]`: ``vocab.json``'s token -> id mapping
        (`TINY_CLIP_VOCAB_SIZE` entries) and ``merges.txt``'s merges (without the header line).
    """
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(merge.split()) for merge in _TINY_MERGES]
    tokens += [_BOS_TOKEN, _EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != TINY_CLIP_VOCAB_SIZE:  # a merge that repeats a token would shift the ids
        raise RuntimeError("tiny CLIP vocabulary has duplicate tokens")
    return vocab, list(_TINY_MERGES)


def _write_tiny_clip_vocabulary(folder: Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` (the files a slow CLIP tokenizer loads from)."""
    vocab, merges = tiny_clip_vocabulary()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(folder / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")


def tiny_clip_tokenizer(pad_token: str = _EOS_TOKEN) -> CLIPTokenizer:
    """A CLIP tokenizer (77 positions) on the tiny vocabulary of :func:`tiny_clip_vocabulary`.

    Text is normalised, split into words and byte-encoded exactly as by the SD/SDXL tokenizers;
    only the vocabulary is small (`TINY_CLIP_VOCAB_SIZE` tokens), so the tiny text encoders'
    embedding tables are small too and nothing has to be downloaded or installed.

    Args:
        pad_token (`str`, defaults to `"<|endoftext|>"`):
            SD 1.x and SDXL's first tokenizer pad with `"<|endoftext|>"`, SD 2.x and SDXL's second
            tokenizer with `"!"` (token 0).

    Returns:
        `CLIPTokenizer`: ``bos_token_id`` is ``TINY_CLIP_VOCAB_SIZE - 2``, ``eos_token_id``
        ``TINY_CLIP_VOCAB_SIZE - 1``.
    """
    # from_pretrained reads vocab.json / merges.txt the same way in transformers 4 and 5, and
    # reads them completely, so the folder is only needed for the call.
    with tempfile.TemporaryDirectory(prefix="raim-tiny-clip-") as tmp:
        _write_tiny_clip_vocabulary(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(
            tmp,
            bos_token=_BOS_TOKEN,
            eos_token=_EOS_TOKEN,
            unk_token=_EOS_TOKEN,
            pad_token=pad_token,
            model_max_length=77,
        )
    tokenizer.name_or_path = "raim-tiny-clip"
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Tiny SD / SDXL components


def _text_config(hidden_size: int, projection_dim: int | None = None) -> CLIPTextConfig:
    kwargs = {}
    if projection_dim is not None:
        kwargs["projection_dim"] = projection_dim
    return CLIPTextConfig(
        vocab_size=TINY_CLIP_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=_BOS_ID,
        eos_token_id=_EOS_ID,
        pad_token_id=1,
        **kwargs,
    )


def _tiny_vae(sdxl: bool) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        # Three levels (latents at 1/4 size): tiny, yet CPU demos on a few hundred pixels do not
        # spend their time in full-resolution attention.
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.13025 if sdxl else 0.18215,
        force_upcast=sdxl,
    )


def _unet_kwargs() -> dict:
    return dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )


def _scheduler_config(prediction_type: str) -> dict:
    # The schedule of every SD/SDXL base checkpoint ("scaled_linear" 0.00085 .. 0.012).
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
        timestep_spacing="leading",
    )


def tiny_components(kind: TinyKind = "sd15", seed: int = 0) -> dict:
    """Random tiny components of a SD 1.x, SD 2.x (v-prediction) or SDXL pipeline.

    The shapes follow the real models (4 latent channels, CLIP tokenizers with 77 positions,
    SDXL's two text encoders and ``text_time`` micro-conditioning) at a scale that runs in
    milliseconds: VAE factor 4, UNet with two levels, 32-wide text encoders on the tiny
    vocabulary of :func:`tiny_clip_tokenizer`.

    Args:
        kind (`str`, defaults to `"sd15"`): one of `"sd15"`, `"sd2"`, `"sdxl"`.
        seed (`int`, defaults to 0): seed of the random weights.

    Returns:
        `dict`: keyword arguments for `StableDiffusionPipeline` (with ``safety_checker=None``,
        ``feature_extractor=None``) or `StableDiffusionXLPipeline`.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind={kind!r} is not supported; use one of {_KINDS}")
    sdxl = kind == "sdxl"
    # Models initialise from the global RNG; fork it so callers' global state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = _tiny_vae(sdxl)
        if sdxl:
            unet = UNet2DConditionModel(
                **_unet_kwargs(),
                cross_attention_dim=64,  # 32 + 32 from the two text encoders
                attention_head_dim=(2, 4),
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=8,
                transformer_layers_per_block=(1, 1),
                projection_class_embeddings_input_dim=32 + 6 * 8,
            )
            text_encoder = CLIPTextModel(_text_config(32))
            text_encoder_2 = CLIPTextModelWithProjection(_text_config(32, projection_dim=32))
        else:
            unet = UNet2DConditionModel(
                **_unet_kwargs(),
                cross_attention_dim=32,
                attention_head_dim=(2, 4) if kind == "sd2" else 8,
                use_linear_projection=kind == "sd2",
            )
            text_encoder = CLIPTextModel(_text_config(32))
    prediction_type = "v_prediction" if kind == "sd2" else "epsilon"
    config = _scheduler_config(prediction_type)
    if sdxl:
        scheduler = EulerDiscreteScheduler(
            **{k: v for k, v in config.items() if k not in ("clip_sample", "set_alpha_to_one")}
        )
    else:
        scheduler = DDIMScheduler(**config)
    components = {
        "vae": vae.eval(),
        "unet": unet.eval(),
        "scheduler": scheduler,
        "text_encoder": text_encoder.eval(),
        "tokenizer": tiny_clip_tokenizer("!" if kind == "sd2" else "<|endoftext|>"),
    }
    if sdxl:
        components["text_encoder_2"] = text_encoder_2.eval()
        components["tokenizer_2"] = tiny_clip_tokenizer("!")
    else:
        components["safety_checker"] = None
        components["feature_extractor"] = None
    return components


def tiny_controlnet(kind: TinyKind = "sd15", seed: int = 0) -> ControlNetModel:
    """A random tiny ControlNet matching ``tiny_components(kind)``'s UNet.

    Args:
        kind (`str`, defaults to `"sd15"`): one of `"sd15"`, `"sd2"`, `"sdxl"`.
        seed (`int`, defaults to 0): seed of the random weights.

    Returns:
        `ControlNetModel`: conditioned on an RGB image at the VAE's resolution (factor 4).
    """
    if kind not in _KINDS:
        raise ValueError(f"kind={kind!r} is not supported; use one of {_KINDS}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kwargs = _unet_kwargs()
        common = dict(
            in_channels=4,
            layers_per_block=1,
            block_out_channels=kwargs["block_out_channels"],
            down_block_types=kwargs["down_block_types"],
            norm_num_groups=4,
            # The tiny pipelines' VAE downsamples by 4, so the conditioning embedding must too.
            conditioning_embedding_out_channels=(8, 16, 16),
        )
        if kind == "sdxl":
            net = ControlNetModel(
                **common,
                cross_attention_dim=64,
                attention_head_dim=(2, 4),
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=8,
                transformer_layers_per_block=(1, 1),
                projection_class_embeddings_input_dim=32 + 6 * 8,
            )
        else:
            net = ControlNetModel(
                **common,
                cross_attention_dim=32,
                attention_head_dim=(2, 4) if kind == "sd2" else 8,
                use_linear_projection=kind == "sd2",
            )
        # ControlNet's output convolutions start at zero (a no-op); random ones make the tiny
        # ControlNet actually steer the UNet, so tests can see that it is wired in.
        for name, param in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                torch.nn.init.normal_(param, std=0.05)
    return net.eval()


def save_tiny_pipeline(path: str | os.PathLike, kind: TinyKind = "sd15", seed: int = 0) -> Path:
    """Write a tiny random SD/SDXL folder laid out exactly like the real hub repositories.

    The folder is written by diffusers' own `StableDiffusionPipeline.save_pretrained` (or the
    SDXL one), so ``model_index.json`` names that class, just as in
    ``stable-diffusion-v1-5/stable-diffusion-v1-5`` or ``stabilityai/stable-diffusion-xl-base-1.0``,
    and it loads with ``RaimPipeline.from_pretrained(folder)`` or diffusers' own pipelines.

    Args:
        path (`str` or `os.PathLike`): output folder (created).
        kind (`str`, defaults to `"sd15"`): one of `"sd15"`, `"sd2"` (v-prediction), `"sdxl"`.
        seed (`int`, defaults to 0): seed of the random weights.

    Returns:
        `Path`: the folder.
    """
    components = tiny_components(kind, seed=seed)
    if kind == "sdxl":
        pipe = StableDiffusionXLPipeline(**components)
    else:
        pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    # transformers 5 writes only tokenizer.json; the hub repositories also hold the slow files
    # (vocab.json, merges.txt), which older transformers versions need. Add them the same way.
    for sub in ("tokenizer", "tokenizer_2"):
        folder = Path(path) / sub
        if folder.is_dir() and not (
            (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
        ):
            _write_tiny_clip_vocabulary(folder)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# SUPIR


def tiny_supir_components(
    unet: UNet2DConditionModel, vae: AutoencoderKL | None = None, seed: int = 0
) -> SupirComponents:
    """Random SUPIR components for a tiny SDXL UNet, with every connector and zero conv non-zero.

    SUPIR zero-initialises its LQ convolution and its connectors' output convolutions; here they
    get small random weights so that the adaptor actually changes the output (tests can see it).

    Args:
        unet (`UNet2DConditionModel`): A (tiny) SDXL UNet, e.g. ``tiny_components("sdxl")["unet"]``.
        vae (`AutoencoderKL`, *optional*): Its VAE, to shape the denoise encoder like its encoder.
        seed (`int`, *optional*, defaults to 0): Seed of the random weights.

    Returns:
        `SupirComponents`: Random components, in float32 on the CPU; ``unet`` shares ``unet``'s
        weights.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        control = SupirControlModel.from_unet_config(unet.config)
        supir_unet = SupirUNet2DConditionModel.from_unet(unet)
        if vae is not None:
            cfg = vae.config
            encoder = SupirDenoiseEncoder(
                in_channels=cfg.in_channels,
                latent_channels=cfg.latent_channels,
                block_out_channels=tuple(cfg.block_out_channels),
                layers_per_block=cfg.layers_per_block,
                norm_num_groups=cfg.norm_num_groups,
                act_fn=cfg.act_fn,
                mid_block_add_attention=cfg.get("mid_block_add_attention", True),
            )
        else:
            encoder = SupirDenoiseEncoder(
                block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4
            )
        with torch.no_grad():
            for p in list(control.lq_conv_in.parameters()) + list(
                supir_unet.project_modules.parameters()
            ):
                p.normal_(0.0, 0.05)
    return SupirComponents(control=control.eval(), unet=supir_unet, denoise_encoder=encoder.eval())


def tiny_supir_state_dict(
    unet: UNet2DConditionModel, vae: AutoencoderKL | None = None, seed: int = 0
) -> dict[str, torch.Tensor]:
    """:func:`tiny_supir_components` as a checkpoint in SUPIR's own key layout
    (``model.control_model.*``, ``model.diffusion_model.project_modules.*``,
    ``first_stage_model.denoise_encoder.*``), the way ``SUPIR-v0Q.ckpt`` holds them; load it with
    ``RaimPipeline.from_pretrained(..., supir=)``.
    """
    comps = tiny_supir_components(unet, vae, seed=seed)
    return to_supir_state_dict(comps.control, comps.unet, comps.denoise_encoder)


def save_tiny_supir_checkpoint(
    path: str | os.PathLike,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL | None = None,
    seed: int = 0,
) -> Path:
    """Write :func:`tiny_supir_state_dict` to ``path``: safetensors for ``.safetensors``, else a
    Lightning-style pickle (``{"state_dict": ...}``, as SUPIR's ``.ckpt`` files are).

    Returns:
        `Path`: the file.
    """
    state = tiny_supir_state_dict(unet, vae, seed=seed)
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    return path


# ---------------------------------------------------------------------------------------------
# Other stages


def tiny_prior(scale: int = 2, seed: int = 0) -> PriorModel:
    """A random tiny stage-1 restorer (SRVGGNetCompact, 8 features, 2 convolutions).

    Args:
        scale (`int`, defaults to 2): upscaling factor (1, 2, 3 or 4).
        seed (`int`, defaults to 0): seed of the random weights.

    Returns:
        `PriorModel`: usable as ``RaimPipeline(prior=...)`` and saved/loaded with it.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = Compact(
            num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=scale, act_type="prelu"
        )
    # Going through the state dict makes spandrel detect the architecture exactly as for a file.
    descriptor = spandrel.ModelLoader().load_from_state_dict(net.state_dict())
    return PriorModel.from_spandrel(descriptor).eval()


def tiny_segformer_segmenter(seed: int = 0, short_side: int = 64) -> TransformersSegmenter:
    """A randomly initialised two-stage SegFormer with the 150 ADE20K labels (stage 3).

    Args:
        seed (`int`, defaults to 0): seed of the random weights (drawn inside
            ``torch.random.fork_rng``, so the caller's RNG state is untouched).
        short_side (`int`, defaults to 64): images are resized so their short side has this
            length before segmentation.

    Returns:
        `TransformersSegmenter`: named ``"tiny-segformer"``; usable as
        ``ArtifactDetector(segmenter=...)``, and saved with ``segmenter.model.save_pretrained``.
    """
    config = SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 1],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        num_labels=len(ADE20K_CLASSES),
        id2label=dict(enumerate(ADE20K_CLASSES)),
        label2id={c: i for i, c in enumerate(ADE20K_CLASSES)},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SegformerForSemanticSegmentation(config)
    return TransformersSegmenter(
        model,
        short_side=short_side,
        tile=max(2 * short_side, 128),
        overlap=16,
        name="tiny-segformer",
    )


def tiny_sam(seed: int = 0) -> torch.nn.Module:
    """A randomly initialised SAM with tiny sizes (64 px input) for ``SamRefiner``.

    Needs the ``sam`` extra (``segment-anything``), like every SAM model.

    Args:
        seed (`int`, defaults to 0): seed of the random weights.

    Returns:
        `torch.nn.Module`: a ``segment_anything.modeling.Sam`` in eval mode.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_sam(
            image_size=64,
            patch_size=16,
            prompt_dim=16,
            encoder=(16, 1, 1, (0,)),
            decoder_mlp_dim=16,
            decoder_heads=1,
            iou_hidden_dim=16,
            window_size=2,
        )


# ---------------------------------------------------------------------------------------------
# Full-size components with random weights (benchmarks)
#
# Component configs of the real checkpoints (the config.json files of their hub repositories,
# minus bookkeeping keys such as _diffusers_version). Built with random weights they have the
# exact parameter counts and compute of the released models.

_SDXL_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

_SDXL_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# text_encoder: OpenAI CLIP ViT-L/14's text tower (also SD 1.x's text encoder).
_CLIP_L_TEXT_CONFIG: dict[str, Any] = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}

# text_encoder_2: OpenCLIP ViT-bigG/14's text tower with its projection.
_CLIP_BIGG_TEXT_CONFIG: dict[str, Any] = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "pad_token_id": 1,
    "projection_dim": 1280,
    "vocab_size": 49408,
}

_SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

_SD15_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}

_SD15_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

_SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

RANDOM_REPOS = {
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd15": "runwayml/stable-diffusion-v1-5",
}


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    # Modules are created in float32; casting to float32 again only makes diffusers warn.
    if dtype != torch.float32:
        module = module.to(dtype)
    return module.eval()


def random_components(
    kind: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """Full-size SDXL or SD 1.5 components with random weights, built directly on ``device``.

    Args:
        kind (`str`): `"sdxl"` or `"sd15"`.
        device (`str` or `torch.device`): where the weights are created (on CUDA the random
            initialisation of 3.5B parameters takes seconds instead of minutes).
        dtype (`torch.dtype`): weight dtype after initialisation.

    Returns:
        `dict`: ``vae``, ``unet``, ``text_encoder`` (and ``text_encoder_2``), tokenizer(s) and
        the checkpoint's scheduler, for `RaimPipeline(**components)`. The text encoders keep
        CLIP's 49408-token embedding tables (the released parameter counts); the tokenizers are
        :func:`tiny_clip_tokenizer`'s, whose ids all lie in that range.
    """
    if kind not in RANDOM_REPOS:
        raise ValueError(f"kind={kind!r} is not supported; use one of {sorted(RANDOM_REPOS)}")
    sdxl = kind == "sdxl"
    # A fixed seed keeps repeated runs comparable; fork_rng leaves the caller's RNG untouched.
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**(_SDXL_UNET_CONFIG if sdxl else _SD15_UNET_CONFIG))
        vae = AutoencoderKL(**(_SDXL_VAE_CONFIG if sdxl else _SD15_VAE_CONFIG))
        text_encoder = CLIPTextModel(CLIPTextConfig(**_CLIP_L_TEXT_CONFIG))
        text_encoder_2 = (
            CLIPTextModelWithProjection(CLIPTextConfig(**_CLIP_BIGG_TEXT_CONFIG)) if sdxl else None
        )
    components: dict[str, Any] = {
        "unet": _cast(unet, dtype),
        "vae": _cast(vae, dtype),
        "text_encoder": _cast(text_encoder, dtype),
        "tokenizer": tiny_clip_tokenizer("<|endoftext|>"),
    }
    if sdxl:
        components["text_encoder_2"] = _cast(text_encoder_2, dtype)
        components["tokenizer_2"] = tiny_clip_tokenizer("!")
        components["scheduler"] = EulerDiscreteScheduler.from_config(_SDXL_SCHEDULER_CONFIG)
    else:
        components["scheduler"] = PNDMScheduler.from_config(_SD15_SCHEDULER_CONFIG)
    return components
