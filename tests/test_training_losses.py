"""Inpainting losses: hole/valid L1, VGG perceptual/style, SM-PatchGAN and soft labels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raim_diffusion.errors import MissingWeightsError
from raim_diffusion.training.losses import (
    VGG19_LAYERS,
    PerceptualConfig,
    PerceptualLoss,
    SMPatchDiscriminator,
    VGGFeatureExtractor,
    discriminator_loss,
    generator_adversarial_loss,
    gram_matrix,
    masked_l1,
    soft_mask_labels,
)


def _pair(seed: int = 0, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, size, size, generator=g), torch.rand(2, 3, size, size, generator=g)


def test_hole_and_valid_split_the_full_l1() -> None:
    pred, target = _pair()
    full = F.l1_loss(pred, target)
    ones, zeros = torch.ones(2, 1, 16, 16), torch.zeros(2, 1, 16, 16)
    hole, valid = masked_l1(pred, target, ones)
    torch.testing.assert_close(hole, full, rtol=1e-5, atol=0)
    assert valid == 0
    hole, valid = masked_l1(pred, target, zeros)
    torch.testing.assert_close(valid, full, rtol=1e-5, atol=0)
    assert hole == 0
    m = (torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    hole, valid = masked_l1(pred, target, m, eps=0.0)
    torch.testing.assert_close(hole * m.mean() + valid * (1 - m).mean(), full)
    # Hole L1 only sees the hole.
    pred2 = pred * (1 - m) + target * m
    hole2, valid2 = masked_l1(pred2, target, m)
    assert hole2 == 0 and torch.isclose(valid2, valid, rtol=1e-5)


def test_soft_labels_are_a_blurred_mask() -> None:
    m = torch.zeros(1, 1, 140, 140)
    m[..., 30:110, 30:110] = 1
    s = soft_mask_labels(m)
    assert s.shape == m.shape and s.min() >= 0 and s.max() <= 1
    torch.testing.assert_close(s[0, 0, 70, 70], torch.tensor(1.0))  # deep inside
    assert s[0, 0, 70, 0] < 2e-3  # three sigma outside
    torch.testing.assert_close(s[0, 0, 70, 30], torch.tensor(0.5), atol=0.03, rtol=0)  # edge
    row = s[0, 0, 70, 0:70]
    assert (row[1:] >= row[:-1] - 1e-6).all(), "rises monotonically into the hole"
    # Same as a direct 71x71 Gaussian (sigma 10) convolution with zero padding.
    ax = torch.arange(71, dtype=torch.float32) - 35
    g = torch.exp(-(ax**2) / 200)
    k = (g[:, None] * g[None, :]) / (g.sum() ** 2)
    ref = F.conv2d(m, k[None, None], padding=35)
    torch.testing.assert_close(s, ref, atol=1e-5, rtol=0)
    # Zero padding: a hole filling the image falls off towards the border.
    full = soft_mask_labels(torch.ones(1, 1, 100, 100))
    assert full[0, 0, 50, 50] > 0.999 and full[0, 0, 0, 0] < 0.3


def test_discriminator_architecture_and_output_size() -> None:
    d = SMPatchDiscriminator(base_channels=8)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(4, 4)] * 5
    assert [c.stride for c in convs] == [(2, 2), (2, 2), (2, 2), (1, 1), (1, 1)]
    assert [c.bias is None for c in convs] == [True, True, True, True, False]
    sn = [hasattr(c, "parametrizations") for c in convs]
    assert sn == [True, True, True, True, False]
    x = torch.rand(2, 3, 64, 48)
    assert d(x).shape == (2, 1, 64, 48)
    # The raw patch map of a 512 input is 62x62 (spec), checked on the layer stack.
    with torch.no_grad():
        assert d.layers(torch.zeros(1, 3, 512, 512)).shape[-2:] == (62, 62)
    with pytest.raises(ValueError, match="32x32"):
        d(torch.rand(1, 3, 16, 16))


def test_lsgan_paper_and_code_forms() -> None:
    m = torch.zeros(1, 1, 8, 8)
    m[..., 2:6, 2:6] = 1
    s = m.clone()
    # The ideal discriminator of the paper form scores 1 - s on the composite and 1 on real.
    assert discriminator_loss(1 - s, torch.ones_like(s), s) == 0
    assert discriminator_loss(s, torch.zeros_like(s), s, reproduce_aot_code_form=True) == 0
    # Generator: only the hole counts (paper); a fooled discriminator in the hole gives 0.
    d_fake = torch.where(m.bool(), torch.ones_like(m), torch.full_like(m, 5.0))
    assert generator_adversarial_loss(d_fake, m) < 1e-6
    # Code form: the mask weighting cancels, everything counts.
    code = generator_adversarial_loss(d_fake, m, reproduce_aot_code_form=True)
    torch.testing.assert_close(code, F.mse_loss(d_fake, torch.ones_like(d_fake)), rtol=1e-5, atol=0)


def test_gram_matrix() -> None:
    f = torch.rand(2, 4, 5, 6)
    g = gram_matrix(f)
    flat = f.reshape(2, 4, 30)
    torch.testing.assert_close(g, flat @ flat.transpose(1, 2) / 120)


def test_missing_vgg_weights_fail_clearly(tmp_path) -> None:
    missing = tmp_path / "vgg19.pth"
    with pytest.raises(MissingWeightsError, match="vgg19-dcbb9e9d.pth"):
        VGGFeatureExtractor(["relu1_1"], weights_path=missing)


def test_vgg_layers_and_weights_file_round_trip(tmp_path) -> None:
    ref = VGGFeatureExtractor(
        ["conv2_2", "relu2_2"], allow_random_weights=True, weights_path=tmp_path / "none.pth"
    )
    # A torchvision-layout checkpoint loads (only "features.*" is used).
    state = {f"features.{k}": v for k, v in ref.features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "vgg19.pth")
    loaded = VGGFeatureExtractor(["conv2_2", "relu2_2"], weights_path=tmp_path / "vgg19.pth")
    assert loaded.pretrained and not ref.pretrained
    x = torch.rand(1, 3, 16, 16)
    out = loaded(x)
    torch.testing.assert_close(out["conv2_2"], ref(x)["conv2_2"])
    # Pre-ReLU conv features keep their negative values; relu features are their clamp.
    assert (out["conv2_2"] < 0).any()
    torch.testing.assert_close(out["relu2_2"], out["conv2_2"].clamp_min(0))
    assert len(loaded.features) == VGG19_LAYERS.index("relu2_2") + 1
    assert not any(p.requires_grad for p in loaded.parameters())


def test_perceptual_loss_is_zero_for_equal_images_and_has_gradients(tmp_path) -> None:
    cfg = PerceptualConfig(
        layer_set="basicsr", allow_random_weights=True, weights_path=str(tmp_path / "none.pth")
    )
    loss = PerceptualLoss(cfg)
    x, y = _pair(size=16)
    p0, s0 = loss(x, x)
    assert p0 == 0 and s0 == 0
    x.requires_grad_(True)
    p, s = loss(x, y)
    assert p > 0 and s > 0
    (p + s).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_layer_sets_follow_the_spec(tmp_path) -> None:
    none = str(tmp_path / "none.pth")
    aot = PerceptualLoss(
        PerceptualConfig(layer_set="aot", allow_random_weights=True, weights_path=none)
    )
    assert aot.perceptual_layers == {f"relu{i}_1": 1.0 for i in range(1, 6)}
    assert set(aot.style_layers) == {"relu2_2", "relu3_4", "relu4_4", "relu5_2"}
    basicsr = PerceptualLoss(
        PerceptualConfig(layer_set="basicsr", allow_random_weights=True, weights_path=none)
    )
    assert basicsr.perceptual_layers == {
        "conv1_2": 0.1,
        "conv2_2": 0.1,
        "conv3_4": 1.0,
        "conv4_4": 1.0,
        "conv5_4": 1.0,
    }
    with pytest.raises(ValueError, match="layer_set"):
        PerceptualLoss(PerceptualConfig(layer_set="nope", allow_random_weights=True))
