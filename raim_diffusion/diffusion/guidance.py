"""Consistency guidance: pull the predicted clean latent towards the prior's latent.

At every denoising step the model output (ε or v) is turned into the predicted clean latent x̂0,
moved towards ``z_prior`` by ``x̂0 ← x̂0 + w(t)·(z_prior − x̂0)`` and turned back into an equivalent
model output *for the same noisy latent*. The scheduler then steps as usual, so the same code
works for every diffusers scheduler (DDIM, Euler, Euler ancestral, DPM-Solver++, UniPC, ...) and
both prediction types. This is the restoration-guided sampling of SUPIR (Yu et al., "Scaling Up
to Excellence", CVPR 2024, arXiv:2401.13627) and the consistency-guided sampling of So Elegant's
CGSD (NTIRE 2024 RAIM report, arXiv:2405.09923), expressed in diffusers' conventions.

Conventions: the UNet always sees the variance-preserving input ``x_in = α·x0 + σ·ε`` with
``α² + σ² = 1`` (``x_in = scheduler.scale_model_input(latents, t)``), and v = α·ε − σ·x0.
Sigma-parametrised schedulers (Euler-like) keep ``latents = x_in·√(1+s²)`` with the EDM sigma
``s = σ/α``; their own x̂0 formulas agree with the ones below, so replacing the model output is
exact for them too.

Every quantity the step needs (α, σ, w) is precomputed as a tensor before the loop, so the step
has no host synchronisation and no Python-side branching on values (``torch.compile`` friendly).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = [
    "CONSISTENCY_SCHEDULES",
    "apply_consistency",
    "consistency_weights",
    "model_output_from_x0",
    "predict_x0",
    "register_consistency_schedule",
    "scheduler_alpha_sigma",
]

PREDICTION_TYPES = ("epsilon", "v_prediction")


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type={prediction_type!r} is not supported; use one of {PREDICTION_TYPES}"
        )


def scheduler_alpha_sigma(
    scheduler, timesteps: torch.Tensor, begin_index: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Signal and noise coefficients (α_i, σ_i) of the model input at each step, as the scheduler
    itself will use them.

    Schedulers that keep a ``sigmas`` table with one entry per step plus the final one (Euler,
    Euler ancestral, Heun, DPM-Solver++, UniPC, LMS, ...) are read from that table, which is exact
    also with Karras/exponential/beta sigmas whose timesteps are rounded. The others (DDIM,
    DDPM, PNDM) are read from ``alphas_cumprod`` at the integer timestep.

    Args:
        scheduler: a diffusers scheduler after ``set_timesteps``.
        timesteps (`torch.Tensor`): the timesteps that will be run (possibly a suffix of
            ``scheduler.timesteps`` for img2img).
        begin_index (`int`, defaults to 0): index of ``timesteps[0]`` in ``scheduler.timesteps``.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: α and σ, float32, shape ``(len(timesteps),)``,
        on the device of ``timesteps``.
    """
    n = len(timesteps)
    device = timesteps.device
    sigmas = getattr(scheduler, "sigmas", None)
    all_timesteps = getattr(scheduler, "timesteps", None)
    table = (
        isinstance(sigmas, torch.Tensor)
        and all_timesteps is not None
        and len(sigmas) == len(all_timesteps) + 1
    )
    if table:
        edm_sigma = sigmas[begin_index : begin_index + n].to(device=device, dtype=torch.float64)
        alpha = 1.0 / torch.sqrt(edm_sigma**2 + 1.0)
        sigma = edm_sigma * alpha
    else:
        alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float64)
        abar = alphas_cumprod[timesteps.to(device).long()]
        alpha = abar.sqrt()
        sigma = (1.0 - abar).sqrt()
    return alpha.float(), sigma.float()


