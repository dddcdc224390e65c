"""FusionNet (1x, 7 -> 3 SRFormer) and the stage-4 ``fuse`` entry point."""

from __future__ import annotations

import pytest
import torch

from raim_diffusion.fusion import PRESETS, FusionNet, fuse, make_composite, pyramid_blend


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _randomize(net: FusionNet, seed: int = 0) -> FusionNet:
    """Give every parameter (incl. the zero-initialised residual head) random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return net.eval()


def _inputs(n: int, h: int, w: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lq = torch.rand(n, 3, h, w, generator=gen)
    generated = torch.rand(n, 3, h, w, generator=gen)
    mask = (torch.rand(n, 1, h, w, generator=gen) > 0.6).float()
    return lq, mask, generated


@pytest.mark.parametrize(("preset", "expected"), [("light", 0.851e6), ("base", 10.15e6)])
def test_preset_parameter_counts(preset: str, expected: float) -> None:
    with torch.device("meta"):  # count without allocating or initialising 10M weights
        net = FusionNet.from_preset(preset)
    assert abs(_count(net) - expected) / expected < 0.002
    assert net.config.window_size % 4 == 0


def test_light_preset_is_srformer_light_body() -> None:
    # SRFormer-light x2 (853,272) with the 3->60 conv_first and 60->12 pixelshuffledirect head
    # swapped for a 7->60 conv_first and a 60->3 1x head.
    light_x2 = 853_272
    delta = (7 - 3) * 60 * 9 - (60 * 12 * 9 + 12) + (60 * 3 * 9 + 3)
    assert _count(FusionNet(preset="light")) == light_x2 + delta


def test_presets_and_overrides() -> None:
    assert set(PRESETS) >= {"light", "base", "tiny"}
    net = FusionNet(preset="tiny", embed_dim=24, num_heads=3)
    assert net.config.embed_dim == 24 and net.config.depths == [2]
    assert net.config.preset is None  # resolved values are stored instead
    with pytest.raises(ValueError, match="preset"):
        FusionNet(preset="huge")


def test_untrained_net_returns_the_composite() -> None:
    lq, mask, generated = _inputs(2, 20, 28)
    net = FusionNet.from_preset("tiny").eval()
    comp = make_composite(generated, lq, mask)
    with torch.no_grad():
        torch.testing.assert_close(net(lq, mask, comp), comp, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("h", "w"), [(37, 53), (9, 5), (64, 16)])
def test_forward_shapes_odd_sizes(h: int, w: int) -> None:
    lq, mask, generated = _inputs(2, h, w)
    net = _randomize(FusionNet.from_preset("tiny"))
    with torch.no_grad():
        out = net(lq, mask, make_composite(generated, lq, mask))
        restored = net.restore(lq, mask[:1], generated)
    assert out.shape == (2, 3, h, w) and restored.shape == (2, 3, h, w)
    assert restored.min() >= 0 and restored.max() <= 1


def test_make_composite_is_exact() -> None:
    lq, mask, generated = _inputs(1, 16, 16)
    comp = make_composite(generated, lq, mask)
    inside = mask.bool().expand_as(comp)
    assert torch.equal(comp[inside], lq[inside])
    assert torch.equal(comp[~inside], generated[~inside])


def test_save_load_round_trip(tmp_path) -> None:
    net = _randomize(FusionNet.from_preset("tiny", img_size=32))
    lq, mask, generated = _inputs(1, 24, 40)
    with torch.no_grad():
        before = net.restore(lq, mask, generated)
    net.save_pretrained(tmp_path)
    loaded = FusionNet.from_pretrained(tmp_path).eval()
    assert loaded.config.embed_dim == 16 and loaded.config.img_size == 32
    with torch.no_grad():
        after = loaded.restore(lq, mask, generated)
    assert torch.equal(before, after)
    # the in-memory config alone rebuilds the same architecture
    rebuilt = FusionNet.from_config(net.config)
    shapes = {k: v.shape for k, v in net.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes


def test_tiled_restore() -> None:
    net = _randomize(FusionNet.from_preset("tiny"))
    lq, mask, generated = _inputs(1, 40, 48)
    whole = net.restore(lq, mask, generated)
    assert torch.equal(net.restore(lq, mask, generated, tile=64), whole)  # one tile covers all
    tiled = net.restore(lq, mask, generated, tile=32, overlap=8)
    assert tiled.shape == whole.shape
    # a local network: tiles with context agree with the whole image away from tile borders
    assert (tiled - whole).abs().mean() < 0.05
    # the untrained (zero residual) net is pointwise, so any tiling reproduces it
    fresh = FusionNet.from_preset("tiny").eval()
    torch.testing.assert_close(
        fresh.restore(lq, mask, generated, tile=32, overlap=8),
        make_composite(generated, lq, mask),
        atol=1e-6,
        rtol=0,
    )


def test_fuse_dispatch() -> None:
    lq, mask, generated = _inputs(1, 32, 32)
    prior = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    net = _randomize(FusionNet.from_preset("tiny"))
    assert torch.equal(fuse(generated, prior, lq, mask, net), net.restore(lq, mask, generated))
    blended = fuse(generated, prior, lq, mask, feather=4)
    assert torch.equal(blended, pyramid_blend(generated, prior, mask, feather=4).clamp(0, 1))
    # without a prior the LQ input is the fill
    assert torch.equal(
        fuse(generated, None, lq, mask, feather=4),
        pyramid_blend(generated, lq, mask, feather=4).clamp(0, 1),
    )
    # a smaller LQ input is resized to the output size
    small = lq[..., ::2, ::2]
    up = torch.nn.functional.interpolate(small, size=(32, 32), mode="bicubic").clamp(0, 1)
    assert torch.equal(fuse(generated, prior, small, mask, net), net.restore(up, mask, generated))
    with pytest.raises(ValueError, match="lq_up"):
        fuse(generated, prior, None, mask, net)
    with pytest.raises(ValueError, match="fill"):
        fuse(generated, None, None, mask)


def test_input_validation() -> None:
    net = FusionNet.from_preset("tiny")
    lq, mask, generated = _inputs(2, 16, 16)
    with pytest.raises(ValueError, match="mask"):
        net.restore(lq, mask[:, :, :8], generated)
    with pytest.raises(ValueError, match="lq_up"):
        net.restore(lq[:, :, :8], mask, generated)
    with pytest.raises(ValueError, match="tile"):
        net.restore(lq, mask, generated, tile=0)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    lq, mask, generated = _inputs(1, 24, 24)
    comp = make_composite(generated, lq, mask)
    reference = _randomize(FusionNet.from_preset("tiny", drop_path_rate=0.0))
    grads = []
    for checkpointing in (False, True):
        net = FusionNet.from_config(reference.config)
        net.load_state_dict(reference.state_dict())
        net.train()
        if checkpointing:
            net.enable_gradient_checkpointing()
        net(lq, mask, comp).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_xhs_iag_preset_is_the_reports_srformer():
    """Window 24, embed 360, depths (6,6,6,6,6), heads 6, mlp 3 (NTIRE 2024 RAIM report)."""
    with torch.device("meta"):
        net = FusionNet.from_preset("xhs-iag")
    cfg = net.config
    assert (cfg.window_size, cfg.embed_dim, list(cfg.depths), cfg.num_heads, cfg.mlp_ratio) == (
        24, 360, [6, 6, 6, 6, 6], 6, 3.0
    )
