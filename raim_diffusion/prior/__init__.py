"""Stage 1: restoration priors from any spandrel architecture, single or ensembled.

``load_prior`` turns a built-in name, a weights file, a saved folder or a list of these into a
[`PriorModel`]; the built-in Real-ESRGAN models are converted once from their ncnn files.
"""

from .builtin import get_builtin, is_builtin, list_builtin, resolve_builtin
from .loading import load_descriptor, load_prior, read_state_dict
from .model import PriorModel, spandrel_registry

__all__ = [
    "PriorModel",
    "get_builtin",
    "is_builtin",
    "list_builtin",
    "load_descriptor",
    "load_prior",
    "read_state_dict",
    "resolve_builtin",
    "spandrel_registry",
]
