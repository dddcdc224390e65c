"""Training of the stage-1 prior (``raim train-prior``): any spandrel architecture, on the loop.

The restorer is trained or fine-tuned on paired LQ/GT folders, on synthetic pairs made on the
fly from HQ photos with the Real-ESRGAN degradation (optionally a strong/weak mix), or on both.
Losses: pixel L1/L2, VGG19 perceptual, vanilla GAN with Real-ESRGAN's U-Net discriminator
(spectral norm) and LPIPS; multi-stage schedules (PSNR-oriented, then GAN) switch inside one
resumable run. MiAlgo's refinement head can be trained with the restorer or on a frozen one.
The result, ``OUT/prior``, is a [`PriorModel`] folder that ``load_prior`` and ``--prior`` load.
"""

from __future__ import annotations

import copy
import functools
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from accelerate import Accelerator
from diffusers.utils import logging

from raim_diffusion.files import find_images
from raim_diffusion.images import load_image, save_image
from raim_diffusion.ops import resize
from raim_diffusion.prior.head import RefinementHead
from raim_diffusion.prior.model import PriorModel
from raim_diffusion.training.config import (
    PriorModelConfig,
    PriorTrainConfig,
    load_prior_train_config,
)
from raim_diffusion.training.data import PairedCropDataset, center_crop, find_pairs
from raim_diffusion.training.degradations import RealESRGANDegradation, usm_sharp
from raim_diffusion.training.loop import TrainingLoop, TrainResult, loop_settings, lr_factor
from raim_diffusion.training.losses import (
    PerceptualLoss,
    UNetDiscriminatorSN,
    pixel_loss,
    vanilla_gan_loss,
)
from raim_diffusion.training.validation import LPIPSLoss, ValidationMetrics

logger = logging.get_logger(__name__)

__all__ = ["PriorTrainer", "PriorNet", "build_start_prior", "train_prior"]

_LOSS_NAMES = ("pixel", "perceptual", "style", "gan", "lpips")
_SHUFFLE_FOR_SCALE = {1: 4, 2: 2}


def phase_value(cfg: PriorTrainConfig, name: str, step: int) -> float:
    """``name`` (a loss weight, ``lr_g``, ``lr_d`` or ``paired_ratio``) at ``step``: the base
    config's value, overridden by the last phase started by then that sets it."""
    base = {"lr_g": cfg.optim.lr_g, "lr_d": cfg.optim.lr_d, "paired_ratio": cfg.data.paired_ratio}
    value = base[name] if name in base else getattr(cfg.loss, name)
    for phase in cfg.phases:
        if phase.start <= step and getattr(phase, name) is not None:
            value = getattr(phase, name)
    return float(value)


class PriorNet(nn.Module):
    """What is trained: the spandrel network, optionally followed by the refinement head.

    ``forward(lq)`` is what [`PriorModel.forward`] computes at the native scale (without its
    padding and tiling): ``head(resize(lq), net(lq))`` with a head, ``net(lq)`` without.
    """

    def __init__(self, net: nn.Module, head: RefinementHead | None = None) -> None:
        super().__init__()
        self.net = net
        self.head = head

    def forward(self, lq: torch.Tensor) -> torch.Tensor:
        out = self.net(lq)
        if self.head is None:
            return out
        up = resize(lq, tuple(out.shape[-2:]))
        return self.head(up, out)


def _esrgan_kwargs(prior: PriorModel, scale: int) -> dict[str, Any]:
    """RRDBNet hyper-parameters of ``prior``'s network, at another ``scale``."""
    desc = prior.descriptors[0]
    state = desc.model.state_dict()
    first = next(v for k, v in state.items() if k.endswith("weight") and v.ndim == 4)
    blocks = {k.split(".")[3] for k in state if k.startswith("model.1.sub.") and ".RDB1." in k}
    shuffle = _SHUFFLE_FOR_SCALE[scale]
    # spandrel's convention: ``scale`` is the body's upsampling, the true scale is
    # scale / shuffle_factor, and the first convolution sees the unshuffled channels.
    return {
        "in_nc": desc.input_channels * shuffle**2,
        "out_nc": desc.output_channels,
        "num_filters": int(first.shape[0]),
        "num_blocks": len(blocks),
        "plus": any("conv1x1" in k for k in state),
        "scale": scale * shuffle,
        "shuffle_factor": shuffle,
    }


