"""``raim restore``: restore files, folders and globs, resumable and failure-tolerant."""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

STAGES = ("prior", "generate", "detect", "fuse")


@dataclass(frozen=True)
class Job:
    """One input file and where its restored output goes."""

    source: Path
    target: Path


def plan_jobs(inputs: Sequence[str | Path], outdir: Path, suffix: str | None = None) -> list[Job]:
    """Map every input image (files, folders, globs) to its output path under ``outdir``.

    Sub-folders are mirrored; two inputs that would write the same output are refused up
    front (see [`~raim_diffusion.images.output_paths`]).
    """
    from raim_diffusion.images import find_images, output_paths

    sources = list(dict.fromkeys(p.resolve() for p in find_images(list(inputs))))
    return [Job(s, t) for s, t in zip(sources, output_paths(sources, outdir, suffix=suffix))]


def parse_stages(value: str | None, available: Sequence[str]) -> tuple[str, ...]:
    """Parse ``--stages`` (comma separated); default: every stage that is available."""
    if value is None:
        return tuple(available)
    stages = tuple(s.strip() for s in value.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ValueError(f"--stages got {value!r}; choose from {', '.join(STAGES)}")
    missing = [s for s in stages if s not in available]
    if missing:
        raise ValueError(
            f"--stages {value!r}: stage(s) {', '.join(missing)} are not available in this "
            f"version; available: {', '.join(available)}"
        )
    return tuple(s for s in STAGES if s in stages)


def resolve_device(name: str | None) -> str:
    """``--device``: the given device, else CUDA when present, else the CPU."""
    import torch

    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str):
    """``--dtype``: ``auto`` lets each model pick its best supported precision."""
    import torch

    table = {"auto": None, "float32": torch.float32, "float16": torch.float16,
             "bfloat16": torch.bfloat16}
    return table[name]


def run_jobs(
    jobs: Sequence[Job],
    restore: Callable,
    *,
    overwrite: bool = False,
    failure_log: Path | None = None,
    progress: bool = True,
) -> tuple[int, int, int]:
    """Restore each job, skipping finished ones; returns ``(done, skipped, failed)``.

    ``restore`` takes a [`~raim_diffusion.images.LoadedImage`] and returns the restored
    ``(1, 3, H, W)`` tensor. Every output is written atomically, so a killed run leaves only
    complete files and a rerun picks up where it stopped. A failure on one image is logged
    (stderr and, if given, one JSON line in ``failure_log``) and the others go on.
    """
    from tqdm.auto import tqdm

    from raim_diffusion.images import atomic_write, load_image, resize_alpha, save_image

    done = skipped = failed = 0
    bar = tqdm(jobs, desc="restore", unit="img", disable=not progress, file=sys.stderr)
    for job in bar:
        if job.target.exists() and not overwrite:
            skipped += 1
            continue
        try:
            image = load_image(job.source)
            restored = restore(image)
            alpha = image.alpha
            if alpha is not None:
                alpha = resize_alpha(alpha, tuple(restored.shape[-2:]))
            job.target.parent.mkdir(parents=True, exist_ok=True)
            save_image(restored, job.target, bit_depth=image.bit_depth, alpha=alpha)
            done += 1
        except Exception as err:  # noqa: BLE001 - one bad image must not stop the batch
            failed += 1
            bar.write(f"raim restore: failed on {job.source}: {err}", file=sys.stderr)
            if failure_log is not None:
                record = {
                    "source": str(job.source), "target": str(job.target),
                    "error": f"{type(err).__name__}: {err}", "time": time.time(),
                    "traceback": traceback.format_exc(limit=5),
                }
                failure_log.parent.mkdir(parents=True, exist_ok=True)
                previous = failure_log.read_text() if failure_log.exists() else ""
                with atomic_write(failure_log, mode="w") as fh:
                    fh.write(previous + json.dumps(record) + "\n")
    return done, skipped, failed


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``raim restore``."""
    p = subparsers.add_parser(
        "restore",
        help="restore images (files, folders, globs)",
        description="Restore images. Existing outputs are skipped unless --overwrite, so an "
        "interrupted job resumes where it stopped; outputs keep names, bit depth and alpha.",
    )
    p.add_argument("inputs", nargs="+", help="image files, folders (recursive) or globs")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    p.add_argument("--stages", default=None,
                   help=f"comma-separated stages to run, from {','.join(STAGES)} "
                   "(default: all available)")
    p.add_argument("--prior", default="realesrgan-x4plus",
                   help="built-in prior name, weights file (.safetensors/.pth) or saved folder")
    p.add_argument("--outscale", type=float, default=None,
                   help="output scale (default: the prior's own scale)")
    p.add_argument("--tile", type=int, default=None, help="prior tile size in pixels (auto)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    p.add_argument("--overwrite", action="store_true", help="redo outputs that already exist")
    p.add_argument("--failure-log", type=Path, default=None,
                   help="JSONL file of failures (default: OUTPUT/failures.jsonl)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``raim restore``; exit status 1 if any image failed."""
    import torch

    from raim_diffusion.prior import load_prior

    stages = parse_stages(args.stages, available=("prior",))
    if args.outscale is not None and args.outscale <= 0:
        raise SystemExit(f"raim restore: --outscale must be positive, got {args.outscale}")
    jobs = plan_jobs(args.inputs, args.output)
    if not jobs:
        print("raim restore: no images found in the inputs", file=sys.stderr)
        return 1
    device = resolve_device(args.device)
    prior = load_prior(args.prior, device=device, dtype=resolve_dtype(args.dtype), tile=args.tile)

    def restore(image):
        assert stages == ("prior",)  # more stages arrive with the pipeline
        with torch.inference_mode():
            return prior(image.tensor.to(device), outscale=args.outscale).cpu()

    failure_log = args.failure_log or args.output / "failures.jsonl"
    done, skipped, failed = run_jobs(jobs, restore, overwrite=args.overwrite,
                                     failure_log=failure_log, progress=not args.quiet)
    print(f"raim restore: {done} restored, {skipped} skipped (already done), {failed} failed",
          file=sys.stderr)
    return 1 if failed else 0
