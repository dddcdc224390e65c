"""`raim eval` and careless users: every mistake is one line on stderr and exit status 2
(or, for a damaged image among good ones, that image reported and the others evaluated).

Usage errors must be found before any image is read, any weight file is looked up or any
metric is built: `evaluate_folders` is replaced by a stand-in that fails the test if reached.
"""

from __future__ import annotations

import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raim_diffusion.cli import main


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    """Two 64x64 pairs: a random ground truth and a darker prediction."""
    rng = np.random.default_rng(0)
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    for i in range(2):
        g = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        _save(gt / f"img{i}.png", g)
        _save(pred / f"img{i}.png", g // 2)
    return pred, gt


@pytest.fixture
def no_evaluation(monkeypatch):
    """Fail the test if the command gets as far as reading images and building metrics."""
    import raim_diffusion.metrics.evaluate as evaluate

    def reached(*args, **kwargs):
        raise AssertionError("evaluate_folders was reached; the error must come before it")

    monkeypatch.setattr(evaluate, "evaluate_folders", reached)


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("raim eval: ") and "\n" not in err, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    return err


def _eval(pred: Path, gt: Path | None, *extra: str) -> int:
    argv = ["eval", "--pred", str(pred), "--metrics", "psnr", "--no-progress", *extra]
    return main([*argv, "--gt", str(gt)] if gt is not None else argv)


# ---------------------------------------------------------------- devices and output paths


@pytest.mark.parametrize("device", ["gpu", "bogus", "cuda:x", "mps", "cuda"])
def test_unusable_device_is_one_line_before_anything_loads(folders, no_evaluation, capsys, device):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has an MPS device")
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    pred, gt = folders
    assert _eval(pred, gt, "--device", device) == 2
    err = _one_line_error(capsys)
    assert f"--device {device}" in err.replace("'", "")


@pytest.mark.parametrize("flag", ["--csv", "--json"])
def test_output_is_an_existing_folder(folders, tmp_path, no_evaluation, capsys, flag):
    pred, gt = folders
    target = tmp_path / "reports"
    target.mkdir()
    assert _eval(pred, gt, flag, str(target)) == 2
    err = _one_line_error(capsys)
    assert str(target) in err and "folder" in err and flag in err


@pytest.mark.parametrize("flag", ["--csv", "--json"])
def test_output_inside_a_file(folders, tmp_path, no_evaluation, capsys, flag):
    pred, gt = folders
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    target = blocker / "sub" / "r.json"
    assert _eval(pred, gt, flag, str(target)) == 2
    err = _one_line_error(capsys)
    assert str(target) in err and str(blocker) in err
    assert blocker.read_text() == "a file, not a folder"


def test_output_in_an_unwritable_folder(folders, tmp_path, no_evaluation, capsys, monkeypatch):
    pred, gt = folders
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # Tests may run as root, where permission bits do not stop writing: deny it explicitly.
    monkeypatch.setattr(
        os,
        "access",
        lambda p, mode, **kw: False if Path(p) == locked else real_access(p, mode, **kw),
    )
    target = locked / "r.csv"
    assert _eval(pred, gt, "--csv", str(target)) == 2
    err = _one_line_error(capsys)
    assert str(target) in err and "not writable" in err


def test_csv_and_json_to_the_same_file(folders, tmp_path, no_evaluation, capsys):
    pred, gt = folders
    same = tmp_path / "r.txt"
    assert _eval(pred, gt, "--csv", str(same), "--json", str(same)) == 2
    assert str(same) in _one_line_error(capsys)


def test_output_over_an_input_image_is_refused(folders, no_evaluation, capsys):
    pred, gt = folders
    victim = pred / "img0.png"
    before = victim.read_bytes()
    assert _eval(pred, gt, "--json", str(victim)) == 2
    err = _one_line_error(capsys)
    assert str(victim) in err and "input folder" in err
    assert victim.read_bytes() == before


# ---------------------------------------------------------------- the install (pyiqa)


def test_missing_pyiqa_is_reported_before_weight_files(folders, tmp_path, monkeypatch, capsys):
    pred, gt = folders
    # No weight file anywhere: were the install not checked first, this would be the error.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # `import pyiqa` now fails
    rc = main(["eval", "--pred", str(pred), "--gt", str(gt), "--no-progress"])
    assert rc == 2
    err = _one_line_error(capsys)
    assert 'pip install "raim-diffusion[eval]"' in err
    assert "weights" not in err.lower() and "niqe_modelparameters" not in err


def test_missing_pyiqa_in_the_python_api(folders, tmp_path, monkeypatch):
    from raim_diffusion.metrics import IQAMetrics, evaluate_folders

    pred, _ = folders
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    monkeypatch.setitem(sys.modules, "pyiqa", None)
    with pytest.raises(ImportError, match=r'not installed: pip install "raim-diffusion\[eval\]"'):
        IQAMetrics("niqe", device="cpu")  # not MissingWeightsError, though weights are missing
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    with pytest.raises(ImportError, match="raim-diffusion"):  # not "holds no images"
        evaluate_folders(empty, None)


def test_broken_pyiqa_install_says_so(folders, monkeypatch, capsys):
    """pyiqa is there but one of its own imports fails: say that, with the cause."""

    class BrokenDependency:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "pyiqa":
                raise ModuleNotFoundError("No module named 'bitsandbytes'", name="bitsandbytes")
            return None

    monkeypatch.delitem(sys.modules, "pyiqa", raising=False)
    monkeypatch.setattr(sys, "meta_path", [BrokenDependency(), *sys.meta_path])
    pred, gt = folders
    assert _eval(pred, gt) == 2
    err = _one_line_error(capsys)
    assert "cannot be imported" in err and "bitsandbytes" in err
    assert 'pip install "raim-diffusion[eval]"' in err


# ---------------------------------------------------------------- folders


def test_pred_and_gt_the_same_folder(folders, capsys):
    pytest.importorskip("pyiqa")
    pred, _ = folders
    assert _eval(pred, pred) == 2
    err = _one_line_error(capsys)
    assert "same folder" in err and str(pred) in err


def test_pred_inside_gt(folders, capsys):
    pytest.importorskip("pyiqa")
    pred, gt = folders
    nested = gt / "restored"
    for f in pred.iterdir():
        _save(nested / f.name, np.asarray(Image.open(f)))
    assert _eval(nested, gt) == 2
    err = _one_line_error(capsys)
    assert "inside" in err and str(gt.resolve()) in err


@pytest.mark.parametrize("content", ["empty", "text files only"])
def test_folder_without_images(folders, tmp_path, capsys, content):
    pytest.importorskip("pyiqa")
    _, gt = folders
    pred = tmp_path / "nothing"
    pred.mkdir()
    if content == "text files only":
        (pred / "img0.txt").write_text("not an image")
        (pred / "notes.md").write_text("# notes")
    assert _eval(pred, gt) == 2
    err = _one_line_error(capsys)
    assert "holds no images" in err and str(pred) in err


def test_pred_is_a_file(folders, capsys):
    pytest.importorskip("pyiqa")
    pred, gt = folders
    assert _eval(pred / "img0.png", gt) == 2
    assert "not a folder" in _one_line_error(capsys)


def _bomb_png(path: Path) -> None:
    """A PNG header claiming 30000x30000 pixels: PIL refuses to open it (decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def test_damaged_images_fail_one_by_one(folders, capsys):
    pytest.importorskip("pyiqa")
    pred, gt = folders
    rng = np.random.default_rng(1)
    for name in ("truncated", "bomb", "garbage"):
        _save(gt / f"{name}.png", rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8))
    _save(pred / "truncated.png", rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8))
    data = (pred / "truncated.png").read_bytes()
    (pred / "truncated.png").write_bytes(data[: len(data) // 2])
    _bomb_png(pred / "bomb.png")
    (pred / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)

    assert _eval(pred, gt) == 1  # some images failed, the rest were evaluated
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    failed = [line for line in captured.err.splitlines() if line.strip()]
    # one line per damaged image, each naming it, nothing else
    assert len(failed) == 3, captured.err
    for name in ("truncated.png", "bomb.png", "garbage.png"):
        assert sum(name in line for line in failed) == 1
    assert all(line.startswith("raim eval: failed: ") for line in failed)
    assert "img0.png" in captured.out and "img1.png" in captured.out


def test_every_image_damaged_is_one_line(tmp_path, capsys):
    pytest.importorskip("pyiqa")
    pred, gt = tmp_path / "p", tmp_path / "g"
    for folder in (pred, gt):
        folder.mkdir()
        (folder / "a.png").write_bytes(b"nope")
    assert _eval(pred, gt) == 2
    err = _one_line_error(capsys)
    assert "No image could be evaluated" in err and "a.png" in err


def test_images_too_small_for_a_metric(tmp_path, capsys):
    """SSIM needs an 11x11 window: pyiqa would raise deep inside; it is that image's failure."""
    pytest.importorskip("pyiqa")
    rng = np.random.default_rng(2)
    pred, gt = tmp_path / "p", tmp_path / "g"
    for name, side in (("big", 32), ("tiny", 8)):
        g = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
        _save(gt / f"{name}.png", g)
        _save(pred / f"{name}.png", g // 2)
    rc = main(["eval", "--pred", str(pred), "--gt", str(gt), "--metrics", "psnr,ssim",
               "--no-progress"])  # fmt: skip
    assert rc == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.err.strip().splitlines() == [
        "raim eval: failed: tiny.png: image of 8x8 pixels is too small: SSIM needs at least 11x11."
    ]
    assert "big.png" in captured.out

    # a crop border that leaves nothing to measure is the same kind of failure, not NaN
    rc = main(["eval", "--pred", str(pred), "--gt", str(gt), "--metrics", "psnr",
               "--crop-border", "16", "--no-progress"])  # fmt: skip
    assert rc == 2
    err = _one_line_error(capsys)
    assert "PSNR needs at least 1x1 after crop_border=16" in err


def test_iqa_size_check_names_every_metric():
    pytest.importorskip("pyiqa")
    from raim_diffusion.metrics import IQAMetrics, MetricConventions

    m = IQAMetrics("psnr,ssim", device="cpu", conventions=MetricConventions(crop_border=3))
    x = torch.rand(1, 3, 16, 40)
    with pytest.raises(ValueError, match=r"16 pixels is too small: SSIM needs at least 11x11 "):
        m(x, x)
    assert set(m(torch.rand(1, 3, 17, 40), torch.rand(1, 3, 17, 40))) == {"psnr", "ssim"}


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--batch-size", "0"], "--batch-size 0"),
        (["--crop-border", "-1"], "crop_border=-1"),
        (["--metrics", "psnr,fid"], "fid"),
    ],
)
def test_bad_options_are_one_line(folders, no_evaluation, capsys, extra, words):
    pytest.importorskip("pyiqa")
    pred, gt = folders
    argv = ["eval", "--pred", str(pred), "--gt", str(gt), "--no-progress", *extra]
    assert main(argv) == 2
    assert words in _one_line_error(capsys)
