"""raim-diffusion: restore real-world photos with diffusion models, without hallucinations.

The heavy submodules (torch, diffusers, transformers) load on first use, so ``import
raim_diffusion`` and ``raim --help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY = {
    "load_image": "images",
    "save_image": "images",
    "to_tensor": "images",
    "TileGrid": "tiling",
    "tiled_apply": "tiling",
    "load_prior": "prior",
    "PriorModel": "prior",
    "RaimPipeline": "pipeline",
    "RaimPipelineOutput": "pipeline",
    "ArtifactDetector": "artifacts",
    "FusionNet": "fusion",
    "RaimError": "errors",
    "InvalidImageError": "errors",
    "MissingWeightsError": "errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"raim_diffusion.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'raim_diffusion' has no attribute {name!r}")
