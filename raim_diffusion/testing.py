"""Tiny random components for tests, notebooks and CPU demos.

Everything here is built from configs with random weights, the way diffusers' own fast tests do,
so it runs offline and on the CPU in a fraction of a second. The one real asset is the CLIP BPE
vocabulary: it is rebuilt from the copy that the ``openai-clip`` package ships, so prompts are
tokenized exactly as by the real SD/SDXL tokenizers (only the embeddings are random).

Example:

```py
from raim_diffusion.testing import save_tiny_pipeline, tiny_prior
from raim_diffusion.pipeline import RaimPipeline

folder = save_tiny_pipeline("/tmp/tiny-sd15", kind="sd15")
pipe = RaimPipeline.from_pretrained(folder, prior=tiny_prior())
```
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import spandrel
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from spandrel.architectures.Compact.__arch.SRVGG import SRVGGNetCompact
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from .prior import PriorModel
from .resources import cache_dir

__all__ = [
    "TinyKind",
    "clip_bpe_path",
    "tiny_clip_tokenizer",
    "tiny_components",
    "tiny_controlnet",
    "tiny_prior",
    "save_tiny_pipeline",
]

TinyKind = Literal["sd15", "sd2", "sdxl"]
_KINDS = ("sd15", "sd2", "sdxl")

# Number of BPE merges that CLIP uses from its vocabulary file (49152 - 256 bytes - 2 specials).
_CLIP_NUM_MERGES = 49152 - 256 - 2
_CLIP_VOCAB_SIZE = 49408
_BOS_ID = 49406
_EOS_ID = 49407


def clip_bpe_path() -> Path:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` shipped by the ``openai-clip`` package.

    Returns:
        `Path`: the gzip file with CLIP's BPE merges.

    Raises:
        ModuleNotFoundError: when ``openai-clip`` is not installed (``pip install openai-clip``).
    """
    # find_spec does not execute clip/__init__.py, which would import torchvision and friends.
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "raim_diffusion.testing needs the CLIP BPE vocabulary shipped by the `openai-clip` "
            "package; install it with `pip install openai-clip`."
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "bpe_simple_vocab_16e6.txt.gz"
        if path.is_file():
            return path
    raise ModuleNotFoundError(
        "`openai-clip` is installed but its bpe_simple_vocab_16e6.txt.gz is missing"
    )


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


def _default_cache_dir() -> Path:
    return cache_dir("clip-tokenizer")


def _write_clip_vocab(folder: Path) -> None:
    with gzip.open(clip_bpe_path()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : _CLIP_NUM_MERGES + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(merge.split()) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    # Write to temporary names first: several test workers may build the cache at once.
    fd, tmp_vocab = tempfile.mkstemp(dir=folder, suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f, ensure_ascii=False)
    fd, tmp_merges = tempfile.mkstemp(dir=folder, suffix=".txt")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    os.replace(tmp_merges, folder / "merges.txt")
    os.replace(tmp_vocab, folder / "vocab.json")


def tiny_clip_tokenizer(
    pad_token: str = "<|endoftext|>", cache_dir: str | os.PathLike | None = None
) -> CLIPTokenizer:
    """The real CLIP tokenizer (49408 tokens, 77 positions), built offline.

    Args:
        pad_token (`str`, defaults to `"<|endoftext|>"`):
            SD 1.x and SDXL's first tokenizer pad with `"<|endoftext|>"`, SD 2.x and SDXL's second
            tokenizer with `"!"`.
        cache_dir (`str` or `os.PathLike`, *optional*):
            Where vocab.json / merges.txt are cached; defaults to ``~/.cache/raim_diffusion``.

    Returns:
        `CLIPTokenizer`: a tokenizer equal to ``openai/clip-vit-large-patch14``'s.
    """
    folder = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        _write_clip_vocab(folder)
    # from_pretrained reads vocab.json/merges.txt the same way in transformers 4 and 5.
    return CLIPTokenizer.from_pretrained(
        str(folder),
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token=pad_token,
        model_max_length=77,
    )


def _text_config(hidden_size: int, projection_dim: int | None = None) -> CLIPTextConfig:
    kwargs = {}
    if projection_dim is not None:
        kwargs["projection_dim"] = projection_dim
    return CLIPTextConfig(
        vocab_size=_CLIP_VOCAB_SIZE,
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

    The shapes follow the real models (4 latent channels, CLIP vocabulary and 77 positions,
    SDXL's two text encoders and ``text_time`` micro-conditioning) at a scale that runs in
    milliseconds: VAE factor 2, UNet with two levels, 32-wide text encoders.

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
        scheduler = EulerDiscreteScheduler(**{k: v for k, v in config.items() if k not in (
            "clip_sample", "set_alpha_to_one")})
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
        `ControlNetModel`: conditioned on an RGB image at the VAE's resolution (factor 2).
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
        net = SRVGGNetCompact(
            num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=scale, act_type="prelu"
        )
    # Going through the state dict makes spandrel detect the architecture exactly as for a file.
    descriptor = spandrel.ModelLoader().load_from_state_dict(net.state_dict())
    return PriorModel.from_spandrel(descriptor).eval()


def save_tiny_pipeline(
    path: str | os.PathLike, kind: TinyKind = "sd15", seed: int = 0
) -> Path:
    """Write a tiny random SD/SDXL folder laid out exactly like the real hub repositories.

    The folder is written by diffusers' own `StableDiffusionPipeline.save_pretrained` (or the
    SDXL one), so ``model_index.json`` names that class, just as in
    ``stable-diffusion-v1-5/stable-diffusion-v1-5`` or ``stabilityai/stable-diffusion-xl-base-1.0``.

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
    vocab_dir = _default_cache_dir()
    for sub in ("tokenizer", "tokenizer_2"):
        folder = Path(path) / sub
        if not folder.is_dir():
            continue
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                shutil.copyfile(vocab_dir / name, folder / name)
    return Path(path)
