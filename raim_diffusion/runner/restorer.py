"""Build the per-image restore function of a batch job from a run config.

Models load once; each call restores one image through [`RaimPipeline`] with its own seed.
There is one stage-1 path: a prior-only run is a pipeline that holds only the prior
(``stages=("prior",)``), so every config key reaches the same code whatever the stages.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from raim_diffusion.resources import cache_dir
from raim_diffusion.runner.batch import Job, Restored, image_seed
from raim_diffusion.runner.config import TINY_PREFIX, call_kwargs, resolved_call_kwargs

__all__ = ["Restorer", "build_restorer", "resolve_dtype", "resolve_model"]

# Bump when the tiny pipelines that testing.py writes change shape.
_TINY_FORMAT = 2


def resolve_dtype(name: str | None, device: str) -> torch.dtype:
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
    # Versioned: a folder written by an older testing.py (other vocabulary) is never reused.
    folder = cache_dir("tiny") / f"{kind}-v{_TINY_FORMAT}"
    if not (folder / "model_index.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".{kind}.{os.getpid()}.tmp"
        save_tiny_pipeline(tmp, kind)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race; its folder is just as good
            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def _load_prior(config: DictConfig, device: str, dtype: torch.dtype | None):
    from raim_diffusion.prior import load_prior

    names = config.prior.name
    names = [names] if isinstance(names, str) else list(names)
    weights = config.prior.weights
    weights = None if weights is None else list(weights)
    if any(str(n).startswith(TINY_PREFIX) for n in names):
        from raim_diffusion.prior import PriorModel
        from raim_diffusion.testing import tiny_prior

        # "tiny:prior-x4": a tiny random compact network of that scale, one per member.
        members = [
            tiny_prior(int(str(n).rpartition("-x")[2] or 2), seed=i).descriptors[0]
            for i, n in enumerate(names)
        ]
        return PriorModel.from_spandrel(members, weights).to(device)
    names = names[0] if len(names) == 1 else names
    return load_prior(names, device=device, dtype=dtype, tile=config.prior.tile, weights=weights)


def _load_fusion(name: str | None, architecture: str, device: str):
    """The fusion network of a config: a saved folder holding the registered ``architecture``,
    ``tiny:<architecture>`` (random, for demos), or `None` for the pyramid blend."""
    if name is None:
        return None
    from raim_diffusion.fusion import FUSION_ARCHITECTURES, load_fusion

    if architecture not in FUSION_ARCHITECTURES:
        raise ValueError(f"fuse.architecture={architecture!r} is not a registered fusion "
                         f"architecture; known: {', '.join(FUSION_ARCHITECTURES)}")
    if name.startswith(TINY_PREFIX):
        return FUSION_ARCHITECTURES[architecture].from_preset("tiny").to(device).eval()
    net = load_fusion(name)
    if type(net).__name__ != architecture:
        raise ValueError(f"fuse.fusion {name} holds a {type(net).__name__}, but the config "
                         f"expects fuse.architecture={architecture}")
    return net.to(device).eval()


class Restorer:
    """Callable ``(image, job) -> Restored`` for [`~raim_diffusion.runner.batch.run_jobs`].

    Args:
        config (`DictConfig`): A loaded, validated run config.
        device (`str`): Torch device for every model.
    """

    def __init__(self, config: DictConfig, device: str) -> None:
        from raim_diffusion.pipeline import RaimPipeline

        self.config, self.device = config, device
        self.stages = tuple(config.stages)
        self.dtype = resolve_dtype(config.dtype, device)
        prior_dtype = None if config.dtype == "auto" else self.dtype
        prior = _load_prior(config, device, prior_dtype) if "prior" in self.stages else None
        self.record: dict[str, Any] = {"stages": list(self.stages), "tiny": bool(config.tiny)}
        if "generate" in self.stages:
            pipe = self._load_generator(prior)
        else:
            pipe = RaimPipeline(prior=prior)
        if "fuse" in self.stages:
            fuse = config.fuse
            pipe.register_modules(fusion=_load_fusion(fuse.fusion, fuse.architecture, device))
        self.pipe = pipe.to(device)
        self.detector = None
        if "detect" in self.stages:
            from raim_diffusion.artifacts import build_detector

            det = config.detect
            # Loads the segmentation model now: a missing one stops the job before the first
            # image instead of failing every image.
            self.detector = build_detector(
                det.params, segmenter=det.segmenter or "none", sam=det.sam,
                sam_type=det.sam_type, device=device,
            )
            self.record["detector"] = self.detector.config.to_dict()
        self.kwargs = call_kwargs(config)
        self.record["call"] = resolved_call_kwargs(config)
        self.show_progress(False)  # the batch job shows one bar over the images

    def _load_generator(self, prior):
        from raim_diffusion.pipeline import RaimPipeline

        gen = self.config.generate
        controlnet = gen.controlnet
        if controlnet is not None and controlnet.startswith(TINY_PREFIX):
            from raim_diffusion.testing import tiny_controlnet

            controlnet = tiny_controlnet("sdxl" if "sdxl" in gen.model else "sd15")
        supir = gen.supir
        tiny_supir = supir is not None and supir.startswith(TINY_PREFIX)
        pipe = RaimPipeline.from_pretrained(
            resolve_model(gen.model), prior=prior, controlnet=controlnet, torch_dtype=self.dtype,
            supir=None if tiny_supir else supir,
        )
        if tiny_supir:
            from raim_diffusion.testing import tiny_supir_state_dict

            # "tiny:supir": random SUPIR weights for the tiny SDXL UNet, in SUPIR's checkpoint
            # layout, through the same strict loading as a real checkpoint.
            pipe.load_supir(tiny_supir_state_dict(pipe.unet, pipe.vae))
        if gen.scheduler:
            import diffusers

            cls = getattr(diffusers, gen.scheduler, None)
            if cls is None or not hasattr(cls, "from_config"):
                raise ValueError(f"generate.scheduler {gen.scheduler!r} is not a diffusers "
                                 "scheduler class")
            pipe.scheduler = cls.from_config(pipe.scheduler.config)
        return pipe

    def show_progress(self, enabled: bool) -> None:
        """Show the denoising steps of each image (a second bar below the batch's own)."""
        self.pipe.set_progress_bar_config(disable=not enabled, leave=False, position=1)

    def __call__(self, image, job: Job) -> Restored:
        x = image.tensor.to(self.device)
        generator = torch.Generator("cpu").manual_seed(image_seed(self.config.seed, job))
        out = self.pipe(
            x, output_type="pt", generator=generator, stages=self.stages,
            detector=self.detector, **self.kwargs,
        )
        inter: dict[str, torch.Tensor] = {}
        if self.config.save_intermediates:
            for name, value in (("prior", out.prior_images), ("generated", out.generated_images),
                                ("mask", out.masks)):
                if value is not None and (name != "generated" or "generate" in self.stages):
                    inter[name] = value[:1].float().cpu()
            if out.artifacts is not None:
                from raim_diffusion.artifacts.overlay import overlay
                from raim_diffusion.images import to_tensor

                inter["overlay"] = to_tensor(overlay(out.generated_images[:1], out.artifacts))
        return Restored(out.images[:1].float().cpu(), inter)


def build_restorer(config: DictConfig, device: str) -> Restorer:
    """Load every model ``config`` needs on ``device`` and return the per-image function."""
    if not isinstance(config, DictConfig):
        config = OmegaConf.create(config)
    return Restorer(config, device)
