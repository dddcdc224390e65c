"""Stage 3: DeSRA-style artifact detector.

The detector compares a generated image (diffusion / GAN output) with a faithful reference
(the prior's output) and flags regions whose local contrast differs too much, with a tolerance
that depends on the semantic class (textured classes may legitimately differ more).

Reference mode reproduces DeSRA's detector (Xie et al., "DeSRA: Detect and Delete the Artifacts
of GAN-based Real-World Super-Resolution Models", ICML 2023, arXiv:2307.02457; public code
TencentARC/DeSRA, ``scripts/artifact_detection.py``) step by step:

1. ``c`` = SSIM contrast term (11x11 Gaussian, sigma 1.5, ``C = (0.03*255)^2``), channel mean,
   valid mode (5 px cropped per side), float64, variances clamped at 0.
2. ADE20K labels of the generated image (or user-supplied ``labels``), cropped alike.
3. ``c' = clip(c * w[label], 0, 1)``; candidates ``c' < contrast_threshold``.
4. erode 5x5 once, dilate 5x5 three times (OpenCV default borders), fill holes (3x3).
5. keep 8-connected components with area ``> threshold``; zero-pad 5 px back to full size.

Improved mode (opt-in, ``mode="improved"``; tuned values in the ``improved`` parameter set)
changes three things:

* similarity: at each scale sigma in ``scales`` (1.5 and 3) the contrast term is multiplied by
  SSIM's structure (correlation) term, and the minimum over scales is used. The structure term
  catches wrong patterns with the *same* local contrast (periodic textures, invented strokes)
  that the contrast term cannot see; its larger stabiliser (``structure_constant``) keeps
  compression and sensor noise in low-contrast areas from counting. Maps are computed at full
  size with reflect borders, so artifacts touching the border are found too.
* hysteresis: pixels below ``contrast_threshold`` seed regions that grow into connected pixels
  below ``grow_threshold`` -- the region follows the artifact instead of the 11x11 blur.
* a light opening (3x3) instead of DeSRA's net 4-px dilation, and a smaller area threshold.

On planted artifacts in real photos (``benchmarks/detector_iou.py``: 8 skimage photos x 3
regions, 256 px, no segmentation) the mean IoU rises from 0.48 (reference) to 0.78, with no
pixel flagged on clean noisy / JPEG pairs by either mode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.utils import logging
from scipy import ndimage

from .morphology import connected_components, dilate, erode, fill_holes, remove_small
from .similarity import contrast_similarity, contrast_structure_similarity, window_for_sigma
from .tables import ADE20K_CLASSES, ClassTable, load_class_table, load_param_set

logger = logging.get_logger(__name__)

__all__ = ["ArtifactDetector", "ArtifactResult", "DetectorConfig", "Region"]

#: Image size DeSRA's 4000 px area threshold was tuned for. DeSRA evaluates on 480x480 crops
#: (the DIV2K sub-image size of BasicSR's data preparation, which its x4 GAN-SR test patches
#: follow), so 4000 px is 1.74% of the image area.
REFERENCE_SIZE = (480, 480)
DEFAULT_AREA_FRACTION = 4000 / (REFERENCE_SIZE[0] * REFERENCE_SIZE[1])

_MODES = ("reference", "improved")
_SEGMENT_IMAGES = ("generated", "reference")


@dataclass
class DetectorConfig:
    """Parameters of :class:`ArtifactDetector`; defaults are DeSRA's reference settings.

    Args:
        mode (`str`): ``"reference"`` (DeSRA, bit-compatible) or ``"improved"``.
        contrast_threshold (`float`): a pixel is a candidate where the class-weighted similarity
            ``clip(c * w, 0, 1)`` is below this (0.7).
        area_threshold (`float`): minimum component area as a fraction of the image area
            (strict ``>``), used when ``area_threshold_px`` is `None`: the image-relative
            variant. ``4000 / (480*480) = 0.01736`` is DeSRA's 4000 px on the 480x480 images
            it was tuned on, scaled with ``H*W`` (52,000 px on a 2000x1500 image).
        area_threshold_px (`float`, *optional*, defaults to 4000): absolute threshold in
            pixels, DeSRA's own rule; `None` switches to the relative ``area_threshold``.
        class_weights (`str` or `Mapping[str, float]`): class table name (``"ade20k-desra"``,
            ``"uniform"``), YAML path, or ``{ADE20K class name: weight}``.
        segmenter (`str`): segmentation backend used when no ``labels`` are given: a SegFormer
            hub id or folder, ``"mask2former"`` or a Mask2Former id, ``"mmseg:<config>"``, or
            ``"none"`` (uniform weights; recorded as ``result.segmentation == "none"``).
        segment (`str`): which image is segmented, ``"generated"`` (DeSRA) or ``"reference"``.
        window_size, sigma, contrast_constant: SSIM window and ``C`` on the 0..255 scale.
        erode_size, erode_iterations, dilate_size, dilate_iterations: square morphology.
        fill_holes (`bool`): fill enclosed holes (3x3 structure).
        quantize (`bool`): round inputs to 8-bit levels before comparing. DeSRA reads uint8
            files, so with ``True`` the detector matches it bit for bit on 8-bit images (and on
            float images saved to 8 bits); set ``False`` to keep 16-bit / float precision.
        scales (`tuple[float]`): improved mode: Gaussian sigmas of the multi-scale similarity.
        structure_weight (`float`): improved mode: exponent of the structure (correlation) term.
        structure_constant (`float`): improved mode: stabiliser of the structure term; larger
            values ignore pattern changes in low-contrast areas (compression, sensor noise).
        grow_threshold (`float`): improved mode: candidates grow into connected pixels whose
            weighted similarity is below this (hysteresis); ``contrast_threshold`` seeds them.
    """

    mode: str = "reference"
    contrast_threshold: float = 0.7
    area_threshold: float = DEFAULT_AREA_FRACTION
    area_threshold_px: float | None = 4000.0
    class_weights: str | Mapping[str, float] = "ade20k-desra"
    segmenter: str = "nvidia/segformer-b5-finetuned-ade-640-640"
    segment: str = "generated"
    window_size: int = 11
    sigma: float = 1.5
    contrast_constant: float = (0.03 * 255) ** 2
    erode_size: int = 5
    erode_iterations: int = 1
    dilate_size: int = 5
    dilate_iterations: int = 3
    fill_holes: bool = True
    quantize: bool = True
    scales: tuple[float, ...] = (1.5, 3.0)
    structure_weight: float = 1.0
    structure_constant: float = 120.0
    grow_threshold: float = 0.85

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"mode={self.mode!r}: must be one of {_MODES}")
        if self.segment not in _SEGMENT_IMAGES:
            raise ValueError(f"segment={self.segment!r}: must be one of {_SEGMENT_IMAGES}")
        if not 0 < self.contrast_threshold <= 1:
            raise ValueError(f"contrast_threshold={self.contrast_threshold!r}: must be in (0, 1]")
        if not 0 <= self.area_threshold < 1:
            raise ValueError(f"area_threshold={self.area_threshold!r}: must be in [0, 1)")
        if self.area_threshold_px is not None and self.area_threshold_px < 0:
            raise ValueError(f"area_threshold_px={self.area_threshold_px!r}: must be >= 0")
        if self.window_size < 3 or self.window_size % 2 == 0:
            raise ValueError(f"window_size={self.window_size!r}: must be an odd integer >= 3")
        if not self.sigma > 0 or not self.contrast_constant > 0:
            raise ValueError("sigma and contrast_constant must be > 0")
        for name in ("erode_size", "dilate_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1 or v % 2 == 0:
                raise ValueError(f"{name}={v!r}: must be a positive odd integer")
        for name in ("erode_iterations", "dilate_iterations"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}={v!r}: must be an integer >= 0")
        self.scales = tuple(float(s) for s in self.scales)
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"scales={self.scales!r}: must be a non-empty list of sigmas > 0")
        if not self.structure_constant > 0:
            raise ValueError(f"structure_constant={self.structure_constant!r}: must be > 0")
        if self.structure_weight < 0:
            raise ValueError(f"structure_weight={self.structure_weight!r}: must be >= 0")
        # A grow threshold below the contrast threshold simply grows nothing (seeds are kept).
        if not 0 < self.grow_threshold <= 1:
            raise ValueError(f"grow_threshold={self.grow_threshold!r}: must be in (0, 1]")

    @classmethod
    def from_params(cls, name_or_path: str | Path, **overrides: Any) -> DetectorConfig:
        """Build a config from a parameter set in ``masks/params`` (or a YAML path).

        Args:
            name_or_path: ``"desra-default"``, ``"strict-text"``, ``"lenient-texture"``,
                ``"improved"`` or the path of a YAML file with config fields.
            **overrides: fields that replace the file's values.

        Raises:
            ValueError: on unknown keys (named) or invalid values.
        """
        data = load_param_set(name_or_path)
        data.update(overrides)
        return cls.from_dict(data, source=str(name_or_path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> DetectorConfig:
        """Build a config from a mapping, rejecting unknown keys with a clear error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"{source}: unknown detector parameters {unknown}; allowed: {sorted(names)}"
            )
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML/JSON serialisable) of the parameters."""
        d = dataclasses.asdict(self)
        d["scales"] = list(self.scales)
        if isinstance(self.class_weights, Mapping):
            d["class_weights"] = dict(self.class_weights)
        return d

    def threshold_px(self, height: int, width: int) -> float:
        """Area threshold in pixels for an image of ``height`` x ``width``."""
        if self.area_threshold_px is not None:
            return float(self.area_threshold_px)
        # Rounded so 480x480 gives exactly 4000 despite the binary fraction.
        return float(np.round(self.area_threshold * height * width, 6))


@dataclass
class Region:
    """One detected artifact region (a connected component of the final mask).

    Attributes:
        box (`tuple[int, int, int, int]`): ``(x0, y0, x1, y1)`` in full-image pixels, end-exclusive.
        area (`int`): pixel count.
        mean_score (`float`): mean weighted similarity inside (lower = more suspicious).
        label (`int` or `None`): dominant ADE20K label (``None`` without segmentation).
        class_name (`str` or `None`): its name.
    """

    box: tuple[int, int, int, int]
    area: int
    mean_score: float
    label: int | None = None
    class_name: str | None = None


@dataclass
class ArtifactResult:
    """Output of :class:`ArtifactDetector`.

    Attributes:
        masks (`torch.Tensor`): N,1,H,W float {0, 1}; 1 = artifact (re-restore).
        scores (`torch.Tensor`): N,1,H,W float32 class-weighted similarity ``clip(c*w, 0, 1)``
            (1 where not computed, e.g. the 5 px border of the reference mode).
        similarity (`torch.Tensor`): N,1,H,W float32 raw similarity ``c`` before weighting.
        labels (`torch.Tensor` or `None`): N,H,W long ADE20K labels used (``None`` without).
        regions (`list[list[Region]]`): per image, the kept regions.
        segmentation (`str`): segmenter used: a model id, ``"labels"`` (given) or ``"none"``.
        config (`DetectorConfig`): parameters used.
    """

    masks: torch.Tensor
    scores: torch.Tensor
    similarity: torch.Tensor
    labels: torch.Tensor | None
    regions: list[list[Region]]
    segmentation: str
    config: DetectorConfig = field(repr=False, default_factory=DetectorConfig)

    def overlay(self, image: torch.Tensor, index: int = 0, **kwargs: Any) -> Any:
        """PIL overlay of the mask on ``image`` (see :func:`.overlay.overlay`).

        Displays inline in Jupyter: ``result.overlay(generated)``.
        """
        from .overlay import overlay

        return overlay(image, self, index=index, **kwargs)


def _as_images(
    x: Any, name: str, device: torch.device | None, check_range: bool = True
) -> torch.Tensor:
    """NCHW float in [0, 1] from a tensor or anything ``raim_diffusion.images.to_tensor`` reads."""
    if isinstance(x, torch.Tensor):
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4:
            raise ValueError(f"{name}: expected an NCHW or CHW tensor, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name}: expected a float tensor in [0, 1], got dtype {x.dtype}")
        if check_range:
            from ..images import check_unit_range

            x = check_unit_range(x, name)
        if device is not None:
            x = x.to(device)
    else:
        # The edge module converts paths / PIL / numpy; imported here because the detector
        # itself only ever needs tensors.
        from ..images import to_tensor

        x = to_tensor(x, device=device)
    if x.shape[1] == 4:  # drop alpha, as the reference does
        x = x[:, :3]
    if x.shape[1] not in (1, 3):
        raise ValueError(f"{name}: expected 1, 3 or 4 channels, got {x.shape[1]}")
    return x


class ArtifactDetector:
    """DeSRA-style artifact detector (stage 3).

    Args:
        config (`DetectorConfig`, *optional*): parameters (or a parameter-set name / YAML path /
            mapping of fields); DeSRA's defaults when omitted.
        segmenter (*optional*): an object mapping N,3,H,W [0,1] images to N,H,W long ADE20K labels
            (see :mod:`raim_diffusion.artifacts.segmentation`). When omitted, ``config.segmenter``
            is loaded on first use (never when ``labels`` are passed to the call).
        refiner (*optional*): a region refiner such as
            :class:`~raim_diffusion.artifacts.sam.SamRefiner`, applied to the kept regions.
        device (`str` or `torch.device`, *optional*): where to compute; the inputs' device when
            omitted.
        **overrides: config fields overriding ``config``.

    Example:

    ```py
    >>> det = ArtifactDetector.from_params("desra-default", segmenter="none")
    >>> result = det(generated, reference)  # NCHW in [0, 1]
    >>> result.masks.shape, result.regions[0]
    ```
    """

    def __init__(
        self,
        config: DetectorConfig | Mapping[str, Any] | str | Path | None = None,
        segmenter: Any = None,
        refiner: Any = None,
        device: str | torch.device | None = None,
        **overrides: Any,
    ) -> None:
        if config is None:
            config = DetectorConfig()
        elif isinstance(config, (str, Path)):
            config = DetectorConfig.from_params(config)
        elif isinstance(config, Mapping):
            config = DetectorConfig.from_dict(config)
        elif not isinstance(config, DetectorConfig):
            raise TypeError(
                "config: expected DetectorConfig, mapping, name or path, got "
                f"{type(config).__name__}"
            )
        if isinstance(segmenter, (str, Path)):
            # A name is a config field (loaded lazily), an object is used as is.
            overrides["segmenter"] = str(segmenter)
            segmenter = None
        if overrides:
            config = DetectorConfig.from_dict({**config.to_dict(), **overrides})
        self.config = config
        self.class_table: ClassTable = load_class_table(config.class_weights)
        self._segmenter = segmenter
        self.refiner = refiner
        self.device = torch.device(device) if device is not None else None

    @classmethod
    def from_config(
        cls, config: DetectorConfig | Mapping[str, Any] | str | Path | None = None, **kwargs: Any
    ) -> ArtifactDetector:
        """Build a detector from a config, a mapping of fields, or a parameter-set name/path.

        Args:
            config: a `DetectorConfig`, a dict of its fields, a parameter-set name
                (``"desra-default"`` ...) or a YAML path; ``None`` = defaults.
            **kwargs: ``segmenter``, ``refiner``, ``device`` and config field overrides.
        """
        ctor = {k: kwargs.pop(k) for k in ("refiner", "device") if k in kwargs}
        seg = kwargs.pop("segmenter", None)
        if isinstance(seg, str):
            kwargs["segmenter"] = seg  # a name is a config field, loaded lazily
            seg = None
        if config is None:
            cfg = DetectorConfig.from_dict(kwargs)
        elif isinstance(config, DetectorConfig):
            cfg = DetectorConfig.from_dict({**config.to_dict(), **kwargs})
        elif isinstance(config, Mapping):
            cfg = DetectorConfig.from_dict({**config, **kwargs})
        elif isinstance(config, (str, Path)):
            cfg = DetectorConfig.from_params(config, **kwargs)
        else:
            raise TypeError(
                "config: expected DetectorConfig, mapping, name or path, got "
                f"{type(config).__name__}"
            )
        return cls(cfg, segmenter=seg, **ctor)

    from_params = from_config

    @property
    def segmenter(self) -> Any:
        """The segmentation backend, loaded on first access from ``config.segmenter``."""
        return self._load_segmenter(self.device)

    def _load_segmenter(self, device: torch.device | None) -> Any:
        if self._segmenter is None:
            from .segmentation import load_segmenter

            self._segmenter = load_segmenter(self.config.segmenter, device=device)
        return self._segmenter

    def replace(self, **overrides: Any) -> ArtifactDetector:
        """A detector with some config fields changed, sharing this one's segmenter (loaded or
        not), refiner and device. Nothing is loaded here.

        Args:
            **overrides: :class:`DetectorConfig` fields, e.g. ``contrast_threshold=0.6``.
        """
        config = DetectorConfig.from_dict({**self.config.to_dict(), **overrides})
        seg = self._segmenter if config.segmenter == self.config.segmenter else None
        return type(self)(config, segmenter=seg, refiner=self.refiner, device=self.device)

    def to(self, device: str | torch.device) -> ArtifactDetector:
        """Compute on ``device`` from now on (moves a loaded segmenter / refiner too)."""
        self.device = torch.device(device)
        for part in (self._segmenter, getattr(self.refiner, "model", None)):
            if part is not None and hasattr(part, "to"):
                part.to(self.device)
        return self

    # ------------------------------------------------------------------ stages
    def _to_scale(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64) * 255.0
        return torch.round(x).clamp_(0, 255) if self.config.quantize else x

    def similarity(self, generated: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Similarity map ``c`` (N,1,H',W' float64) on [0,1] images; H' = H-10 in reference mode."""
        cfg = self.config
        g, r = self._to_scale(generated), self._to_scale(reference)
        if cfg.mode == "reference":
            return contrast_similarity(
                g, r, cfg.window_size, cfg.sigma, cfg.contrast_constant, padding="valid"
            )
        return self._scale_maps(g, r).amin(dim=0)

    def _scale_maps(self, g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Improved mode: S,N,1,H,W similarity per scale (scales in ascending sigma)."""
        cfg = self.config
        sims = []
        for s in sorted(cfg.scales):
            size = window_for_sigma(s)
            if cfg.structure_weight > 0:
                c = contrast_structure_similarity(
                    g, r, size, s, cfg.contrast_constant, cfg.structure_constant,
                    cfg.structure_weight, padding="reflect",
                )  # fmt: skip
            else:
                c = contrast_similarity(g, r, size, s, cfg.contrast_constant, padding="reflect")
            sims.append(c)
        return torch.stack(sims)

    def _labels(
        self, generated: torch.Tensor, reference: torch.Tensor, labels: Any
    ) -> tuple[torch.Tensor | None, str]:
        n, _, h, w = generated.shape
        if labels is not None:
            lab = torch.as_tensor(
                np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels
            )
            if lab.ndim == 2:
                lab = lab.unsqueeze(0)
            if lab.ndim == 4 and lab.shape[1] == 1:
                lab = lab[:, 0]
            if tuple(lab.shape) != (n, h, w):
                raise ValueError(
                    f"labels: expected shape {(n, h, w)} (N,H,W at image size), "
                    f"got {tuple(lab.shape)}"
                )
            if lab.is_floating_point() or lab.dtype == torch.bool:
                raise TypeError(f"labels: expected an integer label map, got dtype {lab.dtype}")
            lab = lab.long()
            if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= len(ADE20K_CLASSES)):
                raise ValueError(
                    "labels: values must be ADE20K ids 0..149, got "
                    f"[{int(lab.min())}, {int(lab.max())}]"
                )
            return lab.to(generated.device), "labels"
        if (
            isinstance(self.config.segmenter, str)
            and self.config.segmenter == "none"
            and (self._segmenter is None)
        ):
            return None, "none"
        seg = self._load_segmenter(self.device or generated.device)
        name = getattr(seg, "name", type(seg).__name__)
        if name == "none":
            return None, "none"
        src = generated if self.config.segment == "generated" else reference
        with torch.no_grad():
            lab = seg(src)
        if tuple(lab.shape) != (n, h, w):
            raise ValueError(
                f"segmenter {name!r} returned shape {tuple(lab.shape)}, expected {(n, h, w)}"
            )
        return lab.long().to(generated.device), str(name)

    @torch.no_grad()
    def __call__(
        self, generated: Any, reference: Any, labels: Any = None, *, check_range: bool = True
    ) -> ArtifactResult:
        """Detect artifacts of ``generated`` relative to ``reference``.

        Args:
            generated: N,C,H,W (or C,H,W) float tensor in [0, 1], or anything
                ``raim_diffusion.images.to_tensor`` reads (paths, PIL, numpy).
            reference: the faithful image, same shape.
            labels (*optional*): N,H,W (or H,W) integer ADE20K label map (0..149) at image size;
                replaces the segmenter.
            check_range (`bool`, defaults to `True`): refuse tensors with NaN, inf or values
                outside [0, 1] (a NaN image would otherwise read as "no artifacts"); off for
                callers that checked once already (the pipeline).

        Returns:
            `ArtifactResult`
        """
        cfg = self.config
        gen = _as_images(generated, "generated", self.device, check_range)
        ref = _as_images(reference, "reference", gen.device, check_range)
        if gen.shape != ref.shape:
            raise ValueError(
                f"generated and reference must have the same shape, got {tuple(gen.shape)} "
                f"and {tuple(ref.shape)}"
            )
        n, _, h, w = gen.shape
        if cfg.mode == "reference":
            min_side = cfg.window_size + 1
        else:  # reflect padding needs more pixels than the largest window's radius
            min_side = max(window_for_sigma(s) for s in cfg.scales) // 2 + 1
        if min(h, w) < min_side:
            # Nothing can be measured on a thumbnail: report "no artifact" instead of failing
            # a whole restoration (the reference code would crash here).
            logger.warning(
                f"images of size {h}x{w} are smaller than the detector's window "
                f"({min_side}px): returning empty masks"
            )
            ones = torch.ones((n, 1, h, w), dtype=torch.float32, device=gen.device)
            return ArtifactResult(
                masks=torch.zeros_like(ones),
                scores=ones,
                similarity=ones.clone(),
                labels=None,
                regions=[[] for _ in range(n)],
                segmentation="none",
                config=cfg,
            )
        lab, seg_name = self._labels(gen, ref, labels)

        c = self.similarity(gen, ref)
        pad = (h - c.shape[-2]) // 2  # 5 in reference mode, 0 in improved mode
        ch, cw = c.shape[-2:]
        if lab is not None:
            table = torch.tensor(self.class_table.as_list(), dtype=torch.float64, device=c.device)
            weights = table[lab[:, pad : pad + ch, pad : pad + cw]].unsqueeze(1)
        else:
            weights = torch.ones_like(c)
        score = (c * weights).clamp_(0.0, 1.0)

        cand = (score < cfg.contrast_threshold).to(torch.float32)
        if cfg.mode == "improved":
            cand = self._grow(cand, score < cfg.grow_threshold)
        cand = erode(cand, cfg.erode_size, cfg.erode_iterations)
        cand = dilate(cand, cfg.dilate_size, cfg.dilate_iterations)

        thr = cfg.threshold_px(h, w)
        cand_np = cand[:, 0].bool().cpu().numpy()
        masks_np = np.zeros((n, h, w), dtype=bool)
        for i in range(n):
            m = fill_holes(cand_np[i]) if cfg.fill_holes else cand_np[i]
            kept, _ = remove_small(m, thr)
            masks_np[i, pad : pad + ch, pad : pad + cw] = kept

        full_score = torch.ones((n, 1, h, w), dtype=torch.float32, device=gen.device)
        full_score[..., pad : pad + ch, pad : pad + cw] = score.to(torch.float32)
        full_sim = torch.ones_like(full_score)
        full_sim[..., pad : pad + ch, pad : pad + cw] = c.to(torch.float32)
        masks = torch.from_numpy(masks_np).to(gen.device, torch.float32).unsqueeze(1)

        if self.refiner is not None and masks_np.any():
            rgb = gen.expand(-1, 3, -1, -1) if gen.shape[1] == 1 else gen
            masks = self.refiner(rgb, masks).to(gen.device, torch.float32)

        regions = self.regions(masks, full_score, lab)
        return ArtifactResult(
            masks=masks,
            scores=full_score,
            similarity=full_sim,
            labels=lab,
            regions=regions,
            segmentation=seg_name,
            config=cfg,
        )

    @staticmethod
    def _grow(seeds: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Hysteresis: keep connected components of ``allowed`` that contain a seed pixel."""
        allowed_np = allowed[:, 0].cpu().numpy()
        seeds_np = seeds[:, 0].bool().cpu().numpy()
        out = np.zeros_like(seeds_np)
        for i in range(seeds_np.shape[0]):
            comps = connected_components(allowed_np[i] | seeds_np[i])
            hit = np.zeros(comps.count + 1, dtype=bool)
            hit[np.unique(comps.labels[seeds_np[i]])] = True
            hit[0] = False
            out[i] = hit[comps.labels]
        return torch.from_numpy(out).to(seeds.device, torch.float32).unsqueeze(1)

    def regions(
        self, masks: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor | None
    ) -> list[list[Region]]:
        """Describe each 8-connected component of ``masks`` (N,1,H,W) as a :class:`Region`."""
        out: list[list[Region]] = []
        masks_np = masks[:, 0].cpu().numpy() > 0.5
        scores_np = scores[:, 0].cpu().numpy()
        labels_np = labels.cpu().numpy() if labels is not None else None
        for i in range(masks_np.shape[0]):
            comps = connected_components(masks_np[i])
            regs: list[Region] = []
            if comps.count:
                idx = np.arange(1, comps.count + 1)
                means = ndimage.mean(scores_np[i], comps.labels, idx)
                slices = ndimage.find_objects(comps.labels)
                for k, sl in enumerate(slices):
                    lab_id = name = None
                    if labels_np is not None:
                        inside = labels_np[i][sl][comps.labels[sl] == k + 1]
                        lab_id = int(np.bincount(inside, minlength=len(ADE20K_CLASSES)).argmax())
                        name = ADE20K_CLASSES[lab_id]
                    regs.append(
                        Region(
                            box=(sl[1].start, sl[0].start, sl[1].stop, sl[0].stop),
                            area=int(comps.areas[k + 1]),
                            mean_score=float(means[k]),
                            label=lab_id,
                            class_name=name,
                        )
                    )
            out.append(regs)
        return out

    def __repr__(self) -> str:
        return f"ArtifactDetector(mode={self.config.mode!r}, segmenter={self.config.segmenter!r})"


def build_detector(
    params: DetectorConfig | Mapping[str, Any] | str | Path | None = "desra-default",
    *,
    segmenter: Any = None,
    sam: str | Path | None = None,
    sam_type: str = "vit_h",
    device: torch.device | str | None = None,
    load: bool = True,
    **overrides: Any,
) -> ArtifactDetector:
    """The one factory of stage-3 detectors (the pipeline, ``raim restore`` and ``raim mask``).

    Args:
        params: a parameter set name (``"desra-default"``, ``"improved"``, ...), a YAML path, a
            `DetectorConfig` or a mapping of its fields.
        segmenter (*optional*): a segmentation backend object, or its name (a transformers model
            id or folder, ``"mmseg:CONFIG:CHECKPOINT"``, or ``"none"`` for uniform class
            weights, which the result records). `None` keeps the parameter set's own.
        sam (`str` or `Path`, *optional*): SAM checkpoint for boundary refinement.
        sam_type (`str`, defaults to `"vit_h"`): its architecture (``vit_h``, ``vit_l``, ``vit_b``).
        device (*optional*): where the segmenter and SAM run.
        load (`bool`, defaults to `True`): load the segmentation model now, so that a missing
            model fails once, before any image, instead of on every image.
        **overrides: `DetectorConfig` fields (``contrast_threshold``, ``mode``, ...).

    Returns:
        `ArtifactDetector`
    """
    refiner = None
    if sam is not None:
        from .sam import SamRefiner

        refiner = SamRefiner.from_checkpoint(sam, sam_type, device=device)
    kwargs: dict[str, Any] = dict(overrides)
    if segmenter is not None:
        kwargs["segmenter"] = segmenter
    detector = ArtifactDetector.from_config(params, refiner=refiner, device=device, **kwargs)
    if load:
        detector.segmenter  # noqa: B018 - loads the backend
    return detector
