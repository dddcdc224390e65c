"""Folder jobs: plan outputs, shard across processes, resume, log failures, keep going.

Used by ``raim restore``; works the same in one process and under ``accelerate launch`` (one
process per GPU, on one node or many): the job list is split with accelerate's
``PartialState.split_between_processes`` and each image gets a seed derived from the run seed and
its own output path, so the result of an image does not depend on the number of processes.

What a run leaves in its output folder ``OUT/``:

```
OUT/<key>                                 one output per input; <key>: its path under the inputs
OUT/raim_settings.json                    the settings that made the outputs, and their fingerprint
OUT/raim_runs.jsonl                       one record per run, appended (config, versions, inputs)
OUT/failures[.rankN].jsonl                one line per failed image, appended
OUT/.raim-intermediates/<kind>/<key>.png  --save-intermediates: prior, generated, mask, overlay
```

The intermediates live in a hidden folder: input discovery never enters hidden folders, so no
input key can name a file in there, and their file names keep the input's extension
(``a.jpg.png``), so ``a.jpg`` and ``a.png`` keep theirs apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import secrets
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from raim_diffusion.files import atomic_write, output_paths
from raim_diffusion.images import LoadedImage, load_image, save_image

__all__ = [
    "INTERMEDIATES_DIR",
    "NON_PIXEL_KEYS",
    "RUNS_FILE",
    "SETTINGS_FILE",
    "BatchReport",
    "Interrupted",
    "Job",
    "Restored",
    "append_jsonl",
    "claim_output",
    "image_seed",
    "new_run_id",
    "pixel_settings",
    "plan_jobs",
    "run_jobs",
    "run_record",
    "settings_fingerprint",
]

#: The settings file of an output folder: which settings made its outputs.
SETTINGS_FILE = "raim_settings.json"
#: One JSON line per run that wrote into the output folder.
RUNS_FILE = "raim_runs.jsonl"
#: Hidden, so that input discovery (which skips hidden folders) can never return its files.
INTERMEDIATES_DIR = ".raim-intermediates"
#: Top-level config keys that change no output pixel, left out of the settings fingerprint.
NON_PIXEL_KEYS = ("description", "device", "save_intermediates")


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


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGINT) during [`run_jobs`]; ``report`` counts what was finished before it.

    Finished outputs are complete files and the interrupted one was never written (writes are
    atomic), so running the same command again resumes.
    """

    def __init__(self, report: BatchReport) -> None:
        super().__init__(f"interrupted ({report.done} done)")
        self.report = report


def _is_reserved(key: str) -> bool:
    first = key.split("/", 1)[0]
    return (
        first in (SETTINGS_FILE, RUNS_FILE, INTERMEDIATES_DIR)
        or (first.startswith("failures") and first.endswith(".jsonl"))
    )


def _identity(path: Path) -> Path:
    """The file a path names (links followed), or the path itself for a broken or looping link."""
    try:
        return path.resolve(strict=True)
    except (OSError, RuntimeError):
        return Path(os.path.abspath(path))


def plan_jobs(
    inputs: Sequence[str | Path], outdir: str | Path, suffix: str | None = None
) -> list[Job]:
    """Map every input image (files, folders, globs) to its output path under ``outdir``.

    Sub-folders are mirrored and two inputs that would write the same output are refused up
    front (see [`~raim_diffusion.files.output_paths`]). Nothing under ``outdir`` is ever taken
    as an input, and an ``outdir`` that is, contains or lies inside an input folder is refused,
    so a run never restores its own outputs again nor writes over an input. Folder symlinks
    are not followed. The order is sorted and the same in every process, which sharding
    relies on.

    Args:
        inputs (`Sequence[str | Path]`): Image files, folders and glob patterns.
        outdir (`str` or `Path`): The output folder.
        suffix (`str`, *optional*): Replace each output's suffix (keep it by default).

    Returns:
        `list[Job]`: One job per input image.

    Raises:
        ValueError: the output folder overlaps an input, two inputs share an output, or an
            output would land on one of the run's own files (settings, records, failure logs).
        FileNotFoundError: an input that does not exist or a pattern that matches nothing.
    """
    from raim_diffusion.files import check_output_not_input, find_images

    outdir = Path(outdir)
    check_output_not_input(list(inputs), outdir)
    found = find_images(list(inputs), exclude=(outdir,))
    # Paths as found (absolute, lexical): a file link keeps its own name and place in the
    # layout (its target may lie anywhere, or nowhere: it then fails as its own job). Two names
    # of one file are restored once.
    unique: dict[Path, Path] = {}
    for p in found:
        unique.setdefault(_identity(p), Path(os.path.abspath(p)))
    sources = list(unique.values())
    targets = output_paths(sources, outdir, suffix=suffix)
    jobs = [Job(s, t, t.relative_to(outdir)) for s, t in zip(sources, targets, strict=True)]
    for job in jobs:
        if _is_reserved(job.key):
            raise ValueError(f"{job.source} would be written to {job.target}, which the run "
                             "keeps for itself; choose another output folder")
    return jobs


