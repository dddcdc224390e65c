"""Training of the stage-4 fusion network.

- [`degradations`]: the Real-ESRGAN second-order degradation, batched in torch (1x).
- [`masks`]: STTN Bezier shapes and DeSRA-like blobs with guaranteed coverage.
- [`losses`]: hole/valid L1, VGG19 perceptual and style, SM-PatchGAN (LSGAN, soft labels).
- [`data`]: reproducible random crops of a folder of HQ images.
- [`config`]: the structured [`TrainConfig`] and the shipped presets (``tiny``, ``default``).
- [`trainer`]: [`FusionTrainer`], the accelerate training loop (``raim train-fusion``).

The trainer (and accelerate) is imported on first use, so the light parts load quickly.
"""

from __future__ import annotations

from typing import Any

from .config import TrainConfig, available_configs, find_config, load_train_config
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
    VGGFeatureExtractor,
    discriminator_loss,
    generator_adversarial_loss,
    masked_l1,
    soft_mask_labels,
)
from .masks import blob_mask, mask_coverage, random_masks, sttn_mask, sttn_shape

__all__ = [
    "DegradationConfig",
    "FusionTrainer",
    "KernelConfig",
    "PerceptualConfig",
    "PerceptualLoss",
    "RealESRGANDegradation",
    "SMPatchDiscriminator",
    "TrainConfig",
    "TrainResult",
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
    "load_train_config",
    "mask_coverage",
    "masked_l1",
    "random_final_sinc_kernels",
    "random_kernels",
    "random_masks",
    "soft_mask_labels",
    "sttn_mask",
    "sttn_shape",
    "usm_sharp",
]

_LAZY = {"FusionTrainer", "TrainResult"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
