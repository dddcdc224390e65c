"""``load_prior``: one entry point from a name, file, folder or list to a [`PriorModel`].

Files are read without executing code: safetensors directly, PyTorch pickles only through
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
Every file or folder that cannot be used raises `InvalidWeightsError` (a `ValueError`) naming
it and what is wrong; one that does not exist raises `MissingWeightsError`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import torch
from diffusers.utils import logging
from spandrel import ImageModelDescriptor

from raim_diffusion.errors import InvalidWeightsError, MissingWeightsError, RaimError
from raim_diffusion.hub import (
    WEIGHT_SUFFIXES,
    extract_state_dict,
    load_cached_first,
    missing_file_error,
    read_json_object,
    read_weights_file,
)

from .builtin import get_builtin, is_builtin, list_builtin, resolve_builtin
from .model import PriorModel, descriptor_from_state_dict

logger = logging.get_logger(__name__)

PriorSource = Union[str, os.PathLike, ImageModelDescriptor, PriorModel]

_KIND = "prior"
_FOLDER_CONTENTS = (
    "config.json and diffusion_pytorch_model.safetensors written by PriorModel.save_pretrained "
    "(or be a pipeline folder with a prior/ subfolder)"
)


def _how_to_give() -> str:
    return (
        f"pass a weights file ({', '.join(WEIGHT_SUFFIXES)}), a folder saved by "
        f"PriorModel.save_pretrained, or a built-in name: {', '.join(list_builtin())}"
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Read a state dict from a ``.safetensors`` or PyTorch (``.pth``/``.pt``/``.ckpt``) file.

    PyTorch files are loaded with ``weights_only=True``: tensors, numbers, strings and
    containers only, never arbitrary pickled objects (which could run code on loading).

    Args:
        path (`str` or `os.PathLike`): The weights file.

    Returns:
        `dict`: The raw contents (not yet unwrapped from a training checkpoint, not yet
        canonicalised), on the CPU.

    Raises:
        `MissingWeightsError`: If the file does not exist.
        `InvalidWeightsError`: If the suffix is not supported, or the file is empty, truncated,
            damaged, not a state dict, or pickles Python objects other than tensors.
    """
    if not Path(path).exists():
        raise missing_file_error(_KIND, path, _how_to_give())
    return read_weights_file(path, kind=_KIND)


def load_descriptor(path: str | os.PathLike) -> ImageModelDescriptor:
    """Load one weights file into a spandrel descriptor (architecture detected from weights).

    A training checkpoint is accepted when it keeps the network's weights under a usual key
    (``params_ema``, ``params``, ``state_dict``, ``model``, ...; see
    [`~raim_diffusion.hub.STATE_DICT_KEYS`]).

    Args:
        path (`str` or `os.PathLike`): A ``.safetensors`` / ``.pth`` / ``.pt`` / ``.ckpt`` file.

    Returns:
        `spandrel.ImageModelDescriptor`: The model on the CPU in float32, in eval mode.

    Raises:
        `MissingWeightsError`: If the file does not exist.
        `InvalidWeightsError`: If the file cannot be read safely, holds no network weights, or
            its weights match no supported restoration architecture.
    """
    state = extract_state_dict(read_state_dict(path), path, kind=_KIND)
    try:
        return descriptor_from_state_dict(state, str(path))
    except RaimError:
        raise
    except ValueError as err:
        message = " ".join(str(err).split())
        if not message.startswith(str(path)):
            message = f"{path}: {message}"
        raise InvalidWeightsError(f"{_KIND} {message}") from err


def _load_folder(path: Path) -> PriorModel:
    if (path / "config.json").is_file():
        subfolder = None
    elif (path / "prior" / "config.json").is_file():
        subfolder = "prior"  # a whole pipeline folder: take its prior component
    else:
        raise MissingWeightsError(
            f"{_KIND} {path}: the local folder is incomplete (no config.json); it must hold "
            f"{_FOLDER_CONTENTS}"
        )
    folder = path / subfolder if subfolder else path
    config = read_json_object(folder / "config.json", kind=_KIND)
    class_name = config.get("_class_name")
    if class_name not in (None, PriorModel.__name__):
        raise InvalidWeightsError(
            f"{_KIND} {folder}: config.json describes a {class_name}, not a PriorModel"
        )
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.safetensors.index.json")):
        raise MissingWeightsError(
            f"{_KIND} {folder}: the local folder is incomplete (no "
            f"diffusion_pytorch_model.safetensors); it must hold {_FOLDER_CONTENTS}"
        )
    return load_cached_first(
        PriorModel.from_pretrained,
        path,
        {"subfolder": subfolder},
        kind=_KIND,
        required=("config.json",) if subfolder is None else (),
        expected=_FOLDER_CONTENTS,
    )


