"""The one training loop shared by the prior and fusion trainers (accelerate: one or many GPUs).

A trainer subclasses [`TrainingLoop`] and provides the data set, the generator (and optionally a
discriminator), one optimisation step, a validation and the export of the final model; the loop
owns everything else: the accelerator, per-step seeding, EMA, optimisers' schedules, safetensors
checkpoints, exact resume, the progress bar and the logs (``metrics.csv``, ``val_metrics.csv``
and ``train_log.jsonl``).

Reproducibility: the random numbers of step ``t`` (data crops, degradations, masks and the global
RNG used by stochastic depth) are derived from ``(seed, t, rank)``, so a run resumed from a
checkpoint replays exactly the steps an uninterrupted run would take. Checkpoints hold the
weights (safetensors), optimiser, scheduler and EMA states and the step; only tensors and plain
containers are unpickled (``weights_only=True``).
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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers.utils import logging
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from raim_diffusion.files import atomic_write
from raim_diffusion.training.data import make_dataloader

logger = logging.get_logger(__name__)

__all__ = ["TrainingLoop", "TrainResult", "EMA", "latest_checkpoint", "mix_seed", "lr_factor"]

_CKPT_RE = re.compile(r"^step_(\d{8})$")
LOG_NAME = "train_log.jsonl"


def mix_seed(*parts: int) -> int:
    """Spread integers (seed, step, rank, stream) into one 63-bit generator seed."""
    h = 0
    for p in parts:
        h = (h * 0x9E3779B1 + int(p) + 1) % (2**63 - 1)
    return h


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


def lr_factor(
    scheduler: str, warmup_steps: int, max_steps: int, min_lr_ratio: float
) -> Callable[[int], float]:
    """Learning-rate multiplier at a step: linear warmup, then constant or cosine decay.

    Args:
        scheduler: ``"constant"`` or ``"cosine"`` (to ``min_lr_ratio`` at ``max_steps``).
        warmup_steps: steps of linear warmup (0: none).
        max_steps: the end of the cosine.
        min_lr_ratio: the cosine's floor.
    """
    total = max(1, max_steps)

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if scheduler == "cosine":
            t = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
            return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        return 1.0

    return factor


@dataclass
class TrainResult:
    """What [`TrainingLoop.train`] produced.

    Args:
        step: the last completed step.
        model_dir: the exported model (``save_pretrained`` folder), or ``None`` off the main
            process.
        metrics: the last logged training metrics.
        val_metrics: the last validation metrics.
        first_val_metrics: the validation metrics of the starting point (step 0), when the run
            validated it.
    """

    step: int
    model_dir: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    val_metrics: dict[str, float] = field(default_factory=dict)
    first_val_metrics: dict[str, float] = field(default_factory=dict)


class EMA:
    """Exponential moving average of a model's parameters (buffers are copied)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Move the average ``1 - decay`` of the way towards ``model``."""
        for e, p in zip(self.model.parameters(), model.parameters(), strict=True):
            e.lerp_(p.detach().to(e.dtype), 1.0 - self.decay)
        for e, b in zip(self.model.buffers(), model.buffers(), strict=True):
            e.copy_(b)


def loop_settings(config: Any) -> dict[str, Any]:
    """The `TrainingLoop` arguments a training config sets (every trainer's config has the same
    names for them: seed, steps, EMA, precision, batch, logging, checkpoints, validation)."""
    return dict(
        config=config,
        seed=config.seed,
        max_steps=config.max_steps,
        ema_decay=config.ema_decay,
        mixed_precision=config.mixed_precision,
        batch_size=config.data.batch_size,
        num_workers=config.data.num_workers,
        log_every=config.log_every,
        checkpoint_every=config.checkpoint_every,
        keep_checkpoints=config.keep_checkpoints,
        val_every=config.val_every,
        grad_clip=config.optim.grad_clip,
    )


