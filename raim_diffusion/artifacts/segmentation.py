"""Semantic segmentation backends for the artifact detector (ADE20K, 150 classes).

Every backend is a callable ``segmenter(images) -> labels`` mapping an N,3,H,W float tensor in
[0, 1] to an N,H,W long tensor of ADE20K labels (0..149) at image size, and has a ``name``.

* :class:`TransformersSegmenter` -- SegFormer (default
  ``nvidia/segformer-b5-finetuned-ade-640-640``, the model DeSRA used) or Mask2Former
  (``facebook/mask2former-swin-large-ade-semantic``), loaded with ``from_pretrained`` from the
  hub cache or a local folder.
* :class:`MMSegSegmenter` -- an mmsegmentation config + checkpoint (optional dependency).
* :class:`NoSegmenter` -- ``"none"``: no segmentation, every class weight is 1.

:func:`load_segmenter` turns a name into a backend through the registry `SEGMENTER_BACKENDS`
(name -> factory, as spandrel and timm do): ``"none"``, ``"segformer"``, ``"mask2former"``,
``"mmseg:<config>[:<checkpoint>]"``, ``"transformers:<id>"``, and any other hub id or folder
goes to ``"transformers"``. A new backend is one function decorated with
:func:`register_segmenter`.

Preprocessing follows mmsegmentation's ADE20K test pipeline that DeSRA ran: resize keeping the
aspect ratio so the short side is ``short_side`` (640; long side at most ``4 * short_side``),
normalise with the processor's mean/std, predict, upsample the logits bilinearly to the image
size and take the argmax. Images whose resized long side exceeds ``tile`` are processed in
overlapping tiles whose logits are blended (:func:`raim_diffusion.tiling.tiled_apply`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
import torch.nn.functional as F
from diffusers.utils import logging

from ..hub import load_cached_first
from ..tiling import tiled_apply
from .tables import ADE20K_CLASSES

logger = logging.get_logger(__name__)

__all__ = [
    "DEFAULT_SEGFORMER",
    "DEFAULT_MASK2FORMER",
    "SEGMENTER_BACKENDS",
    "MMSegSegmenter",
    "NoSegmenter",
    "Segmenter",
    "SegmenterFactory",
    "TransformersSegmenter",
    "load_segmenter",
    "register_segmenter",
]

DEFAULT_SEGFORMER = "nvidia/segformer-b5-finetuned-ade-640-640"
DEFAULT_MASK2FORMER = "facebook/mask2former-swin-large-ade-semantic"
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_T = TypeVar("_T")


class Segmenter(Protocol):
    """What the detector needs of a segmentation backend.

    Calling it maps N,3,H,W images in [0, 1] to N,H,W long ADE20K labels at image size (or
    ``None`` for :class:`NoSegmenter`); ``name`` is recorded in results.
    """

    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor | None: ...


class NoSegmenter:
    """The ``"none"`` backend: no segmentation, so every pixel gets weight 1.

    The detector checks ``name == "none"`` and records ``result.segmentation = "none"``;
    calling it returns ``None``.
    """

    name = "none"

    def __call__(self, images: torch.Tensor) -> None:
        return None


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected an N,3,H,W tensor in [0, 1], got {shape}")


def _check_ade20k(config: Any, source: str) -> None:
    """Refuse models whose label set is not ADE20K's 150 classes in the standard order."""
    id2label = getattr(config, "id2label", None) or {}
    n = getattr(config, "num_labels", len(id2label))
    if n != len(ADE20K_CLASSES):
        raise ValueError(
            f"segmenter {source!r} predicts {n} classes; the detector's class tables need the "
            f"{len(ADE20K_CLASSES)} ADE20K classes"
        )
    names = [str(id2label.get(i, id2label.get(str(i), ""))).strip() for i in range(n)]
    # Random-init configs name labels LABEL_0 ...; only a named set can be checked.
    if names and not all(x.startswith("LABEL_") for x in names):
        bad = [(i, x) for i, x in enumerate(names) if x.split(",")[0].strip() != ADE20K_CLASSES[i]]
        if bad:
            raise ValueError(
                f"segmenter {source!r} uses a different label order than ADE20K, e.g. {bad[:3]}"
            )


