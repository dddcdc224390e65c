"""Structured configuration of fusion training, and lookup of the shipped presets.

Presets are YAML files in ``configs/train/`` (a checkout) or ``raim_diffusion/_data/configs/train``
(an installed wheel); each is merged over the :class:`TrainConfig` defaults, so a preset only
lists what it changes and unknown keys are rejected.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from raim_diffusion.resources import data_dir
from raim_diffusion.training.degradations import DegradationConfig
from raim_diffusion.training.losses import PerceptualConfig

__all__ = [
    "ModelConfig",
    "DataConfig",
    "MaskConfig",
    "LossConfig",
    "OptimConfig",
    "TrainConfig",
    "find_config",
    "available_configs",
    "load_train_config",
]

@dataclass
class ModelConfig:
    """The generator: a FusionNet preset plus optional overrides of its constructor arguments."""

    preset: str = "light"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Training crops.

    Args:
        crop_size: side of the square GT crops (the degradation keeps the size at scale 1).
        batch_size: per-process batch size.
        num_workers: DataLoader worker processes.
        hflip: random horizontal flips.
        vflip: random vertical flips.
        rot90: random transposes.
        samples_per_epoch: items per epoch (default: the number of images, at least 100
            batches; items wrap around the files).
        usm_gt: USM-sharpen the GT first (Real-ESRGAN); then the target is the sharpened GT.
    """

    crop_size: int = 256
    batch_size: int = 8
    num_workers: int = 4
    hflip: bool = True
    vflip: bool = False
    rot90: bool = False
    samples_per_epoch: int | None = None
    usm_gt: bool = False


@dataclass
class MaskConfig:
    """Random hole masks: coverage range and the share of STTN shapes (the rest are blobs)."""

    coverage: list[float] = field(default_factory=lambda: [0.05, 0.5])
    sttn_prob: float = 0.5


@dataclass
class LossConfig:
    """Loss weights (defaults: STTN hole/valid L1 with AOT's perceptual, style and adversarial).

    Args:
        hole: weight of the hole L1.
        valid: weight of the valid L1.
        perceptual: total weight of the perceptual loss (AOT 0.1, BasicSR 1).
        style: total weight of the style loss (AOT 250, Real-ESRGAN 0).
        adversarial: weight of the generator's LSGAN term (0 disables the discriminator).
        eps: added to the hole / valid denominators.
        soft_label_kernel: Gaussian kernel of the SM-PatchGAN soft labels.
        soft_label_sigma: its standard deviation.
        reproduce_aot_code_form: use AOT's released (inconsistent) smgan objective.
        discriminator_channels: width of the discriminator's first layer.
    """

    hole: float = 1.0
    valid: float = 1.0
    perceptual: float = 0.1
    style: float = 250.0
    adversarial: float = 0.01
    eps: float = 1e-6
    soft_label_kernel: int = 71
    soft_label_sigma: float = 10.0
    reproduce_aot_code_form: bool = False
    discriminator_channels: int = 64


@dataclass
class OptimConfig:
    """Adam for generator and discriminator (AOT: lr 1e-4, betas (0.5, 0.999)).

    ``scheduler`` is ``"constant"`` or ``"cosine"`` (to ``min_lr_ratio * lr`` at ``max_steps``),
    both after a linear warmup of ``warmup_steps``.
    """

    lr_g: float = 1e-4
    lr_d: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    weight_decay: float = 0.0
    scheduler: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None


