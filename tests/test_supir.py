"""SUPIR's adaptor and sampler on tiny random components (CPU, seconds)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from raim_diffusion.diffusion.supir import (
    SUPIR_CONTROL_PREFIX,
    SUPIR_PROJECT_PREFIX,
    SupirControlModel,
    SupirUNet2DConditionModel,
    ZeroSFT,
    load_supir,
    to_supir_state_dict,
)
from raim_diffusion.diffusion.supir_sampler import (
    supir_image_size,
    supir_sample,
    supir_stage1,
    supir_step_sigmas,
)
from raim_diffusion.testing import tiny_components, tiny_supir_components


@pytest.fixture(scope="module")
def sdxl():
    comps = tiny_components("sdxl")
    return comps["unet"].eval(), comps["vae"].eval()


@pytest.fixture(scope="module")
def supir(sdxl):
    unet, vae = sdxl
    return tiny_supir_components(unet, vae, seed=1)


def _inputs(seed: int = 0, batch: int = 1, size: int = 16):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, 4, size, size, generator=g),
        timestep=torch.tensor([637.0] * batch),
        encoder_hidden_states=torch.randn(batch, 7, 64, generator=g),
        added_cond_kwargs={
            "text_embeds": torch.randn(batch, 32, generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch),
        },
        lq_latent=torch.randn(batch, 4, size, size, generator=g),
    )


def _hints(control, x):
    return control(
        x["sample"],
        x["timestep"],
        x["encoder_hidden_states"],
        x["added_cond_kwargs"],
        x["lq_latent"],
    )


def _unet(unet, x, **kw):
    return unet(
        x["sample"],
        x["timestep"],
        x["encoder_hidden_states"],
        added_cond_kwargs=x["added_cond_kwargs"],
        **kw,
    ).sample


@torch.no_grad()
def test_checkpoint_in_supir_layout_loads_strictly(tmp_path, sdxl, supir):
    unet, vae = sdxl
    state = to_supir_state_dict(supir.control, supir.unet, supir.denoise_encoder)
    assert any(k.startswith(SUPIR_CONTROL_PREFIX + "input_hint_block.0.") for k in state)
    assert any(k.startswith("first_stage_model.denoise_encoder.mid.attn_1.q.") for k in state)
    assert state["first_stage_model.denoise_encoder.mid.attn_1.q.weight"].ndim == 4
    leftovers = {
        "mask_LQ": torch.zeros(1),
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
    }
    path = tmp_path / "supir.safetensors"
    save_file({**state, **leftovers}, str(path))
    torch.save({"state_dict": {**state, **leftovers}}, tmp_path / "supir.ckpt")

    for ckpt in (path, tmp_path / "supir.ckpt"):
        loaded = load_supir(ckpt, unet, vae=vae)
        assert loaded.unused_keys == tuple(sorted(leftovers))
        for src, dst in (
            (supir.control, loaded.control),
            (supir.unet, loaded.unet),
            (supir.denoise_encoder, loaded.denoise_encoder),
        ):
            a, b = src.state_dict(), dst.state_dict()
            assert a.keys() == b.keys()
            for key in a:
                torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    # round trip: writing the loaded components gives the same checkpoint
    again = to_supir_state_dict(loaded.control, loaded.unet, loaded.denoise_encoder)
    assert again.keys() == state.keys()
    x = _inputs()
    hints = _hints(loaded.control, x)
    torch.testing.assert_close(hints, _hints(supir.control, x), rtol=0, atol=0)
    torch.testing.assert_close(
        _unet(loaded.unet, x, supir_hints=hints),
        _unet(supir.unet, x, supir_hints=hints),
        rtol=0,
        atol=0,
    )


def test_strict_loading_rejects_missing_and_unexpected_keys(sdxl, supir):
    unet, vae = sdxl
    state = to_supir_state_dict(supir.control, supir.unet, supir.denoise_encoder)
    for key in (
        SUPIR_CONTROL_PREFIX + "middle_block.0.in_layers.2.weight",
        SUPIR_PROJECT_PREFIX + "0.zero_mul.weight",
        "first_stage_model.denoise_encoder.conv_out.bias",
    ):
        broken = dict(state)
        del broken[key]
        with pytest.raises(ValueError, match="missing"):
            load_supir(broken, unet, vae=vae)
    for key in (
        SUPIR_CONTROL_PREFIX + "output_blocks.0.0.in_layers.0.weight",
        SUPIR_PROJECT_PREFIX + "99.zero_mul.weight",
    ):
        with pytest.raises(ValueError, match="unexpected"):
            load_supir({**state, key: torch.zeros(1)}, unet, vae=vae)
    wrong = dict(state)
    wrong[SUPIR_PROJECT_PREFIX + "0.zero_conv.weight"] = torch.zeros(3, 3, 1, 1)
    with pytest.raises(ValueError, match="shape"):
        load_supir(wrong, unet, vae=vae)
    with pytest.raises(TypeError, match="unet"):
        load_supir(state, object())  # type: ignore[arg-type]


@torch.no_grad()
def test_unet_reuses_base_weights_and_equals_base_without_hints(sdxl, supir):
    unet, _ = sdxl
    shared = dict(unet.named_parameters())
    for name, param in supir.unet.named_parameters():
        if not name.startswith("project_modules."):
            assert param.data_ptr() == shared[name].data_ptr(), name
    x = _inputs()
    torch.testing.assert_close(_unet(supir.unet, x), _unet(unet, x), rtol=0, atol=0)


@torch.no_grad()
def test_control_scale_zero_equals_base_unet(sdxl, supir):
    unet, _ = sdxl
    x = _inputs(seed=3, batch=2)
    hints = _hints(supir.control, x)
    base = _unet(unet, x)
    torch.testing.assert_close(
        _unet(supir.unet, x, supir_hints=hints, control_scale=0.0), base, rtol=0, atol=1e-6
    )
    # the connectors do act at scale 1 (random weights), and between the scales
    full = _unet(supir.unet, x, supir_hints=hints, control_scale=1.0)
    assert (full - base).abs().max() > 1e-3


@torch.no_grad()
def test_zero_connectors_reduce_to_the_normalised_concatenation():
    # SUPIR's zero-initialised ZeroSFT is GN(cat(state, skip)) at scale 1 (its GroupNorm is not
    # zero-initialised) and the plain concatenation at scale 0.
    sft = ZeroSFT(8, 8, concat_channels=16, norm_num_groups=4)
    c, skip, state = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5), torch.randn(2, 16, 5, 5)
    cat = torch.cat([state, skip], dim=1)
    torch.testing.assert_close(
        sft(c, skip, state, 1.0), torch.nn.functional.group_norm(cat, 4, eps=1e-5)
    )
    torch.testing.assert_close(sft(c, skip, state, 0.0), cat, rtol=0, atol=0)
    mid = ZeroSFT(8, 8, norm_num_groups=4)
    torch.testing.assert_close(mid(c, skip, None, 0.0), skip, rtol=0, atol=0)


@torch.no_grad()
def test_control_model_is_the_unet_encoder_plus_the_lq_conv(sdxl):
    unet, _ = sdxl
    control = SupirControlModel.from_unet_config(unet.config)
    own = control.state_dict()
    missing, _ = control.load_state_dict(
        {k: v for k, v in unet.state_dict().items() if k in own}, strict=False
    )
    assert sorted(missing) == ["lq_conv_in.bias", "lq_conv_in.weight"]
    feats: list[torch.Tensor] = []
    hooks = [unet.conv_in.register_forward_hook(lambda m, i, o: feats.append(o))]
    hooks += [b.register_forward_hook(lambda m, i, o: feats.extend(o[1])) for b in unet.down_blocks]
    hooks += [unet.mid_block.register_forward_hook(lambda m, i, o: feats.append(o))]
    x = _inputs(seed=5)
    _unet(unet, x)
    for hook in hooks:
        hook.remove()
    hints = _hints(control, x)  # lq_conv_in is zero: the LQ latent adds nothing
    assert len(hints) == len(feats) == 5
    torch.testing.assert_close(hints, feats, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        control.lq_conv_in.weight.normal_()
    assert (_hints(control, x)[0] - feats[0]).abs().max() > 1e-3


@torch.no_grad()
def test_denoise_encoder_with_vae_weights_matches_vae_encode(sdxl):
    unet, vae = sdxl
    comps = tiny_supir_components(unet, vae)
    comps.denoise_encoder.encoder.load_state_dict(vae.encoder.state_dict(), strict=True)
    image = torch.rand(1, 3, 32, 32)
    expected = vae.encode(image * 2 - 1).latent_dist.mode() * vae.config.scaling_factor
    torch.testing.assert_close(
        comps.denoise_encoder.encode(image, vae), expected, rtol=1e-5, atol=1e-6
    )


@torch.no_grad()
def test_components_save_and_load_pretrained(tmp_path, sdxl, supir):
    supir.unet.save_pretrained(tmp_path / "unet")
    supir.control.save_pretrained(tmp_path / "control")
    unet = SupirUNet2DConditionModel.from_pretrained(tmp_path / "unet")
    control = SupirControlModel.from_pretrained(tmp_path / "control")
    x = _inputs(seed=7)
    hints = _hints(control, x)
    torch.testing.assert_close(hints, _hints(supir.control, x))
    torch.testing.assert_close(
        _unet(unet, x, supir_hints=hints, control_scale=0.7),
        _unet(supir.unet, x, supir_hints=hints, control_scale=0.7),
    )


# ---------------------------------------------------------------------------------------------
# Sampler


def _sample_kwargs(x, **kw):
    g = torch.Generator().manual_seed(11)
    neg = {
        "negative_prompt_embeds": torch.randn(1, 7, 64, generator=g),
        "negative_added_cond_kwargs": x["added_cond_kwargs"],
    }
    return dict(
        lq_latent=x["lq_latent"],
        x_center=torch.randn(x["lq_latent"].shape, generator=g),
        prompt_embeds=x["encoder_hidden_states"],
        added_cond_kwargs=x["added_cond_kwargs"],
        num_inference_steps=4,
        **neg,
        **kw,
    )


def test_step_sigmas_follow_the_legacy_schedule():
    sigmas = supir_step_sigmas(50)
    assert sigmas.shape == (51,) and sigmas[-1] == 0
    assert abs(float(sigmas[0]) - 14.6146) < 1e-3
    assert torch.all(sigmas[:-1] > sigmas[1:])
    assert supir_image_size(300, 500) == (1024, 1728)
    assert supir_image_size(1200, 1300, upscale=2) == (2432, 2624)


@torch.no_grad()
def test_restoration_weight_one_returns_the_stage1_latent(supir):
    x = _inputs(seed=2, size=8)
    kw = _sample_kwargs(x, restoration_weights=[1.0] * 4, s_churn=5.0)
    out = supir_sample(supir.control, supir.unet, generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(out, kw["x_center"], rtol=0, atol=1e-5)
    # SUPIR's own schedule leaves the last step unguided, so the result differs from x_center
    kw = _sample_kwargs(x, restoration_tau=4.0)
    out = supir_sample(supir.control, supir.unet, generator=torch.Generator().manual_seed(0), **kw)
    assert (out - kw["x_center"]).abs().max() > 1e-3


@torch.no_grad()
def test_tiled_equals_untiled_when_one_tile_covers(supir):
    x = _inputs(seed=4, size=8)
    kw = _sample_kwargs(x, control_scale_start=0.3, restoration_tau=2.0)
    untiled = supir_sample(
        supir.control, supir.unet, generator=torch.Generator().manual_seed(1), **kw
    )
    tiled = supir_sample(
        supir.control, supir.unet, generator=torch.Generator().manual_seed(1), tile_size=16, **kw
    )
    torch.testing.assert_close(tiled, untiled, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(untiled).all()


@torch.no_grad()
def test_tiled_sampler_covers_the_latent_with_overlapping_tiles(supir):
    x = _inputs(seed=6, size=12)
    kw = _sample_kwargs(x)
    kw["num_inference_steps"] = 2
    out = supir_sample(
        supir.control,
        supir.unet,
        generator=torch.Generator().manual_seed(2),
        tile_size=8,
        tile_stride=4,
        **kw,
    )
    assert out.shape == x["lq_latent"].shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="restoration_weights"):
        supir_sample(supir.control, supir.unet, restoration_weights=[1.0], **_sample_kwargs(x))


@torch.no_grad()
def test_supir_stage1_then_sampler_end_to_end(sdxl, supir):
    _, vae = sdxl
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    lq, center, x_stage1 = supir_stage1(
        supir.denoise_encoder, vae, image, generator=torch.Generator().manual_seed(0)
    )
    assert lq.shape == center.shape == (1, 4, 8, 8)
    assert x_stage1.shape == image.shape and x_stage1.min() >= 0 and x_stage1.max() <= 1
    x = _inputs(seed=8, size=8)
    kw = _sample_kwargs(x, restoration_tau=4.0)
    kw.update(lq_latent=lq, x_center=center)
    out = supir_sample(supir.control, supir.unet, generator=torch.Generator().manual_seed(0), **kw)
    assert out.shape == lq.shape and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# Runner


def test_config_maps_supir_to_tiny_and_refuses_settings_it_would_ignore():
    from raim_diffusion.runner.config import call_kwargs, load_config, make_tiny

    config = load_config("sdxl", ["generate.supir=weights/SUPIR-v0Q.ckpt",
                                  "generate.supir_stage1=prior", "generate.control_scale=0.8"])
    assert "supir" not in call_kwargs(config)  # a loader key, not a call argument
    assert call_kwargs(config)["supir_stage1"] == "prior"
    tiny = make_tiny(config)
    assert tiny.generate.supir == "tiny:supir" and tiny.generate.model == "tiny:sdxl"
    assert make_tiny(load_config("sdxl")).generate.supir is None
    with pytest.raises(ValueError, match="generate.scheduler.*generate.supir"):
        load_config("sdxl", ["generate.supir=x.ckpt", "generate.scheduler=EulerDiscreteScheduler"])
    with pytest.raises(ValueError, match="generate.supir_stage1"):
        load_config("sdxl", ["generate.supir_stage1=gan"])


def test_raim_restore_xhs_iag_tiny_with_supir(tmp_path, monkeypatch):
    """Xhs-IAG's pipeline (SUPIR, DeSRA masks, fusion) on tiny SUPIR components, end to end."""
    import numpy as np
    from PIL import Image

    from raim_diffusion.cli import main
    from raim_diffusion.images import load_image
    from raim_diffusion.pipeline import RaimPipeline

    monkeypatch.setenv("RAIM_CACHE", str(tmp_path / "cache"))
    calls = []
    original = RaimPipeline.generate_supir

    def spy(self, *args, **kwargs):
        calls.append(type(self.supir_control).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RaimPipeline, "generate_supir", spy)
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (23, 30, 3), dtype=np.uint8)).save(src / "x.png")
    code = main(["restore", str(src), "-o", str(out), "--config", "xhs-iag", "--tiny", "--quiet",
                 "--save-intermediates", "generate.supir=weights/SUPIR-v0Q.ckpt",
                 "generate.scheduler=null", "generate.strength=1.0",
                 "generate.num_inference_steps=2", "generate.min_size=32"])
    assert code == 0 and calls == ["SupirControlModel"]
    assert load_image(out / "x.png").tensor.shape[-2:] == (23, 30)
    assert (out / ".raim-intermediates" / "mask" / "x.png.png").is_file()
