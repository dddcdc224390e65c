"""The guided img2img denoising loop (stage 2), with optional latent tiling and ControlNet.

`guided_denoise` runs diffusers' img2img loop (classifier-free guidance, any scheduler, SD or
SDXL conditioning, optional ControlNet) and applies consistency guidance to the model output of
every step (`raim_diffusion.diffusion.guidance`). With all weights 0 it reproduces
``StableDiffusionImg2ImgPipeline(..., output_type="latent")`` from the same noise.

Large latents are processed in overlapping tiles. As in DiffBIR (Lin et al., arXiv:2308.15070) the
tiles' *model outputs* are blended with Gaussian weights at every step and the scheduler update
runs once on the whole latent, so the sampler sees one consistent image. All tiles of a step are
stacked into batches of ``tile_batch`` tiles.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..tiling import TileGrid
from .guidance import apply_consistency, predict_x0, scheduler_alpha_sigma

__all__ = [
    "add_noise",
    "auto_latent_tile",
    "guided_denoise",
    "img2img_timesteps",
    "step_sigmas",
]


def img2img_timesteps(
    scheduler, num_inference_steps: int, strength: float, device: torch.device | str | None = None
) -> tuple[torch.Tensor, int]:
    """Set the scheduler up for img2img and return the timesteps to run.

    Same rule as diffusers' img2img pipelines: the last ``int(steps·strength)`` steps of a
    ``num_inference_steps`` schedule are run.

    Args:
        scheduler: a diffusers scheduler.
        num_inference_steps (`int`): length of the full schedule.
        strength (`float`): fraction of it to run, in (0, 1].
        device: device of the timesteps.

    Returns:
        `tuple[torch.Tensor, int]`: the timesteps and the index of the first in the schedule.
    """
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps!r} must be a positive int")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength={strength!r} must be in (0, 1]")
    scheduler.set_timesteps(num_inference_steps, device=device)
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    if init_timestep < 1:
        raise ValueError(
            f"strength={strength} with num_inference_steps={num_inference_steps} runs no step; "
            "raise one of them"
        )
    begin = (num_inference_steps - init_timestep) * scheduler.order
    timesteps = scheduler.timesteps[begin:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    return timesteps, begin


def step_sigmas(scheduler, timesteps: torch.Tensor, begin_index: int = 0) -> torch.Tensor:
    """EDM sigma (σ/α, the noise-to-signal ratio) of every step, float32 on the CPU."""
    alpha, sigma = scheduler_alpha_sigma(scheduler, timesteps.cpu(), begin_index)
    return sigma / alpha


def next_step_sigmas(
    scheduler, timesteps: torch.Tensor, begin_index: int = 0
) -> torch.Tensor:
    """EDM sigma after each step (the next step's, and the scheduler's final one after the last),
    float32 on the CPU."""
    n = len(timesteps)
    table = getattr(scheduler, "sigmas", None)
    if isinstance(table, torch.Tensor) and len(table) == len(scheduler.timesteps) + 1:
        return table[begin_index + 1 : begin_index + n + 1].detach().float().cpu()
    current = step_sigmas(scheduler, timesteps, begin_index)
    final_abar = getattr(scheduler, "final_alpha_cumprod", None)
    if final_abar is None:
        final = torch.zeros(1)
    else:
        abar = torch.as_tensor(final_abar, dtype=torch.float64)
        final = ((1 - abar) / abar).sqrt().float().reshape(1)
    return torch.cat([current[1:], final])


def scheduler_sigma_max(scheduler) -> float:
    """The largest EDM sigma the scheduler was trained with (14.6146 for SD/SDXL's schedule)."""
    abar = getattr(scheduler, "alphas_cumprod", None)
    if isinstance(abar, torch.Tensor) and len(abar):
        last = abar[-1].double()
        return float(((1 - last) / last).sqrt())
    sigma_max = scheduler.config.get("sigma_max")
    if sigma_max is None:
        raise ValueError(f"{type(scheduler).__name__} has neither alphas_cumprod nor sigma_max")
    return float(sigma_max)


def linear_guidance_scales(
    guidance_scale: float, start: float | None, sigmas: torch.Tensor, sigma_max: float
) -> torch.Tensor | float:
    """SUPIR's linear CFG: ``g(σ) = (start − cfg)·σ/σ_max + cfg`` per step, or the constant
    ``guidance_scale`` when ``start`` is `None`."""
    if start is None:
        return guidance_scale
    s = sigmas.detach().to("cpu", torch.float64)
    return ((start - guidance_scale) * s / sigma_max + guidance_scale).float()


def add_noise(
    scheduler,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Noise clean latents to the first timestep, drawing the noise as diffusers' img2img does."""
    noise = randn_tensor(
        latents.shape, generator=generator, device=latents.device, dtype=latents.dtype
    )
    return scheduler.add_noise(latents, noise, timesteps[:1].repeat(latents.shape[0]))


def auto_latent_tile(
    latent_hw: tuple[int, int],
    batch: int,
    device: torch.device,
    *,
    bytes_per_latent_pixel: int = 1 << 17,
    minimum: int = 32,
) -> int | None:
    """A latent tile size that fits free device memory, or `None` when the latent fits whole.

    The UNet's activation memory grows with the number of latent pixels (and with self-attention
    at the top levels); ``bytes_per_latent_pixel`` is a conservative budget measured for SDXL in
    half precision with SDPA. On the CPU memory is not the limit, so nothing is tiled.

    Args:
        latent_hw (`tuple[int, int]`): latent height and width.
        batch (`int`): images per UNet call (2 per image with classifier-free guidance).
        device (`torch.device`): where the UNet runs.

    Returns:
        `int` or `None`: the tile side, a multiple of 8, or `None` for no tiling.
    """
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    pixels = max(int(free * 0.8) // (bytes_per_latent_pixel * max(batch, 1)), 1)
    side = int(pixels**0.5) // 8 * 8
    if side >= max(latent_hw):
        return None
    return max(side, minimum)


def _step_kwargs(
    scheduler, generator: Any, eta: float, s_churn: float = 0.0, s_noise: float = 1.0
) -> dict[str, Any]:
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    if s_churn or s_noise != 1.0:
        if not {"s_churn", "s_noise"} <= params:
            raise ValueError(
                f"s_churn={s_churn} / s_noise={s_noise} (EDM churn) need a scheduler whose step "
                f"takes them, such as EulerDiscreteScheduler; {type(scheduler).__name__} does not"
            )
        kwargs.update(s_churn=s_churn, s_noise=s_noise)
    return kwargs


def _repeat_cond(value: torch.Tensor | None, reps: int, cfg: bool) -> torch.Tensor | None:
    """Repeat a (2N, ...) [uncond; cond] or (N, ...) conditioning for ``reps`` tile-major tiles."""
    if value is None or reps == 1:
        return value
    if cfg:
        uncond, cond = value.chunk(2)
        return torch.cat([uncond.repeat(reps, *([1] * (value.ndim - 1))),
                          cond.repeat(reps, *([1] * (value.ndim - 1)))])
    return value.repeat(reps, *([1] * (value.ndim - 1)))


def guided_denoise(
    unet: torch.nn.Module,
    scheduler,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    encoder_hidden_states: torch.Tensor,
    z_prior: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    guidance_scale: float | torch.Tensor = 1.0,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    timestep_cond: torch.Tensor | None = None,
    controlnet: torch.nn.Module | None = None,
    control_image: torch.Tensor | None = None,
    control_scales: torch.Tensor | None = None,
    begin_index: int = 0,
    tile: int | None = None,
    tile_overlap: int | None = None,
    tile_batch: int = 4,
    generator: torch.Generator | list[torch.Generator] | None = None,
    eta: float = 0.0,
    s_churn: float = 0.0,
    s_noise: float = 1.0,
    progress_bar: Callable | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], dict] | None = None,
) -> torch.Tensor:
    """Denoise ``latents`` over ``timesteps`` with consistency guidance towards ``z_prior``.

    Args:
        unet (`UNet2DConditionModel`): the denoiser.
        scheduler: a diffusers scheduler, already set up (see `img2img_timesteps`).
        latents (`torch.Tensor`): noisy latents at ``timesteps[0]`` (see `add_noise`), (N, 4, h, w).
        timesteps (`torch.Tensor`): the timesteps to run.
        encoder_hidden_states (`torch.Tensor`): text embeddings, ``[uncond; cond]`` (2N, L, D)
            when ``guidance_scale > 1``, else (N, L, D).
        z_prior (`torch.Tensor`, *optional*): the prior's latent, (N, 4, h, w).
        weights (`torch.Tensor`, *optional*): consistency weight of every step, see
            `consistency_weights`; no guidance when `None`.
        guidance_scale (`float` or `torch.Tensor`, defaults to 1.0): classifier-free guidance
            scale, or one per step (SUPIR's linear CFG); off when every scale is <= 1.
        added_cond_kwargs (`dict`, *optional*): SDXL's ``text_embeds`` and ``time_ids``, laid
            out like ``encoder_hidden_states``.
        timestep_cond (`torch.Tensor`, *optional*): for UNets with ``time_cond_proj_dim``.
        controlnet (`ControlNetModel`, *optional*): fed ``control_image``.
        control_image (`torch.Tensor`, *optional*): (N, 3, h·f, w·f) in [0, 1], f the VAE factor.
        control_scales (`torch.Tensor`, *optional*): ControlNet scale of every step (0 outside
            ``control_guidance_start/end``).
        begin_index (`int`, defaults to 0): index of ``timesteps[0]`` in the full schedule.
        tile (`int`, *optional*): latent tile size; `None` (or a tile covering the latent)
            processes the latent whole.
        tile_overlap (`int`, *optional*): overlap of latent tiles, a quarter of ``tile`` by default.
        tile_batch (`int`, defaults to 4): tiles per UNet call.
        generator: for stochastic schedulers (Euler ancestral, DDPM, SDE solvers).
        eta (`float`, defaults to 0.0): DDIM's eta.
        s_churn (`float`, defaults to 0.0), s_noise (`float`, defaults to 1.0): EDM churn
            (Karras et al. 2022, Algorithm 2) of schedulers whose step takes them (Euler).
        progress_bar: ``pipeline.progress_bar``-like context manager factory taking ``total``.
        callback (`Callable`, *optional*): ``callback(i, t, latents) -> dict`` after each step;
            the dict may replace ``"latents"`` and ``"prompt_embeds"`` (the text embeddings,
            laid out like ``encoder_hidden_states``) for the following steps.

    Returns:
        `torch.Tensor`: the denoised latents.
    """
    num_steps = len(timesteps)
    if isinstance(guidance_scale, torch.Tensor):
        cfg = bool((guidance_scale > 1.0).any())  # once, before the loop
        scales = guidance_scale.to(latents.device, torch.float32)
    else:
        cfg = guidance_scale > 1.0
        scales = None
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    guided = z_prior is not None and weights is not None
    if guided:
        if z_prior.shape != latents.shape:
            raise ValueError(
                f"z_prior has shape {tuple(z_prior.shape)} but latents {tuple(latents.shape)}"
            )
        if len(weights) != num_steps:
            raise ValueError(f"weights has {len(weights)} entries for {num_steps} steps")
        alphas, sigmas = scheduler_alpha_sigma(scheduler, timesteps, begin_index)
        alphas = alphas.to(latents.device)
        sigmas = sigmas.to(latents.device)
        weights = weights.to(latents.device, torch.float32)
        z_prior = z_prior.to(latents.dtype)
    if controlnet is not None:
        if control_image is None:
            raise ValueError("controlnet needs control_image")
        if control_scales is None:
            control_scales = torch.ones(num_steps)
        control_scales = control_scales.to(latents.device, latents.dtype)
        control_image = control_image.to(latents.device, latents.dtype)

    n, _, h, w = latents.shape
    grid = None
    if tile is not None and (tile < h or tile < w):
        overlap = tile // 4 if tile_overlap is None else tile_overlap
        grid = TileGrid(h, w, tile, overlap, weight="gaussian")
    step_kwargs = _step_kwargs(scheduler, generator, eta, s_churn, s_noise)

    def predict(x_in: torch.Tensor, t: torch.Tensor, i: int, control: torch.Tensor | None,
                ehs: torch.Tensor, added: dict[str, torch.Tensor] | None) -> torch.Tensor:
        model_in = torch.cat([x_in] * 2) if cfg else x_in
        residuals: dict[str, Any] = {}
        if controlnet is not None:
            down, mid = controlnet(
                model_in,
                t,
                encoder_hidden_states=ehs,
                controlnet_cond=torch.cat([control] * 2) if cfg else control,
                conditioning_scale=control_scales[i],
                added_cond_kwargs=added,
                return_dict=False,
            )
            residuals = dict(
                down_block_additional_residuals=down, mid_block_additional_residual=mid
            )
        out = unet(
            model_in,
            t,
            encoder_hidden_states=ehs,
            timestep_cond=timestep_cond,
            added_cond_kwargs=added,
            return_dict=False,
            **residuals,
        )[0]
        if cfg:
            uncond, cond = out.chunk(2)
            g = guidance_scale if scales is None else scales[i].to(out.dtype)
            out = uncond + g * (cond - uncond)
        return out

    def predict_tiled(x_in: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
        if grid is None:
            return predict(x_in, t, i, control_image, encoder_hidden_states, added_cond_kwargs)
        tiles = grid.split(x_in)
        ctrl_tiles = None
        if control_image is not None:
            f = control_image.shape[-1] // w
            ctrl_tiles = torch.cat([
                control_image[..., y * f:(y + th) * f, x * f:(x + tw) * f]
                for y, x, th, tw in grid.tiles
            ])
        outputs = []
        per_call = max(1, tile_batch)
        for start in range(0, len(grid), per_call):
            k = min(per_call, len(grid) - start)
            sl = slice(start * n, (start + k) * n)
            added = None
            if added_cond_kwargs is not None:
                added = {key: _repeat_cond(v, k, cfg) for key, v in added_cond_kwargs.items()}
            outputs.append(predict(
                tiles[sl], t, i, None if ctrl_tiles is None else ctrl_tiles[sl],
                _repeat_cond(encoder_hidden_states, k, cfg), added,
            ))
        return grid.merge(torch.cat(outputs))

    bar = progress_bar(total=num_steps) if progress_bar is not None else None
    for i, t in enumerate(timesteps):
        x_in = scheduler.scale_model_input(latents, t)
        out = predict_tiled(x_in, t, i)
        if guided:
            out = apply_consistency(
                out, x_in, z_prior, weights[i], alphas[i], sigmas[i], prediction_type
            )
        stepped = scheduler.step(out, t, latents, **step_kwargs, return_dict=False)[0]
        if guided and i == num_steps - 1:
            # Schedulers that stop above zero noise (DDIM and PNDM with set_alpha_to_one=False,
            # as SD ships them) re-noise the last x̂0 to alphas_cumprod[0], and PNDM also mixes
            # earlier steps' ε in. The guidance applies to that remainder too: the result moves
            # by w towards the last guided x̂0, so w = 1 lands on z_prior with every scheduler,
            # w = 0 is left bit for bit, and schedulers that end at σ = 0 barely move.
            w = weights[i]
            x0 = predict_x0(out, x_in, alphas[i], sigmas[i], prediction_type)
            pulled = stepped.float() + w * (x0 - stepped.float())
            stepped = torch.where(w > 0, pulled.to(stepped.dtype), stepped)
        latents = stepped
        if callback is not None:
            replaced = callback(i, t, latents) or {}
            latents = replaced.get("latents", latents)
            encoder_hidden_states = replaced.get("prompt_embeds", encoder_hidden_states)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return latents
