"""Fusion training end to end on real photos: loss goes down, resume is exact, CLI, export."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from raim_diffusion.fusion.model import FusionNet
from raim_diffusion.training.config import (
    TrainConfig,
    available_configs,
    find_config,
    load_train_config,
)
from raim_diffusion.training.data import EpochSampler, HQImageDataset, pad_to_min_size
from raim_diffusion.training.losses import masked_l1
from raim_diffusion.training.trainer import FusionTrainer, latest_checkpoint

# Small and fast: no VGG (tested in test_training_losses), a narrow discriminator, 32 px crops.
STEPS = 12
FAST = [
    "loss.perceptual=0",
    "loss.style=0",
    "loss.discriminator_channels=8",
    "data.crop_size=32",
    "data.batch_size=2",
    "log_every=1",
    "val_every=0",
]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hq")
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        img = getattr(data, name)()
        Image.fromarray(img[:96, :120]).save(root / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def val_photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("val")
    Image.fromarray(data.immunohistochemistry()[:40, :36]).save(root / "ihc.png")
    return root


def _state(trainer: FusionTrainer) -> dict[str, torch.Tensor]:
    acc = trainer.accelerator
    out = {f"g.{k}": v for k, v in acc.unwrap_model(trainer.generator).state_dict().items()}
    out |= {f"d.{k}": v for k, v in acc.unwrap_model(trainer.disc).state_dict().items()}
    out |= {f"ema.{k}": v for k, v in trainer.ema.state_dict().items()}
    for name, opt in (("og", trainer.opt_g), ("od", trainer.opt_d)):
        for pid, st in opt.state_dict()["state"].items():
            for k, v in st.items():
                out[f"{name}.{pid}.{k}"] = torch.as_tensor(v)
    return out


def test_presets_resolve_and_load() -> None:
    assert {"tiny", "default"} <= set(available_configs())
    assert find_config("tiny").name == "tiny.yaml"
    assert find_config(find_config("default")) == find_config("default")
    tiny = load_train_config("tiny")
    assert isinstance(tiny, TrainConfig)
    assert tiny.model.preset == "tiny" and 32 <= tiny.data.crop_size <= 48
    assert tiny.data.batch_size == 2 and tiny.perceptual.allow_random_weights
    default = load_train_config("default", ["data.batch_size=4"])
    assert default.data.batch_size == 4 and not default.perceptual.allow_random_weights
    with pytest.raises(FileNotFoundError, match="tiny"):
        find_config("no-such-preset")
    with pytest.raises(ValueError, match="mixed_precision"):
        load_train_config("tiny", ["mixed_precision=fp8"])
    with pytest.raises(Exception, match="no_such_key"):
        load_train_config("tiny", ["no_such_key=1"])


def test_dataset_crops_are_reproducible_and_sampler_shards(photos: Path) -> None:
    ds = HQImageDataset(photos, 32, seed=1, length=10)
    assert len(ds) == 10 and ds[0].shape == (3, 32, 32)
    assert torch.equal(ds[3], ds[3])
    ds.set_epoch(1)
    a = ds[3]
    ds.set_epoch(0)
    assert not torch.equal(a, ds[3])
    small = pad_to_min_size(torch.rand(3, 5, 7), 32, 40)
    assert small.shape == (3, 32, 40)
    full = list(EpochSampler(10, 0, 0, num_replicas=2, rank=0, batch_size=2))
    other = list(EpochSampler(10, 0, 0, num_replicas=2, rank=1, batch_size=2))
    assert len(full) == len(other) == 4 and not set(full) & set(other)
    assert (
        list(EpochSampler(10, 0, 0, num_replicas=2, rank=0, batch_size=2, start_batch=1))
        == (full[2:])
    )


def test_training_lowers_the_loss(photos: Path, tmp_path: Path) -> None:
    # A randomly initialised residual head starts far from the target; training must pull the
    # loss on a fixed, held-out set of inputs down.
    cfg = load_train_config(
        "tiny",
        FAST
        + ["model.kwargs={zero_init_residual: false}", "optim.lr_g=2e-3", "loss.adversarial=0"],
    )
    trainer = FusionTrainer(cfg, photos, tmp_path / "out")
    gts = torch.stack([trainer.dataset[i] for i in range(2)])

    def held_out_loss() -> float:
        net = trainer.accelerator.unwrap_model(trainer.generator).eval()
        total = 0.0
        for s in range(2):
            gt, lq, mask, comp = trainer._inputs(gts, 10_000 + s)
            with torch.no_grad():
                hole, valid = masked_l1(net(lq, mask, comp), gt, mask)
            total += float(hole + valid)
        return total / 2

    before = held_out_loss()
    result = trainer.train(max_steps=STEPS)
    after = held_out_loss()
    assert result.step == STEPS
    assert after < 0.7 * before, (before, after)
    with open(tmp_path / "out" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    first = np.mean([float(r["loss"]) for r in rows[:5]])
    last = np.mean([float(r["loss"]) for r in rows[-5:]])
    assert last < first


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(
    photos: Path, val_photos: Path, tmp_path: Path
) -> None:
    # Three batches per epoch, so the run resumes mid-epoch and then crosses an epoch boundary.
    overrides = FAST + [
        "checkpoint_every=2",
        "ema_decay=0.5",
        "val_every=2",
        "data.samples_per_epoch=6",
    ]
    cfg = load_train_config("tiny", overrides)
    straight = FusionTrainer(cfg, photos, tmp_path / "a", val_dir=val_photos)
    straight.train(max_steps=4)

    first = FusionTrainer(cfg, photos, tmp_path / "b", val_dir=val_photos)
    first.train(max_steps=2)
    assert latest_checkpoint(tmp_path / "b").name == "step_00000002"
    with pytest.raises(ValueError, match="resume"):
        FusionTrainer(cfg, photos, tmp_path / "b").train(max_steps=4)
    resumed = FusionTrainer(cfg, photos, tmp_path / "b", val_dir=val_photos)
    result = resumed.train(max_steps=4, resume=True)
    assert result.step == 4

    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The logs of the resumed run are those of the uninterrupted one.
    for name in ("metrics.csv", "val_metrics.csv"):
        ra = (tmp_path / "a" / name).read_text().splitlines()
        rb = (tmp_path / "b" / name).read_text().splitlines()
        strip = [",".join(r.split(",")[:-1]) for r in ra]
        if name == "metrics.csv":  # the last column is wall time
            assert strip == [",".join(r.split(",")[:-1]) for r in rb]
        else:
            assert ra == rb
    assert len(list((tmp_path / "b" / "val" / "step_00000004").glob("*.png"))) == 1

    # The exported EMA generator loads with from_pretrained and equals the trained EMA.
    loaded = FusionNet.from_pretrained(result.model_dir)
    for k, v in resumed.ema.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_cli_train_fusion(photos: Path, val_photos: Path, tmp_path: Path) -> None:
    from raim_diffusion.runner.commands import train_fusion

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    train_fusion.add_parser(sub)
    out = tmp_path / "cli"
    argv = [
        "train-fusion",
        "--data",
        str(photos),
        "--out",
        str(out),
        "--config",
        "tiny",
        "--max-steps",
        "2",
        "--val",
        str(val_photos),
    ]
    for item in FAST:
        argv += ["--set", item]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    assert (out / "fusion" / "config.json").is_file()
    assert latest_checkpoint(out).name == "step_00000002"
    args = parser.parse_args(argv[:-2] + ["--max-steps", "3", "--resume"])
    assert args.func(args) == 0
    assert latest_checkpoint(out).name == "step_00000003"
    # The final model of each run is validated.
    assert len(list((out / "val" / "step_00000002").glob("*.png"))) == 1
    with open(out / "val_metrics.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [2, 3]
    # The trained network is what RaimPipeline's stage 4 runs.
    from raim_diffusion.cli import main
    from raim_diffusion.runner.config import load_config
    from raim_diffusion.runner.restorer import build_restorer

    overrides = [f"fuse.fusion={out / 'fusion'}", "generate.num_inference_steps=2"]
    restorer = build_restorer(load_config("tiny", overrides), device="cpu")
    assert isinstance(restorer.pipe.fusion, FusionNet)
    trained = FusionNet.from_pretrained(out / "fusion")
    for a, b in zip(restorer.pipe.fusion.parameters(), trained.parameters(), strict=True):
        assert torch.equal(a, b)
    restored = tmp_path / "restored"
    assert main(["restore", str(val_photos), "-o", str(restored), "--config", "tiny", "--quiet",
                 *overrides]) == 0
    assert (restored / "ihc.png").is_file()
    bad = parser.parse_args(
        ["train-fusion", "--data", str(photos), "--out", str(out), "--config", "missing-preset"]
    )
    assert bad.func(bad) == 2  # a user error: one line, exit status 2


def test_validation_metrics_are_those_of_raim_eval() -> None:
    from raim_diffusion.metrics import IQAMetrics
    from raim_diffusion.training.validation import ValidationMetrics

    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 3, 40, 36, generator=g)
    b = (a + 0.05 * torch.randn(1, 3, 40, 36, generator=g)).clamp(0, 1)
    ours = ValidationMetrics(("psnr", "ssim"))(b, a)
    ref = IQAMetrics("psnr,ssim", device="cpu")(b, a)
    assert ours == {k: float(v) for k, v in ref.items()}
    assert 20 < ours["psnr"] < 40 and 0 < ours["ssim"] < 1


def test_xhs_iag_fusion_recipe_is_the_reports():
    cfg = load_train_config("xhs-iag")
    assert cfg.model.preset == "xhs-iag" and cfg.data.crop_size == 144
    assert cfg.data.batch_size == 8 and cfg.max_steps == 172000 and cfg.optim.lr_g == 1e-4
    loss = cfg.loss
    assert (loss.valid, loss.hole, loss.perceptual, loss.style, loss.adversarial) == (
        0.3, 0.01, 0.2, 150.0, 0.02
    )
    assert cfg.perceptual.layer_set == "aot" and cfg.perceptual.use_input_norm is False