def build_start_prior(model: PriorModelConfig) -> PriorModel:
    """The prior training starts from: random init of an architecture, or loaded weights.

    With ``model.weights`` and a ``model.scale`` different from the weights' scale, an ESRGAN
    (RRDBNet) is rebuilt as the pixel-unshuffle x1 / x2 variant and every tensor of matching
    name and shape is copied (all but the first convolution); other architectures are refused.

    Raises:
        ValueError: unknown architecture, a scale change that cannot be honoured, or an ensemble.
    """
    from raim_diffusion.prior.loading import load_prior

    if model.weights is None:
        try:
            prior = PriorModel.from_architecture(model.architecture, **dict(model.kwargs))
        except TypeError as err:
            raise ValueError(
                f"model.kwargs={dict(model.kwargs)} do not fit {model.architecture}: {err} "
                "(overrides of model.kwargs merge into the preset's; list them all in a YAML)"
            ) from err
        scale = prior.native_scale
        if model.scale is not None and model.scale != scale:
            raise ValueError(
                f"model.scale={model.scale} but {model.architecture}({dict(model.kwargs)}) is "
                f"x{scale}; set the architecture's own arguments instead (a x1 RRDBNet is "
                "ESRGAN with in_nc=48, scale=4, shuffle_factor=4)"
            )
        return prior
    prior = load_prior(model.weights)
    if len(prior.descriptors) != 1:
        raise ValueError(f"model.weights={model.weights!r} is an ensemble; train one network")
    prior.set_head(None)
    desc = prior.descriptors[0]
    if model.scale is None or model.scale == desc.scale:
        return prior
    if desc.architecture.id != "ESRGAN" or model.scale not in _SHUFFLE_FOR_SCALE:
        raise ValueError(
            f"model.weights={model.weights!r} is a x{desc.scale} {desc.architecture.id}; it "
            f"cannot be fine-tuned at model.scale={model.scale} (only an ESRGAN/RRDBNet can be "
            "turned into its x1 or x2 pixel-unshuffle variant). Train at "
            f"model.scale={desc.scale} with GT {desc.scale}x the LQ size, or train the x"
            f"{model.scale} network from scratch with model.architecture"
        )
    kwargs = _esrgan_kwargs(prior, model.scale)
    new = PriorModel.from_architecture("ESRGAN", **kwargs)
    target = new.members[0].state_dict()
    source = desc.model.state_dict()
    fresh = [k for k, v in target.items() if k not in source or source[k].shape != v.shape]
    target.update({k: v for k, v in source.items() if k in target and k not in fresh})
    first = next(k for k in target if k.endswith("weight") and target[k].ndim == 4)
    r2 = kwargs["shuffle_factor"] ** 2
    if first in fresh and source[first].shape[1] * r2 == target[first].shape[1]:
        # pixel_unshuffle puts the r*r sub-pixels of colour c at channels c*r*r ... : spreading
        # each colour's weights evenly over them makes the first layer see the box-downscaled
        # image, so the start is the x4 network restoring a 1/r-size copy: sharp, not noise.
        target[first] = source[first].repeat_interleave(r2, dim=1) / r2
        fresh.remove(first)
    new.members[0].load_state_dict(target)
    logger.warning(
        f"{model.weights}: x{desc.scale} RRDBNet fine-tuned as a x{model.scale} pixel-unshuffle "
        f"RRDBNet; {len(target) - len(fresh)} tensors reused (the first convolution spread over "
        f"the unshuffled channels), {len(fresh)} start fresh"
    )
    return new


