"""Compatibility alias: run configs live in `raim_diffusion.runner.config`."""

from raim_diffusion.runner.config import *  # noqa: F403
from raim_diffusion.runner.config import __all__  # noqa: F401
