"""Consistency guidance: weight schedules, x0 <-> model output, and the loop's invariants."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    UniPCMultistepScheduler,
)

from raim_diffusion.diffusion.guidance import (
    apply_consistency,
    consistency_weights,
    model_output_from_x0,
    predict_x0,
    scheduler_alpha_sigma,
)
from raim_diffusion.diffusion.loop import add_noise, guided_denoise, img2img_timesteps
from raim_diffusion.testing import tiny_components

SCHEDULERS = {
    # DDIM only reaches sigma = 0 at the end with set_alpha_to_one; with SD's default (False) the
    # last step stops at alphas_cumprod[0] and keeps a sqrt(0.00085) share of noise.
    "ddim": (DDIMScheduler, {"set_alpha_to_one": True}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "unipc": (UniPCMultistepScheduler, {}),
}


@pytest.fixture(scope="module")
def models():
    # sd15: epsilon prediction; sd2: v-prediction.
    return {kind: tiny_components(kind) for kind in ("sd15", "sd2")}


def _latents(seed: int, shape=(1, 4, 8, 8)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- schedules


def test_weight_schedules_shapes_and_endpoints():
    n = 10
    const = consistency_weights("constant", 0.4, n)
    assert const.shape == (n,) and const.dtype == torch.float32
    assert torch.allclose(const, torch.full((n,), 0.4))
    lin = consistency_weights("linear", 0.8, n)
    assert lin[0] == pytest.approx(0.8) and lin[-1] == pytest.approx(0.0)
    assert torch.all(lin[1:] <= lin[:-1])
    cos = consistency_weights("cosine", 1.0, n)
    assert cos[0] == pytest.approx(1.0) and cos[-1] == pytest.approx(0.0, abs=1e-7)
    assert torch.all(cos[1:] <= cos[:-1])
    early = consistency_weights("early", 0.5, n, early=0.3)
    assert early.tolist() == pytest.approx([0.5] * 3 + [0.0] * 7)
    sigmas = torch.linspace(5.0, 0.5, n)
    power = consistency_weights("power", 1.0, n, sigmas=sigmas, power=2.0)
    assert torch.allclose(power, (sigmas / 5.0) ** 2)
    stopped = consistency_weights("constant", 1.0, n, stop=0.5)
    assert stopped.tolist() == [1.0] * 5 + [0.0] * 5
    assert consistency_weights("constant", 1.0, n, stop=0.0).sum() == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(schedule="square", weight=0.5), "consistency_schedule"),
        (dict(schedule="constant", weight=1.5), "consistency_weight"),
        (dict(schedule="constant", weight=0.5, stop=2.0), "consistency_stop"),
        (dict(schedule="power", weight=0.5), "sigma"),
    ],
)
def test_weight_schedules_reject_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        consistency_weights(num_steps=4, **kwargs)


# ---------------------------------------------------------------------------- parametrisation


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_round_trip_and_full_weight(prediction_type):
    abar = torch.tensor(0.3)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    x0, eps = _latents(0), _latents(1)
    x_t = alpha * x0 + sigma * eps
    out = eps if prediction_type == "epsilon" else alpha * eps - sigma * x0
    assert torch.allclose(predict_x0(out, x_t, alpha, sigma, prediction_type), x0, atol=1e-5)
    back = model_output_from_x0(x0, x_t, alpha, sigma, prediction_type)
    assert torch.allclose(back, out, atol=1e-5)
    z = _latents(2)
    full = apply_consistency(out, x_t, z, torch.tensor(1.0), alpha, sigma, prediction_type)
    assert torch.allclose(predict_x0(full, x_t, alpha, sigma, prediction_type), z, atol=1e-5)
    none = apply_consistency(out, x_t, z, torch.tensor(0.0), alpha, sigma, prediction_type)
    assert torch.equal(none, out)


def test_alpha_sigma_follow_scheduler_tables():
    config = tiny_components("sd15")["scheduler"].config
    ddim = DDIMScheduler.from_config(config)
    ts, begin = img2img_timesteps(ddim, 10, 0.5)
    alpha, sigma = scheduler_alpha_sigma(ddim, ts, begin)
    abar = ddim.alphas_cumprod[ts.long()]
    assert torch.allclose(alpha, abar.sqrt()) and torch.allclose(sigma, (1 - abar).sqrt())
    # Karras sigmas differ from alphas_cumprod at the (rounded) timesteps: the table is used.
    karras = DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True)
    ts, begin = img2img_timesteps(karras, 10, 0.5)
    alpha, sigma = scheduler_alpha_sigma(karras, ts, begin)
    assert torch.allclose(sigma / alpha, karras.sigmas[begin : begin + len(ts)].float())
    assert torch.allclose(alpha**2 + sigma**2, torch.ones_like(alpha))


# ---------------------------------------------------------------------------- loop invariants


def _run(unet, scheduler, z_init, z_prior, w, *, steps=4, strength=0.75, guided=True, **kw):
    ts, begin = img2img_timesteps(scheduler, steps, strength)
    latents = add_noise(scheduler, z_init, ts, torch.Generator().manual_seed(7))
    weights = consistency_weights("constant", w, len(ts)) if guided else None
    with torch.no_grad():
        return guided_denoise(
            unet,
            scheduler,
            latents,
            ts,
            encoder_hidden_states=kw.pop("ehs", torch.zeros(1, 77, 32)),
            z_prior=z_prior if guided else None,
            weights=weights,
            begin_index=begin,
            generator=torch.Generator().manual_seed(8),
            **kw,
        )


@pytest.mark.parametrize("kind", ["sd15", "sd2"], ids=["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_guidance_invariants(models, kind, name):
    comps = models[kind]
    cls, extra = SCHEDULERS[name]
    scheduler = cls.from_config(comps["scheduler"].config, **extra)
    unet = comps["unet"]
    z_init, z_prior = _latents(0), _latents(1)
    ehs = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(3))

    plain = _run(unet, scheduler, z_init, z_prior, 0.0, guided=False, ehs=ehs)
    zero = _run(unet, scheduler, z_init, z_prior, 0.0, ehs=ehs)
    half = _run(unet, scheduler, z_init, z_prior, 0.5, ehs=ehs)
    full = _run(unet, scheduler, z_init, z_prior, 1.0, ehs=ehs)

    # w = 0 is exactly plain img2img from the same noise.
    assert torch.equal(zero, plain)
    # w = 1 at every step lands on the prior's latent.
    torch.testing.assert_close(full, z_prior, atol=1e-5, rtol=1e-5)
    # The distance to z_prior shrinks as w grows.
    d = [torch.linalg.vector_norm(x - z_prior).item() for x in (zero, half, full)]
    assert d[0] > d[1] > d[2]


@pytest.mark.parametrize(
    ("kind", "name"), [("sd15", "ddim"), ("sd15", "euler_a"), ("sd2", "dpmpp_2m")]
)
def test_unguided_loop_matches_diffusers_img2img(models, kind, name):
    comps = dict(models[kind])
    cls, extra = SCHEDULERS[name]
    extra = {k: v for k, v in extra.items() if k != "set_alpha_to_one"}
    comps["scheduler"] = cls.from_config(comps["scheduler"].config, **extra)
    pipe = StableDiffusionImg2ImgPipeline(**comps, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    z_init = _latents(0)
    cond = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(3))
    uncond = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(4))
    steps, strength, scale = 4, 0.75, 3.0
    # A 4-channel "image" is taken as latents by diffusers' img2img (no VAE encode).
    expected = pipe(
        image=z_init,
        prompt_embeds=cond,
        negative_prompt_embeds=uncond,
        num_inference_steps=steps,
        strength=strength,
        guidance_scale=scale,
        generator=torch.Generator().manual_seed(7),
        output_type="latent",
    ).images

    scheduler = comps["scheduler"]
    ts, begin = img2img_timesteps(scheduler, steps, strength)
    gen = torch.Generator().manual_seed(7)
    latents = add_noise(scheduler, z_init, ts, gen)
    with torch.no_grad():
        ours = guided_denoise(
            comps["unet"],
            scheduler,
            latents,
            ts,
            encoder_hidden_states=torch.cat([uncond, cond]),
            z_prior=_latents(1),
            weights=torch.zeros(len(ts)),
            guidance_scale=scale,
            begin_index=begin,
            generator=gen,
        )
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- tiling


class _PointwiseUNet(torch.nn.Module):
    """A 'UNet' whose output at a pixel depends only on that pixel and the text condition.

    Tiled and untiled evaluation of such a model must agree to rounding, which checks that tiles,
    their conditioning (including the classifier-free-guidance halves) and the blend line up.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 1)
        self.text = torch.nn.Linear(32, 4)

    def forward(self, x, t, encoder_hidden_states, **kwargs):
        bias = self.text(encoder_hidden_states.mean(1))[:, :, None, None]
        return (torch.tanh(self.conv(x)) + bias * (1 + t / 1000),)