def _load_one(source: PriorSource) -> PriorModel:
    if isinstance(source, PriorModel):
        return source
    if isinstance(source, ImageModelDescriptor):
        return PriorModel.from_spandrel(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            "name_or_path must be a built-in name, a weights file, a folder, a spandrel "
            f"ImageModelDescriptor, a PriorModel or a list of these; got {type(source).__name__}"
        )
    if isinstance(source, str) and is_builtin(source):
        entry = get_builtin(source)
        descriptor = load_descriptor(resolve_builtin(source))
        # animevideov3 x2/x3 are the x4 network plus a downscale: keep that as default outscale.
        outscale = entry.scale if entry.scale != descriptor.scale else None
        return PriorModel.from_spandrel(descriptor, outscale=outscale)
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_folder(path)
    if path.exists():
        return PriorModel.from_spandrel(load_descriptor(path))
    raise MissingWeightsError(
        f"{_KIND} {str(source)!r} is not available (neither a built-in name nor an existing file "
        f"or folder); {_how_to_give()}"
    )


def _auto_dtype(descriptor: ImageModelDescriptor, device: torch.device) -> torch.dtype:
    """Fastest dtype the architecture supports on ``device``."""
    if device.type != "cuda":
        # Half precision convolutions on CPU are slow or missing; float32 is the safe default.
        return torch.float32
    if descriptor.supports_half:
        return torch.float16
    if descriptor.supports_bfloat16 and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    logger.info(f"{descriptor.architecture.name} supports neither fp16 nor bf16; using float32")
    return torch.float32


def load_prior(
    name_or_path: PriorSource | Sequence[PriorSource],
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    *,
    tile: int | None = None,
    tile_overlap: int = 32,
    tile_weight: str = "gaussian",
    weights: Sequence[float] | None = None,
    outscale: float | None = None,
) -> PriorModel:
    """Load a restoration prior.

    Args:
        name_or_path:
            A built-in name (e.g. ``"realesrgan-x4plus"``), a ``.safetensors`` / ``.pth`` /
            ``.pt`` / ``.ckpt`` file of any architecture spandrel knows (with
            ``spandrel_extra_arches``: SRFormer, Restormer, ...), a folder written by
            ``PriorModel.save_pretrained``, a spandrel descriptor, or a list of these for a
            weighted ensemble.
        device (`str` or `torch.device`, *optional*): Where the networks run; CPU by default.
        dtype (`torch.dtype`, *optional*): Compute dtype. By default float16 (or bfloat16) on
            CUDA where the architecture supports it, float32 otherwise. Members that do not
            support a requested dtype run in float32 (logged).
        tile (`int`, *optional*): Tile size in input pixels; `None` chooses from free memory
            and does not tile images that fit, ``0`` never tiles.
        tile_overlap (`int`, *optional*, defaults to 32): Tile overlap in input pixels.
        tile_weight (`str`, *optional*, defaults to `"gaussian"`): Tile blend weights.
        weights (`Sequence[float]`, *optional*): Positive ensemble weights, one per entry of
            ``name_or_path`` (normalised; equal by default), e.g. ``[0.8, 0.2]``.
        outscale (`float`, *optional*): Default output scale of the prior (e.g. ``1`` for an
            x4 network used as a same-size restorer); by default the native scale, or the
            built-in model's own scale.

    Returns:
        `PriorModel`: The prior, in eval mode, on ``device``.

    Raises:
        `MissingWeightsError`: A file or folder does not exist and is not a built-in name, or
            a folder lacks its config or weights.
        `InvalidWeightsError`: A file or folder cannot be used: empty, truncated, damaged, a
            pickle of Python objects, a training checkpoint without network weights, a bad
            ``config.json``, or weights of no supported architecture (the message names it).
        `ValueError`: Bad weights / tiling arguments.

    Example:
        ```py
        prior = load_prior("RealESRGAN_x4plus.pth", "cuda")
        restored = prior(lq, upscale=2)  # x4 network, x2 output
        ensemble = load_prior(["a.safetensors", "b.pth"], weights=[0.8, 0.2])
        ```
    """
    is_list = isinstance(name_or_path, (list, tuple))
    sources = list(name_or_path) if is_list else [name_or_path]
    if not sources:
        raise ValueError("name_or_path is an empty list; give at least one prior")
    if (
        weights is not None
        and not is_list
        and not isinstance(weights, (int, float))
        and len(weights) != 1
    ):
        raise ValueError(f"weights has {len(weights)} entries but name_or_path is a single prior")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating point torch.dtype, got {dtype!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")

    priors = [_load_one(source) for source in sources]
    options: dict[str, Any] = {"tile": tile, "tile_overlap": tile_overlap}
    options["tile_weight"] = tile_weight
    if outscale is not None:
        options["outscale"] = outscale
    prior = PriorModel.ensemble(priors, weights=weights, **options)
    if dtype is not None:
        # nn.Module.to skips ModelMixin.to's spurious float32-modules warning; members that do
        # not support dtype are kept in float32 by PriorModel._apply.
        torch.nn.Module.to(prior, device=device, dtype=dtype)
    else:
        prior.to(device=device)
        for module, descriptor in zip(prior.members, prior.descriptors, strict=True):
            module.to(dtype=_auto_dtype(descriptor, device))
    return prior.eval()
