"""AlignFusionNet (So Elegant's prior-guided deformable alignment) and its training triplets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raim_diffusion.fusion import (
    ALIGN_PRESETS,
    FUSION_ARCHITECTURES,
    AlignFusionNet,
    band_weight,
    fuse,
    load_fusion,
)
from raim_diffusion.fusion.align import DeformableAlignment, ModulatedDeformConv2d
from raim_diffusion.training.triplets import (
    TripletConfig,
    TripletDataset,
    find_triplets,
    is_triplet_folder,
    synthesize_triplet,
)


def _randomize(net: AlignFusionNet, seed: int = 0, scale: float = 0.05) -> AlignFusionNet:
    """Random values on every parameter, incl. the zero-initialised offset and output heads."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return net.eval()


def _images(n: int, h: int, w: int, seed: int = 0, cover: float = 0.8):
    gen = torch.Generator().manual_seed(seed)
    generated = torch.rand(n, 3, h, w, generator=gen)
    prior = torch.rand(n, 3, h, w, generator=gen)
    mask = (torch.rand(n, 1, h, w, generator=gen) > cover).float()
    return generated, prior, mask


def _photo(gen: torch.Generator, size: int) -> torch.Tensor:
    """A photo-like (3, size, size) image: multi-scale smooth colour noise plus gratings."""
    x = torch.zeros(3, size, size)
    for cells in (2, 4, 8, 16):
        noise = torch.rand(3, 1, cells, cells, generator=gen)
        x += F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)[:, 0]
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for _ in range(3):
        theta = float(torch.rand(1, generator=gen)) * math.pi
        freq = float(torch.rand(1, generator=gen)) * 0.5 + 0.2
        x += 0.6 * torch.sin(freq * (xx * math.cos(theta) + yy * math.sin(theta)))
    return ((x - x.min()) / (x.max() - x.min())).clamp(0, 1)


def _triplet_batch(gen: torch.Generator, n: int, size: int, cfg: TripletConfig | None = None):
    items = [synthesize_triplet(_photo(gen, size), gen, cfg) for _ in range(n)]
    return {k: torch.stack([item[k] for item in items]) for k in items[0]}


