"""OmegaConf structured configs for whole restoration runs, and preset loading.

A run is described by [`RunConfig`]: which stages run, the prior, the diffusion model and its
sampling settings, the detector's parameter set and the fusion network. Presets live in the
shipped ``configs/`` folder (``raim restore --config sdxl``); a YAML path works too, and dotted
overrides (``generate.num_inference_steps=20``) are applied on top.

Sampling settings left at `None` are not passed to [`RaimPipeline.__call__`], so the pipeline's
own defaults stay the single source of truth; [`resolved_call_kwargs`] fills them in for the
record written next to the outputs.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from raim_diffusion.resources import data_dir

__all__ = [
    "STAGES",
    "TINY_PREFIX",
    "DetectConfig",
    "FuseConfig",
    "GenerateConfig",
    "PriorConfig",
    "RunConfig",
    "call_kwargs",
    "list_presets",
    "load_config",
    "make_tiny",
    "resolved_call_kwargs",
    "validate_config",
]

STAGES = ("prior", "generate", "detect", "fuse")


@dataclass
class PriorConfig:
    """Stage 1: the fidelity prior (built-in name, weights file or saved folder)."""

    name: Any = "realesrgan-x4plus"  # a name/path, or a list of them for an ensemble
    weights: list[float] | None = None  # ensemble weights, e.g. [0.8, 0.2]
    tile: int | None = None
    outscale: float | None = None  # output scale of a prior-only run (default: the prior's)
    input_blend: float = 0.0  # alpha of the (upsampled) input blended into a prior-only result


@dataclass
class GenerateConfig:
    """Stage 2: the diffusion model and the arguments of ``RaimPipeline.__call__``."""

    model: str = "stabilityai/stable-diffusion-xl-base-1.0"
    controlnet: str | None = None
    scheduler: str | None = None  # diffusers scheduler class, e.g. "DPMSolverMultistepScheduler"
    torch_dtype: str = "auto"  # "auto": bfloat16/float16 on CUDA, float32 on the CPU
    prompt: str | None = None
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    strength: float | None = None
    guidance_scale: float | None = None
    consistency_weight: float | None = None
    consistency_schedule: str | None = None
    consistency_stop: float | None = None
    consistency_power: float | None = None
    color_fix: str | None = None
    upscale: float | None = None
    min_size: int | None = None
    tile: int | None = None
    tile_overlap: int | None = None
    vae_tile: int | None = None
    controlnet_conditioning_scale: float | None = None
    control_guidance_start: float | None = None
    control_guidance_end: float | None = None


@dataclass
class DetectConfig:
    """Stage 3: the artifact detector."""

    params: str = "desra-default"  # a parameter set in masks/ or a YAML file
    segmenter: str | None = "nvidia/segformer-b5-finetuned-ade-640-640"  # None: uniform weights
    sam: str | None = None  # SAM checkpoint path for optional boundary refinement
    sam_type: str = "vit_h"  # SAM architecture of that checkpoint: vit_h, vit_l or vit_b


@dataclass
class FuseConfig:
    """Stage 4: the fusion network folder; `None` uses the Laplacian-pyramid blend."""

    fusion: str | None = None
    tile: int | None = None


@dataclass
class RunConfig:
    """Everything one restoration run needs; presets in ``configs/`` fill it in."""

    description: str = ""
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    seed: int = 0
    device: str | None = None
    prior: PriorConfig = field(default_factory=PriorConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    fuse: FuseConfig = field(default_factory=FuseConfig)
    save_intermediates: bool = False  # also write prior, generated, mask and overlay images


def list_presets() -> list[str]:
    """Names of the presets shipped in ``configs/``."""
    return sorted(p.stem for p in data_dir("configs").glob("*.yaml"))


def load_config(
    name_or_path: str | Path | None = None, overrides: Sequence[str] = ()
) -> DictConfig:
    """Load a preset or YAML file onto [`RunConfig`] and apply dotted overrides.

    Args:
        name_or_path (`str` or `Path`, *optional*): A preset name (see [`list_presets`]) or a
            YAML file; `None` gives the defaults.
        overrides (`Sequence[str]`, *optional*): ``key.sub=value`` strings, applied last.

    Returns:
        `DictConfig`: A typed config; unknown keys and wrongly typed values raise `ValueError`.
    """
    config = OmegaConf.structured(RunConfig)
    if name_or_path is not None:
        path = Path(name_or_path)
        if path.suffix not in (".yaml", ".yml"):
            path = data_dir("configs") / f"{name_or_path}.yaml"
            if not path.is_file():
                raise ValueError(
                    f"config {name_or_path!r} is neither a YAML file nor a preset; presets: "
                    f"{', '.join(list_presets())}"
                )
        elif not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        try:
            config = OmegaConf.merge(config, OmegaConf.load(path))
        except Exception as err:  # omegaconf raises several unrelated types
            raise ValueError(f"config {path}: {err}") from err
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        try:
            config = OmegaConf.merge(config, OmegaConf.from_dotlist([item]))
        except Exception as err:
            raise ValueError(f"override {item!r}: {err}") from err
    validate_config(config)
    return config


def validate_config(config: DictConfig) -> None:
    """Check what types alone cannot: known, non-empty stages; sensible numbers."""
    unknown = [s for s in config.stages if s not in STAGES]
    if unknown or not config.stages:
        raise ValueError(f"stages {list(config.stages)} must be a non-empty subset of {STAGES}")
    if "prior" not in config.stages and "generate" not in config.stages:
        raise ValueError(f"stages {list(config.stages)}: run at least 'prior' or 'generate'")
    if not 0.0 <= config.prior.input_blend <= 1.0:
        raise ValueError(f"prior.input_blend must be in [0, 1], got {config.prior.input_blend}")
    if config.prior.outscale is not None and config.prior.outscale <= 0:
        raise ValueError(f"prior.outscale must be positive, got {config.prior.outscale}")


TINY_PREFIX = "tiny:"


def make_tiny(config: DictConfig) -> DictConfig:
    """The same run with every model swapped for a tiny or built-in one (no downloads).

    The pipeline's structure and settings are kept: stages, guidance, schedules, thresholds,
    ensemble weights. SD/SDXL become tiny random pipelines (``tiny:sd15`` / ``tiny:sdxl``),
    priors that are files become the built-in compact x2 model, the segmenter is dropped
    (uniform class weights), a fusion network becomes a tiny random one, and sizes that only
    make sense for real models (``min_size``) are capped.
    """
    from raim_diffusion.prior import is_builtin

    tiny = config.copy()
    gen = tiny.generate
    if not str(gen.model).startswith(TINY_PREFIX):
        gen.model = TINY_PREFIX + ("sdxl" if "xl" in str(gen.model).lower() else "sd15")
    if gen.controlnet is not None:
        gen.controlnet = TINY_PREFIX + "controlnet"
    gen.min_size = None if gen.min_size is None else min(gen.min_size, 256)
    names = tiny.prior.name
    replace = "realesr-animevideov3-x2"
    if isinstance(names, str):
        tiny.prior.name = names if is_builtin(names) else replace
    else:
        tiny.prior.name = [n if is_builtin(n) else replace for n in names]
    tiny.detect.segmenter = None
    tiny.detect.sam = None
    if tiny.fuse.fusion is not None:
        tiny.fuse.fusion = TINY_PREFIX + "fusion"
    return tiny


def call_kwargs(generate: GenerateConfig | DictConfig) -> dict[str, Any]:
    """The ``RaimPipeline.__call__`` arguments a config sets (those not left at `None`)."""
    from raim_diffusion.pipeline import RaimPipeline

    accepted = inspect.signature(RaimPipeline.__call__).parameters
    if isinstance(generate, DictConfig):
        values = OmegaConf.to_container(generate)
    else:
        values = vars(generate)
    return {k: v for k, v in values.items() if k in accepted and v is not None}


def resolved_call_kwargs(generate: GenerateConfig | DictConfig) -> dict[str, Any]:
    """Like [`call_kwargs`], with the pipeline's own defaults filled in (for the record)."""
    from raim_diffusion.pipeline import RaimPipeline

    params = inspect.signature(RaimPipeline.__call__).parameters
    resolved = {
        name: p.default for name, p in params.items()
        if name in GenerateConfig.__dataclass_fields__ and p.default is not inspect.Parameter.empty
    }
    resolved.update(call_kwargs(generate))
    return resolved
