"""Error types raised by raim-diffusion.

One type per kind of user-facing failure, so callers (and the batch runner) can tell a bad
input file apart from a missing model or a programming error. Every message is one line that
names the thing (file, folder, hub id) and what is wrong with it.
"""

from __future__ import annotations


class RaimError(Exception):
    """Base class of every error raised on purpose by raim-diffusion."""


class InvalidImageError(RaimError, ValueError):
    """An input image could not be read or is not acceptable.

    The message always names the file (or the in-memory object) and the problem.
    """


class MissingWeightsError(RaimError, FileNotFoundError):
    """Model weights were neither cached locally nor reachable, or a local model folder lacks
    a file it needs.

    The message names the model and says how to provide the weights (see
    [`raim_diffusion.hub.missing_weights_error`] for the one format every model uses).
    """


class InvalidWeightsError(RaimError, ValueError):
    """A weights file or model folder exists but cannot be used.

    Empty, truncated or damaged files, files that are not weights at all, PyTorch pickles that
    hold more than tensors (refused: only weights-only checkpoints are loaded), bad
    ``config.json`` / ``model_index.json``, and weights of an unexpected architecture. The
    message names the file or folder and what is wrong.
    """
