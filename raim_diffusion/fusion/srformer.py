"""SRFormer: permuted self-attention (PSA) transformer for image restoration.

Written from the paper (Zhou et al., "SRFormer: Permuted Self-Attention for Single Image
Super-Resolution", ICCV 2023, arXiv:2303.09735). Parameter names follow the
official implementation (``conv_first``, ``layers.{i}.residual_group.blocks.{j}.attn.kv`` ...),
so official checkpoints load after [`strip_official_buffers`] removes the buffers that the
official code stores in its state dict (attention masks and index tables, which are rebuilt here).

Notation used in the shape comments:

- ``B``: batch, ``C``: channels, ``h``: heads, ``d = C / h``: head width,
- ``ws``: window side (a multiple of 4), ``n = ws * ws`` query tokens per window,
- ``p = ws / 2`` and ``m = p * p = n / 4`` key/value tokens per window,
- ``nW``: windows per image.

One deliberate difference from the official code: the key labels of the shifted-window mask use
the Swin 3x3 slicing at half resolution with window ``p`` and shift ``s / 2`` (as the spec says).
The official code slices the key map with the full shift, which lets a few queries next to the
wrap-around seam attend to rolled-in keys.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import pad_to_multiple

RGB_MEAN = (0.4488, 0.4371, 0.4040)
UPSAMPLERS = ("", "pixelshuffle", "pixelshuffledirect")
MASK_VALUE = -100.0
_MAX_CACHED_PLANS = 8


# --------------------------------------------------------------------------------------------
# Window helpers
# --------------------------------------------------------------------------------------------


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Split ``(B, H, W, C)`` into windows ``(B, nW, ws * ws, C)`` (row-major inside a window)."""
    b, height, width, c = x.shape
    ws = window_size
    x = x.view(b, height // ws, ws, width // ws, ws, c)
    # (B, H/ws, W/ws, ws, ws, C): windows in raster order, pixels row-major inside
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, -1, ws * ws, c)