class TransformersSegmenter:
    """SegFormer or Mask2Former from ``transformers`` as an ADE20K label-map callable.

    Args:
        model: a ``SegformerForSemanticSegmentation`` or ``Mask2FormerForUniversalSegmentation``
            (in eval mode, on its device / dtype).
        image_mean, image_std: normalisation of [0, 1] RGB (the image processor's values).
        short_side (`int`): resize so the short side has this length (640 for the ADE 640 models).
        tile (`int`): resized images with a longer side are segmented in tiles of this size.
        name (`str`): recorded in results.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        image_mean: tuple[float, ...] = _IMAGENET_MEAN,
        image_std: tuple[float, ...] = _IMAGENET_STD,
        short_side: int = 640,
        tile: int = 1280,
        overlap: int = 128,
        name: str = "segformer",
    ) -> None:
        if short_side < 32:
            raise ValueError(f"short_side={short_side!r}: must be >= 32")
        if tile < short_side:
            raise ValueError(f"tile={tile!r}: must be >= short_side={short_side}")
        self.model = model.eval()
        self.kind = "mask2former" if "mask2former" in type(model).__name__.lower() else "segformer"
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.short_side = short_side
        self.tile = tile
        self.overlap = overlap
        self.name = name

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path = DEFAULT_SEGFORMER,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> TransformersSegmenter:
        """Load a SegFormer or Mask2Former checkpoint (hub id or local folder) and its processor.

        Args:
            name_or_path: hub id or folder with ``config.json``, the weights and
                ``preprocessor_config.json``.
            device, dtype: where and in what precision to run the model.
            **kwargs: ``short_side``, ``tile``, ``overlap`` of the constructor.

        Raises:
            MissingWeightsError: if the model is neither a folder nor in the local Hugging Face
                cache, and cannot be downloaded. The hub is only tried after the cache, and not
                at all when ``HF_HUB_OFFLINE`` is set or it cannot be reached.
        """
        # transformers is heavy; only the detector paths that segment import it.
        from transformers import (
            AutoConfig,
            AutoImageProcessor,
            Mask2FormerForUniversalSegmentation,
            SegformerForSemanticSegmentation,
        )

        source = str(name_or_path)
        config = _load_local_first(AutoConfig.from_pretrained, source)
        if config.model_type == "segformer":
            model_cls = SegformerForSemanticSegmentation
        elif config.model_type == "mask2former":
            model_cls = Mask2FormerForUniversalSegmentation
        else:
            raise ValueError(
                f"segmenter {source!r} is a {config.model_type!r} model; supported: segformer, "
                "mask2former"
            )
        _check_ade20k(config, source)
        model = _load_local_first(model_cls.from_pretrained, source, dtype=dtype)
        mean, std, short = _IMAGENET_MEAN, _IMAGENET_STD, 640
        try:
            proc = _load_local_first(
                AutoImageProcessor.from_pretrained, source, "preprocessor_config.json"
            )
            mean = tuple(float(v) for v in getattr(proc, "image_mean", mean))
            std = tuple(float(v) for v in getattr(proc, "image_std", std))
            if max(mean) > 1.0:  # given on the 0..255 scale (processors without rescaling)
                mean = tuple(v / 255.0 for v in mean)
                std = tuple(v / 255.0 for v in std)
            size = getattr(proc, "size", None) or {}
            short = int(
                size.get("shortest_edge") or min(size.get("height", 640), size.get("width", 640))
            )
        except (OSError, ValueError):  # Missing/InvalidWeightsError are OSError/ValueError
            logger.warning(f"no image processor found for {source!r}; using ImageNet mean/std")
        kwargs.setdefault("short_side", short)
        kwargs.setdefault("tile", max(2 * kwargs["short_side"], 1280))
        if device is not None:
            model = model.to(device)
        return cls(model, mean, std, name=source, **kwargs)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """N,150,h,w class scores at the input's size for normalised input ``x``."""
        out = self.model(pixel_values=x)
        if self.kind == "segformer":
            logits = out.logits
        else:
            # Semantic inference of Mask2Former: class probabilities (without "no object")
            # weighted by each query's mask probability.
            cls_p = out.class_queries_logits.softmax(-1)[..., :-1]
            mask_p = out.masks_queries_logits.sigmoid()
            logits = torch.einsum("nqc,nqhw->nchw", cls_p, mask_p)
        return F.interpolate(
            logits.float(), size=x.shape[-2:], mode="bilinear", align_corners=False
        )

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """ADE20K labels (N,H,W long, on the images' device) for N,3,H,W images in [0, 1]."""
        _check_images(images)
        n, _, h, w = images.shape
        param = next(self.model.parameters())
        scale = self.short_side / min(h, w)
        if max(h, w) * scale > 4 * self.short_side:  # mmseg's keep-ratio cap on the long side
            scale = 4 * self.short_side / max(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        mean = torch.tensor(self.image_mean, device=param.device).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, device=param.device).view(1, 3, 1, 1)
        labels = []
        for i in range(n):  # one at a time: full-size logits are 150 x H x W floats
            x = images[i : i + 1].to(param.device, torch.float32)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
            x = ((x - mean) / std).to(param.dtype)
            logits = tiled_apply(
                self._logits,
                x,
                self.tile if max(size) > self.tile else None,
                self.overlap,
                weight="gaussian",
                max_batch=1,
            )
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            labels.append(logits.argmax(dim=1))
        return torch.cat(labels).to(images.device)

    def to(self, device: str | torch.device) -> TransformersSegmenter:
        """Move the model; returns self."""
        self.model.to(device)
        return self


