"""The tiny test components: a self-contained CLIP tokenizer, and folders like the hub's."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
import unicodedata
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from raim_diffusion import testing
from raim_diffusion.testing import (
    TINY_CLIP_VOCAB_SIZE,
    random_components,
    save_tiny_pipeline,
    tiny_clip_tokenizer,
    tiny_clip_vocabulary,
    tiny_components,
    tiny_controlnet,
    tiny_prior,
)

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "a photo of a cat",
    "Hello, World! It's a 4K-HDR   photo... #nofilter",
    "naïve café über 東京 🙂",
    "a photograph of an astronaut riding a horse, highly detailed, 8k",
]
# As long as the presets' default prompts and longer: more than 77 tokens.
LONG = (
    "Cinematic, high contrast, highly detailed, taken using a Canon EOS R camera, "
    "hyper detailed photo-realistic maximum detail, 32k, color grading, ultra HD, "
    "extreme meticulous detailing, skin pore detailing, hyper sharpness, perfect without "
    "deformations. 🙂 naïve 東京"
)


def _squash(text: str) -> str:
    # CLIP's normalisation (NFC, lower case) without the whitespace that decode() re-inserts.
    return "".join(unicodedata.normalize("NFC", text).lower().split())


def test_vocabulary_is_small_and_laid_out_like_clips():
    vocab, merges = tiny_clip_vocabulary()
    assert len(vocab) == TINY_CLIP_VOCAB_SIZE < 1000
    assert sorted(vocab.values()) == list(range(TINY_CLIP_VOCAB_SIZE))
    assert vocab["!"] == 0 and vocab["!</w>"] == 256  # SD 2.x pads with "!" = token 0
    assert vocab["<|startoftext|>"] == TINY_CLIP_VOCAB_SIZE - 2
    assert vocab["<|endoftext|>"] == TINY_CLIP_VOCAB_SIZE - 1
    for merge in merges:
        assert "".join(merge.split()) in vocab, merge


def test_tokenizer_encodes_any_text_without_unknown_tokens():
    tokenizer = tiny_clip_tokenizer()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert (bos, eos) == (TINY_CLIP_VOCAB_SIZE - 2, TINY_CLIP_VOCAB_SIZE - 1)
    assert len(tokenizer) == TINY_CLIP_VOCAB_SIZE and tokenizer.model_max_length == 77
    for text in TEXTS:
        ids = tokenizer(text).input_ids
        # The unknown token is eos: it must not appear inside, every byte has a token.
        assert ids[0] == bos and ids[-1] == eos and eos not in ids[1:-1], text
        assert all(0 <= i < TINY_CLIP_VOCAB_SIZE for i in ids)
        assert _squash(tokenizer.decode(ids, skip_special_tokens=True)) == _squash(text), text
    # Words end with "</w>" and the merges apply, as in CLIP's BPE.
    assert tokenizer.tokenize("The photo") == ["the</w>", "photo</w>"]
    assert tokenizer.tokenize("xyz") == ["x", "y", "z</w>"]


def test_long_prompts_are_truncated_to_77():
    tokenizer = tiny_clip_tokenizer()
    assert len(tokenizer(LONG).input_ids) > 77
    ids = tokenizer(LONG, padding="max_length", truncation=True, max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    short = tiny_clip_tokenizer("!")(TEXTS[0], padding="max_length").input_ids
    assert len(short) == 77 and short[-1] == 0  # padded with "!", as in SD 2.x
    again = tiny_clip_tokenizer()
    assert again(LONG).input_ids == tokenizer(LONG).input_ids  # deterministic


@pytest.mark.parametrize("kind", ["sd15", "sd2", "sdxl"])
def test_text_encoders_match_the_tokenizers(kind):
    components = tiny_components(kind)
    pairs = [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")]
    for tok_name, enc_name in pairs[: 2 if kind == "sdxl" else 1]:
        tokenizer, encoder = components[tok_name], components[enc_name]
        assert encoder.config.vocab_size == len(tokenizer) == TINY_CLIP_VOCAB_SIZE
        assert encoder.config.eos_token_id == tokenizer.eos_token_id
        ids = tokenizer(LONG, padding="max_length", truncation=True, return_tensors="pt")
        with torch.no_grad():
            out = encoder(ids.input_ids)
        assert out.last_hidden_state.shape == (1, 77, 32)


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
    vocab = json.loads((folder / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    assert vocab == tiny_clip_vocabulary()[0]
    assert (folder / "tokenizer" / "merges.txt").stat().st_size < 1024
    pipe = cls.from_pretrained(folder)
    assert pipe.vae_scale_factor == 4
    assert pipe.tokenizer(LONG).input_ids == tiny_clip_tokenizer()(LONG).input_ids


_NO_CLIP = """
import sys
sys.modules["clip"] = None  # openai-clip, as in a plain `pip install -e .`
import json
import torch
from raim_diffusion.pipeline import RaimPipeline
from raim_diffusion.testing import save_tiny_pipeline

try:
    import clip  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("openai-clip is still importable")
report = {}
for kind in ("sd15", "sdxl"):
    folder = save_tiny_pipeline(sys.argv[1] + "/" + kind, kind)
    pipe = RaimPipeline.from_pretrained(folder)
    encoders = [(pipe.tokenizer, pipe.text_encoder)]
    if kind == "sdxl":
        encoders.append((pipe.tokenizer_2, pipe.text_encoder_2))
    for tokenizer, encoder in encoders:
        ids = tokenizer(sys.argv[2], padding="max_length", truncation=True, return_tensors="pt")
        with torch.no_grad():
            hidden = encoder(ids.input_ids, output_hidden_states=True).hidden_states[-2]
        report.setdefault(kind, []).append([len(tokenizer), list(hidden.shape)])
print(json.dumps(report))
"""


def test_tiny_pipelines_need_no_openai_clip(tmp_path):
    # An empty cache: nothing built earlier (with openai-clip present) may be reused.
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
        "RAIM_CACHE": str(tmp_path / "cache"),
    }
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_NO_CLIP), str(tmp_path), LONG],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["sd15"] == [[TINY_CLIP_VOCAB_SIZE, [1, 77, 32]]]
    assert report["sdxl"] == [[TINY_CLIP_VOCAB_SIZE, [1, 77, 32]]] * 2


def test_no_private_spandrel_imports():
    source = inspect.getsource(testing)
    assert "__arch" not in source and "spandrel.architectures.Compact import Compact" in source


def test_random_components_refuse_unknown_kinds():
    with pytest.raises(ValueError, match="kind"):
        random_components("sd3", device="meta")


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
