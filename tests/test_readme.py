"""README.md is true: its Python snippets and command lines run as written, on the CPU, offline.

Every ```python block runs in its own interpreter, in a temporary folder holding a copy of
``examples/`` (the snippets are written to run from the repository root). The command lines of
the "Command line" section run in order in one workspace, so that later lines read what earlier
ones wrote. What this machine cannot do (download real weights, use a GPU) is handled in one of
two ways, each listed below with its reason: a block is not run and its CPU variant is, or a
command line gets a few documented extra arguments that swap real weights for tiny or no
weights. Anything else in the README fails the test until it is classified here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXAMPLES = ROOT / "examples"
TIMEOUT = 900  # seconds per interpreter; the built-in x4 prior takes ~10 s per photo on a core


def _fenced_blocks(text: str) -> list[tuple[str, str, str]]:
    """(section heading, language, code) of every fenced block, in order."""
    blocks: list[tuple[str, str, str]] = []
    heading, fence, code = "", None, []
    for line in text.splitlines(keepends=True):
        if fence is not None:
            if line.rstrip() == "```":
                blocks.append((heading, fence, "".join(code)))
                fence = None
            else:
                code.append(line)
        elif line.startswith("```"):
            fence = line[3:].strip()
            code = []
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
    return blocks


BLOCKS = _fenced_blocks(README.read_text(encoding="utf-8"))
PYTHON = [code for _, lang, code in BLOCKS if lang == "python"]
COMMAND_BLOCKS = [code for heading, lang, code in BLOCKS
                  if heading == "Command line" and lang == "bash"]

# Python blocks this machine cannot run, and why. Each names a CPU variant (a later block with
# this marker) that the test does run.
GPU_BLOCK_MARKER = '"stabilityai/stable-diffusion-xl-base-1.0"'
GPU_BLOCK_REASON = (
    "needs the SDXL weights (~7 GB) and the SegFormer model, which cannot be downloaded here, and "
    "a CUDA GPU; the block after it is the same restoration on a CPU with a tiny random SDXL, "
    "and runs"
)
CPU_VARIANT_MARKER = "save_tiny_pipeline("


def _hub_cached(repo: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, "model_index.json"), str)


def _workspace(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(EXAMPLES, work / "examples")
    return work


def _env(cpu_only: bool) -> dict[str, str]:
    env = dict(os.environ)
    # The snippets import raim_diffusion from this checkout, installed or not.
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + path if path else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""  # "cuda if available" snippets take their CPU branch
    return env


def _run(args: list[str], cwd: Path, cpu_only: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=_env(cpu_only), capture_output=True, text=True,
                          timeout=TIMEOUT)


def _saved_paths(code: str) -> list[str]:
    """The file names a snippet passes to save_image as string literals."""
    return re.findall(r"save_image\([^,]+,\s*\"([^\"]+)\"", code)


def test_readme_has_the_marked_commands():
    text = README.read_text(encoding="utf-8")
    assert "pip install -e . && raim restore examples -o outputs" in text
    block = re.search(r"<!-- test-command -->\n```bash\n(.*?)```\n<!-- /test-command -->", text,
                      re.S)
    assert block and block.group(1).strip().startswith("pip install -e \".[dev]\"")
    assert len(PYTHON) >= 3 and len(COMMAND_BLOCKS) >= 1


def test_the_gpu_block_has_a_cpu_variant():
    gpu = [i for i, code in enumerate(PYTHON) if GPU_BLOCK_MARKER in code]
    assert gpu, "the main API snippet with the real hub id is gone: update this test"
    for i in gpu:
        assert i + 1 < len(PYTHON) and CPU_VARIANT_MARKER in PYTHON[i + 1], (
            "the GPU snippet must be followed by its CPU variant"
        )
        # Same pipeline, same call: only the model and the device differ.
        for needle in ("RaimPipeline.from_pretrained(", 'prior="realesrgan-x4plus"',
                       'load_image("examples/chelsea.jpg")', "save_image(out.images"):
            assert needle in PYTHON[i] and needle in PYTHON[i + 1], needle


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(PYTHON)), ids=lambda i: f"python-block-{i + 1}")
def test_python_block_runs(index, tmp_path):
    code = PYTHON[index]
    needs_gpu = GPU_BLOCK_MARKER in code
    if needs_gpu and not (
        torch.cuda.is_available()
        and _hub_cached("stabilityai/stable-diffusion-xl-base-1.0")
        and _hub_cached("nvidia/segformer-b5-finetuned-ade-640-640")
    ):
        pytest.skip(GPU_BLOCK_REASON)
    work = _workspace(tmp_path)
    script = work / f"readme_block_{index + 1}.py"
    script.write_text(code, encoding="utf-8")
    proc = _run([sys.executable, script.name], work, cpu_only=not needs_gpu)
    assert proc.returncode == 0, f"README python block {index + 1} failed:\n{code}\n{proc.stderr}"
    for name in _saved_paths(code):
        assert (work / name).is_file(), f"block {index + 1} did not write {name}"


# ------------------------------------------------------------------------------ command lines
# Extra arguments the test adds to a README command line, by subcommand, and why. Everything
# else on the line runs as written (bash expands it, as in a user's shell).
def _adapt(argv: list[str]) -> list[str]:
    command = argv[1] if len(argv) > 1 else ""
    if command == "restore":
        config = argv[argv.index("--config") + 1] if "--config" in argv else "prior-only"
        if config not in ("prior-only", "tiny") and "--tiny" not in argv:
            # The preset's diffusion model (SDXL, SD 1.5, ...) cannot be downloaded here; --tiny
            # keeps the preset, its overrides and flags, and swaps in tiny random models.
            return [*argv, "--tiny"]
        return argv  # the built-in prior runs offline as is
    if command == "mask":
        # The parameter sets segment with SegFormer, which cannot be downloaded here.
        return [*argv, "--segmenter", "none"]
    if command == "eval":
        # LPIPS, DISTS and NIQE read weight files that cannot be downloaded here.
        return [*argv, "--metrics", "psnr,ssim"]
    if command == "study":
        return argv
    if command == "train-fusion":
        # The default preset needs the ImageNet VGG19 weights and trains for hours.
        return [*argv, "--config", "tiny", "--max-steps", "2"]
    if command == "train-prior":
        # Two steps are enough to check the command and that it writes OUT/prior.
        return [*argv, "--max-steps", "2"]
    if command == "presets":
        return argv
    raise AssertionError(f"README command `{shlex.join(argv)}` is not classified in this test")


def _command_lines(block: str) -> list[str]:
    lines = []
    for raw in block.splitlines():
        line = raw.split("  #", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def _expand(line: str, cwd: Path) -> list[str]:
    """argv of ``line`` as bash would pass it (globs, quotes)."""
    proc = subprocess.run(["bash", "-c", f"printf '%s\\0' {line}"], cwd=cwd, check=True,
                          capture_output=True, text=True)
    return proc.stdout.split("\0")[:-1]


def _save(image: Image.Image, path: Path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def _make_fixture(work: Path) -> None:
    """The folders the README's command lines name, from the example photos (small crops)."""
    for name in ("chelsea", "astronaut"):
        with Image.open(EXAMPLES / f"{name}.jpg") as im:
            photo = im.convert("RGB").crop((40, 20, 136, 116))  # 96x96
        _save(photo, work / "hq_photos" / f"{name}.png")
        lq = photo.resize((48, 48), Image.Resampling.BICUBIC)
        _save(lq, work / "photos" / f"{name}.jpg", quality=60)
        # A same-size stand-in for the ground truth: only the table's mechanics are checked.
        _save(lq.filter(ImageFilter.SMOOTH), work / "gt" / f"{name}.png")
    with Image.open(EXAMPLES / "coffee.jpg") as im:
        _save(im.convert("RGB").crop((60, 30, 108, 78)), work / "more" / "coffee.jpg", quality=60)


