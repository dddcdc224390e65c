"""Training of the stage-4 fusion network on the shared loop ([`TrainingLoop`]).

Every training step builds its inputs exactly the way inference does: a GT crop is degraded with
the Real-ESRGAN second-order pipeline (at 1x) into the LQ input, a random hole mask is drawn, and
the composite is GT outside the mask and LQ inside it; the network must recover the GT.
Seeding, EMA, checkpoints, exact resume and logs are the loop's (`raim_diffusion.training.loop`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.utils import logging

from raim_diffusion.files import find_images
from raim_diffusion.fusion.model import FusionNet, make_composite
from raim_diffusion.images import load_image, save_image
from raim_diffusion.training.config import TrainConfig
from raim_diffusion.training.data import HQImageDataset, center_crop
from raim_diffusion.training.degradations import RealESRGANDegradation, usm_sharp
from raim_diffusion.training.loop import (
    TrainingLoop,
    TrainResult,
    latest_checkpoint,
    loop_settings,
    lr_factor,
    mix_seed,
)
from raim_diffusion.training.losses import (
    PerceptualLoss,
    SMPatchDiscriminator,
    discriminator_loss,
    generator_adversarial_loss,
    masked_l1,
    soft_mask_labels,
)
from raim_diffusion.training.masks import random_masks
from raim_diffusion.training.validation import ValidationMetrics

logger = logging.get_logger(__name__)

__all__ = ["FusionTrainer", "TrainResult", "latest_checkpoint"]


def inpainting_step(
    trainer: TrainingLoop,
    forward: Callable[[], torch.Tensor],
    gt: torch.Tensor,
    mask: torch.Tensor,
    fake: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """One optimisation step of a fusion generator with the inpainting losses (STTN hole/valid
    L1, AOT perceptual/style, SM-PatchGAN LSGAN), then its discriminator; shared by every fusion
    trainer.

    Args:
        trainer: a `TrainingLoop` with ``generator``, ``disc`` (or `None`), ``perceptual`` (or
            `None`), the optimisers and schedulers, and ``config.loss``.
        forward: runs the generator (under autocast) and returns its output.
        gt (`torch.Tensor`), mask (`torch.Tensor`): targets and the 1-inside mask.
        fake: what the discriminator judges, from the output (the output itself by default).

    Returns:
        `dict[str, float]`: the logged values.
    """
    acc = trainer.accelerator
    lc = trainer.config.loss
    trainer.generator.train()
    logs: dict[str, float] = {}
    disc_plain = acc.unwrap_model(trainer.disc) if trainer.disc is not None else None
    if disc_plain is not None:
        disc_plain.requires_grad_(False)
    with acc.autocast():
        out = forward().float()
        hole, valid = masked_l1(out, gt, mask, lc.eps)
        loss = lc.hole * hole + lc.valid * valid
        logs.update(hole=hole.item(), valid=valid.item())
        if trainer.perceptual is not None:
            perc, style = trainer.perceptual(out, gt)
            loss = loss + lc.perceptual * perc + lc.style * style
            logs.update(perceptual=perc.item(), style=style.item())
        judged = out if fake is None else fake(out)
        if disc_plain is not None:
            # The unwrapped discriminator: its parameters are frozen for this pass and going
            # through DDP here would leave a reduction pending.
            adv = generator_adversarial_loss(
                disc_plain(judged).float(),
                mask,
                reproduce_aot_code_form=lc.reproduce_aot_code_form,
                eps=lc.eps,
            )
            loss = loss + lc.adversarial * adv
            logs["adv_g"] = adv.item()
    trainer.backward_and_step(loss, trainer.generator, trainer.opt_g, trainer.sched_g)
    logs["loss"] = loss.item()
    logs["lr_g"] = trainer.sched_g.get_last_lr()[0]

    if trainer.disc is not None:
        disc_plain.requires_grad_(True)
        labels = soft_mask_labels(mask, lc.soft_label_kernel, lc.soft_label_sigma)
        with acc.autocast():
            # One pass over fake and real keeps DDP to a single forward per backward.
            scores = trainer.disc(torch.cat([judged.detach(), gt])).float()
            d_fake, d_real = scores.chunk(2)
            loss_d = discriminator_loss(
                d_fake, d_real, labels, reproduce_aot_code_form=lc.reproduce_aot_code_form
            )
        trainer.backward_and_step(loss_d, trainer.disc, trainer.opt_d, trainer.sched_d)
        logs["loss_d"] = loss_d.item()

    trainer.update_ema()
    return logs


@torch.no_grad()
def validate_on_files(
    trainer: TrainingLoop,
    run: Callable[[int, torch.Tensor, torch.nn.Module], tuple[torch.Tensor, ...]],
    baseline: str,
) -> dict[str, float]:
    """The validation of every fusion trainer: each of ``trainer.val_files`` (centre-cropped to
    ``config.val_crop_size``) through ``run(i, gt, model) -> (gt, output, baseline image,
    picture row)``; PSNR/SSIM of the output and of the baseline (logged as ``<metric>_<baseline>``)
    and one comparison PNG per image under ``val/step_*``.
    """
    if not trainer.val_files:
        return {}
    cfg = trainer.config
    if trainer._metrics is None:
        trainer._metrics = ValidationMetrics(("psnr", "ssim"), trainer.device)
    model = trainer.val_model()
    was_training = model.training
    model.eval()
    folder = trainer.output_dir / "val" / f"step_{trainer.step:08d}"
    scores: dict[str, list[float]] = {k: [] for k in trainer.val_fields[1:]}
    for i, path in enumerate(trainer.val_files):
        gt = load_image(path).tensor
        if cfg.val_crop_size:
            gt = center_crop(gt, cfg.val_crop_size, cfg.val_crop_size)
        gt, out, base, row = run(i, gt, model)
        for key, value in trainer._metrics(out, gt).items():
            scores[key].append(value)
        for key, value in trainer._metrics(base, gt).items():
            scores[f"{key}_{baseline}"].append(value)
        save_image(torch.cat(row, dim=-1).clamp(0, 1).cpu(),
                   folder / f"{i:03d}_{Path(path).stem}.png")
    model.train(was_training)
    return {k: sum(v) / len(v) for k, v in scores.items()}


class FusionTrainer(TrainingLoop):
    """Train a [`~raim_diffusion.fusion.model.FusionNet`] on a folder of HQ images.

    Args:
        config: the training configuration.
        data_dir: folder(s) of high-quality training images.
        output_dir: where checkpoints, logs, validation images and the final model go.
        val_dir: optional folder of held-out HQ images for validation PSNR/SSIM and images
            (the metrics of ``raim eval``).
        accelerator: an existing ``Accelerator``; default: one built from the config.

    Outputs in ``output_dir``: ``config.yaml``, ``metrics.csv``, ``val_metrics.csv``,
    ``train_log.jsonl``, ``val/step_XXXXXXXX/*.png`` (LQ | mask | composite | output | GT),
    ``checkpoints/step_*`` and ``fusion/`` (the EMA generator, loadable with
    ``FusionNet.from_pretrained``).
    """

    name = "train-fusion"
    log_fields = [
        "step", "epoch", "loss", "hole", "valid", "perceptual", "style", "adv_g", "loss_d",
        "lr_g", "seconds",
    ]  # fmt: skip
    val_fields = ["step", "psnr", "ssim", "psnr_composite", "ssim_composite"]

    def __init__(
        self,
        config: TrainConfig,
        data_dir: str | os.PathLike,
        output_dir: str | os.PathLike,
        *,
        val_dir: str | os.PathLike | None = None,
        accelerator: Accelerator | None = None,
    ) -> None:
        cfg = config
        if cfg.model.architecture != "FusionNet":
            raise ValueError(
                f"FusionTrainer trains model.architecture=FusionNet, got "
                f"{cfg.model.architecture!r} (AlignFusionNet: raim_diffusion.training."
                "align_trainer.AlignFusionTrainer, which `raim train-fusion` picks)"
            )
        super().__init__(**loop_settings(cfg), output_dir=output_dir, accelerator=accelerator)
        self.dataset = HQImageDataset(
            data_dir,
            cfg.data.crop_size,
            seed=cfg.seed,
            hflip=cfg.data.hflip,
            vflip=cfg.data.vflip,
            rot90=cfg.data.rot90,
        )
        self.set_epoch_length(cfg.data.samples_per_epoch)
        self.val_files = find_images(val_dir)[: cfg.val_max_images] if val_dir else []
        self._metrics: ValidationMetrics | None = None

        with self.seeded_init():
            kwargs = dict(cfg.model.kwargs)
            kwargs.setdefault("img_size", cfg.data.crop_size)
            generator = FusionNet.from_preset(cfg.model.preset, **kwargs)
            self.use_gan = cfg.loss.adversarial > 0
            disc = (
                SMPatchDiscriminator(base_channels=cfg.loss.discriminator_channels)
                if self.use_gan
                else None
            )
        self.perceptual = None
        if cfg.loss.perceptual > 0 or cfg.loss.style > 0:
            self.perceptual = PerceptualLoss(cfg.perceptual).to(self.device)
        self.degrade = RealESRGANDegradation(cfg.degradation)

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

    # ---------------------------------------------------------------- one step

    def _inputs(
        self, gt: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.config
        g_dev, g_cpu = self.step_generators(step)
        gt = gt.to(self.device, non_blocking=True)
        with torch.no_grad():
            if cfg.data.usm_gt:
                gt = usm_sharp(gt)
            lq = self.degrade(gt, g_dev)
            b, _, h, w = gt.shape
            mask = random_masks(
                b, h, w, tuple(cfg.masks.coverage), g_cpu, sttn_prob=cfg.masks.sttn_prob
            ).to(self.device)
            composite = make_composite(gt, lq, mask)
        return gt, lq, mask, composite

    def _train_step(self, gt_batch: torch.Tensor) -> dict[str, float]:
        gt, lq, mask, composite = self._inputs(gt_batch, self.step)
        # The discriminator judges the composite: GT outside the mask, the output inside.
        return inpainting_step(
            self, lambda: self.generator(lq, mask, composite), gt, mask,
            fake=lambda out: (1 - mask) * gt + mask * out,
        )

    # ---------------------------------------------------------------- validation / export

    def has_validation(self) -> bool:
        return bool(self.val_files)

    def validate(self) -> dict[str, float]:
        """PSNR/SSIM (``raim eval``'s) of the (EMA) generator; writes comparison PNGs
        (LQ | mask | composite | output | GT)."""
        cfg = self.config

        def run(i: int, gt: torch.Tensor, model: torch.nn.Module):
            gt = gt.to(self.device)
            # The same degradation and mask at every validation, so the numbers are comparable.
            g_dev = torch.Generator(self.device).manual_seed(mix_seed(cfg.seed, 7919, i, 1))
            g_cpu = torch.Generator().manual_seed(mix_seed(cfg.seed, 7919, i, 2))
            lq = self.degrade(gt, g_dev)
            mask = random_masks(
                1, gt.shape[-2], gt.shape[-1], tuple(cfg.masks.coverage), g_cpu,
                sttn_prob=cfg.masks.sttn_prob,
            ).to(self.device)
            composite = make_composite(gt, lq, mask)
            out = model.restore(lq, mask, gt).to(gt.dtype).clamp(0, 1)
            return gt, out, composite, [lq, mask.expand_as(gt), composite, out, gt]

        return validate_on_files(self, run, "composite")

    def export(self) -> Path:
        """Save the (EMA) generator to ``output_dir/fusion``."""
        model_dir = self.output_dir / "fusion"
        self.val_model().save_pretrained(model_dir)
        return model_dir
