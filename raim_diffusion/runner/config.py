"""OmegaConf structured configs for whole restoration runs, and preset loading.

A run is described by [`RunConfig`]: which stages run, the prior, the diffusion model and its
sampling settings, the detector's parameter set and the fusion network. Presets live in the
shipped ``configs/`` folder (``raim restore --config sdxl``); a YAML path works too, and dotted
overrides (``generate.num_inference_steps=20``) are applied on top.

Every field reaches something: a loader setting (which model, which device) or an argument of
[`RaimPipeline.__call__`] (`CALL_ARGUMENTS` maps them; `call_kwargs` builds the call). An
unknown or misspelt key is an error that names the closest valid key. Settings left at `None`
are not passed, so the pipeline's own defaults stay the single source of truth;
[`resolved_call_kwargs`] fills them in for the record written next to the outputs.

User configs are data, not code: OmegaConf resolvers (``${oc.env:...}``, ``${oc.decode:...}``,
custom ones) are refused, so a config can never read the environment into a run record; plain
references to other keys (``${generate.strength}``) are resolved at load time.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from raim_diffusion.resources import data_dir
from raim_diffusion.stages import STAGES, check_stages

__all__ = [
    "CALL_ARGUMENTS",
    "DTYPES",
    "STAGES",
    "TINY_PREFIX",
    "DetectConfig",
    "FuseConfig",
    "GENERATE_LOADER_FIELDS",
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

DTYPES = ("auto", "float32", "float16", "bfloat16")
TINY_PREFIX = "tiny:"


@dataclass
class PriorConfig:
    """Stage 1: the fidelity prior (built-in name, weights file or saved folder)."""

    name: Any = "realesrgan-x4plus"  # a name/path, or a list of them for an ensemble
    weights: list[float] | None = None  # ensemble weights, e.g. [0.8, 0.2]
    tile: int | None = None  # prior tile size in pixels; None: automatic, 0: never tile
    input_blend: float | None = None  # MiAlgo's fixed blend: (1 - a)*prior + a*input


@dataclass
class GenerateConfig:
    """Stage 2: the diffusion model (``model``, ``controlnet``, ``scheduler``, ``supir``: the
    `GENERATE_LOADER_FIELDS`) and the sampling arguments of ``RaimPipeline.__call__`` (every
    other field, same names)."""

    model: str = "stabilityai/stable-diffusion-xl-base-1.0"
    controlnet: str | None = None
    scheduler: str | None = None  # diffusers scheduler class, e.g. "DPMSolverMultistepScheduler"
    # SUPIR checkpoint (e.g. weights/SUPIR-v0Q.ckpt, user-supplied, SupPixel non-commercial
    # licence) over the SDXL model: stage 2 becomes SUPIR's sampler.
    supir: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    strength: float | None = None
    guidance_scale: float | None = None
    guidance_scale_start: float | None = None  # SUPIR's linear CFG start (at sigma_max)
    consistency_weight: float | None = None
    consistency_schedule: str | None = None
    consistency_stop: float | None = None
    consistency_schedule_kwargs: dict[str, float] | None = None  # e.g. {power: 4.0}
    color_fix: str | None = None
    min_size: int | None = None
    tile: int | None = None
    tile_overlap: int | None = None
    vae_tile: int | None = None
    controlnet_conditioning_scale: float | None = None
    control_guidance_start: float | None = None
    control_guidance_end: float | None = None
    control_scale: float | None = None  # SUPIR's s_stage2
    control_scale_start: float | None = None  # SUPIR's linear control scale start (sigma_max)
    supir_stage1: str | None = None  # SUPIR's stage-1 latent: "supir" (its own) or "prior"
    eta: float | None = None
    s_churn: float | None = None  # EDM churn (Euler schedulers)
    s_noise: float | None = None


@dataclass
class DetectConfig:
    """Stage 3: the artifact detector."""

    params: str = "desra-default"  # a parameter set in masks/ or a YAML file
    segmenter: str | None = "nvidia/segformer-b5-finetuned-ade-640-640"  # None: uniform weights
    sam: str | None = None  # SAM checkpoint path for optional boundary refinement
    sam_type: str = "vit_h"  # SAM architecture of that checkpoint: vit_h, vit_l or vit_b
    contrast_threshold: float | None = None  # override of the parameter set's threshold
    area_threshold: float | None = None  # override of the smallest region kept


@dataclass
class FuseConfig:
    """Stage 4: the fusion network folder; `None` uses the Laplacian-pyramid blend."""

    fusion: str | None = None
    # The registered architecture the folder holds (FusionNet, AlignFusionNet, ...): checked
    # when the folder loads, and the one a --tiny run builds at random.
    architecture: str = "FusionNet"
    tile: int | None = None  # tile size of the fusion network; None: whole image


@dataclass
class RunConfig:
    """Everything one restoration run needs; presets in ``configs/`` fill it in."""

    description: str = ""
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    seed: int = 0
    device: str | None = None
    dtype: str = "auto"  # auto: bfloat16/float16 on CUDA, float32 on the CPU
    upscale: float | None = None  # output size / input size; None: the pipeline's default, 1
    prior: PriorConfig = field(default_factory=PriorConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    fuse: FuseConfig = field(default_factory=FuseConfig)
    save_intermediates: bool = False  # also write prior, generated, mask and overlay images
    tiny: bool = False  # set by make_tiny: every model is a tiny random stand-in


#: `GenerateConfig` fields that choose models (read by the restorer), not call arguments.
GENERATE_LOADER_FIELDS = ("model", "controlnet", "scheduler", "supir")
#: Config key -> ``RaimPipeline.__call__`` argument, for every key that is a call argument.
CALL_ARGUMENTS: dict[str, str] = {
    "upscale": "upscale",
    "prior.input_blend": "input_blend",
    **{
        f"generate.{name}": name for name in GenerateConfig.__dataclass_fields__
        if name not in GENERATE_LOADER_FIELDS
    },
    "detect.contrast_threshold": "contrast_threshold",
    "detect.area_threshold": "area_threshold",
    "fuse.tile": "fusion_tile",
}
#: Keys that choose or place models (read by the restorer), not call arguments.
LOADER_KEYS = (
    "description", "stages", "seed", "device", "dtype", "save_intermediates", "tiny",
    "prior.name", "prior.weights", "prior.tile", "generate.model", "generate.controlnet",
    "generate.scheduler", "generate.supir", "detect.params", "detect.segmenter", "detect.sam",
    "detect.sam_type", "fuse.fusion", "fuse.architecture",
)


def _dotted_keys(node: Any = None, prefix: str = "") -> list[str]:
    """Every dotted key of `RunConfig` (``generate.strength``, ...)."""
    node = OmegaConf.structured(RunConfig) if node is None else node
    keys = []
    for key in node:
        value = node._get_node(key)
        full = f"{prefix}{key}"
        keys.append(full)
        if isinstance(value, DictConfig) and value._metadata.object_type is not dict:
            keys.extend(_dotted_keys(value, f"{full}."))
    return keys


#: Keys of earlier versions -> where the setting lives now.
RENAMED_KEYS = {
    "prior.outscale": "upscale",
    "generate.upscale": "upscale",
    "generate.torch_dtype": "dtype",
    "generate.consistency_power": "generate.consistency_schedule_kwargs={power: ...}",
}


def _unknown_key_error(key: str, where: str) -> ValueError:
    if key in RENAMED_KEYS:
        return ValueError(f"{where}: config key {key} is now {RENAMED_KEYS[key]}")
    keys = _dotted_keys()
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not close:  # a misspelt last part: compare within the same section
        head, _, tail = key.rpartition(".")
        siblings = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == head]
        near = difflib.get_close_matches(tail, siblings, n=1, cutoff=0.6)
        close = [f"{head}.{near[0]}" if head else near[0]] if near else []
    hint = f"; did you mean {close[0]}?" if close else ""
    return ValueError(f"{where}: unknown config key {key}{hint}")


_RESOLVER = re.compile(r"\$\{\s*[\w.\-]+\s*:")


def _refuse_resolvers(node: Any, where: str, path: str = "") -> None:
    """Raise on any ``${resolver:...}`` in user data (env variables, decoding, custom code)."""
    if isinstance(node, dict):
        for key, value in node.items():
            _refuse_resolvers(value, where, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _refuse_resolvers(value, where, f"{path}[{i}]")
    elif isinstance(node, str) and _RESOLVER.search(node):
        raise ValueError(
            f"{where}: {path} uses an OmegaConf resolver ({node!r}); configs may only refer to "
            "other keys (${section.key}), never to environment variables or other resolvers"
        )


def _merge(config: DictConfig, data: Any, where: str) -> DictConfig:
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    raw = OmegaConf.to_container(data, resolve=False) if OmegaConf.is_config(data) else data
    _refuse_resolvers(raw, where)
    try:
        return OmegaConf.merge(config, data)
    except ConfigKeyError as err:
        key = getattr(err, "full_key", None) or str(err)
        raise _unknown_key_error(str(key), where) from None
    except OmegaConfBaseException as err:
        msg = " ".join(str(err).split("\n")[0].split())
        raise ValueError(f"{where}: {msg}") from None


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
        `DictConfig`: A typed config with every reference resolved.

    Raises:
        ValueError: an unknown key (naming the closest valid one), a wrongly typed value, a
            resolver such as ``${oc.env:...}``, a recursive reference, or a setting that
            `validate_config` refuses.
    """
    from omegaconf.errors import OmegaConfBaseException

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
            data = OmegaConf.load(path)
        except Exception as err:  # yaml and omegaconf raise several unrelated types
            msg = " ".join(str(err).split())
            raise ValueError(f"config {path} is not valid YAML: {msg}") from None
        if not isinstance(data, DictConfig):
            raise ValueError(f"config {path} must be a mapping of keys, not a list or value")
        config = _merge(config, data, f"config {path}")
    for item in overrides:
        key, eq, _ = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"override {item!r} must look like key.sub=value")
        try:
            data = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as err:
            raise ValueError(f"override {item!r}: {' '.join(str(err).split())}") from None
        config = _merge(config, data, f"override {item}")
    try:
        OmegaConf.resolve(config)
    except OmegaConfBaseException as err:
        msg = " ".join(str(err).split("\n")[0].split())
        raise ValueError(f"config: a reference cannot be resolved ({msg})") from None
    except RecursionError:
        raise ValueError("config: a reference refers to itself (recursive interpolation)") \
            from None
    validate_config(config)
    return config


