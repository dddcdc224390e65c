"""Structured configuration of fusion and prior training, and lookup of the shipped presets.

Presets are YAML files in ``configs/train/`` (fusion) and ``configs/train/prior/`` (prior) of a
checkout, or under ``raim_diffusion/_data/configs/train`` in an installed wheel; each is merged
over the defaults of :class:`TrainConfig` / :class:`PriorTrainConfig`, so a preset only lists
what it changes and unknown keys are rejected.
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
from raim_diffusion.training.triplets import TripletConfig

__all__ = [
    "ModelConfig",
    "DataConfig",
    "MaskConfig",
    "LossConfig",
    "OptimConfig",
    "TrainConfig",
    "PriorModelConfig",
    "PriorDataConfig",
    "PriorLossConfig",
    "PhaseConfig",
    "PriorTrainConfig",
    "load_prior_train_config",
    "find_config",
    "available_configs",
    "load_train_config",
]

@dataclass
class ModelConfig:
    """The generator: a fusion architecture (``FusionNet``, or ``AlignFusionNet`` trained on
    triplets), its preset and optional overrides of its constructor arguments."""

    architecture: str = "FusionNet"
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
class LoopConfig:
    """What every trainer's loop reads (see `raim_diffusion.training.loop.loop_settings`).

    Args:
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


@dataclass
class TrainConfig(LoopConfig):
    """Everything fusion training needs besides the data folders.

    Args:
        model: generator preset.
        data: crops and loader.
        masks: random hole masks.
        degradation: Real-ESRGAN second-order degradation (``scale`` must stay 1).
        loss: loss weights.
        perceptual: the VGG19 feature extractor of the perceptual and style losses.
        optim: optimisers and learning-rate schedule.
        triplets: synthetic triplets and the real/synthetic mix (``AlignFusionNet`` only).
        max_steps, ema_decay, ...: the loop's settings, see `LoopConfig`.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    triplets: TripletConfig = field(default_factory=TripletConfig)


def _presets_dir(kind: str = "fusion") -> Path:
    if kind not in ("fusion", "prior"):
        raise ValueError(f"kind must be 'fusion' or 'prior', got {kind!r}")
    root = data_dir("configs") / "train"
    return root / "prior" if kind == "prior" else root


def available_configs(kind: str = "fusion") -> list[str]:
    """Names of the shipped training presets of ``kind`` (``"fusion"`` or ``"prior"``)."""
    return sorted(p.stem for p in _presets_dir(kind).glob("*.yaml"))


def find_config(name: str | os.PathLike, kind: str = "fusion") -> Path:
    """Resolve a training preset name (``"tiny"``) or a YAML path to a file.

    Looks in the installed package (``raim_diffusion/_data/configs/train``) first, then in the
    checkout (``<repo>/configs/train``; prior presets in its ``prior/`` subfolder).

    Args:
        name: a preset name, or a path to a YAML file.
        kind: ``"fusion"`` or ``"prior"``: which presets a name refers to.

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
    cand = _presets_dir(kind) / f"{stem}.yaml"
    if cand.is_file():
        return cand
    raise FileNotFoundError(
        f"unknown {kind} training config {stem!r}: not a file and not a preset "
        f"(available presets: {', '.join(available_configs(kind)) or 'none found'})"
    )


def _merge(
    schema: type,
    name_or_path: str | os.PathLike | None,
    overrides: list[str] | dict[str, Any] | None,
    kind: str,
) -> Any:
    cfg: DictConfig = OmegaConf.structured(schema)
    if name_or_path is not None:
        cfg = OmegaConf.merge(cfg, OmegaConf.load(find_config(name_or_path, kind)))
    if overrides:
        extra = (
            OmegaConf.from_dotlist(list(overrides))
            if isinstance(overrides, (list, tuple))
            else OmegaConf.create(overrides)
        )
        cfg = OmegaConf.merge(cfg, extra)
    return OmegaConf.to_object(cfg)


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
    out = _merge(TrainConfig, name_or_path, overrides, "fusion")
    _validate(out)
    return out


def _validate_loop(cfg: TrainConfig | PriorTrainConfig) -> None:
    """The checks every training config shares: precision, schedule, Adam betas, EMA."""
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(
            f"mixed_precision must be 'no', 'fp16' or 'bf16', got {cfg.mixed_precision!r}"
        )
    if cfg.optim.scheduler not in ("constant", "cosine"):
        raise ValueError(
            f"optim.scheduler must be 'constant' or 'cosine', got {cfg.optim.scheduler!r}"
        )
    if len(cfg.optim.betas) != 2:
        raise ValueError(f"optim.betas must have two values, got {cfg.optim.betas!r}")
    if not 0 <= cfg.ema_decay < 1:
        raise ValueError(f"ema_decay must lie in [0, 1), got {cfg.ema_decay}")


