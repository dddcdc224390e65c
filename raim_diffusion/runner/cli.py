"""The ``raim`` command line: a thin layer over the Python API.

Each subcommand lives in ``raim_diffusion/commands/<name>.py`` and provides ``add_parser`` and
``run``; this module only assembles them, so ``raim --help`` lists every command while the
heavy imports happen inside the command that runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Subcommand modules, in the order `raim --help` lists them.
_COMMANDS = ("restore", "mask", "evaluate", "study", "train_fusion")


def build_parser() -> argparse.ArgumentParser:
    """Build the ``raim`` argument parser with every available subcommand."""
    from raim_diffusion import __version__

    parser = argparse.ArgumentParser(
        prog="raim",
        description="Restore real-world photos with diffusion models, without hallucinations.",
    )
    parser.add_argument("--version", action="version", version=f"raim-diffusion {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        try:
            module = importlib.import_module(f"raim_diffusion.runner.commands.{name}")
        except ModuleNotFoundError as err:
            # Only tolerate the command module itself being absent, never a broken import inside it.
            if err.name != f"raim_diffusion.runner.commands.{name}":
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``raim`` console script; returns the process exit status."""
    import logging

    # bitsandbytes (pulled in by pyiqa) warns on import about an optional CPU kernel package
    # that raim never uses; keep the command's output to what matters.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Commands whose positionals may come after options (``raim restore in/ -o out/ key=value``)
    # name the attribute that collects them; anything else unknown is an error.
    collect = getattr(args, "trailing_positionals", None)
    if extra and (collect is None or any(item.startswith("-") for item in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        getattr(args, collect).extend(extra)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
