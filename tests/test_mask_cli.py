"""``raim mask``: pairs by relative path, refuses clashing outputs and overlapping folders, and
turns usage errors into one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raim_diffusion.cli import main
from raim_diffusion.runner.commands.mask import match_pairs

H, W = 48, 64


@pytest.fixture()
def params(tmp_path) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text("mode: reference\narea_threshold_px: 20\n")
    return path


def _img(path: Path, seed: int, suffix_quality: int = 95) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path)
    return path


def _mask(*args: str | Path, params: Path) -> int:
    return main(["mask", *map(str, args), "--params", str(params), "--segmenter", "none",
                 "--device", "cpu", "--quiet"])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_globs_pair_generated_and_reference_by_relative_path(tmp_path, params, capsys):
    gen, ref, out = tmp_path / "gen", tmp_path / "ref", tmp_path / "out"
    _img(gen / "a" / "x.png", 1)
    _img(gen / "b" / "x.png", 2)
    _img(ref / "b" / "x.jpg", 3)  # only b has a reference; a must not borrow it
    code = _mask("--generated", gen / "*" / "x.png", "--reference", ref / "*" / "x.jpg",
                 "-o", out, params=params)
    assert code == 1  # a has no reference
    assert "a/x" in capsys.readouterr().err
    images = json.loads((out / "regions.json").read_text())["images"]
    assert list(images) == ["b/x"]
    assert images["b/x"]["generated"].endswith("gen/b/x.png")
    assert images["b/x"]["reference"].endswith("ref/b/x.jpg")
    assert (out / "b" / "x_mask.png").is_file() and not (out / "x_mask.png").exists()
    assert not (out / "a").exists()


def test_folders_pair_by_relative_path_not_by_name(tmp_path):
    gen, ref = tmp_path / "gen", tmp_path / "ref"
    for sub in ("a", "b"):
        _img(gen / sub / "x.png", 1)
        _img(ref / sub / "x.png", 2)
    pairs, n_refs = match_pairs(str(gen), str(ref))
    assert n_refs == 2
    assert [(g.parent.name, r.parent.name, key) for g, r, key in pairs] == [
        ("a", "a", "a/x"), ("b", "b", "b/x")]


def test_two_generated_images_with_one_output_are_refused_up_front(tmp_path, params, capsys):
    gen, ref, out = tmp_path / "gen", tmp_path / "ref", tmp_path / "out"
    _img(gen / "x.png", 1)
    _img(gen / "x.jpg", 2)
    _img(ref / "x.png", 3)
    assert _mask("--generated", gen, "--reference", ref, "-o", out, params=params) == 2
    err = _one_error_line(capsys)
    assert "x.png" in err and "x.jpg" in err
    assert not out.exists()


@pytest.mark.parametrize("where", ["generated", "inside-generated", "reference"])
def test_an_output_folder_overlapping_an_input_is_refused(tmp_path, params, capsys, where):
    gen, ref = tmp_path / "gen", tmp_path / "ref"
    _img(gen / "x.png", 1)
    _img(ref / "x.png", 2)
    out = {"generated": gen, "inside-generated": gen / "masks", "reference": ref}[where]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert _mask("--generated", gen, "--reference", ref, "-o", out, params=params) == 2
    assert "output folder" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_usage_errors_are_one_line(tmp_path, params, capsys):
    gen, ref = tmp_path / "gen", tmp_path / "ref"
    _img(gen / "x.png", 1)
    _img(ref / "x.png", 2)
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    base = ["mask", "--generated", str(gen), "--reference", str(ref), "--params", str(params),
            "--segmenter", "none", "--quiet"]
    for extra, words in (
        (["-o", str(blocker), "--device", "cpu"], "existing file"),
        (["-o", str(blocker / "out"), "--device", "cpu"], "is a file"),
        (["-o", str(tmp_path / "o"), "--device", "gpu"], "'gpu' is not a device"),
        (["-o", str(tmp_path / "o"), "--device", "bogus"], "'bogus' is not a device"),
        (["-o", str(tmp_path / "o"), "--device", "cpu", "--params", "no-such-set"],
         "no-such-set"),
    ):
        assert main([*base, *extra]) == 2, extra
        assert words in _one_error_line(capsys)
    assert blocker.read_text() == "x"


def test_ctrl_c_is_one_line_with_the_count(tmp_path, params, capsys, monkeypatch):
    from raim_diffusion.artifacts import detector as detector_module

    gen, ref, out = tmp_path / "gen", tmp_path / "ref", tmp_path / "out"
    for i in range(3):
        _img(gen / f"{i}.png", i)
        _img(ref / f"{i}.png", 10 + i)
    calls = []
    real = detector_module.ArtifactDetector.__call__

    def interrupted_on_the_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(detector_module.ArtifactDetector, "__call__", interrupted_on_the_second)
    assert _mask("--generated", gen, "--reference", ref, "-o", out, params=params) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["raim mask: interrupted (1 done)"]
    assert sorted(p.name for p in out.iterdir()) == ["0_mask.png", "0_overlay.png",
                                                     "0_score.png"]
