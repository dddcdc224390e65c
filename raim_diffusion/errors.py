"""Error types raised by raim-diffusion.

One type per kind of user-facing failure, so callers (and the batch runner) can tell a bad
input file apart from a missing model or a programming error.
"""

from __future__ import annotations


class RaimError(Exception):
    """Base class of every error raised on purpose by raim-diffusion."""


class InvalidImageError(RaimError, ValueError):
    """An input image could not be read or is not acceptable.

    The message always names the file (or the in-memory object) and the problem.
    """


class MissingWeightsError(RaimError, FileNotFoundError):
    """Model weights were neither cached locally nor reachable.

    The message names the model and says how to provide the weights.
    """
