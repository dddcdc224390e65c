"""``raim restore``: restore files, folders and globs; resumable, failure-tolerant, multi-GPU.

Settings come from a preset or YAML (``--config``), then dotted overrides given among the
inputs (``generate.num_inference_steps=20``), then the explicit flags. Under ``accelerate
launch`` every process takes its share of the images.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from raim_diffusion.runner.cli import add_verbose
from raim_diffusion.runner.config import STAGES

_DTYPES = ("auto", "float32", "float16", "bfloat16")

_DESCRIPTION = """\
Restore images. Folders are searched recursively; hidden files and folders are skipped, and
symlinks to folders are not followed. Arguments of the form key.sub=value override the config.

Outputs keep their path under the inputs, name, bit depth, alpha and colour profile. Existing
outputs are skipped unless --overwrite, so an interrupted job resumes where it stopped. The
output folder must not be an input folder, lie inside one or contain an input file.

What OUTPUT holds:
  OUTPUT/<path under the inputs>            the restored images
  OUTPUT/raim_settings.json                 the settings the outputs were made with; a run with
                                            other settings is refused (--overwrite or a new -o)
  OUTPUT/raim_runs.jsonl                    one record per run: config, versions, inputs
  OUTPUT/failures.jsonl                     one line per image that failed
  OUTPUT/.raim-intermediates/<kind>/<path under the inputs>.png
                                            with --save-intermediates: kind = prior, generated,
                                            mask, overlay; e.g. a.jpg -> prior/a.jpg.png
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``raim restore``."""
    p = subparsers.add_parser(
        "restore",
        help="restore images (files, folders, globs)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+",
                   help="image files, folders (recursive), globs, and key=value config overrides")
    p.add_argument("-o", "--output", required=True, type=Path,
                   help="output folder (not an input folder, nor inside one)")
    p.add_argument("--config", default=None,
                   help="preset name (e.g. sdxl, sd15, tiny, prior-only) or YAML file "
                   "(default: prior-only when no --model is given, else sdxl)")
    p.add_argument("--tiny", action="store_true",
                   help="swap the config's models for tiny random ones (smoke tests, demos)")
    p.add_argument("--stages", default=None,
                   help=f"comma-separated stages, from {','.join(STAGES)}")
    p.add_argument("--model", default=None, help="diffusers SD/SDXL repo id or folder")
    p.add_argument("--prior", default=None,
                   help="built-in prior name, weights file (.safetensors/.pth) or saved folder")
    p.add_argument("--upscale", default=None, metavar="SCALE",
                   help="output size relative to the input, a positive number, e.g. 2 (config "
                   "key `upscale`; default: the config's)")
    p.add_argument("--outscale", default=None, metavar="SCALE",
                   help="deprecated alias of --upscale")
    p.add_argument("--prompt", default=None)
    p.add_argument("--steps", type=int, default=None, help="number of inference steps")
    p.add_argument("--strength", type=float, default=None, help="img2img strength in (0, 1]")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--consistency", default=None, metavar="WEIGHT[:SCHEDULE]",
                   help="consistency guidance weight and optional schedule, e.g. 0.5:cosine")
    p.add_argument("--seed", type=int, default=None, help="run seed (per-image seeds derive)")
    p.add_argument("--tile", type=int, default=None, help="prior tile size in pixels (auto)")
    p.add_argument("--device", default=None,
                   help="torch device: cpu, cuda, cuda:N, mps, xpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=_DTYPES,
                   help="model precision (config key `dtype`; default: the config's, auto)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo outputs that already exist, also when the folder was made with "
                   "other settings")
    p.add_argument("--save-intermediates", action="store_true",
                   help="also write prior, generated, mask and overlay images to "
                   "OUTPUT/.raim-intermediates/")
    p.add_argument("--failure-log", type=Path, default=None,
                   help="JSONL file of failures, appended (default: OUTPUT/failures[.rankN].jsonl)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_verbose(p)
    p.set_defaults(func=run, trailing_positionals="inputs")


def _split_inputs(items: list[str]) -> tuple[list[str], list[str]]:
    """Separate ``key.sub=value`` overrides from input paths (an existing path always wins)."""
    inputs, overrides = [], []
    for item in items:
        if "=" in item and not Path(item).exists() and item.split("=", 1)[0].strip():
            overrides.append(item)
        else:
            inputs.append(item)
    return inputs, overrides


def _scale(flag: str, text: str | None) -> float | None:
    """A ``--upscale`` value: a finite positive number."""
    from raim_diffusion.runner.common import UsageError

    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"{flag} {text!r}: give a positive number, e.g. 2 or 0.5")
    return value


def _upscale(args: argparse.Namespace) -> float | None:
    """``--upscale``, or its deprecated alias ``--outscale`` (with a one-line warning)."""
    from raim_diffusion.runner.common import UsageError

    upscale = _scale("--upscale", args.upscale)
    if args.outscale is None:
        return upscale
    print("raim restore: --outscale is deprecated; use --upscale", file=sys.stderr)
    outscale = _scale("--outscale", args.outscale)
    if upscale is not None and upscale != outscale:
        raise UsageError(f"--upscale {args.upscale} and --outscale {args.outscale} disagree; "
                         "give only --upscale")
    return outscale


def _apply_flags(config, args: argparse.Namespace) -> None:
    """Explicit flags win over the preset and the dotted overrides."""
    from omegaconf import OmegaConf

    flags = {
        "generate.model": args.model,
        "prior.name": args.prior,
        "upscale": _upscale(args),
        "prior.tile": args.tile,
        "generate.prompt": args.prompt,
        "generate.num_inference_steps": args.steps,
        "generate.strength": args.strength,
        "generate.guidance_scale": args.guidance,
        "seed": args.seed,
        "device": args.device,
        "dtype": args.dtype,
    }
    if args.stages is not None:
        flags["stages"] = [s.strip() for s in args.stages.split(",") if s.strip()]
    if args.consistency is not None:
        weight, _, schedule = args.consistency.partition(":")
        try:
            flags["generate.consistency_weight"] = float(weight)
        except ValueError:
            raise ValueError(
                f"--consistency {args.consistency!r}: the weight must be a number"
            ) from None
        flags["generate.consistency_schedule"] = schedule or None
    if args.save_intermediates:
        flags["save_intermediates"] = True
    for key, value in flags.items():
        if value is not None:
            try:
                OmegaConf.update(config, key, value, merge=False)
            except Exception as err:  # omegaconf raises several unrelated types
                raise ValueError(f"{key}={value!r}: {' '.join(str(err).split())}") from None


def run(args: argparse.Namespace) -> int:
    """Run ``raim restore``; exit status 1 if any image failed, 2 on a usage error, 130 when
    interrupted."""
    from raim_diffusion.runner.batch import Interrupted

    progress: dict[str, Any] = {"rank": ""}
    try:
        return _run(args, progress)
    except Interrupted as err:
        print(f"raim restore{progress['rank']}: interrupted ({err.report.done} done)",
              file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"raim restore{progress['rank']}: interrupted (0 done)", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace, progress: dict[str, Any]) -> int:
    from omegaconf import OmegaConf

    from raim_diffusion.errors import MissingWeightsError
    from raim_diffusion.runner.batch import (
        INTERMEDIATES_DIR,
        RUNS_FILE,
        append_jsonl,
        claim_output,
        new_run_id,
        plan_jobs,
        run_jobs,
        run_record,
    )
    from raim_diffusion.runner.common import (
        UsageError,
        check_output_dir,
        check_output_file,
        report_usage_error,
        resolve_device,
    )
    from raim_diffusion.runner.config import load_config, make_tiny, validate_config

    inputs, overrides = _split_inputs(args.inputs)
    if not inputs:
        print("raim restore: no inputs given (only config overrides)", file=sys.stderr)
        return 2
    preset = args.config or ("sdxl" if args.model else "prior-only")
    try:
        output = check_output_dir(args.output)
        if args.failure_log is not None:
            check_output_file(args.failure_log, "--failure-log")
        config = load_config(preset, overrides)
        _apply_flags(config, args)
        if args.tiny:
            config = make_tiny(config)
        validate_config(config)
        device = resolve_device(config.device)  # before any model loads
        jobs = plan_jobs(inputs, output)
        if args.failure_log is not None:
            log = args.failure_log.resolve()
            for job in jobs:
                if log in (job.source, job.target.resolve()):
                    raise UsageError(f"--failure-log {args.failure_log} is also an image of "
                                     "this run")
        resolved = OmegaConf.to_container(config, resolve=True)
        if jobs:
            fingerprint = claim_output(output, resolved, jobs, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as err:
        return report_usage_error("restore", err)
    except OSError as err:  # e.g. the output folder is on a read-only or full disk
        return report_usage_error("restore", UsageError(f"{args.output}: {err}"))
    if not jobs:
        print("raim restore: no images found in the inputs", file=sys.stderr)
        return 1

    import torch
    from accelerate import PartialState

    from raim_diffusion.files import clean_stale_temps
    from raim_diffusion.runner.restorer import build_restorer

    # On machines without CUDA (or with --device cpu) several processes still split the work
    # (torchrun / mpirun), over gloo or MPI.
    kind = torch.device(device).type
    state = PartialState(cpu=kind == "cpu")
    if state.device.type == kind and torch.device(device).index is None:
        device = str(state.device)  # one GPU per process under accelerate launch
    rank = f".rank{state.process_index}" if state.num_processes > 1 else ""
    progress["rank"] = rank
    try:
        restore = build_restorer(config, device)
    except (MissingWeightsError, FileNotFoundError, ValueError) as err:
        return report_usage_error("restore", err)
    # Long single images: a second bar shows the denoising steps inside the current image.
    show_steps = getattr(restore, "show_progress", None)  # any (image, job) callable will do
    if show_steps is not None:
        show_steps(not args.quiet and state.is_local_main_process)
    run_id = new_run_id()
    try:
        if state.is_main_process:
            clean_stale_temps(output)  # left by killed runs; recent ones may be a live run's
            record = run_record(resolved, {
                "run": run_id, "fingerprint": fingerprint, "inputs": inputs,
                "images": len(jobs), "processes": state.num_processes,
                "overwrite": args.overwrite, **restore.record,
            })
            append_jsonl(output / RUNS_FILE, record)
    except OSError as err:
        return report_usage_error("restore", UsageError(f"{output}: {err}"))
    failure_log = args.failure_log or output / f"failures{rank}.jsonl"
    intermediates = output / INTERMEDIATES_DIR if config.save_intermediates else None
    with state.split_between_processes(jobs) as shard:
        report = run_jobs(shard, restore, overwrite=args.overwrite, failure_log=failure_log,
                          intermediates_dir=intermediates, run_id=run_id,
                          progress=not args.quiet and state.is_local_main_process)
    print(f"raim restore{rank}: {report.done} restored, {report.skipped} skipped (already "
          f"done), {report.failed} failed", file=sys.stderr)
    return 1 if report.failed else 0
