"""Compatibility alias: the command line lives in `raim_diffusion.runner.cli`
(``python -m raim_diffusion.cli`` keeps working for job scripts)."""

import sys

from raim_diffusion.runner.cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