class PriorTrainer(TrainingLoop):
    """Train a restoration prior (any spandrel architecture) and export it as a PriorModel.

    Args:
        config: the training configuration.
        output_dir: checkpoints, logs, validation images and ``prior/``.
        lq_dir, gt_dir: paired folders (files matched by name; GT = scale x LQ).
        hq_dirs: HQ photos degraded on the fly into synthetic pairs.
        val_lq_dir, val_gt_dir: held-out pairs: PSNR/SSIM of ``raim eval`` (and LPIPS / DISTS
            when their weights are cached), of the starting point too.
        accelerator: an existing ``Accelerator``.

    Outputs in ``output_dir``: ``config.yaml``, ``metrics.csv``, ``val_metrics.csv``,
    ``train_log.jsonl``, ``val/step_*/`` (outputs of the first validation pairs),
    ``checkpoints/step_*`` and ``prior/`` (the EMA prior, with its head when trained).
    """

    name = "train-prior"
    log_fields = [
        "step", "epoch", "loss", *_LOSS_NAMES, "loss_d", "lr_g", "seconds", "images_per_second",
    ]  # fmt: skip
    validate_at_start = True
    items_keyed_by_step = True  # the paired share and degradations follow the phase

    def __init__(
        self,
        config: PriorTrainConfig,
        output_dir: str | os.PathLike,
        *,
        lq_dir: str | os.PathLike | None = None,
        gt_dir: str | os.PathLike | None = None,
        hq_dirs: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        val_lq_dir: str | os.PathLike | None = None,
        val_gt_dir: str | os.PathLike | None = None,
        accelerator: Accelerator | None = None,
    ) -> None:
        cfg = config
        super().__init__(**loop_settings(cfg), output_dir=output_dir, accelerator=accelerator)
        if (lq_dir is None) != (gt_dir is None):
            raise ValueError("paired data needs both an LQ folder (--lq) and a GT folder (--gt)")
        if (val_lq_dir is None) != (val_gt_dir is None):
            raise ValueError("validation needs both --val-lq and --val-gt")
        if lq_dir is None and not hq_dirs:
            raise ValueError("no training data: give --lq/--gt paired folders, --data, or both")

        with self.seeded_init():
            self._template = build_start_prior(cfg.model)
            net = copy.deepcopy(self._template.members[0])
            head = (
                RefinementHead(hidden_channels=cfg.model.head_channels) if cfg.model.head else None
            )
            self.use_gan = self._ever(("gan",))
            disc = (
                UNetDiscriminatorSN(
                    base_channels=cfg.loss.discriminator_channels,
                    skip_connection=cfg.loss.skip_connection,
                )
                if self.use_gan
                else None
            )
        desc = self._template.descriptors[0]
        self.scale = desc.scale
        self._check_crop(desc)
        net.train().requires_grad_(not cfg.model.freeze_prior)
        generator = PriorNet(net, head)

        pairs = find_pairs(lq_dir, gt_dir) if lq_dir is not None else []
        hq_files = find_images(hq_dirs) if hq_dirs else []
        if hq_dirs and not hq_files:
            raise FileNotFoundError(f"no images found in {hq_dirs!r}")
        self.dataset = PairedCropDataset(
            pairs,
            hq_files,
            cfg.data.crop_size,
            self.scale,
            paired_ratio=functools.partial(phase_value, cfg, "paired_ratio"),
            weak_ratio=cfg.data.weak_ratio,
            seed=cfg.seed,
            hflip=cfg.data.hflip,
            vflip=cfg.data.vflip,
            rot90=cfg.data.rot90,
            niqe_candidates=cfg.data.niqe_candidates,
        )
        try:
            self.dataset.check_first_pair()
        except ValueError as err:
            raise ValueError(
                f"{err} (the prior to train is x{self.scale}; set model.scale to the data's "
                "scale, e.g. model.scale=1 for same-size pairs)"
            ) from err
        self.set_epoch_length(cfg.data.samples_per_epoch)

        degradation = copy.deepcopy(cfg.degradation)
        degradation.scale = self.scale
        self.degrade = RealESRGANDegradation(degradation)
        self.degrade_weak = None
        if cfg.degradation_weak is not None:
            weak = copy.deepcopy(cfg.degradation_weak)
            weak.scale = self.scale
            self.degrade_weak = RealESRGANDegradation(weak)

        self.perceptual = None
        if self._ever(("perceptual", "style")):
            self.perceptual = PerceptualLoss(cfg.perceptual).to(self.device)
        self.lpips = LPIPSLoss(self.device) if self._ever(("lpips",)) else None

        self.val_pairs = (
            find_pairs(val_lq_dir, val_gt_dir)[: cfg.val_max_images] if val_lq_dir else []
        )
        self._metrics = None
        if self.val_pairs:
            self._metrics = ValidationMetrics(
                ("psnr", "ssim"), self.device, optional=("lpips", "dists")
            )
            names = self._metrics.names
            self.val_fields = ["step", *names, *(f"{n}_input" for n in names)]

        o = cfg.optim
        params = [p for p in generator.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: the prior is frozen and there is no head")
        # Optimisers hold lr 1: the schedule returns the phase's learning rate itself.
        opt_g = torch.optim.Adam(params, 1.0, tuple(o.betas), weight_decay=o.weight_decay)
        opt_d = (
            torch.optim.Adam(disc.parameters(), 1.0, tuple(o.betas), weight_decay=o.weight_decay)
            if disc is not None
            else None
        )
        factor = lr_factor(o.scheduler, o.warmup_steps, cfg.max_steps, o.min_lr_ratio)
        self.setup_models(
            generator,
            opt_g,
            lambda step: self.phase_value("lr_g", step) * factor(step),
            disc,
            opt_d,
            lambda step: self.phase_value("lr_d", step) * factor(step),
        )

    # ---------------------------------------------------------------- setup helpers

    def _ever(self, names: Iterable[str]) -> bool:
        cfg = self.config
        for name in names:
            if getattr(cfg.loss, name) > 0:
                return True
            if any((getattr(p, name) or 0) > 0 for p in cfg.phases):
                return True
        return False

    def _check_crop(self, desc: Any) -> None:
        cfg = self.config
        c = cfg.data.crop_size
        if c % self.scale:
            raise ValueError(f"data.crop_size={c} must be a multiple of the scale {self.scale}")
        req = desc.size_requirements
        side = c // self.scale
        if side < req.minimum or side % req.multiple_of:
            raise ValueError(
                f"{desc.architecture.id} needs LQ crops that are multiples of "
                f"{req.multiple_of} and at least {req.minimum} pixels; data.crop_size={c} gives "
                f"{side} at scale {self.scale}"
            )
        if self.use_gan and c % 8:
            raise ValueError(f"the U-Net discriminator needs data.crop_size % 8 == 0, got {c}")

    def phase_value(self, name: str, step: int) -> float:
        """A scheduled value at ``step``: the base config, overridden by the active phase."""
        return phase_value(self.config, name, step)

    # ---------------------------------------------------------------- data

    @torch.no_grad()
    def make_inputs(self, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, ...]:
        """``(lq, gt)`` of a batch: synthetic items degraded with the step's generator."""
        g_dev, _ = self.step_generators(step)
        gt = batch["gt"].to(self.device, non_blocking=True)
        lq = batch["lq"].to(self.device, non_blocking=True).clone()
        synthetic = batch["synthetic"].to(self.device).bool()
        weak = batch["weak"].to(self.device).bool() & synthetic
        if synthetic.any():
            target = usm_sharp(gt) if self.config.data.usm_gt else gt
            strong = synthetic & ~weak
            if strong.any():
                lq[strong] = self.degrade(gt[strong], g_dev)
            if weak.any():
                lq[weak] = self.degrade_weak(gt[weak], g_dev)
            gt = torch.where(synthetic.view(-1, 1, 1, 1), target, gt)
        return lq, gt

    # ---------------------------------------------------------------- one step

    def _train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        acc = self.accelerator
        step = self.step
        w = {name: self.phase_value(name, step) for name in _LOSS_NAMES}
        lq, gt = self.make_inputs(batch, step)
        self.generator.train()
        if self.config.model.freeze_prior:
            acc.unwrap_model(self.generator).net.eval()
        logs: dict[str, float] = {}
        disc_plain = acc.unwrap_model(self.disc) if self.disc is not None else None
        if disc_plain is not None:
            disc_plain.requires_grad_(False)
        with acc.autocast():
            out = self.generator(lq).float()
            loss = out.new_zeros(())
            if w["pixel"] > 0:
                term = pixel_loss(out, gt, self.config.loss.pixel_type)
                loss = loss + w["pixel"] * term
                logs["pixel"] = term.item()
            if self.perceptual is not None and (w["perceptual"] > 0 or w["style"] > 0):
                perc, style = self.perceptual(out, gt)
                loss = loss + w["perceptual"] * perc + w["style"] * style
                logs.update(perceptual=perc.item(), style=style.item())
            if self.lpips is not None and w["lpips"] > 0:
                term = self.lpips(out, gt)
                loss = loss + w["lpips"] * term
                logs["lpips"] = term.item()
            if disc_plain is not None and w["gan"] > 0:
                # The unwrapped discriminator: frozen for this pass, and going through DDP
                # here would leave a reduction pending.
                term = vanilla_gan_loss(disc_plain(out).float(), True)
                loss = loss + w["gan"] * term
                logs["gan"] = term.item()
        self.backward_and_step(loss, self.generator, self.opt_g, self.sched_g)
        logs["loss"] = loss.item()
        logs["lr_g"] = self.sched_g.get_last_lr()[0]

        if self.disc is not None:
            disc_plain.requires_grad_(True)
            if w["gan"] > 0:
                with acc.autocast():
                    # One pass over real and fake keeps DDP to a single forward per backward.
                    scores = self.disc(torch.cat([gt, out.detach()])).float()
                    real, fake = scores.chunk(2)
                    loss_d = vanilla_gan_loss(real, True) + vanilla_gan_loss(fake, False)
                self.backward_and_step(loss_d, self.disc, self.opt_d, self.sched_d)
                logs["loss_d"] = loss_d.item()
            else:
                with warnings.catch_warnings():
                    # The schedule follows the step while D rests; torch warns about the order.
                    warnings.filterwarnings(
                        "ignore", "Detected call of `lr_scheduler.step", UserWarning
                    )
                    self.sched_d.step()
        self.update_ema()
        return logs

    # ---------------------------------------------------------------- validation / export

    def current_prior(self, device: torch.device | str = "cpu") -> PriorModel:
        """The (EMA) model of the current step as a [`PriorModel`] (with its head)."""
        model = self.val_model()
        prior = copy.deepcopy(self._template)
        prior.members[0].load_state_dict(
            {k: v.detach().to("cpu") for k, v in model.net.state_dict().items()}
        )
        prior.set_head(copy.deepcopy(model.head).to("cpu") if model.head is not None else None)
        return prior.to(device).eval()

    def has_validation(self) -> bool:
        return bool(self.val_pairs)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """``raim eval``'s metrics of the current prior and of the resized input on the held-out
        pairs; the first four outputs are written to ``val/step_XXXXXXXX/``."""
        if not self.val_pairs:
            return {}
        prior = self.current_prior(self.device)
        folder = self.output_dir / "val" / f"step_{self.step:08d}"
        sums: dict[str, float] = {}
        crop = self.config.val_crop_size
        for i, (lq_path, gt_path) in enumerate(self.val_pairs):
            lq = load_image(lq_path).tensor.to(self.device)
            gt = load_image(gt_path).tensor.to(self.device)
            if crop:
                gt = center_crop(gt, crop, crop)
                lq = center_crop(lq, crop // self.scale, crop // self.scale)
                gt = gt[..., : lq.shape[-2] * self.scale, : lq.shape[-1] * self.scale]
            if gt.shape[-2:] != (lq.shape[-2] * self.scale, lq.shape[-1] * self.scale):
                raise ValueError(
                    f"validation pair {gt_path.name}: GT {tuple(gt.shape[-2:])} is not "
                    f"{self.scale}x the LQ {tuple(lq.shape[-2:])}"
                )
            out = prior(lq, upscale=self.scale).clamp(0, 1)
            up = resize(lq, tuple(gt.shape[-2:])).clamp(0, 1)
            for key, value in self._metrics(out, gt).items():
                sums[key] = sums.get(key, 0.0) + value
            for key, value in self._metrics(up, gt).items():
                sums[f"{key}_input"] = sums.get(f"{key}_input", 0.0) + value
            if i < 4:
                save_image(out.cpu(), folder / f"{gt_path.stem}.png")
        return {k: v / len(self.val_pairs) for k, v in sums.items()}

    def export(self) -> Path:
        """Save the (EMA) prior to ``output_dir/prior`` (``load_prior`` / ``--prior`` load it)."""
        model_dir = self.output_dir / "prior"
        self.current_prior("cpu").save_pretrained(model_dir)
        return model_dir


def train_prior(
    output_dir: str | os.PathLike,
    config: str | os.PathLike | PriorTrainConfig = "tiny",
    *,
    lq: str | os.PathLike | None = None,
    gt: str | os.PathLike | None = None,
    data: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    val_lq: str | os.PathLike | None = None,
    val_gt: str | os.PathLike | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    max_steps: int | None = None,
    resume: bool = False,
    init: str | os.PathLike | None = None,
) -> TrainResult:
    """Train a prior: the Python form of ``raim train-prior``.

    Args:
        output_dir: the output folder; the prior lands in ``output_dir/prior``.
        config: a prior preset name (``tiny``, ``xhs-iag-gan``, ``mialgo``, ``hit-iil``), a
            YAML file or a [`PriorTrainConfig`].
        lq, gt: paired folders (matched by file name).
        data: HQ folder(s) for synthetic pairs.
        val_lq, val_gt: held-out pairs for validation.
        overrides: dot-list overrides (``["data.batch_size=4"]``); not with a config object.
        max_steps: overrides ``max_steps``.
        resume: continue from the newest checkpoint.
        init: fine-tune these weights instead of the preset's architecture (built-in name,
            file or prior folder).

    Returns:
        The [`TrainResult`]; ``first_val_metrics`` and ``val_metrics`` hold the validation of
        the starting point and of the result.

    Example:
        ```py
        result = train_prior("runs/p", "tiny", lq="pairs/lq", gt="pairs/gt")
        prior = load_prior(result.model_dir)
        ```
    """
    if isinstance(config, PriorTrainConfig):
        if overrides or init is not None:
            raise ValueError("overrides and init apply to a preset name or file, not a config")
        cfg = config
    else:
        cfg = load_prior_train_config(config, overrides, init=init)
    trainer = PriorTrainer(
        cfg, output_dir, lq_dir=lq, gt_dir=gt, hq_dirs=data, val_lq_dir=val_lq, val_gt_dir=val_gt
    )
    return trainer.train(max_steps, resume=resume)