@dataclass
class TrainConfig:
    """Everything fusion training needs besides the data folders.

    Args:
        model: generator preset.
        data: crops and loader.
        masks: random hole masks.
        degradation: Real-ESRGAN second-order degradation (``scale`` must stay 1).
        loss: loss weights.
        perceptual: the VGG19 feature extractor of the perceptual and style losses.
        optim: optimisers and learning-rate schedule.
        max_steps: optimisation steps.
        ema_decay: EMA decay of the generator (0 disables EMA; the raw generator is exported).
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"`` (passed to accelerate).
        seed: seed of initialisation, data order, crops, masks and degradations.
        log_every: steps between metrics rows.
        checkpoint_every: steps between checkpoints (the last step is always saved).
        keep_checkpoints: newest checkpoints kept (0 keeps all).
        val_every: steps between validations (needs a validation folder; 0 disables).
        val_crop_size: centre crop of validation images (bounds time and memory; 0 = full).
        val_max_images: validation images used.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    max_steps: int = 400_000
    ema_decay: float = 0.999
    mixed_precision: str = "no"
    seed: int = 0
    log_every: int = 100
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3
    val_every: int = 5000
    val_crop_size: int = 512
    val_max_images: int = 16


def _presets_dir() -> Path:
    return data_dir("configs") / "train"


def available_configs() -> list[str]:
    """Names of the shipped training presets."""
    return sorted(p.stem for p in _presets_dir().glob("*.yaml"))


def find_config(name: str | os.PathLike) -> Path:
    """Resolve a training preset name (``"tiny"``) or a YAML path to a file.

    Looks in the installed package (``raim_diffusion/_data/configs/train``) first, then in the
    checkout (``<repo>/configs/train``).

    Args:
        name: a preset name, or a path to a YAML file.

    Returns:
        The YAML file.

    Raises:
        FileNotFoundError: neither a file nor a known preset.
    """
    path = Path(name).expanduser()
    if path.is_file():
        return path
    stem = str(name)
    if stem.endswith((".yaml", ".yml")) or os.sep in stem:
        raise FileNotFoundError(f"training config file {str(name)!r} does not exist")
    cand = _presets_dir() / f"{stem}.yaml"
    if cand.is_file():
        return cand
    raise FileNotFoundError(
        f"unknown training config {stem!r}: not a file and not a preset "
        f"(available presets: {', '.join(available_configs()) or 'none found'})"
    )


def load_train_config(
    name_or_path: str | os.PathLike | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> TrainConfig:
    """Build a :class:`TrainConfig` from defaults, a preset or YAML file, and overrides.

    Args:
        name_or_path: preset name or YAML path; ``None`` uses the dataclass defaults.
        overrides: dot-list strings (``["data.batch_size=4"]``) or a nested dict.

    Returns:
        The validated configuration.
    """
    cfg: DictConfig = OmegaConf.structured(TrainConfig)
    if name_or_path is not None:
        cfg = OmegaConf.merge(cfg, OmegaConf.load(find_config(name_or_path)))
    if overrides:
        extra = (
            OmegaConf.from_dotlist(list(overrides))
            if isinstance(overrides, (list, tuple))
            else OmegaConf.create(overrides)
        )
        cfg = OmegaConf.merge(cfg, extra)
    out = OmegaConf.to_object(cfg)
    _validate(out)
    return out


def _validate(cfg: TrainConfig) -> None:
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(
            f"mixed_precision must be 'no', 'fp16' or 'bf16', got {cfg.mixed_precision!r}"
        )
    if cfg.optim.scheduler not in ("constant", "cosine"):
        raise ValueError(
            f"optim.scheduler must be 'constant' or 'cosine', got {cfg.optim.scheduler!r}"
        )
    if int(cfg.degradation.scale) != 1:
        raise ValueError(
            "degradation.scale must be 1 for fusion training (a 1x task), got "
            f"{cfg.degradation.scale}"
        )
    if not 0 <= cfg.ema_decay < 1:
        raise ValueError(f"ema_decay must lie in [0, 1), got {cfg.ema_decay}")
    if cfg.max_steps < 0 or cfg.data.batch_size < 1 or cfg.data.crop_size < 32:
        raise ValueError(
            "need max_steps >= 0, data.batch_size >= 1 and data.crop_size >= 32 (the "
            f"discriminator's minimum), got {cfg.max_steps}, {cfg.data.batch_size}, "
            f"{cfg.data.crop_size}"
        )
    if len(cfg.masks.coverage) != 2:
        raise ValueError(f"masks.coverage must be [lo, hi], got {cfg.masks.coverage!r}")
    if len(cfg.optim.betas) != 2:
        raise ValueError(f"optim.betas must have two values, got {cfg.optim.betas!r}")
