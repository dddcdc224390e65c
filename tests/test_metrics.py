"""Tests of the challenge metrics (pyiqa), the SCORE and `raim eval`.

PSNR and SSIM are checked against independent numpy / scikit-image computations on real photos
(`skimage.data`) degraded by real JPEG compression. NIQE runs offline with the MATLAB pristine
parameters of ``../shared/data`` (or ``RAIM_NIQE_PARAMS``) copied into a temporary
``TORCH_HOME``. LPIPS/DISTS weights cannot be obtained offline here: their value tests are
skipped when the files are absent, the missing-files error is tested instead.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("pyiqa", reason="metrics need the 'eval' extra (pyiqa)")
skdata = pytest.importorskip("skimage.data")

from raim_diffusion.errors import MissingWeightsError  # noqa: E402
from raim_diffusion.metrics import (  # noqa: E402
    DEFAULT_CONVENTIONS,
    IQAMetrics,
    MetricConventions,
    challenge_score,
    evaluate_folders,
    mean_of_scores,
    pair_images,
    resolve_weights,
    score_of_means,
)
from raim_diffusion.metrics.evaluate import PairingError  # noqa: E402

# The MATLAB NIQE parameters from ../shared/data, beside the checkout (as CI lays it out).
NIQE_PARAMS = Path(
    os.environ.get("RAIM_NIQE_PARAMS")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "niqe_modelparameters.mat"
)
SIZE = 192  # NIQE needs several 96x96 blocks; small enough for a fast CPU test


def _jpeg(arr: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


@pytest.fixture(scope="module")
def photos() -> list[tuple[np.ndarray, np.ndarray]]:
    """(ground truth, JPEG-degraded) uint8 crops of real photos."""
    crops = [
        skdata.astronaut()[64 : 64 + SIZE, 160 : 160 + SIZE],
        skdata.chelsea()[50 : 50 + SIZE, 120 : 120 + SIZE],
        skdata.coffee()[100 : 100 + SIZE, 200 : 200 + SIZE],
    ]
    return [(c, _jpeg(c, 15)) for c in crops]


def _t(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr).copy()).permute(2, 0, 1)[None].float() / 255.0


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """A private TORCH_HOME with only the NIQE parameters, so nothing else can be found."""
    home = tmp_path / "torch_home"
    (home / "hub" / "pyiqa").mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture
def niqe_home(torch_home) -> Path:
    if not NIQE_PARAMS.is_file():
        pytest.skip(f"NIQE parameters not found at {NIQE_PARAMS} (set RAIM_NIQE_PARAMS)")
    shutil.copy(NIQE_PARAMS, torch_home / "hub" / "pyiqa" / "niqe_modelparameters.mat")
    return torch_home


# ---------------------------------------------------------------- independent references


def _psnr_numpy(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) / 255 - b.astype(np.float64) / 255) ** 2)
    return float(10 * np.log10(1.0 / (mse + 1e-8)))  # pyiqa's eps


def _luma255(a: np.ndarray) -> np.ndarray:
    # pyiqa: Y of YIQ computed on [0, 1] float32 values, scaled to 255 and rounded.
    x = a.astype(np.float32) / 255
    y = (
        x[..., 0] * np.float32(0.299)
        + x[..., 1] * np.float32(0.587)
        + x[..., 2] * np.float32(0.114)
    )
    return np.round(y * 255).astype(np.float64)


def _gauss_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    r = (size - 1) / 2
    y, x = np.mgrid[-r : r + 1, -r : r + 1]
    h = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    return h / h.sum()


def _valid_filter(img: np.ndarray, win: np.ndarray) -> np.ndarray:
    from numpy.lib.stride_tricks import sliding_window_view

    return np.einsum("ijkl,kl->ij", sliding_window_view(img, win.shape), win)


def _ssim_numpy(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of Wang et al. on the rounded luma, Gaussian 11x11/1.5, 'valid', as MATLAB."""
    x, y = _luma255(a), _luma255(b)
    w = _gauss_window()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = _valid_filter(x, w), _valid_filter(y, w)
    sxx = _valid_filter(x * x, w) - mx * mx
    syy = _valid_filter(y * y, w) - my * my
    sxy = _valid_filter(x * y, w) - mx * my
    cs = np.maximum((2 * sxy + c2) / (sxx + syy + c2), 0)  # pyiqa clamps cs at 0
    return float(np.mean((2 * mx * my + c1) / (mx * mx + my * my + c1) * cs))


# ---------------------------------------------------------------- conventions


