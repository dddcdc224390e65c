"""``raim restore``: restore files, folders and globs; resumable, failure-tolerant, multi-GPU.

Settings come from a preset or YAML (``--config``), then dotted overrides given among the
inputs (``generate.num_inference_steps=20``), then the explicit flags. Under ``accelerate
launch`` every process takes its share of the images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raim_diffusion.runner.config import STAGES

_DTYPES = ("auto", "float32", "float16", "bfloat16")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``raim restore``."""
    p = subparsers.add_parser(
        "restore",
        help="restore images (files, folders, globs)",
        description="Restore images. Existing outputs are skipped unless --overwrite, so an "
        "interrupted job resumes where it stopped; outputs keep names, bit depth and alpha. "
        "Arguments of the form key.sub=value override the config.",
    )
    p.add_argument("inputs", nargs="+",
                   help="image files, folders (recursive), globs, and key=value config overrides")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder")
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
    p.add_argument("--outscale", type=float, default=None,
                   help="output scale relative to the input (default: the prior's scale)")
    p.add_argument("--prompt", default=None)
    p.add_argument("--steps", type=int, default=None, help="number of inference steps")
    p.add_argument("--strength", type=float, default=None, help="img2img strength in (0, 1]")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--consistency", default=None, metavar="WEIGHT[:SCHEDULE]",
                   help="consistency guidance weight and optional schedule, e.g. 0.5:cosine")
    p.add_argument("--seed", type=int, default=None, help="run seed (per-image seeds derive)")
    p.add_argument("--tile", type=int, default=None, help="prior tile size in pixels (auto)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=_DTYPES)
    p.add_argument("--overwrite", action="store_true", help="redo outputs that already exist")
    p.add_argument("--save-intermediates", action="store_true",
                   help="also write prior, generated, mask and overlay images")
    p.add_argument("--failure-log", type=Path, default=None,
                   help="JSONL file of failures (default: OUTPUT/failures[.rankN].jsonl)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
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


def _apply_flags(config, args: argparse.Namespace) -> None:
    """Explicit flags win over the preset and the dotted overrides."""
    from omegaconf import OmegaConf

    flags = {
        "generate.model": args.model,
        "prior.name": args.prior,
        "prior.outscale": args.outscale,
        "generate.upscale": args.outscale,
        "prior.tile": args.tile,
        "generate.prompt": args.prompt,
        "generate.num_inference_steps": args.steps,
        "generate.strength": args.strength,
        "generate.guidance_scale": args.guidance,
        "seed": args.seed,
        "device": args.device,
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
            OmegaConf.update(config, key, value, merge=False)


def run(args: argparse.Namespace) -> int:
    """Run ``raim restore``; exit status 1 if any image failed."""
    from accelerate import PartialState
    from omegaconf import OmegaConf

    from raim_diffusion.errors import MissingWeightsError
    from raim_diffusion.runner.batch import plan_jobs, run_jobs, run_record, write_json
    from raim_diffusion.runner.config import load_config, make_tiny, validate_config
    from raim_diffusion.runner.restorer import build_restorer

    inputs, overrides = _split_inputs(args.inputs)
    if not inputs:
        print("raim restore: no inputs given (only config overrides)", file=sys.stderr)
        return 2
    preset = args.config or ("sdxl" if args.model else "prior-only")
    try:
        config = load_config(preset, overrides)
        _apply_flags(config, args)
        validate_config(config)
        if args.tiny:
            config = make_tiny(config)
        jobs = plan_jobs(inputs, args.output)
    except (ValueError, FileNotFoundError) as err:
        print(f"raim restore: {err}", file=sys.stderr)
        return 2
    if not jobs:
        print("raim restore: no images found in the inputs", file=sys.stderr)
        return 1

    if args.quiet:
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    import torch

    if str(config.device or "").startswith("cuda") and not torch.cuda.is_available():
        print(f"raim restore: --device {config.device} was asked for, but torch sees no CUDA "
              "device here; use --device cpu or leave --device out", file=sys.stderr)
        return 2
    # On machines without CUDA (or with --device cpu) several processes still split the work
    # (torchrun / mpirun), over gloo or MPI.
    on_cpu = not torch.cuda.is_available() or str(config.device or "").startswith("cpu")
    state = PartialState(cpu=on_cpu)
    device = config.device or str(state.device)
    try:
        restore = build_restorer(config, device=device, dtype=args.dtype)
    except (MissingWeightsError, FileNotFoundError, ValueError) as err:
        print(f"raim restore: {err}", file=sys.stderr)
        return 2
    if state.is_main_process:
        record = run_record(OmegaConf.to_container(config, resolve=True),
                            {"inputs": inputs, "images": len(jobs),
                             "processes": state.num_processes, **restore.record})
        write_json(args.output / "raim_run.json", record)
    rank = f".rank{state.process_index}" if state.num_processes > 1 else ""
    failure_log = args.failure_log or args.output / f"failures{rank}.jsonl"
    intermediates = args.output / "intermediates" if config.save_intermediates else None
    with state.split_between_processes(jobs) as shard:
        report = run_jobs(shard, restore, overwrite=args.overwrite, failure_log=failure_log,
                          intermediates_dir=intermediates,
                          progress=not args.quiet and state.is_local_main_process)
    print(f"raim restore{rank}: {report.done} restored, {report.skipped} skipped (already "
          f"done), {report.failed} failed", file=sys.stderr)
    return 1 if report.failed else 0