def image_seed(run_seed: int, job: Job) -> int:
    """Per-image seed: the same for an image whatever the process count or order."""
    digest = hashlib.sha256(f"{run_seed}:{job.key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63 - 1)


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append ``record`` to a JSON-lines file as one line, in one ``O_APPEND`` write.

    Concurrent writers (several runs or processes on one file) each add whole lines and none
    is lost, unlike a read-modify-write; nothing already in the file is rewritten.
    """
    data = (json.dumps(record, default=str, separators=(",", ":")) + "\n").encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666)
    try:
        view = memoryview(data)
        while view:  # a regular file takes it in one write; the loop only guards short writes
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _save_intermediates(
    folder: Path, job: Job, image: LoadedImage, intermediates: Mapping[str, torch.Tensor]
) -> None:
    for name, tensor in intermediates.items():
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"intermediate name {name!r} is not a plain folder name")
        # The key keeps its extension, so a.jpg and a.png get an intermediate each.
        path = folder / name / f"{job.key}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        icc = image.icc_profile if tensor.shape[-3] == 3 else None
        save_image(tensor, path, bit_depth=image.bit_depth, icc_profile=icc)


def run_jobs(
    jobs: Sequence[Job],
    restore: Callable[[LoadedImage, Job], Restored],
    *,
    overwrite: bool = False,
    failure_log: Path | None = None,
    intermediates_dir: Path | None = None,
    progress: bool = True,
    desc: str = "restore",
    run_id: str | None = None,
) -> BatchReport:
    """Restore each job, skipping finished ones; one failure never stops the rest.

    Args:
        jobs (`Sequence[Job]`): This process's jobs.
        restore (`Callable`): Maps a loaded image and its job to a [`Restored`].
        overwrite (`bool`, *optional*, defaults to `False`): Redo outputs that exist.
        failure_log (`Path`, *optional*): JSON-lines file that gets one line per failure,
            appended. If it cannot be written, that is said once and the batch goes on.
        intermediates_dir (`Path`, *optional*): Where ``Restored.intermediates`` are written:
            ``<intermediates_dir>/<name>/<job key>.png`` at the input's bit depth.
        progress (`bool`, *optional*, defaults to `True`): Show a progress bar.
        desc (`str`, *optional*): Progress bar label.
        run_id (`str`, *optional*): Written into each failure record, to tell runs apart.

    Returns:
        [`BatchReport`]: How many were restored, skipped (already done) and failed.

    Raises:
        Interrupted: on Ctrl-C, with the counts so far; no partial output is left behind.
    """
    from tqdm.auto import tqdm

    report = BatchReport()
    log_broken = False
    bar = tqdm(jobs, desc=desc, unit="img", disable=not progress, file=sys.stderr)
    try:
        for job in bar:
            if job.target.exists() and not overwrite:
                report.skipped += 1
                continue
            try:
                image = load_image(job.source)
                result = restore(image, job)
                if intermediates_dir is not None:
                    _save_intermediates(intermediates_dir, job, image, result.intermediates)
                job.target.parent.mkdir(parents=True, exist_ok=True)
                # The final output is written last, so its presence means the job is complete.
                save_image(result.image, job.target, like=image)
                report.done += 1
            except Exception as err:  # noqa: BLE001 - one bad image must not stop the batch
                report.failed += 1
                bar.write(f"failed on {job.source}: {type(err).__name__}: {err}",
                          file=sys.stderr)
                if failure_log is None:
                    continue
                record = {
                    "source": str(job.source), "target": str(job.target), "key": job.key,
                    "error": f"{type(err).__name__}: {err}", "time": time.time(),
                    "traceback": traceback.format_exc(limit=8),
                }
                if run_id is not None:
                    record["run"] = run_id
                try:
                    append_jsonl(failure_log, record)
                except OSError as log_err:
                    if not log_broken:  # say it once; the images matter more than the log
                        log_broken = True
                        bar.write(f"cannot write the failure log {failure_log}: {log_err}; "
                                  "going on without it", file=sys.stderr)
    except KeyboardInterrupt:
        raise Interrupted(report) from None
    finally:
        bar.close()
    return report


def new_run_id() -> str:
    """A run's identity in records and failure logs: its start time and a random suffix."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"


def pixel_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a resolved config that decides output pixels (without [`NON_PIXEL_KEYS`])."""
    return {k: v for k, v in config.items() if k not in NON_PIXEL_KEYS}


def settings_fingerprint(config: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of [`pixel_settings`]: equal iff the outputs would be."""
    canonical = json.dumps(pixel_settings(config), sort_keys=True, separators=(",", ":"),
                           default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for k, v in value.items():
            flat.update(_flatten(v, f"{prefix}{k}."))
        return flat
    return {prefix.rstrip("."): value}


def _describe_changes(old: Any, new: Mapping[str, Any]) -> str:
    if not isinstance(old, Mapping):
        return "settings differ"
    a, b = _flatten(old), _flatten(new)
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")]
    shown = [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in changed[:3]]
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    return ", ".join(shown) + more if shown else "settings differ"


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Create ``path`` with ``data`` unless it exists (``O_EXCL``): True if this call made it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                     0o666)
    except FileExistsError:
        return False
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)  # a half-written claim would block every later run
        raise
    os.close(fd)
    return True