def test_tiled_model_outputs_blend_exactly_for_pointwise_model():
    torch.manual_seed(0)
    unet = _PointwiseUNet()
    scheduler = EulerDiscreteScheduler.from_config(tiny_components("sd15")["scheduler"].config)
    z_init, z_prior = _latents(0, (2, 4, 20, 24)), _latents(1, (2, 4, 20, 24))
    ehs = torch.randn(4, 77, 32)
    common = dict(ehs=ehs, guidance_scale=2.5)
    untiled = _run(unet, scheduler, z_init, z_prior, 0.3, **common)
    tiled = _run(unet, scheduler, z_init, z_prior, 0.3, tile=8, tile_overlap=4, tile_batch=3,
                 **common)
    torch.testing.assert_close(tiled, untiled, atol=1e-5, rtol=1e-5)


def test_tiled_equals_untiled_when_one_tile_covers(models):
    comps = models["sd15"]
    scheduler = DDIMScheduler.from_config(comps["scheduler"].config)
    z_init, z_prior = _latents(0), _latents(1)
    untiled = _run(comps["unet"], scheduler, z_init, z_prior, 0.3, steps=3)
    covered = _run(comps["unet"], scheduler, z_init, z_prior, 0.3, steps=3, tile=8)
    assert torch.equal(untiled, covered)
    # Real tiling with a real UNet still honours guidance: w = 1 lands on z_prior.
    euler = EulerDiscreteScheduler.from_config(comps["scheduler"].config)
    z_init, z_prior = _latents(0, (1, 4, 12, 12)), _latents(1, (1, 4, 12, 12))
    tiled = _run(comps["unet"], euler, z_init, z_prior, 1.0, steps=3, tile=8, tile_overlap=4)
    torch.testing.assert_close(tiled, z_prior, atol=1e-5, rtol=1e-5)