class TrainingLoop:
    """Shared machinery of the trainers; subclasses fill in the task.

    A subclass's ``__init__`` calls ``super().__init__``, builds ``self.dataset`` and its models
    (inside [`seeded_init`]) and then calls [`setup_models`]. It implements:

    - ``_train_step(batch) -> dict[str, float]``: one update (the loop seeds the global RNG);
    - ``validate() -> dict[str, float]``: metrics of the current (EMA) model, ``{}`` if none;
    - ``export() -> Path``: save the final model, return its folder (main process only).

    Class attributes: ``name`` (progress bar), ``log_fields`` and ``val_fields`` (CSV columns),
    ``validate_at_start`` (also validate the starting point of a fresh run) and
    ``items_keyed_by_step`` (the data set takes ``(index, step)`` keys, see `EpochSampler`).

    Args:
        seed: base seed of everything random.
        output_dir: checkpoints, logs, validation images and the exported model.
        config: the structured config, written to ``output_dir/config.yaml``.
        max_steps: default number of steps of [`train`].
        ema_decay: EMA decay of the generator (0: no EMA).
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"`` for accelerate.
        log_every, checkpoint_every, keep_checkpoints, val_every: the schedule of logs,
            checkpoints and validations in steps.
        grad_clip: clip gradient norms (``None``: no clipping).
        accelerator: an existing ``Accelerator``.
    """

    name = "train"
    log_fields: list[str] = ["step", "epoch", "loss", "lr_g", "seconds"]
    val_fields: list[str] = ["step"]
    validate_at_start = False
    # Data sets whose items depend on the training step take ``(index, step)`` keys.
    items_keyed_by_step = False

    def __init__(
        self,
        *,
        config: Any,
        seed: int,
        output_dir: str | os.PathLike,
        max_steps: int,
        ema_decay: float,
        mixed_precision: str,
        batch_size: int,
        num_workers: int,
        log_every: int,
        checkpoint_every: int,
        keep_checkpoints: int,
        val_every: int,
        grad_clip: float | None = None,
        accelerator: Accelerator | None = None,
    ) -> None:
        self.config = config
        self.seed = int(seed)
        self.output_dir = Path(output_dir)
        self.max_steps = int(max_steps)
        self.ema_decay = float(ema_decay)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.log_every, self.checkpoint_every = int(log_every), int(checkpoint_every)
        self.keep_checkpoints, self.val_every = int(keep_checkpoints), int(val_every)
        self.grad_clip = grad_clip
        self.accelerator = accelerator or Accelerator(mixed_precision=mixed_precision)
        self.device = self.accelerator.device
        self.step = 0
        self._last_val_step = -1
        self.dataset: Any = None
        self.steps_per_epoch = 0
        self.generator: torch.nn.Module
        self.disc: torch.nn.Module | None = None
        self.opt_g: torch.optim.Optimizer
        self.opt_d: torch.optim.Optimizer | None = None
        self.sched_g: torch.optim.lr_scheduler.LRScheduler
        self.sched_d: torch.optim.lr_scheduler.LRScheduler | None = None
        self._ema: EMA | None = None

    # ---------------------------------------------------------------- construction

    def seeded_init(self) -> Any:
        """Context in which models are built: the global RNG (module constructors, spectral
        norm) is seeded with ``seed`` and the caller's stream is left untouched."""
        return _SeededInit(self.seed)

    def set_epoch_length(self, samples_per_epoch: int | None) -> None:
        """Set the "virtual" epoch: at least 100 batches, since the loader (and its workers) is
        rebuilt once per epoch, which must not happen every few steps on a small folder."""
        from raim_diffusion.training.data import EpochSampler

        acc = self.accelerator
        self.dataset.length = samples_per_epoch or max(
            len(self.dataset.files), 100 * self.batch_size * acc.num_processes
        )
        self.steps_per_epoch = EpochSampler.batches_per_epoch(
            len(self.dataset), acc.num_processes, self.batch_size
        )
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"data.samples_per_epoch={len(self.dataset)} cannot fill one batch of "
                f"{self.batch_size} on {acc.num_processes} processes"
            )

    def setup_models(
        self,
        generator: torch.nn.Module,
        opt_g: torch.optim.Optimizer,
        lr_g: Callable[[int], float],
        disc: torch.nn.Module | None = None,
        opt_d: torch.optim.Optimizer | None = None,
        lr_d: Callable[[int], float] | None = None,
    ) -> None:
        """EMA, schedulers and ``accelerator.prepare`` of the generator (and discriminator)."""
        acc = self.accelerator
        self._ema = EMA(generator, self.ema_decay) if self.ema_decay > 0 else None
        if self._ema is not None:
            self._ema.model.to(self.device)
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lr_g)
        if disc is not None:
            if opt_d is None or lr_d is None:
                raise TypeError("a discriminator needs its optimiser and schedule")
            self.sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lr_d)
            self.generator, self.disc, self.opt_g, self.opt_d = acc.prepare(
                generator, disc, opt_g, opt_d
            )
        else:
            self.generator, self.opt_g = acc.prepare(generator, opt_g)

    @property
    def ema(self) -> torch.nn.Module | None:
        """The EMA copy of the generator (``None`` when ``ema_decay`` is 0)."""
        return self._ema.model if self._ema is not None else None

    def val_model(self) -> torch.nn.Module:
        """The model validated and exported: the EMA copy, else the raw generator."""
        return self.ema if self.ema is not None else self.accelerator.unwrap_model(self.generator)

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
                json.dump({"step": self.step, "seed": self.seed}, f)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._rotate_checkpoints()
        acc.wait_for_everyone()
        return final

    def _rotate_checkpoints(self) -> None:
        if self.keep_checkpoints <= 0:
            return
        root = self.output_dir / "checkpoints"
        found = sorted(p for p in root.iterdir() if _CKPT_RE.match(p.name))
        for old in found[: -self.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore the training state saved by [`save_checkpoint`]."""
        path = Path(path)
        acc = self.accelerator

        def load_into(module: torch.nn.Module, name: str) -> None:
            module.load_state_dict(load_file(str(path / name), device="cpu"))

        def load_pt(name: str) -> Any:
            return torch.load(path / name, map_location="cpu", weights_only=True)

        has_disc = (path / "discriminator.safetensors").is_file()
        if has_disc != (self.disc is not None):
            raise ValueError(
                f"checkpoint {path} was written "
                f"{'with' if has_disc else 'without'} a discriminator but this config "
                f"{'has none' if has_disc else 'has one'}; resume with the config of that run"
            )
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

    def step_generators(self, step: int) -> tuple[torch.Generator, torch.Generator]:
        """Per-step generators on the device and on the CPU, from ``(seed, step, rank)``."""
        rank = self.accelerator.process_index
        g_dev = torch.Generator(self.device).manual_seed(mix_seed(self.seed, step, rank, 1))
        g_cpu = torch.Generator().manual_seed(mix_seed(self.seed, step, rank, 2))
        return g_dev, g_cpu

    def train_step(self, batch: Any) -> dict[str, float]:
        """One update on ``batch``, with the global RNG seeded for this step; returns losses."""
        rank = self.accelerator.process_index
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            # Stochastic depth uses the global RNG: seed it per step so resumes replay exactly.
            torch.default_generator.manual_seed(mix_seed(self.seed, self.step, rank, 0))
            if self.device.type == "cuda":
                torch.cuda.manual_seed(mix_seed(self.seed, self.step, rank, 0))
            return self._train_step(batch)

    def _train_step(self, batch: Any) -> dict[str, float]:
        raise NotImplementedError

    def backward_and_step(
        self,
        loss: torch.Tensor,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
    ) -> None:
        """Zero the gradients, backward (through accelerate), clip, step and schedule."""
        optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        if self.grad_clip:
            self.accelerator.clip_grad_norm_(model.parameters(), self.grad_clip)
        optimizer.step()
        scheduler.step()

    def update_ema(self) -> None:
        """Fold the generator into its EMA copy (no-op without EMA)."""
        if self._ema is not None:
            self._ema.update(self.accelerator.unwrap_model(self.generator))

    # ---------------------------------------------------------------- validation

    def validate(self) -> dict[str, float]:
        raise NotImplementedError

    def export(self) -> Path:
        raise NotImplementedError

    def _validate_and_log(self) -> dict[str, float]:
        acc = self.accelerator
        scores: dict[str, float] = {}
        if acc.is_main_process:
            scores = self.validate()
            if scores:
                self._append_csv("val_metrics.csv", self.val_fields, {"step": self.step, **scores})
                self._append_jsonl({"step": self.step, "val": scores})
                logger.info("step %d validation: %s", self.step, scores)
        self._last_val_step = self.step
        acc.wait_for_everyone()
        return scores

    def has_validation(self) -> bool:
        """Whether there is anything to validate on (subclasses with a validation set)."""
        return False

    # ---------------------------------------------------------------- logs

    def _prepare_logs(self, resumed_step: int) -> None:
        """Create the logs, dropping rows past the resumed step (they will be redone)."""
        logs = (("metrics.csv", self.log_fields), ("val_metrics.csv", self.val_fields))
        for name, fields in logs:
            path = self.output_dir / name
            rows = []
            if path.is_file() and resumed_step > 0:
                with open(path, newline="", encoding="utf-8") as f:
                    rows = [r for r in csv.DictReader(f) if _row_step(r) <= resumed_step]
            with atomic_write(path, "w", encoding="utf-8", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)
        path = self.output_dir / LOG_NAME
        lines = []
        if path.is_file() and resumed_step > 0:
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a torn last line after a crash
                    continue
                if int(row.get("step", 0)) <= resumed_step:
                    lines.append(line)
        with atomic_write(path, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))

    def _append_csv(self, name: str, fields: list[str], row: dict[str, Any]) -> None:
        # Append-only log (rewriting the whole file atomically each time would be quadratic);
        # a torn last line after a crash is dropped on resume by _prepare_logs.
        with open(self.output_dir / name, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=fields, extrasaction="ignore").writerow(row)

    def _append_jsonl(self, row: dict[str, Any]) -> None:
        with open(self.output_dir / LOG_NAME, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")

    # ---------------------------------------------------------------- loop

    def _batches(self, epoch: int, start: int) -> Iterable[Any]:
        return make_dataloader(
            self.dataset,
            batch_size=self.batch_size,
            epoch=epoch,
            seed=self.seed,
            num_workers=self.num_workers,
            num_replicas=self.accelerator.num_processes,
            rank=self.accelerator.process_index,
            start_batch=start,
            pin_memory=self.device.type == "cuda",
            first_step=self.step if self.items_keyed_by_step else None,
        )

    def train(self, max_steps: int | None = None, *, resume: bool = False) -> TrainResult:
        """Run (or continue) training to ``max_steps`` and export the model.

        Args:
            max_steps: overrides the config's ``max_steps``.
            resume: continue from the newest checkpoint in ``output_dir`` (a fresh start when
                there is none). Without it, an ``output_dir`` that already has checkpoints is
                refused rather than overwritten.

        Returns:
            A [`TrainResult`].
        """
        acc = self.accelerator
        total = self.max_steps if max_steps is None else int(max_steps)
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
                f.write(OmegaConf.to_yaml(OmegaConf.structured(self.config)))
            self._prepare_logs(self.step)
        acc.wait_for_everyone()

        first_val: dict[str, float] = {}
        if self.validate_at_start and self.step == 0 and self.has_validation():
            first_val = self._validate_and_log()

        bar = tqdm(
            total=total,
            initial=min(self.step, total),
            desc=self.name,
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
            for batch in self._batches(epoch, start):
                logs = self.train_step(batch)
                self.step += 1
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
                bar.update(1)
                elapsed = time.perf_counter() - t0
                bar.set_postfix(
                    loss=f"{logs['loss']:.4f}",
                    img_s=f"{count * self.batch_size / max(elapsed, 1e-9):.1f}",
                )
                if self.step % self.log_every == 0 or self.step == total:
                    last = {k: v / count for k, v in sums.items()}
                    last["lr_g"] = logs["lr_g"]
                    row = {"step": self.step, "epoch": epoch, **last}
                    row["seconds"] = round(elapsed, 3)
                    row["images_per_second"] = round(
                        count * self.batch_size / max(elapsed, 1e-9), 3
                    )
                    if acc.is_main_process:
                        self._append_csv("metrics.csv", self.log_fields, row)
                        self._append_jsonl(row)
                    sums, count, t0 = {}, 0, time.perf_counter()
                if self.val_every and self.step % self.val_every == 0 and self.has_validation():
                    val_last = self._validate_and_log()
                if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                    self.save_checkpoint()
                    last_saved = self.step
                if self.step >= total:
                    break
        bar.close()
        if self.has_validation() and self.step > 0 and self._last_val_step != self.step:
            val_last = self._validate_and_log()  # the final model is always validated
        if last_saved != self.step and self.step > 0:
            self.save_checkpoint()
        model_dir = self.export() if acc.is_main_process else None
        acc.wait_for_everyone()
        return TrainResult(self.step, model_dir, last, val_last, first_val)


def _row_step(row: dict[str, str]) -> int:
    try:
        return int(row["step"])
    except (KeyError, TypeError, ValueError):
        return 1 << 62  # a torn row: dropped


class _SeededInit:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._fork: Any = None

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=[])
        self._fork.__enter__()
        torch.default_generator.manual_seed(self.seed)  # models are built on the CPU

    def __exit__(self, *exc: Any) -> None:
        self._fork.__exit__(*exc)