def _validate(cfg: TrainConfig) -> None:
    _validate_loop(cfg)
    if int(cfg.degradation.scale) != 1:
        raise ValueError(
            "degradation.scale must be 1 for fusion training (a 1x task), got "
            f"{cfg.degradation.scale}"
        )
    if cfg.max_steps < 0 or cfg.data.batch_size < 1 or cfg.data.crop_size < 32:
        raise ValueError(
            "need max_steps >= 0, data.batch_size >= 1 and data.crop_size >= 32 (the "
            f"discriminator's minimum), got {cfg.max_steps}, {cfg.data.batch_size}, "
            f"{cfg.data.crop_size}"
        )
    if len(cfg.masks.coverage) != 2:
        raise ValueError(f"masks.coverage must be [lo, hi], got {cfg.masks.coverage!r}")
    if cfg.model.architecture not in ("FusionNet", "AlignFusionNet"):
        raise ValueError(
            "model.architecture must be 'FusionNet' or 'AlignFusionNet', got "
            f"{cfg.model.architecture!r}"
        )
    cfg.triplets.check()


# --------------------------------------------------------------------------------------------
# prior training
# --------------------------------------------------------------------------------------------


@dataclass
class PriorModelConfig:
    """The restorer to train (any spandrel architecture) and MiAlgo's optional head.

    Args:
        architecture: spandrel architecture id (``"ESRGAN"``, ``"Compact"``, ``"SwinIR"``,
            ``"SRFormer"``, ``"HAT"``, ``"Restormer"``, ``"NAFNet"``...) or original name
            (``"RRDBNet"``, ``"SRVGGNetCompact"``) for training from scratch with ``kwargs``.
        kwargs: hyper-parameters of that architecture (e.g. ``{scale: 1, shuffle_factor: 4}``
            for Real-ESRGAN x1).
        weights: start from these weights instead: a built-in name, a weights file or a saved
            prior folder (then ``architecture`` and ``kwargs`` must stay empty).
        scale: the scale to train at; ``None`` is the network's. A different scale with
            ``weights`` is only possible for ESRGAN (RRDBNet), whose body is reused in a new
            pixel-unshuffle network (its first convolution starts fresh).
        head: train MiAlgo's refinement head with the restorer (saved in the prior folder).
        head_channels: the head's hidden width (MiAlgo: at most 16).
        freeze_prior: train the head only, on top of a frozen restorer.
    """

    architecture: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    scale: int | None = None
    head: bool = False
    head_channels: int = 16
    freeze_prior: bool = False


@dataclass
class PriorDataConfig:
    """Training pairs: paired folders, synthetic pairs from HQ photos, or a mix.

    Args:
        crop_size: side of the square GT crops (the LQ crop is ``crop_size / scale``).
        batch_size: per-process batch size.
        num_workers: DataLoader worker processes.
        hflip, vflip, rot90: random flips and transposes (the same for LQ and GT).
        samples_per_epoch: items per epoch (default: at least 100 batches).
        paired_ratio: share of paired samples when both paired and HQ folders are given.
        weak_ratio: share of synthetic samples degraded with ``degradation_weak`` instead of
            ``degradation`` (MiAlgo: 0.2).
        usm_gt: USM-sharpen the GT of synthetic pairs (Real-ESRGAN).
        niqe_candidates: MiAlgo's patch selection: the best of this many random crops by NIQE
            (needs pyiqa and its NIQE parameters); 1 is a plain random crop.
    """

    crop_size: int = 128
    batch_size: int = 12
    num_workers: int = 4
    hflip: bool = True
    vflip: bool = False
    rot90: bool = False
    samples_per_epoch: int | None = None
    paired_ratio: float = 0.5
    weak_ratio: float = 0.0
    usm_gt: bool = False
    niqe_candidates: int = 1


@dataclass
class PriorLossConfig:
    """Loss weights of prior training (a weight of 0 switches a term off).

    Args:
        pixel: weight of the pixel loss.
        pixel_type: ``"l1"`` or ``"l2"``.
        perceptual: VGG19 perceptual weight (``perceptual`` section: layers, input norm).
        style: VGG19 style weight.
        gan: weight of the generator's vanilla GAN loss (Real-ESRGAN 0.1).
        lpips: weight of the LPIPS loss (its weights must be cached).
        discriminator_channels: width of the U-Net discriminator (64).
        skip_connection: the U-Net discriminator's skip connections.
    """

    pixel: float = 1.0
    pixel_type: str = "l1"
    perceptual: float = 0.0
    style: float = 0.0
    gan: float = 0.0
    lpips: float = 0.0
    discriminator_channels: int = 64
    skip_connection: bool = True


@dataclass
class PhaseConfig:
    """A phase of a multi-stage schedule, from step ``start`` on: what changes (``None`` keeps
    the base value). Phases switch inside one run, so resume works across the switch.

    Args:
        start: first step of the phase.
        lr_g, lr_d: learning rates.
        pixel, perceptual, style, gan, lpips: loss weights.
        paired_ratio: share of paired samples (1: paired data only).
    """

    start: int = 0
    lr_g: float | None = None
    lr_d: float | None = None
    pixel: float | None = None
    perceptual: float | None = None
    style: float | None = None
    gan: float | None = None
    lpips: float | None = None
    paired_ratio: float | None = None


