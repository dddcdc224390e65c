"""Stage 2: consistency-guided SD/SDXL img2img.

- `guidance`: consistency-guidance schedules and the x̂0 ↔ model-output conversions.
- `loop`: the guided denoising loop with latent tiling and ControlNet.
- `vae`: (tiled) encode/decode between [0, 1] images and scaled latents.
- `color`: colour fixes of the generated image against the prior.
"""

from .color import adain_color_fix, color_fix, wavelet_color_fix
from .guidance import (
    CONSISTENCY_SCHEDULES,
    apply_consistency,
    consistency_weights,
    model_output_from_x0,
    predict_x0,
    scheduler_alpha_sigma,
)
from .loop import add_noise, auto_latent_tile, guided_denoise, img2img_timesteps, step_sigmas
from .vae import decode_latents, encode_latents

__all__ = [
    "CONSISTENCY_SCHEDULES",
    "adain_color_fix",
    "add_noise",
    "apply_consistency",
    "auto_latent_tile",
    "color_fix",
    "consistency_weights",
    "decode_latents",
    "encode_latents",
    "guided_denoise",
    "img2img_timesteps",
    "model_output_from_x0",
    "predict_x0",
    "scheduler_alpha_sigma",
    "step_sigmas",
    "wavelet_color_fix",
]
