"""Training of [`~raim_diffusion.fusion.align.AlignFusionNet`] on the shared loop.

So Elegant trained its fidelity stage with batch 2 of 1024 px patches, Adam at 1e-4 for 20k
iterations (NTIRE 2024 RAIM challenge report, arXiv:2405.09923). Every step reads triplets
(`raim_diffusion.training.triplets`): real ``s1/``, ``s2/``, ``gt/`` folders and/or synthetic
triplets made from HQ photos; the network maps ``(I_s2, I_s1, M)`` to GT. Losses: hole/valid L1
(the L1 weighted inside and outside M), optional VGG19 perceptual and style, optional
SM-PatchGAN, with the weights of the ``loss`` section. Seeding, EMA, checkpoints, exact resume
and logs are the loop's (`raim_diffusion.training.loop`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.utils import logging

from raim_diffusion.files import find_images
from raim_diffusion.fusion.align import AlignFusionNet
from raim_diffusion.training.config import TrainConfig
from raim_diffusion.training.loop import TrainingLoop, loop_settings, lr_factor, mix_seed
from raim_diffusion.training.losses import (
    PerceptualLoss,
    SMPatchDiscriminator,
)
from raim_diffusion.training.trainer import inpainting_step, validate_on_files
from raim_diffusion.training.triplets import (
    TripletDataset,
    find_triplets,
    is_triplet_folder,
    synthesize_triplet,
)
from raim_diffusion.training.validation import ValidationMetrics

logger = logging.get_logger(__name__)

__all__ = ["AlignFusionTrainer"]


def _as_list(data: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(data, (str, os.PathLike)):
        return [Path(data)]
    return [Path(d) for d in data]


class AlignFusionTrainer(TrainingLoop):
    """Train an [`AlignFusionNet`] on real and/or synthetic triplets.

    Args:
        config: the training configuration (``model.architecture: AlignFusionNet``; the
            ``triplets`` section makes the synthetic triplets).
        data_dir: folder(s): a folder with ``s1/``, ``s2/``, ``gt/`` (optional ``mask/``)
            sub-folders holds real triplets; any other folder holds HQ photos for synthetic ones.
        output_dir: where checkpoints, logs, validation images and the final model go.
        val_dir: optional folder of held-out HQ photos; fixed synthetic triplets of them give the
            validation PSNR/SSIM (``raim eval``'s) of the output and of I_s2.
        accelerator: an existing ``Accelerator``; default: one built from the config.

    Outputs in ``output_dir``: as [`FusionTrainer`]'s; ``fusion/`` holds the EMA network
    (``raim_diffusion.fusion.load_fusion``).
    """

    name = "train-fusion (align)"
    log_fields = [
        "step", "epoch", "loss", "hole", "valid", "perceptual", "style", "adv_g", "loss_d",
        "lr_g", "seconds",
    ]  # fmt: skip
    val_fields = ["step", "psnr", "ssim", "psnr_s2", "ssim_s2"]

    def __init__(
        self,
        config: TrainConfig,
        data_dir: str | os.PathLike | Sequence[str | os.PathLike],
        output_dir: str | os.PathLike,
        *,
        val_dir: str | os.PathLike | None = None,
        accelerator: Accelerator | None = None,
    ) -> None:
        cfg = config
        if cfg.model.architecture != "AlignFusionNet":
            raise ValueError(
                "AlignFusionTrainer trains model.architecture=AlignFusionNet, got "
                f"{cfg.model.architecture!r}"
            )
        super().__init__(**loop_settings(cfg), output_dir=output_dir, accelerator=accelerator)
        folders = _as_list(data_dir)
        triplets = [t for d in folders if is_triplet_folder(d) for t in find_triplets(d)]
        photos = [d for d in folders if not is_triplet_folder(d)]
        hq_files = find_images(photos) if photos else []
        if photos and not hq_files:
            raise FileNotFoundError(f"no images found in {[str(p) for p in photos]!r}")
        self.dataset = TripletDataset(
            triplets,
            hq_files,
            cfg.data.crop_size,
            cfg.triplets,
            seed=cfg.seed,
            hflip=cfg.data.hflip,
            vflip=cfg.data.vflip,
            rot90=cfg.data.rot90,
        )
        self.set_epoch_length(cfg.data.samples_per_epoch)
        self.val_files = find_images(val_dir)[: cfg.val_max_images] if val_dir else []
        self._metrics: ValidationMetrics | None = None

        with self.seeded_init():
            generator = AlignFusionNet.from_preset(cfg.model.preset, **dict(cfg.model.kwargs))
            self.use_gan = cfg.loss.adversarial > 0
            disc = (
                SMPatchDiscriminator(base_channels=cfg.loss.discriminator_channels)
                if self.use_gan
                else None
            )
        self.perceptual = None
        if cfg.loss.perceptual > 0 or cfg.loss.style > 0:
            self.perceptual = PerceptualLoss(cfg.perceptual).to(self.device)

        o = cfg.optim
        betas = tuple(o.betas)
        factor = lr_factor(o.scheduler, o.warmup_steps, cfg.max_steps, o.min_lr_ratio)
        opt_g = torch.optim.Adam(generator.parameters(), o.lr_g, betas, weight_decay=o.weight_decay)
        opt_d = (
            torch.optim.Adam(disc.parameters(), o.lr_d, betas, weight_decay=o.weight_decay)
            if disc is not None
            else None
        )
        self.setup_models(generator, opt_g, factor, disc, opt_d, factor)

    def _train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        s1, s2, gt, mask = (batch[k].to(self.device, non_blocking=True)
                            for k in ("s1", "s2", "gt", "mask"))
        # The discriminator judges the whole output: outside the mask it must stay I_s2.
        return inpainting_step(self, lambda: self.generator(s2, s1, mask), gt, mask)

    def has_validation(self) -> bool:
        return bool(self.val_files)

    def validate(self) -> dict[str, float]:
        """PSNR/SSIM of the (EMA) network and of I_s2 on fixed synthetic triplets; writes
        comparison PNGs (I_s1 | I_s2 | mask | output | GT)."""
        cfg = self.config

        def run(i: int, gt: torch.Tensor, model: torch.nn.Module):
            # The same triplet at every validation, so the numbers are comparable.
            g = torch.Generator().manual_seed(mix_seed(cfg.seed, 7919, i, 3))
            item = synthesize_triplet(gt[0], g, cfg.triplets)
            s1, s2, mask, gt = (item[k][None].to(self.device) for k in ("s1", "s2", "mask", "gt"))
            out = model.restore(s2, s1, mask).to(gt.dtype)
            return gt, out, s2, [s1, s2, mask.expand_as(gt), out, gt]

        return validate_on_files(self, run, "s2")

    def export(self) -> Path:
        """Save the (EMA) network to ``output_dir/fusion``."""
        model_dir = self.output_dir / "fusion"
        self.val_model().save_pretrained(model_dir)
        return model_dir