def _masked_l1(x: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ((x - gt).abs() * mask).sum() / (3 * mask.sum())


# ------------------------------------------------------------------------- deformable layers


def test_zero_offsets_reduce_the_deformable_layer_to_a_plain_convolution() -> None:
    torch.manual_seed(0)
    layer = ModulatedDeformConv2d(6, 5, 3)
    torch.nn.init.normal_(layer.bias)
    x = torch.rand(2, 6, 11, 13)
    taps = 9
    zero, ones = torch.zeros(2, 2 * taps, 11, 13), torch.ones(2, taps, 11, 13)
    plain = F.conv2d(x, layer.weight, layer.bias, padding=1)
    torch.testing.assert_close(layer(x, zero, ones), plain, atol=1e-5, rtol=1e-5)
    # A whole-pixel offset (dx = +1 on every tap) is the convolution of the shifted input (away
    # from the first and last columns, where the padding of the two differs).
    shift = zero.clone()
    shift[:, 1::2] = 1.0
    shifted = F.conv2d(F.pad(x[..., 1:], (0, 1)), layer.weight, layer.bias, padding=1)
    torch.testing.assert_close(
        layer(x, shift, ones)[..., 1:-1], shifted[..., 1:-1], atol=1e-5, rtol=1e-5
    )
    assert not torch.allclose(layer(x, shift, ones), plain, atol=1e-3)


def test_untrained_alignment_is_exactly_its_plain_convolution() -> None:
    # The offset head starts at zero: offsets 0 and modulation 2 * sigmoid(0) = 1.
    torch.manual_seed(0)
    align = DeformableAlignment(8, deformable_groups=2)
    x, cond = torch.rand(1, 8, 9, 10), torch.rand(1, 8, 9, 10)
    offset, modulation = align.offsets(cond)
    assert offset.shape == (1, 2 * 2 * 9, 9, 10) and torch.equal(offset, torch.zeros_like(offset))
    assert torch.equal(modulation, torch.ones_like(modulation))
    expected = F.conv2d(x, align.dcn.weight, align.dcn.bias, padding=1)
    torch.testing.assert_close(align(x, cond), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="deformable_groups"):
        DeformableAlignment(8, deformable_groups=3)


# ------------------------------------------------------------------------- the network


def test_presets_registry_and_config_validation() -> None:
    assert FUSION_ARCHITECTURES["AlignFusionNet"] is AlignFusionNet
    assert set(ALIGN_PRESETS) >= {"base", "tiny"}
    tiny = AlignFusionNet.from_preset("tiny", channels=8)
    assert tiny.config.channels == 8 and tiny.config.levels == ALIGN_PRESETS["tiny"]["levels"]
    assert tiny.config.preset is None and tiny.config.paste_back is True
    with torch.device("meta"):
        base = AlignFusionNet()  # the default is the 1024 px ``base`` network
    n_base = sum(p.numel() for p in base.parameters())
    assert base.config.channels == 64 and 1e6 < n_base < 5e6
    with pytest.raises(ValueError, match="preset"):
        AlignFusionNet(preset="huge")
    with pytest.raises(ValueError, match="levels"):
        AlignFusionNet(preset="tiny", levels=0)


def test_untrained_net_returns_the_generated_image() -> None:
    generated, prior, mask = _images(2, 16, 20)
    net = AlignFusionNet.from_preset("tiny", paste_back=False).eval()
    torch.testing.assert_close(net(generated, prior, mask), generated, atol=1e-6, rtol=0)


def test_all_zero_mask_with_paste_back_returns_generated_bit_for_bit() -> None:
    generated, prior, _ = _images(2, 24, 20)
    zero = torch.zeros(1, 1, 24, 20)
    net = _randomize(AlignFusionNet.from_preset("tiny"))
    with torch.no_grad():
        assert torch.equal(net(generated, prior, zero), generated)
    assert torch.equal(net.fuse_images(generated, prior, generated, zero), generated)
    assert torch.equal(fuse(generated, prior, generated, zero, net, tile=16, overlap=4), generated)
    # The network itself does change the image: only the paste-back keeps it.
    loose = _randomize(AlignFusionNet.from_preset("tiny", paste_back=False))
    with torch.no_grad():
        assert (loose(generated, prior, zero) - generated).abs().max() > 1e-3


def test_paste_back_keeps_generated_outside_the_feather_band() -> None:
    generated, prior, _ = _images(1, 40, 40)
    mask = torch.zeros(1, 1, 40, 40)
    mask[..., 16:22, 14:20] = 1.0
    net = _randomize(AlignFusionNet.from_preset("tiny", feather=6))
    out = net.restore(generated, prior, mask)
    band = band_weight(mask > 0, 6) > 0
    outside = ~band.expand_as(out)
    assert torch.equal(out[outside], generated[outside])
    assert (out - generated).abs()[..., 16:22, 14:20].max() > 1e-3
    assert out.min() >= 0 and out.max() <= 1
    # The training forward pastes the same way.
    with torch.no_grad():
        assert torch.equal(net(generated, prior, mask), out)


def test_odd_sizes_and_input_checks() -> None:
    net = _randomize(AlignFusionNet.from_preset("tiny", levels=3))
    generated, prior, mask = _images(2, 21, 17)
    out = net.restore(generated, prior, mask[:1])  # a single mask for the batch
    assert out.shape == (2, 3, 21, 17) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="prior is None"):
        net.restore(generated, None, mask)
    with pytest.raises(ValueError, match="prior"):
        net.restore(generated, prior[..., :-1], mask)
    with pytest.raises(ValueError, match="mask"):
        net.restore(generated, prior, mask[:, :, :-1])
    with pytest.raises(ValueError, match="tile"):
        net.restore(generated, prior, mask, tile=0)
    with_lq = AlignFusionNet.from_preset("tiny", lq_input=True)
    with pytest.raises(ValueError, match="lq is required"):
        with_lq.restore(generated, prior, mask)
    assert with_lq.restore(generated, prior, mask, generated).shape == generated.shape


def test_tiling_matches_untiled() -> None:
    net = _randomize(AlignFusionNet.from_preset("tiny", feather=4), scale=0.02)
    generated, prior, _ = _images(1, 45, 51)
    mask = torch.zeros(1, 1, 45, 51)
    mask[..., 10:36, 12:40] = 1.0  # across the seams of 32 px tiles
    whole = net.restore(generated, prior, mask)
    assert torch.equal(net.restore(generated, prior, mask, tile=64), whole)  # one tile covers
    tiled = net.restore(generated, prior, mask, tile=32, overlap=12)
    diff = (tiled - whole).abs()
    assert diff.mean() < 1e-3 and diff.max() < 1e-2
    # The paste-back is applied to the merged tiles, so it stays exact.
    outside = (band_weight(mask > 0, 4) == 0).expand_as(tiled)
    assert outside.any() and torch.equal(tiled[outside], generated[outside])


