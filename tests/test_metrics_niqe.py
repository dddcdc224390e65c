"""NIQE through pyiqa against an independent numpy NIQE written from the MATLAB release.

The reference below follows Mittal, Soundararajan and Bovik, "Making a completely blind image
quality analyzer" (2012) and the structure of their MATLAB code: MSCN coefficients with a 7x7
Gaussian (sigma 7/6, replicate border), 18 AGGD features per 96x96 block at two scales (the
second after MATLAB's antialiased bicubic ``imresize(.., 0.5)``), a multivariate Gaussian fit,
and the distance to the pristine model ``niqe_modelparameters.mat``.
"""

from __future__ import annotations

import shutil
from math import gamma

import numpy as np
import pytest
import torch

pytest.importorskip("pyiqa", reason="metrics need the 'eval' extra (pyiqa)")
skdata = pytest.importorskip("skimage.data")
from scipy.io import loadmat  # noqa: E402
from scipy.ndimage import correlate  # noqa: E402
from scipy.special import gammaln  # noqa: E402

from raim_diffusion.metrics import IQAMetrics  # noqa: E402
from tests.test_metrics import NIQE_PARAMS, _luma255  # noqa: E402 - one copy of each


def _cubic(x):
    a = np.abs(x)
    return np.where(
        a <= 1,
        1.5 * a**3 - 2.5 * a**2 + 1,
        np.where(a <= 2, -0.5 * a**3 + 2.5 * a**2 - 4 * a + 2, 0.0),
    )


def _half_weights(n):
    """MATLAB imresize(.., 0.5) bicubic with antialiasing along one axis: (n_out, n) matrix."""
    scale, width = 0.5, 4 / 0.5
    out = int(np.ceil(n * scale))
    x = np.arange(1, out + 1)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - width / 2)
    taps = int(np.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps)[None] - 1  # 0-based
    w = scale * _cubic(scale * (u[:, None] - (idx + 1)))
    w /= w.sum(1, keepdims=True)
    mirror = np.concatenate([np.arange(n), np.arange(n - 1, -1, -1)])
    idx = mirror[np.mod(idx.astype(int), 2 * n)]
    m = np.zeros((out, n))
    for r in range(out):
        np.add.at(m[r], idx[r], w[r])
    return m


def _aggd(v):
    gam = np.arange(0.2, 10.0005, 0.001)
    r_gam = np.exp(2 * gammaln(2 / gam) - gammaln(1 / gam) - gammaln(3 / gam))
    left = np.sqrt(np.mean(v[v < 0] ** 2))
    right = np.sqrt(np.mean(v[v > 0] ** 2))
    g = left / right
    rhat = np.mean(np.abs(v)) ** 2 / np.mean(v**2)
    rn = rhat * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
    alpha = gam[np.argmin((r_gam - rn) ** 2)]
    k = np.sqrt(gamma(1 / alpha) / gamma(3 / alpha))
    return alpha, left * k, right * k


def _block_features(b):
    alpha, bl, br = _aggd(b.ravel())
    feat = [alpha, (bl + br) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (-1, 1)):
        pair = b * np.roll(b, shift, axis=(0, 1))
        alpha, bl, br = _aggd(pair.ravel())
        feat += [alpha, (br - bl) * gamma(2 / alpha) / gamma(1 / alpha), bl, br]
    return feat


