"""Run configs: presets load and validate, overrides apply, tiny swaps keep the structure."""

from __future__ import annotations

import inspect

import pytest
from omegaconf import OmegaConf

from raim_diffusion.pipeline import RaimPipeline
from raim_diffusion.runner.config import (
    call_kwargs,
    list_presets,
    load_config,
    make_tiny,
    resolved_call_kwargs,
)

PRESETS = ["sdxl", "sd15", "sd-turbo", "prior-only", "tiny", "xhs-iag", "so-elegant", "mialgo",
           "iip-ir", "hit-iil", "marshal"]


def test_every_documented_preset_ships_and_loads():
    assert set(PRESETS) <= set(list_presets())
    for name in PRESETS:
        config = load_config(name)
        assert config.description, name
        # Every sampling setting a preset names is a real argument of the pipeline.
        accepted = inspect.signature(RaimPipeline.__call__).parameters
        generate = OmegaConf.to_container(config.generate)
        for key, value in generate.items():
            if value is not None and key not in ("model", "controlnet", "scheduler",
                                                 "torch_dtype"):
                assert key in accepted, (name, key)


def test_overrides_and_types_are_checked(tmp_path):
    config = load_config("sdxl", ["generate.num_inference_steps=12", "detect.params=strict-text"])
    assert config.generate.num_inference_steps == 12 and config.detect.params == "strict-text"
    with pytest.raises(ValueError, match="num_inference_steps"):
        load_config("sdxl", ["generate.num_inference_steps=many"])
    with pytest.raises(ValueError, match="not_a_key"):
        load_config("sdxl", ["generate.not_a_key=1"])
    with pytest.raises(ValueError, match="key.sub=value"):
        load_config("sdxl", ["generate.num_inference_steps"])
    with pytest.raises(ValueError, match="presets"):
        load_config("no-such-preset")
    with pytest.raises(ValueError, match="stages"):
        load_config("sdxl", ["stages=[prior,paint]"])
    yaml = tmp_path / "mine.yaml"
    yaml.write_text("stages: [prior]\nprior:\n  name: realesr-animevideov3-x4\n")
    assert load_config(yaml).prior.name == "realesr-animevideov3-x4"


def test_call_kwargs_pass_only_what_the_config_sets():
    config = load_config("sd-turbo")
    kwargs = call_kwargs(config.generate)
    assert kwargs["num_inference_steps"] == 4 and kwargs["guidance_scale"] == 0.0
    assert "model" not in kwargs and "min_size" not in kwargs
    resolved = resolved_call_kwargs(config.generate)
    default = inspect.signature(RaimPipeline.__call__).parameters["color_fix"].default
    assert resolved["color_fix"] == default and resolved["num_inference_steps"] == 4


def test_make_tiny_keeps_structure_and_swaps_models():
    for name in ("xhs-iag", "hit-iil", "marshal", "sdxl"):
        config = load_config(name)
        tiny = make_tiny(config)
        assert list(tiny.stages) == list(config.stages)
        assert tiny.generate.model.startswith("tiny:")
        assert tiny.detect.segmenter is None
        assert tiny.generate.consistency_weight == config.generate.consistency_weight
    assert make_tiny(load_config("sdxl")).generate.model == "tiny:sdxl"
    assert make_tiny(load_config("xhs-iag")).prior.name == "realesr-animevideov3-x2"
    assert make_tiny(load_config("xhs-iag")).fuse.fusion == "tiny:fusion"
    hit = make_tiny(load_config("hit-iil"))
    assert list(hit.prior.name) == ["realesrgan-x4plus", "realesr-animevideov3-x4"]
    assert list(hit.prior.weights) == [0.8, 0.2]
    assert make_tiny(load_config("marshal")).generate.min_size == 256