def validate_config(config: DictConfig) -> None:
    """Check a whole run's settings before any model loads.

    Stages must make sense together (`raim_diffusion.stages.check_stages`); every sampling
    setting is checked by `RaimPipeline.check_inputs`, the same check a call makes; dtype and
    prior settings are checked here.

    Raises:
        ValueError: naming the key and what is allowed.
    """
    from raim_diffusion.pipeline import RaimPipeline

    stages = check_stages(list(config.stages))
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype={config.dtype!r} must be one of {', '.join(DTYPES)}")
    weights = config.prior.weights
    if weights is not None and not all(
        isinstance(w, (int, float)) and math.isfinite(w) and w > 0 for w in weights
    ):
        raise ValueError(f"prior.weights={list(weights)} must be positive numbers")
    if config.prior.tile is not None and config.prior.tile < 0:
        raise ValueError(f"prior.tile={config.prior.tile} must be >= 0 (0 never tiles)")
    gen = config.generate
    if gen.supir is not None and "generate" in stages:
        # SUPIR samples with its own EDM sampler and conditions through its own control model.
        for key in ("controlnet", "scheduler"):
            if gen[key] is not None:
                raise ValueError(
                    f"generate.{key}={gen[key]!r} has no effect with generate.supir (SUPIR "
                    f"samples with its own EDM Euler sampler and control model); remove one"
                )
    try:
        RaimPipeline.check_inputs(stages=stages, **call_kwargs(config))
    except ValueError as err:
        raise ValueError(_config_names(str(err))) from None


