"""Training loop of the stage-4 fusion network (accelerate: one GPU, many GPUs, mixed precision).

Every training step builds its inputs exactly the way inference does: a GT crop is degraded with
the Real-ESRGAN second-order pipeline (at 1x) into the LQ input, a random hole mask is drawn, and
the composite is GT outside the mask and LQ inside it; the network must recover the GT.

Reproducibility: the random numbers of step ``t`` (data crops, degradations, masks and the global
RNG used by stochastic depth) are derived from ``(seed, t, rank)``, so a run resumed from a
checkpoint replays exactly the steps an uninterrupted run would take. Checkpoints hold the
weights (safetensors), optimiser, scheduler and EMA states and the step; no pickles are loaded.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.utils import logging
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from raim_diffusion.files import atomic_write, find_images
from raim_diffusion.fusion.model import FusionNet, make_composite
from raim_diffusion.images import load_image, save_image
from raim_diffusion.training.config import TrainConfig
from raim_diffusion.training.data import (
    EpochSampler,
    HQImageDataset,
    center_crop,
    make_dataloader,
)
from raim_diffusion.training.degradations import RealESRGANDegradation, usm_sharp
from raim_diffusion.training.losses import (
    PerceptualLoss,
    SMPatchDiscriminator,
    discriminator_loss,
    generator_adversarial_loss,
    masked_l1,
    soft_mask_labels,
)
from raim_diffusion.training.masks import random_masks

logger = logging.get_logger(__name__)

__all__ = ["FusionTrainer", "TrainResult", "psnr", "ssim", "latest_checkpoint"]

_CKPT_RE = re.compile(r"^step_(\d{8})$")
_LOG_FIELDS = [
    "step",
    "epoch",
    "loss",
    "hole",
    "valid",
    "perceptual",
    "style",
    "adv_g",
    "loss_d",
    "lr_g",
    "seconds",
]
_VAL_FIELDS = ["step", "psnr", "ssim", "psnr_composite", "ssim_composite"]


def _mix(*parts: int) -> int:
    h = 0
    for p in parts:
        h = (h * 0x9E3779B1 + int(p) + 1) % (2**63 - 1)
    return h


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per sample of ``(N, C, H, W)`` images in [0, 1]."""
    mse = ((pred.float() - target.float()) ** 2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM per sample (Gaussian window 11, sigma 1.5, valid region, mean over channels)."""
    x, y = pred.float(), target.float()
    c = x.shape[1]
    ax = torch.arange(11, dtype=torch.float32, device=x.device) - 5
    g = torch.exp(-(ax**2) / (2 * 1.5**2))
    g = g / g.sum()
    win = (g[:, None] * g[None, :]).expand(c, 1, 11, 11)

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, win, groups=c)

    mx, my = filt(x), filt(y)
    sxx = filt(x * x) - mx**2
    syy = filt(y * y) - my**2
    sxy = filt(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(dim=1)


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder under ``output_dir/checkpoints``, or ``None``."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    found = sorted(
        p for p in root.iterdir() if _CKPT_RE.match(p.name) and (p / "trainer_state.json").is_file()
    )
    return found[-1] if found else None


def _state_to_safetensors(module: torch.nn.Module, path: Path) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(path))


@dataclass
class TrainResult:
    """What :meth:`FusionTrainer.train` produced.

    Args:
        step: the last completed step.
        model_dir: the exported generator (``save_pretrained`` folder), or ``None`` off the main
            process.
        metrics: the last logged training metrics.
        val_metrics: the last validation metrics.
    """

    step: int
    model_dir: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    val_metrics: dict[str, float] = field(default_factory=dict)


class _EMA:
    """Exponential moving average of a model's parameters (buffers are copied)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for e, p in zip(self.model.parameters(), model.parameters(), strict=True):
            e.lerp_(p.detach().to(e.dtype), 1.0 - self.decay)
        for e, b in zip(self.model.buffers(), model.buffers(), strict=True):
            e.copy_(b)


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    warm, total, floor = cfg.optim.warmup_steps, max(1, cfg.max_steps), cfg.optim.min_lr_ratio

    def factor(step: int) -> float:
        if warm > 0 and step < warm:
            return (step + 1) / warm
        if cfg.optim.scheduler == "cosine":
            t = min(1.0, (step - warm) / max(1, total - warm))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
        return 1.0

    return factor


# --------------------------------------------------------------------------------------------
# trainer
# --------------------------------------------------------------------------------------------


class FusionTrainer:
    """Train a :class:`~raim_diffusion.fusion.model.FusionNet` on a folder of HQ images.

    Args:
        config: the training configuration.
        data_dir: folder(s) of high-quality training images.
        output_dir: where checkpoints, logs, validation images and the final model go.
        val_dir: optional folder of held-out HQ images for validation PSNR/SSIM and images.
        accelerator: an existing ``Accelerator``; default: one built from the config.

    Outputs in ``output_dir``: ``config.yaml``, ``metrics.csv``, ``val_metrics.csv``,
    ``val/step_XXXXXXXX/*.png`` (LQ | mask | composite | output | GT), ``checkpoints/step_*``
    and ``fusion/`` (the EMA generator, loadable with ``FusionNet.from_pretrained``).
    """

    def __init__(
        self,
        config: TrainConfig,
        data_dir: str | os.PathLike,
        output_dir: str | os.PathLike,
        *,
        val_dir: str | os.PathLike | None = None,
        accelerator: Accelerator | None = None,
    ) -> None:
        self.config = cfg = config
        self.output_dir = Path(output_dir)
        self.accelerator = accelerator or Accelerator(mixed_precision=cfg.mixed_precision)
        acc = self.accelerator
        self.device = acc.device

        self.dataset = HQImageDataset(
            data_dir,
            cfg.data.crop_size,
            seed=cfg.seed,
            hflip=cfg.data.hflip,
            vflip=cfg.data.vflip,
            rot90=cfg.data.rot90,
        )
        # A "virtual" epoch of at least 100 batches: the loader (and its workers) is rebuilt once
        # per epoch, which must not happen every few steps on a small folder.
        self.dataset.length = cfg.data.samples_per_epoch or max(
            len(self.dataset.files), 100 * cfg.data.batch_size * acc.num_processes
        )
        self.steps_per_epoch = EpochSampler.batches_per_epoch(
            len(self.dataset), acc.num_processes, cfg.data.batch_size
        )
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"data.samples_per_epoch={len(self.dataset)} cannot fill one batch of "
                f"{cfg.data.batch_size} on {acc.num_processes} processes"
            )
        self.val_files = find_images(val_dir)[: cfg.val_max_images] if val_dir else []

        # Initialisation draws from the global RNG (module constructors, spectral norm); fork it
        # so building the trainer is seeded and leaves the caller's RNG untouched.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(cfg.seed)  # models are built on the CPU
            kwargs = dict(cfg.model.kwargs)
            kwargs.setdefault("img_size", cfg.data.crop_size)
            generator = FusionNet.from_preset(cfg.model.preset, **kwargs)
            self.use_gan = cfg.loss.adversarial > 0
            disc = (
                SMPatchDiscriminator(base_channels=cfg.loss.discriminator_channels)
                if self.use_gan
                else None
            )
        self._ema = _EMA(generator, cfg.ema_decay) if cfg.ema_decay > 0 else None
        if self._ema is not None:
            self._ema.model.to(self.device)

        self.perceptual = None
        if cfg.loss.perceptual > 0 or cfg.loss.style > 0:
            self.perceptual = PerceptualLoss(cfg.perceptual).to(self.device)
        self.degrade = RealESRGANDegradation(cfg.degradation)

        betas = tuple(cfg.optim.betas)
        opt_g = torch.optim.Adam(
            generator.parameters(), cfg.optim.lr_g, betas, weight_decay=cfg.optim.weight_decay
        )
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, _lr_lambda(cfg))
        if disc is not None:
            opt_d = torch.optim.Adam(
                disc.parameters(), cfg.optim.lr_d, betas, weight_decay=cfg.optim.weight_decay
            )
            self.sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, _lr_lambda(cfg))
            self.generator, self.disc, self.opt_g, self.opt_d = acc.prepare(
                generator, disc, opt_g, opt_d
            )
        else:
            self.generator, self.opt_g = acc.prepare(generator, opt_g)
            self.disc = self.opt_d = self.sched_d = None
        self.step = 0
        self._last_val_step = -1

    @property
    def ema(self) -> FusionNet | None:
        """The EMA copy of the generator (``None`` when ``ema_decay`` is 0)."""
        return self._ema.model if self._ema is not None else None

    # ---------------------------------------------------------------- checkpoints

    def _ckpt_dir(self, step: int) -> Path:
        return self.output_dir / "checkpoints" / f"step_{step:08d}"

    def save_checkpoint(self) -> Path:
        """Write the full training state of the current step; returns the folder."""
        acc = self.accelerator
        final = self._ckpt_dir(self.step)
        acc.wait_for_everyone()
        if acc.is_main_process:
            tmp = final.with_name(f".{final.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            _state_to_safetensors(acc.unwrap_model(self.generator), tmp / "generator.safetensors")
            torch.save(self.opt_g.state_dict(), tmp / "optimizer_g.pt")
            torch.save(self.sched_g.state_dict(), tmp / "scheduler_g.pt")
            if self.disc is not None:
                _state_to_safetensors(
                    acc.unwrap_model(self.disc), tmp / "discriminator.safetensors"
                )
                torch.save(self.opt_d.state_dict(), tmp / "optimizer_d.pt")
                torch.save(self.sched_d.state_dict(), tmp / "scheduler_d.pt")
            if self.ema is not None:
                _state_to_safetensors(self.ema, tmp / "ema.safetensors")
            if acc.scaler is not None:
                torch.save(acc.scaler.state_dict(), tmp / "scaler.pt")
            with atomic_write(tmp / "trainer_state.json", "w", encoding="utf-8") as f:
                json.dump({"step": self.step, "seed": self.config.seed}, f)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._rotate_checkpoints()
        acc.wait_for_everyone()
        return final

    def _rotate_checkpoints(self) -> None:
        keep = self.config.keep_checkpoints
        if keep <= 0:
            return
        root = self.output_dir / "checkpoints"
        found = sorted(p for p in root.iterdir() if _CKPT_RE.match(p.name))
        for old in found[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore the training state saved by :meth:`save_checkpoint`."""
        path = Path(path)
        acc = self.accelerator

        def load_into(module: torch.nn.Module, name: str) -> None:
            module.load_state_dict(load_file(str(path / name), device="cpu"))

        def load_pt(name: str):
            return torch.load(path / name, map_location="cpu", weights_only=True)

        load_into(acc.unwrap_model(self.generator), "generator.safetensors")
        self.opt_g.load_state_dict(load_pt("optimizer_g.pt"))
        self.sched_g.load_state_dict(load_pt("scheduler_g.pt"))
        if self.disc is not None:
            load_into(acc.unwrap_model(self.disc), "discriminator.safetensors")
            self.opt_d.load_state_dict(load_pt("optimizer_d.pt"))
            self.sched_d.load_state_dict(load_pt("scheduler_d.pt"))
        if self.ema is not None:
            load_into(self.ema, "ema.safetensors")
        if acc.scaler is not None and (path / "scaler.pt").is_file():
            acc.scaler.load_state_dict(load_pt("scaler.pt"))
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        self.step = int(state["step"])
        # The run that wrote this checkpoint validated (or will never need to validate) it.
        self._last_val_step = self.step
        logger.info("resumed from %s at step %d", path, self.step)

    # ---------------------------------------------------------------- one step

    def _inputs(
        self, gt: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.config
        rank = self.accelerator.process_index
        g_dev = torch.Generator(self.device).manual_seed(_mix(cfg.seed, step, rank, 1))
        g_cpu = torch.Generator().manual_seed(_mix(cfg.seed, step, rank, 2))
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

    def train_step(self, gt: torch.Tensor) -> dict[str, float]:
        """One generator (and discriminator) update on a batch of GT crops; returns the losses."""
        cfg, acc = self.config, self.accelerator
        rank = acc.process_index
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            # Stochastic depth uses the global RNG: seed it per step so resumes replay exactly.
            torch.default_generator.manual_seed(_mix(cfg.seed, self.step, rank, 0))
            if self.device.type == "cuda":
                torch.cuda.manual_seed(_mix(cfg.seed, self.step, rank, 0))
            return self._train_step(gt)

    def _train_step(self, gt_batch: torch.Tensor) -> dict[str, float]:
        cfg, acc = self.config, self.accelerator
        lc = cfg.loss
        gt, lq, mask, composite = self._inputs(gt_batch, self.step)
        self.generator.train()
        logs: dict[str, float] = {}

        disc_plain = acc.unwrap_model(self.disc) if self.disc is not None else None
        if disc_plain is not None:
            disc_plain.requires_grad_(False)
        with acc.autocast():
            out = self.generator(lq, mask, composite).float()
            hole, valid = masked_l1(out, gt, mask, lc.eps)
            loss = lc.hole * hole + lc.valid * valid
            logs.update(hole=hole.item(), valid=valid.item())
            if self.perceptual is not None:
                perc, style = self.perceptual(out, gt)
                loss = loss + lc.perceptual * perc + lc.style * style
                logs.update(perceptual=perc.item(), style=style.item())
            comp = (1 - mask) * gt + mask * out
            if disc_plain is not None:
                # The unwrapped discriminator: its parameters are frozen for this pass and
                # going through DDP here would leave a reduction pending.
                adv = generator_adversarial_loss(
                    disc_plain(comp).float(),
                    mask,
                    reproduce_aot_code_form=lc.reproduce_aot_code_form,
                    eps=lc.eps,
                )
                loss = loss + lc.adversarial * adv
                logs["adv_g"] = adv.item()
        self.opt_g.zero_grad(set_to_none=True)
        acc.backward(loss)
        if cfg.optim.grad_clip:
            acc.clip_grad_norm_(self.generator.parameters(), cfg.optim.grad_clip)
        self.opt_g.step()
        self.sched_g.step()
        logs["loss"] = loss.item()
        logs["lr_g"] = self.sched_g.get_last_lr()[0]

        if self.disc is not None:
            disc_plain.requires_grad_(True)
            labels = soft_mask_labels(mask, lc.soft_label_kernel, lc.soft_label_sigma)
            with acc.autocast():
                # One pass over fake and real keeps DDP to a single forward per backward.
                scores = self.disc(torch.cat([comp.detach(), gt])).float()
                d_fake, d_real = scores.chunk(2)
                loss_d = discriminator_loss(
                    d_fake, d_real, labels, reproduce_aot_code_form=lc.reproduce_aot_code_form
                )
            self.opt_d.zero_grad(set_to_none=True)
            acc.backward(loss_d)
            if cfg.optim.grad_clip:
                acc.clip_grad_norm_(self.disc.parameters(), cfg.optim.grad_clip)
            self.opt_d.step()
            self.sched_d.step()
            logs["loss_d"] = loss_d.item()

        if self._ema is not None:
            self._ema.update(acc.unwrap_model(self.generator))
        return logs

    # ---------------------------------------------------------------- validation

    def _val_model(self) -> FusionNet:
        return self.ema if self.ema is not None else self.accelerator.unwrap_model(self.generator)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """PSNR/SSIM of the (EMA) generator on the validation images; writes comparison PNGs."""
        if not self.val_files:
            return {}
        cfg = self.config
        model = self._val_model()
        was_training = model.training
        model.eval()
        folder = self.output_dir / "val" / f"step_{self.step:08d}"
        scores: dict[str, list[float]] = {k: [] for k in _VAL_FIELDS[1:]}
        for i, path in enumerate(self.val_files):
            gt = load_image(path).tensor.to(self.device)
            if cfg.val_crop_size:
                gt = center_crop(gt, cfg.val_crop_size, cfg.val_crop_size)
            # The same degradation and mask at every validation, so the numbers are comparable.
            g_dev = torch.Generator(self.device).manual_seed(_mix(cfg.seed, 7919, i, 1))
            g_cpu = torch.Generator().manual_seed(_mix(cfg.seed, 7919, i, 2))
            lq = self.degrade(gt, g_dev)
            mask = random_masks(
                1,
                gt.shape[-2],
                gt.shape[-1],
                tuple(cfg.masks.coverage),
                g_cpu,
                sttn_prob=cfg.masks.sttn_prob,
            ).to(self.device)
            composite = make_composite(gt, lq, mask)
            out = model.restore(lq, mask, gt).to(gt.dtype)
            scores["psnr"].append(psnr(out, gt).item())
            scores["ssim"].append(ssim(out, gt).item())
            scores["psnr_composite"].append(psnr(composite, gt).item())
            scores["ssim_composite"].append(ssim(composite, gt).item())
            row = torch.cat([lq, mask.expand_as(gt), composite, out, gt], dim=-1)
            save_image(row.clamp(0, 1).cpu(), folder / f"{i:03d}_{Path(path).stem}.png")
        model.train(was_training)
        return {k: sum(v) / len(v) for k, v in scores.items()}

    def _validate_and_log(self) -> dict[str, float]:
        acc = self.accelerator
        scores: dict[str, float] = {}
        if self.val_files and acc.is_main_process:
            scores = self.validate()
            self._append("val_metrics.csv", _VAL_FIELDS, {"step": self.step, **scores})
            logger.info("step %d validation: %s", self.step, scores)
        self._last_val_step = self.step
        acc.wait_for_everyone()
        return scores

    # ---------------------------------------------------------------- logs

    def _prepare_logs(self, resumed_step: int) -> None:
        """Create the CSV logs, dropping rows past the resumed step (they will be redone)."""
        for name, fields in (("metrics.csv", _LOG_FIELDS), ("val_metrics.csv", _VAL_FIELDS)):
            path = self.output_dir / name
            rows = []
            if path.is_file() and resumed_step > 0:
                with open(path, newline="", encoding="utf-8") as f:
                    rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resumed_step]
            with atomic_write(path, "w", encoding="utf-8", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)

    def _append(self, name: str, fields: list[str], row: dict[str, float]) -> None:
        # Append-only log (rewriting the whole file atomically each time would be quadratic);
        # a torn last line after a crash is dropped on resume by _prepare_logs.
        with open(self.output_dir / name, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=fields, extrasaction="ignore").writerow(row)

    # ---------------------------------------------------------------- loop

    def train(self, max_steps: int | None = None, *, resume: bool = False) -> TrainResult:
        """Run (or continue) training to ``max_steps`` and export the generator.

        Args:
            max_steps: overrides ``config.max_steps``.
            resume: continue from the newest checkpoint in ``output_dir`` (a fresh start when
                there is none). Without it, an ``output_dir`` that already has checkpoints is
                refused rather than overwritten.

        Returns:
            A :class:`TrainResult`.
        """
        cfg, acc = self.config, self.accelerator
        total = cfg.max_steps if max_steps is None else int(max_steps)
        if total < 0:
            raise ValueError(f"max_steps must be >= 0, got {total}")
        ckpt = latest_checkpoint(self.output_dir)
        if resume and ckpt is not None:
            self.load_checkpoint(ckpt)
        elif resume:
            logger.warning("no checkpoint in %s; starting from scratch", self.output_dir)
        elif ckpt is not None:
            raise ValueError(
                f"{self.output_dir} already holds checkpoints ({ckpt.name}); pass resume=True "
                "(--resume) to continue, or choose another output folder"
            )
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with atomic_write(self.output_dir / "config.yaml", "w", encoding="utf-8") as f:
                f.write(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
            self._prepare_logs(self.step)
        acc.wait_for_everyone()

        bar = tqdm(
            total=total,
            initial=min(self.step, total),
            desc="train-fusion",
            disable=not acc.is_local_main_process,
            dynamic_ncols=True,
        )
        sums: dict[str, float] = {}
        count, t0 = 0, time.perf_counter()
        last: dict[str, float] = {}
        val_last: dict[str, float] = {}
        last_saved = self.step if ckpt is not None and resume else -1
        while self.step < total:
            epoch, start = divmod(self.step, self.steps_per_epoch)
            loader = make_dataloader(
                self.dataset,
                batch_size=cfg.data.batch_size,
                epoch=epoch,
                seed=cfg.seed,
                num_workers=cfg.data.num_workers,
                num_replicas=acc.num_processes,
                rank=acc.process_index,
                start_batch=start,
                pin_memory=self.device.type == "cuda",
            )
            for gt in loader:
                logs = self.train_step(gt)
                self.step += 1
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
                bar.update(1)
                bar.set_postfix(loss=f"{logs['loss']:.4f}")
                if self.step % cfg.log_every == 0 or self.step == total:
                    last = {k: v / count for k, v in sums.items()}
                    last["lr_g"] = logs["lr_g"]
                    row = {"step": self.step, "epoch": epoch, **last}
                    row["seconds"] = round(time.perf_counter() - t0, 3)
                    if acc.is_main_process:
                        self._append("metrics.csv", _LOG_FIELDS, row)
                    sums, count, t0 = {}, 0, time.perf_counter()
                if cfg.val_every and self.step % cfg.val_every == 0:
                    val_last = self._validate_and_log()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                    last_saved = self.step
                if self.step >= total:
                    break
        bar.close()
        if self.val_files and self.step > 0 and self._last_val_step != self.step:
            val_last = self._validate_and_log()  # the final model is always validated
        if last_saved != self.step and self.step > 0:
            self.save_checkpoint()
        model_dir = None
        if acc.is_main_process:
            model_dir = self.output_dir / "fusion"
            self._val_model().save_pretrained(model_dir)
        acc.wait_for_everyone()
        return TrainResult(self.step, model_dir, last, val_last)
