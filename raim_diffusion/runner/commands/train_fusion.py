"""``raim train-fusion``: train the stage-4 fusion network on a folder of HQ images."""

from __future__ import annotations

import argparse

from raim_diffusion.runner.common import add_training_arguments

_DESCRIPTION = """\
Train a FusionNet the way it is used at inference: every GT crop is degraded with the
Real-ESRGAN second-order pipeline (1x) into the LQ input, a random STTN / DeSRA-like hole mask
is drawn, the composite is GT outside the mask and LQ inside, and the network learns to restore
the GT (hole/valid L1, VGG19 perceptual + style, SM-PatchGAN). Runs on one or many GPUs with
`accelerate launch -m raim_diffusion.cli train-fusion ...`.

With an AlignFusionNet preset (tiny-align, align: So Elegant's prior-guided deformable
alignment) it trains on triplets instead: real s1/, s2/, gt/ folders and/or synthetic triplets
of the HQ photos (I_s1 = blurred, noisy, JPEG'd GT; I_s2 = slightly warped and colour-shifted GT
with diffusion-like failures planted inside the mask M), mapping (I_s2, I_s1, M) to GT.

Writes OUT/checkpoints/step_*, OUT/metrics.csv, OUT/val_metrics.csv, OUT/val/ images and the
final EMA generator in OUT/fusion (raim_diffusion.fusion.load_fusion). --resume continues exactly.

The perceptual loss needs the ImageNet VGG19 weights in $TORCH_HOME/hub/checkpoints/
vgg19-dcbb9e9d.pth (or --set perceptual.weights_path=FILE).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``train-fusion`` subcommand."""
    parser = subparsers.add_parser(
        "train-fusion",
        help="train the stage-4 fusion network",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="HQ_DIR",
        help="folder(s) of high-quality training images (for AlignFusionNet presets also "
        "folders of real triplets: s1/, s2/, gt/ and optional mask/ sub-folders)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--config",
        default="default",
        metavar="YAML|NAME",
        help="training preset name (tiny, default, tiny-align, align) or a YAML file "
        "(default: default)",
    )
    add_training_arguments(parser)
    parser.add_argument("--val", metavar="DIR", help="held-out HQ images for validation")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train; returns 0 on success, 2 on a configuration or data error (one line)."""
    from raim_diffusion.errors import RaimError
    from raim_diffusion.runner.common import report_usage_error
    from raim_diffusion.training.config import load_train_config
    from raim_diffusion.training.trainer import FusionTrainer

    try:
        if args.max_steps is not None and args.max_steps < 0:
            raise ValueError(f"--max-steps must be >= 0, got {args.max_steps}")
        config = load_train_config(args.config, args.overrides)
        if config.model.architecture == "AlignFusionNet":
            from raim_diffusion.training.align_trainer import AlignFusionTrainer

            trainer = AlignFusionTrainer(config, args.data, args.out, val_dir=args.val)
        else:
            trainer = FusionTrainer(config, args.data, args.out, val_dir=args.val)
        result = trainer.train(args.max_steps, resume=args.resume)
    except (RaimError, ValueError, FileNotFoundError) as err:
        return report_usage_error("train-fusion", err)
    if result.model_dir is not None:
        print(f"trained {result.step} steps; generator saved to {result.model_dir}")
    return 0
