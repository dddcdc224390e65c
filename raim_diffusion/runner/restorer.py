"""Build the per-image restore function of a batch job from a [`~raim_diffusion.runner.config.RunConfig`].

Models load once; each call restores one image with its own seed. A prior-only run never loads
diffusers' pipeline; other runs go through [`RaimPipeline`], with the detector and fusion
network of the config.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from raim_diffusion.images import LoadedImage
from raim_diffusion.resources import cache_dir
from raim_diffusion.runner.batch import Job, Restored, image_seed
from raim_diffusion.runner.config import TINY_PREFIX, call_kwargs, resolved_call_kwargs


def resolve_dtype(name: str | None, device: str) -> torch.dtype | None:
    """``auto`` (or `None`): bfloat16 on CUDA where supported, else float16 there, float32 on
    the CPU; otherwise the named dtype."""
    if name in (None, "auto"):
        if torch.device(device).type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"dtype must be one of auto, {', '.join(table)}; got {name!r}")
    return table[name]


def resolve_model(name: str) -> str:
    """A diffusers repo id or folder; ``tiny:sd15`` / ``tiny:sd2`` / ``tiny:sdxl`` name tiny
    random pipelines, written once to the cache (atomically) and reused."""
    if not name.startswith(TINY_PREFIX):
        return name
    from raim_diffusion.testing import save_tiny_pipeline

    kind = name[len(TINY_PREFIX):]
    folder = cache_dir("tiny") / kind
    if not (folder / "model_index.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".{kind}.{os.getpid()}.tmp"
        save_tiny_pipeline(tmp, kind)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race; its folder is just as good
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def _build_fusion(name: str | None, device: str):
    """The fusion network of a config: a saved folder, ``tiny:fusion`` (random, for demos), or
    `None` for the pyramid-blend fallback."""
    if name is None:
        return None
    from raim_diffusion.fusion import FusionNet

    if name.startswith(TINY_PREFIX):
        return FusionNet.from_preset("tiny").to(device).eval()
    return FusionNet.from_pretrained(name).to(device).eval()


class Restorer:
    """Callable ``(image, job) -> Restored`` for [`~raim_diffusion.runner.batch.run_jobs`].

    Args:
        config (`DictConfig`): A loaded [`~raim_diffusion.runner.config.RunConfig`].
        device (`str`): Torch device for every model.
        dtype (`str`, *optional*): ``auto``, ``float32``, ``float16`` or ``bfloat16``.
    """

    def __init__(self, config: DictConfig, device: str, dtype: str | None = "auto") -> None:
        from raim_diffusion.prior import load_prior

        self.config, self.device = config, device
        self.stages = tuple(config.stages)
        self.dtype = resolve_dtype(dtype, device)
        names = config.prior.name
        names = names if isinstance(names, str) else list(names)
        self.prior = None
        if "prior" in self.stages:
            self.prior = load_prior(
                names, device=device,
                dtype=None if dtype in (None, "auto") else self.dtype,
                tile=config.prior.tile,
                weights=None if config.prior.weights is None else list(config.prior.weights),
            )
        self.pipe = None
        self.record: dict[str, Any] = {"stages": list(self.stages)}
        if "generate" in self.stages or "detect" in self.stages or "fuse" in self.stages:
            self._build_pipeline()

    def _build_pipeline(self) -> None:
        from raim_diffusion.pipeline import RaimPipeline

        gen = self.config.generate
        controlnet = gen.controlnet
        if controlnet is not None and controlnet.startswith(TINY_PREFIX):
            from raim_diffusion.testing import tiny_controlnet

            kind = "sdxl" if "sdxl" in gen.model else "sd15"
            controlnet = tiny_controlnet(kind)
        pipe = RaimPipeline.from_pretrained(
            resolve_model(gen.model), prior=self.prior, controlnet=controlnet,
            torch_dtype=self.dtype,
        )
        if gen.scheduler:
            import diffusers

            cls = getattr(diffusers, gen.scheduler, None)
            if cls is None or not hasattr(cls, "from_config"):
                raise ValueError(f"generate.scheduler {gen.scheduler!r} is not a diffusers "
                                 "scheduler class")
            pipe.scheduler = cls.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)  # the batch job shows one bar over images
        if "fuse" in self.stages:
            pipe.register_modules(fusion=_build_fusion(self.config.fuse.fusion, self.device))
        self.pipe = pipe.to(self.device)
        self.detector = None
        if "detect" in self.stages:
            from raim_diffusion.artifacts import ArtifactDetector

            det = self.config.detect
            refiner = None
            if det.sam:
                from raim_diffusion.artifacts.sam import SamRefiner

                refiner = SamRefiner.from_checkpoint(det.sam, det.sam_type, device=self.device)
            self.detector = ArtifactDetector.from_config(
                det.params, segmenter=det.segmenter or "none", refiner=refiner,
                device=self.device,
            )
            # Load the segmentation model now: a missing one must stop the job before the first
            # image, not fail every image one by one.
            self.detector.segmenter  # noqa: B018
            self.record["detector"] = self.detector.config.to_dict()
        self.kwargs = call_kwargs(gen)
        self.record["call"] = resolved_call_kwargs(gen)

    def __call__(self, image: LoadedImage, job: Job) -> Restored:
        x = image.tensor.to(self.device)
        if self.pipe is None:
            return Restored(self._prior_only(x))
        generator = torch.Generator("cpu").manual_seed(image_seed(self.config.seed, job))
        out = self.pipe(
            x, output_type="pt", generator=generator, stages=self.stages,
            detector=self.detector, **self.kwargs,
        )
        inter = {}
        if self.config.save_intermediates:
            for name, value in (("prior", out.prior_images), ("generated", out.generated_images),
                                ("mask", out.masks)):
                if value is not None:
                    inter[name] = value[:1].float().cpu()
        return Restored(out.images[:1].float().cpu(), inter)

    @torch.inference_mode()
    def _prior_only(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config.prior
        out = self.prior(x, outscale=cfg.outscale)
        if cfg.input_blend > 0:
            # MiAlgo-style: a fixed per-pixel alpha of the (antialiased) upsampled input.
            up = F.interpolate(x, size=out.shape[-2:], mode="bicubic", align_corners=False,
                               antialias=True).clamp(0, 1)
            out = (1 - cfg.input_blend) * out + cfg.input_blend * up
        return out.cpu()


def build_restorer(config: DictConfig, device: str, dtype: str | None = "auto") -> Restorer:
    """Load every model ``config`` needs on ``device`` and return the per-image function."""
    return Restorer(config, device, dtype)