def test_guidance_step_compiles_without_graph_breaks():
    # fullgraph=True raises on any graph break; the eager backend needs no C++ toolchain.
    step = torch.compile(apply_consistency, fullgraph=True, backend="eager", dynamic=False)
    x, out, z = _latents(0), _latents(1), _latents(2)
    args = (torch.tensor(0.5), torch.tensor(0.8), torch.tensor(0.6), "v_prediction")
    torch.testing.assert_close(step(out, x, z, *args), apply_consistency(out, x, z, *args))


# ------------------------------------------------------ schedulers as the hub models ship them

# scheduler_config.json of the models users load (values copied from the published configs).
SHIPPED = {
    "sd15-pndm": ("PNDMScheduler", "epsilon", {
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "clip_sample": False}),
    "sd21-ddim": ("DDIMScheduler", "v_prediction", {
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "steps_offset": 1,
        "clip_sample": False}),
    "sdxl-euler": ("EulerDiscreteScheduler", "epsilon", {
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "interpolation_type": "linear", "steps_offset": 1,
        "timestep_spacing": "leading", "use_karras_sigmas": False}),
    "sd-turbo-euler": ("EulerDiscreteScheduler", "v_prediction", {
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "timestep_spacing": "trailing"}),
}


def _shipped_cases():
    from diffusers.schedulers import KarrasDiffusionSchedulers

    cases = [(name, *spec) for name, spec in SHIPPED.items()]
    # Every scheduler diffusers offers for SD/SDXL, built the way users swap one in:
    # Cls.from_config(<the shipped SD 1.5 config>).
    base = SHIPPED["sd15-pndm"][2]
    for member in KarrasDiffusionSchedulers:
        if member.name in ("DPMSolverSDEScheduler",):  # needs torchsde, not installed
            continue
        cases.append((f"sd15-{member.name}", member.name, "epsilon", base))
    return cases


@pytest.mark.parametrize(("label", "cls_name", "prediction", "config"), _shipped_cases(),
                         ids=[c[0] for c in _shipped_cases()])
def test_full_weight_returns_the_prior_latent_with_shipped_schedulers(
    models, label, cls_name, prediction, config
):
    """w = 1 lands on z_prior whatever the scheduler ends at (issue: PNDM and DDIM with
    set_alpha_to_one=False kept about 0.1 of noise); w = 0 stays plain img2img."""
    import diffusers

    comps = models["sd2" if prediction == "v_prediction" else "sd15"]
    cls = getattr(diffusers, cls_name)
    scheduler = cls.from_config({**config, "prediction_type": prediction})
    unet = comps["unet"]
    z_init, z_prior = _latents(0), _latents(1)
    ehs = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(3))
    for steps, strength in ((4, 0.75), (10, 0.5)):
        full = _run(unet, scheduler, z_init, z_prior, 1.0, ehs=ehs, steps=steps,
                    strength=strength)
        torch.testing.assert_close(full, z_prior, atol=1e-4, rtol=1e-4)
    plain = _run(unet, scheduler, z_init, z_prior, 0.0, guided=False, ehs=ehs)
    zero = _run(unet, scheduler, z_init, z_prior, 0.0, ehs=ehs)
    assert torch.equal(zero, plain)


