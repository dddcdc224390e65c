"""Colour fixes: identities, frequency split, statistics matching, linearity."""

from __future__ import annotations

import pytest
import torch

from raim_diffusion.diffusion.color import (
    adain_color_fix,
    color_fix,
    wavelet_color_fix,
    wavelet_lowpass,
)


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_wavelet_with_itself_is_identity():
    x = _rand(2, 3, 40, 33)
    torch.testing.assert_close(wavelet_color_fix(x, x), x, atol=1e-6, rtol=0)


def test_wavelet_takes_low_frequencies_from_ref_and_high_from_x():
    x, ref = _rand(1, 3, 64, 64, seed=1), _rand(1, 3, 64, 64, seed=2) * 0.2 + 0.1
    out = wavelet_color_fix(x, ref)
    # Exactly: out - low(ref) is x's high band, and x's high band has no low-frequency energy
    # left beyond what one more lowpass of it keeps.
    torch.testing.assert_close(out - wavelet_lowpass(ref), x - wavelet_lowpass(x), atol=1e-6,
                               rtol=0)
    # The mean colour (lowest frequency) comes from ref, not x.
    assert (out.mean((-1, -2)) - ref.mean((-1, -2))).abs().max() < 0.02
    assert (out.mean((-1, -2)) - x.mean((-1, -2))).abs().max() > 0.1


def test_wavelet_is_linear():
    a, b, r1, r2 = (_rand(1, 3, 24, 24, seed=s) for s in range(4))
    lhs = wavelet_color_fix(2 * a + b, 2 * r1 + r2)
    rhs = 2 * wavelet_color_fix(a, r1) + wavelet_color_fix(b, r2)
    torch.testing.assert_close(lhs, rhs, atol=1e-5, rtol=0)


def test_wavelet_on_images_smaller_than_its_reach():
    x = _rand(1, 3, 5, 7)
    out = wavelet_color_fix(x, torch.full_like(x, 0.5))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_wavelet_resizes_the_reference():
    x = _rand(1, 3, 32, 32)
    ref = torch.full((1, 3, 16, 16), 0.25)
    torch.testing.assert_close(wavelet_color_fix(x, ref).mean(), torch.tensor(0.25), atol=1e-2,
                               rtol=0)


def test_adain_matches_reference_statistics():
    x, ref = _rand(2, 3, 20, 30, seed=3), _rand(2, 3, 10, 12, seed=4) * 0.2 + 0.6
    out = adain_color_fix(x, ref)
    torch.testing.assert_close(out.mean((-1, -2)), ref.mean((-1, -2)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.flatten(2).std(-1), ref.flatten(2).std(-1), atol=1e-3,
                               rtol=1e-3)
    torch.testing.assert_close(adain_color_fix(x, x), x, atol=1e-5, rtol=0)


def test_dispatch_clamps_and_validates():
    x, ref = _rand(1, 3, 16, 16), _rand(1, 3, 16, 16, seed=9)
    assert color_fix(x, ref, "none") is x
    for method in ("wavelet", "adain"):
        out = color_fix(x * 3 - 1, ref, method)
        assert out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="color_fix"):
        color_fix(x, ref, "histogram")
    with pytest.raises(ValueError, match="same batch"):
        color_fix(x, ref[:, :1], "adain")
