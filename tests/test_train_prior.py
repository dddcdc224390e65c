"""Prior training (`raim train-prior`), the U-Net discriminator and MiAlgo's refinement head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from raim_diffusion.prior import PriorModel, load_prior
from raim_diffusion.prior.head import RefinementHead
from raim_diffusion.training.config import available_configs, load_prior_train_config
from raim_diffusion.training.degradations import DegradationConfig, RealESRGANDegradation
from raim_diffusion.training.loop import latest_checkpoint
from raim_diffusion.training.losses import UNetDiscriminatorSN, vanilla_gan_loss
from raim_diffusion.training.prior_trainer import PriorTrainer, build_start_prior, train_prior

# Small and fast: a 2-layer Compact, 32 px crops, no validation unless asked.
COMPACT = "{num_in_ch: 3, num_out_ch: 3, num_feat: 8, num_conv: 2, upscale: 1}"
FAST = [
    f"model.kwargs={COMPACT}",
    "data.crop_size=32",
    "data.batch_size=2",
    "log_every=1",
    "val_every=0",
]


def _save(t: torch.Tensor, path: Path) -> None:
    arr = (t[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """Real photos, Real-ESRGAN-degraded (mildly) at 1x: lq/, gt/ and held-out vlq/, vgt/."""
    root = tmp_path_factory.mktemp("pairs")
    for sub in ("lq", "gt", "vlq", "vgt"):
        (root / sub).mkdir()
    mild = DegradationConfig(
        noise_range=[1.0, 8.0], noise_range2=[1.0, 5.0], jpeg_range=[70, 95],
        jpeg_range2=[70, 95], poisson_scale_range=[0.05, 0.5], poisson_scale_range2=[0.05, 0.5],
    )  # fmt: skip
    degrade = RealESRGANDegradation(mild)
    for i, name in enumerate(("astronaut", "chelsea", "coffee", "rocket")):
        img = torch.from_numpy(getattr(data, name)()[:64, :80].copy()).permute(2, 0, 1)
        gt = img[None].float() / 255
        lq = degrade(gt, torch.Generator().manual_seed(i))
        prefix = "v" if i == 3 else ""
        _save(gt, root / f"{prefix}gt" / f"{name}.png")
        _save(lq, root / f"{prefix}lq" / f"{name}.png")
    return root


def _state(trainer: PriorTrainer) -> dict[str, torch.Tensor]:
    acc = trainer.accelerator
    out = {f"g.{k}": v for k, v in acc.unwrap_model(trainer.generator).state_dict().items()}
    if trainer.disc is not None:
        out |= {f"d.{k}": v for k, v in acc.unwrap_model(trainer.disc).state_dict().items()}
    out |= {f"ema.{k}": v for k, v in trainer.ema.state_dict().items()}
    for name, opt in (("og", trainer.opt_g), ("od", trainer.opt_d)):
        if opt is None:
            continue
        for pid, st in opt.state_dict()["state"].items():
            for k, v in st.items():
                out[f"{name}.{pid}.{k}"] = torch.as_tensor(v)
    return out


# ------------------------------------------------------------------------------- head, disc


def test_refinement_head_alpha_range_and_identity() -> None:
    head = RefinementHead()
    g = torch.Generator().manual_seed(0)
    lr, out = torch.rand(2, 3, 12, 10, generator=g), torch.rand(2, 3, 12, 10, generator=g)
    for p in head.parameters():
        p.data.normal_(0, 3, generator=g)
    alpha = head.alpha(lr, out)
    assert alpha.shape == (2, 1, 12, 10) and alpha.min() >= 0 and alpha.max() <= 1
    assert alpha.std() > 0.01  # per pixel, not a constant
    with torch.no_grad():
        head.conv3.weight.zero_()
        head.conv3.bias.fill_(-1e4)  # alpha = 0 exactly
    assert torch.equal(head(lr, out), lr)
    with pytest.raises(ValueError, match="same shape"):
        head(lr, out[..., :5])
    # A fresh head keeps most of the restoration.
    fresh = RefinementHead(init_alpha=0.9)
    assert torch.allclose(fresh.alpha(lr, out), torch.full((2, 1, 12, 10), 0.9))


def test_prior_model_applies_saves_and_loads_its_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    prior = PriorModel.from_architecture("Compact", num_feat=8, num_conv=2, upscale=1)
    x = torch.rand(1, 3, 16, 16)
    plain = prior(x)
    head = RefinementHead(init_alpha=0.5)
    prior.set_head(head)
    blended = prior(x)
    assert torch.allclose(blended, (0.5 * x + 0.5 * plain).clamp(0, 1), atol=1e-5)
    prior.save_pretrained(tmp_path / "p")
    loaded = load_prior(tmp_path / "p")
    assert loaded.head is not None and torch.allclose(loaded(x), blended, atol=1e-6)
    assert load_prior([tmp_path / "p", tmp_path / "p"]).head is None  # not for ensembles
    prior.set_head(None)
    prior.save_pretrained(tmp_path / "q")
    assert load_prior(tmp_path / "q").head is None


def test_unet_discriminator_sn() -> None:
    torch.manual_seed(0)
    disc = UNetDiscriminatorSN(base_channels=8)
    x = torch.rand(2, 3, 32, 40)
    logits = disc(x)
    assert logits.shape == (2, 1, 32, 40)
    sn = [n for n, _ in disc.named_parameters() if "parametrizations" in n]
    assert len(sn) == 8  # conv1..conv8 carry spectral norm, conv0 and conv9 do not
    assert disc.conv0.bias is not None and disc.conv9.bias is not None
    loss = vanilla_gan_loss(logits, True) + vanilla_gan_loss(logits, False)
    loss.backward()
    assert all(p.grad is not None for p in disc.parameters())
    with pytest.raises(ValueError, match="divisible by 8"):
        disc(torch.rand(1, 3, 30, 32))


def test_presets_load() -> None:
    assert {"tiny", "xhs-iag-gan", "mialgo", "hit-iil"} <= set(available_configs("prior"))
    xhs = load_prior_train_config("xhs-iag-gan")
    assert xhs.model.architecture == "SRFormer" and xhs.model.kwargs["window_size"] == 32
    assert xhs.phases[0].start == 92000 and xhs.phases[0].gan == 0.05
    assert not xhs.perceptual.use_input_norm
    mialgo = load_prior_train_config("mialgo")
    assert mialgo.model.head and mialgo.loss.pixel_type == "l2" and mialgo.data.weak_ratio == 0.2
    assert [p.lpips for p in mialgo.phases] == [None, 4.0]
    assert load_prior_train_config("hit-iil").phases[0].lpips > 0
    with pytest.raises(ValueError, match="exactly one"):
        load_prior_train_config("tiny", ["model.weights=x.pth"])
    init = load_prior_train_config("tiny", init="realesrgan-x4plus")
    assert init.model.architecture is None and init.model.weights == "realesrgan-x4plus"


# ------------------------------------------------------------------------------- training


def test_training_beats_the_starting_point_and_reloads(pairs: Path, tmp_path: Path) -> None:
    result = train_prior(
        tmp_path / "out", "tiny",
        lq=pairs / "lq", gt=pairs / "gt", val_lq=pairs / "vlq", val_gt=pairs / "vgt",
        overrides=FAST + ["optim.lr_g=3e-3", "optim.warmup_steps=0"], max_steps=40,
    )  # fmt: skip
    before, after = result.first_val_metrics, result.val_metrics
    assert after["psnr"] > before["psnr"] + 1, (before, after)
    assert "ssim" in after and "psnr_input" in after
    prior = load_prior(result.model_dir)
    assert prior.descriptors[0].architecture.id == "Compact" and prior.scale == 1
    log = (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 40 + 2  # one row per step, plus the two validations


@pytest.mark.parametrize(
    "arch, kwargs",
    [
        # Real-ESRGAN x1: pixel-unshuffle by 4, then the x4 body (spandrel's convention)
        ("ESRGAN", {"in_nc": 48, "num_filters": 8, "num_blocks": 1, "scale": 4,
                    "shuffle_factor": 4}),  # fmt: skip
        ("Compact", {"num_feat": 8, "num_conv": 2, "upscale": 1}),
    ],
)
def test_x1_rrdbnet_and_compact_train_with_head_and_reload(
    pairs: Path, tmp_path: Path, arch: str, kwargs: dict
) -> None:
    cfg = load_prior_train_config("tiny", FAST + ["model.head=true"])
    # In Python the architecture is replaced outright (dot-list overrides of a dict merge).
    cfg.model.architecture, cfg.model.kwargs = arch, kwargs
    result = train_prior(
        tmp_path / arch, cfg, lq=pairs / "lq", gt=pairs / "gt", data=pairs / "gt", max_steps=2
    )
    prior = load_prior(result.model_dir)
    assert prior.descriptors[0].architecture.id == arch and prior.native_scale == 1
    assert prior.head is not None
    y = prior(torch.rand(1, 3, 24, 20))
    assert y.shape == (1, 3, 24, 20)


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(pairs: Path, tmp_path: Path) -> None:
    # Mixed paired + synthetic data, a GAN phase starting mid-run, 3 batches per epoch: the
    # resume crosses the phase switch and an epoch boundary.
    overrides = FAST + [
        "checkpoint_every=2",
        "ema_decay=0.5",
        "data.samples_per_epoch=6",
        "loss.discriminator_channels=8",
        "phases=[{start: 3, gan: 0.1, lr_g: 5e-4, paired_ratio: 1.0}]",
    ]
    cfg = load_prior_train_config("tiny", overrides)
    kw = {"lq_dir": pairs / "lq", "gt_dir": pairs / "gt", "hq_dirs": pairs / "gt"}
    straight = PriorTrainer(cfg, tmp_path / "a", **kw)
    straight.train(max_steps=5)
    first = PriorTrainer(cfg, tmp_path / "b", **kw)
    first.train(max_steps=2)
    assert latest_checkpoint(tmp_path / "b").name == "step_00000002"
    with pytest.raises(ValueError, match="resume"):
        PriorTrainer(cfg, tmp_path / "b", **kw).train(max_steps=5)
    resumed = PriorTrainer(cfg, tmp_path / "b", **kw)
    assert resumed.train(max_steps=5, resume=True).step == 5
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys() and any(k.startswith("od.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    def logged(run: str) -> list[str]:  # without the wall-time columns
        rows = (tmp_path / run / "metrics.csv").read_text().split()
        return [row.rsplit(",", 2)[0] for row in rows]

    assert logged("a") == logged("b")
    pa, pb = load_prior(tmp_path / "a" / "prior"), load_prior(tmp_path / "b" / "prior")
    for (ka, va), (kb, vb) in zip(pa.state_dict().items(), pb.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_scale_mismatch_is_handled_for_rrdbnet_and_refused_otherwise(
    pairs: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    x4 = PriorModel.from_architecture("ESRGAN", num_filters=8, num_blocks=2, scale=4)
    x4.save_pretrained(tmp_path / "x4")
    cfg = load_prior_train_config("tiny", init=tmp_path / "x4")
    with pytest.raises(ValueError, match="model.scale=1"):
        PriorTrainer(cfg, tmp_path / "o", lq_dir=pairs / "lq", gt_dir=pairs / "gt")
    cfg.model.scale = 1
    x1 = build_start_prior(cfg.model)
    assert x1.native_scale == 1 and x1.descriptors[0].architecture.id == "ESRGAN"
    assert x1.members[0].shuffle_factor == 4
    source, target = x4.members[0].state_dict(), x1.members[0].state_dict()
    reused = [k for k in target if k in source and source[k].shape == target[k].shape]
    assert len(reused) == len(target) - 1  # all but the first convolution
    assert all(torch.equal(source[k], target[k]) for k in reused)
    # The first convolution sees the unshuffled channels: x1 on x equals x4 on the box-downscaled
    # x, up to the body's 3x3 kernels now working at a quarter of the resolution.
    w1, w4 = target["model.0.weight"], source["model.0.weight"]
    assert w1.shape[1] == 48 and torch.allclose(w1[:, :16].sum(1), w4[:, 0])
    compact = PriorModel.from_architecture("Compact", num_feat=8, num_conv=2, upscale=4)
    compact.save_pretrained(tmp_path / "c4")
    cfg = load_prior_train_config("tiny", ["model.scale=1"], init=tmp_path / "c4")
    with pytest.raises(ValueError, match="cannot be fine-tuned at model.scale=1"):
        build_start_prior(cfg.model)


def test_cli_train_prior_and_restore(pairs: Path, tmp_path: Path, capsys) -> None:
    from raim_diffusion.cli import main

    out = tmp_path / "cli"
    argv = ["train-prior", "--out", str(out), "--config", "tiny", "--lq", str(pairs / "lq"),
            "--gt", str(pairs / "gt"), "--max-steps", "2", *FAST]  # fmt: skip
    assert main(argv) == 0
    assert main(argv[:-len(FAST) - 2] + ["--max-steps", "3", "--resume", *FAST]) == 0
    assert latest_checkpoint(out).name == "step_00000003"
    restored = tmp_path / "restored"
    assert main(["restore", str(pairs / "vlq"), "-o", str(restored), "--config", "prior-only",
                 "--prior", str(out / "prior"), "--quiet"]) == 0  # fmt: skip
    assert (restored / "rocket.png").is_file()
    capsys.readouterr()
    assert main(["train-prior", "--out", str(tmp_path / "x"), "--config", "nope"]) == 2
    assert main(["train-prior", "--out", str(tmp_path / "x"), "--lq", str(pairs / "lq"),
                 "--gt", str(pairs / "gt"), "--init", "realesrgan-x4plus"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("raim train-prior: error:") for line in err)
    assert "model.scale" in err[1]


def test_niqe_patch_selection_keeps_the_best_scored_crop(tmp_path):
    """MiAlgo's selection: of K candidate crops, the one with the lowest score is returned;
    K = 1 is the plain random crop, unchanged."""
    from raim_diffusion.training.data import PairedCropDataset

    img = np.zeros((64, 64, 3), np.uint8)
    img[:, 32:] = (np.random.default_rng(0).random((64, 32, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "half.png")
    files = [tmp_path / "half.png"]
    # score = mean brightness: the selection must prefer the darkest (flat, left) crops
    darkest = PairedCropDataset([], files, 16, niqe_candidates=8, seed=3,
                                patch_scorer=lambda c: c.mean(dim=(1, 2, 3)), hflip=False)
    plain = PairedCropDataset([], files, 16, seed=3, hflip=False)
    picked = torch.stack([darkest[i]["gt"].mean() for i in range(8)])
    random = torch.stack([plain[i]["gt"].mean() for i in range(8)])
    assert picked.mean() < random.mean()
    # K = 1 keeps today's crops (resumed runs and old configs reproduce).
    assert torch.equal(PairedCropDataset([], files, 16, seed=3, niqe_candidates=1,
                                         hflip=False)[0]["gt"], plain[0]["gt"])
    with pytest.raises(ValueError, match="niqe_candidates"):
        PairedCropDataset([], files, 16, niqe_candidates=0)


def test_niqe_patch_selection_prefers_sharp_photo_crops(tmp_path, monkeypatch):
    """With pyiqa's NIQE (the default scorer): a photo whose left half is blurred away gives
    crops from the sharp half."""
    import shutil

    from tests.test_metrics import NIQE_PARAMS

    if not NIQE_PARAMS.is_file():
        pytest.skip(f"no NIQE parameters at {NIQE_PARAMS}")
    pytest.importorskip("pyiqa")
    home = tmp_path / "th"
    (home / "hub" / "pyiqa").mkdir(parents=True)
    shutil.copy(NIQE_PARAMS, home / "hub" / "pyiqa" / "niqe_modelparameters.mat")
    monkeypatch.setenv("TORCH_HOME", str(home))
    from PIL import ImageFilter

    from raim_diffusion.training.data import PairedCropDataset

    photo = Image.fromarray(data.astronaut()).resize((384, 192))
    blurred = photo.filter(ImageFilter.GaussianBlur(6))
    photo.paste(blurred.crop((0, 0, 192, 192)), (0, 0))
    photo.save(tmp_path / "half.png")
    ds = PairedCropDataset([], [tmp_path / "half.png"], 96, niqe_candidates=6, seed=1,
                           hflip=False)
    sharp_side = 0
    for i in range(4):
        crop = ds[i]["gt"]
        whole = torch.from_numpy(np.asarray(photo)).permute(2, 0, 1).float() / 255
        # where the crop came from: compare with the two halves' statistics
        right = whole[:, :, 192:]
        sharp_side += int(any(torch.allclose(crop, right[:, t:t + 96, x:x + 96], atol=1e-6)
                              for t in range(0, 97) for x in range(0, 97)))
    assert sharp_side >= 3