def niqe_numpy(y, params_path, block=96):
    """NIQE (Mittal et al. 2012) of a [0, 255] luma image, after the MATLAB release."""
    p = loadmat(params_path)
    mu_p, cov_p = np.ravel(p["mu_prisparam"]), p["cov_prisparam"]
    h, w = (y.shape[0] // block) * block, (y.shape[1] // block) * block
    im = y[:h, :w].astype(np.float64)
    r = np.arange(7) - 3
    win = np.exp(-(r[:, None] ** 2 + r[None] ** 2) / (2 * (7 / 6) ** 2))
    win /= win.sum()
    feats = []
    for scale in (1, 2):
        mu = correlate(im, win, mode="nearest")
        sigma = np.sqrt(np.abs(correlate(im * im, win, mode="nearest") - mu * mu))
        struct = (im - mu) / (sigma + 1)
        bs = block // scale
        feats.append(
            [
                _block_features(struct[i : i + bs, j : j + bs])
                for i in range(0, struct.shape[0] - bs + 1, bs)
                for j in range(0, struct.shape[1] - bs + 1, bs)
            ]
        )
        if scale == 1:
            im = _half_weights(im.shape[0]) @ im @ _half_weights(im.shape[1]).T
    d = np.concatenate([np.array(feats[0]), np.array(feats[1])], axis=1)
    d = d[~np.isnan(d).any(1)]
    mu_d, cov_d = d.mean(0), np.cov(d, rowvar=False)
    diff = mu_p - mu_d
    return float(np.sqrt(diff @ np.linalg.pinv((cov_p + cov_d) / 2) @ diff))


def test_half_resize_matches_matlab_properties():
    m = _half_weights(40)
    assert m.shape == (20, 40) and np.allclose(m.sum(1), 1.0)
    assert np.allclose(m @ np.full(40, 7.0), 7.0)  # constants are preserved
    assert np.allclose(m[6, 2:], m[5, :-2])  # interior rows: the same 8-tap kernel, stride 2
    # MATLAB's antialiased bicubic taps for a factor of 2 (a = -0.5 cubic stretched by 2)
    taps = [-0.01171875, -0.03515625, 0.11328125, 0.43359375]
    assert np.count_nonzero(m[5]) == 8 and np.allclose(m[5, 7:15], taps + taps[::-1])


# pyiqa's NIQE is not a float64 computation, and NIQE itself is discontinuous, so a float64
# reference can only agree up to a relative tolerance. Measured with pyiqa 0.1.16 / torch 2.14:
# - the luma is computed in float32 (the challenge fed pyiqa float32 images, and so do we), so a
#   pixel whose exact luma lies on a half level (299R + 587G + 114B = 1000k + 500, ~0.07% of the
#   pixels of these photos) is rounded up or down by float32 round-off, which depends on torch's
#   matmul kernel: numpy's elementwise float32 sum and torch's matmul disagree on 2 of the 25
#   such pixels of the astronaut crop here. Over random roundings of those pixels the NIQE of
#   these crops moves by up to 9.8e-4 (relative);
# - pyiqa's 7x7 Gaussian window is rounded to float32 (``fspecial(...).float()``) and its
#   ``imresize`` always works in float32 (``cast_input`` tests ``dtype != float32 or dtype !=
#   float64``, which is always true); the MSCN values move by ~1e-4 (sigma comes from
#   E[x^2] - mu^2, a cancellation), which is enough to move the AGGD shape (an argmin over a
#   0.001 grid) one grid step in some blocks: up to 3.1e-4 relative with the luma held equal.
# Emulating exactly those float32 steps (luma, window, resize) in the reference brings the gap
# below 2e-7 on five crops, so nothing else (pinv, scipy's correlate) differs. 2e-3 covers both
# effects and still rejects the mistakes that matter: a 1% wrong window sigma (2.7e-3 / 5.5e-3
# on these crops), reflect or zero borders (1.6e-3 / 1.4e-2), population covariance (9e-3),
# unrounded or BT.601 luma (>5e-3).
NIQE_RTOL = 2e-3


@pytest.mark.skipif(not NIQE_PARAMS.is_file(), reason=f"no NIQE parameters at {NIQE_PARAMS}")
@pytest.mark.parametrize(
    "photo",
    [
        pytest.param(lambda: skdata.astronaut()[64:256, 160:352], id="astronaut"),
        pytest.param(lambda: skdata.coffee()[:288, :384], id="coffee"),
    ],
)
def test_niqe_matches_independent_numpy(tmp_path, monkeypatch, photo):
    home = tmp_path / "th"
    (home / "hub" / "pyiqa").mkdir(parents=True)
    shutil.copy(NIQE_PARAMS, home / "hub" / "pyiqa" / "niqe_modelparameters.mat")
    monkeypatch.setenv("TORCH_HOME", str(home))
    m = IQAMetrics("niqe", device="cpu")
    photo = photo()
    got = float(m(torch.from_numpy(photo.copy()).permute(2, 0, 1)[None].float() / 255)["niqe"])
    want = niqe_numpy(_luma255(photo), NIQE_PARAMS)
    assert 2.0 < want < 15.0
    assert got == pytest.approx(want, rel=NIQE_RTOL)
