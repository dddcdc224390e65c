"""`RaimPipeline`: the four restoration stages in order, as one diffusers pipeline.

1. **prior**: a GAN/CNN restorer (any spandrel architecture) gives a faithful, plain result.
2. **generate**: SD 1.x/2.x or SDXL img2img from the prior's latent, with consistency guidance
   pulling every step's predicted clean latent towards it (optional tile ControlNet fed the
   prior's output, latent and VAE tiling for large images), then a colour fix against the prior.
   With SUPIR's adaptor (``from_pretrained(..., supir=checkpoint)``), SUPIR's restoration-guided
   EDM sampler instead, conditioned on the low-quality input, guided toward SUPIR's own stage-1
   latent or the prior's, and colour-fixed against that stage-1 image.
3. **detect**: artifact masks (DeSRA); hook, see `RaimPipeline.detect_artifacts`.
4. **fuse**: re-restore the masked regions; hook, see `RaimPipeline.fuse_artifacts`.

The pipeline loads any standard SD/SDXL diffusers folder or hub repository and adds the extra
components; ``save_pretrained`` writes a RAIM folder (``_class_name: RaimPipeline``, the prior
included) that ``RaimPipeline.from_pretrained`` reloads.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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

from .artifacts import ArtifactDetector, ArtifactResult, build_detector
from .artifacts.segmentation import TransformersSegmenter
from .diffusion import supir_sampler
from .diffusion.color import COLOR_FIXES
from .diffusion.color import color_fix as apply_color_fix
from .diffusion.guidance import check_consistency_args, consistency_weights
from .diffusion.loop import (
    add_noise,
    auto_latent_tile,
    guided_denoise,
    img2img_timesteps,
    linear_guidance_scales,
    next_step_sigmas,
    scheduler_sigma_max,
    step_sigmas,
)
from .diffusion.supir import (
    SupirComponents,
    SupirControlModel,
    SupirDenoiseEncoder,
    SupirUNet2DConditionModel,
)
from .diffusion.supir import load_supir as load_supir_components
from .diffusion.vae import auto_vae_tile, decode_latents, encode_latents
from .errors import MissingWeightsError
from .fusion import fuse, fusion_architecture
from .hub import _load_cached_first, missing_weights_error
from .images import to_numpy, to_pil, to_tensor
from .ops import crop, pad_to_multiple, resize, scaled_size
from .prior import PriorModel, load_prior
from .stages import STAGES, check_stages

logger = logging.get_logger(__name__)

__all__ = [
    "DEFAULT_NEGATIVE_PROMPT",
    "DEFAULT_PROMPT",
    "RaimPipeline",
    "RaimPipelineOutput",
    "missing_weights_error",
]

# Quality prompts in the spirit of SUPIR's defaults: describe a sharp, clean photograph and push
# away from paintings, renders and the usual degradations. No "text" in the negative prompt:
# legible text is one of RAIM's scenarios, and SUPIR's own default has no such word.
DEFAULT_PROMPT = (
    "a high quality, highly detailed, sharp professional photograph, realistic natural "
    "textures, fine details, clean, in focus, 8k"
)
DEFAULT_NEGATIVE_PROMPT = (
    "painting, oil painting, illustration, drawing, art, sketch, cartoon, anime, CG, 3d render, "
    "blurry, out of focus, noisy, grainy, jpeg artifacts, compression artifacts, oversmoothed, "
    "lowres, low quality, worst quality, watermark, signature, deformed, distorted"
)

# diffusers renamed ``torch_dtype`` to ``dtype`` (and deprecated the old name); use whichever
# the installed version understands.
_DTYPE_KWARG = "dtype" if hasattr(_pipeline_utils, "_resolve_dtype") else "torch_dtype"
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
SUPIR_STAGE1 = ("supir", "prior")


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
        methods (`dict[str, str]`): what each stage that ran actually used, e.g.
            ``{"prior": "PriorModel", "segmentation": "none", "fusion": "pyramid-blend"}``, so
            that a fallback is never silent. Not part of the tuple.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    prior_images: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None
    generated_images: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None
    masks: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None
    artifacts: ArtifactResult | None = None
    methods: dict[str, str] | None = None


def _uses_cfg(guidance_scale: float, guidance_scale_start: float | None) -> bool:
    """Whether any step runs classifier-free guidance (a linear CFG passes through both ends)."""
    return guidance_scale > 1.0 or (guidance_scale_start is not None and guidance_scale_start > 1)


def _repeat_batch(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """One embedding for every image of the batch."""
    if t is None or t.shape[0] == n:
        return t
    return t.expand(n, *t.shape[1:]) if t.shape[0] == 1 else t


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

    Every component is optional so that a pipeline can hold only what its stages need:
    ``RaimPipeline(prior=load_prior("realesrgan-x4plus"))`` runs stage 1 alone (``stages=
    ("prior",)``); ``generate`` needs the VAE, UNet, scheduler and a text encoder.

    Args:
        vae (`AutoencoderKL`, *optional*): the SD/SDXL autoencoder.
        text_encoder (`CLIPTextModel`, *optional*): SD's text encoder (SDXL's first one).
        tokenizer (`CLIPTokenizer`, *optional*): its tokenizer.
        unet (`UNet2DConditionModel`, *optional*): the denoiser.
        scheduler (`KarrasDiffusionSchedulers`, *optional*): any diffusers scheduler, ε or v
            prediction.
        prior (`PriorModel`, *optional*): stage-1 restorer; without it stage 1 is a bicubic
            resize (recorded in ``output.methods``).
        text_encoder_2 (`CLIPTextModelWithProjection`, *optional*): SDXL's second text encoder.
        tokenizer_2 (`CLIPTokenizer`, *optional*): its tokenizer.
        controlnet (`ControlNetModel`, *optional*): a tile ControlNet, fed the prior's output.
        segmenter (*optional*): stage-3 semantic segmentation (a transformers SegFormer /
            Mask2Former model or a backend from `raim_diffusion.artifacts.segmentation`);
            without it the detector uses uniform class weights, with a warning, and
            ``output.methods["segmentation"]`` says ``"none"``.
        fusion (*optional*): stage-4 fusion network, any registered architecture
            (`raim_diffusion.fusion.FUSION_ARCHITECTURES`, a `torch.compile` wrapper is fine);
            without it the prior is blended in with a Laplacian pyramid
            (``output.methods["fusion"] == "pyramid-blend"``).
        supir_control (`SupirControlModel`, *optional*): SUPIR's control model; with it stage 2
            is SUPIR's sampler and ``unet`` is a `SupirUNet2DConditionModel` (see
            `load_supir`). SUPIR's weights are under SupPixel's non-commercial licence.
        supir_denoise_encoder (`SupirDenoiseEncoder`, *optional*): SUPIR's degradation-robust
            encoder (SUPIR's own stage 1 and the control input).
        default_prompt (`str`, *optional*): prompt used when none is given.
        default_negative_prompt (`str`, *optional*): negative prompt used when none is given.
    """

    # Order of first use; components that are None (or not nn.Modules) are skipped by diffusers.
    model_cpu_offload_seq = (
        "prior->text_encoder->text_encoder_2->supir_denoise_encoder->controlnet->supir_control"
        "->unet->vae->segmenter->fusion"
    )
    _optional_components = [
        "vae",
        "unet",
        "scheduler",
        "prior",
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
        "controlnet",
        "segmenter",
        "fusion",
        "supir_control",
        "supir_denoise_encoder",
    ]
    _callback_tensor_inputs = ["latents", "z_prior", "prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL | None = None,
        text_encoder: CLIPTextModel | None = None,
        tokenizer: CLIPTokenizer | None = None,
        unet: UNet2DConditionModel | None = None,
        scheduler: KarrasDiffusionSchedulers | None = None,
        prior: PriorModel | None = None,
        text_encoder_2: CLIPTextModelWithProjection | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        controlnet: ControlNetModel | None = None,
        segmenter: Any = None,
        fusion: Any = None,
        supir_control: SupirControlModel | None = None,
        supir_denoise_encoder: SupirDenoiseEncoder | None = None,
        default_prompt: str | None = None,
        default_negative_prompt: str | None = None,
    ) -> None:
        super().__init__()
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
            supir_control=supir_control,
            supir_denoise_encoder=supir_denoise_encoder,
        )
        self.register_to_config(
            default_prompt=DEFAULT_PROMPT if default_prompt is None else default_prompt,
            default_negative_prompt=(
                DEFAULT_NEGATIVE_PROMPT if default_negative_prompt is None
                else default_negative_prompt
            ),
        )
        self.vae_scale_factor = (
            2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        )

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        prior: PriorModel | str | os.PathLike | Sequence[Any] | None = None,
        controlnet: ControlNetModel | str | os.PathLike | None = None,
        supir: str | os.PathLike | dict[str, torch.Tensor] | None = None,
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
            supir (*optional*): a SUPIR checkpoint (``SUPIR-v0Q.ckpt`` / ``.safetensors``, or a
                state dict in SUPIR's layout) to wire in over the SDXL model (see `load_supir`).
                A saved RAIM folder with SUPIR reloads without it. SUPIR's weights are under
                SupPixel's non-commercial licence; users bring their own.
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
            if isinstance(dtype, torch.dtype):
                hub[_DTYPE_KWARG] = dtype
            controlnet = _load_cached_first(ControlNetModel.from_pretrained, controlnet, **hub)
        if prior is not None:
            kwargs["prior"] = prior
        if controlnet is not None:
            kwargs["controlnet"] = controlnet
        pipe = _load_cached_first(super().from_pretrained, pretrained_model_name_or_path, **kwargs)
        missing = [name for name in ("vae", "unet", "scheduler") if getattr(pipe, name) is None]
        if missing or (pipe.text_encoder is None and pipe.text_encoder_2 is None):
            raise MissingWeightsError(
                f"model {pretrained_model_name_or_path}: the folder has no "
                f"{', '.join(missing) or 'text encoder'}; it must hold a Stable Diffusion / SDXL "
                "diffusers pipeline (model_index.json and one folder per component)"
            )
        if supir is not None:
            pipe.load_supir(supir)
        elif pipe.supir_control is not None:
            pipe._supir_dtypes()
        if pipe.prior is None:
            logger.warning(
                "RaimPipeline has no prior: stage 1 falls back to a bicubic resize. Pass "
                "prior='realesrgan-x4plus' (or any restorer) to from_pretrained."
            )
        return pipe

    def load_supir(
        self, checkpoint: str | os.PathLike | dict[str, torch.Tensor]
    ) -> SupirComponents:
        """Wire SUPIR's adaptor in over this pipeline's SDXL UNet and VAE; stage 2 becomes
        SUPIR's sampler.

        The checkpoint loads strictly (`raim_diffusion.diffusion.supir.load_supir`): ``unet``
        becomes a `SupirUNet2DConditionModel` sharing the SDXL weights, and ``supir_control`` and
        ``supir_denoise_encoder`` are registered, so ``save_pretrained`` writes them. With a
        float16 UNet the VAE and the denoise encoder run in bfloat16 (SUPIR's VAE overflows in
        float16).

        Args:
            checkpoint: ``SUPIR-v0Q.ckpt`` / ``.safetensors`` or a state dict in SUPIR's layout.

        Returns:
            `SupirComponents`: what was loaded (``unused_keys``: checkpoint keys outside SUPIR's
            parts, such as the SDXL base it was trained on, not loaded).
        """
        if self.unet is None or self.vae is None:
            raise ValueError("SUPIR needs an SDXL UNet and VAE; load an SDXL model first")
        if self.controlnet is not None:
            raise ValueError("SUPIR's control model replaces the ControlNet: load one or the other")
        comps = load_supir_components(checkpoint, self.unet, vae=self.vae)
        self.register_modules(
            unet=comps.unet,
            supir_control=comps.control,
            supir_denoise_encoder=comps.denoise_encoder,
        )
        self._supir_dtypes()
        logger.info("SUPIR loaded; %d checkpoint keys outside SUPIR's components were not used",
                    len(comps.unused_keys))
        return comps

    def _supir_dtypes(self) -> None:
        # SUPIR runs its VAE and denoise encoder in bfloat16: float16 overflows there.
        # (nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast.)
        if self.unet.dtype in (torch.float16, torch.bfloat16):
            if self.unet.dtype == torch.float16 and self.vae is not None:
                torch.nn.Module.to(self.vae, dtype=torch.bfloat16)
            if self.supir_denoise_encoder is not None:
                torch.nn.Module.to(self.supir_denoise_encoder, dtype=torch.bfloat16)

    # ------------------------------------------------------------------ properties

    @property
    def is_sdxl(self) -> bool:
        """Whether the denoiser is SDXL-like (two text encoders, size micro-conditioning)."""
        return self.unet is not None and (
            self.unet.config.get("addition_embed_type") == "text_time"
        )

    @property
    def pad_multiple(self) -> int:
        """Image sides must be multiples of this (VAE factor times UNet downsampling)."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def _check_components(self, stages: Sequence[str]) -> None:
        if "generate" not in stages:
            return
        missing = [name for name in ("vae", "unet", "scheduler") if getattr(self, name) is None]
        if self.text_encoder is None and self.text_encoder_2 is None:
            missing.append("text_encoder")
        if self.supir_control is not None:
            if self.supir_denoise_encoder is None:
                missing.append("supir_denoise_encoder")
            if not isinstance(self.unet, SupirUNet2DConditionModel):
                missing.append("unet (a SupirUNet2DConditionModel)")
            if self.controlnet is not None:
                raise ValueError("SUPIR's control model replaces the ControlNet: this pipeline "
                                 "holds both; remove one")
        if missing:
            raise ValueError(
                f"stage 'generate' needs the components {missing}, which this pipeline lacks; "
                "load one with RaimPipeline.from_pretrained(<SD/SDXL model>) or run "
                "stages=('prior',)"
            )

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

    def _encode_text(
        self, prompt: list[str], device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
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

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device | str | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Text embeddings, as diffusers' SDXL pipelines' ``encode_prompt`` returns them.

        SD uses the text encoder's last hidden state; SDXL concatenates the penultimate hidden
        states of both encoders and pools with the second. Embeddings given are used as they
        are (repeated per image); a missing prompt or negative prompt is the pipeline's
        ``config.default_prompt`` / ``config.default_negative_prompt``.

        Args:
            prompt (`str` or `list[str]`, *optional*): prompts, one per image.
            device (*optional*): where the text encoders run; the execution device by default.
            num_images_per_prompt (`int`, defaults to 1): repeat each embedding this often.
            do_classifier_free_guidance (`bool`, defaults to `True`): also encode the negatives.
            negative_prompt (`str` or `list[str]`, *optional*): negative prompts.
            prompt_embeds, negative_prompt_embeds (`torch.Tensor`, *optional*): precomputed
                ``(N, 77, D)`` embeddings.
            pooled_prompt_embeds, negative_pooled_prompt_embeds (`torch.Tensor`, *optional*):
                SDXL's precomputed pooled embeddings.

        Returns:
            `tuple`: ``(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
            negative_pooled_prompt_embeds)``; the negatives are `None` without classifier-free
            guidance and the pooled ones are `None` for SD 1.x/2.x.
        """
        device = device or self._execution_device
        if prompt_embeds is None:
            texts = [prompt] if isinstance(prompt, str) else list(prompt or [])
            texts = texts or [self.config.default_prompt]
            prompt_embeds, pooled_prompt_embeds = self._encode_text(texts, device)
        n = prompt_embeds.shape[0]
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negatives = _as_list(negative_prompt, n, "negative_prompt",
                                 self.config.default_negative_prompt)
            negative_prompt_embeds, negative_pooled_prompt_embeds = self._encode_text(
                negatives, device
            )
        if self.is_sdxl and pooled_prompt_embeds is None:
            raise ValueError("SDXL needs pooled_prompt_embeds together with prompt_embeds")
        if (self.is_sdxl and do_classifier_free_guidance
                and negative_pooled_prompt_embeds is None):
            raise ValueError("SDXL needs negative_pooled_prompt_embeds together with "
                             "negative_prompt_embeds")

        def repeat(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None or num_images_per_prompt == 1:
                return t
            return t.repeat_interleave(num_images_per_prompt, dim=0)

        if not do_classifier_free_guidance:
            negative_prompt_embeds = negative_pooled_prompt_embeds = None
        return (repeat(prompt_embeds), repeat(negative_prompt_embeds),
                repeat(pooled_prompt_embeds), repeat(negative_pooled_prompt_embeds))

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

    def run_prior(
        self, x_lq: torch.Tensor, upscale: float, input_blend: float = 0.0
    ) -> torch.Tensor:
        """Stage 1: the prior's restoration of ``x_lq`` at ``upscale`` times its size.

        With ``input_blend = a > 0`` the result is ``(1 - a)·prior + a·resize(x_lq)`` (MiAlgo's
        fixed per-pixel blend of the input back into the restoration), unless the prior holds
        MiAlgo's learned blend head, which replaces the fixed blend. Without a prior the stage is
        a bicubic resize (`raim_diffusion.ops.resize`).
        """
        if self.prior is not None and self.prior.head is not None:
            input_blend = 0.0  # the prior's learned head already blended the input back in
        size = scaled_size(tuple(x_lq.shape[-2:]), upscale)
        up = resize(x_lq, size) if (self.prior is None or input_blend > 0) else None
        if self.prior is None:
            return up
        # x_lq is on the execution device, where .to() or the offload hooks put the prior too.
        # Its range was checked once at the top of __call__.
        out = self.prior(x_lq, upscale, check_range=False)
        out = out.float().to(x_lq.device).clamp_(0, 1)
        if input_blend > 0:
            out = torch.lerp(out, up, input_blend)
        return out

    def make_detector(self, detector: ArtifactDetector | str | None = None, **overrides: Any):
        """The stage-3 detector: ``detector`` as given, or a parameter set by name (default
        ``"desra-default"``) using the pipeline's ``segmenter``, with field overrides such as
        ``contrast_threshold``. Without a segmenter the class weights are uniform: that is
        logged, and the result records ``segmentation == "none"``."""
        if isinstance(detector, ArtifactDetector):
            return detector.replace(**overrides) if overrides else detector
        segmenter = self.segmenter
        if isinstance(segmenter, torch.nn.Module):
            # A transformers SegFormer/Mask2Former registered as a component.
            segmenter = TransformersSegmenter(segmenter)
        if segmenter is None:
            logger.warning(
                "RaimPipeline has no segmenter: the detector weighs every semantic class the "
                "same (uniform weights). Register one with pipe.register_modules(segmenter=...) "
                "or pass a detector."
            )
            segmenter = "none"
        return build_detector(detector or "desra-default", segmenter=segmenter, load=False,
                              **overrides)

    def detect_artifacts(
        self, generated: torch.Tensor, prior: torch.Tensor, detector: ArtifactDetector
    ) -> ArtifactResult:
        """Stage 3: where ``generated`` drifted from the faithful ``prior`` (N1HW masks)."""
        return detector(generated, prior, check_range=False)

    def fuse_artifacts(
        self,
        x_lq_up: torch.Tensor,
        generated: torch.Tensor,
        prior: torch.Tensor,
        masks: torch.Tensor,
        tile: int | None = None,
    ) -> torch.Tensor:
        """Stage 4: re-restore the masked regions and keep the rest of ``generated``.

        With ``self.fusion`` (any registered fusion architecture, e.g. a trained [`FusionNet`])
        the network fuses; without it the prior is blended in with a Laplacian pyramid, exact
        outside a feather band around the masks. Anything else as ``fusion`` is an error, never
        a silent fallback.
        """
        if self.fusion is None:
            return fuse(generated, prior, x_lq_up, masks)
        net = fusion_architecture(self.fusion)
        dtype = next(net.parameters()).dtype
        out = fuse(generated.to(dtype), prior.to(dtype), x_lq_up.to(dtype), masks.to(dtype),
                   self.fusion, tile=tile)
        return out.float()

    # ------------------------------------------------------------------ checks

    @classmethod
    def check_inputs(cls, **arguments: Any) -> None:
        """Validate the settings of a call, before anything loads or runs.

        A classmethod, so that batch jobs check a whole run's settings before loading models.
        Takes any subset of ``__call__``'s keyword arguments; the others are ``__call__``'s
        defaults (its signature is the one place they are written). Every error is a
        `ValueError` naming the argument, the value and what is allowed.
        """
        params = inspect.signature(cls.__call__).parameters
        unknown = sorted(set(arguments) - set(params) - {"self", "image"})
        if unknown:
            raise ValueError(f"unknown RaimPipeline arguments: {unknown}")
        a = {name: p.default for name, p in params.items() if p.default is not p.empty}
        a.update(arguments)
        prompt, negative_prompt = a["prompt"], a["negative_prompt"]
        stages = a["stages"]
        output_type = a["output_type"]
        callback_on_step_end_tensor_inputs = a["callback_on_step_end_tensor_inputs"]
        control_guidance_start = a["control_guidance_start"]
        control_guidance_end = a["control_guidance_end"]
        for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            texts = [text] if isinstance(text, str) else text
            if texts is not None and not (
                isinstance(texts, (list, tuple)) and all(isinstance(t, str) for t in texts)
            ):
                raise ValueError(f"{name}={text!r} must be a string or a list of strings")

        def number(name: str, lo: float, hi: float = math.inf, *, lo_open: bool = False,
                   optional: bool = False, integer: bool = False) -> None:
            value = a[name]
            if value is None and optional:
                return
            kind = int if integer else (int, float)
            ok = isinstance(value, kind) and not isinstance(value, bool)
            ok = ok and math.isfinite(value) and (value > lo if lo_open else value >= lo)
            if not (ok and value <= hi):
                low = f"{'>' if lo_open else '>='} {lo}"
                rng = f"{low} and <= {hi}" if math.isfinite(hi) else low
                what = "an int" if integer else "a finite number"
                raise ValueError(f"{name}={value!r} must be {what} {rng}"
                                 + (" or None" if optional else ""))

        number("num_inference_steps", 1, integer=True)
        number("strength", 0.0, 1.0, lo_open=True)
        if int(a["num_inference_steps"] * a["strength"]) < 1:
            raise ValueError(
                f"strength={a['strength']!r} with num_inference_steps="
                f"{a['num_inference_steps']!r} runs no denoising step; raise one of them"
            )
        number("guidance_scale", 0.0)
        number("guidance_scale_start", 0.0, optional=True)
        number("s_churn", 0.0)
        number("s_noise", 0.0, lo_open=True)
        check_consistency_args(a["consistency_weight"], a["consistency_schedule"],
                               a["consistency_stop"], a["consistency_schedule_kwargs"])
        if a["color_fix"] not in COLOR_FIXES:
            raise ValueError(
                f"color_fix={a['color_fix']!r} is not supported; use one of {tuple(COLOR_FIXES)}"
            )
        number("upscale", 0.0, 64.0, lo_open=True, optional=True)
        number("input_blend", 0.0, 1.0)
        number("min_size", 1, integer=True, optional=True)
        number("tile", 0, integer=True, optional=True)
        number("tile_overlap", 0, integer=True, optional=True)
        number("vae_tile", 0, integer=True, optional=True)
        number("fusion_tile", 1, integer=True, optional=True)
        number("eta", 0.0)
        number("controlnet_conditioning_scale", 0.0)
        number("control_scale", 0.0)
        number("control_scale_start", 0.0, optional=True)
        if a["supir_stage1"] not in SUPIR_STAGE1:
            raise ValueError(
                f"supir_stage1={a['supir_stage1']!r} is not supported; use one of {SUPIR_STAGE1}"
            )
        number("contrast_threshold", 0.0, 1.0, optional=True)
        number("area_threshold", 0.0, optional=True)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(
                f"output_type={output_type!r} is not supported; use one of {OUTPUT_TYPES}"
            )
        stages = check_stages(stages)
        if output_type == "latent" and "generate" not in stages:
            raise ValueError("output_type='latent' returns stage 2's latents: it needs 'generate'")
        allowed = cls._callback_tensor_inputs
        bad = [k for k in callback_on_step_end_tensor_inputs if k not in allowed]
        if bad:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs has {bad}; allowed: {allowed}"
            )
        if not (isinstance(control_guidance_start, (int, float))
                and isinstance(control_guidance_end, (int, float))
                and 0.0 <= control_guidance_start < control_guidance_end <= 1.0):
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

    def _vae_tile(self, vae_tile: int | None, hw: tuple[int, int]) -> int | None:
        """Pixel tile of the VAE: `None` picks one from free memory (untiled when the image
        fits), 0 never tiles."""
        if vae_tile is None:
            return auto_vae_tile(*hw, self._execution_device)
        return None if vae_tile == 0 else vae_tile

    def _encode(self, images: torch.Tensor, vae_tile: int | None) -> torch.Tensor:
        # Overlaps scale with the tile so that small tiles do not degenerate into 1-px strides.
        overlap = 0 if vae_tile is None else min(64, vae_tile // 4)
        return encode_latents(self.vae, images, tile=vae_tile, overlap=overlap)

    def _decode(self, latents: torch.Tensor, vae_tile: int | None) -> torch.Tensor:
        if vae_tile is None:
            return decode_latents(self.vae, latents)
        latent_tile = max(vae_tile // self.vae_scale_factor, 1)
        return decode_latents(
            self.vae, latents, tile=latent_tile, overlap=min(8, latent_tile // 4)
        )

    def generate(
        self,
        x_prior: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        pooled_prompt_embeds: torch.Tensor | None,
        negative_pooled_prompt_embeds: torch.Tensor | None,
        *,
        num_inference_steps: int,
        strength: float,
        guidance_scale: float,
        guidance_scale_start: float | None,
        consistency_weight: float,
        consistency_schedule: str,
        consistency_stop: float,
        consistency_schedule_kwargs: dict[str, Any] | None,
        tile: int | None,
        tile_overlap: int | None,
        vae_tile: int | None,
        controlnet_conditioning_scale: float,
        control_guidance_start: float,
        control_guidance_end: float,
        eta: float,
        s_churn: float,
        s_noise: float,
        generator: torch.Generator | list[torch.Generator] | None,
        callback_on_step_end: Callable | None,
        callback_on_step_end_tensor_inputs: Sequence[str],
        output_type: str = "pt",
    ) -> torch.Tensor:
        """Stage 2 on images whose sides are multiples of `pad_multiple`.

        The text embeddings come from `encode_prompt` (negatives `None` without classifier-free
        guidance). Returns [0, 1] images, or the denoised latents with
        ``output_type="latent"``."""
        device = self._execution_device
        n = x_prior.shape[0]
        dtype = self.unet.dtype

        # 2a. The prior's latent: the posterior mean, so it does not depend on the seed.
        vae_tile = self._vae_tile(vae_tile, tuple(x_prior.shape[-2:]))
        z_prior = self._encode(x_prior, vae_tile).to(device, dtype)

        # 2b. Text conditioning, [uncond; cond] for classifier-free guidance.
        cfg = _uses_cfg(guidance_scale, guidance_scale_start)
        pooled = pooled_prompt_embeds
        added_cond_kwargs = None
        if cfg:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            if pooled is not None:
                pooled = torch.cat([negative_pooled_prompt_embeds, pooled])
        prompt_embeds = prompt_embeds.to(device, dtype)
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
        sigmas = step_sigmas(self.scheduler, timesteps, begin)
        sigma_max = scheduler_sigma_max(self.scheduler)
        weights = consistency_weights(
            consistency_schedule,
            consistency_weight,
            len(timesteps),
            sigmas=sigmas,
            next_sigmas=next_step_sigmas(self.scheduler, timesteps, begin),
            sigma_max=sigma_max,
            stop=consistency_stop,
            device=device,
            **(consistency_schedule_kwargs or {}),
        )
        scales = linear_guidance_scales(guidance_scale, guidance_scale_start, sigmas, sigma_max)
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

            def callback(i: int, t: torch.Tensor, lat: torch.Tensor) -> dict:
                state["latents"] = lat
                kwargs = {k: state[k] for k in callback_on_step_end_tensor_inputs}
                out = callback_on_step_end(self, i, t, kwargs) or {}
                if "prompt_embeds" in out:
                    state["prompt_embeds"] = out["prompt_embeds"]
                return {k: out[k] for k in ("latents", "prompt_embeds") if k in out}

        latent_hw = tuple(z_prior.shape[-2:])
        latents = guided_denoise(
            self.unet,
            self.scheduler,
            latents,
            timesteps,
            encoder_hidden_states=prompt_embeds,
            z_prior=z_prior,
            weights=weights,
            guidance_scale=scales,
            added_cond_kwargs=added_cond_kwargs,
            controlnet=self.controlnet,
            control_image=control_image,
            control_scales=control_scales,
            begin_index=begin,
            tile=self._latent_tile(tile, latent_hw, n * (2 if cfg else 1)),
            tile_overlap=tile_overlap,
            generator=generator,
            eta=eta,
            s_churn=s_churn,
            s_noise=s_noise,
            progress_bar=self.progress_bar,
            callback=callback,
        )

        # 2e. Decode.
        return latents if output_type == "latent" else self._decode(latents, vae_tile)

    def generate_supir(
        self,
        x_lq: torch.Tensor,
        x_prior: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        pooled_prompt_embeds: torch.Tensor | None,
        negative_pooled_prompt_embeds: torch.Tensor | None,
        *,
        supir_stage1: str,
        num_inference_steps: int,
        strength: float,
        guidance_scale: float,
        guidance_scale_start: float | None,
        consistency_weight: float,
        consistency_schedule: str,
        consistency_stop: float,
        consistency_schedule_kwargs: dict[str, Any] | None,
        control_scale: float,
        control_scale_start: float | None,
        tile: int | None,
        tile_overlap: int | None,
        vae_tile: int | None,
        s_churn: float,
        s_noise: float,
        generator: torch.Generator | list[torch.Generator] | None,
        callback_on_step_end: Callable | None,
        callback_on_step_end_tensor_inputs: Sequence[str],
        output_type: str = "pt",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 2 with SUPIR (Yu et al., CVPR 2024), on images whose sides are multiples of
        `pad_multiple`: SUPIR's stage 1, then its restoration-guided EDM sampler
        (`raim_diffusion.diffusion.supir_sampler`).

        ``x_lq`` is the low-quality input resized to the working size (the control input) and
        ``x_prior`` the prior's output at that size. The guidance weights are the library's
        consistency schedules evaluated on SUPIR's sigmas. Returns the images in [0, 1] (the
        latents with ``output_type="latent"``) and the stage-1 image, the colour-fix reference.
        """
        if isinstance(generator, list):
            raise ValueError("SUPIR's sampler draws one noise for the batch: pass one generator, "
                             "not a list")
        device = self._execution_device
        n = x_lq.shape[0]
        dtype = self.unet.dtype
        vae_tile = self._vae_tile(vae_tile, tuple(x_lq.shape[-2:]))

        # 2a. Stage 1: the control latent (degradation-robust encoder) and the guidance centre.
        if supir_stage1 == "supir":
            lq_latent, x_center, x_stage1 = supir_sampler.supir_stage1(
                self.supir_denoise_encoder, self.vae, x_lq, generator=generator
            )
        else:
            lq_latent = self.supir_denoise_encoder.encode(x_lq, self.vae).float()
            x_center = self._encode(x_prior, vae_tile).float()
            x_stage1 = x_prior
        lq_latent, x_center = lq_latent.to(device), x_center.to(device)

        # 2b. Text conditioning with SDXL's micro-conditioning at the working size.
        cfg = _uses_cfg(guidance_scale, guidance_scale_start)
        size = tuple(x_lq.shape[-2:])

        def added(pooled: torch.Tensor, negative: bool) -> dict[str, torch.Tensor]:
            ids = torch.tensor([self._sdxl_time_ids(size, negative=negative)] * n)
            return {"text_embeds": pooled.to(device, dtype), "time_ids": ids.to(device, dtype)}

        # 2c. Restoration guidance toward the stage-1 latent, per step run, on SUPIR's sigmas.
        sigmas = supir_sampler.supir_step_sigmas(num_inference_steps)
        run = min(int(num_inference_steps * strength), num_inference_steps)
        begin = num_inference_steps - run
        weights = consistency_weights(
            consistency_schedule,
            consistency_weight,
            run,
            sigmas=sigmas[begin:-1],
            next_sigmas=sigmas[begin + 1 :],
            sigma_max=float(supir_sampler.legacy_discrete_sigmas()[-1]),
            stop=consistency_stop,
            **(consistency_schedule_kwargs or {}),
        )
        self._num_timesteps = run
        latent_hw = tuple(lq_latent.shape[-2:])
        tile_size = self._latent_tile(tile, latent_hw, n * (2 if cfg else 1))
        tile_stride = 64
        if tile_size is not None:
            overlap = tile_size // 2 if tile_overlap is None else tile_overlap
            tile_stride = max(tile_size - overlap, 1)

        # 2d. SUPIR's sampler; the callback sees the step's EDM sigma as its timestep.
        state = {"z_prior": x_center, "prompt_embeds": prompt_embeds}
        with self.progress_bar(total=run) as bar:

            def step_end(i: int, latents: torch.Tensor) -> torch.Tensor | None:
                bar.update()
                if callback_on_step_end is None:
                    return None
                state["latents"] = latents
                kwargs = {k: state[k] for k in callback_on_step_end_tensor_inputs}
                sigma = torch.tensor(float(sigmas[i]))
                return (callback_on_step_end(self, i - begin, sigma, kwargs) or {}).get("latents")

            latents = supir_sampler.supir_sample(
                self.supir_control,
                self.unet,
                lq_latent=lq_latent,
                x_center=x_center,
                prompt_embeds=prompt_embeds.to(device, dtype),
                added_cond_kwargs=added(pooled_prompt_embeds, negative=False),
                negative_prompt_embeds=(
                    negative_prompt_embeds.to(device, dtype) if cfg else None
                ),
                negative_added_cond_kwargs=(
                    added(negative_pooled_prompt_embeds, negative=True) if cfg else None
                ),
                num_inference_steps=num_inference_steps,
                strength=strength,
                guidance_scale=guidance_scale,
                guidance_scale_start=guidance_scale_start,
                control_scale=control_scale,
                control_scale_start=control_scale_start,
                restoration_weights=weights,
                s_churn=s_churn,
                s_noise=s_noise,
                generator=generator,
                tile_size=tile_size,
                tile_stride=tile_stride,
                callback=step_end,
            )

        # 2e. Decode.
        return (latents if output_type == "latent" else self._decode(latents, vae_tile)), x_stage1

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
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        num_inference_steps: int = 30,
        strength: float = 0.5,
        guidance_scale: float = 5.0,
        guidance_scale_start: float | None = None,
        consistency_weight: float = 0.5,
        consistency_schedule: str = "cosine",
        consistency_stop: float = 1.0,
        consistency_schedule_kwargs: dict[str, Any] | None = None,
        color_fix: str = "wavelet",
        upscale: float | None = 1.0,
        input_blend: float = 0.0,
        min_size: int | None = None,
        tile: int | None = None,
        tile_overlap: int | None = None,
        vae_tile: int | None = None,
        controlnet_conditioning_scale: float = 1.0,
        control_guidance_start: float = 0.0,
        control_guidance_end: float = 1.0,
        control_scale: float = 1.0,
        control_scale_start: float | None = None,
        supir_stage1: str = "supir",
        eta: float = 0.0,
        s_churn: float = 0.0,
        s_noise: float = 1.0,
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
                `raim_diffusion.images.to_tensor`). Checked once here (finite, in [0, 1]); the
                stages only check shapes.
            prompt (`str` or `list[str]`, *optional*): one prompt, or one per image; a generic
                photo-quality prompt (``config.default_prompt``) when `None`.
            negative_prompt (`str` or `list[str]`, *optional*): likewise
                (``config.default_negative_prompt``).
            prompt_embeds, negative_prompt_embeds (`torch.Tensor`, *optional*): precomputed text
                embeddings (see `encode_prompt`), instead of ``prompt`` / ``negative_prompt``.
            pooled_prompt_embeds, negative_pooled_prompt_embeds (`torch.Tensor`, *optional*):
                SDXL's pooled embeddings, given with the embeddings above.
            num_inference_steps (`int`, defaults to 30): length of the full noise schedule.
            strength (`float`, defaults to 0.5): fraction of it that is run (img2img strength).
            guidance_scale (`float`, defaults to 5.0): classifier-free guidance (off at <= 1).
            guidance_scale_start (`float`, *optional*): SUPIR's linear CFG: the scale goes from
                this value at σ_max to ``guidance_scale`` at σ = 0, ``g(σ) = (start − cfg)·σ/σ_max
                + cfg`` (SUPIR's default start is 1.0); constant ``guidance_scale`` when `None`.
            consistency_weight (`float`, defaults to 0.5): w in ``x̂0 ← x̂0 + w(t)·(z_prior − x̂0)``,
                in [0, 1]; 0 is plain img2img, 1 returns the prior's latent.
            consistency_schedule (`str`, defaults to `"cosine"`): w(t), a name registered in
                `raim_diffusion.diffusion.guidance.CONSISTENCY_SCHEDULES` (`"constant"`,
                `"linear"`, `"cosine"`, `"power"`, `"early"`).
            consistency_stop (`float`, defaults to 1.0): guidance is off after this fraction of
                the steps.
            consistency_schedule_kwargs (`dict`, *optional*): the schedule's own parameters, e.g.
                ``{"power": 4.0}`` for `"power"` or ``{"early": 0.3}`` for `"early"`.
            color_fix (`str`, defaults to `"wavelet"`): colour correction of the generated image
                against the prior: `"wavelet"`, `"adain"` or `"none"`.
            upscale (`float`, *optional*, defaults to 1.0): output size / input size. RAIM is
                same-size restoration, so the output has the input's size whatever the prior's
                native scale (a x4 prior's result is resized back); ask for super-resolution
                with e.g. ``upscale=4``. `None` uses the prior's native scale (1 without one).
            input_blend (`float`, defaults to 0.0): stage 1 returns ``(1 - a)·prior + a·input``
                (the input resized to the output size), MiAlgo's fixed blend; not applied when
                the prior holds MiAlgo's learned blend head, which replaces it.
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
            control_scale (`float`, defaults to 1.0): SUPIR's control strength (``s_stage2``);
                0 is plain SDXL. Only with SUPIR (``supir_control``).
            control_scale_start (`float`, *optional*): SUPIR's linear control scale
                (``spt_linear_s_stage2``): from this value at σ_max to ``control_scale`` at σ = 0;
                constant when `None`.
            supir_stage1 (`str`, defaults to `"supir"`): with SUPIR, the stage-1 latent the
                guidance pulls toward and the colour-fix reference: `"supir"` (SUPIR's own: its
                degradation-robust encoder's latent of the input, decoded and re-encoded) or
                `"prior"` (the prior's output encoded: the GAN prior as SUPIR's stage 1). With
                SUPIR, ``consistency_*`` set the restoration guidance toward it on SUPIR's sigma
                schedule (SUPIR's own ``s_stage1 = tau`` is ``consistency_schedule="supir"``,
                ``consistency_weight=1``, ``consistency_schedule_kwargs={"tau": tau}``; SUPIR's
                default, no guidance, is ``consistency_weight=0``), ``strength`` below 1 starts
                from the noised stage-1 latent instead of pure noise (SUPIR: 1), ``tile`` /
                ``tile_overlap`` are SUPIR's latent tiles (overlap ``tile // 2`` by default, as
                SUPIR's 128/64), and ``min_size`` is SUPIR's working short side (1024).
            eta (`float`, defaults to 0.0): DDIM's eta.
            s_churn (`float`, defaults to 0.0), s_noise (`float`, defaults to 1.0): EDM churn
                (Karras et al. 2022), through the step of schedulers that take it, such as
                diffusers' `EulerDiscreteScheduler` (SUPIR uses s_churn 5, s_noise 1.01).
            generator (`torch.Generator` or a list, one per image, *optional*): randomness.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"`, or `"latent"`
                (stage 2's denoised latents as ``images``, before decoding; stages 3 and 4 do
                not run).
            return_dict (`bool`, defaults to `True`): return a `RaimPipelineOutput` or a tuple
                ``(images, prior_images, generated_images, masks)``.
            callback_on_step_end (`Callable`, *optional*): ``callback(pipe, step, timestep,
                callback_kwargs) -> dict`` after every denoising step; may replace ``latents``
                and ``prompt_embeds`` (with SUPIR: ``latents`` only, and ``timestep`` is the
                step's EDM sigma).
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to ``["latents"]``): what
                ``callback_kwargs`` holds, from ``_callback_tensor_inputs``.
            stages (`Sequence[str]`, defaults to all): which of ``("prior", "generate",
                "detect", "fuse")`` run; a skipped stage passes its input through. ``detect``
                needs ``generate`` and ``fuse`` needs ``detect``.
            detector (`ArtifactDetector` or `str`, *optional*): stage-3 artifact detector, or
                the name/YAML of a parameter set in ``masks/``; ``"desra-default"`` with the
                pipeline's ``segmenter`` when `None`.
            contrast_threshold (`float`, *optional*): override of the detector's threshold on
                the class-weighted local-contrast similarity (0.7 in DeSRA; lower flags less).
            area_threshold (`float`, *optional*): smallest region kept, as a fraction of the
                image area, instead of the detector's rule (DeSRA's fixed 4000 px by default).
            fusion_tile (`int`, *optional*): tile size of the fusion network (whole image
                when `None`).

        Returns:
            `RaimPipelineOutput` or `tuple`.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(
            strength=strength,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            guidance_scale_start=guidance_scale_start,
            consistency_weight=consistency_weight,
            consistency_schedule=consistency_schedule,
            consistency_stop=consistency_stop,
            consistency_schedule_kwargs=consistency_schedule_kwargs,
            color_fix=color_fix,
            upscale=upscale,
            input_blend=input_blend,
            min_size=min_size,
            tile=tile,
            tile_overlap=tile_overlap,
            vae_tile=vae_tile,
            fusion_tile=fusion_tile,
            eta=eta,
            s_churn=s_churn,
            s_noise=s_noise,
            output_type=output_type,
            stages=stages,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            controlnet_conditioning_scale=controlnet_conditioning_scale,
            control_guidance_start=control_guidance_start,
            control_guidance_end=control_guidance_end,
            control_scale=control_scale,
            control_scale_start=control_scale_start,
            supir_stage1=supir_stage1,
            contrast_threshold=contrast_threshold,
            area_threshold=area_threshold,
        )
        stages = check_stages(stages)
        if output_type == "latent":
            stages = tuple(s for s in stages if s in ("prior", "generate"))
        self._check_components(stages)
        self._guidance_scale = guidance_scale
        self._num_timesteps = 0
        device = self._execution_device

        # 0. Inputs: one float32 NCHW batch, checked once (finite, in [0, 1]).
        x_lq = to_tensor(image).to(device=device, dtype=torch.float32)
        n = x_lq.shape[0]
        if isinstance(generator, list) and len(generator) != n:
            raise ValueError(f"generator is a list of {len(generator)}; give one per image ({n})")
        methods: dict[str, str] = {}
        # Non-finite values produced by a model are collected per stage without a host sync
        # and reported once at the end, naming the stage that produced them.
        finite: dict[str, torch.Tensor] = {}

        # 1. Prior: faithful restoration at the output size.
        run_prior = "prior" in stages
        if upscale is None:
            upscale = self.prior.scale if (run_prior and self.prior is not None) else 1.0
        if run_prior:
            x_prior = self.run_prior(x_lq, upscale, input_blend)
            methods["prior"] = type(self.prior).__name__ if self.prior is not None else "bicubic"
            finite["prior"] = torch.isfinite(x_prior).all()
        else:
            x_prior = resize(x_lq, scaled_size(tuple(x_lq.shape[-2:]), upscale))
        target = tuple(x_prior.shape[-2:])

        # 2. Generate: consistency-guided img2img from the prior, at >= min_size, padded.
        if "generate" in stages:
            x_work = x_prior
            if min_size is not None and min(target) < min_size:
                x_work = resize(x_prior, scaled_size(target, min_size / min(target)))
            work_hw = tuple(x_work.shape[-2:])
            embeds = self.encode_prompt(
                None if prompt_embeds is not None
                else _as_list(prompt, n, "prompt", self.config.default_prompt),
                device,
                do_classifier_free_guidance=_uses_cfg(guidance_scale, guidance_scale_start),
                negative_prompt=None if negative_prompt_embeds is not None else _as_list(
                    negative_prompt, n, "negative_prompt", self.config.default_negative_prompt
                ),
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds,
                negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            )
            embeds = tuple(_repeat_batch(e, n) for e in embeds)
            if embeds[0].shape[0] != n:
                raise ValueError(f"prompt_embeds holds {embeds[0].shape[0]} embeddings for {n} "
                                 "images; give one, or one per image")
            x_ref = None
            if self.supir_control is not None:
                x_gen, x_ref = self.generate_supir(
                    pad_to_multiple(resize(x_lq, work_hw), self.pad_multiple),
                    pad_to_multiple(x_work, self.pad_multiple),
                    *embeds,
                    supir_stage1=supir_stage1,
                    num_inference_steps=num_inference_steps,
                    strength=strength,
                    guidance_scale=guidance_scale,
                    guidance_scale_start=guidance_scale_start,
                    consistency_weight=consistency_weight,
                    consistency_schedule=consistency_schedule,
                    consistency_stop=consistency_stop,
                    consistency_schedule_kwargs=consistency_schedule_kwargs,
                    control_scale=control_scale,
                    control_scale_start=control_scale_start,
                    tile=tile,
                    tile_overlap=tile_overlap,
                    vae_tile=vae_tile,
                    s_churn=s_churn,
                    s_noise=s_noise,
                    generator=generator,
                    callback_on_step_end=callback_on_step_end,
                    callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                    output_type="latent" if output_type == "latent" else "pt",
                )
            else:
                x_gen = self.generate(
                    pad_to_multiple(x_work, self.pad_multiple),
                    *embeds,
                    num_inference_steps=num_inference_steps,
                    strength=strength,
                    guidance_scale=guidance_scale,
                    guidance_scale_start=guidance_scale_start,
                    consistency_weight=consistency_weight,
                    consistency_schedule=consistency_schedule,
                    consistency_stop=consistency_stop,
                    consistency_schedule_kwargs=consistency_schedule_kwargs,
                    tile=tile,
                    tile_overlap=tile_overlap,
                    vae_tile=vae_tile,
                    controlnet_conditioning_scale=controlnet_conditioning_scale,
                    control_guidance_start=control_guidance_start,
                    control_guidance_end=control_guidance_end,
                    eta=eta,
                    s_churn=s_churn,
                    s_noise=s_noise,
                    generator=generator,
                    callback_on_step_end=callback_on_step_end,
                    callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                    output_type="latent" if output_type == "latent" else "pt",
                )
            x_gen = x_gen.to(device)
            if output_type == "latent":
                self.maybe_free_model_hooks()
                latents = x_gen.float()
                out = (latents, x_prior.float().cpu(), None, None)
                if not return_dict:
                    return out
                return RaimPipelineOutput(*out, artifacts=None, methods=methods)
            x_gen = resize(crop(x_gen, work_hw), target)
            # SUPIR colour-fixes against its stage-1 image (the prior's output when it is that).
            x_ref = x_prior if x_ref is None else resize(crop(x_ref.to(device), work_hw), target)
            x_gen = apply_color_fix(x_gen, x_ref.to(x_gen.dtype), color_fix)
            methods["generate"] = type(self.unet).__name__
            finite["generate"] = torch.isfinite(x_gen).all()
        else:
            x_gen = x_prior

        # 3. Detect: where the generated image drifted from the prior.
        masks = artifacts = None
        if "detect" in stages:
            overrides: dict[str, Any] = {}
            if contrast_threshold is not None:
                overrides["contrast_threshold"] = contrast_threshold
            if area_threshold is not None:  # a fraction of the image area replaces the px rule
                overrides.update(area_threshold=area_threshold, area_threshold_px=None)
            detector = self.make_detector(detector, **overrides)
            self._raise_if_not_finite(finite)  # a NaN image would read as "no artifacts"
            artifacts = self.detect_artifacts(x_gen, x_prior, detector)
            masks = artifacts.masks.to(device=x_gen.device, dtype=x_gen.dtype)
            methods["segmentation"] = artifacts.segmentation

        # 4. Fuse: re-restore the masked regions, keep the rest of the generated image.
        x_out = x_gen
        if "fuse" in stages and masks is not None:
            x_lq_up = resize(x_lq, target)
            x_out = self.fuse_artifacts(x_lq_up, x_gen, x_prior, masks, tile=fusion_tile)
            methods["fusion"] = (
                "pyramid-blend" if self.fusion is None
                else type(fusion_architecture(self.fusion)).__name__
            )
            finite["fuse"] = torch.isfinite(x_out).all()

        self.maybe_free_model_hooks()
        self._raise_if_not_finite(finite)
        result = (
            self._convert(x_out.clamp(0, 1), output_type),
            self._convert(x_prior, output_type),
            self._convert(x_gen, output_type),
            self._convert(masks, output_type),
        )
        if not return_dict:
            return result
        return RaimPipelineOutput(*result, artifacts=artifacts, methods=methods)

    @staticmethod
    def _raise_if_not_finite(finite: dict[str, torch.Tensor]) -> None:
        """Raise naming the first stage whose model produced NaN or inf (one host sync)."""
        if not finite:
            return
        names = list(finite)
        ok = torch.stack([finite[k].to("cpu") for k in names]).tolist()
        for name, good in zip(names, ok, strict=True):
            if not good:
                raise FloatingPointError(
                    f"stage '{name}' produced NaN or infinite values: its model is at fault "
                    "(NaN weights, or a diverged UNet / VAE in half precision: try "
                    "dtype float32 or bfloat16), not the input image"
                )
        finite.clear()