def test_save_load_round_trip_through_load_fusion(tmp_path) -> None:
    net = _randomize(AlignFusionNet.from_preset("tiny", feather=8, lq_input=True))
    net.save_pretrained(tmp_path / "align")
    loaded = load_fusion(tmp_path / "align")
    assert type(loaded) is AlignFusionNet
    assert loaded.config.feather == 8 and loaded.config.lq_input is True
    generated, prior, mask = _images(1, 20, 24, cover=0.6)
    torch.testing.assert_close(
        loaded.eval().restore(generated, prior, mask, generated),
        net.restore(generated, prior, mask, generated),
        atol=0,
        rtol=0,
    )


# ------------------------------------------------------------------------- triplets


def test_synthetic_triplets_are_reproducible_and_plant_inside_the_mask() -> None:
    gt = _photo(torch.Generator().manual_seed(0), 48)
    cfg = TripletConfig(warp_px=[0.0, 0.0], color_shift=0.0)
    a = synthesize_triplet(gt, torch.Generator().manual_seed(3), cfg)
    b = synthesize_triplet(gt, torch.Generator().manual_seed(3), cfg)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["s1"].shape == a["s2"].shape == (3, 48, 48) and a["mask"].shape == (1, 48, 48)
    m = a["mask"]
    assert 0.05 <= m.mean() <= 0.3 and set(m.unique().tolist()) <= {0.0, 1.0}
    # Without warp and colour shift, I_s2 is GT except in the mask and its soft (0.7 px) edge.
    edge = F.max_pool2d(m[None], 9, stride=1, padding=4)[0]
    assert torch.allclose(a["s2"] * (1 - edge), gt * (1 - edge), atol=1e-6)
    assert _masked_l1(a["s2"], gt, m) > 0.01
    assert 0 < (a["s1"] - gt).abs().mean() < 0.1  # faithful but not identical


def test_triplet_folders(tmp_path) -> None:
    from raim_diffusion.images import save_image

    gen = torch.Generator().manual_seed(0)
    root = tmp_path / "triplets"
    for name in ("a", "b"):
        item = synthesize_triplet(_photo(gen, 40), gen)
        for key in ("s1", "s2", "gt", "mask"):
            save_image(item[key].expand(3, -1, -1)[None], root / key / f"{name}.png")
    assert is_triplet_folder(root) and not is_triplet_folder(root / "gt")
    triplets = find_triplets(root)
    assert [t["gt"].stem for t in triplets] == ["a", "b"] and triplets[0]["mask"] is not None
    data = TripletDataset(triplets, [], 32, seed=1)
    item = data[0]
    assert {k: tuple(v.shape) for k, v in item.items()} == {
        "s1": (3, 32, 32), "s2": (3, 32, 32), "gt": (3, 32, 32), "mask": (1, 32, 32),
    }  # fmt: skip
    assert all(torch.equal(item[k], data[0][k]) for k in item)
    (root / "s2" / "b.png").unlink()
    with pytest.raises(ValueError, match="same file names"):
        find_triplets(root)


