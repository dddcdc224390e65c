"""`RaimPipeline`: the four restoration stages in order, as one diffusers pipeline.

1. **prior**: a GAN/CNN restorer (any spandrel architecture) gives a faithful, plain result.
2. **generate**: SD 1.x/2.x or SDXL img2img from the prior's latent, with consistency guidance
   pulling every step's predicted clean latent towards it (optional tile ControlNet fed the
   prior's output, latent and VAE tiling for large images), then a colour fix against the prior.
3. **detect**: artifact masks (DeSRA); hook, see `RaimPipeline.detect_artifacts`.
4. **fuse**: re-restore the masked regions; hook, see `RaimPipeline.fuse_artifacts`.

The pipeline loads any standard SD/SDXL diffusers folder or hub repository and adds the extra
components; ``save_pretrained`` writes a RAIM folder (``_class_name: RaimPipeline``, the prior
included) that ``RaimPipeline.from_pretrained`` reloads.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, ControlNetModel, DiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines import pipeline_utils as _pipeline_utils
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, logging
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .artifacts import ArtifactDetector, ArtifactResult
from .artifacts.segmentation import TransformersSegmenter
from .diffusion.color import color_fix as apply_color_fix
from .diffusion.guidance import check_consistency_args, consistency_weights
from .diffusion.loop import (
    add_noise,
    auto_latent_tile,
    guided_denoise,
    img2img_timesteps,
    step_sigmas,
)
from .diffusion.vae import auto_vae_tile, decode_latents, encode_latents
from .errors import MissingWeightsError
from .fusion import FusionNet, fuse
from .images import to_numpy, to_pil, to_tensor
from .ops import crop, pad_to_multiple, resize
from .prior import PriorModel, load_prior

logger = logging.get_logger(__name__)

__all__ = [
    "DEFAULT_NEGATIVE_PROMPT",
    "DEFAULT_PROMPT",
    "RaimPipeline",
    "RaimPipelineOutput",
    "missing_weights_error",
]

# Quality prompts in the spirit of SUPIR's defaults: describe a sharp, clean photograph and push
# away from paintings, renders and the usual degradations.
DEFAULT_PROMPT = (
    "a high quality, highly detailed, sharp professional photograph, realistic natural "
    "textures, fine details, clean, in focus, 8k"
)
DEFAULT_NEGATIVE_PROMPT = (
    "painting, oil painting, illustration, drawing, art, sketch, cartoon, anime, CG, 3d render, "
    "blurry, out of focus, noisy, grainy, jpeg artifacts, compression artifacts, oversmoothed, "
    "lowres, low quality, worst quality, watermark, text, signature, deformed, distorted"
)

# diffusers renamed ``torch_dtype`` to ``dtype`` (and deprecated the old name); use whichever
# the installed version understands.
_DTYPE_KWARG = "dtype" if hasattr(_pipeline_utils, "_resolve_dtype") else "torch_dtype"
STAGES = ("prior", "generate", "detect", "fuse")
OUTPUT_TYPES = ("pil", "np", "pt")
COLOR_FIXES = ("wavelet", "adain", "none")


@dataclass
class RaimPipelineOutput(BaseOutput):
    """Output of `RaimPipeline`.

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The restored images (after all stages that ran), as PIL images, an NHWC float array or
            an NCHW float tensor in [0, 1], by ``output_type``.
        prior_images: the stage-1 results at the output size, same type.
        generated_images: the stage-2 results (colour-fixed), same type; the prior's when
            ``"generate"`` did not run.
        masks: stage-3 artifact masks (1 = re-restored), ``"L"`` PIL images, NHW1 arrays or N1HW
            tensors; `None` when no detector ran.
        artifacts (`ArtifactResult`, *optional*): the detector's full result (score maps, labels,
            regions with boxes, areas and classes); `None` when no detector ran. Not part of
            the tuple returned with ``return_dict=False``.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    prior_images: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None
    generated_images: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None
    masks: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None
    artifacts: ArtifactResult | None = None


