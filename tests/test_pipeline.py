"""RaimPipeline end to end on tiny random SD / SDXL folders written by diffusers itself."""

from __future__ import annotations

import json
import shutil

import numpy as np
import PIL.Image
import pytest
import torch

from raim_diffusion.diffusion.vae import decode_latents
from raim_diffusion.errors import MissingWeightsError
from raim_diffusion.pipeline import RaimPipeline, RaimPipelineOutput
from raim_diffusion.testing import save_tiny_pipeline, tiny_controlnet, tiny_prior

# The tiny prior is x2; the tests below run it as a super-resolution prior (upscale=2) so that
# the stages work at twice the input size. The default, same-size restoration, is tested apart.
FAST = dict(num_inference_steps=4, strength=0.5, upscale=2)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {kind: save_tiny_pipeline(root / kind, kind) for kind in ("sd15", "sdxl")}


@pytest.fixture(scope="module")
def sd15(folders):
    pipe = RaimPipeline.from_pretrained(folders["sd15"], prior=tiny_prior(2))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl(folders):
    pipe = RaimPipeline.from_pretrained(folders["sdxl"], prior=tiny_prior(2))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(h: int, w: int, seed: int = 0, n: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_loads_standard_folders(sd15, sdxl, folders):
    index = json.loads((folders["sdxl"] / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert not sd15.is_sdxl and sdxl.is_sdxl
    assert sd15.text_encoder_2 is None and sdxl.text_encoder_2 is not None
    assert sd15.prior is not None and sd15.prior.scale == 2
    assert sd15.controlnet is None and sd15.segmenter is None and sd15.fusion is None


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_restores_odd_sizes_end_to_end(request, kind):
    pipe = request.getfixturevalue(kind)
    # PIL in, PIL out; 13x9 is no multiple of anything, and the prior doubles it.
    image = PIL.Image.fromarray((np.random.default_rng(0).random((9, 13, 3)) * 255).astype("uint8"))
    out = pipe(image, generator=_gen(), **FAST)
    assert isinstance(out, RaimPipelineOutput)
    assert len(out.images) == 1 and out.images[0].size == (26, 18)
    assert out.prior_images[0].size == out.generated_images[0].size == (26, 18)
    # Stages 3 and 4 ran too: a mask per image at the output size, and the detector's regions.
    assert len(out.masks) == 1 and out.masks[0].size == (26, 18)
    assert out.artifacts is not None and out.artifacts.segmentation == "none"
    # Generation really ran (random weights: the content itself means nothing).
    gen = np.asarray(out.generated_images[0], dtype=np.float32)
    assert np.abs(gen - np.asarray(out.prior_images[0], dtype=np.float32)).mean() > 0


def test_same_seed_same_output_and_seed_matters(sd15):
    image = _image(11, 15)
    a = sd15(image, generator=_gen(1), output_type="pt", **FAST).images
    b = sd15(image, generator=_gen(1), output_type="pt", **FAST).images
    c = sd15(image, generator=_gen(2), output_type="pt", **FAST).images
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_save_load_round_trip(sd15, tmp_path):
    sd15.save_pretrained(tmp_path / "raim")
    index = json.loads((tmp_path / "raim" / "model_index.json").read_text())
    assert index["_class_name"] == "RaimPipeline"
    assert index["prior"] == ["raim_diffusion.prior.model", "PriorModel"]
    assert index["default_prompt"] == sd15.config.default_prompt
    assert "safety_checker" not in index
    loaded = RaimPipeline.from_pretrained(tmp_path / "raim")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.prior is not None and loaded.prior.scale == 2
    image = _image(10, 12)
    a = sd15(image, generator=_gen(3), output_type="pt", **FAST)
    b = loaded(image, generator=_gen(3), output_type="pt", **FAST)
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.prior_images, b.prior_images)


def test_output_types_and_tuple(sd15):
    image = _image(8, 10)
    pt = sd15(image, generator=_gen(), output_type="pt", **FAST)
    assert pt.images.shape == (1, 3, 16, 20) and pt.images.dtype == torch.float32
    assert pt.images.min() >= 0 and pt.images.max() <= 1
    arr = sd15(image, generator=_gen(), output_type="np", **FAST)
    assert arr.images.shape == (1, 16, 20, 3) and arr.images.dtype == np.float32
    np.testing.assert_allclose(arr.images, pt.images.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    images, priors, generated, masks = sd15(
        image, generator=_gen(), output_type="pt", return_dict=False, **FAST
    )
    assert torch.equal(images, pt.images) and masks.shape == (1, 1, *images.shape[-2:])
    assert torch.equal(priors, pt.prior_images) and torch.equal(generated, pt.generated_images)


def test_batch_with_per_image_prompts_matches_single_runs(sd15):
    images = _image(8, 12, n=2)
    prompts = ["a cat", "a city street at night"]
    batch = sd15(
        images, prompts, generator=[_gen(5), _gen(6)], output_type="pt", **FAST
    ).images
    for i in range(2):
        single = sd15(
            images[i : i + 1], prompts[i], generator=_gen(5 + i), output_type="pt", **FAST
        )
        torch.testing.assert_close(batch[i : i + 1], single.images, atol=1e-4, rtol=1e-4)
    swapped = sd15(
        images, prompts[::-1], generator=[_gen(5), _gen(6)], output_type="pt", **FAST
    ).images
    assert not torch.allclose(batch, swapped)
    with pytest.raises(ValueError, match="prompt"):
        sd15(images, ["only one"], **FAST)


def test_callback_on_step_end(sd15):
    seen = []

    def callback(pipe, step, timestep, kwargs):
        seen.append((step, kwargs["latents"].shape, kwargs["z_prior"]))
        # Replacing the latents at the last step must show in the output.
        if step == pipe.num_timesteps - 1:
            return {"latents": kwargs["z_prior"]}
        return {}

    image = _image(8, 8)
    out = sd15(
        image,
        generator=_gen(),
        output_type="pt",
        color_fix="none",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "z_prior"],
        **FAST,
    )
    assert [s for s, _, _ in seen] == [0, 1]
    assert seen[0][1] == seen[0][2].shape == (1, 4, 4, 4)  # 8 px, prior x2, VAE /4
    expected = decode_latents(sd15.vae, seen[-1][2])
    torch.testing.assert_close(out.generated_images, expected, atol=1e-6, rtol=0)
    plain = sd15(image, generator=_gen(), output_type="pt", color_fix="none", **FAST)
    assert not torch.allclose(plain.generated_images, expected)


def test_stages_skip_and_min_size(sd15):
    image = _image(8, 10)
    prior_only = sd15(image, output_type="pt", stages=("prior",), **FAST)
    assert torch.equal(prior_only.images, prior_only.prior_images)
    assert torch.equal(prior_only.generated_images, prior_only.prior_images)
    no_prior = sd15(image, output_type="pt", stages=("generate",), generator=_gen(),
                    **{**FAST, "upscale": None})
    assert no_prior.images.shape[-2:] == (8, 10)  # the native scale is 1 without stage 1
    big = sd15(image, output_type="pt", min_size=24, generator=_gen(),
               **{**FAST, "upscale": 1.5})
    assert big.images.shape[-2:] == (12, 15)


def test_latent_tiling_in_pipeline(sd15):
    image = _image(24, 20)  # prior x2 -> 48x40 pixels -> 24x20 latents
    untiled = sd15(image, generator=_gen(), output_type="pt", tile=0, **FAST).images
    covering = sd15(image, generator=_gen(), output_type="pt", tile=32, **FAST).images
    assert torch.equal(untiled, covering)
    tiled = sd15(image, generator=_gen(), output_type="pt", tile=8, vae_tile=0, **FAST).images
    assert tiled.shape == untiled.shape and torch.isfinite(tiled).all()
    # Seams would show as large local differences; tiles are blended, so the images stay close.
    assert (tiled - untiled).abs().mean() < 0.1
    # With 16-px VAE tiles as well (4 latents on the tiny x4 VAE: the harshest tiling there is)
    # the decoder's own tiling adds its share; the tiny random weights put it near 0.11.
    both = sd15(image, generator=_gen(), output_type="pt", tile=8, vae_tile=16, **FAST).images
    assert both.shape == untiled.shape and torch.isfinite(both).all()
    assert (both - untiled).abs().mean() < 0.15


def test_detect_and_fuse_stages(sd15):
    """Stage 3 decides where stage 4 replaces the generated image by the prior."""
    image = _image(48, 48)  # the tiny prior doubles it: 96 x 96
    # At the top threshold (1) every pixel whose local contrast differs at all is a candidate ...
    everything = sd15(image, generator=_gen(), output_type="pt", contrast_threshold=1.0, **FAST)
    assert everything.masks.mean() > 0.8
    assert everything.artifacts.regions[0] and everything.artifacts.segmentation == "none"
    # ... so deep inside the mask (beyond the blend's feather band) the result is the prior.
    inner = (..., slice(30, 66), slice(30, 66))
    assert torch.equal(everything.images[inner], everything.prior_images[inner])
    # A threshold near 0 flags nothing: the generated image passes through untouched.
    nothing = sd15(image, generator=_gen(), output_type="pt", contrast_threshold=1e-6, **FAST)
    assert nothing.masks.sum() == 0
    assert torch.equal(nothing.images, nothing.generated_images)
    # Skipping stage 4 keeps the generated image even where stage 3 flagged artifacts.
    no_fuse = sd15(image, generator=_gen(), output_type="pt", contrast_threshold=1.0,
                   stages=("prior", "generate", "detect"), **FAST)
    assert no_fuse.masks.mean() > 0.8 and torch.equal(no_fuse.images, no_fuse.generated_images)


def test_make_detector_uses_parameter_sets_and_overrides(sd15):
    detector = sd15.make_detector("strict-text", contrast_threshold=0.5)
    assert detector.config.contrast_threshold == 0.5
    assert sd15.make_detector(detector) is detector


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_controlnet_zero_scale_is_a_no_op(request, folders, kind):
    pipe = request.getfixturevalue(kind)
    with_cn = RaimPipeline(**{**pipe.components, "controlnet": tiny_controlnet(kind)})
    with_cn.set_progress_bar_config(disable=True)
    image = _image(8, 10)
    base = pipe(image, generator=_gen(), output_type="pt", **FAST).images
    zero = with_cn(
        image, generator=_gen(), output_type="pt", controlnet_conditioning_scale=0.0, **FAST
    ).images
    on = with_cn(image, generator=_gen(), output_type="pt", **FAST).images
    assert torch.equal(base, zero)
    assert not torch.equal(base, on)
    late = with_cn(
        image, generator=_gen(), output_type="pt", control_guidance_start=0.99, **FAST
    ).images
    # Starting after the last step disables it as well.
    assert torch.equal(base, late)


def test_v_prediction_pipeline(tmp_path):
    folder = save_tiny_pipeline(tmp_path / "sd2", "sd2")
    pipe = RaimPipeline.from_pretrained(folder, prior=tiny_prior(1))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    out = pipe(_image(7, 9), generator=_gen(), output_type="pt", **{**FAST, "upscale": 1})
    assert out.images.shape == (1, 3, 7, 9) and torch.isfinite(out.images).all()


def test_missing_model_raises_missing_weights_error(tmp_path):
    with pytest.raises(MissingWeightsError, match="raim-test/does-not-exist"):
        RaimPipeline.from_pretrained(
            "raim-test/does-not-exist", local_files_only=True, cache_dir=tmp_path
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(strength=0.0), "strength"),
        (dict(consistency_weight=2.0), "consistency_weight"),
        (dict(consistency_schedule="zigzag"), "consistency_schedule"),
        (dict(color_fix="hist"), "color_fix"),
        (dict(output_type="jpeg"), "output_type"),
        (dict(guidance_scale=float("nan")), "guidance_scale"),
        (dict(eta=float("nan")), "eta"),
        (dict(upscale=float("inf")), "upscale"),
        (dict(input_blend=-0.1), "input_blend"),
        (dict(stages=("prior", "fuse")), "needs 'detect'"),
        (dict(consistency_schedule="power", consistency_schedule_kwargs={"powr": 2}), "powr"),
        (dict(stages=("prior", "paint")), "stages"),
        (dict(tile=-1), "tile"),
        (dict(callback_on_step_end_tensor_inputs=["noise"]), "callback_on_step_end_tensor_inputs"),
    ],
)
def test_bad_arguments_raise_value_error(sd15, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sd15(_image(8, 8), **kwargs)


def test_sdxl_conditioning_matches_diffusers(sdxl):
    from diffusers import StableDiffusionXLPipeline

    reference = StableDiffusionXLPipeline(
        **{k: getattr(sdxl, k) for k in (
            "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet",
            "scheduler")}
    )
    prompts = ["a cat", "a dog on a sofa"]
    embeds, neg, pooled, neg_pooled = reference.encode_prompt(
        prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
        negative_prompt=["blurry", "noisy"],
    )
    ours, ours_neg, ours_pooled, ours_neg_pooled = sdxl.encode_prompt(
        prompts, "cpu", negative_prompt=["blurry", "noisy"]
    )
    torch.testing.assert_close(ours, embeds)
    torch.testing.assert_close(ours_pooled, pooled)
    torch.testing.assert_close(ours_neg, neg)
    torch.testing.assert_close(ours_neg_pooled, neg_pooled)
    time_ids = reference._get_add_time_ids(
        (48, 40), (0, 0), (48, 40), dtype=torch.float32,
        text_encoder_projection_dim=sdxl.text_encoder_2.config.projection_dim,
    )
    assert time_ids.tolist() == [sdxl._sdxl_time_ids((48, 40), negative=False)]


def test_bfloat16_sdxl(folders):
    pipe = RaimPipeline.from_pretrained(folders["sdxl"], prior=tiny_prior(2), dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.dtype == torch.bfloat16
    out = pipe(_image(9, 11), generator=_gen(), output_type="pt", **FAST)
    assert out.images.dtype == torch.float32 and torch.isfinite(out.images).all()


def test_loads_hub_id_from_local_cache(folders, tmp_path):
    # The layout huggingface_hub gives a downloaded repository: what GPU nodes without internet
    # load from after `huggingface-cli download` elsewhere.
    repo = tmp_path / "models--raim-test--tiny-sd15"
    commit = "0" * 40
    shutil.copytree(folders["sd15"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    pipe = RaimPipeline.from_pretrained(
        "raim-test/tiny-sd15", prior=tiny_prior(2), cache_dir=tmp_path, local_files_only=True
    )
    assert not pipe.is_sdxl and pipe.prior is not None


def test_prompt_embeds_equal_prompts(sdxl):
    """diffusers' convention: precomputed embeddings give the same result as the prompts."""
    image = _image(8, 8)
    by_text = sdxl(image, "a cat", "blurry", generator=_gen(), output_type="pt", **FAST)
    embeds, neg, pooled, neg_pooled = sdxl.encode_prompt("a cat", negative_prompt="blurry")
    by_embeds = sdxl(image, prompt_embeds=embeds, negative_prompt_embeds=neg,
                     pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=neg_pooled,
                     generator=_gen(), output_type="pt", **FAST)
    assert torch.equal(by_text.images, by_embeds.images)
    other = sdxl(image, "a dog", "blurry", generator=_gen(), output_type="pt", **FAST)
    assert not torch.equal(other.images, by_text.images)


def test_callback_may_replace_prompt_embeds(sd15):
    image = _image(8, 8)
    cat = sd15.encode_prompt("a cat", do_classifier_free_guidance=False)[0]
    dog = sd15.encode_prompt("a dog", do_classifier_free_guidance=False)[0]

    def switch(pipe, step, timestep, kwargs):
        return {"prompt_embeds": dog} if step == 0 else {}

    common = dict(generator=_gen(), output_type="pt", guidance_scale=1.0, color_fix="none",
                  **FAST)
    switched = sd15(image, prompt_embeds=cat, callback_on_step_end=switch,
                    callback_on_step_end_tensor_inputs=["prompt_embeds"], **common)
    plain = sd15(image, prompt_embeds=cat, **common)
    assert not torch.equal(switched.generated_images, plain.generated_images)


def test_output_type_latent_returns_stage_two_latents(sd15):
    image = _image(8, 8)
    latents = sd15(image, generator=_gen(), output_type="latent", color_fix="none", **FAST)
    assert latents.images.shape == (1, 4, 4, 4) and latents.masks is None
    decoded = sd15(image, generator=_gen(), output_type="pt", color_fix="none",
                   stages=("prior", "generate"), **FAST)
    torch.testing.assert_close(decode_latents(sd15.vae, latents.images),
                               decoded.generated_images, atol=1e-6, rtol=0)


def test_input_blend_takes_effect_in_a_four_stage_run(sd15):
    """One stage-1 path: the fixed blend of MiAlgo applies whatever stages follow."""
    from raim_diffusion.ops import resize

    image = _image(12, 10)
    plain = sd15(image, generator=_gen(), output_type="pt", **FAST)
    blended = sd15(image, generator=_gen(), output_type="pt", input_blend=0.5, **FAST)
    expected = 0.5 * plain.prior_images + 0.5 * resize(image, (24, 20))
    torch.testing.assert_close(blended.prior_images, expected, atol=1e-6, rtol=0)
    assert not torch.equal(blended.images, plain.images)
    assert blended.methods["prior"] == "PriorModel" and blended.methods["fusion"] == "pyramid-blend"


def test_prior_only_pipeline_needs_no_diffusion_components():
    pipe = RaimPipeline(prior=tiny_prior(2))
    out = pipe(_image(9, 7), output_type="pt", stages=("prior",), upscale=1.0)
    assert out.images.shape[-2:] == (9, 7)
    torch.testing.assert_close(out.images, pipe.prior(_image(9, 7), outscale=1.0))
    with pytest.raises(ValueError, match="'generate' needs the components"):
        pipe(_image(9, 7), output_type="pt")


def test_fusion_is_a_registered_architecture_never_a_silent_fallback(sd15):
    from raim_diffusion.fusion import FusionNet

    image = _image(16, 16)
    kwargs = dict(output_type="pt", contrast_threshold=1.0, **FAST)
    net = FusionNet.from_preset("tiny").eval()  # eval: no stochastic depth
    torch.nn.init.normal_(net.srformer.conv_last.weight, std=0.1)  # not the identity
    try:
        sd15.register_modules(fusion=net)
        direct = sd15(image, generator=_gen(), **kwargs)
        assert direct.methods["fusion"] == "FusionNet"
        # A torch.compile'd network is the same network, not the blend.
        sd15.register_modules(fusion=torch.compile(net))
        wrapped = sd15(image, generator=_gen(), **kwargs)
        assert wrapped.methods["fusion"] == "FusionNet"
        torch.testing.assert_close(wrapped.images, direct.images)
        from diffusers import ModelMixin

        class Unregistered(ModelMixin):  # a model, but no registered fusion architecture
            def __init__(self) -> None:
                super().__init__()
                self.conv = torch.nn.Conv2d(7, 3, 1)

        sd15.register_modules(fusion=Unregistered())
        with pytest.raises(TypeError, match="not a registered fusion architecture"):
            sd15(image, generator=_gen(), **kwargs)
    finally:
        sd15.register_modules(fusion=None)


def test_nan_from_a_model_names_the_stage():
    prior = tiny_prior(2)
    with torch.no_grad():
        next(prior.parameters()).fill_(float("nan"))
    pipe = RaimPipeline(prior=prior)
    with pytest.raises(FloatingPointError, match="stage 'prior'"):
        pipe(_image(8, 8), output_type="pt", stages=("prior",))
    with pytest.raises(ValueError, match="NaN"):  # the input's own NaN is the input's fault
        RaimPipeline(prior=tiny_prior(2))(torch.full((1, 3, 8, 8), float("nan")),
                                          stages=("prior",))


def test_detector_refuses_nan_inputs():
    from raim_diffusion.artifacts import ArtifactDetector

    good = _image(32, 32)
    with pytest.raises(ValueError, match="NaN"):
        ArtifactDetector.from_config("desra-default", segmenter="none")(
            torch.full_like(good, float("nan")), good
        )


def test_default_is_same_size_restoration(sd15):
    """RAIM's task: the output has the input's size whatever the prior's native scale."""
    image = _image(13, 11)
    out = sd15(image, generator=_gen(), output_type="pt", num_inference_steps=4, strength=0.5)
    assert out.images.shape[-2:] == out.prior_images.shape[-2:] == (13, 11)
    native = sd15(image, generator=_gen(), output_type="pt", stages=("prior",), upscale=None)
    assert native.images.shape[-2:] == (26, 22)


@pytest.mark.parametrize("name", ["PNDMScheduler", "DDIMScheduler"])
def test_full_consistency_returns_the_decoded_prior_latent_with_shipped_schedulers(sd15, name):
    """SD 1.5 ships PNDM (and users pick DDIM) with set_alpha_to_one=False: w = 1 still gives
    decode(z_prior) exactly."""
    import diffusers

    from raim_diffusion.diffusion.vae import encode_latents

    original = sd15.scheduler
    shipped = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
               "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
               "steps_offset": 1, "clip_sample": False}
    sd15.scheduler = getattr(diffusers, name).from_config(shipped)
    try:
        out = sd15(_image(16, 16), generator=_gen(), output_type="pt", consistency_weight=1.0,
                   consistency_schedule="constant", color_fix="none", vae_tile=0,
                   stages=("prior", "generate"), num_inference_steps=10, strength=0.6)
        z_prior = encode_latents(sd15.vae, out.prior_images)
        torch.testing.assert_close(out.generated_images, decode_latents(sd15.vae, z_prior),
                                   atol=1e-4, rtol=0)
    finally:
        sd15.scheduler = original


def test_supir_sampler_options_reach_the_loop(sdxl):
    from diffusers import EulerDiscreteScheduler

    original = sdxl.scheduler
    sdxl.scheduler = EulerDiscreteScheduler.from_config(original.config)
    try:
        common = dict(generator=_gen(), output_type="pt", stages=("prior", "generate"), **FAST)
        plain = sdxl(_image(8, 8), **common)
        linear = sdxl(_image(8, 8), guidance_scale_start=1.0, **{**common, "generator": _gen()})
        churn = sdxl(_image(8, 8), s_churn=5.0, s_noise=1.01, **{**common, "generator": _gen()})
        supir = sdxl(_image(8, 8), consistency_schedule="supir",
                     consistency_schedule_kwargs={"tau": 4.0}, **{**common, "generator": _gen()})
        for other in (linear, churn, supir):
            assert not torch.equal(other.images, plain.images)
    finally:
        sdxl.scheduler = original


# ---------------------------------------------------------------------------------------------
# SUPIR: SDXL with SUPIR's adaptor as stage 2


@pytest.fixture(scope="module")
def supir_checkpoint(folders, tmp_path_factory):
    """A tiny random SUPIR checkpoint written in SUPIR's own layout (Lightning .ckpt)."""
    from raim_diffusion.testing import save_tiny_supir_checkpoint, tiny_components

    comps = tiny_components("sdxl")
    path = tmp_path_factory.mktemp("supir") / "SUPIR-tiny.ckpt"
    return save_tiny_supir_checkpoint(path, comps["unet"], comps["vae"], seed=1)


@pytest.fixture(scope="module")
def supir(folders, supir_checkpoint):
    pipe = RaimPipeline.from_pretrained(folders["sdxl"], supir=supir_checkpoint,
                                        prior=tiny_prior(2))
    pipe.set_progress_bar_config(disable=True)
    return pipe


SUPIR_FAST = dict(num_inference_steps=3, strength=1.0, guidance_scale=2.0, guidance_scale_start=1.0,
                  s_churn=5.0, s_noise=1.01, consistency_weight=0.0)


def test_supir_restores_end_to_end_and_round_trips(supir, tmp_path):
    from raim_diffusion.diffusion.supir import (
        SupirControlModel,
        SupirDenoiseEncoder,
        SupirUNet2DConditionModel,
    )

    assert isinstance(supir.unet, SupirUNet2DConditionModel)
    assert isinstance(supir.supir_control, SupirControlModel)
    assert isinstance(supir.supir_denoise_encoder, SupirDenoiseEncoder)
    image = _image(19, 26)
    out = supir(image, generator=_gen(), output_type="pt", **SUPIR_FAST)
    assert out.images.shape[-2:] == out.generated_images.shape[-2:] == (19, 26)
    assert list(out.methods) == ["prior", "generate", "segmentation", "fusion"]
    assert out.methods["generate"] == "SupirUNet2DConditionModel"
    assert torch.isfinite(out.images).all()

    supir.save_pretrained(tmp_path / "raim")
    index = json.loads((tmp_path / "raim" / "model_index.json").read_text())
    assert index["unet"] == ["raim_diffusion.diffusion.supir", "SupirUNet2DConditionModel"]
    assert index["supir_control"] == ["raim_diffusion.diffusion.supir", "SupirControlModel"]
    assert index["supir_denoise_encoder"] == ["raim_diffusion.diffusion.supir",
                                              "SupirDenoiseEncoder"]
    again = RaimPipeline.from_pretrained(tmp_path / "raim")  # no supir= needed
    again.set_progress_bar_config(disable=True)
    out2 = again(image, generator=_gen(), output_type="pt", **SUPIR_FAST)
    for name in ("images", "prior_images", "generated_images", "masks"):
        torch.testing.assert_close(out2[name], out[name], rtol=0, atol=0)


def test_supir_adaptor_and_stage1_choice_take_effect(supir):
    common = dict(generator=_gen(), output_type="pt", stages=("prior", "generate"),
                  color_fix="none", **SUPIR_FAST)
    image = _image(16, 16, seed=3)
    base = supir(image, **common).generated_images
    for kwargs in ({"control_scale": 0.0}, {"control_scale_start": 0.2},
                   {"supir_stage1": "prior", "consistency_weight": 0.5},
                   {"strength": 0.5}):
        other = supir(image, **{**common, "generator": _gen(), **kwargs}).generated_images
        assert other.shape == base.shape and not torch.equal(other, base), kwargs


def test_supir_full_guidance_toward_the_prior_returns_the_decoded_prior_latent(supir):
    """supir_stage1='prior' with restoration weight 1 at every step: decode(z_prior) exactly."""
    from raim_diffusion.diffusion.vae import encode_latents

    out = supir(_image(16, 24), generator=_gen(), output_type="pt", supir_stage1="prior",
                consistency_weight=1.0, consistency_schedule="constant", color_fix="none",
                vae_tile=0, stages=("prior", "generate"), num_inference_steps=4, s_churn=5.0)
    z_prior = encode_latents(supir.vae, out.prior_images)
    torch.testing.assert_close(out.generated_images, decode_latents(supir.vae, z_prior),
                               atol=1e-5, rtol=0)


def test_supir_callback_tiles_and_latents(supir):
    seen = []

    def callback(pipe, i, t, kwargs):
        seen.append((i, float(t), kwargs["latents"].shape))
        return {}

    common = dict(generator=_gen(), stages=("prior", "generate"), **SUPIR_FAST)
    latents = supir(_image(32, 32), output_type="latent", callback_on_step_end=callback,
                    **common).images
    assert latents.shape == (1, 4, 8, 8)
    assert [i for i, _, _ in seen] == [0, 1, 2] and seen[0][1] > seen[-1][1] > 0
    # SUPIR's latent tiles (Gaussian-blended) run when asked, and cover the whole image
    untiled = supir(_image(32, 32), output_type="pt", tile=0,
                    **{**common, "generator": _gen()}).images
    tiled = supir(_image(32, 32), output_type="pt", tile=4, tile_overlap=2,
                  **{**common, "generator": _gen()}).images
    assert tiled.shape == untiled.shape and torch.isfinite(tiled).all()
    assert not torch.equal(tiled, untiled)


def test_supir_arguments_are_checked(supir, folders):
    with pytest.raises(ValueError, match="supir_stage1"):
        RaimPipeline.check_inputs(supir_stage1="gan")
    with pytest.raises(ValueError, match="control_scale"):
        RaimPipeline.check_inputs(control_scale=-1.0)
    with pytest.raises(ValueError, match="one generator"):
        supir(_image(8, 8), generator=[_gen()], output_type="pt", stages=("prior", "generate"),
              **SUPIR_FAST)
    with pytest.raises(ValueError, match="SDXL"):
        RaimPipeline.from_pretrained(folders["sd15"],
                                     supir={"model.control_model.x": torch.zeros(1)})


def test_learned_blend_head_replaces_the_fixed_input_blend():
    """A prior with MiAlgo's learned head already blends the input back in: input_blend is
    not applied on top of it."""
    from raim_diffusion.prior.head import RefinementHead

    prior = tiny_prior(2)
    prior.set_head(RefinementHead(init_alpha=0.5))
    pipe = RaimPipeline(prior=prior)
    common = dict(generator=_gen(), output_type="pt", stages=("prior",), upscale=2)
    plain = pipe(_image(8, 8), **common).images
    torch.testing.assert_close(pipe(_image(8, 8), input_blend=0.7, **common).images, plain,
                               rtol=0, atol=0)
    prior.set_head(None)
    assert not torch.equal(pipe(_image(8, 8), input_blend=0.7, **common).images,
                           pipe(_image(8, 8), **common).images)