_DRIVER = textwrap.dedent(
    """
    import json, os, sys, traceback
    from raim_diffusion.runner.cli import main

    for job in json.loads(open(sys.argv[1]).read()):
        os.chdir(job["cwd"])
        try:
            code = main(job["argv"])
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 99
        print(f"### rc={code} {job['line']}", flush=True)
    """
)


@pytest.mark.slow
def test_command_lines_run(tmp_path):
    """Every line of the "Command line" section, and the accelerate example in one process."""
    assert len(COMMAND_BLOCKS) == 2, "update this test: the Command line section changed"
    work = _workspace(tmp_path)
    _make_fixture(work)
    jobs = []
    for line in _command_lines(COMMAND_BLOCKS[0]):
        argv = _adapt(_expand(line, work))
        assert argv[0] == "raim", line
        jobs.append({"cwd": str(work), "argv": argv[1:], "line": line})
    # `accelerate launch --multi_gpu --num_processes 8` needs eight GPUs: the test runs what it
    # launches (`-m raim_diffusion.cli restore ...`) once, in a fresh copy of the inputs.
    (launch,) = _command_lines(COMMAND_BLOCKS[1])
    argv = _expand(launch, work)
    assert argv[:2] == ["accelerate", "launch"] and "-m" in argv, launch
    module_argv = argv[argv.index("-m") + 1:]
    assert module_argv[0] == "raim_diffusion.cli", launch
    fresh = tmp_path / "launch"
    shutil.copytree(work / "photos", fresh / "photos")
    jobs.append({"cwd": str(fresh), "argv": _adapt(["raim", *module_argv[1:]])[1:],
                 "line": launch})

    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "driver.py").write_text(_DRIVER)
    driver = [sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "jobs.json")]
    proc = subprocess.run(driver, cwd=work, env=_env(cpu_only=True), capture_output=True,
                          text=True, timeout=TIMEOUT)
    log = proc.stdout + proc.stderr
    codes = re.findall(r"^### rc=(\S+) (.*)$", proc.stdout, re.M)
    assert len(codes) == len(jobs), log
    failed = [line for code, line in codes if code != "0"]
    assert not failed, f"README command lines failed: {failed}\n{log}"

    # What the lines promise.
    def size(path: Path) -> tuple[int, int]:
        with Image.open(path) as im:
            return im.size

    assert size(work / "restored" / "chelsea.jpg") == size(work / "photos" / "chelsea.jpg")
    assert size(work / "restored-x4" / "chelsea.jpg") == (192, 192)
    for out in ("restored", "restored-x4", "restored-sdxl", "restored-sd15", "smoke"):
        assert (work / out / "raim_settings.json").is_file(), out
        assert len((work / out / "raim_runs.jsonl").read_text().splitlines()) == 1, out
    assert (work / "restored-sdxl" / "more" / "coffee.jpg").is_file()
    assert (work / "restored-sdxl" / ".raim-intermediates" / "prior" / "photos"
            / "chelsea.jpg.png").is_file()
    assert sorted(p.name for p in (work / "masks").rglob("*_mask.png"))
    assert (work / "scores.csv").read_text().startswith("file,psnr,ssim")
    assert (work / "study.html").is_file() and (work / "study.key.json").is_file()
    assert (work / "runs" / "fusion" / "fusion" / "config.json").is_file()
    from raim_diffusion.prior import load_prior

    assert load_prior(work / "runs" / "prior" / "prior").scale >= 1
    assert (fresh / "restored" / "chelsea.jpg").is_file()


@pytest.mark.slow
def test_quick_start_command(tmp_path):
    """`raim restore examples -o outputs` (after `pip install -e .`, the environment this test
    runs in): every example restored at its own size, bit depth and alpha."""
    work = _workspace(tmp_path)
    proc = _run([sys.executable, "-m", "raim_diffusion.cli", "restore", "examples", "-o",
                 "outputs"], work)
    assert proc.returncode == 0, proc.stderr
    inputs = sorted(p for p in (work / "examples").iterdir() if p.suffix in (".jpg", ".png"))
    assert len(inputs) == 6
    for src in inputs:
        out = work / "outputs" / src.name
        with Image.open(src) as a, Image.open(out) as b:
            assert (a.size, a.mode) == (b.size, b.mode), src.name
