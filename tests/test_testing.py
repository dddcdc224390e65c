"""The tiny test components: a real CLIP tokenizer, and folders like the hub's."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from raim_diffusion.testing import (
    clip_bpe_path,
    save_tiny_pipeline,
    tiny_clip_tokenizer,
    tiny_controlnet,
    tiny_prior,
)

TEXTS = [
    "a photo of a cat",
    "Hello, World! It's a 4K-HDR   photo... #nofilter",
    "naïve café über 東京 🙂",
    "a photograph of an astronaut riding a horse, highly detailed, 8k",
]


def _simple_tokenizer():
    # Load clip/simple_tokenizer.py by path: `import clip` would pull in torchvision.
    path = clip_bpe_path().parent / "simple_tokenizer.py"
    spec = importlib.util.spec_from_file_location("_clip_simple_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def test_tokenizer_matches_openai_clip(tmp_path):
    pytest.importorskip("ftfy")
    reference = _simple_tokenizer()
    tokenizer = tiny_clip_tokenizer(cache_dir=tmp_path)
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    for text in TEXTS:
        ids = tokenizer(text).input_ids
        assert ids == [49406, *reference.encode(text), 49407], text
    # Cached files are reused.
    again = tiny_clip_tokenizer(cache_dir=tmp_path)
    assert again(TEXTS[0]).input_ids == tokenizer(TEXTS[0]).input_ids
    padded = tiny_clip_tokenizer("!", cache_dir=tmp_path)(TEXTS[0], padding="max_length").input_ids
    assert len(padded) == 77 and padded[-1] == 0  # "!" is token 0, as in SD 2.x


@pytest.mark.parametrize(
    ("kind", "cls", "scheduler"),
    [
        ("sd15", StableDiffusionPipeline, "DDIMScheduler"),
        ("sdxl", StableDiffusionXLPipeline, "EulerDiscreteScheduler"),
    ],
)
def test_saved_folders_look_like_hub_repos(tmp_path, kind, cls, scheduler):
    folder = save_tiny_pipeline(tmp_path / kind, kind)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == cls.__name__
    assert index["scheduler"] == ["diffusers", scheduler]
    for sub in ("unet", "vae", "text_encoder", "tokenizer"):
        assert (folder / sub).is_dir()
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "tokenizer" / "vocab.json").is_file()
    pipe = cls.from_pretrained(folder)
    assert pipe.vae_scale_factor == 4


def test_tiny_prior_and_controlnet_shapes():
    prior = tiny_prior(scale=2)
    out = prior(torch.rand(1, 3, 5, 7))
    assert out.shape == (1, 3, 10, 14)
    net = tiny_controlnet("sd15")
    down, mid = net(
        torch.randn(1, 4, 8, 8),
        10,
        encoder_hidden_states=torch.randn(1, 77, 32),
        controlnet_cond=torch.rand(1, 3, 32, 32),  # the VAE factor (4) times the latent
        return_dict=False,
    )
    assert mid.abs().sum() > 0  # not the zero-initialised no-op
    assert down[0].shape[-2:] == (8, 8)


def test_bad_kind():
    with pytest.raises(ValueError, match="kind"):
        save_tiny_pipeline("unused", "sd3")