@dataclass
class PriorTrainConfig(LoopConfig):
    """Everything prior training needs besides the data folders.

    Args:
        model: the restorer (architecture or weights) and the head.
        data: crops, loader and the paired / synthetic mix.
        degradation: Real-ESRGAN degradation of synthetic pairs (its ``scale`` is set to the
            model's).
        degradation_weak: the weak degradation of MiAlgo's mix (used with ``data.weak_ratio``).
        loss: loss weights.
        perceptual: the VGG19 feature extractor.
        optim: optimisers (Real-ESRGAN: Adam, betas (0.9, 0.99)) and schedule.
        phases: multi-stage schedule, e.g. PSNR-oriented then GAN.
        max_steps, ema_decay, mixed_precision, seed, log_every, checkpoint_every,
            keep_checkpoints, val_every, val_max_images: as for fusion training.
        val_crop_size: centre crop of validation GT images (0: whole images).
    """

    model: PriorModelConfig = field(default_factory=PriorModelConfig)
    data: PriorDataConfig = field(default_factory=PriorDataConfig)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    degradation_weak: DegradationConfig | None = None
    loss: PriorLossConfig = field(default_factory=PriorLossConfig)
    perceptual: PerceptualConfig = field(
        default_factory=lambda: PerceptualConfig(layer_set="basicsr")
    )
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(betas=[0.9, 0.99]))
    phases: list[PhaseConfig] = field(default_factory=list)
    max_steps: int = 100_000  # the loop's settings (LoopConfig) with the prior's own defaults
    val_crop_size: int = 0


def load_prior_train_config(
    name_or_path: str | os.PathLike | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    init: str | os.PathLike | None = None,
) -> PriorTrainConfig:
    """Build a :class:`PriorTrainConfig` from defaults, a prior preset or YAML, and overrides.

    Args:
        name_or_path: prior preset name (``tiny``, ``xhs-iag-gan``, ``mialgo``, ``hit-iil``)
            or YAML path; ``None`` uses the dataclass defaults.
        overrides: dot-list strings (``["data.batch_size=4"]``) or a nested dict.
        init: fine-tune these weights (built-in name, file or prior folder) instead of the
            preset's architecture: sets ``model.weights`` and clears ``model.architecture``
            and ``model.kwargs`` (``--init`` of ``raim train-prior``).

    Returns:
        The validated configuration.
    """
    out = _merge(PriorTrainConfig, name_or_path, overrides, "prior")
    if init is not None:
        out.model.weights = str(init)
        out.model.architecture = None
        out.model.kwargs = {}
    _validate_prior(out)
    return out


def _validate_prior(cfg: PriorTrainConfig) -> None:
    m = cfg.model
    if (m.weights is None) == (m.architecture is None):
        raise ValueError(
            "give exactly one of model.architecture (train from scratch) and model.weights "
            f"(fine-tune), got architecture={m.architecture!r}, weights={m.weights!r}"
        )
    if m.weights is not None and m.kwargs:
        raise ValueError("model.kwargs only applies to model.architecture, not to model.weights")
    if m.freeze_prior and not m.head:
        raise ValueError("model.freeze_prior trains the head only: it needs model.head=true")
    if m.scale is not None and m.scale not in (1, 2, 3, 4, 8):
        raise ValueError(f"model.scale must be 1, 2, 3, 4 or 8, got {m.scale}")
    _validate_loop(cfg)
    if cfg.loss.pixel_type not in ("l1", "l2"):
        raise ValueError(f"loss.pixel_type must be 'l1' or 'l2', got {cfg.loss.pixel_type!r}")
    if cfg.max_steps < 0 or cfg.data.batch_size < 1 or cfg.data.crop_size < 8:
        raise ValueError(
            "need max_steps >= 0, data.batch_size >= 1 and data.crop_size >= 8, got "
            f"{cfg.max_steps}, {cfg.data.batch_size}, {cfg.data.crop_size}"
        )
    for name in ("paired_ratio", "weak_ratio"):
        value = getattr(cfg.data, name)
        if not 0 <= value <= 1:
            raise ValueError(f"data.{name} must lie in [0, 1], got {value}")
    if cfg.data.weak_ratio > 0 and cfg.degradation_weak is None:
        raise ValueError("data.weak_ratio > 0 needs a degradation_weak section")
    starts = [p.start for p in cfg.phases]
    if starts != sorted(set(starts)) or any(s < 0 for s in starts):
        raise ValueError(f"phases must have distinct, increasing start steps >= 0, got {starts}")
    for p in cfg.phases:
        if p.paired_ratio is not None and not 0 <= p.paired_ratio <= 1:
            raise ValueError(f"phases[].paired_ratio must lie in [0, 1], got {p.paired_ratio}")
