"""Stage 4: fuse a faithful restoration into the artifact regions of the generated image.

Fusion networks are registered architectures (`FUSION_ARCHITECTURES`, name -> class); each
implements ``fuse_images(generated, prior, lq_up, mask, *, tile, overlap)``. [`FusionNet`] (a 1x
SRFormer, Xhs-IAG's) re-restores the masked regions from the low-quality input;
[`AlignFusionNet`] (So Elegant's) warps the generated image to the prior's by deformable
convolutions inside a feathered band around the mask. Without a
network, [`pyramid_blend`] blends the prior in seam-free. `load_fusion` loads whichever
registered architecture a saved folder holds.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import InvalidWeightsError
from ..hub import load_cached_first, missing_file_error, read_json_object
from ..ops import resize
from .align import ALIGN_PRESETS, AlignFusionNet
from .blend import band_weight, pyramid_blend
from .model import PRESETS, FusionNet, make_composite
from .srformer import SRFormer, strip_official_buffers

__all__ = [
    "ALIGN_PRESETS",
    "AlignFusionNet",
    "FUSION_ARCHITECTURES",
    "PRESETS",
    "FusionNet",
    "fusion_architecture",
    "load_fusion",
    "register_fusion",
    "SRFormer",
    "band_weight",
    "fuse",
    "make_composite",
    "pyramid_blend",
    "strip_official_buffers",
]


_KIND = "fusion network"
_CONTENTS = "config.json and the weights, as save_pretrained writes them"

#: Fusion architectures by class name (the ``_class_name`` that ``save_pretrained`` writes).
FUSION_ARCHITECTURES: dict[str, type[torch.nn.Module]] = {}


def register_fusion(cls: type[torch.nn.Module]) -> type[torch.nn.Module]:
    """Register a fusion architecture (a `ModelMixin, ConfigMixin` with ``fuse_images``)."""
    if not callable(getattr(cls, "fuse_images", None)):
        raise TypeError(f"{cls.__name__} has no fuse_images(generated, prior, lq_up, mask, ...)")
    FUSION_ARCHITECTURES[cls.__name__] = cls
    return cls


register_fusion(FusionNet)
register_fusion(AlignFusionNet)


def fusion_architecture(module: object) -> torch.nn.Module:
    """The registered fusion network behind ``module`` (a `torch.compile` wrapper is unwrapped).

    Raises:
        TypeError: ``module`` is not a registered fusion architecture.
    """
    inner = getattr(module, "_orig_mod", module)  # torch.compile's OptimizedModule
    if type(inner).__name__ in FUSION_ARCHITECTURES and isinstance(
        inner, FUSION_ARCHITECTURES[type(inner).__name__]
    ):
        return inner
    raise TypeError(
        f"fusion is a {type(module).__name__}, not a registered fusion architecture "
        f"({', '.join(FUSION_ARCHITECTURES)}); register it with raim_diffusion.fusion."
        "register_fusion, or pass fusion=None for the pyramid blend"
    )


def load_fusion(folder: str | os.PathLike, **kwargs) -> torch.nn.Module:
    """Load the fusion network saved in ``folder`` (by ``save_pretrained``), whatever its
    registered architecture.

    Args:
        folder (`str` or `os.PathLike`): a folder with ``config.json`` and the weights.
        **kwargs: passed to ``from_pretrained`` (``torch_dtype``, ...).

    Raises:
        MissingWeightsError: ``folder`` does not exist, or lacks ``config.json`` or the weights
            (a `FileNotFoundError`).
        InvalidWeightsError: ``config.json`` is not a JSON object or names no registered fusion
            architecture, or the weights are damaged or do not fit it (a `ValueError`).
    """
    path = Path(folder)
    if not path.exists():
        raise missing_file_error(
            _KIND,
            path,
            "pass a folder saved by save_pretrained (`raim train-fusion` writes one to OUT/fusion)",
            thing="folder",
        )
    if path.is_dir() and (path / "config.json").exists():
        name = read_json_object(path / "config.json", kind=_KIND).get("_class_name")
        if not isinstance(name, str) or name not in FUSION_ARCHITECTURES:
            raise InvalidWeightsError(
                f"{_KIND} {path}: config.json names the architecture {name!r}, which is not a "
                f"registered fusion architecture ({', '.join(FUSION_ARCHITECTURES)})"
            )
        load = FUSION_ARCHITECTURES[name].from_pretrained
    else:
        load = FusionNet.from_pretrained  # only reached to report what the folder lacks
    return load_cached_first(
        load, path, kwargs, kind=_KIND, required=("config.json",), expected=_CONTENTS
    )


def fuse(
    generated: torch.Tensor,
    prior: torch.Tensor | None,
    lq_up: torch.Tensor | None,
    mask: torch.Tensor,
    fusion: FusionNet | None = None,
    *,
    tile: int | None = None,
    overlap: int = 32,
    feather: int = 16,
    levels: int | None = None,
) -> torch.Tensor:
    """Stage 4 of the pipeline: replace the masked regions of ``generated``.

    Args:
        generated (`torch.Tensor`): ``(N, 3, H, W)`` generated image in [0, 1].
        prior (`torch.Tensor`, *optional*): ``(N, 3, H, W)`` prior result; the fill image of the
            blend fallback.
        lq_up (`torch.Tensor`, *optional*): ``(N, 3, h, w)`` LQ input; resized to ``H x W``
            (`raim_diffusion.ops.resize`) when its size differs. Required by ``fusion``, and
            the fallback's fill when there is no prior.
        mask (`torch.Tensor`): ``(N or 1, 1, H, W)`` in [0, 1], 1 = artifact.
        fusion (*optional*): a registered fusion network (e.g. a trained `FusionNet`); without
            one the pyramid blend is used.
        tile (`int`, *optional*): Tile size for ``fusion``; `None` runs the whole image at once.
        overlap (`int`, *optional*, defaults to 32): Tile overlap for ``fusion``.
        feather (`int`, *optional*, defaults to 16): Transition width of the blend fallback.
        levels (`int`, *optional*): Pyramid levels of the blend fallback.

    Returns:
        `torch.Tensor`: ``(N, 3, H, W)`` in [0, 1], dtype of ``generated``.
    """
    if lq_up is not None and lq_up.shape[-2:] != generated.shape[-2:]:
        if lq_up.ndim != 4:
            raise ValueError(f"lq_up must be (N, 3, h, w), got {tuple(lq_up.shape)}")
        lq_up = resize(lq_up, tuple(generated.shape[-2:])).to(generated.dtype)
    if fusion is not None:
        net = fusion_architecture(fusion)
        if lq_up is None:
            raise ValueError("lq_up is required when a fusion network is given")
        return net.fuse_images(generated, prior, lq_up, mask, tile=tile, overlap=overlap)
    fill = prior if prior is not None else lq_up
    if fill is None:
        raise ValueError("the blend fallback needs prior or lq_up as the fill image, got neither")
    fill = fill.to(device=generated.device, dtype=generated.dtype)
    return pyramid_blend(generated, fill, mask, levels=levels, feather=feather).clamp(0, 1)
