"""SUPIR's restoration-guided EDM sampler, optionally tiled.

The sampler of SUPIR (Yu et al., "Scaling Up to Excellence", CVPR 2024,
https://arxiv.org/abs/2401.13627, Sec. 3.4 "restoration-guided sampling"; public code at
https://github.com/Fanghua-Yu/SUPIR, ``RestoreEDMSampler`` and ``LinearCFG`` in
``sgm/modules/diffusionmodules``): Euler steps in EDM form (Karras et al., 2022,
https://arxiv.org/abs/2206.00364) on SD's legacy discrete schedule, with churn, linear CFG on
the denoised prediction, a constant or linear control scale, and the pull of the predicted clean
latent toward the stage-1 latent ``x_center`` with weight ``(sigma/sigma_max)^tau``.

Large latents run as SUPIR's tiled sampler: every step runs per tile (same churn noise for all
tiles) and the post-step latents are blended with Gaussian weights (``raim_diffusion.tiling``).

SUPIR's architecture and weights are under SupPixel's non-commercial licence; see
``raim_diffusion.diffusion.supir``. This module holds only the sampling algorithm.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..tiling import blend_weights, tile_starts
from .supir import SupirControlModel, SupirDenoiseEncoder, SupirUNet2DConditionModel

__all__ = [
    "legacy_discrete_sigmas",
    "supir_image_size",
    "supir_sample",
    "supir_stage1",
    "supir_step_sigmas",
]


def legacy_discrete_sigmas(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """SD's legacy schedule as EDM sigmas: ``sqrt((1 - abar_t) / abar_t)``, ascending in ``t``.

    Betas are linear in ``sqrt(beta)`` ("scaled_linear"); ``sigma_999`` is about 14.6146.

    Returns:
        `torch.Tensor`: ``(num_train_timesteps,)`` float64 sigmas.
    """
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1.0 - betas**2, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def supir_step_sigmas(num_steps: int, discrete_sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """SUPIR's ``num_steps`` sigmas, descending, with a final 0.

    Timesteps ``floor(linspace(999, 0, n, endpoint=False))`` (SGM's legacy DDPM discretisation).

    Returns:
        `torch.Tensor`: ``(num_steps + 1,)`` float64.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    sigmas = legacy_discrete_sigmas() if discrete_sigmas is None else discrete_sigmas
    n_train = sigmas.shape[0]
    steps = torch.arange(num_steps, dtype=torch.float64)
    timesteps = torch.floor((n_train - 1) - steps * (n_train - 1) / num_steps).long()
    return torch.cat([sigmas[timesteps], sigmas.new_zeros(1)])


def supir_image_size(
    height: int, width: int, upscale: float = 1.0, min_size: int = 1024, unit: int = 64
) -> tuple[int, int]:
    """SUPIR's working size: ``x upscale``, short side raised to ``min_size``, multiples of 64.

    Returns:
        `tuple[int, int]`: ``(height, width)`` to resize the input to (bicubic) before encoding.
    """
    if height <= 0 or width <= 0 or upscale <= 0:
        raise ValueError(f"size and upscale must be positive, got {height}x{width} x{upscale}")
    h, w = height * upscale, width * upscale
    if min(h, w) < min_size:
        k = min_size / min(h, w)
        h, w = h * k, w * k
    return max(unit, int(round(h / unit)) * unit), max(unit, int(round(w / unit)) * unit)


@torch.no_grad()
def supir_stage1(
    denoise_encoder: SupirDenoiseEncoder,
    vae: torch.nn.Module,
    image: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SUPIR's own stage 1: control latent, stage-1 image and the guidance centre.

    ``z_LQ = mode(E_denoise(LQ)) * s``, ``x_stage1 = Dec(z_LQ)``, ``x_center = sample(E(x_stage1))
    * s`` (Yu et al., 2024, Sec. 3.2-3.4; SUPIR's ``batchify_sample``). To use a GAN prior as the
    stage 1 instead, encode the prior's output with the VAE and pass it as ``x_center``.

    Args:
        denoise_encoder (`SupirDenoiseEncoder`): The degradation-robust encoder.
        vae (`AutoencoderKL`): The SDXL VAE (SUPIR runs it in bf16; fp16 overflows).
        image (`torch.Tensor`): LQ image ``(B, 3, H, W)`` in [0, 1], at SUPIR's working size
            ([`supir_image_size`]).
        generator (`torch.Generator`, *optional*): For the posterior sample of ``x_center``.

    Returns:
        `tuple[torch.Tensor, torch.Tensor, torch.Tensor]`: ``lq_latent`` and ``x_center``
        (scaled latents) and ``x_stage1`` (``(B, 3, H, W)`` in [0, 1], the colour-fix reference).
    """
    scale = vae.config.scaling_factor
    vae_dtype = next(vae.parameters()).dtype
    lq_latent = denoise_encoder.encode(image, vae)
    decoded = vae.decode((lq_latent / scale).to(vae_dtype)).sample
    x_stage1 = ((decoded.float() + 1) / 2).clamp(0, 1)
    dist = vae.encode((x_stage1 * 2 - 1).to(vae_dtype)).latent_dist
    x_center = dist.sample(generator=generator) * scale
    return lq_latent.float(), x_center.float(), x_stage1


def _batch(value: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    if value.shape[0] == batch:
        return value
    if value.shape[0] == 1:
        return value.expand(batch, *value.shape[1:])
    raise ValueError(f"{name} has batch {value.shape[0]}, expected 1 or {batch}")


def supir_sample(
    control: SupirControlModel,
    unet: SupirUNet2DConditionModel,
    *,
    lq_latent: torch.Tensor,
    x_center: torch.Tensor,
    prompt_embeds: torch.Tensor,
    added_cond_kwargs: dict[str, torch.Tensor],
    negative_prompt_embeds: torch.Tensor | None = None,
    negative_added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    num_inference_steps: int = 50,
    strength: float = 1.0,
    guidance_scale: float = 4.0,
    guidance_scale_start: float | None = 1.0,
    control_scale: float = 1.0,
    control_scale_start: float | None = None,
    restoration_tau: float = -1.0,
    restoration_sigma_min: float = 0.05,
    restoration_weights: Sequence[float] | torch.Tensor | None = None,
    s_churn: float = 5.0,
    s_noise: float = 1.01,
    latents: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    tile_size: int | None = None,
    tile_stride: int = 64,
    callback: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
) -> torch.Tensor:
    r"""Sample a restored latent with SUPIR's restoration-guided EDM sampler.

    Per step ``sigma -> sigma'`` (SUPIR's ``RestoreEDMSampler``):

    1. ``gamma = min(s_churn / n, sqrt(2) - 1)``, ``sigma_hat = sigma (1 + gamma)``,
       ``x += s_noise * eps * sqrt(sigma_hat^2 - sigma^2)``;
    2. ``D = x - sigma_q * eps_theta(x / sqrt(1 + sigma_q^2), t_q)`` with ``sigma_hat`` snapped to
       the nearest of the 1000 discrete sigmas (``t_q`` its index), the control model's hints and
       the control scale; with a negative prompt, ``D = D_u + g(sigma_hat) (D_c - D_u)``, ``g``
       linear in sigma from ``guidance_scale_start`` at ``sigma_max`` to ``guidance_scale``;
    3. restoration guidance ``D <- D - w (D - x_center)``, ``w = (sigma / sigma_max)^tau`` when
       ``sigma' > restoration_sigma_min`` and ``tau > 0`` (or ``restoration_weights[i]``);
    4. Euler: ``x <- x + (x - D) / sigma_hat * (sigma' - sigma_hat)``.

    With ``strength < 1`` (the library's addition; SUPIR always starts from pure noise) only the
    last ``int(num_inference_steps * strength)`` steps run, from ``x_center + sigma_begin * eps``,
    as img2img does.

    Args:
        control (`SupirControlModel`): The control model.
        unet (`SupirUNet2DConditionModel`): The SDXL UNet with connectors.
        lq_latent (`torch.Tensor`): Control input ``(B, 4, h, w)``: the denoise encoder's latent.
        x_center (`torch.Tensor`): The stage-1 latent the guidance pulls toward, same shape
            (SUPIR: the VAE latent of the decoded ``lq_latent``; or the encoded GAN prior).
        prompt_embeds (`torch.Tensor`): SDXL text embeddings ``(B or 1, L, 2048)``.
        added_cond_kwargs (`dict`): ``text_embeds`` and ``time_ids`` for the prompt.
        negative_prompt_embeds (`torch.Tensor`, *optional*): Enables CFG.
        negative_added_cond_kwargs (`dict`, *optional*): Defaults to ``added_cond_kwargs``.
        num_inference_steps (`int`, defaults to 50): SUPIR's ``edm_steps``.
        strength (`float`, defaults to 1.0): Fraction of the steps run; 1 is SUPIR's start from
            pure noise, below 1 starts from ``x_center`` noised to the first step run.
        guidance_scale (`float`, defaults to 4.0): SUPIR's ``s_cfg`` (the scale at sigma -> 0).
        guidance_scale_start (`float`, *optional*, defaults to 1.0): SUPIR's ``spt_linear_CFG``
            (the scale at ``sigma_max``); `None` for a constant ``guidance_scale``.
        control_scale (`float`, defaults to 1.0): SUPIR's ``s_stage2``.
        control_scale_start (`float`, *optional*): SUPIR's ``spt_linear_s_stage2``: linear control
            scale from this value at ``sigma_max`` to ``control_scale``; constant when `None`.
        restoration_tau (`float`, defaults to -1): SUPIR's ``s_stage1``; off when <= 0.
        restoration_sigma_min (`float`, defaults to 0.05): No guidance when ``sigma'`` is at or
            below it (so the last step is unguided).
        restoration_weights (`Sequence[float]`, *optional*): One weight per step run, replacing
            SUPIR's schedule (1 pulls the prediction onto ``x_center``).
        s_churn (`float`, defaults to 5.0), s_noise (`float`, defaults to 1.01): Churn.
        latents (`torch.Tensor`, *optional*): Unit-variance initial noise; drawn from
            ``generator`` otherwise. It is scaled by ``sqrt(1 + sigma_0^2)`` (or by the first
            step's sigma and added to ``x_center`` when ``strength < 1``).
        generator (`torch.Generator`, *optional*): The only source of randomness (a CPU
            generator works for any device, as in diffusers).
        tile_size (`int`, *optional*): Latent tile size (SUPIR: 128); untiled when `None`.
        tile_stride (`int`, defaults to 64): Latent tile stride.
        callback (`Callable[[int, torch.Tensor], torch.Tensor | None]`, *optional*): Called
            after each step with its index in the schedule and the latent; a tensor it returns
            replaces the latent.

    Returns:
        `torch.Tensor`: The sampled latent, float32, ``(B, 4, h, w)``.
    """
    if lq_latent.ndim != 4 or x_center.shape != lq_latent.shape:
        raise ValueError(
            f"lq_latent and x_center must be NCHW of one shape, got {tuple(lq_latent.shape)} "
            f"and {tuple(x_center.shape)}"
        )
    if s_noise < 0 or s_churn < 0:
        raise ValueError(f"s_churn and s_noise must be >= 0, got {s_churn} and {s_noise}")
    device = lq_latent.device
    b, c, h, w = lq_latent.shape
    discrete = legacy_discrete_sigmas().to(device)
    sigmas = supir_step_sigmas(num_inference_steps, discrete.cpu()).tolist()
    sigma_max = float(discrete[-1])
    n = num_inference_steps
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength={strength!r} must be in (0, 1]")
    run = min(int(n * strength), n)
    if run < 1:
        raise ValueError(
            f"strength={strength} with num_inference_steps={n} runs no step; raise one of them"
        )
    begin = n - run
    if restoration_weights is not None:
        weights = [float(v) for v in torch.as_tensor(restoration_weights).flatten()]
        if len(weights) != run:
            raise ValueError(
                f"restoration_weights must hold {run} values (one per step run), got "
                f"{len(weights)}"
            )
    else:
        weights = [
            (sigmas[i] / sigma_max) ** restoration_tau
            if restoration_tau > 0 and sigmas[i + 1] > restoration_sigma_min
            else 0.0
            for i in range(begin, n)
        ]
    weights = [0.0] * begin + weights

    cfg = negative_prompt_embeds is not None
    pos = _batch(prompt_embeds, b, "prompt_embeds")
    pos_add = {k: _batch(v, b, k) for k, v in added_cond_kwargs.items()}
    if cfg:
        neg = _batch(negative_prompt_embeds, b, "negative_prompt_embeds")
        neg_add = {
            k: _batch(v, b, k) for k, v in (negative_added_cond_kwargs or added_cond_kwargs).items()
        }
        ctx = torch.cat([neg, pos])
        add = {k: torch.cat([neg_add[k], pos_add[k]]) for k in pos_add}
    else:
        ctx, add = pos, pos_add
    ctrl_dtype = next(control.parameters()).dtype

    def denoise(x: torch.Tensor, lq: torch.Tensor, sigma_hat: float, scale: float) -> torch.Tensor:
        idx = int(torch.argmin((discrete - sigma_hat).abs()))
        sq = float(discrete[idx])
        x_in = x / math.sqrt(sq * sq + 1)
        reps = 2 if cfg else 1
        x_in, lq_in = torch.cat([x_in] * reps), torch.cat([lq] * reps).to(ctrl_dtype)
        t = torch.full((x_in.shape[0],), float(idx), device=device)
        hints = control(x_in, t, ctx, add, lq_in)
        eps = unet(x_in, t, ctx, added_cond_kwargs=add, supir_hints=hints, control_scale=scale)
        d = torch.cat([x] * reps) - sq * eps.sample.float()
        if not cfg:
            return d
        d_u, d_c = d.chunk(2)
        g = guidance_scale
        if guidance_scale_start is not None:
            g = (guidance_scale_start - guidance_scale) * sigma_hat / sigma_max + guidance_scale
        return d_u + g * (d_c - d_u)

    def step(
        i: int, x: torch.Tensor, noise, lq: torch.Tensor, center: torch.Tensor
    ) -> torch.Tensor:
        sigma, nxt = sigmas[i], sigmas[i + 1]
        gamma = min(s_churn / n, 2**0.5 - 1)
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            x = x + noise * s_noise * math.sqrt(sigma_hat**2 - sigma**2)
        scale = control_scale
        if control_scale_start is not None:
            scale = (sigma / sigma_max) * (control_scale_start - control_scale) + control_scale
        d = denoise(x, lq, sigma_hat, scale)
        if weights[i] != 0:
            d = d - (d - center) * weights[i]
        return x + (x - d) / sigma_hat * (nxt - sigma_hat)

    if latents is None:
        latents = randn_tensor((b, c, h, w), generator=generator, device=device,
                               dtype=torch.float32)
    elif latents.shape != lq_latent.shape:
        raise ValueError(
            f"latents must have shape {tuple(lq_latent.shape)}, got {tuple(latents.shape)}"
        )
    lq32, center32 = lq_latent.float(), x_center.float()
    if begin == 0:
        x = latents.to(device, torch.float32) * math.sqrt(1 + sigmas[0] ** 2)
    else:
        x = center32 + latents.to(device, torch.float32) * sigmas[begin]

    if tile_size is not None:
        if tile_size <= 0 or tile_stride <= 0:
            raise ValueError(
                f"tile_size and tile_stride must be positive, got {tile_size}, {tile_stride}"
            )
        th, tw = min(tile_size, h), min(tile_size, w)
        windows = [
            (y, x0)
            for y in tile_starts(h, th, tile_stride)
            for x0 in tile_starts(w, tw, tile_stride)
        ]
        weight = blend_weights(th, tw, "gaussian", dtype=torch.float32, device=device)

    with torch.no_grad():
        for i in range(begin, n):
            noise = None
            if min(s_churn / n, 2**0.5 - 1) > 0:
                noise = randn_tensor(x.shape, generator=generator, device=device,
                                     dtype=torch.float32)
            if tile_size is None:
                x = step(i, x, noise, lq32, center32)
            else:
                acc = torch.zeros_like(x)
                norm = torch.zeros_like(x[:, :1])
                for y, x0 in windows:
                    sl = (slice(None), slice(None), slice(y, y + th), slice(x0, x0 + tw))
                    tile_noise = None if noise is None else noise[sl]
                    out = step(i, x[sl], tile_noise, lq32[sl], center32[sl])
                    acc[sl] += out * weight
                    norm[sl] += weight
                x = acc / norm
            if callback is not None:
                replaced = callback(i, x)
                if replaced is not None:
                    x = replaced.to(device, torch.float32)
    return x