def _config_names(message: str) -> str:
    """Name config keys rather than call arguments in an error message."""
    names = {arg: key for key, arg in CALL_ARGUMENTS.items() if key != arg}
    for arg, key in names.items():
        message = re.sub(rf"\b{arg}=", f"{key}=", message)
    return message


def make_tiny(config: DictConfig) -> DictConfig:
    """The same run with every model swapped for a tiny or built-in one (no downloads).

    The pipeline's structure and settings are kept: stages, guidance, schedules, thresholds,
    fusion. SD/SDXL become tiny random pipelines (``tiny:sd15`` / ``tiny:sdxl``), the prior a
    tiny random compact network (``tiny:prior-x2``: seconds per image on a CPU), the segmenter
    is dropped (uniform class weights), a fusion network that is not a local folder becomes a
    tiny random one of its architecture (a trained local folder is kept), a SUPIR
    checkpoint becomes tiny random SUPIR components (``tiny:supir``), and sizes that only make
    sense for real models (``min_size``) are capped. ``tiny`` is set, so the
    run's record says it is a tiny run.
    """
    from raim_diffusion.prior import get_builtin, is_builtin

    tiny = config.copy()
    tiny.tiny = True
    gen = tiny.generate
    if not str(gen.model).startswith(TINY_PREFIX):
        sdxl = gen.supir is not None or "xl" in str(gen.model).lower()  # SUPIR is SDXL's
        gen.model = TINY_PREFIX + ("sdxl" if sdxl else "sd15")
    if gen.controlnet is not None:
        gen.controlnet = TINY_PREFIX + "controlnet"
    if gen.supir is not None:
        gen.supir = TINY_PREFIX + "supir"
    gen.min_size = None if gen.min_size is None else min(gen.min_size, 256)
    # Each prior becomes a tiny random one of the same scale (x2 for files, whose scale is only
    # known once they load); an ensemble keeps its members and weights.
    def swap(name: str) -> str:
        return f"{TINY_PREFIX}prior-x{get_builtin(name).scale if is_builtin(name) else 2}"

    names = tiny.prior.name
    tiny.prior.name = swap(names) if isinstance(names, str) else [swap(n) for n in names]
    tiny.detect.segmenter = None
    tiny.detect.sam = None
    # A fusion folder that exists here (e.g. a tiny network just trained with raim train-fusion)
    # is kept; one that is only named (weights you do not have) becomes a tiny random network.
    if tiny.fuse.fusion is not None and not Path(str(tiny.fuse.fusion)).is_dir():
        tiny.fuse.fusion = TINY_PREFIX + tiny.fuse.architecture
    return tiny


def call_kwargs(config: DictConfig) -> dict[str, Any]:
    """The ``RaimPipeline.__call__`` arguments a run config sets (those not left at `None`)."""
    out = {}
    for key, arg in CALL_ARGUMENTS.items():
        value = OmegaConf.select(config, key)
        if value is None:
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value)
        out[arg] = value
    return out


def resolved_call_kwargs(config: DictConfig) -> dict[str, Any]:
    """Like [`call_kwargs`], with the pipeline's own defaults filled in (for the record)."""
    from raim_diffusion.pipeline import RaimPipeline

    params = inspect.signature(RaimPipeline.__call__).parameters
    resolved = {
        arg: params[arg].default for arg in CALL_ARGUMENTS.values()
        if params[arg].default is not inspect.Parameter.empty
    }
    resolved.update(call_kwargs(config))
    return resolved
