"""``raim study``: build a blind user-study page, and score the judges' picks."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

_BUILD_HELP = """\
Build one self-contained HTML page (images embedded, no network) showing each sample's input
and every method's result in a seeded random order under hidden letters. Judges rank their
top 3 with the mouse or keyboard and export a JSON of their picks. The mapping from letters
to methods goes to a separate key file (--key, default PAGE.key.json): never give it to judges.
"""

_SCORE_HELP = """\
Score judges' exports: S3 = 3/2/1 points for 1st/2nd/3rd picks, summed over samples and
averaged over judges; S3n = min-max normalised S3; with --s2, final = 0.4*S2 + 0.6*S3n.
Equal values share a rank (1, 2, 2, 4). Incomplete, duplicate or unknown picks are rejected,
naming the judge file and the sample.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``study build`` and ``study score``."""
    parser = subparsers.add_parser("study", help="blind user study: build the page, score picks")
    actions = parser.add_subparsers(dest="study_action", metavar="ACTION")
    parser.set_defaults(func=lambda args: (parser.print_help(sys.stderr), 2)[1])

    build = actions.add_parser(
        "build",
        help="write the judging page and its key",
        description=_BUILD_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build.add_argument("methods", nargs="+", metavar="METHOD_DIR", help="DIR or NAME=DIR")
    build.add_argument("--input", required=True, metavar="DIR", help="low-quality inputs")
    build.add_argument("-o", "--output", required=True, metavar="PAGE.html", help="page to write")
    build.add_argument("--key", metavar="KEY.json", help="key file (default: PAGE.key.json)")
    build.add_argument("--seed", type=int, default=0, help="seed of the result order")
    build.add_argument("--top-k", type=int, default=None,
                       help="picks per sample (default: 3, or the number of methods if fewer)")
    build.add_argument("--max-side", type=int, help="shrink embedded images to this longer side")
    build.add_argument("--format", choices=("jpeg", "png"), default="jpeg", dest="image_format")
    build.add_argument("--quality", type=int, default=92, help="JPEG quality")
    build.add_argument("--title", default="Blind image restoration study")
    build.set_defaults(func=run_build)

    score = actions.add_parser(
        "score",
        help="score judges' exports",
        description=_SCORE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    score.add_argument("judges", nargs="+", metavar="JUDGE.json")
    score.add_argument("--key", required=True, metavar="KEY.json")
    score.add_argument(
        "--s2", nargs="+", default=None, metavar="METHOD=VALUE", help="objective score per method"
    )
    score.add_argument(
        "--normalize-s2", action="store_true", help="min-max normalise S2 before combining"
    )
    score.add_argument("--json", metavar="PATH", help="write the scores as JSON")
    score.set_defaults(func=run_score)


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen action."""
    return int(args.func(args))


# torch.Generator.manual_seed takes any 64-bit integer, signed or not.
_SEED_RANGE = (-(2**63), 2**64 - 1)


def _method_folders(entries: list[str]) -> list[str]:
    """The folder part of each METHOD_DIR argument (``NAME=DIR`` or ``DIR``)."""
    return [entry.partition("=")[2] if "=" in entry else entry for entry in entries]


def run_build(args: argparse.Namespace) -> int:
    """``raim study build``."""
    from raim_diffusion.errors import RaimError
    from raim_diffusion.metrics._io import check_not_input
    from raim_diffusion.runner.common import (
        UsageError,
        check_output_file,
        report_usage_error,
    )

    page = Path(args.output)
    key = Path(args.key) if args.key else page.with_suffix(".key.json")
    try:
        # Everything about the request before any image is read.
        check_output_file(page, "-o/--output")
        check_output_file(key, "--key")
        inputs = [args.input, *_method_folders(args.methods)]
        check_not_input(page, "-o/--output", folders=inputs)
        check_not_input(key, "--key", folders=inputs)
        if page.resolve() == key.resolve():
            raise UsageError(f"--key {key} is the page itself; give the key another name")
        if not _SEED_RANGE[0] <= args.seed <= _SEED_RANGE[1]:
            raise UsageError(f"--seed {args.seed} is out of range; use a 64-bit integer")
    except ValueError as exc:
        return report_usage_error("study build", exc)

    import torch

    from raim_diffusion.metrics.study import write_study

    try:
        write_study(
            page,
            key,
            args.methods,
            args.input,
            generator=torch.Generator().manual_seed(args.seed),
            top_k=args.top_k if args.top_k is not None else min(3, len(args.methods)),
            max_side=args.max_side,
            image_format=args.image_format,
            quality=args.quality,
            title=args.title,
        )
    except (RaimError, ValueError) as exc:
        return report_usage_error("study build", exc)
    print(f"page: {page}\nkey:  {key}  (keep it from the judges)")
    return 0


def _parse_s2(entries: list[str] | None) -> dict[str, float] | None:
    if entries is None:
        return None
    out: dict[str, float] = {}
    for entry in entries:
        name, sep, value = entry.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            number = float(value)
        except ValueError:
            raise ValueError(f"--s2 {entry!r} must look like METHOD=NUMBER.") from None
        if not math.isfinite(number):
            raise ValueError(f"--s2 {entry!r}: the score must be a finite number.")
        if name in out:
            raise ValueError(f"--s2 gives method {name!r} twice.")
        out[name] = number
    return out


def run_score(args: argparse.Namespace) -> int:
    """``raim study score``."""
    from raim_diffusion.errors import RaimError
    from raim_diffusion.metrics._io import atomic_write, check_not_input
    from raim_diffusion.metrics.study import score_study
    from raim_diffusion.runner.common import check_output_file, report_usage_error

    try:
        s2 = _parse_s2(args.s2)
        if args.json:
            check_output_file(args.json, "--json")
            check_not_input(args.json, "--json", files=[args.key, *args.judges])
        scores = score_study(args.judges, args.key, s2, normalize_s2=args.normalize_s2)
    except (RaimError, ValueError) as exc:
        return report_usage_error("study score", exc)
    print(f"{len(scores.judges)} judge(s)")
    print(scores.format_table())
    if args.json:
        with atomic_write(args.json, mode="w") as fh:
            json.dump(scores.to_dict(), fh, indent=2)
            fh.write("\n")
    return 0
