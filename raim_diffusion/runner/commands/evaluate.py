"""``raim eval``: challenge metrics and SCORE for a folder of restored images."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from raim_diffusion.metrics.conventions import MetricConventions

_DESCRIPTION = """\
Compute PSNR, SSIM, LPIPS, DISTS and NIQE (pyiqa, challenge conventions) for every image in
--pred against the file with the same name stem in --gt, print a per-image table and the
summary, and the challenge SCORE when all five metrics are computed:
  SCORE = 20*PSNR/50 + 15*(SSIM-0.5)/0.5 + 20*(1-LPIPS)/0.4 + 40*(1-DISTS)/0.3 + 30*(1-NIQE)/10
Without --gt only NIQE (no-reference) is computed. Nothing is downloaded: weights are read
from --weights-dir or the torch hub cache ($TORCH_HOME/hub/pyiqa, $TORCH_HOME/hub/checkpoints).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``eval`` subcommand."""
    parser = subparsers.add_parser(
        "eval",
        help="challenge metrics (PSNR/SSIM/LPIPS/DISTS/NIQE) and SCORE of a folder",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pred", required=True, metavar="DIR", help="restored images")
    parser.add_argument("--gt", metavar="DIR", help="ground truths (paired by name stem)")
    parser.add_argument(
        "--metrics",
        metavar="LIST",
        help="comma-separated subset of psnr,ssim,lpips,dists,niqe "
        "(default: all five with --gt, niqe without)",
    )
    parser.add_argument("--csv", metavar="PATH", help="write per-image values and the mean as CSV")
    parser.add_argument(
        "--json", metavar="PATH", help='write {"per_image": ..., "mean": ..., "score": ...}'
    )
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=4, help="images of equal size per batch")
    parser.add_argument(
        "--resize-pred",
        action="store_true",
        help="resize predictions to the ground-truth size (antialiased bicubic) instead of failing",
    )
    parser.add_argument("--weights-dir", metavar="DIR", help="folder holding metric weight files")
    parser.add_argument(
        "--crop-border", type=int, default=0, help="pixels cropped per side for PSNR/SSIM/NIQE"
    )
    parser.add_argument(
        "--y-channel",
        action="store_true",
        help="PSNR on the luma channel too (default: RGB, as the challenge; SSIM/NIQE always luma)",
    )
    parser.add_argument(
        "--lpips-net", choices=("alex", "vgg"), default="alex", help="LPIPS backbone (default alex)"
    )
    parser.add_argument("--summary-only", action="store_true", help="print only the mean row")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def _check_request(args: argparse.Namespace) -> tuple[str, MetricConventions]:
    """Every check that needs no image, no weight file and no model: the device, the output
    files, the options, and the install (pyiqa). Returns the device and the conventions;
    raises `UsageError`/`ValueError`/`ImportError` with a one-line message."""
    import os

    from raim_diffusion.metrics._io import check_not_input
    from raim_diffusion.metrics.conventions import MetricConventions
    from raim_diffusion.metrics.iqa import parse_metric_list, require_pyiqa
    from raim_diffusion.runner.common import UsageError, check_output_file, resolve_device

    device = resolve_device(args.device)
    inputs = [args.pred] + ([args.gt] if args.gt else [])
    outputs = [(flag, path) for flag, path in (("--csv", args.csv), ("--json", args.json)) if path]
    for flag, path in outputs:
        check_output_file(path, flag)
        check_not_input(path, flag, folders=inputs)
    if len(outputs) == 2 and os.path.realpath(args.csv) == os.path.realpath(args.json):
        raise UsageError(f"--csv and --json are the same file {args.csv}; give two file names")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size} must be at least 1")
    if args.metrics is not None:
        parse_metric_list(args.metrics)
    conventions = MetricConventions(
        psnr_y_channel=args.y_channel, crop_border=args.crop_border, lpips_net=args.lpips_net
    )
    require_pyiqa()
    return device, conventions


def run(args: argparse.Namespace) -> int:
    """Run ``raim eval``; returns 0, 1 if some images failed, 2 on a usage/pairing error."""
    from raim_diffusion.errors import RaimError
    from raim_diffusion.runner.common import report_usage_error

    try:
        device, conventions = _check_request(args)
    except (RaimError, ValueError, ImportError) as exc:
        return report_usage_error("eval", exc)

    from raim_diffusion.metrics.evaluate import evaluate_folders

    try:
        result = evaluate_folders(
            args.pred,
            args.gt,
            metrics=args.metrics,
            device=device,
            conventions=conventions,
            weights_dir=args.weights_dir,
            batch_size=args.batch_size,
            resize_pred=args.resize_pred,
            progress=False if args.no_progress else None,
        )
    except (RaimError, ValueError) as exc:
        return report_usage_error("eval", exc)

    print(result.format_table(per_image=not args.summary_only))
    if result.score is None:
        print("SCORE: not reported (it needs all of psnr, ssim, lpips, dists, niqe).")
    else:
        print(f"SCORE: {result.score:.4f}  (score of means == mean of per-image scores)")
    if args.csv:
        result.write_csv(args.csv)
    if args.json:
        result.write_json(args.json)
    for name, why in result.failures.items():
        print(f"raim eval: failed: {name}: {' '.join(why.split())}", file=sys.stderr)
    return 1 if result.failures else 0