def window_reverse(
    windows: torch.Tensor, window_size: int, height: int, width: int
) -> torch.Tensor:
    """Inverse of [`window_partition`]: ``(B, nW, ws * ws, C)`` -> ``(B, H, W, C)``."""
    b, _, _, c = windows.shape
    ws = window_size
    x = windows.view(b, height // ws, width // ws, ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, height, width, c)


def _band_labels(length: int, window: int, shift: int, device: torch.device | None) -> torch.Tensor:
    """Swin's 3-way slicing of one axis of a rolled map: ``[0, L-ws) | [L-ws, L-s) | [L-s, L)``."""
    idx = torch.arange(length, device=device)
    return (idx >= length - window).long() + (idx >= length - shift).long()


def shift_region_labels(
    height: int, width: int, window_size: int, shift_size: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Region labels of the queries and the permuted keys of every shifted window.

    Args:
        height (`int`): Feature map height (a multiple of ``window_size``).
        width (`int`): Feature map width (a multiple of ``window_size``).
        window_size (`int`): Query window side ``ws`` (a multiple of 4).
        shift_size (`int`): Cyclic shift ``s`` of the full-resolution map (even, ``0 < s < ws``).
        device (`torch.device`, *optional*): Where to build the labels.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: query labels ``(nW, n)`` from the full-resolution map
        (window ``ws``, shift ``s``) and key labels ``(nW, m)`` from the half-resolution map
        (window ``ws / 2``, shift ``s / 2``); a label is ``3 * row_band + column_band``.
    """
    p, half_shift = window_size // 2, shift_size // 2
    q_lab = (
        _band_labels(height, window_size, shift_size, device)[:, None] * 3
        + _band_labels(width, window_size, shift_size, device)[None, :]
    )
    k_lab = (
        _band_labels(height // 2, p, half_shift, device)[:, None] * 3
        + _band_labels(width // 2, p, half_shift, device)[None, :]
    )
    q_win = window_partition(q_lab[None, :, :, None], window_size)[0, :, :, 0]  # (nW, n)
    k_win = window_partition(k_lab[None, :, :, None], p)[0, :, :, 0]  # (nW, m)
    return q_win, k_win


def shifted_window_mask(
    height: int, width: int, window_size: int, shift_size: int, device: torch.device | None = None
) -> torch.Tensor:
    """Additive attention mask ``(nW, n, m)`` of shifted permuted windows: 0 or -100.

    A query and a key token may attend to each other only when they come from the same region
    of the un-rolled map (``-100`` where their labels from [`shift_region_labels`] differ).
    """
    q_win, k_win = shift_region_labels(height, width, window_size, shift_size, device)
    differ = q_win[:, :, None] != k_win[:, None, :]
    return torch.zeros(differ.shape, device=device).masked_fill(differ, MASK_VALUE)


@dataclass
class WindowPlan:
    """How a ``H x W`` token map is cut into (shifted) windows, and the shift mask.

    The cyclic roll and the window partition are one gather of tokens (``gather``), undone by
    ``scatter``. Windows are ordered *interior first*: Swin-style masks are zero except in the
    last window row and column, so the first ``num_plain`` windows need only the position bias
    and the remaining ones bias + ``mask``. Both groups are contiguous slices (no copies) and
    the mask costs ``O(boundary windows * n * m)`` memory instead of ``O(nW * n * m)``.
    """

    window_size: int
    shift_size: int
    gather: torch.Tensor  # (HW,) source token of every windowed slot
    scatter: torch.Tensor  # (HW,) inverse permutation
    order: torch.Tensor  # (nW,) raster index of the k-th window
    num_plain: int  # windows without a mask come first
    mask: torch.Tensor | None  # (nW - num_plain, n, m), 0 / -100, or None

    @classmethod
    def build(
        cls,
        height: int,
        width: int,
        window_size: int,
        shift_size: int = 0,
        device: torch.device | None = None,
    ) -> WindowPlan:
        """Plan for a ``height x width`` map (multiples of ``window_size``)."""
        ws, s = window_size, shift_size
        # rolling by -s: rolled[y, x] = original[(y + s) % H, (x + s) % W]
        rows = (torch.arange(height, device=device) + s) % height
        cols = (torch.arange(width, device=device) + s) % width
        source = rows[:, None] * width + cols[None, :]
        windows = window_partition(source[None, :, :, None], ws)[0, :, :, 0]  # (nW, n)
        if s:
            q_win, k_win = shift_region_labels(height, width, ws, s, device)
            mixed = (q_win != q_win[:, :1]).any(1) | (k_win != q_win[:, :1]).any(1)
        else:
            mixed = torch.zeros(windows.shape[0], dtype=torch.bool, device=device)
        order = torch.cat([(~mixed).nonzero().flatten(), mixed.nonzero().flatten()])
        gather = windows[order].reshape(-1)
        scatter = torch.empty_like(gather)
        scatter[gather] = torch.arange(gather.numel(), device=device)
        mask = None
        if mixed.any():
            boundary = order[int((~mixed).sum()) :]
            differ = q_win[boundary][:, :, None] != k_win[boundary][:, None, :]
            mask = torch.zeros(differ.shape, device=device).masked_fill(differ, MASK_VALUE)
        return cls(ws, s, gather, scatter, order, int((~mixed).sum()), mask)

    def dense_mask(self) -> torch.Tensor:
        """The full ``(nW, n, m)`` mask in raster window order (for inspection and tests)."""
        n = self.window_size**2
        out = torch.zeros(self.order.numel(), n, n // 4, device=self.order.device)
        if self.mask is not None:
            out[self.order[self.num_plain :]] = self.mask
        return out


def relative_position_index(window_size: int, table_window_size: int | None = None) -> torch.Tensor:
    """Bias-table index ``(n, m)`` between query pixels and permuted key tokens.

    For a query pixel ``(y, x)`` and key token ``(i, j)`` of a window with ``p = ws / 2``, and a
    table built for ``P = table_window_size / 2`` (``P >= p``):
    ``index = (y // 2 - i + P - 1) * (2P - 1) + (x // 2 - j + P - 1)``.
    """
    table_window_size = table_window_size or window_size
    p, big_p = window_size // 2, table_window_size // 2
    pix = torch.arange(window_size) // 2  # query pixel -> its 2x2 block coordinate
    tok = torch.arange(p)
    dy = pix[:, None, None, None] - tok[None, None, :, None] + big_p - 1  # (ws, 1, p, 1)
    dx = pix[None, :, None, None] - tok[None, None, None, :] + big_p - 1  # (1, ws, 1, p)
    return (dy * (2 * big_p - 1) + dx).reshape(window_size * window_size, p * p)


def permute_kv(kv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatially permute compressed key/value windows into half-resolution tokens.

    Args:
        kv (`torch.Tensor`): ``(B, nW, n, C/2)`` output of the kv projection; the first ``C/4``
            channels of a pixel are its key part, the last ``C/4`` its value part.
        num_heads (`int`): Heads ``h``.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: keys and values ``(B, nW, h, m, d)``. Token
        ``(i, j)`` concatenates the ``C/4`` channels of pixels ``(2i+a, 2j+b)`` in the order
        ``(a, b) = (0,0), (0,1), (1,0), (1,1)``; heads are contiguous ``d``-chunks of that vector.
    """
    b, nw, n, half = kv.shape
    ws = math.isqrt(n)
    p, quarter = ws // 2, half // 2
    kv = kv.view(b, nw, p, 2, p, 2, 2, quarter)  # (B, nW, i, a, j, b, k|v, C/4)
    kv = kv.permute(6, 0, 1, 2, 4, 3, 5, 7)  # (k|v, B, nW, i, j, a, b, C/4)
    kv = kv.reshape(2, b, nw, n // 4, num_heads, 4 * quarter // num_heads)  # (2, B, nW, m, h, d)
    k, v = kv.transpose(3, 4).unbind(0)
    return k, v


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep) / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class DWConv(nn.Module):
    """Depth-wise 5x5 convolution + GELU applied to a token sequence."""

    def __init__(self, hidden_features: int) -> None:
        super().__init__()
        self.depthwise_conv = nn.Sequential(
            nn.Conv2d(hidden_features, hidden_features, 5, 1, 2, groups=hidden_features),
            nn.GELU(),
        )

    def forward(self, x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
        return image_to_tokens(self.depthwise_conv(tokens_to_image(x, x_size)))


class ConvFFN(nn.Module):
    """fc1 -> GELU -> ``z + DWConv(z)`` -> fc2 (the conv gives the FFN local spatial mixing)."""

    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.dwconv = DWConv(hidden_features)
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
        z = self.act(self.fc1(x))  # (B, HW, rC)
        z = z + self.dwconv(z, x_size)
        return self.fc2(z)  # (B, HW, C)


class PSA(nn.Module):
    """Permuted self-attention inside windows.

    Queries keep full resolution; keys and values are channel-compressed to ``C / 4`` each and
    every 2x2 pixel block is merged into one token, so attention is ``n x n/4`` per window.

    Args:
        dim (`int`): Channels ``C`` (a multiple of 4 and of ``num_heads``).
        window_size (`int`): Window side the bias table is built for (a multiple of 4).
        num_heads (`int`): Attention heads.
        qkv_bias (`bool`, *optional*, defaults to `True`): Bias in the q and kv projections.
        qk_scale (`float`, *optional*): Query scale; defaults to ``d ** -0.5``.
    """

    def __init__(
        self,
        dim: int,
        window_size: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
    ) -> None:
        super().__init__()
        if dim % 4 or dim % num_heads:
            raise ValueError(f"dim must be a multiple of 4 and of num_heads={num_heads}, got {dim}")
        if window_size % 4 or window_size <= 0:
            raise ValueError(f"window_size must be a positive multiple of 4, got {window_size}")
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        p = window_size // 2
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * p - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer(
            "relative_position_index", relative_position_index(window_size), persistent=False
        )
        self.kv = nn.Linear(dim, dim // 2, bias=qkv_bias)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self._index_cache: dict[tuple[int, torch.device], torch.Tensor] = {}

    def position_bias(self, window_size: int) -> torch.Tensor:
        """Relative position bias ``(h, n, m)`` for a window of side ``window_size``."""
        if window_size == self.window_size:
            index = self.relative_position_index
        else:
            # A smaller window (small inputs) reads the centre of the same table.
            key = (window_size, self.relative_position_bias_table.device)
            if key not in self._index_cache:
                self._index_cache[key] = relative_position_index(window_size, self.window_size).to(
                    key[1]
                )
            index = self._index_cache[key]
        n, m = index.shape
        bias = self.relative_position_bias_table[index.reshape(-1)].view(n, m, -1)
        return bias.permute(2, 0, 1)  # (h, n, m)

    def forward(
        self, x: torch.Tensor, num_plain: int | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attend inside windows.

        Args:
            x (`torch.Tensor`): Windows ``(B, nW, n, C)``, pixels row-major inside a window.
            num_plain (`int`, *optional*): The first ``num_plain`` windows use the position
                bias only; defaults to all windows when ``mask`` is None.
            mask (`torch.Tensor`, *optional*): ``(nW - num_plain, n, m)`` additive mask of the
                remaining windows (see [`WindowPlan`]).

        Returns:
            `torch.Tensor`: ``(B, nW, n, C)``.
        """
        b, nw, n, c = x.shape
        h = self.num_heads
        d = c // h
        if mask is None:
            num_plain = nw
        elif num_plain is None or mask.shape[0] != nw - num_plain:
            raise ValueError(f"mask {tuple(mask.shape)} must cover windows {num_plain}..{nw}")

        q = self.q(x).view(b, nw, n, h, d).transpose(2, 3)  # (B, nW, h, n, d)
        k, v = permute_kv(self.kv(x), h)  # (B, nW, h, m, d) each
        # (1, h, n, m): a 4-D mask keeps SDPA on its fused kernels (a 3-D one falls back to the
        # unfused math path on CPU)
        bias = self.position_bias(math.isqrt(n)).to(q.dtype)[None]

        outs = []
        for lo, hi, extra in ((0, num_plain, None), (num_plain, nw, mask)):
            if hi == lo:
                continue
            attn_mask = bias
            if extra is not None:
                # (B * nb, h, n, m): only the seam windows pay for a per-window mask
                attn_mask = bias + extra[:, None].to(q.dtype)
                attn_mask = attn_mask.expand(b, -1, -1, -1, -1).reshape(-1, h, n, n // 4)
            out = F.scaled_dot_product_attention(
                q[:, lo:hi].flatten(0, 1),
                k[:, lo:hi].flatten(0, 1),
                v[:, lo:hi].flatten(0, 1),
                attn_mask=attn_mask,
                scale=self.scale,
            )  # (B * g, h, n, d)
            outs.append(out.view(b, hi - lo, h, n, d).transpose(2, 3).reshape(b, hi - lo, n, c))
        return self.proj(outs[0] if len(outs) == 1 else torch.cat(outs, dim=1))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}"


class PABlock(nn.Module):
    """Permuted-attention block (pre-norm).

    ``x += DropPath(PSA(LN x))`` then ``x += DropPath(ConvFFN(LN x))``.

    Args:
        dim (`int`): Channels.
        num_heads (`int`): Attention heads.
        window_size (`int`): Window side (a multiple of 4).
        shift_size (`int`): Cyclic shift (0 or ``window_size // 2``).
        mlp_ratio (`float`): Hidden width of the ConvFFN relative to ``dim``.
        qkv_bias (`bool`): Bias in the attention projections.
        qk_scale (`float`, *optional*): Override of the query scale.
        drop_path (`float`): Stochastic depth rate.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int = 0,
        mlp_ratio: float = 2.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0 <= shift_size < window_size or shift_size % 2:
            raise ValueError(
                f"shift_size must be even and in [0, window_size={window_size}), got {shift_size}"
            )
        self.window_size, self.shift_size = window_size, shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = PSA(dim, window_size, num_heads, qkv_bias, qk_scale)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio))

    def window_and_shift(self, height: int, width: int) -> tuple[int, int]:
        """Window and shift used for a ``height x width`` map (no shift when one window fits)."""
        if min(height, width) <= self.window_size:
            return min(height, width), 0
        return self.window_size, self.shift_size

    def forward(
        self, x: torch.Tensor, x_size: tuple[int, int], plan: WindowPlan | None = None
    ) -> torch.Tensor:
        """Apply the block.

        Args:
            x (`torch.Tensor`): Tokens ``(B, H * W, C)``.
            x_size (`tuple[int, int]`): ``(H, W)``, multiples of the window (see
                [`PABlock.window_and_shift`]).
            plan (`WindowPlan`, *optional*): Precomputed windows for this size and this block's
                shift; built here when missing.

        Returns:
            `torch.Tensor`: ``(B, H * W, C)``.
        """
        height, width = x_size
        b, _, c = x.shape
        ws, shift = self.window_and_shift(height, width)
        if ws % 4 or height % ws or width % ws:
            raise ValueError(
                f"feature map {height}x{width} must be a multiple of the window {ws}, "
                "itself a multiple of 4; pad the input (SRFormer.forward does)"
            )
        if plan is None:
            plan = WindowPlan.build(height, width, ws, shift, x.device)
        elif (plan.window_size, plan.shift_size) != (ws, shift):
            raise ValueError(
                f"plan for window/shift {plan.window_size}/{plan.shift_size} given to a block "
                f"that needs {ws}/{shift} at {height}x{width}"
            )

        y = self.norm1(x).index_select(1, plan.gather).view(b, -1, ws * ws, c)  # (B, nW, n, C)
        y = self.attn(y, plan.num_plain, plan.mask)
        y = y.view(b, height * width, c).index_select(1, plan.scatter)  # (B, HW, C)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x), x_size))


class PABLayer(nn.Module):
    """A run of blocks alternating unshifted / shifted windows."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: float | None,
        drop_path: Sequence[float],
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            PABlock(
                dim,
                num_heads,
                window_size,
                shift_size=0 if i % 2 == 0 else window_size // 2,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                qk_scale=qk_scale,
                drop_path=drop_path[i],
            )
            for i in range(depth)
        )
        # toggled by diffusers' ModelMixin.enable_gradient_checkpointing()
        self.gradient_checkpointing = False

    def forward(
        self,
        x: torch.Tensor,
        x_size: tuple[int, int],
        plans: tuple[WindowPlan, WindowPlan] | None = None,
    ) -> torch.Tensor:
        """Blocks in order; ``plans`` = (unshifted, shifted) windows for ``x_size``."""
        for block in self.blocks:
            plan = None if plans is None else plans[block.shift_size > 0]
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = self._gradient_checkpointing_func(block, x, x_size, plan)
            else:
                x = block(x, x_size, plan)
        return x


class PSAGroup(nn.Module):
    """Residual group: blocks -> image -> Conv3x3 -> + group input."""

    def __init__(self, dim: int, resi_connection: str = "1conv", **layer_kwargs) -> None:
        super().__init__()
        self.residual_group = PABLayer(dim=dim, **layer_kwargs)
        self.conv = _resi_conv(dim, resi_connection)

    def forward(
        self,
        x: torch.Tensor,
        x_size: tuple[int, int],
        plans: tuple[WindowPlan, WindowPlan] | None = None,
    ) -> torch.Tensor:
        y = self.residual_group(x, x_size, plans)
        return image_to_tokens(self.conv(tokens_to_image(y, x_size))) + x


def _resi_conv(dim: int, resi_connection: str) -> nn.Module:
    if resi_connection == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    if resi_connection == "3conv":
        # fewer parameters: squeeze to dim/4 in between
        return nn.Sequential(
            nn.Conv2d(dim, dim // 4, 3, 1, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(dim // 4, dim // 4, 1, 1, 0),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(dim // 4, dim, 3, 1, 1),
        )
    raise ValueError(f"resi_connection must be '1conv' or '3conv', got {resi_connection!r}")


class PatchEmbed(nn.Module):
    """``(B, C, H, W)`` -> tokens ``(B, HW, C)``, optionally layer-normalised (``patch_norm``)."""

    def __init__(self, dim: int, patch_norm: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim) if patch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = image_to_tokens(x)
        return self.norm(x) if self.norm is not None else x


def tokens_to_image(x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
    """``(B, HW, C)`` -> ``(B, C, H, W)`` as a channels-last view (convs accept it, no copy)."""
    b, _, c = x.shape
    return x.reshape(b, *x_size, c).permute(0, 3, 1, 2)


def image_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, HW, C)``; a view when ``x`` is channels-last."""
    b, c = x.shape[:2]
    return x.permute(0, 2, 3, 1).reshape(b, -1, c)


# --------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------


class SRFormer(nn.Module):
    """SRFormer network (plain `nn.Module`; [`FusionNet`] wraps it as a diffusers model).

    Args:
        img_size (`int`, *optional*, defaults to 64): Training patch size; the shift mask for it
            is built at construction, other sizes build (and cache) their own.
        in_chans (`int`, *optional*, defaults to 3): Input channels.
        out_chans (`int`, *optional*): Output channels; defaults to ``in_chans``.
        embed_dim (`int`, *optional*, defaults to 60): Feature channels ``C``.
        depths (`Sequence[int]`, *optional*, defaults to ``(6, 6, 6, 6)``): Blocks per group.
        num_heads (`int` or `Sequence[int]`, *optional*, defaults to 6): Heads per group.
        window_size (`int`, *optional*, defaults to 16): Window side, a multiple of 4.
        mlp_ratio (`float`, *optional*, defaults to 2.0): ConvFFN expansion.
        qkv_bias (`bool`, *optional*, defaults to `True`): Bias in q / kv projections.
        qk_scale (`float`, *optional*): Override of the query scale.
        drop_path_rate (`float`, *optional*, defaults to 0.1): Stochastic depth, linear over blocks.
        patch_norm (`bool`, *optional*, defaults to `True`): LayerNorm after the embedding.
        upscale (`int`, *optional*, defaults to 1): Scale of the reconstruction head.
        img_range (`float`, *optional*, defaults to 1.0): Input scale after mean subtraction.
        upsampler (`str`, *optional*, defaults to `""`): ``"pixelshuffle"``,
            ``"pixelshuffledirect"`` or ``""`` (1x, residual output).
        resi_connection (`str`, *optional*, defaults to `"1conv"`): ``"1conv"`` or ``"3conv"``.
        img_mean (`Sequence[float]`, *optional*): Per-input-channel mean subtracted first;
            defaults to the DIV2K RGB mean for 3 channels and zeros otherwise.
        out_mean (`Sequence[float]`, *optional*): Mean added back to the output; defaults to
            ``img_mean`` when ``out_chans == in_chans`` and zeros otherwise.
        num_feat (`int`, *optional*, defaults to 64): Width of the ``pixelshuffle`` head.
    """

    def __init__(
        self,
        img_size: int = 64,
        in_chans: int = 3,
        out_chans: int | None = None,
        embed_dim: int = 60,
        depths: Sequence[int] = (6, 6, 6, 6),
        num_heads: int | Sequence[int] = 6,
        window_size: int = 16,
        mlp_ratio: float = 2.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_path_rate: float = 0.1,
        patch_norm: bool = True,
        upscale: int = 1,
        img_range: float = 1.0,
        upsampler: str = "",
        resi_connection: str = "1conv",
        img_mean: Sequence[float] | None = None,
        out_mean: Sequence[float] | None = None,
        num_feat: int = 64,
    ) -> None:
        super().__init__()
        out_chans = out_chans or in_chans
        depths = list(depths)
        heads = [num_heads] * len(depths) if isinstance(num_heads, int) else list(num_heads)
        if not depths or any(dep < 1 for dep in depths):
            raise ValueError(f"depths must be a non-empty list of positive ints, got {depths}")
        if len(heads) != len(depths):
            raise ValueError(f"num_heads {num_heads} must have one entry per group {depths}")
        if window_size <= 0 or window_size % 4:
            raise ValueError(f"window_size must be a positive multiple of 4, got {window_size}")
        if upsampler not in UPSAMPLERS:
            raise ValueError(f"upsampler must be one of {UPSAMPLERS}, got {upsampler!r}")
        if upsampler == "" and upscale != 1:
            raise ValueError(f"upsampler '' is 1x; got upscale={upscale}")
        if upsampler == "pixelshuffle" and not (upscale == 3 or upscale & (upscale - 1) == 0):
            raise ValueError(f"pixelshuffle supports upscale 2^k or 3, got {upscale}")

        self.window_size, self.upscale, self.upsampler = window_size, upscale, upsampler
        self.img_size, self.img_range = img_size, img_range
        self.in_chans, self.out_chans, self.embed_dim = in_chans, out_chans, embed_dim
        if img_mean is None:
            img_mean = RGB_MEAN if in_chans == 3 else (0.0,) * in_chans
        if out_mean is None:
            out_mean = img_mean if out_chans == in_chans else (0.0,) * out_chans
        if len(img_mean) != in_chans or len(out_mean) != out_chans:
            raise ValueError(
                f"img_mean / out_mean need {in_chans} / {out_chans} values, "
                f"got {tuple(img_mean)} / {tuple(out_mean)}"
            )
        self.register_buffer("mean", torch.tensor(img_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("out_mean", torch.tensor(out_mean).view(1, -1, 1, 1), persistent=False)

        # 1. shallow features
        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        # 2. deep features
        self.patch_embed = PatchEmbed(embed_dim, patch_norm)
        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear decay rule
        self.layers = nn.ModuleList()
        for i, (depth, nh) in enumerate(zip(depths, heads, strict=True)):
            start = sum(depths[:i])
            self.layers.append(
                PSAGroup(
                    embed_dim,
                    resi_connection,
                    depth=depth,
                    num_heads=nh,
                    window_size=window_size,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    drop_path=dpr[start : start + depth],
                )
            )
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = _resi_conv(embed_dim, resi_connection)
        # 3. reconstruction
        if upsampler == "pixelshuffle":
            self.conv_before_upsample = nn.Sequential(
                nn.Conv2d(embed_dim, num_feat, 3, 1, 1), nn.LeakyReLU(inplace=True)
            )
            self.upsample = _pixelshuffle_upsample(upscale, num_feat)
            self.conv_last = nn.Conv2d(num_feat, out_chans, 3, 1, 1)
        elif upsampler == "pixelshuffledirect":
            self.upsample = nn.Sequential(
                nn.Conv2d(embed_dim, out_chans * upscale**2, 3, 1, 1), nn.PixelShuffle(upscale)
            )
        else:
            self.conv_last = nn.Conv2d(embed_dim, out_chans, 3, 1, 1)

        self.apply(_init_weights)
        self._plans: dict[tuple, tuple[WindowPlan, WindowPlan]] = {}
        padded = -(-img_size // window_size) * window_size
        self.window_plans(padded, padded, torch.device("cpu"))  # precompute for the patch size

    # -- sizes ----------------------------------------------------------------------------

    def padded_window(self, height: int, width: int) -> int:
        """Window the input is padded to a multiple of.

        ``window_size`` whenever a reflect pad to it is possible (as the official code does);
        for inputs smaller than that pad, the smallest multiple of 4 covering the short side.
        """
        ws = self.window_size
        if (-height) % ws < height and (-width) % ws < width:
            return ws
        return min(ws, -(-min(height, width) // 4) * 4)

    def window_plans(
        self, height: int, width: int, device: torch.device
    ) -> tuple[WindowPlan, WindowPlan]:
        """Cached (unshifted, shifted) window plans for a padded ``height x width`` map.

        When one window spans the short side the window shrinks to it and nothing is shifted
        (both plans are the same).
        """
        key = (height, width, torch.device(device))
        if key not in self._plans:
            if len(self._plans) >= _MAX_CACHED_PLANS:
                self._plans.pop(next(iter(self._plans)))
            ws, shift = self.window_size, self.window_size // 2
            if min(height, width) <= ws:
                ws, shift = min(height, width), 0
            plain = WindowPlan.build(height, width, ws, 0, device)
            shifted = WindowPlan.build(height, width, ws, shift, device) if shift else plain
            self._plans[key] = (plain, shifted)
        return self._plans[key]

    # -- forward --------------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Deep features ``(B, C, H, W)`` -> ``(B, C, H, W)`` (H, W already padded)."""
        height, width = x.shape[-2:]
        plans = self.window_plans(height, width, x.device)
        tokens = self.patch_embed(x)  # (B, HW, C)
        for layer in self.layers:
            tokens = layer(tokens, (height, width), plans)
        return tokens_to_image(self.norm(tokens), (height, width))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """Restore ``x``.

        Args:
            x (`torch.Tensor`): ``(B, in_chans, H, W)``, any ``H, W``.
            skip (`torch.Tensor`, *optional*): ``(B, out_chans, H, W)`` image the 1x head adds
                its residual to; defaults to ``x`` (needs ``in_chans == out_chans``).

        Returns:
            `torch.Tensor`: ``(B, out_chans, H * upscale, W * upscale)``.
        """
        height, width = x.shape[-2:]
        win = self.padded_window(height, width)
        x = (pad_to_multiple(x, win) - self.mean.to(x.dtype)) * self.img_range
        out_mean = self.out_mean.to(x.dtype)

        feat = self.conv_first(x)
        res = self.conv_after_body(self.forward_features(feat)) + feat
        if self.upsampler == "pixelshuffle":
            out = self.conv_last(self.upsample(self.conv_before_upsample(res)))
        elif self.upsampler == "pixelshuffledirect":
            out = self.upsample(res)
        else:
            if skip is None:
                if self.in_chans != self.out_chans:
                    raise ValueError("skip is required when in_chans != out_chans")
                base = x
            else:
                base = (pad_to_multiple(skip, win) - out_mean) * self.img_range
            out = base + self.conv_last(res)
        out = out / self.img_range + out_mean
        return out[..., : height * self.upscale, : width * self.upscale]


def _pixelshuffle_upsample(scale: int, num_feat: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    if scale == 3:
        layers += [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
    else:
        for _ in range(int(math.log2(scale))):
            layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
    return nn.Sequential(*layers)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def strip_official_buffers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the buffers that official SRFormer checkpoints store but this code rebuilds.

    Args:
        state_dict (`dict`): An official state dict (``params`` / ``params_ema`` entry).

    Returns:
        `dict`: The same mapping without ``attn_mask`` and ``*relative_position_index`` keys.
    """
    drop = ("attn_mask", "relative_position_index")
    return {k: v for k, v in state_dict.items() if not k.endswith(drop)}
