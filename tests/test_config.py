"""Run configs: presets load and validate, overrides apply, tiny swaps keep the structure."""

from __future__ import annotations

import inspect

import pytest
from omegaconf import OmegaConf

from raim_diffusion.pipeline import RaimPipeline
from raim_diffusion.runner.config import (
    CALL_ARGUMENTS,
    GENERATE_LOADER_FIELDS,
    LOADER_KEYS,
    GenerateConfig,
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
            if value is not None and key not in GENERATE_LOADER_FIELDS:
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
    kwargs = call_kwargs(config)
    assert kwargs["num_inference_steps"] == 4 and kwargs["guidance_scale"] == 0.0
    assert "model" not in kwargs and "min_size" not in kwargs
    resolved = resolved_call_kwargs(config)
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
    # priors become tiny random networks of the same scale (x2 for files): seconds per image
    assert make_tiny(load_config("xhs-iag")).prior.name == "tiny:prior-x2"
    assert make_tiny(load_config("sdxl")).prior.name == "tiny:prior-x4"
    assert make_tiny(load_config("sdxl")).tiny and not load_config("sdxl").tiny
    # a tiny run builds a random network of the architecture the config names
    assert make_tiny(load_config("xhs-iag")).fuse.fusion == "tiny:FusionNet"
    assert make_tiny(load_config("so-elegant")).fuse.fusion == "tiny:AlignFusionNet"
    hit = make_tiny(load_config("hit-iil"))
    assert list(hit.prior.name) == ["tiny:prior-x2", "tiny:prior-x2"]  # two x1 weight files
    assert list(hit.prior.weights) == [0.8, 0.2]
    assert make_tiny(load_config("marshal")).generate.min_size == 256


def test_every_config_key_reaches_the_pipeline_or_a_loader():
    """No dead settings: each key is a call argument or a loader setting, never both."""
    from raim_diffusion.runner.config import _dotted_keys

    params = inspect.signature(RaimPipeline.__call__).parameters
    leaves = [k for k in _dotted_keys() if k not in ("prior", "generate", "detect", "fuse")]
    for key in leaves:
        assert (key in CALL_ARGUMENTS) != (key in LOADER_KEYS), key
    for key, arg in CALL_ARGUMENTS.items():
        assert arg in params, (key, arg)
    # Every GenerateConfig field but the model choice is a pipeline parameter of the same name.
    for name in GenerateConfig.__dataclass_fields__:
        if name not in GENERATE_LOADER_FIELDS:
            assert CALL_ARGUMENTS[f"generate.{name}"] == name
    # ... and every sampling parameter of the pipeline can be set from a config.
    runtime_only = {"self", "image", "generator", "output_type", "return_dict", "stages",
                    "detector", "callback_on_step_end", "callback_on_step_end_tensor_inputs",
                    "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                    "negative_pooled_prompt_embeds"}
    assert set(params) - runtime_only == set(CALL_ARGUMENTS.values())


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("generate.strenght=0.3", "generate.strenght; did you mean generate.strength"),
        ("fuse.tiles=3", "did you mean fuse.tile"),
        ("strength=0.3", "did you mean generate.strength"),
        ("generate.torch_dtype=float16", "is now dtype"),
        ("prior.outscale=2", "is now upscale"),
        ("prior.name=${oc.env:HOME}", "resolver"),
        ("generate.prompt=${oc.decode:'1'}", "resolver"),
        ("generate.prompt=${generate.prompt}", "resolved"),
        ("generate.strength=2", "generate.strength=2.0"),
        ("generate.guidance_scale=nan", "guidance_scale"),
        ("generate.eta=nan", "eta"),
        ("upscale=nan", "upscale"),
        ("upscale=0", "upscale"),
        ("generate.num_inference_steps=0", "num_inference_steps"),
        ("generate.num_inference_steps=1", "runs no denoising step"),
        ("generate.consistency_schedule=cosin", "consistency_schedule"),
        ("generate.consistency_schedule_kwargs={powr: 2}", "powr"),
        ("prior.input_blend=1.5", "prior.input_blend"),
        ("stages=[prior,fuse]", "needs 'detect'"),
        ("stages=[prior,detect]", "needs 'generate'"),
        ("fuse.tile=0", "fuse.tile"),
        ("dtype=float8", "dtype"),
    ],
)
def test_every_setting_is_checked_at_load_time(override, match):
    """Misspelt keys name the closest valid one; bad values fail before any model loads."""
    with pytest.raises(ValueError, match=match.replace("[", r"\[").replace("?", r"\?")):
        load_config("sdxl", [override])


def test_references_resolve_and_secrets_never_reach_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv("RAIM_TEST_SECRET", "hunter2")
    config = load_config("sdxl", ["generate.prompt=sharp", "generate.negative_prompt="
                                  "${generate.prompt}"])
    assert config.generate.negative_prompt == "sharp"
    yaml = tmp_path / "leak.yaml"
    yaml.write_text("generate:\n  prompt: a photo ${oc.env:RAIM_TEST_SECRET}\n")
    with pytest.raises(ValueError, match="resolver") as info:
        load_config(yaml)
    assert "hunter2" not in str(info.value)


def test_schedule_parameters_go_through_one_argument():
    config = load_config("sdxl", ["generate.consistency_schedule=power",
                                  "generate.consistency_schedule_kwargs={power: 4}"])
    assert call_kwargs(config)["consistency_schedule_kwargs"] == {"power": 4}
    assert call_kwargs(load_config("mialgo"))["input_blend"] == 0.2
    assert call_kwargs(load_config("sdxl", ["fuse.tile=256"]))["fusion_tile"] == 256


def test_make_tiny_keeps_a_trained_local_fusion_folder(tmp_path):
    """A network just trained with raim train-fusion runs under --tiny; a named folder that is
    not here becomes a tiny random network of the configured architecture."""
    trained = tmp_path / "fusion"
    trained.mkdir()
    config = load_config("so-elegant", [f"fuse.fusion={trained}"])
    assert make_tiny(config).fuse.fusion == str(trained)
    assert make_tiny(load_config("so-elegant")).fuse.fusion == "tiny:AlignFusionNet"
