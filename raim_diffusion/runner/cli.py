"""The ``raim`` command line: a thin layer over the Python API.

Each subcommand lives in ``raim_diffusion/runner/commands/<name>.py`` and provides
``add_parser`` and ``run``; this module only assembles them, so ``raim --help`` lists every
command while the heavy imports happen inside the command that runs.

Output is kept to what matters: third-party loading bars, log messages below errors and Python
warnings from other packages are hidden unless ``--verbose``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import NoReturn

# Subcommand modules, in the order `raim --help` lists them.
_COMMANDS = ("restore", "mask", "evaluate", "study", "train_fusion", "train_prior", "presets")
# Libraries whose log messages and download/loading bars are hidden unless --verbose.
_CHATTY = ("diffusers", "transformers")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def add_verbose(parser: argparse.ArgumentParser) -> None:
    """Add ``--verbose`` to a subcommand; it does not undo ``raim --verbose COMMAND``."""
    parser.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="also show third-party log messages, warnings and loading bars")


def build_parser() -> argparse.ArgumentParser:
    """Build the ``raim`` argument parser with every available subcommand."""
    from raim_diffusion import __version__

    parser = _Parser(
        prog="raim",
        description="Restore real-world photos with diffusion models, without hallucinations.",
    )
    parser.add_argument("--version", action="version", version=f"raim-diffusion {__version__}")
    parser.add_argument("--verbose", action="store_true",
                        help="show third-party log messages, warnings and loading bars "
                        "(diffusers, transformers, huggingface_hub), hidden by default")
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


@contextlib.contextmanager
def quiet_third_party(verbose: bool = False) -> Iterator[None]:
    """Hide third-party chatter for the duration of a command, then restore the settings.

    diffusers' and transformers' loggers go to errors only, their loading bars and
    huggingface_hub's download bars are disabled, and Python warnings raised outside this
    package are ignored. With ``verbose`` nothing changes.
    """
    if verbose:
        yield
        return
    saved = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module=r"raim_diffusion(\.|$)")
        for name in _CHATTY:
            try:
                log = importlib.import_module(f"{name}.utils.logging")
            except ImportError:
                continue
            saved.append((log, log.get_verbosity(), log.is_progress_bar_enabled()))
            log.set_verbosity_error()
            log.disable_progress_bar()
        try:
            from huggingface_hub import utils as hub
        except ImportError:
            hub = None
        hub_disabled = hub.are_progress_bars_disabled() if hub is not None else None
        if hub is not None:
            hub.disable_progress_bars()
        try:
            yield
        finally:
            for log, verbosity, bars in reversed(saved):
                log.set_verbosity(verbosity)
                if bars:
                    log.enable_progress_bar()
            if hub is not None and not hub_disabled:
                hub.enable_progress_bars()


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
    try:
        with quiet_third_party(args.verbose):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        # Commands with work to count say how far they got; this is the fallback.
        print(f"raim {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
