"""Random training masks: coverage control, shapes, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raim_diffusion.training.masks import (
    blob_mask,
    mask_coverage,
    random_masks,
    sttn_mask,
    sttn_shape,
)


@pytest.mark.parametrize("coverage", [(0.05, 0.5), (0.2, 0.25), (0.0, 0.02), (0.6, 0.9)])
@pytest.mark.parametrize("sttn_prob", [0.0, 0.5, 1.0])
def test_coverage_is_always_in_range(coverage: tuple[float, float], sttn_prob: float) -> None:
    for seed in range(8):
        m = random_masks(
            4, 40, 56, coverage, torch.Generator().manual_seed(seed), sttn_prob=sttn_prob
        )
        assert m.shape == (4, 1, 40, 56) and m.dtype == torch.float32
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        cov = mask_coverage(m)
        assert ((cov >= coverage[0]) & (cov <= coverage[1])).all(), (seed, cov)


def test_masks_are_deterministic_and_vary_with_the_seed() -> None:
    a = random_masks(6, 48, 48, (0.05, 0.5), torch.Generator().manual_seed(3))
    b = random_masks(6, 48, 48, (0.05, 0.5), torch.Generator().manual_seed(3))
    c = random_masks(6, 48, 48, (0.05, 0.5), torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_exact_coverage_and_invalid_ranges() -> None:
    m = random_masks(3, 10, 10, (0.3, 0.3), torch.Generator().manual_seed(0))
    assert torch.equal(mask_coverage(m), torch.full((3,), 0.3))
    assert random_masks(2, 8, 8, (0.0, 0.0)).sum() == 0
    with pytest.raises(ValueError, match="coverage"):
        random_masks(1, 8, 8, (0.5, 0.2))
    with pytest.raises(ValueError, match="whole pixel"):
        random_masks(1, 3, 3, (0.15, 0.2))


def test_sttn_shape_is_a_single_smooth_blob_inside_its_box() -> None:
    cv2 = pytest.importorskip("cv2")
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        shape = sttn_shape(8, 0.7, 120, 90, g)
        h, w = shape.shape
        assert h <= 90 and w <= 120
        # Cropped to the bounding box: every border row/column touches the shape.
        assert shape[0].any() and shape[-1].any() and shape[:, 0].any() and shape[:, -1].any()
        n, _ = cv2.connectedComponents(shape.astype(np.uint8))
        assert n - 1 >= 1
        # The blob fills most of its bounding box (it is a rounded star, not a thin line).
        assert shape.mean() > 0.3
    m = sttn_mask(60, 80, g)
    assert m.shape == (60, 80) and 0 < m.mean() < 1


def test_blob_mask_hits_the_requested_pixel_count() -> None:
    g = torch.Generator().manual_seed(2)
    for cov in (0.0, 0.1, 0.33, 1.0):
        m = blob_mask(30, 50, cov, g)
        assert m.sum() == round(cov * 1500)