def test_synthetic_masks_from_the_detector(tmp_path) -> None:
    from raim_diffusion.images import save_image

    save_image(_photo(torch.Generator().manual_seed(5), 64)[None], tmp_path / "hq" / "a.png")
    files = [tmp_path / "hq" / "a.png"]
    items = {
        source: TripletDataset([], files, 64, TripletConfig(mask_source=source), seed=2)[0]
        for source in ("planted", "detector", "union")
    }
    planted, found, union = (items[k]["mask"] for k in ("planted", "detector", "union"))
    assert torch.equal(items["planted"]["s2"], items["union"]["s2"])  # same triplet, other M
    assert set(found.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(union, torch.maximum(planted, found))
    with pytest.raises(ValueError, match="mask_source"):
        TripletConfig(mask_source="sam").check()


# ------------------------------------------------------------------------- training


@pytest.mark.slow
def test_tiny_model_trained_on_synthetic_triplets_beats_the_generated_image() -> None:
    """A few hundred Adam steps on 24 px synthetic triplets: inside the mask the fused image is
    closer to GT than I_s2 (the input it starts from) is."""
    val = _triplet_batch(torch.Generator().manual_seed(123), 8, 48)
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = AlignFusionNet.from_preset("tiny")
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    with torch.no_grad():
        before = _masked_l1(net(val["s2"], val["s1"], val["mask"]), val["gt"], val["mask"])
    baseline = _masked_l1(val["s2"], val["gt"], val["mask"])
    assert torch.isclose(before, baseline)  # the untrained network returns I_s2
    for _ in range(200):
        batch = _triplet_batch(gen, 3, 24)
        out = net(batch["s2"], batch["s1"], batch["mask"])
        loss = _masked_l1(out, batch["gt"], batch["mask"]) + (out - batch["gt"]).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    after = _masked_l1(net.restore(val["s2"], val["s1"], val["mask"]), val["gt"], val["mask"])
    assert after < 0.75 * baseline, (float(after), float(baseline))


# ------------------------------------------------------------------------- pipeline


def test_pipeline_runs_with_the_alignment_network(tmp_path) -> None:
    from raim_diffusion.pipeline import RaimPipeline
    from raim_diffusion.testing import save_tiny_pipeline, tiny_prior

    pipe = RaimPipeline.from_pretrained(save_tiny_pipeline(tmp_path / "sd15"), prior=tiny_prior(2))
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = dict(output_type="pt", contrast_threshold=1.0, num_inference_steps=4, strength=0.5,
                  upscale=2)
    net = _randomize(AlignFusionNet.from_preset("tiny"))
    pipe.register_modules(fusion=net)
    out = pipe(image, generator=torch.Generator().manual_seed(0), **kwargs)
    assert out.methods["fusion"] == "AlignFusionNet"
    assert out.images.shape == (1, 3, 32, 32) and torch.isfinite(out.images).all()
    expected = net.restore(out.generated_images, out.prior_images, out.masks)
    torch.testing.assert_close(out.images, expected, atol=1e-6, rtol=0)


def test_train_fusion_with_the_tiny_align_preset(tmp_path) -> None:
    from raim_diffusion.cli import main
    from raim_diffusion.images import save_image
    from raim_diffusion.training.align_trainer import AlignFusionTrainer
    from raim_diffusion.training.config import load_train_config
    from raim_diffusion.training.trainer import FusionTrainer

    gen = torch.Generator().manual_seed(0)
    for i in range(2):
        save_image(_photo(gen, 48)[None], tmp_path / "photos" / f"{i}.png")
        item = synthesize_triplet(_photo(gen, 40), gen)
        for key in ("s1", "s2", "gt"):
            save_image(item[key][None], tmp_path / "real" / key / f"{i}.png")
    config = load_train_config(
        "tiny-align", ["data.samples_per_epoch=4", "val_crop_size=32", "val_max_images=1"]
    )
    assert config.model.architecture == "AlignFusionNet" and config.model.preset == "tiny"
    with pytest.raises(ValueError, match="FusionTrainer trains"):
        FusionTrainer(config, tmp_path / "photos", tmp_path / "wrong")
    trainer = AlignFusionTrainer(
        config, [tmp_path / "photos", tmp_path / "real"], tmp_path / "out",
        val_dir=tmp_path / "photos",
    )
    assert len(trainer.dataset.triplets) == 2 and len(trainer.dataset.hq_files) == 2
    result = trainer.train(3)
    assert result.step == 3
    net = load_fusion(result.model_dir)
    assert type(net) is AlignFusionNet
    rows = (tmp_path / "out" / "val_metrics.csv").read_text().splitlines()
    assert rows[0] == "step,psnr,ssim,psnr_s2,ssim_s2" and rows[-1].startswith("3,")
    with pytest.raises(ValueError, match="model.architecture"):
        load_train_config("tiny-align", ["model.architecture=Unet"])
    # `raim train-fusion --config tiny-align` picks the alignment trainer.
    argv = ["train-fusion", "--config", "tiny-align", "--data", str(tmp_path / "real"),
            "--out", str(tmp_path / "cli"), "--max-steps", "2",
            "--set", "data.samples_per_epoch=2"]
    assert main(argv) == 0
    assert type(load_fusion(tmp_path / "cli" / "fusion")) is AlignFusionNet


def test_synthetic_s1_can_be_a_real_priors_output(tmp_path, monkeypatch):
    """triplets.s1_prior: I_s1 is the prior's same-size output on the degraded GT."""
    from PIL import Image
    from skimage import data as skdata

    from raim_diffusion.prior import load_prior
    from raim_diffusion.testing import tiny_prior
    from raim_diffusion.training import degradations
    from raim_diffusion.training.triplets import TripletConfig, TripletDataset

    Image.fromarray(skdata.astronaut()[:80, :80]).save(tmp_path / "a.png")
    tiny_prior(2).save_pretrained(tmp_path / "prior")
    # With the degradation made the identity, I_s1 must be exactly prior(GT) at the GT's size.
    monkeypatch.setattr(degradations.RealESRGANDegradation, "__call__", lambda self, x, g: x)
    item = TripletDataset([], [tmp_path / "a.png"], 48, TripletConfig(
        s1_prior=str(tmp_path / "prior")), hflip=False)[0]
    expected = load_prior(tmp_path / "prior")(item["gt"][None], upscale=1)[0]
    torch.testing.assert_close(item["s1"], expected.clamp(0, 1))
    plain = TripletDataset([], [tmp_path / "a.png"], 48, TripletConfig(), hflip=False)[0]
    assert not torch.allclose(plain["s1"], item["s1"])
