"""SRFormer building blocks: permutation, bias index, shift masks, shapes, parameter counts."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from raim_diffusion.fusion.srformer import (
    PSA,
    PABlock,
    SRFormer,
    WindowPlan,
    permute_kv,
    relative_position_index,
    shift_region_labels,
    shifted_window_mask,
    strip_official_buffers,
    window_partition,
    window_reverse,
)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(("upscale", "expected"), [(2, 853_272), (4, 872_748)])
def test_srformer_light_parameter_count(upscale: int, expected: int) -> None:
    model = SRFormer(
        img_size=64,
        in_chans=3,
        embed_dim=60,
        depths=(6, 6, 6, 6),
        num_heads=6,
        window_size=16,
        mlp_ratio=2.0,
        upsampler="pixelshuffledirect",
        upscale=upscale,
    )
    assert _count(model) == expected


def test_official_parameter_names() -> None:
    model = SRFormer(
        embed_dim=16,
        depths=(2,),
        num_heads=2,
        window_size=8,
        upscale=2,
        upsampler="pixelshuffledirect",
    )
    keys = set(model.state_dict())
    for name in (
        "conv_first.weight",
        "patch_embed.norm.weight",
        "layers.0.residual_group.blocks.1.attn.relative_position_bias_table",
        "layers.0.residual_group.blocks.1.attn.kv.weight",
        "layers.0.residual_group.blocks.1.attn.q.weight",
        "layers.0.residual_group.blocks.1.attn.proj.weight",
        "layers.0.residual_group.blocks.0.mlp.fc1.weight",
        "layers.0.residual_group.blocks.0.mlp.dwconv.depthwise_conv.0.weight",
        "layers.0.residual_group.blocks.0.mlp.fc2.weight",
        "layers.0.residual_group.blocks.0.norm2.bias",
        "layers.0.conv.weight",
        "norm.weight",
        "conv_after_body.weight",
        "upsample.0.weight",
    ):
        assert name in keys, name
    # official checkpoints also carry rebuilt buffers; stripping them makes a strict load work
    official = dict(model.state_dict())
    official["layers.0.residual_group.blocks.1.attn_mask"] = torch.zeros(1)
    official["layers.0.residual_group.blocks.1.attn.aligned_relative_position_index"] = torch.zeros(
        1
    )
    model.load_state_dict(strip_official_buffers(official), strict=True)


def test_permute_kv_token_order() -> None:
    ws, c = 4, 8  # C/4 = 2 channels per pixel for keys and for values
    y, x = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
    chan = torch.arange(c // 2)
    # kv value encodes (pixel row, pixel column, channel) = 100 y + 10 x + ch
    kv = (100 * y[..., None] + 10 * x[..., None] + chan).float().reshape(1, 1, ws * ws, c // 2)
    for heads in (1, 2, 4):
        k, v = permute_kv(kv, heads)
        assert k.shape == (1, 1, heads, 4, c // heads)
        k_tok = k[0, 0].transpose(0, 1).reshape(4, c)  # (m, C): heads re-joined
        v_tok = v[0, 0].transpose(0, 1).reshape(4, c)
        for i in range(2):
            for j in range(2):
                want_k = [
                    100 * (2 * i + a) + 10 * (2 * j + b) + ch
                    for a in range(2)
                    for b in range(2)
                    for ch in range(2)
                ]
                want_v = [w + 2 for w in want_k]
                assert k_tok[i * 2 + j].tolist() == want_k
                assert v_tok[i * 2 + j].tolist() == want_v


@pytest.mark.parametrize(("ws", "table_ws"), [(8, 8), (16, 16), (8, 16), (4, 24)])
def test_relative_position_index_formula(ws: int, table_ws: int) -> None:
    index = relative_position_index(ws, table_ws)
    p, big_p = ws // 2, table_ws // 2
    assert index.shape == (ws * ws, p * p)
    for yq in range(ws):
        for xq in range(ws):
            for i in range(p):
                for j in range(p):
                    want = (yq // 2 - i + big_p - 1) * (2 * big_p - 1) + (xq // 2 - j + big_p - 1)
                    assert index[yq * ws + xq, i * p + j] == want
    assert index.min() >= 0 and index.max() < (2 * big_p - 1) ** 2


def _swin_labels(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """Label map built the Swin way: 3x3 slices filled with a running count."""
    labels = torch.zeros(height, width, dtype=torch.long)
    slices = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    cnt = 0
    for hs in slices:
        for wsl in slices:
            labels[hs, wsl] = cnt
            cnt += 1
    return labels


def _windows(labels: torch.Tensor, window: int) -> torch.Tensor:
    h, w = labels.shape
    return (
        labels.view(h // window, window, w // window, window)
        .permute(0, 2, 1, 3)
        .reshape(-1, window * window)
    )


@pytest.mark.parametrize(("height", "width", "ws"), [(16, 16, 8), (16, 24, 8), (48, 32, 16)])
def test_shift_mask_matches_swin_slicing(height: int, width: int, ws: int) -> None:
    s = ws // 2
    q_ref = _windows(_swin_labels(height, width, ws, s), ws)
    k_ref = _windows(_swin_labels(height // 2, width // 2, ws // 2, s // 2), ws // 2)
    q_lab, k_lab = shift_region_labels(height, width, ws, s)
    assert torch.equal(q_lab, q_ref) and torch.equal(k_lab, k_ref)
    ref = torch.where(q_ref[:, :, None] != k_ref[:, None, :], -100.0, 0.0)
    dense = shifted_window_mask(height, width, ws, s)
    assert torch.equal(dense, ref)
    plan = WindowPlan.build(height, width, ws, s)
    assert torch.equal(plan.dense_mask(), dense)
    # only the last window row and column straddle the roll seam, and they come last
    n_rows, n_cols = height // ws, width // ws
    assert plan.mask.shape[0] == n_rows + n_cols - 1
    assert (dense[plan.order[: plan.num_plain]] == 0).all()


@pytest.mark.parametrize("shift", [0, 4])
def test_window_plan_is_roll_then_partition(shift: int) -> None:
    h, w, ws = 16, 24, 8
    x = torch.randn(2, h, w, 3)
    plan = WindowPlan.build(h, w, ws, shift)
    ref = window_partition(torch.roll(x, (-shift, -shift), (1, 2)), ws)  # (B, nW, n, C)
    got = x.reshape(2, h * w, 3).index_select(1, plan.gather).view(2, -1, ws * ws, 3)
    assert torch.equal(got, ref[:, plan.order])
    back = got.view(2, h * w, 3).index_select(1, plan.scatter).view(2, h, w, 3)
    assert torch.equal(back, x)
    assert torch.equal(window_reverse(ref, ws, h, w), torch.roll(x, (-shift, -shift), (1, 2)))


def test_shift_mask_hand_checked_entries() -> None:
    mask = shifted_window_mask(16, 16, 8, 4)  # 2x2 windows; bottom-right window = 3
    assert mask.shape == (4, 64, 16)
    assert (mask[0] == 0).all()
    # query (0,0) of window 3 is pixel (8,8): row/column band 1 -> label 4
    # key token (0,0) is half-res (4,4): bands (1,1) -> label 4 -> allowed
    assert mask[3, 0, 0] == 0
    # key token (3,3) is half-res (7,7): bands (2,2) -> label 8 -> masked
    assert mask[3, 0, 15] == -100
    # query (7,7) of window 3 is pixel (15,15): label 8 -> attends to token (3,3) only region
    assert mask[3, 63, 15] == 0 and mask[3, 63, 0] == -100
    # window 1 (top-right): columns differ at pixel x >= 12 / token j >= 2 (half-res x >= 6)
    assert mask[1, 3, 1] == 0 and mask[1, 3, 3] == -100 and mask[1, 4, 3] == 0


def test_psa_matches_naive_attention() -> None:
    torch.manual_seed(0)
    c, heads, ws = 8, 2, 8
    psa = PSA(c, ws, heads)
    with torch.no_grad():
        psa.relative_position_bias_table.normal_()
    x = torch.randn(1, 6, ws * ws, c)
    plan = WindowPlan.build(16, 24, ws, ws // 2)
    dense = plan.dense_mask()[plan.order]  # in the plan's window order, like x
    p, d = ws // 2, c // heads
    q = psa.q(x) * d**-0.5
    kv = psa.kv(x).view(1, 6, ws, ws, c // 2)
    # explicit token construction: token (i, j) = pixels (2i+a, 2j+b) in (a, b) order
    k = torch.stack(
        [
            torch.cat(
                [kv[:, :, 2 * i + a, 2 * j + b, : c // 4] for a in range(2) for b in range(2)], -1
            )
            for i in range(p)
            for j in range(p)
        ],
        2,
    )
    v = torch.stack(
        [
            torch.cat(
                [kv[:, :, 2 * i + a, 2 * j + b, c // 4 :] for a in range(2) for b in range(2)], -1
            )
            for i in range(p)
            for j in range(p)
        ],
        2,
    )
    bias = torch.empty(heads, ws * ws, p * p)
    for yq in range(ws):
        for xq in range(ws):
            for i in range(p):
                for j in range(p):
                    idx = (yq // 2 - i + p - 1) * (2 * p - 1) + (xq // 2 - j + p - 1)
                    bias[:, yq * ws + xq, i * p + j] = psa.relative_position_bias_table[idx]
    for use_mask in (False, True):
        outs = []
        for hh in range(heads):
            sl = slice(hh * d, (hh + 1) * d)
            scores = q[..., sl] @ k[..., sl].transpose(-1, -2) + bias[hh]
            if use_mask:
                scores = scores + dense
            outs.append(scores.softmax(-1) @ v[..., sl])
        ref = psa.proj(torch.cat(outs, -1))
        got = psa(x, plan.num_plain, plan.mask) if use_mask else psa(x)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_shifted_block_does_not_leak_across_the_roll_seam() -> None:
    torch.manual_seed(0)
    block = PABlock(dim=8, num_heads=2, window_size=8, shift_size=4).eval()
    h = w = 16
    x = torch.randn(1, h * w, 8)
    x2 = x.view(1, h, w, 8).clone()
    x2[:, :2] += 3.0 * torch.randn(1, 2, w, 8)  # top rows: rolled next to the bottom rows
    x2 = x2.view(1, h * w, 8)
    with torch.no_grad():
        y, y2 = block(x, (h, w)), block(x2, (h, w))
        # the bottom rows only see the top rows through the wrap-around: masked away
        bottom = slice(h - 4, h)
        diff = (y - y2).view(1, h, w, 8)[:, bottom].abs().max()
        assert diff < 1e-6
        # control: without the mask the same perturbation is visible there
        plan = WindowPlan.build(h, w, 8, 4)
        no_mask = dataclasses.replace(plan, num_plain=4, mask=None)
        y_nm, y2_nm = block(x, (h, w), no_mask), block(x2, (h, w), no_mask)
        assert (y_nm - y2_nm).view(1, h, w, 8)[:, bottom].abs().max() > 1e-2


def _tiny(**kw) -> SRFormer:
    cfg = {"embed_dim": 16, "depths": (2,), "num_heads": 2, "window_size": 8, "img_size": 32}
    cfg.update(kw)
    return SRFormer(**cfg).eval()


@pytest.mark.parametrize("upsampler", ["", "pixelshuffle", "pixelshuffledirect"])
@pytest.mark.parametrize(("h", "w"), [(37, 53), (5, 7), (1, 2), (8, 40)])
def test_any_input_size(upsampler: str, h: int, w: int) -> None:
    torch.manual_seed(0)
    scale = 1 if upsampler == "" else 2
    model = _tiny(upsampler=upsampler, upscale=scale)
    with torch.no_grad():
        out = model(torch.rand(2, 3, h, w))
    assert out.shape == (2, 3, h * scale, w * scale)
    assert torch.isfinite(out).all()


def test_padded_window_stays_multiple_of_four() -> None:
    model = _tiny(window_size=16)
    assert model.padded_window(37, 53) == 16  # reflect pad to 16 possible
    assert model.padded_window(10, 100) == 16  # official behaviour: pad 6 < 10
    assert model.padded_window(6, 100) == 8  # pad 10 >= 6: smaller window, multiple of 4
    assert model.padded_window(1, 1) == 4
    block = model.layers[0].residual_group.blocks[1]
    assert block.window_and_shift(16, 64) == (16, 0)
    assert block.window_and_shift(32, 64) == (16, 8)
    with pytest.raises(ValueError, match="multiple"):
        block(torch.zeros(1, 12 * 20, 16), (12, 20))


def test_mask_cache_matches_fresh_masks() -> None:
    torch.manual_seed(0)
    model = _tiny()
    assert len(model._plans) == 1  # precomputed for img_size
    x = torch.rand(1, 3, 40, 24)
    with torch.no_grad():
        cached = model(x)
        assert (40, 24, x.device) in model._plans
        # blocks build their own mask when none is handed down
        feat = model.conv_first(x - model.mean)
        tokens = model.patch_embed(feat)
        for layer in model.layers:
            y = layer.residual_group(tokens, (40, 24), None)
            y = layer.conv(y.transpose(1, 2).reshape(1, 16, 40, 24)).flatten(2).transpose(1, 2)
            tokens = y + tokens
        feat2 = model.norm(tokens).transpose(1, 2).reshape(1, 16, 40, 24)
        fresh = x + model.conv_last(model.conv_after_body(feat2) + feat)
    torch.testing.assert_close(cached, fresh, atol=1e-6, rtol=1e-6)


def test_training_step_backward() -> None:
    torch.manual_seed(0)
    model = _tiny(drop_path_rate=0.5).train()
    out = model(torch.rand(2, 3, 24, 24))  # 3x3 windows: the shifted block is masked
    out.mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="window_size"):
        SRFormer(window_size=10)
    with pytest.raises(ValueError, match="upsampler"):
        SRFormer(upsampler="nearest")
    with pytest.raises(ValueError, match="multiple of 4"):
        SRFormer(embed_dim=18, num_heads=2, depths=(1,), window_size=8)
