"""Stage 1 prior: loading any spandrel architecture safely, tiling, padding, ensembles, dtypes and
save/load round trips, all on tiny random networks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import spandrel
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from safetensors.torch import save_file
from spandrel import ImageModelDescriptor, SizeRequirements
from spandrel.architectures.Compact import Compact, CompactArch
from spandrel.architectures.ESRGAN import ESRGAN
from spandrel.architectures.SwinIR import SwinIR

from raim_diffusion.errors import MissingWeightsError
from raim_diffusion.prior import PriorModel, load_prior, read_state_dict


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=_gen(seed))


def _net(cls, seed: int = 0, **kwargs) -> torch.nn.Module:
    # Architecture constructors draw from the global RNG; fork it so tests stay independent.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = cls(**kwargs).eval()
        # Compact's PReLU slopes start equal and biases at zero; randomise them for a real test.
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return net


def _compact(scale: int = 2, seed: int = 0, **kwargs) -> Compact:
    kwargs = {"num_feat": 8, "num_conv": 2, "upscale": scale, **kwargs}
    return _net(Compact, seed, **kwargs)


def _direct(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net(x).clamp(0, 1)


def _count_calls(module: torch.nn.Module) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    module.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape)))
    return shapes


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("priors")
    out = {}
    compact = _compact(2, seed=1)
    save_file(compact.state_dict(), root / "compact.safetensors")
    torch.save(compact.state_dict(), root / "compact.pth")
    # Real-ESRGAN-style checkpoint layout: wrapped in params_ema.
    esrgan = _net(ESRGAN, 2, num_filters=8, num_blocks=1, scale=4)
    torch.save({"params_ema": esrgan.state_dict()}, root / "esrgan.pth")
    out["compact_net"], out["esrgan_net"] = compact, esrgan
    for name in ("compact.safetensors", "compact.pth", "esrgan.pth"):
        out[name] = root / name
    out["root"] = root
    return out


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("name", ["compact.safetensors", "compact.pth"])
def test_load_file_matches_the_network(files, name):
    prior = load_prior(files[name])
    assert prior.config.architectures == ["Compact"] and prior.scale == 2
    x = _rand(1, 3, 12, 10)
    torch.testing.assert_close(prior(x), _direct(files["compact_net"], x), rtol=0, atol=1e-6)


def test_wrapped_pth_checkpoint_and_scale(files):
    prior = load_prior(files["esrgan.pth"])
    assert prior.config.architectures == ["ESRGAN"] and prior.scale == 4
    x = _rand(1, 3, 9, 7)
    y = prior(x)
    assert y.shape == (1, 3, 36, 28) and y.dtype == torch.float32
    torch.testing.assert_close(y, _direct(files["esrgan_net"], x), rtol=0, atol=1e-6)


def test_extra_arch_srformer_loads(tmp_path):
    srformer = pytest.importorskip("spandrel_extra_arches.architectures.SRFormer")
    net = _net(
        srformer.SRFormer, 3, img_size=16, embed_dim=12, depths=[1], num_heads=[2],
        window_size=4, upscale=2, upsampler="pixelshuffledirect",
    )  # fmt: skip
    save_file(net.state_dict(), tmp_path / "srformer.safetensors")
    before = len(spandrel.MAIN_REGISTRY)
    prior = load_prior(tmp_path / "srformer.safetensors")
    assert prior.config.architectures == ["SRFormer"]
    # The extra architectures go into a private registry, not spandrel's global one.
    assert len(spandrel.MAIN_REGISTRY) == before
    assert prior(_rand(1, 3, 17, 19)).shape == (1, 3, 34, 38)


def _mark(path: str) -> None:
    Path(path).write_text("unpickled")


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (_mark, (self.path,))


def test_pickled_objects_are_refused(tmp_path):
    marker = tmp_path / "marker"
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1), "evil": _Evil(str(marker))}, bad)
    with pytest.raises(ValueError, match="refusing"):
        load_prior(bad)
    assert not marker.exists(), "the pickled callable ran"


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(MissingWeightsError, match="nope.pth"):
        load_prior(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError):  # MissingWeightsError is a FileNotFoundError
        load_prior("not-a-builtin-and-not-a-file")
    (tmp_path / "w.onnx").write_bytes(b"0")
    with pytest.raises(ValueError, match="suffix"):
        load_prior(tmp_path / "w.onnx")
    save_file({"foo.bar": torch.zeros(3)}, tmp_path / "alien.safetensors")
    with pytest.raises(ValueError, match=r"alien\.safetensors.*unsupported architecture"):
        load_prior(tmp_path / "alien.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="broken.safetensors"):
        load_prior(tmp_path / "broken.safetensors")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(MissingWeightsError, match="config.json"):
        load_prior(tmp_path / "empty_dir")


def test_read_state_dict_accepts_plain_containers(tmp_path):
    path = tmp_path / "ckpt.ckpt"
    torch.save({"state_dict": {"a": torch.ones(2)}, "epoch": 3, "name": "x"}, path)
    assert read_state_dict(path)["epoch"] == 3


# ----------------------------------------------------------------------------- output size


def test_output_size_scale_and_outscale():
    prior = PriorModel.from_spandrel(
        spandrel.ModelLoader().load_from_state_dict(_compact(4).state_dict())
    )
    x = _rand(2, 3, 10, 13)
    native = prior(x)
    assert native.shape == (2, 3, 40, 52)
    assert prior(x, outscale=1).shape == (2, 3, 10, 13)
    assert prior(x, outscale=1.5).shape == (2, 3, 15, 20)  # round(19.5) = 20
    assert torch.equal(prior(x, outscale=4), native)
    assert not native.is_inference()  # later stages may modify it in place or train on it
    down = prior(x, outscale=2)
    assert down.min() >= 0 and down.max() <= 1 and down.dtype == torch.float32
    # Antialiased downscaling of the native output, not a different network pass.
    expected = F.interpolate(native, size=(20, 26), mode="bicubic", antialias=True).clamp(0, 1)
    torch.testing.assert_close(down, expected)
    # A default outscale in the config (as for the built-in animevideov3-x2).
    prior.register_to_config(outscale=2)
    assert prior.scale == 2 and prior.native_scale == 4
    assert torch.equal(prior(x), down)


def test_input_validation():
    prior = PriorModel.from_spandrel(
        spandrel.ModelLoader().load_from_state_dict(_compact(2).state_dict())
    )
    with pytest.raises(ValueError, match="x must be 4-D"):
        prior(_rand(3, 8, 8))
    with pytest.raises(TypeError, match="floating point"):
        prior(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        prior(_rand(1, 3, 8, 8) * 255)
    with pytest.raises(ValueError, match="NaN"):
        prior(torch.full((1, 3, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="channels"):
        prior(_rand(1, 5, 8, 8))
    with pytest.raises(ValueError, match="outscale"):
        prior(_rand(1, 3, 8, 8), outscale=-1)
    with pytest.raises(TypeError, match="Tensor"):
        prior([[0.5]])


def test_channel_handling():
    rgb_prior = PriorModel.from_architecture("SRVGGNetCompact", num_feat=8, num_conv=2, upscale=2)
    gray = _rand(1, 1, 8, 8)
    out = rgb_prior(gray)
    assert out.shape == (1, 1, 16, 16)
    torch.testing.assert_close(out, rgb_prior(gray.expand(-1, 3, -1, -1)).mean(1, keepdim=True))
    # A grayscale network on a colour image restores each channel on its own.
    net = _compact(2, num_in_ch=1, num_out_ch=1)
    gray_prior = PriorModel.from_spandrel(
        spandrel.ModelLoader().load_from_state_dict(net.state_dict())
    )
    x = _rand(2, 3, 8, 9)
    y = gray_prior(x)
    assert y.shape == (2, 3, 16, 18)
    for c in range(3):
        torch.testing.assert_close(y[:, c : c + 1], _direct(net, x[:, c : c + 1]))


# ----------------------------------------------------------------------------- tiling


def test_tiled_equals_untiled_for_a_convolutional_net():
    net = _compact(2, num_conv=3)
    desc = spandrel.ModelLoader().load_from_state_dict(net.state_dict())
    x = _rand(1, 3, 56, 48, seed=3)
    untiled = PriorModel.from_spandrel(desc, tile=0)(x)
    tiled_prior = PriorModel.from_spandrel(desc, tile=32, tile_overlap=16)
    calls = _count_calls(tiled_prior.members[0])
    tiled = tiled_prior(x)
    assert sum(s[0] for s in calls) == 6, "expected 3 x 2 tiles"
    assert all(s[-2:] == (32, 32) for s in calls)
    # The 4 pixels next to a tile edge see zero padding instead of image, but a wide overlap
    # puts them where the Gaussian blend gives them < 1e-3 of the weight.
    torch.testing.assert_close(tiled, untiled, rtol=0, atol=1e-4)
    # A narrow overlap leaves visible seams: the comparison above can fail.
    narrow = PriorModel.from_spandrel(desc, tile=32, tile_overlap=4)(x)
    assert (narrow - untiled).abs().max() > 1e-3


def test_one_tile_when_tile_covers_the_image():
    prior = PriorModel.from_architecture("Compact", num_feat=8, num_conv=2, upscale=2)
    prior.enable_tiling(tile=64, overlap=8)
    calls = _count_calls(prior.members[0])
    x = _rand(1, 3, 30, 50)
    y = prior(x)
    assert calls == [(1, 3, 30, 50)] and y.shape == (1, 3, 60, 100)


def test_auto_tile_on_cpu(monkeypatch):
    """On the CPU the budget is available host memory: untiled while the image fits, tiles
    (aligned, within bounds) once it does not."""
    import psutil

    prior = PriorModel.from_architecture("Compact", num_feat=8, num_conv=2, upscale=2)
    assert prior.config.tile is None
    assert prior._auto_tile(torch.zeros(1, 3, 64, 64)) is None
    assert prior._auto_tile(torch.zeros(1, 3, 600, 64)) is None  # fits in a few GB

    class _Mem:
        available = 256 * 1024**2  # 256 MiB free

    monkeypatch.setattr(psutil, "virtual_memory", lambda: _Mem)
    tile = prior._auto_tile(torch.zeros(1, 3, 4000, 3000))
    assert tile is not None and tile % 8 == 0 and tile < 3000
    assert prior._auto_tile(torch.zeros(1, 3, 64, 64)) is None


def test_tiling_arguments_are_validated():
    desc = spandrel.ModelLoader().load_from_state_dict(_compact(2).state_dict())
    for bad in ({"tile": -1}, {"tile": 32, "tile_overlap": 32}, {"tile_weight": "box"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            PriorModel.from_spandrel(desc, **bad)


# ----------------------------------------------------------------------------- padding


def _padded_descriptor(net: Compact, multiple_of: int) -> ImageModelDescriptor:
    return ImageModelDescriptor(
        net, net.state_dict(), CompactArch(), purpose="SR", tags=[], supports_half=True,
        supports_bfloat16=True, scale=net.upscale, input_channels=3, output_channels=3,
        size_requirements=SizeRequirements(multiple_of=multiple_of),
    )  # fmt: skip


def test_padding_to_multiple_of_and_crop():
    net = _compact(2)
    plain = PriorModel.from_spandrel(spandrel.ModelLoader().load_from_state_dict(net.state_dict()))
    padded = PriorModel.from_spandrel(_padded_descriptor(_compact(2), multiple_of=8))
    calls = _count_calls(padded.members[0])
    x = _rand(1, 3, 13, 11)
    y = padded(x)
    assert calls == [(1, 3, 16, 16)], "input not padded to the multiple"
    assert y.shape == (1, 3, 26, 22)
    # Four 3x3 convolutions see 4 input pixels: more than 4 pixels (8 output pixels) away
    # from the padded bottom/right border the crop must equal the unpadded result, and a crop
    # shifted by one output pixel would not.
    ref = plain(x)
    assert not torch.equal(y, ref)
    torch.testing.assert_close(y[..., :18, :14], ref[..., :18, :14], rtol=0, atol=1e-6)
    assert not torch.allclose(y[..., 1:19, 1:15], ref[..., :18, :14])


def test_padding_matches_spandrel_reference_for_swinir():
    net = _net(
        SwinIR, 4, img_size=16, embed_dim=12, depths=[1], num_heads=[2], window_size=4,
        upscale=2, upsampler="pixelshuffledirect",
    )  # fmt: skip
    desc = spandrel.ModelLoader().load_from_state_dict(net.state_dict())
    assert desc.size_requirements.minimum == 16
    x = _rand(1, 3, 9, 13)
    y = PriorModel.from_spandrel(desc)(x)
    assert y.shape == (1, 3, 18, 26)
    # spandrel's own call pads (reflect) and crops the same way.
    torch.testing.assert_close(y, desc(x), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- ensembles


def test_ensemble_is_the_weighted_average(files):
    second = files["root"] / "second.safetensors"
    net2 = _compact(2, seed=7)
    save_file(net2.state_dict(), second)
    prior = load_prior([files["compact.safetensors"], second], weights=[0.8, 0.2])
    assert prior.weights == pytest.approx([0.8, 0.2])
    x = _rand(1, 3, 11, 12)
    expected = 0.8 * _direct(files["compact_net"], x) + 0.2 * _direct(net2, x)
    torch.testing.assert_close(prior(x), expected, rtol=0, atol=1e-6)


def test_ensemble_of_different_scales(files):
    prior = load_prior([files["compact.pth"], files["esrgan.pth"]], weights=[3, 1])
    assert prior.scale == 4 and prior.weights == pytest.approx([0.75, 0.25])
    x = _rand(1, 3, 8, 10)
    up = F.interpolate(_direct(files["compact_net"], x), size=(32, 40), mode="bicubic")
    expected = 0.75 * up.clamp(0, 1) + 0.25 * _direct(files["esrgan_net"], x)
    torch.testing.assert_close(prior(x), expected, rtol=0, atol=1e-5)
    assert prior(x, outscale=1).shape == (1, 3, 8, 10)


@pytest.mark.parametrize(
    "weights,match",
    [([1.0], "2 model"), ([1.0, 0.0], "positive"), ([1.0, -2.0], "positive"),
     ([1.0, float("nan")], "positive")],
)  # fmt: skip
def test_ensemble_weights_are_validated(files, weights, match):
    with pytest.raises(ValueError, match=match):
        load_prior([files["compact.pth"], files["compact.pth"]], weights=weights)


def test_nested_ensembles_flatten(files):
    inner = load_prior([files["compact.pth"], files["esrgan.pth"]], weights=[1, 3])
    outer = PriorModel.ensemble([inner, load_prior(files["compact.pth"])], weights=[0.5, 0.5])
    assert outer.weights == pytest.approx([0.125, 0.375, 0.5])


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("ensemble", [False, True])
def test_save_pretrained_round_trip(files, tmp_path, ensemble):
    sources = [files["compact.pth"], files["esrgan.pth"]] if ensemble else files["esrgan.pth"]
    weights = [0.3, 0.7] if ensemble else None
    prior = load_prior(sources, weights=weights, tile=48, tile_overlap=16)
    prior.save_pretrained(tmp_path / "prior")
    assert sorted(os.listdir(tmp_path / "prior")) == [
        "config.json", "diffusion_pytorch_model.safetensors",
    ]  # fmt: skip
    config = json.loads((tmp_path / "prior" / "config.json").read_text())
    assert config["_class_name"] == "PriorModel" and config["tile"] == 48
    loaded = PriorModel.from_pretrained(tmp_path / "prior")
    assert loaded.config.architectures == prior.config.architectures
    assert loaded.weights == pytest.approx(prior.weights)
    x = _rand(1, 3, 12, 9)
    assert torch.equal(loaded(x), prior(x))
    # The same folder through load_prior, and as a pipeline component (subfolder + dtype).
    assert torch.equal(load_prior(tmp_path / "prior", tile=48, tile_overlap=16)(x), prior(x))
    component = PriorModel.from_pretrained(
        tmp_path, subfolder="prior", torch_dtype=torch.bfloat16, variant=None,
        low_cpu_mem_usage=True, device_map=None, use_safetensors=None,
    )  # fmt: skip
    assert set(component.member_dtypes()) == {torch.bfloat16}
    assert component(x).dtype == torch.float32


def test_from_pretrained_variant_and_shards(files, tmp_path):
    prior = load_prior(files["esrgan.pth"])
    x = _rand(1, 3, 6, 5)
    prior.save_pretrained(tmp_path / "v", variant="fp16")
    assert (tmp_path / "v" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert torch.equal(PriorModel.from_pretrained(tmp_path / "v", variant="fp16")(x), prior(x))
    with pytest.raises(MissingWeightsError, match="diffusion_pytorch_model.safetensors"):
        PriorModel.from_pretrained(tmp_path / "v")
    prior.save_pretrained(tmp_path / "s", max_shard_size="20KB")
    assert (tmp_path / "s" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert torch.equal(PriorModel.from_pretrained(tmp_path / "s")(x), prior(x))


class _PriorPipeline(DiffusionPipeline):
    def __init__(self, prior: PriorModel) -> None:
        super().__init__()
        self.register_modules(prior=prior)


def test_loads_as_a_diffusers_pipeline_component(files, tmp_path):
    prior = load_prior([files["compact.pth"], files["esrgan.pth"]], weights=[0.6, 0.4])
    _PriorPipeline(prior=prior).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["prior"] == ["raim_diffusion.prior.model", "PriorModel"]
    loaded = _PriorPipeline.from_pretrained(tmp_path, dtype=torch.bfloat16).prior
    assert isinstance(loaded, PriorModel) and loaded.member_dtypes() == [torch.bfloat16] * 2
    x = _rand(1, 3, 8, 8)
    torch.testing.assert_close(loaded(x), prior(x), rtol=0, atol=3e-2)


def test_from_pretrained_checks_the_config(files, tmp_path):
    load_prior(files["compact.pth"]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["SwinIR"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="saved as SwinIR"):
        PriorModel.from_pretrained(tmp_path)
    config["architectures"] = ["Compact", "Compact"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="2 member"):
        PriorModel.from_pretrained(tmp_path)


def test_from_config_without_members_explains():
    with pytest.raises(TypeError, match="load_prior"):
        PriorModel()


# ----------------------------------------------------------------------------- dtypes


def test_bfloat16_compute_float32_output(files):
    fp32 = load_prior(files["compact.safetensors"])
    bf16 = load_prior(files["compact.safetensors"], dtype=torch.bfloat16)
    assert bf16.member_dtypes() == [torch.bfloat16]
    x = _rand(1, 3, 10, 10)
    y = bf16(x)
    assert y.dtype == torch.float32 and y.min() >= 0 and y.max() <= 1
    torch.testing.assert_close(y, fp32(x), rtol=0, atol=3e-2)
    assert not torch.equal(y, fp32(x))


def test_unsupported_half_stays_float32():
    net = _net(
        SwinIR, 5, img_size=16, embed_dim=12, depths=[1], num_heads=[2], window_size=4,
        upscale=1, upsampler="",
    )  # fmt: skip
    swinir = PriorModel.from_spandrel(spandrel.ModelLoader().load_from_state_dict(net.state_dict()))
    compact = PriorModel.from_architecture("Compact", num_feat=8, num_conv=2, upscale=1)
    prior = PriorModel.ensemble([swinir, compact])
    prior.to(torch.float16)  # SwinIR does not support fp16 (spandrel's descriptor says so)
    assert prior.member_dtypes() == [torch.float32, torch.float16]
    prior.half()
    assert prior.member_dtypes() == [torch.float32, torch.float16]
    prior.float()
    assert prior.member_dtypes() == [torch.float32, torch.float32]


# ----------------------------------------------------------------------------- built-ins


def test_builtin_names_resolve(tmp_path, monkeypatch):
    from raim_diffusion.prior import builtin

    monkeypatch.setenv("RAIM_CACHE", str(tmp_path))  # convert into a scratch cache
    try:
        prior = load_prior("realesr-animevideov3-x2")
    except MissingWeightsError:
        pytest.skip(f"{builtin.PIP_NAME} is not installed and nothing is cached")
    assert prior.config.architectures == ["Compact"]
    assert prior.native_scale == 4 and prior.scale == 2
    assert prior(_rand(1, 3, 8, 6)).shape == (1, 3, 16, 12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_auto_dtype_and_tiling(files):
    prior = load_prior(files["esrgan.pth"], device="cuda")
    assert prior.member_dtypes() == [torch.float16]
    x = _rand(1, 3, 40, 36)
    y = prior(x)
    assert y.device == x.device and y.dtype == torch.float32 and y.shape == (1, 3, 160, 144)
    ref = load_prior(files["esrgan.pth"])(x)
    torch.testing.assert_close(y, ref, rtol=0, atol=2e-2)


def test_upscale_is_the_scale_name_and_outscale_a_deprecated_alias():
    from raim_diffusion.testing import tiny_prior

    prior = tiny_prior(2)
    x = _rand(1, 3, 8, 10)
    assert prior(x, upscale=1).shape == (1, 3, 8, 10)
    with pytest.warns(FutureWarning, match="upscale"):
        old = prior(x, outscale=1.5)
    assert torch.equal(old, prior(x, upscale=1.5))
    with pytest.raises(ValueError, match="disagree"):
        prior(x, upscale=2, outscale=1)
