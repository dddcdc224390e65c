"""The speed/memory benchmark: a CPU smoke run on tiny components, and its full-size configs."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "benchmark_pipeline.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_pipeline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclass-free, but keeps tracebacks readable
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_tiny_run_prints_full_table_and_json(bench, capsys, tmp_path):
    out_json = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        # One thread: tiny models on a shared CPU are otherwise dominated by OpenMP waits.
        status = bench.main(
            [
                "--tiny",
                "sd15",
                "--sizes",
                "64",
                "--steps",
                "2",
                "--device",
                "cpu",
                "--threads",
                "1",
                "--json",
                str(out_json),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert status == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("size  input"))
    for column in bench.COLUMNS:
        assert column in lines[header], column
    cells = lines[header + 2].split()
    assert len(cells) == len(bench.COLUMNS)
    assert cells[:2] == ["64", "32"]  # tiny prior is x2: 32 px in, 64 px out
    numbers = [float(c) for c in cells[2:]]  # no "OOM" / "-" on a 64 px CPU run
    assert all(math.isfinite(v) and v >= 0 for v in numbers)
    assert "segmenter=None" in printed

    data = json.loads(out_json.read_text())
    (row,) = data["results"]
    assert row["status"] == row["diffusers_status"] == "ok"
    stages = [row[f"{s}_s"] for s in bench.STAGE_NAMES]
    assert all(s > 0 for s in stages)
    # The stages are timed inside the one pipeline call, so they cannot exceed its total.
    assert sum(stages) <= row["total_s"] + 1e-6
    assert row["ratio"] == pytest.approx(row["total_s"] / row["diffusers_s"])
    assert row["peak_mib"] > 0 and row["diffusers_peak_mib"] > 0
    assert data["params"]["unet"] == _params_of_tiny_unet()


def _params_of_tiny_unet() -> int:
    from raim_diffusion.testing import tiny_components

    return _params(tiny_components("sd15")["unet"])


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        # Parameter counts of the released checkpoints' components.
        (
            "sdxl",
            {
                "unet": 2_567_463_684,
                "vae": 83_653_863,
                "text_encoder": 123_060_480,
                "text_encoder_2": 694_659_840,
            },
        ),
        ("sd15", {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}),
    ],
)
def test_random_configs_match_released_models(bench, kind, expected):
    # On the meta device nothing is allocated: the full-size architecture builds in a second.
    components = bench.random_components(kind, device="meta")
    counts = {k: _params(v) for k, v in components.items() if isinstance(v, torch.nn.Module)}
    assert counts == expected
    assert components["tokenizer"]("a photo").input_ids[0] == components["tokenizer"].bos_token_id
    assert components["scheduler"].config.steps_offset == 1


def test_oom_is_reported_not_raised(bench):
    assert bench.is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert bench.is_oom(RuntimeError("MPS backend out of memory"))
    assert not bench.is_oom(RuntimeError("shape mismatch"))
    assert not bench.is_oom(ValueError("out of memory"))
    row = {
        "size": 4096,
        "input": 1024,
        "status": "ok",
        "diffusers_status": "OOM",
        "prior_s": 1.0,
        "generate_s": 2.0,
        "detect_s": 0.5,
        "fuse_s": 0.5,
        "total_s": 4.2,
        "diffusers_s": float("nan"),
        "ratio": float("nan"),
        "peak_mib": 9000.0,
        "diffusers_peak_mib": float("nan"),
    }
    cells = bench.format_table([row]).splitlines()[2].split()
    assert cells[7] == "OOM" and cells[10] == "OOM"
    assert cells[6] == "4.2000" and cells[8] == "-"


def test_rejects_bad_arguments(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--tiny", "sd15", "--steps", "0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--tiny", "sd15", "--random", "sdxl"])


def test_model_folder_mode(bench, capsys, tmp_path):
    """``--model`` loads a diffusers folder (here diffusers' own tiny SD layout) and a prior."""
    from raim_diffusion.testing import save_tiny_pipeline, tiny_prior

    folder = save_tiny_pipeline(tmp_path / "sd15", "sd15")
    tiny_prior(scale=2).save_pretrained(tmp_path / "prior")
    threads = torch.get_num_threads()
    try:
        status = bench.main(
            ["--model", str(folder), "--prior", str(tmp_path / "prior"), "--sizes", "48",
             "--steps", "2", "--warmup", "0", "--no-diffusers", "--threads", "1"]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert status == 0
    printed = capsys.readouterr().out
    assert "fusion: pyramid blend" in printed
    row = printed.splitlines()[-1].split()
    assert row[:2] == ["48", "24"] and row[7] == "skipped"
    assert float(row[6]) > 0
