"""``raim train-prior``: train or fine-tune the stage-1 prior (any spandrel architecture)."""

from __future__ import annotations

import argparse
import sys

from raim_diffusion.runner.common import add_training_arguments

_DESCRIPTION = """\
Train or fine-tune a restoration prior: any spandrel architecture from scratch (named in the
config: model.architecture + model.kwargs) or from weights (model.weights: a built-in name, a
file or a prior folder). Data: paired folders (--lq/--gt, files matched by name; GT = scale x
LQ), HQ photos degraded on the fly with the Real-ESRGAN pipeline (--data), or both (a mix,
data.paired_ratio). Losses, multi-stage schedules and MiAlgo's refinement head come from the
preset: tiny (CPU, seconds), xhs-iag-gan, mialgo, hit-iil.

Writes OUT/prior (load_prior("OUT/prior"), raim restore --prior OUT/prior), OUT/checkpoints,
OUT/train_log.jsonl, OUT/metrics.csv, OUT/val_metrics.csv (raim eval's PSNR/SSIM on
--val-lq/--val-gt, the starting point included). --resume continues exactly. Multi-GPU:
`accelerate launch -m raim_diffusion.cli train-prior ...`.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``train-prior`` subcommand."""
    parser = subparsers.add_parser(
        "train-prior",
        help="train or fine-tune the stage-1 prior",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--config",
        default="tiny",
        metavar="YAML|NAME",
        help="prior training preset (tiny, xhs-iag-gan, mialgo, hit-iil) or a YAML file "
        "(default: tiny)",
    )
    parser.add_argument("--lq", metavar="LQ_DIR", help="low-quality images of the pairs")
    parser.add_argument("--gt", metavar="GT_DIR", help="ground truth of the pairs (same names)")
    parser.add_argument(
        "--data", nargs="+", metavar="HQ_DIR", help="HQ photos for synthetic pairs"
    )
    parser.add_argument("--val-lq", metavar="DIR", help="held-out LQ images for validation")
    parser.add_argument("--val-gt", metavar="DIR", help="held-out GT images for validation")
    parser.add_argument(
        "--init",
        metavar="WEIGHTS",
        help="fine-tune these weights (built-in name, weights file or prior folder) instead of "
        "training the preset's architecture from scratch",
    )
    add_training_arguments(parser)
    parser.add_argument(
        "trailing_overrides", nargs="*", metavar="KEY=VALUE", help="more config overrides"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train; returns 0 on success, 2 on a usage, configuration or data error (one line)."""
    from omegaconf.errors import OmegaConfBaseException

    from raim_diffusion.errors import RaimError
    from raim_diffusion.training.config import load_prior_train_config
    from raim_diffusion.training.prior_trainer import PriorTrainer

    try:
        if args.max_steps is not None and args.max_steps < 0:
            raise ValueError(f"--max-steps must be >= 0, got {args.max_steps}")
        overrides = list(args.overrides) + list(args.trailing_overrides)
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ValueError(f"overrides must look like KEY=VALUE, got {bad[0]!r}")
        config = load_prior_train_config(args.config, overrides, init=args.init)
        trainer = PriorTrainer(
            config,
            args.out,
            lq_dir=args.lq,
            gt_dir=args.gt,
            hq_dirs=args.data,
            val_lq_dir=args.val_lq,
            val_gt_dir=args.val_gt,
        )
        result = trainer.train(args.max_steps, resume=args.resume)
    except (RaimError, ValueError, FileNotFoundError, OmegaConfBaseException) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"raim train-prior: error: {message}", file=sys.stderr)
        return 2
    if result.model_dir is not None:
        line = f"trained {result.step} steps; prior saved to {result.model_dir}"
        first, last = result.first_val_metrics, result.val_metrics
        if "psnr" in first and "psnr" in last:
            line += f" (validation PSNR {first['psnr']:.2f} -> {last['psnr']:.2f} dB)"
        print(line)
    return 0
