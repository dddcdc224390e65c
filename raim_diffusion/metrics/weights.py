"""Where the metric weights live, and a clear error when they are missing offline.

pyiqa downloads two kinds of files the first time a metric is built:

- its own files (LPIPS linear heads, DISTS weights, NIQE pristine model) into
  ``$TORCH_HOME/hub/pyiqa/`` (from ``huggingface.co/chaofengc/IQA-PyTorch-Weights``);
- torchvision ImageNet backbones (AlexNet for LPIPS, VGG16 for LPIPS-VGG and DISTS) into
  ``$TORCH_HOME/hub/checkpoints/`` (from ``download.pytorch.org``).

Here every file is looked up first in a user-given ``weights_dir`` (a flat folder holding any
of the files below under their own names), then in those two cache folders. Nothing is
downloaded: a missing file raises `MissingWeightsError` listing every file still needed, where
to put it and how to fetch it (``hf download`` for pyiqa's own files, which live on the Hugging
Face hub; the download URL for torchvision's backbones).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch.hub

from ..errors import MissingWeightsError

__all__ = ["WeightFile", "WEIGHT_FILES", "required_weight_files", "resolve_weights"]

_PYIQA_REPO = "chaofengc/IQA-PyTorch-Weights"
_PYIQA_HF = f"https://huggingface.co/{_PYIQA_REPO}/resolve/main/"
_TORCHVISION = "https://download.pytorch.org/models/"


@dataclass(frozen=True)
class WeightFile:
    """One file a metric needs.

    Args:
        name (`str`): The file name pyiqa / torchvision use (the cache key; keep it exactly).
        kind (`str`): `"pyiqa"` (lives in ``hub/pyiqa``) or `"backbone"` (``hub/checkpoints``).
        url (`str`): Where pyiqa / torchvision download it from.
    """

    name: str
    kind: str
    url: str

    def cache_path(self, hub_dir: str | os.PathLike) -> Path:
        """The path this file has in a torch hub folder (``$TORCH_HOME/hub``)."""
        sub = "pyiqa" if self.kind == "pyiqa" else "checkpoints"
        return Path(hub_dir) / sub / self.name


_ALEXNET = WeightFile(
    "alexnet-owt-7be5be79.pth", "backbone", _TORCHVISION + "alexnet-owt-7be5be79.pth"
)
_VGG16 = WeightFile("vgg16-397923af.pth", "backbone", _TORCHVISION + "vgg16-397923af.pth")

#: Files needed per pyiqa metric name (the name `MetricConventions.pyiqa_options` returns).
WEIGHT_FILES: dict[str, tuple[WeightFile, ...]] = {
    "psnr": (),
    "ssim": (),
    "lpips": (
        WeightFile(
            "LPIPS_v0.1_alex-df73285e.pth", "pyiqa", _PYIQA_HF + "LPIPS_v0.1_alex-df73285e.pth"
        ),
        _ALEXNET,
    ),
    "lpips-vgg": (
        WeightFile(
            "LPIPS_v0.1_vgg-a78928a0.pth", "pyiqa", _PYIQA_HF + "LPIPS_v0.1_vgg-a78928a0.pth"
        ),
        _VGG16,
    ),
    "dists": (
        WeightFile("DISTS_weights-f5e65c96.pth", "pyiqa", _PYIQA_HF + "DISTS_weights-f5e65c96.pth"),
        _VGG16,
    ),
    "niqe": (
        WeightFile("niqe_modelparameters.mat", "pyiqa", _PYIQA_HF + "niqe_modelparameters.mat"),
    ),
}


def _how_to_get(wf: WeightFile, weights_dir: Path | None, hub_dir: Path) -> str:
    """The command (pyiqa's files are on the Hugging Face hub) or URL that fetches ``wf``."""
    if wf.url.startswith(_PYIQA_HF):
        folder = weights_dir if weights_dir is not None else wf.cache_path(hub_dir).parent
        return f"`hf download {_PYIQA_REPO} {wf.name} --local-dir {folder}`"
    return wf.url


def required_weight_files(pyiqa_name: str) -> tuple[WeightFile, ...]:
    """The files pyiqa metric ``pyiqa_name`` needs (empty for PSNR/SSIM)."""
    if pyiqa_name not in WEIGHT_FILES:
        raise ValueError(f"pyiqa_name={pyiqa_name!r} is not one of {sorted(WEIGHT_FILES)}.")
    return WEIGHT_FILES[pyiqa_name]


def resolve_weights(
    pyiqa_names: list[str] | tuple[str, ...],
    weights_dir: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """Find every file the given pyiqa metrics need, without downloading anything.

    Args:
        pyiqa_names (`list[str]`): pyiqa metric names, e.g. ``["lpips", "dists", "niqe"]``.
        weights_dir (`str` or `os.PathLike`, *optional*):
            A folder searched first, holding files under their own names (flat).

    Returns:
        `dict[str, Path]`: file name -> path found.

    Raises:
        `MissingWeightsError`: naming every missing file, the folders searched and the URLs.
    """
    hub_dir = Path(torch.hub.get_dir())
    if weights_dir is not None and not Path(weights_dir).is_dir():
        raise MissingWeightsError(f"weights_dir={str(weights_dir)!r} is not a folder.")
    found: dict[str, Path] = {}
    missing: list[tuple[str, WeightFile]] = []
    for metric in pyiqa_names:
        for wf in required_weight_files(metric):
            if wf.name in found:
                continue
            candidates = [wf.cache_path(hub_dir)]
            if weights_dir is not None:
                candidates.insert(0, Path(weights_dir) / wf.name)
            hit = next((p for p in candidates if p.is_file()), None)
            if hit is None:
                if all(wf.name != m.name for _, m in missing):
                    missing.append((metric, wf))
            else:
                found[wf.name] = hit
    if missing:
        where = (
            f"in the --weights-dir folder {str(weights_dir)!r} or at the cache path shown"
            if weights_dir is not None
            else "at the cache path shown, or in a folder passed as --weights-dir (weights_dir=)"
        )
        names = ", ".join(wf.name for _, wf in missing)
        lines = [
            f"metric weights {names} are not available offline (nothing is downloaded); "
            f"put each file {where}:"
        ]
        folder = Path(weights_dir) if weights_dir is not None else None
        for metric, wf in missing:
            how = _how_to_get(wf, folder, hub_dir)
            lines.append(f"  - {wf.name} (for {metric}): {wf.cache_path(hub_dir)}  <- {how}")
        raise MissingWeightsError("\n".join(lines))
    return found
