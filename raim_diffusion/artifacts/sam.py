"""Optional SAM refinement of detected artifact regions (extra ``sam``: ``segment-anything``).

DeSRA's mask is a dilated blob that follows the 11x11 window, not the object. For every
detected region SAM is prompted with the region's box and a few interior points, and the
region is replaced by SAM's mask -- clipped to a dilated *envelope* of the original region, so
a small region can never grow into a whole wall or the sky. Regions where SAM returns (almost)
nothing inside the envelope keep their original shape.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.utils import logging
from scipy import ndimage

from ..errors import InvalidWeightsError
from ..hub import extract_state_dict, missing_file_error, read_weights_file

logger = logging.get_logger(__name__)

__all__ = ["SamRefiner", "build_sam"]

_KIND = "SAM checkpoint"
_RELEASES = "https://github.com/facebookresearch/segment-anything#model-checkpoints"

_SAM_CONFIGS = {
    # model type: (embed dim, depth, heads, global attention blocks)
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
}


def _import_sam() -> Any:
    try:
        import segment_anything  # noqa: PLC0415 - optional extra
    except ImportError as exc:
        raise ImportError(
            "SAM refinement needs the 'segment-anything' package: pip install 'raim-diffusion[sam]'"
        ) from exc
    return segment_anything


def build_sam(
    model_type: str = "vit_h",
    *,
    image_size: int = 1024,
    patch_size: int = 16,
    prompt_dim: int = 256,
    encoder: tuple[int, int, int, tuple[int, ...]] | None = None,
    decoder_mlp_dim: int = 2048,
    decoder_heads: int = 8,
    iou_hidden_dim: int = 256,
    window_size: int = 14,
) -> torch.nn.Module:
    """Build an (untrained) ``segment_anything.modeling.Sam`` of a given type or custom size.

    Args:
        model_type (`str`): ``"vit_h"``, ``"vit_l"`` or ``"vit_b"`` (the released sizes).
        encoder: ``(embed_dim, depth, heads, global_attn_indexes)`` overriding the type's.
        image_size, patch_size, prompt_dim, decoder_mlp_dim, decoder_heads, iou_hidden_dim,
        window_size: architecture sizes (the released models' defaults).
    """
    _import_sam()
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    if encoder is None:
        if model_type not in _SAM_CONFIGS:
            raise ValueError(f"model_type={model_type!r}: must be one of {sorted(_SAM_CONFIGS)}")
        encoder = _SAM_CONFIGS[model_type]
    embed, depth, heads, global_idx = encoder
    grid = image_size // patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=depth,
            embed_dim=embed,
            img_size=image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=heads,
            patch_size=patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(global_idx),
            window_size=window_size,
            out_chans=prompt_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=prompt_dim, mlp_dim=decoder_mlp_dim, num_heads=decoder_heads
            ),
            transformer_dim=prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=iou_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


class SamRefiner:
    """Snap detected regions to object boundaries with SAM, inside a dilated envelope.

    Args:
        model: a ``segment_anything`` ``Sam`` model (see :meth:`from_checkpoint`, and
            :func:`raim_diffusion.testing.tiny_sam` for tests).
        envelope (`int`): the refined region stays within the original region dilated by this
            many pixels (square); 0 = SAM may only shrink regions.
        points (`int`): interior positive points per region (deepest points of the region).
        min_keep (`float`): if SAM's clipped mask covers less than this fraction of the original
            region, the original region is kept (SAM found no object there).
    """

    def __init__(
        self, model: torch.nn.Module, envelope: int = 16, points: int = 3, min_keep: float = 0.2
    ) -> None:
        if envelope < 0:
            raise ValueError(f"envelope={envelope!r}: must be >= 0 pixels")
        if points < 0:
            raise ValueError(f"points={points!r}: must be >= 0")
        if not 0 <= min_keep <= 1:
            raise ValueError(f"min_keep={min_keep!r}: must be in [0, 1]")
        from segment_anything import SamPredictor

        self.model = model.eval()
        self.predictor = SamPredictor(self.model)
        self.envelope = envelope
        self.points = points
        self.min_keep = min_keep

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        model_type: str | torch.nn.Module = "vit_h",
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> SamRefiner:
        """Load released SAM weights (``sam_vit_h_4b8939.pth`` ...) safely.

        ``.safetensors`` files are read with safetensors, ``.pth`` files with
        ``torch.load(weights_only=True)`` (never arbitrary pickles). A fine-tuning checkpoint
        that keeps the weights under ``model``, ``state_dict``, ... is accepted too.

        Args:
            path: the checkpoint file.
            model_type: ``"vit_h"``, ``"vit_l"`` or ``"vit_b"`` (must match the file), or an
                already built ``Sam`` skeleton of the right size (custom / tiny models).
            device: where to run.
            **kwargs: :class:`SamRefiner` options.

        Raises:
            MissingWeightsError: the file does not exist.
            InvalidWeightsError: the file is empty, truncated, damaged, a pickle of Python
                objects, or not the weights of a SAM model of ``model_type``.
        """
        path = Path(path)
        if not path.exists():
            raise missing_file_error(
                _KIND,
                path,
                "download sam_vit_h_4b8939.pth (or the vit_l / vit_b file) from "
                f"{_RELEASES} and pass its path",
            )
        state = extract_state_dict(read_weights_file(path, kind=_KIND), path, kind=_KIND)
        model = build_sam(model_type) if isinstance(model_type, str) else model_type
        expected = model.state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        reshaped = [
            k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
        ]
        if missing or unexpected or reshaped:
            size = f"a {model_type}" if isinstance(model_type, str) else "this"
            counts = ", ".join(
                f"{len(keys)} {what} (e.g. {keys[0]!r})"
                for keys, what in (
                    (missing, "missing"),
                    (unexpected, "unexpected"),
                    (reshaped, "of another shape"),
                )
                if keys
            )
            raise InvalidWeightsError(
                f"{_KIND} {path}: not the weights of {size} SAM model ({counts}); check "
                "detect.sam_type (vit_h, vit_l or vit_b) against the file"
            )
        model.load_state_dict(state)
        if device is not None:
            model = model.to(device)
        return cls(model, **kwargs)

    def _interior_points(self, region: np.ndarray) -> np.ndarray:
        """Up to ``points`` well-separated deepest points (x, y) of the region."""
        dist = ndimage.distance_transform_edt(region)
        pts = []
        for _ in range(self.points):
            y, x = np.unravel_index(int(dist.argmax()), dist.shape)
            if dist[y, x] <= 0:
                break
            pts.append((x, y))
            # Suppress a disc around the chosen point so the next one lies elsewhere.
            r = max(dist[y, x], 2.0)
            yy, xx = np.ogrid[: dist.shape[0], : dist.shape[1]]
            dist[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = 0
        return np.asarray(pts, dtype=np.float32).reshape(-1, 2)

    @torch.no_grad()
    def refine_image(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Refine one H,W bool ``mask`` on an H,W,3 uint8 RGB ``image``; returns H,W bool."""
        labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
        if count == 0:
            return mask.copy()
        self.predictor.set_image(image, image_format="RGB")
        out = np.zeros_like(mask, dtype=bool)
        size = 2 * self.envelope + 1
        for k, sl in enumerate(ndimage.find_objects(labels), start=1):
            region = labels == k
            envelope = (
                ndimage.binary_dilation(region, structure=np.ones((size, size), bool))
                if self.envelope
                else region
            )
            box = np.array([sl[1].start, sl[0].start, sl[1].stop - 1, sl[0].stop - 1], np.float32)
            pts = self._interior_points(region)
            masks, scores, _ = self.predictor.predict(
                point_coords=pts if len(pts) else None,
                point_labels=np.ones(len(pts), np.int64) if len(pts) else None,
                box=box,
                multimask_output=True,
            )
            best = masks[int(np.argmax(scores))].astype(bool) & envelope
            if best.sum() < self.min_keep * region.sum():
                best = region
            out |= best
        return out

    def __call__(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Refine N,1,H,W masks on N,3,H,W [0,1] images; returns N,1,H,W float {0,1} (CPU)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected N,3,H,W, got {tuple(images.shape)}")
        if masks.shape != (images.shape[0], 1, *images.shape[-2:]):
            raise ValueError(
                f"masks: expected shape N,1,H,W matching images, got {tuple(masks.shape)}"
            )
        imgs = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        ms = masks[:, 0].cpu().numpy() > 0.5
        refined = [self.refine_image(img, m) for img, m in zip(imgs, ms, strict=True)]
        return torch.from_numpy(np.stack(refined)).float().unsqueeze(1)
