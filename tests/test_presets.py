"""The team presets (configs/*.yaml), docs/presets.md and `raim presets`.

The end-to-end check (every preset with --tiny writes exactly the input size) lives in
tests/test_restore_cli.py (`-k every_preset`).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from raim_diffusion.artifacts.segmentation import DEFAULT_MASK2FORMER
from raim_diffusion.diffusion.guidance import consistency_weights
from raim_diffusion.resources import data_dir
from raim_diffusion.runner.cli import main
from raim_diffusion.runner.commands.presets import model_needs
from raim_diffusion.runner.config import (
    call_kwargs,
    list_presets,
    load_config,
    make_tiny,
    validate_config,
)

# Preset name -> the team's name as the report and docs/presets.md write it.
TEAMS = {
    "xhs-iag": "Xhs-IAG",
    "so-elegant": "So Elegant",
    "iip-ir": "IIP_IR",
    "mialgo": "MiAlgo",
    "hit-iil": "HIT-IIL",
    "marshal": "Marshal",
}
DOCS = Path(__file__).resolve().parents[1] / "docs" / "presets.md"
# SUPIR's default prompts (Fanghua-Yu/SUPIR, test.py / README).
SUPIR_PROMPT = (
    "Cinematic, High Contrast, highly detailed, taken using a Canon EOS R camera, hyper detailed "
    "photo - realistic maximum detail, 32k, Color Grading, ultra HD, extreme meticulous "
    "detailing, skin pore detailing, hyper sharpness, perfect without deformations."
)
SUPIR_NEGATIVE = (
    "painting, oil painting, illustration, drawing, art, sketch, oil painting, cartoon, CG Style, "
    "3D render, unreal engine, blurring, dirty, messy, worst quality, low quality, frames, "
    "watermark, signature, jpeg artifacts, deformed, lowres, over-smooth"
)


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache and a working folder without weights/: nothing is present."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return cache


def _cache_hub_file(cache: Path, repo: str, filename: str) -> None:
    """Lay out one file of ``repo`` the way huggingface_hub caches it."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / filename).write_text("{}")


@pytest.mark.parametrize("preset", sorted(TEAMS))
def test_every_team_preset_loads_validates_and_names_its_files(preset):
    assert preset in list_presets()
    config = load_config(preset)
    validate_config(config)
    validate_config(make_tiny(config))
    assert config.description.startswith(TEAMS[preset]), config.description
    # RAIM is same-size restoration: no team preset asks for another size.
    assert config.upscale is None and "upscale" not in call_kwargs(config)
    header = (data_dir("configs") / f"{preset}.yaml").read_text().split("\ndescription:")[0]
    assert "Needs:" in header and "docs/presets.md" in header
    # The header names every model file or id the preset loads.
    for need in model_needs(config):
        assert need.source in header, (preset, need.source)


def test_xhs_iag_carries_the_reports_supir_settings():
    config = load_config("xhs-iag")
    gen = config.generate
    assert gen.prompt == SUPIR_PROMPT and gen.negative_prompt == SUPIR_NEGATIVE
    assert gen.num_inference_steps == 100 and gen.guidance_scale == 2.0
    assert gen.guidance_scale_start == 1.0
    assert gen.s_churn == 5.0 and gen.s_noise == 1.01
    assert gen.scheduler == "EulerDiscreteScheduler"
    # Restoration guidance off (SUPIR's s_stage1 = -1), in SUPIR's schedule once turned on.
    assert gen.consistency_weight == 0.0 and gen.consistency_schedule == "supir"
    assert gen.color_fix == "wavelet" and gen.min_size == 1024
    assert config.detect.segmenter == DEFAULT_MASK2FORMER
    assert config.detect.params == "desra-default"
    assert list(config.stages) == ["prior", "generate", "detect", "fuse"]
    assert config.fuse.fusion == "weights/fusion-xhs-iag"
    assert (
        "Juggernaut-XL_v9_RunDiffusionPhoto_v2.safetensors"
        in (data_dir("configs") / "xhs-iag.yaml").read_text()
    )


def test_so_elegant_guides_every_step():
    gen = load_config("so-elegant").generate
    run = int(gen.num_inference_steps * gen.strength)
    for steps in (1, 2, run, gen.num_inference_steps):
        w = consistency_weights(
            gen.consistency_schedule,
            gen.consistency_weight,
            steps,
            stop=gen.consistency_stop,
            **(gen.consistency_schedule_kwargs or {}),
        )
        assert len(w) == steps and bool((w > 0).all()), (steps, w)


def test_other_team_presets_follow_the_report():
    iip = load_config("iip-ir")
    assert list(iip.stages) == ["prior", "generate"]
    assert iip.prior.name == "weights/HAT_SRx2.pth" and iip.generate.model == "stabilityai/sd-turbo"
    assert iip.generate.min_size == 1024 and iip.generate.consistency_weight == 0.0
    marshal = load_config("marshal")
    assert list(marshal.stages) == ["generate"]  # from the LR latent: no prior
    assert marshal.generate.model == "stabilityai/stable-diffusion-2-base"
    assert marshal.generate.min_size == 2048 and marshal.generate.controlnet is None
    hit = load_config("hit-iil")
    assert list(hit.stages) == ["prior"] and list(hit.prior.weights) == [0.8, 0.2]
    assert [Path(n).name for n in hit.prior.name] == [
        "hit-iil-realesrgan-x1.pth",
        "hit-iil-restormer-x1.pth",
    ]
    mialgo = load_config("mialgo")
    assert list(mialgo.stages) == ["prior"] and 0 < mialgo.prior.input_blend < 1