def predict_x0(
    model_output: torch.Tensor,
    model_input: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """Predicted clean latent from the model output.

    Args:
        model_output (`torch.Tensor`): ε or v predicted for ``model_input``.
        model_input (`torch.Tensor`): the VP noisy latent ``α·x0 + σ·ε`` given to the model.
        alpha (`torch.Tensor`), sigma (`torch.Tensor`): 0-d (or broadcastable) coefficients.
        prediction_type (`str`): `"epsilon"` or `"v_prediction"`.

    Returns:
        `torch.Tensor`: x̂0, float32.
    """
    _check_prediction_type(prediction_type)
    out = model_output.float()
    x = model_input.float()
    if prediction_type == "epsilon":
        return (x - sigma * out) / alpha
    return alpha * x - sigma * out


def model_output_from_x0(
    x0: torch.Tensor,
    model_input: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """The ε or v that, for the same ``model_input``, predicts ``x0`` (inverse of `predict_x0`).

    Args:
        x0 (`torch.Tensor`): the clean latent to encode.
        model_input (`torch.Tensor`): the VP noisy latent given to the model.
        alpha (`torch.Tensor`), sigma (`torch.Tensor`): 0-d (or broadcastable) coefficients.
        prediction_type (`str`): `"epsilon"` or `"v_prediction"`.

    Returns:
        `torch.Tensor`: ε or v, float32.
    """
    _check_prediction_type(prediction_type)
    x = model_input.float()
    if prediction_type == "epsilon":
        return (x - alpha * x0) / sigma
    # v = α·ε − σ·x0 with ε = (x − α·x0)/σ and α² + σ² = 1.
    return (alpha * x - x0) / sigma


def apply_consistency(
    model_output: torch.Tensor,
    model_input: torch.Tensor,
    z_prior: torch.Tensor,
    weight: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """One consistency-guidance step on a model output: ``x̂0 ← x̂0 + w·(z_prior − x̂0)``.

    Args:
        model_output (`torch.Tensor`): ε or v (after classifier-free guidance).
        model_input (`torch.Tensor`): the VP noisy latent given to the model.
        z_prior (`torch.Tensor`): the prior's latent (same shape).
        weight (`torch.Tensor`): w for this step, 0-d; 0 leaves the output (numerically) as is,
            1 makes the step predict exactly ``z_prior``.
        alpha (`torch.Tensor`), sigma (`torch.Tensor`): this step's coefficients.
        prediction_type (`str`): `"epsilon"` or `"v_prediction"`.

    Returns:
        `torch.Tensor`: the guided model output, in ``model_output``'s dtype.
    """
    x0 = predict_x0(model_output, model_input, alpha, sigma, prediction_type)
    x0 = x0 + weight * (z_prior.float() - x0)
    guided = model_output_from_x0(x0, model_input, alpha, sigma, prediction_type)
    # Blend instead of replacing so that w = 0 returns the model output bit-for-bit.
    return torch.where(weight > 0, guided, model_output.float()).to(model_output.dtype)


ScheduleFn = Callable[..., torch.Tensor]

#: Consistency-guidance schedules by name: ``fn(weight, progress, *, sigmas, **kwargs)`` returns
#: w for every step (float64, before ``stop``). Add one with `register_consistency_schedule`.
CONSISTENCY_SCHEDULES: dict[str, ScheduleFn] = {}


def register_consistency_schedule(name: str) -> Callable[[ScheduleFn], ScheduleFn]:
    """Decorator that registers a schedule under ``name``.

    The function gets ``weight`` (w), ``progress`` (``i / (n - 1)`` per step, float64) and the
    keywords ``sigmas`` (EDM sigma of each step, or `None`) and ``num_steps``, plus whatever
    ``consistency_schedule_kwargs`` the caller passes (each with a default in its signature, so
    that a misspelt keyword is refused by name).
    """

    def register(fn: ScheduleFn) -> ScheduleFn:
        CONSISTENCY_SCHEDULES[name] = fn
        return fn

    return register


@register_consistency_schedule("constant")
def _constant(weight: float, progress: torch.Tensor, **_: Any) -> torch.Tensor:
    return torch.full_like(progress, weight)


@register_consistency_schedule("linear")
def _linear(weight: float, progress: torch.Tensor, **_: Any) -> torch.Tensor:
    return weight * (1.0 - progress)


@register_consistency_schedule("cosine")
def _cosine(weight: float, progress: torch.Tensor, **_: Any) -> torch.Tensor:
    return weight * 0.5 * (1.0 + torch.cos(math.pi * progress))


@register_consistency_schedule("power")
def _power(
    weight: float, progress: torch.Tensor, *, sigmas: torch.Tensor | None = None,
    power: float = 4.0, **_: Any,
) -> torch.Tensor:
    if sigmas is None or len(sigmas) != len(progress):
        raise ValueError("consistency_schedule='power' needs the sigma of every step")
    if not math.isfinite(power) or power < 0:
        raise ValueError(f"consistency_schedule_kwargs power={power!r} must be >= 0")
    s = sigmas.detach().to("cpu", torch.float64)
    return weight * (s / s[0].clamp_min(1e-12)).clamp(0.0, 1.0) ** power


@register_consistency_schedule("supir")
def _supir(
    weight: float, progress: torch.Tensor, *, sigmas: torch.Tensor | None = None,
    next_sigmas: torch.Tensor | None = None, sigma_max: float | None = None,
    tau: float = 4.0, sigma_off: float = 0.05, **_: Any,
) -> torch.Tensor:
    # SUPIR's restoration-guided sampler: w·(σ/σ_max)^τ with σ_max the scheduler's training
    # maximum (14.6146 for SD/SDXL), off once the next σ is <= 0.05.
    if sigmas is None or next_sigmas is None or sigma_max is None:
        raise ValueError("consistency_schedule='supir' needs the sigmas of the steps and the "
                         "scheduler's sigma_max")
    if not math.isfinite(tau) or tau < 0:
        raise ValueError(f"consistency_schedule_kwargs tau={tau!r} must be >= 0")
    s = sigmas.detach().to("cpu", torch.float64)
    nxt = next_sigmas.detach().to("cpu", torch.float64)
    w = weight * (s / sigma_max).clamp(0.0, 1.0) ** tau
    return torch.where(nxt > sigma_off, w, 0.0)


@register_consistency_schedule("early")
def _early(
    weight: float, progress: torch.Tensor, *, num_steps: int, early: float = 0.5, **_: Any
) -> torch.Tensor:
    if not 0.0 <= early <= 1.0:
        raise ValueError(f"early={early!r} must be in [0, 1]")
    idx = torch.arange(num_steps, dtype=torch.float64)
    return torch.where(idx < early * num_steps, weight, 0.0)


# What the loop passes every schedule (not settable by users).
_CONTEXT_KEYWORDS = {"sigmas", "next_sigmas", "sigma_max", "num_steps"}


def _schedule_keywords(fn: ScheduleFn) -> set[str]:
    params = inspect.signature(fn).parameters.values()
    return {p.name for p in params if p.kind is p.KEYWORD_ONLY} - _CONTEXT_KEYWORDS


def check_consistency_args(
    weight: float, schedule: str, stop: float, schedule_kwargs: Mapping[str, Any] | None = None
) -> None:
    """Raise `ValueError` naming the argument when a consistency-guidance setting is invalid."""
    if schedule not in CONSISTENCY_SCHEDULES:
        raise ValueError(
            f"consistency_schedule={schedule!r} is not supported; "
            f"use one of {tuple(CONSISTENCY_SCHEDULES)}"
        )
    if not (isinstance(weight, (int, float)) and 0.0 <= weight <= 1.0):
        raise ValueError(f"consistency_weight={weight!r} must be in [0, 1]")
    if not (isinstance(stop, (int, float)) and 0.0 <= stop <= 1.0):
        raise ValueError(f"consistency_stop={stop!r} must be in [0, 1]")
    allowed = _schedule_keywords(CONSISTENCY_SCHEDULES[schedule])
    unknown = sorted(set(schedule_kwargs or {}) - allowed)
    if unknown:
        raise ValueError(
            f"consistency_schedule_kwargs {unknown} do not apply to the {schedule!r} schedule; "
            f"it takes {sorted(allowed) or 'none'}"
        )
    for key, value in (schedule_kwargs or {}).items():
        if not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise ValueError(f"consistency_schedule_kwargs {key}={value!r} must be a number")


def consistency_weights(
    schedule: str,
    weight: float,
    num_steps: int,
    *,
    sigmas: torch.Tensor | None = None,
    next_sigmas: torch.Tensor | None = None,
    sigma_max: float | None = None,
    stop: float = 1.0,
    device: torch.device | str | None = None,
    **schedule_kwargs: Any,
) -> torch.Tensor:
    """Guidance weight w for every step, computed once before the loop.

    With ``p = i / (n − 1)`` the progress of step ``i`` of ``n`` (0 at the first step run, 1 at
    the last), the registered schedules are:

    - ``"constant"``: w.
    - ``"linear"``: w·(1 − p), strong while the noise is high, zero at the last step.
    - ``"cosine"``: w·(1 + cos(πp))/2.
    - ``"power"`` (keyword ``power``, τ, default 4): w·(σ_i/σ_0)^τ with the EDM sigmas of the
      steps. This is the library's own variant of SUPIR's (σ/σ_max)^τ: σ is normalised by the
      first step run rather than the training maximum, because img2img starts below it and
      (σ/σ_max)^4 would be almost 0 throughout.
    - ``"supir"`` (keywords ``tau``, default 4, and ``sigma_off``, default 0.05): SUPIR's
      restoration guidance, w·(σ_i/σ_max)^τ with σ_max the scheduler's training maximum
      (14.6146 for SD/SDXL), and 0 once the next step's σ is <= ``sigma_off``. In img2img
      σ_i starts below σ_max, so this is weak unless the strength is high; ``"power"`` is the
      library's own first-step-relative variant.
    - ``"early"`` (keyword ``early``, default 0.5): w for the first ``early`` fraction of the
      steps, then 0.

    After that, the steps with ``i/n ≥ stop`` get 0 ("guidance off for the last 1 − stop").

    Args:
        schedule (`str`): a name in `CONSISTENCY_SCHEDULES`.
        weight (`float`): w, in [0, 1].
        num_steps (`int`): number of steps run.
        sigmas (`torch.Tensor`, *optional*): EDM sigma (σ/α) of each step, needed by `"power"`
            and `"supir"`.
        next_sigmas (`torch.Tensor`, *optional*): EDM sigma after each step (`"supir"`).
        sigma_max (`float`, *optional*): the scheduler's largest training sigma (`"supir"`).
        stop (`float`, defaults to 1.0): fraction of the steps after which guidance is off.
        device: device of the result.
        **schedule_kwargs: the schedule's own parameters (``power=``, ``early=``).

    Returns:
        `torch.Tensor`: float32, shape ``(num_steps,)``.
    """
    check_consistency_args(weight, schedule, stop, schedule_kwargs)
    if num_steps < 0:
        raise ValueError(f"num_steps={num_steps!r} must be >= 0")
    idx = torch.arange(num_steps, dtype=torch.float64)
    progress = idx / max(num_steps - 1, 1)
    fn = CONSISTENCY_SCHEDULES[schedule]
    w = fn(weight, progress, sigmas=sigmas, next_sigmas=next_sigmas, sigma_max=sigma_max,
           num_steps=num_steps, **schedule_kwargs)
    w = torch.where(idx < stop * num_steps, w, 0.0)
    return w.to(device=device, dtype=torch.float32)