def test_default_conventions_are_pyiqa_defaults():
    import pyiqa.default_model_configs as cfg

    c = DEFAULT_CONVENTIONS
    assert cfg.DEFAULT_CONFIGS["psnr"]["metric_opts"]["test_y_channel"] is c.psnr_y_channel is False
    assert cfg.DEFAULT_CONFIGS["ssim"]["metric_opts"]["test_y_channel"] is c.ssim_y_channel is True
    assert cfg.DEFAULT_CONFIGS["niqe"]["metric_opts"]["test_y_channel"] is c.niqe_y_channel is True
    assert (c.crop_border, c.color_space, c.lpips_net) == (0, "yiq", "alex")
    assert c.pyiqa_options("lpips")[0] == "lpips"
    assert MetricConventions(lpips_net="vgg").pyiqa_options("lpips")[0] == "lpips-vgg"


@pytest.mark.parametrize(
    "kwargs", [{"color_space": "hsv"}, {"crop_border": -1}, {"lpips_net": "squeeze"}]
)
def test_conventions_reject_bad_values(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        MetricConventions(**kwargs)


# ---------------------------------------------------------------- PSNR / SSIM


def test_psnr_matches_numpy_and_skimage(photos):
    from skimage.metrics import peak_signal_noise_ratio

    m = IQAMetrics("psnr", device="cpu")
    for gt, pred in photos:
        got = float(m(_t(pred), _t(gt))["psnr"])
        assert got == pytest.approx(_psnr_numpy(pred, gt), abs=1e-4)
        # skimage has no eps; the difference is below 1e-4 dB at these error levels.
        assert got == pytest.approx(peak_signal_noise_ratio(gt, pred, data_range=255), abs=1e-4)


def test_psnr_y_channel_and_crop_border(photos):
    gt, pred = photos[0]
    m = IQAMetrics("psnr", device="cpu", conventions=MetricConventions(psnr_y_channel=True))
    y = lambda a: (  # noqa: E731 - unrounded luma in [0, 1], pyiqa's PSNR-Y
        a.astype(np.float32) / 255 @ np.array([0.299, 0.587, 0.114], np.float32)
    ).astype(np.float64)
    expected = 10 * np.log10(1 / (np.mean((y(pred) - y(gt)) ** 2) + 1e-8))
    assert float(m(_t(pred), _t(gt))["psnr"]) == pytest.approx(expected, abs=1e-4)

    crop = IQAMetrics("psnr", device="cpu", conventions=MetricConventions(crop_border=8))
    got = float(crop(_t(pred), _t(gt))["psnr"])
    assert got == pytest.approx(_psnr_numpy(pred[8:-8, 8:-8], gt[8:-8, 8:-8]), abs=1e-4)


def test_ssim_matches_numpy_and_skimage(photos):
    from skimage.metrics import structural_similarity

    m = IQAMetrics("ssim", device="cpu")
    for gt, pred in photos:
        got = float(m(_t(pred), _t(gt))["ssim"])
        assert got == pytest.approx(_ssim_numpy(pred, gt), abs=1e-4)
        sk = structural_similarity(
            _luma255(gt),
            _luma255(pred),
            data_range=255,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        assert got == pytest.approx(sk, abs=1e-4)
        assert 0.3 < got < 0.99  # a real JPEG-15 degradation, not a trivial case


def test_identity_and_batch_equals_single(photos):
    m = IQAMetrics("psnr,ssim", device="cpu")
    gt = torch.cat([_t(g[:96, :96]) for g, _ in photos])
    pred = torch.cat([_t(p[:96, :96]) for _, p in photos])
    batched = m(pred, gt)
    for i in range(len(photos)):
        single = m(pred[i : i + 1], gt[i : i + 1])
        for k in ("psnr", "ssim"):
            assert float(batched[k][i]) == pytest.approx(float(single[k][0]), abs=1e-9)
    same = m(gt, gt)
    assert torch.allclose(same["ssim"], torch.ones(3, dtype=torch.float64))
    assert torch.allclose(same["psnr"], torch.full((3,), 80.0, dtype=torch.float64))  # eps cap


def test_metrics_validate_inputs(photos):
    gt, pred = photos[0]
    m = IQAMetrics("psnr", device="cpu")
    with pytest.raises(ValueError, match="gt is required"):
        m(_t(pred))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        m(_t(pred) * 2, _t(gt))
    with pytest.raises(ValueError, match="shaped like pred"):
        m(_t(pred), _t(gt)[..., :-1])
    with pytest.raises(ValueError, match="unknown or empty"):
        IQAMetrics("psnr,fid", device="cpu")


# ---------------------------------------------------------------- NIQE


def test_niqe_matches_pyiqa_with_matlab_parameters(niqe_home, photos):
    import pyiqa

    ours = IQAMetrics("niqe", device="cpu")
    ref = pyiqa.create_metric(
        "niqe", device="cpu", pretrained_model_path=str(NIQE_PARAMS), test_y_channel=True
    )
    preds = torch.cat([_t(p) for _, p in photos[:2]])
    got = ours(preds)["niqe"]
    want = ref(preds).reshape(-1).double()
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.isfinite(got).all() and (got > 0).all()


def test_niqe_rises_with_blur(niqe_home):
    """NIQE is lower (better) for a sharp natural photo than for a heavily blurred copy."""
    from scipy.ndimage import gaussian_filter

    sharp = skdata.astronaut()[:SIZE, 160 : 160 + SIZE]
    blurred = np.stack(
        [gaussian_filter(sharp[..., c].astype(np.float64), 3.0) for c in range(3)], -1
    )
    blurred = np.clip(blurred.round(), 0, 255).astype(np.uint8)
    m = IQAMetrics("niqe", device="cpu")
    v = m(torch.cat([_t(sharp), _t(blurred)]))["niqe"]
    assert v[0] < v[1] - 1.0


def test_niqe_without_parameters_names_the_file(torch_home):
    with pytest.raises(MissingWeightsError) as err:
        IQAMetrics("niqe", device="cpu")
    msg = str(err.value)
    assert "niqe_modelparameters.mat" in msg
    assert str(torch_home / "hub" / "pyiqa" / "niqe_modelparameters.mat") in msg


# ---------------------------------------------------------------- LPIPS / DISTS weights


def test_missing_lpips_dists_weights_error_lists_every_file(torch_home, tmp_path):
    wdir = tmp_path / "weights"
    wdir.mkdir()
    with pytest.raises(MissingWeightsError) as err:
        IQAMetrics("psnr,lpips,dists", device="cpu", weights_dir=wdir)
    msg = str(err.value)
    hub = torch_home / "hub"
    for name, sub in [
        ("LPIPS_v0.1_alex-df73285e.pth", "pyiqa"),
        ("alexnet-owt-7be5be79.pth", "checkpoints"),
        ("DISTS_weights-f5e65c96.pth", "pyiqa"),
        ("vgg16-397923af.pth", "checkpoints"),
    ]:
        assert name in msg and str(hub / sub / name) in msg
    # one line per file, even though LPIPS-free DISTS and others could share the backbone
    assert sum(line.startswith("  - vgg16-397923af.pth") for line in msg.splitlines()) == 1
    assert str(wdir) in msg and "--weights-dir" in msg
    assert "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in msg
    # FileNotFoundError subclass: callers can treat it as a missing file
    assert isinstance(err.value, FileNotFoundError)


def test_weights_dir_is_searched_before_the_cache(torch_home, tmp_path):
    wdir = tmp_path / "weights"
    wdir.mkdir()
    for name in ("LPIPS_v0.1_vgg-a78928a0.pth", "vgg16-397923af.pth"):
        (wdir / name).write_bytes(b"x")
    cached = torch_home / "hub" / "pyiqa" / "LPIPS_v0.1_vgg-a78928a0.pth"
    cached.write_bytes(b"y")
    found = resolve_weights(["lpips-vgg"], wdir)
    assert found == {n: wdir / n for n in ("LPIPS_v0.1_vgg-a78928a0.pth", "vgg16-397923af.pth")}
    with pytest.raises(MissingWeightsError, match="vgg16-397923af.pth"):
        resolve_weights(["lpips-vgg"], None)  # cache has the head only


def _have_weights(*names: str) -> bool:
    try:
        resolve_weights(list(names), os.environ.get("RAIM_METRIC_WEIGHTS"))
    except MissingWeightsError:
        return False
    return True


@pytest.mark.skipif(
    not _have_weights("lpips", "dists"),
    reason="LPIPS/DISTS weights are not available offline (put them in $TORCH_HOME/hub or "
    "RAIM_METRIC_WEIGHTS; see the MissingWeightsError message for the exact files)",
)
def test_lpips_dists_with_real_weights(photos):
    m = IQAMetrics("lpips,dists", device="cpu", weights_dir=os.environ.get("RAIM_METRIC_WEIGHTS"))
    gt = torch.cat([_t(g) for g, _ in photos])
    pred = torch.cat([_t(p) for _, p in photos])
    same, diff = m(gt, gt), m(pred, gt)
    for k in ("lpips", "dists"):
        assert torch.allclose(same[k], torch.zeros(3, dtype=torch.float64), atol=1e-4)
        assert (diff[k] > 0.05).all() and (diff[k] < 1).all()
    single = m(pred[:1], gt[:1])
    assert float(single["lpips"][0]) == pytest.approx(float(diff["lpips"][0]), abs=1e-5)


# ---------------------------------------------------------------- SCORE


def test_score_formula_on_known_values():
    v = {"psnr": 25.0, "ssim": 0.7, "lpips": 0.3, "dists": 0.2, "niqe": 4.0}
    # 10 + 6 + 35 + 106.666... - 9
    assert challenge_score(v) == pytest.approx(148.0 + 2.0 / 3.0, abs=1e-12)
    perfect = {"psnr": 50.0, "ssim": 1.0, "lpips": 0.0, "dists": 0.0, "niqe": 1.0}
    assert challenge_score(perfect) == pytest.approx(20 + 15 + 50 + 400 / 3 + 0)
    with pytest.raises(ValueError, match="niqe"):
        challenge_score({k: v[k] for k in ("psnr", "ssim", "lpips", "dists")})


def test_mean_of_scores_equals_score_of_means():
    rng = np.random.default_rng(0)
    per_image = {
        f"{i}.png": {
            "psnr": rng.uniform(15, 35),
            "ssim": rng.uniform(0.3, 0.95),
            "lpips": rng.uniform(0.05, 0.6),
            "dists": rng.uniform(0.05, 0.4),
            "niqe": rng.uniform(2, 12),
        }
        for i in range(17)
    }
    assert mean_of_scores(per_image) == pytest.approx(score_of_means(per_image), abs=1e-9)
    arr = {k: np.array([r[k] for r in per_image.values()]) for k in per_image["0.png"]}
    assert np.allclose(challenge_score(arr), [challenge_score(r) for r in per_image.values()])


# ---------------------------------------------------------------- folders and `raim eval`


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture
def folders(tmp_path, photos) -> tuple[Path, Path]:
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    for i, (g, p) in enumerate(photos):
        _save(gt / f"img{i}.png", g)
        _save(pred / f"img{i}.png", p)
    return pred, gt


def test_pairing_by_stem_and_errors(folders, photos):
    pred, gt = folders
    (pred / "img1.png").rename(pred / "img1.bmp")  # another suffix still pairs
    assert [p.name for p in pair_images(pred, gt)] == ["img0.png", "img1.bmp", "img2.png"]

    _save(gt / "only_gt.png", photos[0][0])
    _save(pred / "only_pred.png", photos[0][0])
    with pytest.raises(PairingError) as err:
        pair_images(pred, gt)
    assert "only_gt.png" in str(err.value) and "only_pred.png" in str(err.value)
    (gt / "only_gt.png").unlink()
    (pred / "only_pred.png").unlink()

    _save(pred / "img0.jpg", photos[0][1])
    with pytest.raises(PairingError, match="same name stem"):
        pair_images(pred, gt)
    (pred / "img0.jpg").unlink()
    with pytest.raises(PairingError, match="not a folder"):
        pair_images(pred / "nope", gt)


def test_size_mismatch_and_resize_pred(folders, photos):
    pred, gt = folders
    _save(pred / "img2.png", np.asarray(Image.fromarray(photos[2][1]).resize((96, 96))))
    with pytest.raises(PairingError, match=r"img2.png \(96x96 vs gt 192x192\).*--resize-pred"):
        evaluate_folders(pred, gt, metrics="psnr", device="cpu", progress=False)
    res = evaluate_folders(pred, gt, metrics="psnr", device="cpu", progress=False, resize_pred=True)
    assert set(res.per_image) == {"img0.png", "img1.png", "img2.png"}
    assert 15 < res.per_image["img2.png"]["psnr"] < res.per_image["img0.png"]["psnr"] + 10


def test_evaluate_folders_matches_direct_metrics(folders, photos):
    pred, gt = folders
    res = evaluate_folders(pred, gt, metrics=["ssim", "psnr"], device="cpu", batch_size=2)
    assert res.metrics == ("psnr", "ssim") and res.score is None
    for i, (g, p) in enumerate(photos):
        row = res.per_image[f"img{i}.png"]
        assert row["psnr"] == pytest.approx(_psnr_numpy(p, g), abs=1e-4)
        assert row["ssim"] == pytest.approx(_ssim_numpy(p, g), abs=1e-4)
        assert "score" not in row
    assert res.mean["psnr"] == pytest.approx(np.mean([r["psnr"] for r in res.per_image.values()]))


def test_reference_metrics_need_gt(folders):
    pred, _ = folders
    with pytest.raises(ValueError, match="--gt"):
        evaluate_folders(pred, None, metrics="psnr,niqe", device="cpu")


class _StubIQA:
    """Known per-image values, to test aggregation and the SCORE without pyiqa weights."""

    metrics = ("psnr", "ssim", "lpips", "dists", "niqe")
    needs_reference = True
    device = torch.device("cpu")

    def __call__(self, pred, gt):
        # value depends on the image content so a mix-up of files would show
        m = pred.mean(dim=(1, 2, 3)).double()
        return {
            "psnr": 20 + 10 * m,
            "ssim": 0.5 + 0.4 * m,
            "lpips": 0.4 - 0.2 * m,
            "dists": 0.3 - 0.1 * m,
            "niqe": 5 - m,
        }


def test_score_reported_with_all_five_metrics(folders, photos):
    pred, gt = folders
    res = evaluate_folders(pred, gt, iqa=_StubIQA(), batch_size=2, progress=False)
    for i, (_, p) in enumerate(photos):
        m = p.astype(np.float64).mean() / 255
        row = res.per_image[f"img{i}.png"]
        assert row["psnr"] == pytest.approx(20 + 10 * m, abs=1e-5)
        assert row["score"] == pytest.approx(challenge_score(row))
    assert res.score == pytest.approx(res.mean_of_scores(), abs=1e-9)
    assert res.score == pytest.approx(res.score_of_means(), abs=1e-9)
    assert res.score == pytest.approx(challenge_score(res.mean))


def test_cli_eval_outputs(folders, niqe_home, tmp_path, capsys):
    from raim_diffusion.cli import main

    pred, gt = folders
    out_json, out_csv = tmp_path / "r.json", tmp_path / "r.csv"
    argv = ["eval", "--pred", str(pred), "--gt", str(gt), "--metrics", "psnr,ssim,niqe"]
    rc = main([*argv, "--json", str(out_json), "--csv", str(out_csv), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "img0.png" in printed and "mean" in printed and "SCORE: not reported" in printed
    data = json.loads(out_json.read_text())
    assert list(data) == ["per_image", "mean", "score"] and data["score"] is None
    assert set(data["per_image"]) == {"img0.png", "img1.png", "img2.png"}
    assert set(data["per_image"]["img0.png"]) == {"psnr", "ssim", "niqe"}
    rows = list(csv.reader(out_csv.open()))
    assert rows[0] == ["file", "psnr", "ssim", "niqe"] and rows[-1][0] == "mean"
    assert float(rows[1][1]) == pytest.approx(data["per_image"]["img0.png"]["psnr"])

    # NIQE-only mode without --gt
    rc = main(["eval", "--pred", str(pred), "--json", str(out_json), "--no-progress"])
    assert rc == 0
    only = json.loads(out_json.read_text())
    assert set(only["mean"]) == {"niqe"}
    assert only["mean"]["niqe"] == pytest.approx(data["mean"]["niqe"], abs=1e-9)


def test_cli_eval_errors(folders, capsys):
    from raim_diffusion.cli import main

    pred, gt = folders
    (gt / "img0.png").unlink()
    assert main(["eval", "--pred", str(pred), "--gt", str(gt), "--metrics", "psnr"]) == 2
    assert "img0.png" in capsys.readouterr().err
    (pred / "img0.png").unlink()
    (pred / "img1.png").write_bytes(b"not an image")
    rc = main(["eval", "--pred", str(pred), "--gt", str(gt), "--metrics", "psnr", "--no-progress"])
    assert rc == 1  # the broken file is reported, the others are still evaluated
    captured = capsys.readouterr()
    assert "img1.png" in captured.err and "img2.png" in captured.out


def test_too_small_for_niqe_fails_that_file_only(tmp_path, niqe_home, photos):
    pred = tmp_path / "p"
    _save(pred / "big.png", photos[0][1])
    _save(pred / "tiny.png", photos[0][1][:64, :64])
    res = evaluate_folders(pred, None, device="cpu", progress=False)
    assert list(res.per_image) == ["big.png"] and res.mean["niqe"] > 0
    assert "96x96" in res.failures["tiny.png"]


def test_backbones_from_weights_dir_are_found_by_torchvision(tmp_path, torch_home):
    from raim_diffusion.metrics.iqa import _backbone_hub_dir

    backbone = tmp_path / "w" / "vgg16-397923af.pth"
    backbone.parent.mkdir()
    backbone.write_bytes(b"weights")
    before = torch.hub.get_dir()
    with _backbone_hub_dir({backbone.name: backbone}):
        # torchvision's load_state_dict_from_url looks exactly here
        linked = Path(torch.hub.get_dir()) / "checkpoints" / backbone.name
        assert linked.read_bytes() == b"weights"
    assert torch.hub.get_dir() == before == str(torch_home / "hub")