def missing_weights_error(model: str | os.PathLike, error: BaseException) -> MissingWeightsError:
    """A `MissingWeightsError` that says which model was missing and how to provide it.

    Args:
        model (`str` or `os.PathLike`): the hub id or folder that failed to load.
        error (`BaseException`): the original loading error.

    Returns:
        `MissingWeightsError`: to be raised ``from error``.
    """
    name = str(model)
    if Path(name).exists():
        return MissingWeightsError(
            f"model {name!r}: the local folder is incomplete ({error}). Check that it holds a "
            "diffusers pipeline (model_index.json and one folder per component with its weights)."
        )
    return MissingWeightsError(
        f"model {name!r} was not found in the local Hugging Face cache and the Hub could not "
        f"provide it ({type(error).__name__}: {error}). Download it on a machine with internet "
        f"access with `huggingface-cli download {name}` and copy the cache (or set HF_HOME), or "
        "pass the path of a local folder instead."
    )


def _is_missing_weights(error: BaseException, model: str | os.PathLike) -> bool:
    # Only loading failures that mean "the files are not there"; a corrupt file or a wrong
    # config in an existing local folder must surface as it is.
    if isinstance(error, FileNotFoundError):
        return True
    if isinstance(error, (OSError, ConnectionError)):
        return not Path(str(model)).is_dir()
    return False


def _as_list(value: str | Sequence[str] | None, n: int, name: str, default: str) -> list[str]:
    if value is None:
        return [default] * n
    if isinstance(value, str):
        return [value] * n
    values = list(value)
    if len(values) != n or not all(isinstance(v, str) for v in values):
        raise ValueError(
            f"{name} must be a string or a list of {n} strings (one per image), got {value!r}"
        )
    return values


