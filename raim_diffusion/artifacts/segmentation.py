"""Semantic segmentation backends for the artifact detector (ADE20K, 150 classes).

Every backend is a callable ``segmenter(images) -> labels`` mapping an N,3,H,W float tensor in
[0, 1] to an N,H,W long tensor of ADE20K labels (0..149) at image size, and has a ``name``.

* :class:`TransformersSegmenter` -- SegFormer (default
  ``nvidia/segformer-b5-finetuned-ade-640-640``, the model DeSRA used) or Mask2Former
  (``facebook/mask2former-swin-large-ade-semantic``), loaded with ``from_pretrained`` from the
  hub cache or a local folder.
* :class:`MMSegSegmenter` -- an mmsegmentation config + checkpoint (optional dependency).
* :class:`NoSegmenter` -- ``"none"``: no segmentation, every class weight is 1.

Preprocessing follows mmsegmentation's ADE20K test pipeline that DeSRA ran: resize keeping the
aspect ratio so the short side is ``short_side`` (640; long side at most ``4 * short_side``),
normalise with the processor's mean/std, predict, upsample the logits bilinearly to the image
size and take the argmax. Images whose resized long side exceeds ``tile`` are processed in
overlapping tiles whose logits are blended (:func:`raim_diffusion.tiling.tiled_apply`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.utils import logging

from ..errors import MissingWeightsError
from ..tiling import tiled_apply
from .tables import ADE20K_CLASSES

logger = logging.get_logger(__name__)

__all__ = [
    "DEFAULT_SEGFORMER",
    "DEFAULT_MASK2FORMER",
    "MMSegSegmenter",
    "NoSegmenter",
    "TransformersSegmenter",
    "load_segmenter",
    "tiny_segformer_segmenter",
]

DEFAULT_SEGFORMER = "nvidia/segformer-b5-finetuned-ade-640-640"
DEFAULT_MASK2FORMER = "facebook/mask2former-swin-large-ade-semantic"
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


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
            MissingWeightsError: if the model is neither cached nor reachable.
        """
        # transformers is heavy; only the detector paths that segment import it.
        from transformers import (
            AutoConfig,
            AutoImageProcessor,
            Mask2FormerForUniversalSegmentation,
            SegformerForSemanticSegmentation,
        )

        source = str(name_or_path)
        try:
            config = AutoConfig.from_pretrained(source)
        except OSError as exc:
            raise MissingWeightsError(
                f"segmentation model {source!r} is not in the local cache and could not be "
                "downloaded; download it once with `hf download "
                f"{source}` (or pass a local folder), or use segmenter 'none' (--segmenter none)"
            ) from exc
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
        try:
            model = model_cls.from_pretrained(source, dtype=dtype)
        except OSError as exc:
            raise MissingWeightsError(
                f"weights of segmentation model {source!r} not found"
            ) from exc
        mean, std, short = _IMAGENET_MEAN, _IMAGENET_STD, 640
        try:
            proc = AutoImageProcessor.from_pretrained(source)
            mean = tuple(float(v) for v in getattr(proc, "image_mean", mean))
            std = tuple(float(v) for v in getattr(proc, "image_std", std))
            if max(mean) > 1.0:  # given on the 0..255 scale (processors without rescaling)
                mean = tuple(v / 255.0 for v in mean)
                std = tuple(v / 255.0 for v in std)
            size = getattr(proc, "size", None) or {}
            short = int(
                size.get("shortest_edge") or min(size.get("height", 640), size.get("width", 640))
            )
        except (OSError, ValueError):
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


def load_segmenter(
    name: str | Path | None = DEFAULT_SEGFORMER,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Any:
    """Create a segmentation backend from a name.

    Args:
        name: ``"none"`` (or ``None``), ``"segformer"`` (the B5 ADE 640 model), ``"mask2former"``
            (Swin-L ADE semantic), any SegFormer/Mask2Former hub id or local folder, or
            ``"mmseg:<config.py>[:<checkpoint.pth>]"``.
        device, dtype: where and in what precision to run.

    Returns:
        a callable ``images -> labels`` with a ``name`` attribute.
    """
    if name is None or str(name).lower() == "none":
        return NoSegmenter()
    text = str(name)
    if text.startswith("mmseg:"):
        parts = text.split(":", 2)
        return MMSegSegmenter(parts[1], parts[2] if len(parts) > 2 else None, str(device or "cpu"))
    alias = {"segformer": DEFAULT_SEGFORMER, "mask2former": DEFAULT_MASK2FORMER}
    return TransformersSegmenter.from_pretrained(alias.get(text.lower(), text), device, dtype)


def tiny_segformer_segmenter(seed: int = 0, short_side: int = 64) -> TransformersSegmenter:
    """A randomly initialised two-stage SegFormer with 150 labels, for tests and CPU demos.

    The weights are drawn inside ``torch.random.fork_rng`` so the caller's RNG state is untouched.
    """
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    config = SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 1],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        num_labels=len(ADE20K_CLASSES),
        id2label=dict(enumerate(ADE20K_CLASSES)),
        label2id={c: i for i, c in enumerate(ADE20K_CLASSES)},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SegformerForSemanticSegmentation(config)
    return TransformersSegmenter(
        model,
        short_side=short_side,
        tile=max(2 * short_side, 128),
        overlap=16,
        name="tiny-segformer",
    )