def test_docs_cover_every_team_point_by_point():
    text = DOCS.read_text()
    sections = re.split(r"^## ", text, flags=re.M)
    for preset, team in TEAMS.items():
        (section,) = [s for s in sections if s.startswith(f"{team} (`{preset}`)")]
        assert "| report says | preset does | why different |" in section, team
        rows = [line for line in section.splitlines() if line.startswith("| ")]
        assert len(rows) >= 4, team  # header, separator and at least two points
    (missing,) = [s for s in sections if s.startswith("What the library cannot express yet")]
    for topic in (
        "not public",
        "Single-file SDXL",
        "SUPIR's weights",
        "learned blend",
    ):
        assert topic.lower() in missing.lower(), topic
    # Implemented since: the so-elegant section points at the alignment network.
    (elegant,) = [s for s in sections if s.startswith("So Elegant (`so-elegant`)")]
    assert "AlignFusionNet" in elegant and "deformable" in elegant
    # The Xhs-IAG quotes the issue carries.
    for quote in ("window glass is very clean", "100 EDM steps", "s_cfg 2.0", "Mask2Former"):
        assert quote in text, quote


def test_raim_presets_lists_every_preset_and_marks_missing_files(empty_hub_cache, capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in list_presets():
        assert re.search(rf"^{re.escape(name)}\s+\S", out, flags=re.M), name
    assert re.search(r"missing\s+prior\.name\s+weights/SRFormer_SRx4_DF2K\.pth", out)
    assert re.search(r"missing\s+generate\.model\s+stabilityai/stable-diffusion-xl-base-1\.0", out)
    assert re.search(r"missing\s+detect\.segmenter\s+" + re.escape(DEFAULT_MASK2FORMER), out)
    assert re.search(r"missing\s+fuse\.fusion\s+weights/fusion-xhs-iag", out)
    assert re.search(r"present\s+generate\.model\s+tiny:sd15", out)

    # A local file and a cached hub model count as present; nothing is downloaded.
    Path("weights").mkdir()
    Path("weights/SRFormer_SRx4_DF2K.pth").write_bytes(b"")
    _cache_hub_file(empty_hub_cache, "stabilityai/stable-diffusion-xl-base-1.0", "model_index.json")
    _cache_hub_file(empty_hub_cache, DEFAULT_MASK2FORMER, "config.json")
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"present\s+prior\.name\s+weights/SRFormer_SRx4_DF2K\.pth", out)
    assert re.search(r"present\s+generate\.model\s+stabilityai/stable-diffusion-xl-base-1\.0", out)
    assert re.search(r"present\s+detect\.segmenter\s+" + re.escape(DEFAULT_MASK2FORMER), out)
    assert re.search(r"missing\s+fuse\.fusion\s+weights/fusion-xhs-iag", out)


def test_raim_presets_name_prints_yaml_that_loads_back(empty_hub_cache, capsys, tmp_path):
    assert main(["presets", "xhs-iag", "generate.num_inference_steps=20"]) == 0
    out = capsys.readouterr().out
    assert "missing" in out and "weights/fusion-xhs-iag" in out
    saved = tmp_path / "saved.yaml"
    saved.write_text(out)
    expected = load_config("xhs-iag", ["generate.num_inference_steps=20"])
    assert OmegaConf.to_container(load_config(saved)) == OmegaConf.to_container(expected)


@pytest.mark.parametrize(
    "argv",
    [
        ["presets", "nope"],
        ["presets", "sdxl", "generate.bogus=1"],
        ["presets", "sdxl", "generate.strength=2"],
    ],
)
def test_raim_presets_errors_are_one_line_and_exit_2(argv, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raim presets: "), captured.err
    assert captured.out == ""


def test_model_needs_reads_segmenter_names_like_the_loader(empty_hub_cache):
    from raim_diffusion.artifacts.segmentation import DEFAULT_SEGFORMER

    def segmenter_sources(name):
        config = load_config("sdxl", [f"detect.segmenter={name}"])
        return [n.source for n in model_needs(config) if n.key == "detect.segmenter"]

    assert segmenter_sources("none") == []
    assert segmenter_sources("segformer") == [DEFAULT_SEGFORMER]
    assert segmenter_sources("mask2former") == [DEFAULT_MASK2FORMER]
    assert segmenter_sources("transformers:someone/seg") == ["someone/seg"]
    assert segmenter_sources("'mmseg:seg.py:seg.pth'") == ["seg.py", "seg.pth"]
    # Stages that do not run need nothing; tiny models are made on use.
    prior_only = load_config("sdxl", ["stages=[prior]"])
    assert [n.key for n in model_needs(prior_only)] == ["prior.name"]
    tiny = model_needs(make_tiny(load_config("xhs-iag")))
    assert all(n.present for n in tiny), tiny