class RaimPipeline(DiffusionPipeline):
    r"""Restore real-world photos: prior → consistency-guided SD/SDXL img2img → detect → fuse.

    Args:
        vae (`AutoencoderKL`): the SD/SDXL autoencoder.
        text_encoder (`CLIPTextModel`): SD's text encoder (SDXL's first one).
        tokenizer (`CLIPTokenizer`): its tokenizer.
        unet (`UNet2DConditionModel`): the denoiser.
        scheduler (`KarrasDiffusionSchedulers`): any diffusers scheduler, ε or v prediction.
        prior (`PriorModel`, *optional*): stage-1 restorer; without it stage 1 is a bicubic resize.
        text_encoder_2 (`CLIPTextModelWithProjection`, *optional*): SDXL's second text encoder.
        tokenizer_2 (`CLIPTokenizer`, *optional*): its tokenizer.
        controlnet (`ControlNetModel`, *optional*): a tile ControlNet, fed the prior's output.
        segmenter (*optional*): stage-3 semantic segmentation (hook, wired by the artifacts stage).
        fusion (*optional*): stage-4 fusion network (hook, wired by the fusion stage).
        default_prompt (`str`, *optional*): prompt used when none is given.
        default_negative_prompt (`str`, *optional*): negative prompt used when none is given.
    """

    # Order of first use; components that are None (or not nn.Modules) are skipped by diffusers.
    model_cpu_offload_seq = (
        "prior->text_encoder->text_encoder_2->controlnet->unet->vae->segmenter->fusion"
    )
    _optional_components = [
        "prior",
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
        "controlnet",
        "segmenter",
        "fusion",
    ]
    _callback_tensor_inputs = ["latents", "z_prior", "prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel | None,
        tokenizer: CLIPTokenizer | None,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        prior: PriorModel | None = None,
        text_encoder_2: CLIPTextModelWithProjection | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        controlnet: ControlNetModel | None = None,
        segmenter: Any = None,
        fusion: Any = None,
        default_prompt: str | None = None,
        default_negative_prompt: str | None = None,
    ) -> None:
        super().__init__()
        if text_encoder is None and text_encoder_2 is None:
            raise ValueError("RaimPipeline needs text_encoder, text_encoder_2 or both")
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            prior=prior,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            controlnet=controlnet,
            segmenter=segmenter,
            fusion=fusion,
        )
        self.register_to_config(
            default_prompt=DEFAULT_PROMPT if default_prompt is None else default_prompt,
            default_negative_prompt=(
                DEFAULT_NEGATIVE_PROMPT if default_negative_prompt is None
                else default_negative_prompt
            ),
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        prior: PriorModel | str | os.PathLike | Sequence[Any] | None = None,
        controlnet: ControlNetModel | str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> RaimPipeline:
        """Load a SD 1.x/2.x/SDXL diffusers pipeline (hub id or folder) or a saved RAIM folder.

        Standard folders (``model_index.json`` written by ``StableDiffusionPipeline`` or
        ``StableDiffusionXLPipeline``) load too: their components are taken by name and the ones
        RAIM does not use (safety checker, feature extractor) are skipped.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): hub id or local folder.
            prior (*optional*): a `PriorModel`, or anything `load_prior` accepts (a built-in name
                like ``"realesrgan-x4plus"``, a weights file, a folder, a list for an ensemble).
                Overrides the prior saved in a RAIM folder.
            controlnet (*optional*): a `ControlNetModel`, or its hub id / folder.
            **kwargs: passed to `DiffusionPipeline.from_pretrained` (``torch_dtype``,
                ``variant``, ``local_files_only``, ``cache_dir``, ...).

        Returns:
            `RaimPipeline`

        Raises:
            MissingWeightsError: the pipeline, ControlNet or prior weights are neither local nor
                downloadable; the message says which and how to provide them.
        """
        dtype = kwargs.pop("torch_dtype", None) or kwargs.pop("dtype", None)
        if dtype is not None:
            # Newer diffusers call the argument ``dtype`` and warn on ``torch_dtype``.
            kwargs[_DTYPE_KWARG] = dtype
        if prior is not None and not isinstance(prior, PriorModel):
            prior = load_prior(prior, dtype=dtype if isinstance(dtype, torch.dtype) else None)
        if controlnet is not None and not isinstance(controlnet, ControlNetModel):
            hub = {k: kwargs[k] for k in ("cache_dir", "local_files_only", "token", "revision")
                   if k in kwargs}  # fmt: skip
            try:
                if isinstance(dtype, torch.dtype):
                    hub[_DTYPE_KWARG] = dtype
                controlnet = ControlNetModel.from_pretrained(controlnet, **hub)
            except (OSError, ConnectionError) as err:
                if _is_missing_weights(err, controlnet):
                    raise missing_weights_error(controlnet, err) from err
                raise
        if prior is not None:
            kwargs["prior"] = prior
        if controlnet is not None:
            kwargs["controlnet"] = controlnet
        try:
            pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except (OSError, ConnectionError) as err:
            if _is_missing_weights(err, pretrained_model_name_or_path):
                raise missing_weights_error(pretrained_model_name_or_path, err) from err
            raise
        if pipe.prior is None:
            logger.warning(
                "RaimPipeline has no prior: stage 1 falls back to a bicubic resize. Pass "
                "prior='realesrgan-x4plus' (or any restorer) to from_pretrained."
            )
        return pipe

    # ------------------------------------------------------------------ properties

    @property
    def is_sdxl(self) -> bool:
        """Whether the denoiser is SDXL-like (two text encoders, size micro-conditioning)."""
        return self.unet.config.get("addition_embed_type") == "text_time"

    @property
    def pad_multiple(self) -> int:
        """Image sides must be multiples of this (VAE factor times UNet downsampling)."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    # ------------------------------------------------------------------ text

    def _tokenize(self, tokenizer: CLIPTokenizer, texts: list[str], device) -> torch.Tensor:
        ids = tokenizer(
            texts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids.to(device)

    def encode_prompt(
        self, prompt: list[str], device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text embeddings (and SDXL's pooled embeddings) of a list of prompts.

        SD uses the text encoder's last hidden state; SDXL concatenates the penultimate hidden
        states of both encoders and pools with the second, as in diffusers' SDXL pipelines.

        Args:
            prompt (`list[str]`): the prompts.
            device: where the text encoders run.

        Returns:
            `tuple`: ``(embeds (N, 77, D), pooled (N, P) or None)``.
        """
        if not self.is_sdxl:
            ids = self._tokenize(self.tokenizer, prompt, device)
            return self.text_encoder(ids)[0], None
        embeds, pooled = [], None
        pairs = [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]
        for tokenizer, encoder in pairs:
            if tokenizer is None or encoder is None:
                continue
            out = encoder(self._tokenize(tokenizer, prompt, device), output_hidden_states=True)
            if out[0].ndim == 2:
                pooled = out[0]
            embeds.append(out.hidden_states[-2])
        return torch.cat(embeds, dim=-1), pooled

    def _sdxl_time_ids(self, size: tuple[int, int], negative: bool) -> list[float]:
        proj = (
            self.text_encoder_2.config.projection_dim
            if self.text_encoder_2 is not None
            else self.text_encoder.config.hidden_size
        )
        expected = self.unet.add_embedding.linear_1.in_features
        n_ids = (expected - proj) // self.unet.config.addition_time_embed_dim
        h, w = size
        if n_ids == 5:  # refiner-style: original size, crop, aesthetic score
            return [h, w, 0, 0, 2.5 if negative else 6.0]
        return [h, w, 0, 0, h, w]

    # ------------------------------------------------------------------ stage hooks

    def run_prior(self, x_lq: torch.Tensor, upscale: float) -> torch.Tensor:
        """Stage 1: the prior's restoration of ``x_lq`` at ``upscale`` times its size."""
        if self.prior is None:
            h, w = x_lq.shape[-2:]
            return resize(x_lq, (round(h * upscale), round(w * upscale)))
        # x_lq is on the execution device, where .to() or the offload hooks put the prior too.
        out = self.prior(x_lq, outscale=upscale)
        return out.float().to(x_lq.device).clamp(0, 1)

    def make_detector(self, detector: ArtifactDetector | str | None = None, **overrides: Any):
        """The stage-3 detector: ``detector`` as given, or a parameter set by name (default
        ``"desra-default"``) using the pipeline's ``segmenter`` (uniform class weights without
        one; the result says so), with field overrides such as ``contrast_threshold``."""
        if isinstance(detector, ArtifactDetector) and not overrides:
            return detector
        if isinstance(detector, ArtifactDetector):
            return detector.replace(**overrides)
        segmenter = self.segmenter
        if isinstance(segmenter, torch.nn.Module):
            # A transformers SegFormer/Mask2Former registered as a component.
            segmenter = TransformersSegmenter(segmenter)
        return ArtifactDetector.from_config(
            detector or "desra-default", segmenter=segmenter if segmenter is not None else "none",
            **overrides,
        )

    def detect_artifacts(
        self, generated: torch.Tensor, prior: torch.Tensor, detector: ArtifactDetector
    ) -> ArtifactResult:
        """Stage 3: where ``generated`` drifted from the faithful ``prior`` (N1HW masks)."""
        return detector(generated, prior)

    def fuse_artifacts(
        self,
        x_lq_up: torch.Tensor,
        generated: torch.Tensor,
        prior: torch.Tensor,
        masks: torch.Tensor,
        tile: int | None = None,
    ) -> torch.Tensor:
        """Stage 4: re-restore the masked regions and keep the rest of ``generated``.

        With ``self.fusion`` (a trained [`FusionNet`]) the regions are re-restored from the
        upsampled input; without it the prior is blended in with a Laplacian pyramid, exact
        outside a feather band around the masks.
        """
        fusion = self.fusion if isinstance(self.fusion, FusionNet) else None
        if fusion is not None:
            dtype = next(fusion.parameters()).dtype
            out = fuse(generated.to(dtype), prior.to(dtype), x_lq_up.to(dtype),
                       masks.to(dtype), fusion, tile=tile)
            return out.float()
        return fuse(generated, prior, x_lq_up, masks)

    # ------------------------------------------------------------------ checks

    def check_inputs(
        self,
        *,
        strength: float,
        num_inference_steps: int,
        guidance_scale: float,
        consistency_weight: float,
        consistency_schedule: str,
        consistency_stop: float,
        color_fix: str,
        upscale: float | None,
        min_size: int | None,
        tile: int | None,
        output_type: str,
        stages: Sequence[str],
        callback_on_step_end_tensor_inputs: Sequence[str],
        control_guidance_start: float,
        control_guidance_end: float,
    ) -> None:
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps!r} must be a positive int")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength={strength!r} must be in (0, 1]")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale={guidance_scale!r} must be >= 0")
        check_consistency_args(consistency_weight, consistency_schedule, consistency_stop)
        if color_fix not in COLOR_FIXES:
            raise ValueError(f"color_fix={color_fix!r} is not supported; use one of {COLOR_FIXES}")
        if upscale is not None and not upscale > 0:
            raise ValueError(f"upscale={upscale!r} must be > 0")
        if min_size is not None and (not isinstance(min_size, int) or min_size < 1):
            raise ValueError(f"min_size={min_size!r} must be a positive int or None")
        if tile is not None and (not isinstance(tile, int) or tile < 0):
            raise ValueError(f"tile={tile!r} must be a non-negative int (0 = never tile) or None")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(
                f"output_type={output_type!r} is not supported; use one of {OUTPUT_TYPES}"
            )
        bad = [s for s in stages if s not in STAGES]
        if bad:
            raise ValueError(f"stages={tuple(stages)!r} contains {bad}; allowed: {STAGES}")
        allowed = self._callback_tensor_inputs
        bad = [k for k in callback_on_step_end_tensor_inputs if k not in allowed]
        if bad:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs has {bad}; allowed: {allowed}"
            )
        if not 0.0 <= control_guidance_start < control_guidance_end <= 1.0:
            raise ValueError(
                f"control_guidance_start={control_guidance_start!r} and control_guidance_end="
                f"{control_guidance_end!r} must satisfy 0 <= start < end <= 1"
            )

    # ------------------------------------------------------------------ stage 2

    def _latent_tile(self, tile: int | None, latent_hw: tuple[int, int], batch: int) -> int | None:
        if tile == 0:
            return None
        if tile is None:
            tile = auto_latent_tile(latent_hw, batch, self._execution_device)
            if tile is None:
                return None
        # Tiles must go through the UNet's downsampling levels without remainder.
        unit = 2 ** (len(self.unet.config.block_out_channels) - 1)
        tile = max(tile // unit * unit, unit)
        return None if tile >= max(latent_hw) else tile

    def generate(
        self,
        x_prior: torch.Tensor,
        prompt: list[str],
        negative_prompt: list[str],
        *,
        num_inference_steps: int,
        strength: float,
        guidance_scale: float,
        consistency_weight: float,
        consistency_schedule: str,
        consistency_stop: float,
        consistency_power: float,
        tile: int | None,
        tile_overlap: int | None,
        vae_tile: int | None,
        controlnet_conditioning_scale: float,
        control_guidance_start: float,
        control_guidance_end: float,
        eta: float,
        generator: torch.Generator | list[torch.Generator] | None,
        callback_on_step_end: Callable | None,
        callback_on_step_end_tensor_inputs: Sequence[str],
    ) -> torch.Tensor:
        """Stage 2 on images whose sides are multiples of `pad_multiple`; returns [0, 1] images."""
        device = self._execution_device
        n = x_prior.shape[0]
        dtype = self.unet.dtype

        # 2a. The prior's latent: the posterior mean, so it does not depend on the seed.
        # VAE tiles: None picks a size from free memory (untiled when it fits), 0 never tiles.
        if vae_tile is None:
            vae_tile = auto_vae_tile(*x_prior.shape[-2:], device)
        elif vae_tile == 0:
            vae_tile = None
        # Overlaps scale with the tile so that small tiles do not degenerate into 1-px strides.
        vae_overlap = None if vae_tile is None else min(64, vae_tile // 4)
        z_prior = encode_latents(
            self.vae, x_prior, tile=vae_tile, overlap=vae_overlap or 0
        ).to(device, dtype)

        # 2b. Text conditioning, [uncond; cond] for classifier-free guidance.
        cfg = guidance_scale > 1.0
        prompt_embeds, pooled = self.encode_prompt(prompt, device)
        added_cond_kwargs = None
        if cfg:
            neg_embeds, neg_pooled = self.encode_prompt(negative_prompt, device)
            prompt_embeds = torch.cat([neg_embeds, prompt_embeds])
            pooled = None if pooled is None else torch.cat([neg_pooled, pooled])
        prompt_embeds = prompt_embeds.to(dtype)
        if self.is_sdxl:
            size = tuple(x_prior.shape[-2:])
            time_ids = torch.tensor([self._sdxl_time_ids(size, negative=False)] * n)
            if cfg:
                neg_ids = torch.tensor([self._sdxl_time_ids(size, negative=True)] * n)
                time_ids = torch.cat([neg_ids, time_ids])
            added_cond_kwargs = {
                "text_embeds": pooled.to(device, dtype),
                "time_ids": time_ids.to(device, dtype),
            }

        # 2c. Timesteps, noise and the per-step guidance tables (computed once, before the loop).
        timesteps, begin = img2img_timesteps(self.scheduler, num_inference_steps, strength, device)
        self._num_timesteps = len(timesteps)
        latents = add_noise(self.scheduler, z_prior, timesteps, generator)
        weights = consistency_weights(
            consistency_schedule,
            consistency_weight,
            len(timesteps),
            sigmas=step_sigmas(self.scheduler, timesteps, begin),
            stop=consistency_stop,
            power=consistency_power,
            device=device,
        )
        control_scales = None
        control_image = None
        if self.controlnet is not None:
            steps = len(timesteps)
            # diffusers' rule: step i is controlled when it lies inside [start, end].
            start, end = control_guidance_start, control_guidance_end
            keep = [
                0.0 if (i / steps < start or (i + 1) / steps > end) else 1.0 for i in range(steps)
            ]
            control_scales = controlnet_conditioning_scale * torch.tensor(keep)
            control_image = x_prior.to(device, dtype)

        # 2d. The guided denoising loop.
        callback = None
        if callback_on_step_end is not None:
            state = {"z_prior": z_prior, "prompt_embeds": prompt_embeds}

            def callback(i: int, t: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
                state["latents"] = lat
                kwargs = {k: state[k] for k in callback_on_step_end_tensor_inputs}
                out = callback_on_step_end(self, i, t, kwargs) or {}
                return out.get("latents", lat)

        latent_hw = tuple(z_prior.shape[-2:])
        latents = guided_denoise(
            self.unet,
            self.scheduler,
            latents,
            timesteps,
            encoder_hidden_states=prompt_embeds,
            z_prior=z_prior,
            weights=weights,
            guidance_scale=guidance_scale,
            added_cond_kwargs=added_cond_kwargs,
            controlnet=self.controlnet,
            control_image=control_image,
            control_scales=control_scales,
            begin_index=begin,
            tile=self._latent_tile(tile, latent_hw, n * (2 if cfg else 1)),
            tile_overlap=tile_overlap,
            generator=generator,
            eta=eta,
            progress_bar=self.progress_bar,
            callback=callback,
        )

        # 2e. Decode.
        if vae_tile is None:
            return decode_latents(self.vae, latents)
        latent_tile = max(vae_tile // self.vae_scale_factor, 1)
        return decode_latents(
            self.vae, latents, tile=latent_tile, overlap=min(8, latent_tile // 4)
        )

    # ------------------------------------------------------------------ call

    def _convert(self, x: torch.Tensor | None, output_type: str) -> Any:
        if x is None:
            return None
        if output_type == "pt":
            return x.float().cpu()
        if output_type == "np":
            return to_numpy(x)
        return to_pil(x)

    @torch.no_grad()
    def __call__(
        self,
        image: Any,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        *,
        num_inference_steps: int = 30,
        strength: float = 0.5,
        guidance_scale: float = 5.0,
        consistency_weight: float = 0.5,
        consistency_schedule: str = "cosine",
        consistency_stop: float = 1.0,
        consistency_power: float = 4.0,
        color_fix: str = "wavelet",
        upscale: float | None = None,
        min_size: int | None = None,
        tile: int | None = None,
        tile_overlap: int | None = None,
        vae_tile: int | None = None,
        controlnet_conditioning_scale: float = 1.0,
        control_guidance_start: float = 0.0,
        control_guidance_end: float = 1.0,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        stages: Sequence[str] = STAGES,
        detector: ArtifactDetector | str | None = None,
        contrast_threshold: float | None = None,
        area_threshold: float | None = None,
        fusion_tile: int | None = None,
    ) -> RaimPipelineOutput | tuple:
        r"""Restore images.

        Args:
            image: one image or a list of same-sized images (path, PIL, numpy, torch; see
                `raim_diffusion.images.to_tensor`).
            prompt (`str` or `list[str]`, *optional*): one prompt, or one per image; a generic
                photo-quality prompt (``config.default_prompt``) when `None`.
            negative_prompt (`str` or `list[str]`, *optional*): likewise
                (``config.default_negative_prompt``).
            num_inference_steps (`int`, defaults to 30): length of the full noise schedule.
            strength (`float`, defaults to 0.5): fraction of it that is run (img2img strength).
            guidance_scale (`float`, defaults to 5.0): classifier-free guidance (off at <= 1).
            consistency_weight (`float`, defaults to 0.5): w in ``x̂0 ← x̂0 + w(t)·(z_prior − x̂0)``,
                in [0, 1]; 0 is plain img2img, 1 returns the prior's latent.
            consistency_schedule (`str`, defaults to `"cosine"`): w(t): `"constant"`, `"linear"`,
                `"cosine"`, `"power"` (SUPIR's (σ/σ_max)^τ) or `"early"`.
            consistency_stop (`float`, defaults to 1.0): guidance is off after this fraction of
                the steps.
            consistency_power (`float`, defaults to 4.0): τ of the `"power"` schedule.
            color_fix (`str`, defaults to `"wavelet"`): colour correction of the generated image
                against the prior: `"wavelet"`, `"adain"` or `"none"`.
            upscale (`float`, *optional*): output size / input size; the prior's scale by default
                (1 without a prior, or when stage 1 is skipped).
            min_size (`int`, *optional*): generate at least this short side (SD models work
                poorly far below their training size); the result is resized back.
            tile (`int`, *optional*): latent tile size of the denoising loop; `None` picks one
                from free device memory (no tiling when the latent fits), 0 never tiles.
            tile_overlap (`int`, *optional*): latent tile overlap, ``tile // 4`` by default.
            vae_tile (`int`, *optional*): pixel tile size of the VAE; `None` picks one from free
                device memory (untiled when the image fits), 0 never tiles.
            controlnet_conditioning_scale (`float`, defaults to 1.0): ControlNet strength.
            control_guidance_start (`float`, defaults to 0.0), control_guidance_end (`float`,
                defaults to 1.0): fraction of the steps where the ControlNet is applied.
            eta (`float`, defaults to 0.0): DDIM's eta.
            generator (`torch.Generator` or a list, one per image, *optional*): randomness.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` or `"pt"`.
            return_dict (`bool`, defaults to `True`): return a `RaimPipelineOutput` or a tuple
                ``(images, prior_images, generated_images, masks)``.
            callback_on_step_end (`Callable`, *optional*): ``callback(pipe, step, timestep,
                callback_kwargs) -> dict`` after every denoising step; may replace ``latents``.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to ``["latents"]``): what
                ``callback_kwargs`` holds, from ``_callback_tensor_inputs``.
            stages (`Sequence[str]`, defaults to all): which of ``("prior", "generate",
                "detect", "fuse")`` run; a skipped stage passes its input through.
            detector (`ArtifactDetector` or `str`, *optional*): stage-3 artifact detector, or
                the name/YAML of a parameter set in ``masks/``; ``"desra-default"`` with the
                pipeline's ``segmenter`` when `None`.
            contrast_threshold (`float`, *optional*): override of the detector's threshold on
                the class-weighted local-contrast similarity (0.7 in DeSRA; lower flags less).
            area_threshold (`float`, *optional*): override of the smallest region kept, as a
                fraction of the image area.
            fusion_tile (`int`, *optional*): tile size of the fusion network (whole image
                when `None`).

        Returns:
            `RaimPipelineOutput` or `tuple`.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        stages = tuple(stages)
        self.check_inputs(
            strength=strength,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            consistency_weight=consistency_weight,
            consistency_schedule=consistency_schedule,
            consistency_stop=consistency_stop,
            color_fix=color_fix,
            upscale=upscale,
            min_size=min_size,
            tile=tile,
            output_type=output_type,
            stages=stages,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            control_guidance_start=control_guidance_start,
            control_guidance_end=control_guidance_end,
        )
        self._guidance_scale = guidance_scale
        self._num_timesteps = 0
        device = self._execution_device

        # 0. Inputs: one float32 NCHW batch in [0, 1]; one prompt per image.
        x_lq = to_tensor(image).to(device=device, dtype=torch.float32)
        n = x_lq.shape[0]
        prompts = _as_list(prompt, n, "prompt", self.config.default_prompt)
        negatives = _as_list(
            negative_prompt, n, "negative_prompt", self.config.default_negative_prompt
        )
        if isinstance(generator, list) and len(generator) != n:
            raise ValueError(f"generator is a list of {len(generator)}; give one per image ({n})")

        # 1. Prior: faithful restoration at the output size.
        run_prior = "prior" in stages
        if upscale is None:
            upscale = self.prior.scale if (run_prior and self.prior is not None) else 1.0
        if run_prior:
            x_prior = self.run_prior(x_lq, upscale)
        else:
            h, w = x_lq.shape[-2:]
            x_prior = resize(x_lq, (round(h * upscale), round(w * upscale)))
        target = tuple(x_prior.shape[-2:])

        # 2. Generate: consistency-guided img2img from the prior, at >= min_size, padded.
        if "generate" in stages:
            x_work = x_prior
            if min_size is not None and min(target) < min_size:
                factor = min_size / min(target)
                x_work = resize(x_prior, (round(target[0] * factor), round(target[1] * factor)))
            work_hw = tuple(x_work.shape[-2:])
            x_gen = self.generate(
                pad_to_multiple(x_work, self.pad_multiple),
                prompts,
                negatives,
                num_inference_steps=num_inference_steps,
                strength=strength,
                guidance_scale=guidance_scale,
                consistency_weight=consistency_weight,
                consistency_schedule=consistency_schedule,
                consistency_stop=consistency_stop,
                consistency_power=consistency_power,
                tile=tile,
                tile_overlap=tile_overlap,
                vae_tile=vae_tile,
                controlnet_conditioning_scale=controlnet_conditioning_scale,
                control_guidance_start=control_guidance_start,
                control_guidance_end=control_guidance_end,
                eta=eta,
                generator=generator,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            ).to(device)
            x_gen = resize(crop(x_gen, work_hw), target)
            x_gen = apply_color_fix(x_gen, x_prior, color_fix)
        else:
            x_gen = x_prior

        # 3. Detect: where the generated image drifted from the prior.
        masks = artifacts = None
        if "detect" in stages:
            overrides = {k: v for k, v in (("contrast_threshold", contrast_threshold),
                                           ("area_threshold", area_threshold)) if v is not None}
            artifacts = self.detect_artifacts(
                x_gen, x_prior, self.make_detector(detector, **overrides)
            )
            masks = artifacts.masks.to(device=x_gen.device, dtype=x_gen.dtype)

        # 4. Fuse: re-restore the masked regions, keep the rest of the generated image.
        x_out = x_gen
        if "fuse" in stages and masks is not None:
            x_lq_up = resize(x_lq, target)
            x_out = self.fuse_artifacts(x_lq_up, x_gen, x_prior, masks, tile=fusion_tile)

        self.maybe_free_model_hooks()
        result = (
            self._convert(x_out.clamp(0, 1), output_type),
            self._convert(x_prior, output_type),
            self._convert(x_gen, output_type),
            self._convert(masks, output_type),
        )
        if not return_dict:
            return result
        return RaimPipelineOutput(*result, artifacts=artifacts)