def test_supir_schedule_follows_the_training_sigma_max_and_switches_off_at_005():
    from raim_diffusion.diffusion.loop import next_step_sigmas, scheduler_sigma_max, step_sigmas

    scheduler = EulerDiscreteScheduler.from_config(SHIPPED["sdxl-euler"][2])
    sigma_max = scheduler_sigma_max(scheduler)
    assert sigma_max == pytest.approx(14.6146, abs=1e-4)  # SD/SDXL's schedule
    ts, begin = img2img_timesteps(scheduler, 20, 1.0)
    sigmas = step_sigmas(scheduler, ts, begin)
    nxt = next_step_sigmas(scheduler, ts, begin)
    assert torch.allclose(nxt[:-1], sigmas[1:]) and nxt[-1] == 0
    w = consistency_weights("supir", 1.0, len(ts), sigmas=sigmas, next_sigmas=nxt,
                            sigma_max=sigma_max, tau=4.0)
    expected = (sigmas.double() / sigma_max) ** 4
    on = nxt > 0.05
    torch.testing.assert_close(w[on].double(), expected[on], rtol=1e-5, atol=1e-7)
    assert (w[~on] == 0).all() and (~on).any() and on.any()
    # DDIM's last "next sigma" is that of final_alpha_cumprod.
    ddim = DDIMScheduler.from_config(SHIPPED["sd21-ddim"][2])
    ts, begin = img2img_timesteps(ddim, 10, 0.5)
    tail = next_step_sigmas(ddim, ts, begin)[-1]
    abar0 = ddim.alphas_cumprod[0].double()
    assert float(tail) == pytest.approx(float(((1 - abar0) / abar0).sqrt()), rel=1e-5)
    with pytest.raises(ValueError, match="tau"):
        consistency_weights("supir", 1.0, len(ts), sigmas=step_sigmas(ddim, ts, begin),
                            next_sigmas=next_step_sigmas(ddim, ts, begin), sigma_max=14.6,
                            tau=-1.0)


def test_linear_cfg_is_supirs_line():
    from raim_diffusion.diffusion.loop import linear_guidance_scales

    sigmas = torch.tensor([14.6146, 7.3073, 0.0])
    g = linear_guidance_scales(2.0, 1.0, sigmas, 14.6146)
    torch.testing.assert_close(g, torch.tensor([1.0, 1.5, 2.0]))
    assert linear_guidance_scales(2.0, None, sigmas, 14.6146) == 2.0


def test_linear_cfg_and_churn_in_the_loop(models):
    comps = models["sd15"]
    scheduler = EulerDiscreteScheduler.from_config(SHIPPED["sdxl-euler"][2])
    unet = comps["unet"]
    z_init, z_prior = _latents(0), _latents(1)
    ehs = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(3))
    constant = _run(unet, scheduler, z_init, z_prior, 0.0, guided=False, ehs=ehs,
                    guidance_scale=2.0)
    per_step = _run(unet, scheduler, z_init, z_prior, 0.0, guided=False, ehs=ehs,
                    guidance_scale=torch.full((3,), 2.0))
    assert torch.equal(constant, per_step)  # a constant table is the constant scale
    varying = _run(unet, scheduler, z_init, z_prior, 0.0, guided=False, ehs=ehs,
                   guidance_scale=torch.tensor([1.0, 1.5, 2.0]))
    assert not torch.equal(varying, constant)
    churned = _run(unet, scheduler, z_init, z_prior, 0.0, guided=False, ehs=ehs[:1],
                   s_churn=5.0, s_noise=1.01)
    plain = _run(unet, scheduler, z_init, z_prior, 0.0, guided=False, ehs=ehs[:1])
    assert not torch.equal(churned, plain) and torch.isfinite(churned).all()
    # The guidance still lands on the prior with churn.
    full = _run(unet, scheduler, z_init, z_prior, 1.0, ehs=ehs[:1], s_churn=5.0, s_noise=1.01)
    torch.testing.assert_close(full, z_prior, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="s_churn"):
        _run(unet, DDIMScheduler.from_config(SHIPPED["sd21-ddim"][2]), z_init, z_prior, 0.0,
             guided=False, ehs=ehs[:1], s_churn=5.0)
