"""Batch jobs never touch the user's files, keep one folder to one set of settings, and survive
broken logs, killed runs and Ctrl-C."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raim_diffusion.cli import main
from raim_diffusion.images import load_image
from raim_diffusion.runner.batch import (
    INTERMEDIATES_DIR,
    RUNS_FILE,
    SETTINGS_FILE,
    Job,
    Restored,
    append_jsonl,
    claim_output,
    plan_jobs,
    run_jobs,
    settings_fingerprint,
)

PRIOR = ["--prior", "realesr-animevideov3-x2", "--quiet", "--device", "cpu"]


# Tiny pipelines and converted priors go to a private cache, shared by this module.
pytestmark = pytest.mark.usefixtures("private_raim_cache")


def _img(path: Path, seed: int = 0, size=(12, 10), gray: bool = False, **save) -> Path:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if gray else (size[1], size[0], 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path, **save)
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _half(image, job):
    return Restored(image.tensor * 0.5)


# -- 1. the output folder never overlaps an input ---------------------------------------------


def test_output_folder_equal_to_the_input_folder_is_refused_even_with_overwrite(tmp_path, capsys):
    src = tmp_path / "in"
    _img(src / "a.png")
    _img(src / "sub" / "b.png", seed=1)
    before = _snapshot(src)
    for extra in ([], ["--overwrite"]):
        assert main(["restore", str(src), "-o", str(src), *PRIOR, *extra]) == 2
        assert "input folder" in _one_error_line(capsys)
    assert _snapshot(src) == before


def test_output_folder_inside_the_input_folder_is_refused(tmp_path, capsys):
    src = tmp_path / "in"
    _img(src / "a.png")
    assert main(["restore", str(src), "-o", str(src / "out"), *PRIOR]) == 2
    assert "inside the input folder" in _one_error_line(capsys)
    assert not (src / "out").exists()
    with pytest.raises(ValueError, match="inside"):
        plan_jobs([src], src / "out" / "deeper")


def test_output_folder_holding_an_input_file_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    photo = _img(out / "x.png")
    before = photo.read_bytes()
    assert main(["restore", str(photo), "-o", str(out), *PRIOR, "--overwrite"]) == 2
    assert "holds the input file" in _one_error_line(capsys)
    assert photo.read_bytes() == before


# -- 2. one folder, one set of settings; records appended ------------------------------------


def test_settings_fingerprint_ignores_only_what_changes_no_pixel():
    config = {"stages": ["prior"], "seed": 0, "device": None, "description": "",
              "save_intermediates": False, "prior": {"name": "x", "tile": None}}
    fp = settings_fingerprint(config)
    assert fp == settings_fingerprint(dict(reversed(list(config.items()))))  # order-free
    for key, value in (("device", "cuda:1"), ("description", "mine"),
                       ("save_intermediates", True)):
        assert settings_fingerprint({**config, key: value}) == fp, key
    assert settings_fingerprint({**config, "seed": 1}) != fp
    assert settings_fingerprint({**config, "prior": {"name": "x", "tile": 64}}) != fp


def test_claim_refuses_other_settings_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    a = {"seed": 0, "generate": {"strength": 0.5}}
    b = {"seed": 0, "generate": {"strength": 0.3}}
    fp = claim_output(out, a)
    assert claim_output(out, {**a, "device": "cpu"}) == fp  # resuming elsewhere is fine
    with pytest.raises(ValueError, match=r"generate\.strength: 0\.5 -> 0\.3"):
        claim_output(out, b)
    assert claim_output(out, b, overwrite=True) == settings_fingerprint(b)
    assert json.loads((out / SETTINGS_FILE).read_text())["fingerprint"] == settings_fingerprint(b)
    with pytest.raises(ValueError, match="other settings"):
        claim_output(out, a)


def test_claim_refuses_a_folder_of_outputs_from_somewhere_else(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    _img(src / "a.png")
    jobs = plan_jobs([src], out)
    _img(out / "a.png", seed=9)  # not ours: no settings file says how it was made
    with pytest.raises(ValueError, match=SETTINGS_FILE):
        claim_output(out, {"seed": 0}, jobs)
    assert not (out / SETTINGS_FILE).exists()
    claim_output(out, {"seed": 0}, jobs, overwrite=True)


def _race(out: Path, configs: list[dict]) -> list[str]:
    """Claim ``out`` from one thread per config, all released at once."""
    barrier = threading.Barrier(len(configs))
    results = [""] * len(configs)

    def claim(i):
        barrier.wait()
        try:
            results[i] = claim_output(out, configs[i])
        except ValueError:
            results[i] = "refused"

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(configs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_claims_with_different_settings_let_exactly_one_in(tmp_path):
    configs = [{"seed": i % 2} for i in range(8)]
    for attempt in range(5):
        out = tmp_path / f"out{attempt}"
        results = _race(out, configs)
        winner = json.loads((out / SETTINGS_FILE).read_text())["fingerprint"]
        for config, result in zip(configs, results, strict=True):
            expected = winner if settings_fingerprint(config) == winner else "refused"
            assert result == expected


def test_resume_with_other_settings_is_refused_and_every_run_is_recorded(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("RAIM_TEST_SECRET", "hunter2-do-not-record")
    src, out = tmp_path / "in", tmp_path / "out"
    _img(src / "a.png")
    _img(src / "b.png", seed=1)
    assert main(["restore", str(src), "-o", str(out), *PRIOR]) == 0
    (out / "b.png").unlink()  # an interrupted run: b is still to do
    a_before = (out / "a.png").read_bytes()
    capsys.readouterr()
    assert main(["restore", str(src), "-o", str(out), *PRIOR, "prior.input_blend=0.5"]) == 2
    err = _one_error_line(capsys)
    assert "other settings" in err and "prior.input_blend" in err and "--overwrite" in err
    assert not (out / "b.png").exists()  # nothing mixed in
    # The same settings resume; --overwrite redoes everything with the new ones.
    assert main(["restore", str(src), "-o", str(out), *PRIOR]) == 0
    assert (out / "a.png").read_bytes() == a_before and (out / "b.png").exists()
    assert main(["restore", str(src), "-o", str(out), *PRIOR, "--overwrite",
                 "prior.input_blend=0.5"]) == 0
    assert (out / "a.png").read_bytes() != a_before
    runs = [json.loads(line) for line in (out / RUNS_FILE).read_text().splitlines()]
    assert len(runs) == 3 and len({r["run"] for r in runs}) == 3
    assert runs[0]["fingerprint"] == runs[1]["fingerprint"] != runs[2]["fingerprint"]
    assert runs[2]["config"]["prior"]["input_blend"] == 0.5 and runs[0]["versions"]["torch"]
    assert not (out / "raim_run.json").exists()
    everything = "".join(p.read_text(errors="replace") for p in out.iterdir() if p.is_file()
                         and p.suffix in (".json", ".jsonl"))
    assert "hunter2-do-not-record" not in everything


# -- 3. intermediates never collide with outputs ----------------------------------------------


def test_intermediates_are_keyed_like_outputs_and_never_collide(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    _img(src / "a.png", seed=1)
    _img(src / "a.jpg", seed=2, quality=95)
    _img(src / "intermediates" / "prior" / "a.png", seed=3)  # a user folder of that name
    import cv2

    deep = np.random.default_rng(4).integers(0, 65536, (10, 12, 3), dtype=np.uint16)
    cv2.imwrite(str(src / "d16.png"), deep)
    jobs = plan_jobs([src], out)

    def restore(image, job):
        # Each intermediate carries the job's identity, so a collision shows.
        tag = torch.full_like(image.tensor[:, :1], (hash(job.key) % 200 + 20) / 255)
        return Restored(image.tensor, {"prior": image.tensor.clone(), "mask": tag})

    report = run_jobs(jobs, restore, intermediates_dir=out / INTERMEDIATES_DIR, progress=False)
    assert report.done == 4
    inter = out / INTERMEDIATES_DIR
    for job in jobs:
        assert (inter / "prior" / f"{job.key}.png").is_file()
        assert (inter / "mask" / f"{job.key}.png").is_file()
    # The user's in/intermediates/prior/a.png got its own output, not an intermediate.
    final = load_image(out / "intermediates" / "prior" / "a.png").tensor
    assert torch.allclose(final, load_image(src / "intermediates" / "prior" / "a.png").tensor)
    masks = {load_image(inter / "mask" / f"{k}.png").tensor[0, 0, 0, 0].item()
             for k in ("a.png", "a.jpg")}
    assert len(masks) == 2  # a.png and a.jpg each have their own
    assert load_image(inter / "prior" / "d16.png.png").bit_depth == 16
    assert load_image(inter / "prior" / "a.png.png").bit_depth == 8
    # Discovery never reads them back.
    assert [j.key for j in plan_jobs([src], out)] == [j.key for j in jobs]


def test_an_input_may_not_land_on_the_runs_own_files(tmp_path):
    folder = tmp_path / "in"
    _img(folder / "p.png")
    odd = folder / RUNS_FILE
    odd.write_bytes((folder / "p.png").read_bytes())  # named explicitly, any suffix is kept
    with pytest.raises(ValueError, match="keeps for itself"):
        plan_jobs([folder / "p.png", odd], tmp_path / "out")


# -- 5. failure logs are appended and never stop the batch ------------------------------------


def _failing_every_other(image, job):
    if job.key.startswith(("1", "3")):
        raise RuntimeError(f"cannot do {job.key}")
    return Restored(image.tensor)


def test_an_unwritable_failure_log_does_not_stop_the_batch(tmp_path, capsys):
    src = tmp_path / "in"
    for i in range(4):
        _img(src / f"{i}.png", seed=i)
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file where a folder should be")
    jobs = plan_jobs([src], tmp_path / "out")
    report = run_jobs(jobs, _failing_every_other, failure_log=blocker / "failures.jsonl",
                      progress=False)
    assert (report.done, report.failed) == (2, 2)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["0.png", "2.png"]
    err = capsys.readouterr().err
    assert err.count("cannot write the failure log") == 1  # said once, not per image


def test_failure_logs_of_two_runs_keep_every_record(tmp_path):
    src, log = tmp_path / "in", tmp_path / "out" / "failures.jsonl"
    for i in range(4):
        _img(src / f"{i}.png", seed=i)
    jobs = plan_jobs([src], tmp_path / "out")
    run_jobs(jobs, _failing_every_other, failure_log=log, progress=False, run_id="one")
    run_jobs(jobs, _failing_every_other, failure_log=log, progress=False, run_id="two")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted((r["run"], r["key"]) for r in records) == [
        ("one", "1.png"), ("one", "3.png"), ("two", "1.png"), ("two", "3.png")]
    # Writers at the same time: every line arrives whole.
    threads = [threading.Thread(target=lambda n=n: [append_jsonl(log, {"w": n, "i": i, "pad":
                                                                      "x" * 3000})
                                                    for i in range(50)]) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = log.read_text().splitlines()
    assert len(lines) == 4 + 200
    assert len({(d["w"], d["i"]) for d in map(json.loads, lines[4:])}) == 200


def test_failure_records_are_appended_not_rewritten(tmp_path):
    """One write per failure: the log is never read back or replaced (that was quadratic)."""
    log = tmp_path / "failures.jsonl"
    log.write_text('{"old": true}\n')
    inode = log.stat().st_ino
    for i in range(3):
        append_jsonl(log, {"i": i})
    assert log.stat().st_ino == inode
    assert log.read_text().splitlines()[0] == '{"old": true}'
    assert len(log.read_text().splitlines()) == 4


# -- 6. stale temporary files and metadata ----------------------------------------------------


def test_a_run_cleans_stale_temp_files_of_killed_runs(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    _img(src / "a.png")
    stale = out / "sub" / ".a.png.0123abcd.tmp"
    fresh = out / ".b.png.89abcdef.tmp"
    for p in (stale, fresh):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"partial")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    assert main(["restore", str(src), "-o", str(out), *PRIOR]) == 0
    assert not stale.exists()
    assert fresh.exists()  # may be a live run's write in progress


def _fake_restorer(interrupt_at: int | None = None):
    calls = []

    def restore(image, job):
        calls.append(job.key)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return Restored(image.tensor)

    restore.record = {}
    return lambda config, device: restore


def test_ctrl_c_prints_one_line_and_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    from raim_diffusion.runner import restorer

    src, out = tmp_path / "in", tmp_path / "out"
    for i in range(4):
        _img(src / f"{i}.png", seed=i)
    monkeypatch.setattr(restorer, "build_restorer", _fake_restorer(interrupt_at=3))
    assert main(["restore", str(src), "-o", str(out), "--quiet", "--device", "cpu"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["raim restore: interrupted (2 done)"]
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".png") == ["0.png", "1.png"]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    # Running it again resumes.
    monkeypatch.setattr(restorer, "build_restorer", _fake_restorer())
    assert main(["restore", str(src), "-o", str(out), "--quiet", "--device", "cpu"]) == 0
    assert "2 restored, 2 skipped" in capsys.readouterr().err


def test_outputs_keep_icc_profile_grayscale_and_exif(tmp_path):
    from PIL import ImageCms

    src, out = tmp_path / "in", tmp_path / "out"
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x010E] = "a photo"  # ImageDescription
    _img(src / "icc.jpg", quality=95, icc_profile=icc, exif=exif.tobytes())
    _img(src / "gray.png", seed=1, gray=True)
    assert main(["restore", str(src), "-o", str(out), *PRIOR]) == 0
    with Image.open(out / "icc.jpg") as im:
        assert im.info.get("icc_profile") == icc
        assert im.getexif().get(0x010E) == "a photo"
    with Image.open(out / "gray.png") as im:
        assert im.mode == "L"
    assert load_image(out / "gray.png").grayscale


# -- 8. usage errors are one line and exit 2 --------------------------------------------------


@pytest.mark.parametrize("flags, words", [
    (["--device", "gpu"], "'gpu' is not a device"),
    (["--device", "bogus"], "'bogus' is not a device"),
    (["--upscale", "nan"], "--upscale 'nan'"),
    (["--upscale", "0"], "--upscale '0'"),
    (["--upscale", "-1"], "--upscale '-1'"),
    (["--upscale", "two"], "--upscale 'two'"),
])
def test_bad_flags_are_one_line_before_any_model_loads(flags, words, tmp_path, capsys,
                                                      monkeypatch):
    from raim_diffusion.runner import restorer

    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(restorer, "build_restorer", no_models)
    _img(tmp_path / "in" / "a.png")
    code = main(["restore", str(tmp_path / "in"), "-o", str(tmp_path / "out"), *flags])
    assert code == 2
    assert words in _one_error_line(capsys)


def test_mps_on_a_machine_without_it_is_one_line(tmp_path, capsys):
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    _img(tmp_path / "in" / "a.png")
    assert main(["restore", str(tmp_path / "in"), "-o", str(tmp_path / "o"),
                 "--device", "mps"]) == 2
    assert "no mps device" in _one_error_line(capsys)


def test_unusable_output_paths_are_one_line(tmp_path, capsys):
    _img(tmp_path / "in" / "a.png")
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    for out in (blocker, blocker / "out"):
        assert main(["restore", str(tmp_path / "in"), "-o", str(out), *PRIOR]) == 2
        assert str(blocker) in _one_error_line(capsys)
    assert main(["restore", str(tmp_path / "in"), "-o", str(tmp_path / "o"), *PRIOR,
                 "--failure-log", str(blocker / "f.jsonl")]) == 2
    assert "--failure-log" in _one_error_line(capsys)
    assert blocker.read_text() == "x"


def test_upscale_sets_the_output_scale_and_outscale_is_a_deprecated_alias(tmp_path, capsys):
    src = tmp_path / "in"
    _img(src / "a.png", size=(12, 10))
    assert main(["restore", str(src), "-o", str(tmp_path / "u"), *PRIOR, "--upscale", "2"]) == 0
    assert load_image(tmp_path / "u" / "a.png").tensor.shape[-2:] == (20, 24)
    capsys.readouterr()
    assert main(["restore", str(src), "-o", str(tmp_path / "o"), *PRIOR,
                 "--outscale", "1.5"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert sum("--outscale is deprecated; use --upscale" in line for line in err) == 1
    assert load_image(tmp_path / "o" / "a.png").tensor.shape[-2:] == (15, 18)
    runs = (tmp_path / "o" / RUNS_FILE).read_text().splitlines()
    assert json.loads(runs[0])["config"]["upscale"] == 1.5


def test_jobs_are_keyed_by_path_under_the_output_folder():
    job = Job(Path("/in/sub/a.png"), Path("/out/sub/a.png"), Path("sub/a.png"))
    assert job.key == "sub/a.png"


def test_file_links_keep_their_place_in_the_layout_and_fail_by_their_own_name(tmp_path):
    """A link to a file outside the input folder does not re-root the outputs; a broken link
    fails as its own job, named by the link."""
    src, out, elsewhere = tmp_path / "in", tmp_path / "out", tmp_path / "elsewhere"
    _img(src / "a" / "x.png")
    _img(elsewhere / "far" / "o.png", seed=1)
    (src / "a" / "link.png").symlink_to(elsewhere / "far" / "o.png")
    (src / "a" / "broken.png").symlink_to(tmp_path / "missing.png")
    assert main(["restore", str(src), "-o", str(out), *PRIOR]) == 1
    assert sorted(p.name for p in out.glob("*.png")) == ["link.png", "x.png"]
    (failure,) = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert failure["source"].endswith("broken.png") and "broken.png" in failure["error"]