class MMSegSegmenter:
    """mmsegmentation model (optional dependency, imported on construction).

    Args:
        config (`str`): mmseg config file of an ADE20K model.
        checkpoint (`str`): matching checkpoint.
        device (`str`): e.g. ``"cuda:0"``.
    """

    def __init__(self, config: str, checkpoint: str | None = None, device: str = "cpu") -> None:
        try:
            import mmseg.apis as mmseg_apis  # noqa: PLC0415 - optional backend
        except ImportError as exc:
            raise ImportError(
                "the 'mmseg' segmenter needs mmsegmentation (and mmcv/mmengine); install them "
                "following https://mmsegmentation.readthedocs.io, or use the default SegFormer "
                "backend from transformers"
            ) from exc
        init = getattr(mmseg_apis, "init_model", None) or mmseg_apis.init_segmentor
        self._infer = getattr(mmseg_apis, "inference_model", None) or mmseg_apis.inference_segmentor
        self.model = init(config, checkpoint, device=device)
        self.name = f"mmseg:{config}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        out = []
        for img in images:
            # mmseg expects BGR uint8 HWC, like DeSRA's cv2-read input.
            arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).flip(-1).cpu().numpy()
            res = self._infer(self.model, arr)
            if hasattr(res, "pred_sem_seg"):  # mmseg 1.x
                lab = res.pred_sem_seg.data[0]
            else:  # mmseg 0.x returns a list of H,W arrays
                lab = torch.as_tensor(res[0])
            out.append(lab.long().cpu())
        return torch.stack(out).to(images.device)


# --------------------------------------------------------------------------- loading
_CONTENTS = "config.json and the weights (and preprocessor_config.json)"
_WITHOUT = (
    ", or run without segmentation (segmenter 'none', e.g. `detect.segmenter=none` with "
    "`raim restore`)"
)


def _load_local_first(
    load: Callable[..., _T], source: str, required: str = "config.json", **kwargs: Any
) -> _T:
    """``load(source, **kwargs)`` from a folder or the local cache, else from the hub.

    See [`raim_diffusion.hub.load_cached_first`]: the hub is only tried when it can answer, so
    an offline machine fails at once; a model that cannot be found raises `MissingWeightsError`
    and a damaged folder `InvalidWeightsError`, in the format every model uses.
    """
    return load_cached_first(
        load,
        source,
        kwargs,
        kind="segmentation model",
        required=(required,),
        expected=_CONTENTS,
        hint=_WITHOUT,
    )


SegmenterFactory = Callable[[str, str | torch.device | None, torch.dtype | None], Segmenter]
"""``factory(argument, device, dtype) -> segmenter``: ``argument`` is what follows ``"name:"``
in the segmenter name (``""`` for the bare name)."""

SEGMENTER_BACKENDS: dict[str, SegmenterFactory] = {}
"""Segmentation backends by name; fill it with :func:`register_segmenter`."""

# The backend of names that are neither registered nor ``scheme:...``: hub ids and folders.
_DEFAULT_BACKEND = "transformers"
# URI-scheme syntax; one letter is a Windows drive ("C:\\models\\seg"), not a scheme.
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-_]+")


