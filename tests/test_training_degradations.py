"""Real-ESRGAN degradation: kernels, filtering, noise, DiffJPEG and the full pipeline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage import data

from raim_diffusion.training.degradations import (
    KERNEL_SIZE,
    DegradationConfig,
    KernelConfig,
    RealESRGANDegradation,
    add_gaussian_noise,
    add_poisson_noise,
    diff_jpeg,
    filter2d,
    random_final_sinc_kernels,
    random_kernels,
    usm_sharp,
)


def _photo(size: int = 96) -> torch.Tensor:
    img = data.astronaut()[100 : 100 + size, 150 : 150 + size]
    return torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255


def _support_size(k: torch.Tensor) -> int:
    """Side of the smallest centred square holding every non-zero entry."""
    c = KERNEL_SIZE // 2
    ys, xs = torch.nonzero(k, as_tuple=True)
    return 2 * int(max((ys - c).abs().max(), (xs - c).abs().max())) + 1


@pytest.mark.parametrize(
    "probs",
    [
        [1, 0, 0, 0, 0, 0],
        [0, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ],
    ids=["iso", "aniso", "gen_iso", "gen_aniso", "plateau_iso", "plateau_aniso"],
)
@pytest.mark.parametrize("size", [7, 13, 21])
def test_kernels_sum_to_one_with_stated_support(probs: list[float], size: int) -> None:
    cfg = KernelConfig(kernel_sizes=[size], type_probs=probs, sigma_range=[2.5, 3.0], sinc_prob=0.0)
    k = random_kernels(16, torch.Generator().manual_seed(size), config=cfg)
    assert k.shape == (16, KERNEL_SIZE, KERNEL_SIZE)
    torch.testing.assert_close(k.sum(dim=(1, 2)), torch.ones(16))
    assert (k >= 0).all()
    generalized = probs[2] or probs[3]
    for kk in k:
        # Zero outside the centred k x k square; wide Gaussian and plateau kernels reach its
        # corners (generalized ones with a large beta may underflow there).
        if generalized:
            assert _support_size(kk) <= size
        else:
            assert _support_size(kk) == size
        c = KERNEL_SIZE // 2
        assert kk.argmax() == c * KERNEL_SIZE + c
        torch.testing.assert_close(kk, kk.flip(0, 1))


def test_isotropic_kernel_is_rotation_symmetric_and_aniso_is_not() -> None:
    iso = random_kernels(
        8,
        torch.Generator().manual_seed(1),
        config=KernelConfig(kernel_sizes=[21], type_probs=[1, 0, 0, 0, 0, 0], sinc_prob=0),
    )
    torch.testing.assert_close(iso, iso.transpose(1, 2))
    aniso = random_kernels(
        8,
        torch.Generator().manual_seed(1),
        config=KernelConfig(kernel_sizes=[21], type_probs=[0, 1, 0, 0, 0, 0], sinc_prob=0),
    )
    assert not torch.allclose(aniso, aniso.transpose(1, 2), atol=1e-4)


def test_sinc_kernels_sum_to_one_ring_and_have_support() -> None:
    cfg = KernelConfig(kernel_sizes=[11, 21], sinc_prob=1.0)
    k = random_kernels(32, torch.Generator().manual_seed(2), config=cfg)
    torch.testing.assert_close(k.sum(dim=(1, 2)), torch.ones(32))
    assert (k < 0).any(), "sinc kernels ring (have negative lobes)"
    assert {_support_size(kk) for kk in k} <= {11, 21}
    final = random_final_sinc_kernels(64, torch.Generator().manual_seed(3), prob=0.5)
    torch.testing.assert_close(final.sum(dim=(1, 2)), torch.ones(64))
    deltas = (final == 1).flatten(1).any(dim=1)
    assert 0 < int(deltas.sum()) < 64, "a mix of delta and sinc kernels"


def test_sinc_centre_value_matches_the_limit() -> None:
    # With one size and omega fixed by the generator, check the analytic centre w^2 / (4 pi)
    # relative to a neighbour: w J1(w r) / (2 pi r) at r = 1.
    j1 = pytest.importorskip("scipy.special").j1

    cfg = KernelConfig(kernel_sizes=[21], sinc_prob=1.0)
    k = random_kernels(4, torch.Generator().manual_seed(4), config=cfg).double()
    c = KERNEL_SIZE // 2
    for kk in k:
        ratio = float(kk[c, c + 1] / kk[c, c])
        # Solve for omega numerically from the ratio and confirm it lies in the drawn range.
        ws = np.linspace(math.pi / 5, math.pi, 20001)
        r = (ws * j1(ws) / (2 * math.pi)) / (ws**2 / (4 * math.pi))
        assert np.abs(r - ratio).min() < 1e-4


def test_filter2d_delta_is_identity_and_box_blurs() -> None:
    x = torch.rand(3, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    delta = torch.zeros(3, 7, 7)
    delta[:, 3, 3] = 1
    torch.testing.assert_close(filter2d(x, delta), x)
    box = torch.full((5, 5), 1 / 25)
    y = filter2d(x, box)
    assert y.shape == x.shape
    torch.testing.assert_close(y[..., 2:-2, 2:-2].mean(), x.mean(), atol=2e-2, rtol=0)
    assert y.std() < x.std()
    # Tiny images (smaller than the pad) still work.
    small = torch.rand(2, 3, 4, 5)
    assert filter2d(small, random_kernels(2, torch.Generator().manual_seed(0))).shape == small.shape


def test_usm_sharpening_increases_contrast_and_keeps_flat_regions() -> None:
    x = _photo(64)
    y = usm_sharp(x)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    lap = torch.tensor([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=torch.float32)
    assert filter2d(y, lap).abs().mean() > filter2d(x, lap).abs().mean()
    flat = torch.full((1, 3, 64, 64), 0.4)
    torch.testing.assert_close(usm_sharp(flat), flat)


def test_jpeg_quality_orders_the_error_on_a_real_photo() -> None:
    x = _photo(96)
    errs = [float((diff_jpeg(x, q) - x).abs().mean()) for q in (10, 30, 50, 70, 95)]
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), errs
    # Per-sample qualities match the single-quality results.
    batch = diff_jpeg(x.repeat(2, 1, 1, 1), torch.tensor([10.0, 95.0]))
    torch.testing.assert_close(batch[0:1], diff_jpeg(x, 10))
    torch.testing.assert_close(batch[1:2], diff_jpeg(x, 95))


def test_jpeg_is_close_to_a_real_codec() -> None:
    cv2 = pytest.importorskip("cv2")
    x = _photo(96)
    arr = (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    ok, enc = cv2.imencode(".jpg", arr[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 50])
    ref = cv2.imdecode(enc, cv2.IMREAD_COLOR)[..., ::-1].astype(np.float32) / 255
    ref_t = torch.from_numpy(ref.copy()).permute(2, 0, 1)[None]
    # Same codec up to rounding details: well within one JPEG step of each other.
    assert float((diff_jpeg(x, 50) - ref_t).abs().mean()) < 0.01


def test_jpeg_pads_odd_sizes_and_rejects_bad_quality() -> None:
    x = torch.rand(2, 3, 19, 27, generator=torch.Generator().manual_seed(0))
    y = diff_jpeg(x, 60)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    with pytest.raises(ValueError, match="quality"):
        diff_jpeg(x, 0)


def test_noise_strength_gray_variant_and_determinism() -> None:
    x = torch.full((4, 3, 32, 32), 0.5)
    g = torch.Generator().manual_seed(0)
    sigma = torch.tensor([0.0, 0.05, 0.1, 0.1])
    gray = torch.tensor([False, False, False, True])
    y = add_gaussian_noise(x, sigma, gray, g)
    std = (y - x).flatten(1).std(dim=1)
    assert std[0] == 0 and 0.04 < std[1] < 0.06 and 0.08 < std[2] < 0.12
    # Gray noise: one field shared by the three channels of that sample only.
    torch.testing.assert_close(y[3, 0], y[3, 1])
    assert not torch.allclose(y[2, 0], y[2, 1])
    photo = _photo(32).repeat(2, 1, 1, 1)
    gray = torch.tensor([False, True])
    p1 = add_poisson_noise(photo, 1.0, gray, torch.Generator().manual_seed(5), clip=False)
    p2 = add_poisson_noise(photo, 1.0, gray, torch.Generator().manual_seed(5), clip=False)
    torch.testing.assert_close(p1, p2)
    noise = p1 - _photo(32)
    torch.testing.assert_close(noise[1, 0], noise[1, 2], atol=1e-6, rtol=0)
    assert noise[0].abs().mean() > 0


def test_pipeline_shape_range_quantisation_and_determinism() -> None:
    gt = torch.cat([_photo(48), torch.flip(_photo(48), dims=[-1])])
    degrade = RealESRGANDegradation(DegradationConfig())
    a = degrade(gt, torch.Generator().manual_seed(7))
    b = degrade(gt, torch.Generator().manual_seed(7))
    c = degrade(gt, torch.Generator().manual_seed(8))
    assert a.shape == gt.shape and a.dtype == gt.dtype
    assert a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a * 255, (a * 255).round(), atol=1e-4, rtol=0)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (a - gt).abs().mean() > 0.01, "the LQ is actually degraded"


def test_pipeline_scale_and_tiny_inputs() -> None:
    degrade = RealESRGANDegradation(DegradationConfig(scale=4))
    assert degrade(torch.rand(1, 3, 64, 64), torch.Generator().manual_seed(0)).shape == (
        1,
        3,
        16,
        16,
    )
    tiny = RealESRGANDegradation()
    for seed in range(6):  # strong downscales shrink 32 px crops to a few pixels
        assert tiny(torch.rand(2, 3, 32, 32), torch.Generator().manual_seed(seed)).shape == (
            2,
            3,
            32,
            32,
        )
    with pytest.raises(ValueError, match="gt"):
        tiny(torch.rand(3, 32, 32))