def _read_settings(path: Path, wait: float = 2.0) -> dict[str, Any] | None:
    """The settings file's content; waits briefly while another run is still writing it."""
    deadline = time.monotonic() + wait
    while True:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("fingerprint"), str):
                return data
        except (json.JSONDecodeError, UnicodeDecodeError, FileNotFoundError):
            pass
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def claim_output(
    output_dir: str | os.PathLike,
    config: Mapping[str, Any],
    jobs: Sequence[Job] = (),
    *,
    overwrite: bool = False,
) -> str:
    """Tie an output folder to the settings that make its outputs, so that a resumed or
    concurrent run never mixes outputs of different settings.

    The first run creates ``OUT/raim_settings.json`` (with ``O_EXCL``: of two concurrent runs
    exactly one creates it) holding the settings fingerprint; later runs compare theirs with
    it. With ``overwrite`` the folder is taken over with the new settings (every output is
    redone anyway).

    Args:
        output_dir (`str` or `os.PathLike`): The output folder (created if needed).
        config (`Mapping`): The resolved run config, a plain dict.
        jobs (`Sequence[Job]`, *optional*): The planned jobs; if some of their outputs exist in
            a folder without a settings file (written by something else), it is refused too.
        overwrite (`bool`, *optional*, defaults to `False`): Take the folder over.

    Returns:
        `str`: The settings fingerprint.

    Raises:
        ValueError: the folder holds outputs of other (or unknown) settings and not
            ``overwrite``.
    """
    output_dir = Path(output_dir)
    path = output_dir / SETTINGS_FILE
    settings = pixel_settings(config)
    fingerprint = settings_fingerprint(config)
    content = {"fingerprint": fingerprint, "settings": settings}
    data = (json.dumps(content, indent=2, sort_keys=True, default=str) + "\n").encode()
    fix = "use --overwrite to redo it with these settings, or a new output folder"
    if overwrite:
        output_dir.mkdir(parents=True, exist_ok=True)
        stored = _read_settings(path, wait=0) if path.exists() else None
        if stored is None or stored["fingerprint"] != fingerprint:
            with atomic_write(path, "wb") as fh:
                fh.write(data)
        return fingerprint
    if not path.exists():
        existing = [job for job in jobs if job.target.exists()]
        if existing:
            raise ValueError(
                f"output folder {output_dir} already holds {len(existing)} of the outputs (e.g. "
                f"{existing[0].target}) but no {SETTINGS_FILE}, so they may come from other "
                f"settings; {fix}"
            )
        output_dir.mkdir(parents=True, exist_ok=True)
        if _create_exclusive(path, data):
            return fingerprint
    stored = _read_settings(path)
    if stored is None:
        raise ValueError(f"{path} is not a raim settings file; {fix}")
    if stored["fingerprint"] != fingerprint:
        changes = _describe_changes(stored.get("settings"), settings)
        raise ValueError(
            f"output folder {output_dir} holds outputs made with other settings ({changes}); "
            f"{fix}"
        )
    return fingerprint


def run_record(config: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a run needs to be reproduced: resolved config, seed and library versions.

    Holds no environment variables: records are shared along with the outputs.
    """
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