def register_segmenter(name: str) -> Callable[[SegmenterFactory], SegmenterFactory]:
    """Register a segmentation backend under ``name`` (a decorator).

    ``load_segmenter(name)`` then calls ``factory("", device, dtype)`` and
    ``load_segmenter(f"{name}:{argument}")`` calls ``factory(argument, device, dtype)``.

    Example:

    ```py
    @register_segmenter("mine")
    def _mine(argument, device, dtype):
        return MySegmenter(argument or "default.pt", device=device)
    ```

    Args:
        name (`str`): the backend's name, matched case-insensitively; letters, digits and
            ``+.-_``, at least two characters.

    Returns:
        the decorator, which returns the factory unchanged.

    Raises:
        ValueError: if the name is malformed or already registered.
    """
    key = str(name).lower()
    if not _SCHEME.fullmatch(key):
        raise ValueError(
            f"segmenter backend name {name!r}: use letters, digits and '+.-_', starting with a "
            "letter, at least two characters"
        )
    if key in SEGMENTER_BACKENDS:
        raise ValueError(f"segmenter backend {name!r} is already registered")

    def decorator(factory: SegmenterFactory) -> SegmenterFactory:
        SEGMENTER_BACKENDS[key] = factory
        return factory

    return decorator


def _no_argument(name: str, argument: str) -> None:
    if argument:
        raise ValueError(
            f"segmenter {name + ':' + argument!r}: {name!r} takes no argument; give a hub id or "
            "folder by itself"
        )


@register_segmenter("none")
def _none_backend(argument: str, device: Any, dtype: Any) -> NoSegmenter:
    _no_argument("none", argument)
    return NoSegmenter()


@register_segmenter("transformers")
def _transformers_backend(argument: str, device: Any, dtype: Any) -> TransformersSegmenter:
    if not argument:
        raise ValueError("segmenter 'transformers:' needs a hub id or folder after the colon")
    return TransformersSegmenter.from_pretrained(argument, device, dtype)


@register_segmenter("segformer")
def _segformer_backend(argument: str, device: Any, dtype: Any) -> TransformersSegmenter:
    _no_argument("segformer", argument)
    return TransformersSegmenter.from_pretrained(DEFAULT_SEGFORMER, device, dtype)


@register_segmenter("mask2former")
def _mask2former_backend(argument: str, device: Any, dtype: Any) -> TransformersSegmenter:
    _no_argument("mask2former", argument)
    return TransformersSegmenter.from_pretrained(DEFAULT_MASK2FORMER, device, dtype)


@register_segmenter("mmseg")
def _mmseg_backend(argument: str, device: Any, dtype: Any) -> MMSegSegmenter:
    config, _, checkpoint = argument.partition(":")
    if not config:
        raise ValueError("segmenter 'mmseg' needs a config: 'mmseg:<config.py>[:<checkpoint>]'")
    return MMSegSegmenter(config, checkpoint or None, str(device or "cpu"))


def _resolve(name: str | os.PathLike) -> tuple[str, str]:
    """(backend, argument) of a segmenter name."""
    text = str(name)
    if text.lower() in SEGMENTER_BACKENDS:
        return text.lower(), ""
    if isinstance(name, os.PathLike) or Path(text).exists():
        return _DEFAULT_BACKEND, text
    scheme, sep, argument = text.partition(":")
    if sep and _SCHEME.fullmatch(scheme):
        if scheme.lower() not in SEGMENTER_BACKENDS:
            known = ", ".join(f"{k!r}" for k in sorted(SEGMENTER_BACKENDS))
            raise ValueError(
                f"segmenter {text!r}: unknown backend {scheme!r}; known backends: {known} "
                "(as 'name' or 'name:argument'), or a hub id or folder"
            )
        return scheme.lower(), argument
    return _DEFAULT_BACKEND, text


def load_segmenter(
    name: str | os.PathLike | None = DEFAULT_SEGFORMER,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Segmenter:
    """Create a segmentation backend from its name, through `SEGMENTER_BACKENDS`.

    Args:
        name (`str`, `os.PathLike` or `None`): ``"none"`` (or `None`): no segmentation;
            ``"segformer"`` (the B5 ADE 640 model), ``"mask2former"`` (Swin-L ADE semantic);
            ``"mmseg:<config.py>[:<checkpoint.pth>]"``; ``"<backend>:<argument>"`` for any
            registered backend; any other name is a SegFormer/Mask2Former hub id or local folder.
        device (`str` or `torch.device`, *optional*): where to run.
        dtype (`torch.dtype`, *optional*): in what precision to run.

    Returns:
        `Segmenter`: a callable ``images -> labels`` with a ``name`` attribute.

    Raises:
        ValueError: for an unknown ``backend:`` prefix (the message lists the known ones).
        MissingWeightsError: if the model is neither local nor downloadable.
    """
    if name is None:
        name = "none"
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"segmenter: expected a name, hub id or folder, got {type(name).__name__}")
    backend, argument = _resolve(name)
    return SEGMENTER_BACKENDS[backend](argument, device, dtype)
