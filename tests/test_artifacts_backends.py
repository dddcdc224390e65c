"""Segmentation backends, SAM refinement, overlays and the ``raim mask`` command."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from scipy import ndimage

from raim_diffusion.artifacts import segmentation
from raim_diffusion.artifacts.detector import ArtifactDetector
from raim_diffusion.artifacts.overlay import overlay, score_image
from raim_diffusion.artifacts.planting import ellipse_region, plant_artifact
from raim_diffusion.artifacts.segmentation import (
    SEGMENTER_BACKENDS,
    MMSegSegmenter,
    NoSegmenter,
    TransformersSegmenter,
    load_segmenter,
    register_segmenter,
)
from raim_diffusion.artifacts.tables import load_class_table
from raim_diffusion.errors import MissingWeightsError
from raim_diffusion.testing import tiny_sam, tiny_segformer_segmenter

H, W = 96, 128


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _to_t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.round(a * 255) / 255).permute(2, 0, 1)[None].float()


def _pair(seed: int = 0):
    rng = np.random.default_rng(seed)
    img = cv2.resize(skimage.data.rocket(), (W, H), interpolation=cv2.INTER_AREA) / 255.0
    region = ellipse_region(H, W, (64, 48), (24, 18))
    gen = plant_artifact(img, region, "strokes", rng)
    return _to_t(gen), _to_t(img), region


# --------------------------------------------------------------------------- segmentation
def test_tiny_segformer_label_map_shape_and_determinism():
    seg = tiny_segformer_segmenter(seed=0)
    x = torch.rand(2, 3, 50, 70, generator=torch.Generator().manual_seed(0))
    lab = seg(x)
    assert lab.shape == (2, 50, 70) and lab.dtype == torch.long
    assert int(lab.min()) >= 0 and int(lab.max()) < 150
    assert torch.equal(lab, tiny_segformer_segmenter(seed=0)(x))
    with pytest.raises(ValueError, match="N,3,H,W"):
        seg(torch.rand(3, 50, 70))


def test_tiled_segmentation_covers_large_images():
    seg = tiny_segformer_segmenter(short_side=32)
    seg.tile = 48  # resized 32 x 160 > tile: tiles with blended logits
    lab = seg(torch.rand(1, 3, 40, 200, generator=torch.Generator().manual_seed(1)))
    assert lab.shape == (1, 40, 200) and int(lab.max()) < 150


def test_segformer_from_pretrained_folder_round_trip(tmp_path):
    from transformers import SegformerImageProcessor

    seg = tiny_segformer_segmenter(seed=3)
    seg.model.save_pretrained(tmp_path)
    SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(tmp_path)
    loaded = load_segmenter(str(tmp_path))
    assert isinstance(loaded, TransformersSegmenter) and loaded.short_side == 64
    x = torch.rand(1, 3, 40, 60, generator=torch.Generator().manual_seed(2))
    assert torch.equal(loaded(x), seg(x))


def test_mask2former_backend_semantic_inference_and_loading(tmp_path):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    from raim_diffusion.artifacts.tables import ADE20K_CLASSES

    backbone = SwinConfig(
        image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
        window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"],
    )  # fmt: skip
    config = Mask2FormerConfig(
        backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
        encoder_feedforward_dim=16, encoder_layers=1, decoder_layers=2, num_attention_heads=1,
        dim_feedforward=16, num_queries=5, num_labels=150,
        id2label=dict(enumerate(ADE20K_CLASSES)),
        label2id={c: i for i, c in enumerate(ADE20K_CLASSES)},
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Mask2FormerForUniversalSegmentation(config).eval()
    seg = TransformersSegmenter(model, short_side=64, tile=128, name="tiny-m2f")
    x = torch.rand(1, 3, 50, 70, generator=torch.Generator().manual_seed(0))
    lab = seg(x)
    assert seg.kind == "mask2former" and lab.shape == (1, 50, 70) and int(lab.max()) < 150
    model.save_pretrained(tmp_path)
    loaded = load_segmenter(str(tmp_path))  # no preprocessor file: ImageNet mean/std, 640
    loaded.short_side = 64
    assert loaded.kind == "mask2former" and torch.equal(loaded(x), lab)


def test_wrong_label_set_is_refused(tmp_path):
    seg = tiny_segformer_segmenter()
    seg.model.config.id2label = {i: f"class{i}" for i in range(150)}
    seg.model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="label order"):
        load_segmenter(str(tmp_path))


def test_missing_models_and_backends_give_clear_errors(tmp_path):
    name = "nvidia/segformer-b5-finetuned-ade-640-640"
    with pytest.raises(MissingWeightsError) as info:  # HF_HUB_OFFLINE=1 (conftest)
        load_segmenter(name)
    message = str(info.value)
    assert f"model {name} is not available offline" in message
    assert f"`hf download {name}`" in message and "detect.segmenter=none" in message
    assert "--segmenter" not in message  # not a `raim restore` flag
    with pytest.raises(ImportError, match="mmsegmentation"):
        MMSegSegmenter("cfg.py")
    with pytest.raises(ImportError, match="mmsegmentation"):
        load_segmenter("mmseg:cfg.py:ckpt.pth")
    with pytest.raises(MissingWeightsError, match="no such folder"):
        load_segmenter(str(tmp_path / "not" / "there"))
    with pytest.raises(MissingWeightsError, match="local folder is incomplete"):
        load_segmenter(tmp_path)  # exists, but holds no model
    assert isinstance(load_segmenter("none"), NoSegmenter)


class _Probe:
    """Fake ``AutoConfig.from_pretrained`` and network: records how the hub is approached."""

    def __init__(self, monkeypatch, reachable):
        import socket
        import urllib.request

        import huggingface_hub.constants
        import transformers

        self.calls = []
        self.connects = 0
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(urllib.request, "getproxies", dict)

        def connect(address, timeout=None):
            self.connects += 1
            if not reachable:
                raise OSError("Name or service not known")
            return socket.socket()  # closed unused by the probe

        monkeypatch.setattr(socket, "create_connection", connect)

        def from_pretrained(source, **kwargs):
            self.calls.append(kwargs.get("local_files_only", False))
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

        monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)


def test_missing_model_tries_the_cache_first_and_the_hub_only_if_it_answers(monkeypatch):
    name = "nvidia/segformer-b5-finetuned-ade-640-640"
    offline = _Probe(monkeypatch, reachable=False)
    with pytest.raises(MissingWeightsError, match="not available offline"):
        load_segmenter(name)
    assert offline.calls == [True] and offline.connects == 1  # no 25 s of hub retries

    online = _Probe(monkeypatch, reachable=True)
    with pytest.raises(MissingWeightsError, match="could not be downloaded") as info:
        load_segmenter("segformer")
    assert online.calls == [True, False] and online.connects == 1
    assert f"`hf download {name}`" in str(info.value)

    flagged = _Probe(monkeypatch, reachable=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match="not available offline"):
        load_segmenter(name)
    assert flagged.calls == [True] and flagged.connects == 0


def test_segmenter_registry(monkeypatch):
    assert {"none", "segformer", "mask2former", "mmseg", "transformers"} <= set(SEGMENTER_BACKENDS)
    assert isinstance(load_segmenter(None), NoSegmenter)
    assert isinstance(load_segmenter("NONE"), NoSegmenter)
    with pytest.raises(ValueError, match="unknown backend 'foo'") as info:
        load_segmenter("foo:bar")
    for known in ("'mmseg'", "'none'", "'segformer'", "'mask2former'", "'transformers'"):
        assert known in str(info.value)
    with pytest.raises(ValueError, match="mmseg:<config.py>"):
        load_segmenter("mmseg:")
    with pytest.raises(ValueError, match="takes no argument"):
        load_segmenter("segformer:nvidia/mit-b0")
    with pytest.raises(TypeError, match="segmenter"):
        load_segmenter(3)

    # A new backend is one registered function; the registry is swapped for a copy here.
    monkeypatch.setattr(segmentation, "SEGMENTER_BACKENDS", dict(SEGMENTER_BACKENDS))
    seen = []

    @register_segmenter("spy")
    def _spy(argument, device, dtype):
        seen.append((argument, device, dtype))
        return NoSegmenter()

    assert isinstance(load_segmenter("Spy:a:b", device="cpu", dtype=torch.float16), NoSegmenter)
    load_segmenter("spy")
    assert seen == [("a:b", "cpu", torch.float16), ("", None, None)]
    assert "spy" not in SEGMENTER_BACKENDS  # the module's own registry was not touched
    with pytest.raises(ValueError, match="already registered"):
        register_segmenter("SPY")
    with pytest.raises(ValueError, match="letters"):
        register_segmenter("x")
    # A Windows drive is a path, not a backend; hub ids and folders go to transformers.
    with pytest.raises(MissingWeightsError, match="no such folder"):
        load_segmenter("C:\\models\\segformer")


def test_detector_with_tiny_segformer_end_to_end():
    gen, ref, _ = _pair()
    seg = tiny_segformer_segmenter(seed=0)
    det = ArtifactDetector(segmenter=seg, area_threshold_px=200)
    res = det(gen, ref)
    assert res.segmentation == "tiny-segformer"
    assert torch.equal(res.labels, seg(gen))  # the generated image is segmented
    # The decision uses exactly those labels: same result as passing them in.
    given = ArtifactDetector(segmenter="none", area_threshold_px=200)(gen, ref, labels=res.labels)
    assert torch.equal(given.masks, res.masks) and given.segmentation == "labels"
    for reg in res.regions[0]:
        assert reg.class_name is not None and 0 <= reg.label < 150
    # A table with huge weights for the predicted classes removes every candidate.
    table = load_class_table("ade20k-desra")
    heavy = {name: 50.0 for name in table.weights}
    none = ArtifactDetector(segmenter=seg, class_weights=heavy, area_threshold_px=200)(gen, ref)
    assert res.masks.sum() > 0 and none.masks.sum() == 0


def test_segment_option_chooses_the_segmented_image():
    gen, ref, _ = _pair()
    seen = []

    class Spy:
        name = "spy"

        def __call__(self, images):
            seen.append(images.clone())
            return torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.long)

    ArtifactDetector(segmenter=Spy())(gen, ref)
    ArtifactDetector(segmenter=Spy(), segment="reference")(gen, ref)
    assert torch.equal(seen[0], gen) and torch.equal(seen[1], ref)


# --------------------------------------------------------------------------- SAM
def test_sam_refinement_stays_inside_envelope(tmp_path):
    pytest.importorskip("segment_anything")
    from raim_diffusion.artifacts.sam import SamRefiner

    refiner = SamRefiner(tiny_sam(seed=0), envelope=4, points=2)
    img = torch.rand(1, 3, 70, 90, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 70, 90)
    mask[..., 20:35, 30:50] = 1
    mask[..., 55:62, 5:12] = 1
    out = refiner(img, mask)
    assert out.shape == mask.shape and set(out.unique().tolist()) <= {0.0, 1.0}
    env = ndimage.binary_dilation(mask[0, 0].numpy() > 0, structure=np.ones((9, 9)))
    assert not ((out[0, 0].numpy() > 0) & ~env).any()
    assert out.sum() > 0
    assert refiner(img, torch.zeros_like(mask)).sum() == 0
    # envelope=0: SAM may only shrink (or keep) regions.
    shrink = SamRefiner(tiny_sam(seed=0), envelope=0)(img, mask)
    assert not ((shrink > 0) & (mask == 0)).any()


def test_sam_checkpoint_loading_is_weights_only(tmp_path):
    pytest.importorskip("segment_anything")
    from raim_diffusion.artifacts.sam import SamRefiner

    src = tiny_sam(seed=1)
    path = tmp_path / "sam_tiny.pth"
    torch.save(src.state_dict(), path)
    ref = SamRefiner.from_checkpoint(path, model_type=tiny_sam(seed=2))
    for a, b in zip(ref.model.state_dict().values(), src.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    bad = tmp_path / "evil.pth"
    torch.save({"x": Image.new("L", (2, 2))}, bad)  # an arbitrary pickled object
    with pytest.raises(Exception, match="[Ww]eights only|weights_only"):
        SamRefiner.from_checkpoint(bad, model_type=tiny_sam())
    with pytest.raises(MissingWeightsError):
        SamRefiner.from_checkpoint(tmp_path / "nope.pth")


def test_detector_with_sam_refiner():
    pytest.importorskip("segment_anything")
    from raim_diffusion.artifacts.sam import SamRefiner

    gen, ref, _ = _pair()
    base = ArtifactDetector(segmenter="none", area_threshold_px=200)(gen, ref)
    det = ArtifactDetector(
        segmenter="none", area_threshold_px=200, refiner=SamRefiner(tiny_sam(), envelope=6)
    )
    res = det(gen, ref)
    env = ndimage.binary_dilation(base.masks[0, 0].numpy() > 0, structure=np.ones((13, 13)))
    assert base.masks.sum() > 0
    assert not ((res.masks[0, 0].numpy() > 0) & ~env).any()
    assert len(res.regions[0]) >= 1


# --------------------------------------------------------------------------- overlay and CLI
def test_overlay_tints_only_the_mask():
    gen, ref, _ = _pair()
    res = ArtifactDetector(segmenter="none", area_threshold_px=200)(gen, ref)
    img = np.asarray(overlay(gen, res, outline=False, text=False))
    base = np.round(gen[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    mask = res.masks[0, 0].numpy() > 0.5
    assert mask.any()
    assert np.array_equal(img[~mask], base[~mask])
    assert (img[mask][:, 0].astype(int) >= base[mask][:, 0]).all()  # tinted towards red
    annotated = res.overlay(gen)
    assert annotated.size == (W, H)
    assert score_image(res).mode == "L"


def _write_pair(folder_gen, folder_ref, name, gen, ref):
    folder_gen.mkdir(parents=True, exist_ok=True)
    folder_ref.mkdir(parents=True, exist_ok=True)

    def to_img(t):
        return Image.fromarray(np.round(t[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))

    to_img(gen).save(folder_gen / f"{name}.png")
    to_img(ref).save(folder_ref / f"{name}.png")


def test_cli_mask_writes_outputs_and_reports_failures(tmp_path, capsys):
    from raim_diffusion.runner.commands import mask as mask_cmd

    gen, ref, _ = _pair()
    _write_pair(tmp_path / "gen", tmp_path / "ref", "a", gen, ref)
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "gen" / "orphan.png")
    params = tmp_path / "p.yaml"
    params.write_text("mode: reference\narea_threshold_px: 200\n")
    import argparse

    parser = argparse.ArgumentParser()
    mask_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(
        [
            "mask",
            "--generated",
            str(tmp_path / "gen"),
            "--reference",
            str(tmp_path / "ref"),
            "-o",
            str(tmp_path / "out"),
            "--params",
            str(params),
            "--segmenter",
            "none",
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    rc = args.func(args)
    assert rc == 1  # the orphan has no reference
    assert "orphan" in capsys.readouterr().err
    m = np.asarray(Image.open(tmp_path / "out" / "a_mask.png"))
    assert m.shape == (H, W) and set(np.unique(m)) <= {0, 255} and m.any()
    assert (tmp_path / "out" / "a_overlay.png").is_file()
    assert (tmp_path / "out" / "a_score.png").is_file()
    summary = json.loads((tmp_path / "out" / "regions.json").read_text())
    assert summary["images"]["a"]["segmentation"] == "none"
    assert summary["images"]["a"]["regions"]
    args.params = "no-such-set"
    assert args.func(args) == 2


def test_default_detector_loads_segformer_lazily():
    gen, ref, _ = _pair()
    det = ArtifactDetector()  # DeSRA default: SegFormer-B5, not in the offline test cache
    labels = torch.full((1, H, W), 2)
    assert det(gen, ref, labels=labels).segmentation == "labels"  # no model needed
    with pytest.raises(MissingWeightsError, match="segmenter .none."):
        det(gen, ref)
    assert ArtifactDetector("improved").config.mode == "improved"
    assert ArtifactDetector({"contrast_threshold": 0.6}).config.contrast_threshold == 0.6
    assert ArtifactDetector(segmenter="none").to("cpu").device == torch.device("cpu")


def test_replace_shares_the_segmenter_without_loading():
    seg = tiny_segformer_segmenter()
    det = ArtifactDetector(segmenter=seg)
    new = det.replace(contrast_threshold=0.6)
    assert new.config.contrast_threshold == 0.6 and new._segmenter is seg
    lazy = ArtifactDetector().replace(area_threshold_px=10)  # default SegFormer: not loaded
    assert lazy._segmenter is None and lazy.config.area_threshold_px == 10
    assert det.replace(segmenter="none")(*_pair()[:2]).segmentation == "none"
