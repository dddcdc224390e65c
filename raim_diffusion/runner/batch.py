"""Folder jobs: plan outputs, shard across processes, resume, log failures, keep going.

Used by ``raim restore``; works the same in one process and under ``accelerate launch`` (one
process per GPU, on one node or many): the job list is split with accelerate's
``PartialState.split_between_processes`` and each image gets a seed derived from the run seed and
its own output path, so the result of an image does not depend on the number of processes.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from raim_diffusion.files import atomic_write, find_images, output_paths
from raim_diffusion.images import (
    LoadedImage,
    load_image,
    resize_alpha,
    save_image,
)


@dataclass(frozen=True)
class Job:
    """One input image and where its restoration goes."""

    source: Path
    target: Path
    relative: Path | None = None  # the target's path under the output folder

    @property
    def key(self) -> str:
        """Stable identity of the job (its output path under the output folder), independent
        of machine, shard and where the output folder lives."""
        return (self.relative or Path(self.target.name)).as_posix()


@dataclass
class Restored:
    """What a restorer returns for one image: the result and optional intermediates."""

    image: torch.Tensor
    intermediates: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class BatchReport:
    """Counts of one process's share of a batch job."""

    done: int = 0
    skipped: int = 0
    failed: int = 0


def plan_jobs(
    inputs: Sequence[str | Path], outdir: str | Path, suffix: str | None = None
) -> list[Job]:
    """Map every input image (files, folders, globs) to its output path under ``outdir``.

    Sub-folders are mirrored and two inputs that would write the same output are refused up
    front (see [`~raim_diffusion.files.output_paths`]). The order is sorted and the same in
    every process, which sharding relies on.
    """
    sources = list(dict.fromkeys(p.resolve() for p in find_images(list(inputs))))
    targets = output_paths(sources, outdir, suffix=suffix)
    return [Job(s, t, t.relative_to(outdir)) for s, t in zip(sources, targets, strict=True)]


def image_seed(run_seed: int, job: Job) -> int:
    """Per-image seed: the same for an image whatever the process count or order."""
    digest = hashlib.sha256(f"{run_seed}:{job.key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63 - 1)


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    previous = path.read_text() if path.exists() else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, mode="w") as fh:
        fh.write(previous + json.dumps(record) + "\n")


def run_jobs(
    jobs: Sequence[Job],
    restore: Callable[[LoadedImage, Job], Restored],
    *,
    overwrite: bool = False,
    failure_log: Path | None = None,
    intermediates_dir: Path | None = None,
    progress: bool = True,
    desc: str = "restore",
) -> BatchReport:
    """Restore each job, skipping finished ones; one failure never stops the rest.

    Args:
        jobs (`Sequence[Job]`): This process's jobs.
        restore (`Callable`): Maps a loaded image and its job to a [`Restored`].
        overwrite (`bool`, *optional*, defaults to `False`): Redo outputs that exist.
        failure_log (`Path`, *optional*): JSON-lines file that gets one record per failure.
        intermediates_dir (`Path`, *optional*): Where ``Restored.intermediates`` are written,
            one sub-folder per name (``prior/``, ``generated/``, ``mask/``, ...).
        progress (`bool`, *optional*, defaults to `True`): Show a progress bar.
        desc (`str`, *optional*): Progress bar label.

    Returns:
        [`BatchReport`]: How many were restored, skipped (already done) and failed.
    """
    from tqdm.auto import tqdm

    report = BatchReport()
    bar = tqdm(jobs, desc=desc, unit="img", disable=not progress, file=sys.stderr)
    for job in bar:
        if job.target.exists() and not overwrite:
            report.skipped += 1
            continue
        try:
            image = load_image(job.source)
            result = restore(image, job)
            alpha = image.alpha
            if alpha is not None:
                alpha = resize_alpha(alpha, tuple(result.image.shape[-2:]))
            if intermediates_dir is not None:
                for name, tensor in result.intermediates.items():
                    # Mirrors the output layout, so same-named images in sub-folders stay apart.
                    path = (intermediates_dir / name / job.key).with_suffix(".png")
                    path.parent.mkdir(parents=True, exist_ok=True)
                    save_image(tensor, path)
            job.target.parent.mkdir(parents=True, exist_ok=True)
            # The final output is written last, so its presence means the job is complete.
            save_image(result.image, job.target, bit_depth=image.bit_depth, alpha=alpha)
            report.done += 1
        except Exception as err:  # noqa: BLE001 - one bad image must not stop the batch
            report.failed += 1
            bar.write(f"failed on {job.source}: {type(err).__name__}: {err}", file=sys.stderr)
            if failure_log is not None:
                _append_jsonl(failure_log, {
                    "source": str(job.source), "target": str(job.target),
                    "error": f"{type(err).__name__}: {err}", "time": time.time(),
                    "traceback": traceback.format_exc(limit=8),
                })
    return report


def run_record(config: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a run needs to be reproduced: resolved config, seed and library versions."""
    import importlib.metadata as md

    versions = {}
    for dist in ("raim-diffusion", "torch", "diffusers", "transformers", "accelerate",
                 "spandrel", "numpy", "pillow"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    return {
        "config": config,
        "versions": versions,
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, mode="w") as fh:
        json.dump(data, fh, indent=2, default=str)
        fh.write("\n")
