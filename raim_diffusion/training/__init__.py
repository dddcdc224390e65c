"""Training of the stage-1 prior and the stage-4 fusion network, on one loop.

- [`degradations`]: the Real-ESRGAN second-order degradation, batched in torch (1x).
- [`masks`]: STTN Bezier shapes and DeSRA-like blobs with guaranteed coverage.
- [`losses`]: hole/valid L1, VGG19 perceptual and style, SM-PatchGAN (LSGAN, soft labels).
- [`data`]: reproducible random crops of a folder of HQ images.
- [`config`]: [`TrainConfig`], [`PriorTrainConfig`] and the shipped presets.
- [`loop`]: [`TrainingLoop`], the accelerate loop (EMA, checkpoints, exact resume, logs).
- [`trainer`]: [`FusionTrainer`] (``raim train-fusion``).
- [`prior_trainer`]: [`PriorTrainer`] and [`train_prior`] (``raim train-prior``).

The trainer (and accelerate) is imported on first use, so the light parts load quickly.
"""

from __future__ import annotations

from typing import Any

from .config import (
    PriorTrainConfig,
    TrainConfig,
    available_configs,
    find_config,
    load_prior_train_config,
    load_train_config,
)
from .degradations import (
    DegradationConfig,
    KernelConfig,
    RealESRGANDegradation,
    add_gaussian_noise,
    add_poisson_noise,
    diff_jpeg,
    filter2d,
    random_final_sinc_kernels,
    random_kernels,
    usm_sharp,
)
from .losses import (
    PerceptualConfig,
    PerceptualLoss,
    SMPatchDiscriminator,
    UNetDiscriminatorSN,
    VGGFeatureExtractor,
    discriminator_loss,
    generator_adversarial_loss,
    masked_l1,
    pixel_loss,
    soft_mask_labels,
    vanilla_gan_loss,
)
from .masks import blob_mask, mask_coverage, random_masks, sttn_mask, sttn_shape

__all__ = [
    "DegradationConfig",
    "FusionTrainer",
    "KernelConfig",
    "PerceptualConfig",
    "PerceptualLoss",
    "PriorTrainConfig",
    "PriorTrainer",
    "RealESRGANDegradation",
    "SMPatchDiscriminator",
    "TrainConfig",
    "TrainResult",
    "UNetDiscriminatorSN",
    "VGGFeatureExtractor",
    "add_gaussian_noise",
    "add_poisson_noise",
    "available_configs",
    "blob_mask",
    "diff_jpeg",
    "discriminator_loss",
    "filter2d",
    "find_config",
    "generator_adversarial_loss",
    "load_prior_train_config",
    "load_train_config",
    "mask_coverage",
    "masked_l1",
    "pixel_loss",
    "random_final_sinc_kernels",
    "random_kernels",
    "random_masks",
    "soft_mask_labels",
    "sttn_mask",
    "sttn_shape",
    "train_prior",
    "usm_sharp",
    "vanilla_gan_loss",
]

_LAZY = {"FusionTrainer": "trainer", "TrainResult": "loop", "PriorTrainer": "prior_trainer",
         "train_prior": "prior_trainer"}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
