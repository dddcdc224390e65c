"""Real-ESRGAN second-order degradation, batched in torch.

From Wang et al., "Real-ESRGAN: Training Real-World Blind Super-Resolution with Pure Synthetic
Data", ICCVW 2021 (arXiv:2107.10833).

Everything runs on float RGB tensors in [0, 1], NCHW, on whatever device the input lives on.
Randomness comes only from the ``torch.Generator`` passed in; small parameter draws happen on the
generator's device and are moved to the data, large noise fields are drawn on the generator's
device too (pass a generator on the data's device to avoid host-device copies).

Deviations from the reference implementation, on purpose:

- Gray noise is drawn per sample (the reference draws one gray field for the whole batch).
- Noise type, noise strength, JPEG quality, whether the second blur applies and the order of the
  final JPEG / sinc step are drawn per sample; only the resize mode and factor stay per batch (a
  batch must keep one size), so no sample pool is needed.
- ``filter2d`` falls back to replicate padding when an image is too small to reflect-pad (tiny
  training crops shrunk by the random resize); the reference would raise.
- The JPEG quantisation tables are used in the standard orientation (row = vertical frequency).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = [
    "KernelConfig",
    "DegradationConfig",
    "RealESRGANDegradation",
    "KERNEL_SIZE",
    "random_kernels",
    "random_final_sinc_kernels",
    "filter2d",
    "usm_sharp",
    "add_gaussian_noise",
    "add_poisson_noise",
    "diff_jpeg",
]

#: Every kernel is zero-padded to this size so a batch of per-sample kernels stacks.
KERNEL_SIZE = 21

KERNEL_TYPES = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)
RESIZE_MODES = ("area", "bilinear", "bicubic")


@dataclass
class KernelConfig:
    """Parameters of one random blur kernel family (first or second degradation stage).

    Args:
        kernel_sizes: odd kernel sizes drawn uniformly.
        type_probs: probabilities of iso, aniso, generalized iso/aniso and plateau iso/aniso.
        sigma_range: Gaussian standard deviation range (pixels).
        betag_range: shape range of generalized Gaussian kernels.
        betap_range: shape range of plateau kernels.
        sinc_prob: probability of a sinc (ringing) kernel instead of a blur kernel.
    """

    kernel_sizes: list[int] = field(default_factory=lambda: [7, 9, 11, 13, 15, 17, 19, 21])
    type_probs: list[float] = field(default_factory=lambda: [0.45, 0.25, 0.12, 0.03, 0.12, 0.03])
    sigma_range: list[float] = field(default_factory=lambda: [0.2, 3.0])
    betag_range: list[float] = field(default_factory=lambda: [0.5, 4.0])
    betap_range: list[float] = field(default_factory=lambda: [1.0, 2.0])
    sinc_prob: float = 0.1


def _second_kernel() -> KernelConfig:
    return KernelConfig(sigma_range=[0.2, 1.5])


@dataclass
class DegradationConfig:
    """Parameters of the second-order pipeline; defaults are Real-ESRGAN x4plus with ``scale=1``.

    ``*_resize_probs`` are the probabilities of up / down / keep; ``*_resize_range`` is
    ``[lowest down factor, highest up factor]`` (down factors are drawn from ``[lo, 1]``, up
    factors from ``[1, hi]``).
    """

    scale: int = 1
    kernel1: KernelConfig = field(default_factory=KernelConfig)
    kernel2: KernelConfig = field(default_factory=_second_kernel)
    final_sinc_prob: float = 0.8
    resize_probs: list[float] = field(default_factory=lambda: [0.2, 0.7, 0.1])
    resize_range: list[float] = field(default_factory=lambda: [0.15, 1.5])
    gaussian_noise_prob: float = 0.5
    noise_range: list[float] = field(default_factory=lambda: [1.0, 30.0])
    poisson_scale_range: list[float] = field(default_factory=lambda: [0.05, 3.0])
    gray_noise_prob: float = 0.4
    jpeg_range: list[float] = field(default_factory=lambda: [30.0, 95.0])
    second_blur_prob: float = 0.8
    resize_probs2: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.3])
    resize_range2: list[float] = field(default_factory=lambda: [0.3, 1.2])
    gaussian_noise_prob2: float = 0.5
    noise_range2: list[float] = field(default_factory=lambda: [1.0, 25.0])
    poisson_scale_range2: list[float] = field(default_factory=lambda: [0.05, 2.5])
    gray_noise_prob2: float = 0.4
    jpeg_range2: list[float] = field(default_factory=lambda: [30.0, 95.0])


# --------------------------------------------------------------------------------------------
# random draws
# --------------------------------------------------------------------------------------------


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _uniform(
    n: int, lo: float, hi: float, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    u = torch.rand(n, generator=generator, device=_gen_device(generator), dtype=torch.float64)
    return (lo + (hi - lo) * u).to(device)


def _bernoulli(
    n: int, p: float, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    u = torch.rand(n, generator=generator, device=_gen_device(generator), dtype=torch.float64)
    return (u < p).to(device)


def _choice(
    n: int, probs: list[float], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    p = torch.as_tensor(probs, dtype=torch.float64, device=_gen_device(generator))
    if p.ndim != 1 or p.numel() == 0 or bool((p < 0).any()) or float(p.sum()) <= 0:
        raise ValueError(f"probabilities must be non-negative and not all zero, got {probs!r}")
    return torch.multinomial(p / p.sum(), n, replacement=True, generator=generator).to(device)


def _check_sizes(sizes: list[int]) -> None:
    if not sizes or any(int(k) % 2 == 0 or not 3 <= int(k) <= KERNEL_SIZE for k in sizes):
        raise ValueError(
            f"kernel_sizes must be odd values in [3, {KERNEL_SIZE}], got {list(sizes)!r}"
        )


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


def _grid(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    r = KERNEL_SIZE // 2
    ax = torch.arange(-r, r + 1, dtype=torch.float64, device=device)
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return xx, yy


def _support(sizes: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, 21, 21) bool: inside the centred k x k square of each sample."""
    xx, yy = _grid(device)
    half = (sizes // 2).to(torch.float64).view(-1, 1, 1)
    return (xx.abs() <= half) & (yy.abs() <= half)


def _sinc(omega: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Circular low-pass (sinc) kernels on the 21 x 21 grid, unnormalised, (B, 21, 21)."""
    xx, yy = _grid(device)
    r = torch.sqrt(xx**2 + yy**2).unsqueeze(0)
    w = omega.view(-1, 1, 1)
    safe_r = torch.where(r == 0, torch.ones_like(r), r)
    k = w * torch.special.bessel_j1(w * safe_r) / (2 * math.pi * safe_r)
    # The limit of w J1(w r) / (2 pi r) at r -> 0 is w^2 / (4 pi).
    return torch.where(r == 0, w**2 / (4 * math.pi), k)


def _normalise(k: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    k = torch.where(support, k, torch.zeros_like(k))
    return k / k.sum(dim=(-2, -1), keepdim=True)


def random_kernels(
    batch: int,
    generator: torch.Generator | None = None,
    *,
    config: KernelConfig | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draw one random blur (or sinc) kernel per sample.

    Args:
        batch: number of kernels.
        generator: source of randomness.
        config: kernel family; defaults to the first-stage Real-ESRGAN settings.
        device: device of the result (defaults to the generator's device).
        dtype: dtype of the result.

    Returns:
        ``(batch, 21, 21)`` kernels, each summing to 1 and non-zero only inside its centred
        ``k x k`` support, ``k`` drawn from ``config.kernel_sizes``.
    """
    cfg = config or KernelConfig()
    _check_sizes(cfg.kernel_sizes)
    if len(cfg.type_probs) != len(KERNEL_TYPES):
        raise ValueError(
            f"type_probs needs {len(KERNEL_TYPES)} values {KERNEL_TYPES}, got {cfg.type_probs!r}"
        )
    dev = torch.device(device) if device is not None else _gen_device(generator)
    gdev = _gen_device(generator)
    sizes_t = torch.as_tensor(list(cfg.kernel_sizes), device=gdev)
    idx = torch.randint(len(cfg.kernel_sizes), (batch,), generator=generator, device=gdev)
    sizes = sizes_t[idx].to(dev)
    kind = _choice(batch, list(cfg.type_probs), generator, dev)
    is_sinc = _bernoulli(batch, cfg.sinc_prob, generator, dev)

    lo, hi = cfg.sigma_range
    sx = _uniform(batch, lo, hi, generator, dev)
    sy = _uniform(batch, lo, hi, generator, dev)
    theta = _uniform(batch, -math.pi, math.pi, generator, dev)
    iso = (kind % 2) == 0  # iso, generalized_iso, plateau_iso are the even indices
    sy = torch.where(iso, sx, sy)
    theta = torch.where(iso, torch.zeros_like(theta), theta)

    bg_lo, bg_hi = cfg.betag_range
    beta_g = torch.where(
        _bernoulli(batch, 0.5, generator, dev),
        _uniform(batch, bg_lo, 1.0, generator, dev),
        _uniform(batch, 1.0, bg_hi, generator, dev),
    )
    bp_lo, bp_hi = cfg.betap_range
    beta_p = torch.where(
        _bernoulli(batch, 0.5, generator, dev),
        _uniform(batch, bp_lo, 1.0, generator, dev),
        _uniform(batch, 1.0, bp_hi, generator, dev),
    )
    u = _uniform(batch, 0.0, 1.0, generator, dev)
    omega = torch.where(
        sizes < 13, math.pi / 3 + u * (math.pi - math.pi / 3), math.pi / 5 + u * (math.pi * 4 / 5)
    )

    # q = v^T Sigma^-1 v with Sigma = R diag(sx^2, sy^2) R^T, so in the rotated frame
    # q = (x')^2 / sx^2 + (y')^2 / sy^2.
    xx, yy = _grid(dev)
    c = torch.cos(theta).view(-1, 1, 1)
    s = torch.sin(theta).view(-1, 1, 1)
    xr = c * xx + s * yy
    yr = -s * xx + c * yy
    q = (xr / sx.view(-1, 1, 1)) ** 2 + (yr / sy.view(-1, 1, 1)) ** 2

    family = kind.view(-1, 1, 1) // 2  # 0 gaussian, 1 generalized, 2 plateau
    gauss = torch.exp(-0.5 * q)
    general = torch.exp(-0.5 * q.pow(beta_g.view(-1, 1, 1)))
    plateau = 1.0 / (1.0 + q.pow(beta_p.view(-1, 1, 1)))
    k = torch.where(family == 0, gauss, torch.where(family == 1, general, plateau))
    k = torch.where(is_sinc.view(-1, 1, 1), _sinc(omega, dev), k)
    return _normalise(k, _support(sizes, dev)).to(dtype)


def random_final_sinc_kernels(
    batch: int,
    generator: torch.Generator | None = None,
    *,
    prob: float = 0.8,
    kernel_sizes: list[int] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draw the final sinc kernels: sinc with ``omega ~ U[pi/3, pi]`` with ``prob``, else a delta.

    Args:
        batch: number of kernels.
        generator: source of randomness.
        prob: probability of a sinc kernel per sample.
        kernel_sizes: odd sizes drawn uniformly (default 7..21).
        device: device of the result (defaults to the generator's device).
        dtype: dtype of the result.

    Returns:
        ``(batch, 21, 21)`` kernels summing to 1.
    """
    sizes_list = list(kernel_sizes or range(7, KERNEL_SIZE + 1, 2))
    _check_sizes(sizes_list)
    dev = torch.device(device) if device is not None else _gen_device(generator)
    gdev = _gen_device(generator)
    idx = torch.randint(len(sizes_list), (batch,), generator=generator, device=gdev)
    sizes = torch.as_tensor(sizes_list, device=gdev)[idx].to(dev)
    use = _bernoulli(batch, prob, generator, dev)
    omega = _uniform(batch, math.pi / 3, math.pi, generator, dev)
    sinc = _normalise(_sinc(omega, dev), _support(sizes, dev))
    delta = torch.zeros(batch, KERNEL_SIZE, KERNEL_SIZE, dtype=torch.float64, device=dev)
    delta[:, KERNEL_SIZE // 2, KERNEL_SIZE // 2] = 1.0
    return torch.where(use.view(-1, 1, 1), sinc, delta).to(dtype)


# --------------------------------------------------------------------------------------------
# filtering
# --------------------------------------------------------------------------------------------


def filter2d(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve every sample with its own kernel, reflect-padded to keep the size.

    Args:
        x: ``(B, C, H, W)`` images.
        kernel: ``(k, k)`` shared kernel or ``(B, k, k)`` per-sample kernels, ``k`` odd.

    Returns:
        ``(B, C, H, W)`` filtered images.
    """
    if x.ndim != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    if kernel.ndim == 2:
        kernel = kernel.unsqueeze(0).expand(b, -1, -1)
    if kernel.ndim != 3 or kernel.shape[0] != b or kernel.shape[1] != kernel.shape[2]:
        raise ValueError(
            f"kernel must be (k, k) or ({b}, k, k) for a batch of {b}, got {tuple(kernel.shape)}"
        )
    k = kernel.shape[-1]
    if k % 2 == 0:
        raise ValueError(f"kernel size must be odd, got {k}")
    p = k // 2
    # Reflect padding needs the pad to be smaller than the side; tiny shrunk crops use replicate.
    mode = "reflect" if p < h and p < w else "replicate"
    xp = F.pad(x, (p, p, p, p), mode=mode)
    weight = kernel.to(x.dtype).repeat_interleave(c, dim=0).unsqueeze(1)  # (B*C, 1, k, k)
    out = F.conv2d(xp.reshape(1, b * c, h + 2 * p, w + 2 * p), weight, groups=b * c)
    return out.view(b, c, h, w)


def _gaussian_kernel_1d(size: int, sigma: float, device, dtype) -> torch.Tensor:
    ax = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    return (g / g.sum()).to(dtype)


def usm_sharp(
    x: torch.Tensor, weight: float = 0.5, threshold: float = 10.0, radius: int = 50
) -> torch.Tensor:
    """Unsharp masking as used on Real-ESRGAN ground truth.

    Args:
        x: ``(B, C, H, W)`` images in [0, 1].
        weight: amount of the high-pass residual added back.
        threshold: residual magnitude (on the 0-255 scale) above which sharpening applies.
        radius: Gaussian kernel size (made odd); sigma is OpenCV's automatic value for that size.

    Returns:
        Sharpened images, same shape.
    """
    size = radius + 1 if radius % 2 == 0 else radius
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8  # cv2.getGaussianKernel(size, 0)
    g = _gaussian_kernel_1d(size, sigma, x.device, x.dtype)
    kernel = g[:, None] * g[None, :]
    blur = filter2d(x, kernel)
    residual = x - blur
    mask = (residual.abs() * 255 > threshold).to(x.dtype)
    soft = filter2d(mask, kernel)
    sharp = (x + weight * residual).clamp(0, 1)
    return soft * sharp + (1 - soft) * x


# --------------------------------------------------------------------------------------------
# noise
# --------------------------------------------------------------------------------------------


def _per_sample(value, b: int, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(value, device=x.device)
    if t.ndim == 0:
        t = t.expand(b)
    if t.shape != (b,):
        raise ValueError(f"per-sample parameter must be a scalar or have shape ({b},), got {t}")
    return t


def add_gaussian_noise(
    x: torch.Tensor,
    sigma: float | torch.Tensor,
    gray: bool | torch.Tensor = False,
    generator: torch.Generator | None = None,
    *,
    clip: bool = True,
) -> torch.Tensor:
    """Add Gaussian noise with a per-sample standard deviation.

    Args:
        x: ``(B, C, H, W)`` images in [0, 1].
        sigma: standard deviation on the [0, 1] scale, scalar or ``(B,)``.
        gray: whether a sample gets one noise field shared by its channels, scalar or ``(B,)``.
        generator: source of randomness.
        clip: clamp the result to [0, 1].

    Returns:
        Noisy images, same shape.
    """
    b, c, h, w = x.shape
    sigma_t = _per_sample(sigma, b, x).to(x.dtype).view(b, 1, 1, 1)
    gray_t = _per_sample(gray, b, x).bool().view(b, 1, 1, 1)
    gdev = _gen_device(generator)
    colour = torch.randn(b, c, h, w, generator=generator, device=gdev, dtype=x.dtype).to(x.device)
    mono = torch.randn(b, 1, h, w, generator=generator, device=gdev, dtype=x.dtype).to(x.device)
    noise = torch.where(gray_t, mono.expand(b, c, h, w), colour) * sigma_t
    out = x + noise
    return out.clamp(0, 1) if clip else out


def _poisson_noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    q = (x * 255).round().clamp(0, 255) / 255
    # Photon count per sample: the next power of two above the number of distinct levels.
    levels = torch.tensor([torch.unique(q[i]).numel() for i in range(q.shape[0])])
    vals = (2 ** torch.ceil(torch.log2(levels.to(torch.float64)))).to(x.dtype).to(x.device)
    vals = vals.view(-1, 1, 1, 1)
    gdev = _gen_device(generator)
    rate = (q * vals).to(gdev)
    counts = torch.poisson(rate, generator=generator).to(x.device)
    return counts / vals - q


def add_poisson_noise(
    x: torch.Tensor,
    scale: float | torch.Tensor,
    gray: bool | torch.Tensor = False,
    generator: torch.Generator | None = None,
    *,
    clip: bool = True,
) -> torch.Tensor:
    """Add Poisson (shot) noise with a per-sample strength.

    Args:
        x: ``(B, 3, H, W)`` images in [0, 1].
        scale: noise multiplier, scalar or ``(B,)``.
        gray: whether a sample's noise comes from its luminance (shared by the channels).
        generator: source of randomness.
        clip: clamp the result to [0, 1].

    Returns:
        Noisy images, same shape.
    """
    b, c, h, w = x.shape
    scale_t = _per_sample(scale, b, x).to(x.dtype).view(b, 1, 1, 1)
    gray_t = _per_sample(gray, b, x).bool().view(b, 1, 1, 1)
    colour = _poisson_noise(x, generator)
    if c == 3:
        luma = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype)
        y = (x * luma.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
        mono = _poisson_noise(y, generator).expand(b, c, h, w)
    else:
        mono = _poisson_noise(x.mean(dim=1, keepdim=True), generator).expand(b, c, h, w)
    noise = torch.where(gray_t, mono, colour) * scale_t
    out = x + noise
    return out.clamp(0, 1) if clip else out


# --------------------------------------------------------------------------------------------
# JPEG
# --------------------------------------------------------------------------------------------

_Y_TABLE = [
    [16, 11, 10, 16, 24, 40, 51, 61],
    [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77],
    [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101],
    [72, 92, 95, 98, 112, 100, 103, 99],
]
_C_TABLE = [
    [17, 18, 24, 47, 99, 99, 99, 99],
    [18, 21, 26, 66, 99, 99, 99, 99],
    [24, 26, 56, 99, 99, 99, 99, 99],
    [47, 66, 99, 99, 99, 99, 99, 99],
] + [[99] * 8 for _ in range(4)]


def _dct_matrix(device, dtype) -> torch.Tensor:
    n = torch.arange(8, dtype=torch.float64, device=device)
    d = torch.cos((2 * n[None, :] + 1) * n[:, None] * math.pi / 16) / 2
    d[0] /= math.sqrt(2)
    return d.to(dtype)  # orthonormal: D @ D.T == I


def _jpeg_channel(
    ch: torch.Tensor, table: torch.Tensor, factor: torch.Tensor, dct: torch.Tensor
) -> torch.Tensor:
    b, h, w = ch.shape
    blocks = (ch - 128).view(b, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)
    coef = dct @ blocks @ dct.T
    # Quality 100 gives a zero step; a tiny floor keeps it (almost) lossless instead of NaN.
    step = (table * factor.view(b, 1, 1, 1, 1)).clamp_min(1e-3)
    coef = torch.round(coef / step) * step
    rec = dct.T @ coef @ dct
    return rec.permute(0, 1, 3, 2, 4).reshape(b, h, w) + 128


def diff_jpeg(x: torch.Tensor, quality: float | torch.Tensor) -> torch.Tensor:
    """JPEG-compress and decompress in torch (4:2:0 chroma, standard tables, hard rounding).

    Args:
        x: ``(B, 3, H, W)`` RGB images; values are clamped to [0, 1] first.
        quality: JPEG quality in [1, 100], scalar or ``(B,)``.

    Returns:
        ``(B, 3, H, W)`` decoded images in [0, 1].
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"x must be (B, 3, H, W), got shape {tuple(x.shape)}")
    b, _, h, w = x.shape
    q = _per_sample(quality, b, x).to(torch.float32)
    if bool(((q < 1) | (q > 100)).any()):
        raise ValueError(f"quality must lie in [1, 100], got {q.tolist()}")
    dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    xf = x.to(dtype).clamp(0, 1)
    ph, pw = (-h) % 16, (-w) % 16
    xf = F.pad(xf, (0, pw, 0, ph))
    rgb = xf * 255
    r, g, bl = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * bl
    cb = -0.168736 * r - 0.331264 * g + 0.5 * bl + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * bl + 128
    cb = F.avg_pool2d(cb.unsqueeze(1), 2).squeeze(1)
    cr = F.avg_pool2d(cr.unsqueeze(1), 2).squeeze(1)

    q = q.to(dtype)
    factor = torch.where(q < 50, 5000.0 / q, 200.0 - 2 * q) / 100.0
    dct = _dct_matrix(x.device, dtype)
    y_table = torch.tensor(_Y_TABLE, device=x.device, dtype=dtype)
    c_table = torch.tensor(_C_TABLE, device=x.device, dtype=dtype)
    y = _jpeg_channel(y, y_table, factor, dct)
    cb = _jpeg_channel(cb, c_table, factor, dct)
    cr = _jpeg_channel(cr, c_table, factor, dct)
    cb = cb.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2) - 128
    cr = cr.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2) - 128
    r = y + 1.402 * cr
    g = y - 0.344136 * cb - 0.714136 * cr
    bl = y + 1.772 * cb
    out = (torch.stack([r, g, bl], dim=1).clamp(0, 255) / 255)[:, :, :h, :w]
    return out.to(x.dtype)


# --------------------------------------------------------------------------------------------
# pipeline
# --------------------------------------------------------------------------------------------


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    if mode == "area":
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


class RealESRGANDegradation:
    """The Real-ESRGAN second-order degradation as a callable, batched on the input's device.

    Args:
        config: the pipeline parameters (defaults: Real-ESRGAN x4plus at ``scale=1``).

    Example:
        >>> degrade = RealESRGANDegradation(DegradationConfig())
        >>> lq = degrade(gt, torch.Generator().manual_seed(0))  # same size as gt at scale 1
    """

    def __init__(self, config: DegradationConfig | None = None) -> None:
        self.config = config or DegradationConfig()
        if int(self.config.scale) < 1:
            raise ValueError(f"scale must be a positive integer, got {self.config.scale!r}")

    def _draw_resize(
        self, probs: list[float], rng: list[float], generator: torch.Generator | None
    ) -> tuple[float, str]:
        gdev = _gen_device(generator)
        direction = int(_choice(1, probs, generator, gdev).item())
        u = float(torch.rand(1, generator=generator, device=gdev, dtype=torch.float64).item())
        if direction == 0:
            factor = 1.0 + u * (rng[1] - 1.0)
        elif direction == 1:
            factor = rng[0] + u * (1.0 - rng[0])
        else:
            factor = 1.0
        mode = RESIZE_MODES[int(_choice(1, [1.0, 1.0, 1.0], generator, gdev).item())]
        return factor, mode

    def _noise(
        self,
        x: torch.Tensor,
        gaussian_prob: float,
        sigma_range: list[float],
        poisson_range: list[float],
        gray_prob: float,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        b = x.shape[0]
        use_gauss = _bernoulli(b, gaussian_prob, generator, x.device).view(b, 1, 1, 1)
        sigma = _uniform(b, sigma_range[0], sigma_range[1], generator, x.device) / 255
        scale = _uniform(b, poisson_range[0], poisson_range[1], generator, x.device)
        gray = _bernoulli(b, gray_prob, generator, x.device)
        # Both noises are computed so each sample can take its own type in one batched pass.
        gauss = add_gaussian_noise(x, sigma, gray, generator)
        poisson = add_poisson_noise(x, scale, gray, generator)
        return torch.where(use_gauss, gauss, poisson)

    @torch.no_grad()
    def __call__(self, gt: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Degrade a batch of ground-truth images.

        Args:
            gt: ``(B, 3, H, W)`` images in [0, 1] (the USM-sharpened GT in Real-ESRGAN training).
            generator: source of randomness.

        Returns:
            ``(B, 3, H // scale, W // scale)`` low-quality images in [0, 1], quantised to 8 bits.
        """
        if not isinstance(gt, torch.Tensor) or gt.ndim != 4 or gt.shape[1] != 3:
            raise ValueError(f"gt must be a (B, 3, H, W) tensor, got {getattr(gt, 'shape', gt)}")
        cfg = self.config
        b, _, h, w = gt.shape
        s = int(cfg.scale)
        dev = gt.device
        x = gt.float()

        # stage 1
        x = filter2d(x, random_kernels(b, generator, config=cfg.kernel1, device=dev))
        f, mode = self._draw_resize(cfg.resize_probs, cfg.resize_range, generator)
        x = _resize(x, (max(1, int(h * f)), max(1, int(w * f))), mode)
        x = self._noise(
            x,
            cfg.gaussian_noise_prob,
            cfg.noise_range,
            cfg.poisson_scale_range,
            cfg.gray_noise_prob,
            generator,
        )
        q1 = _uniform(b, cfg.jpeg_range[0], cfg.jpeg_range[1], generator, dev)
        x = diff_jpeg(x.clamp(0, 1), q1)

        # stage 2
        blur2 = _bernoulli(b, cfg.second_blur_prob, generator, dev).view(b, 1, 1, 1)
        k2 = random_kernels(b, generator, config=cfg.kernel2, device=dev)
        x = torch.where(blur2, filter2d(x, k2), x)
        f, mode = self._draw_resize(cfg.resize_probs2, cfg.resize_range2, generator)
        x = _resize(x, (max(1, int(h / s * f)), max(1, int(w / s * f))), mode)
        x = self._noise(
            x,
            cfg.gaussian_noise_prob2,
            cfg.noise_range2,
            cfg.poisson_scale_range2,
            cfg.gray_noise_prob2,
            generator,
        )

        # final: [resize -> sinc] then JPEG, or JPEG then [resize -> sinc], per sample
        out_size = (h // s, w // s)
        _, mode = self._draw_resize([0.0, 0.0, 1.0], [1.0, 1.0], generator)
        sinc = random_final_sinc_kernels(b, generator, prob=cfg.final_sinc_prob, device=dev)
        q2 = _uniform(b, cfg.jpeg_range2[0], cfg.jpeg_range2[1], generator, dev)
        sinc_first = _bernoulli(b, 0.5, generator, dev).view(b, 1, 1, 1)
        a = diff_jpeg(filter2d(_resize(x, out_size, mode), sinc).clamp(0, 1), q2)
        c = filter2d(_resize(diff_jpeg(x.clamp(0, 1), q2), out_size, mode), sinc)
        x = torch.where(sinc_first, a, c)
        return ((x * 255).round().clamp(0, 255) / 255).to(gt.dtype)
