"""Training losses of the fusion network and of the prior.

The fusion recipe is Xhs-IAG's in the NTIRE 2024 RAIM report (arXiv:2405.09923); the prior's
follow Real-ESRGAN (arXiv:2107.10833) and MiAlgo.

- hole / valid L1 (STTN), with an eps in the denominators;
- VGG19 perceptual and style (Gram) losses with AOT-GAN's or BasicSR's layer sets;
- AOT-GAN's SM-PatchGAN discriminator trained with LSGAN on Gaussian-blurred soft mask labels, in
  the paper's form (the released code's inconsistent form only behind a reproduction flag);
- pixel L1 / L2, Real-ESRGAN's U-Net discriminator with spectral norm and the vanilla GAN loss
  (prior training).

Masks are ``(B, 1, H, W)`` with 1 = hole; images ``(B, 3, H, W)`` in [0, 1].
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import logging

from raim_diffusion.errors import MissingWeightsError

logger = logging.get_logger(__name__)

__all__ = [
    "VGG19_WEIGHTS_FILE",
    "LAYER_SETS",
    "PerceptualConfig",
    "masked_l1",
    "gram_matrix",
    "VGGFeatureExtractor",
    "PerceptualLoss",
    "SMPatchDiscriminator",
    "UNetDiscriminatorSN",
    "pixel_loss",
    "vanilla_gan_loss",
    "gaussian_blur",
    "soft_mask_labels",
    "discriminator_loss",
    "generator_adversarial_loss",
]

#: torchvision's ImageNet VGG19 checkpoint, looked up in ``$TORCH_HOME/hub/checkpoints``.
VGG19_WEIGHTS_FILE = "vgg19-dcbb9e9d.pth"
_VGG19_URL = "https://download.pytorch.org/models/" + VGG19_WEIGHTS_FILE

# VGG19 "features" layout: channels per block, convolutions per block.
_VGG19_BLOCKS = ((64, 2), (128, 2), (256, 4), (512, 4), (512, 4))


def _vgg19_layer_names() -> list[str]:
    names = []
    for block, (_, n_conv) in enumerate(_VGG19_BLOCKS, start=1):
        for i in range(1, n_conv + 1):
            names += [f"conv{block}_{i}", f"relu{block}_{i}"]
        names.append(f"pool{block}")
    return names


VGG19_LAYERS = _vgg19_layer_names()

#: Layer sets: perceptual layers with weights, style layers with weights, and the total weights
#: each recipe uses (applied by the trainer through the loss config).
LAYER_SETS: dict[str, dict[str, dict[str, float]]] = {
    "aot": {
        "perceptual": {f"relu{i}_1": 1.0 for i in range(1, 6)},
        "style": {"relu2_2": 1.0, "relu3_4": 1.0, "relu4_4": 1.0, "relu5_2": 1.0},
    },
    "basicsr": {
        "perceptual": {
            "conv1_2": 0.1,
            "conv2_2": 0.1,
            "conv3_4": 1.0,
            "conv4_4": 1.0,
            "conv5_4": 1.0,
        },
        "style": {
            "conv1_2": 0.1,
            "conv2_2": 0.1,
            "conv3_4": 1.0,
            "conv4_4": 1.0,
            "conv5_4": 1.0,
        },
    },
}


@dataclass
class PerceptualConfig:
    """Feature extractor for the perceptual and style losses.

    Args:
        layer_set: ``"aot"`` (relu layers) or ``"basicsr"`` (pre-ReLU conv layers).
        weights_path: a VGG19 checkpoint file; default: torchvision's cache.
        allow_random_weights: use a randomly initialised VGG19 when no weights are found. Only
            meant for tests and the tiny config: the losses are then not perceptual at all.
        perceptual_layers: override the layer set's perceptual layers and their weights.
        style_layers: override the layer set's style layers and their weights.
        use_input_norm: ImageNet-normalise the inputs of VGG19 (BasicSR's ``use_input_norm``;
            Xhs-IAG's prior recipe turns it off).
    """

    layer_set: str = "aot"
    weights_path: str | None = None
    allow_random_weights: bool = False
    perceptual_layers: dict[str, float] | None = None
    style_layers: dict[str, float] | None = None
    use_input_norm: bool = True


# --------------------------------------------------------------------------------------------
# pixel losses
# --------------------------------------------------------------------------------------------


def masked_l1(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hole and valid L1 (STTN): each region's L1 normalised by that region's share.

    ``hole * mean(mask) + valid * mean(1 - mask)`` equals the plain L1 (up to eps).

    Args:
        pred: ``(B, C, H, W)`` prediction.
        target: ``(B, C, H, W)`` ground truth.
        mask: ``(B, 1, H, W)`` hole mask in [0, 1].
        eps: added to the denominators so an empty region gives 0 instead of NaN.

    Returns:
        ``(hole, valid)`` scalar losses.
    """
    diff = (pred - target).abs()
    m = mask.to(diff.dtype)
    hole = (m * diff).mean() / (m.mean() + eps)
    valid = ((1 - m) * diff).mean() / ((1 - m).mean() + eps)
    return hole, valid


def gram_matrix(feat: torch.Tensor) -> torch.Tensor:
    """Gram matrix ``F F^T / (C H W)`` per sample, ``(B, C, C)``."""
    b, c, h, w = feat.shape
    f = feat.reshape(b, c, h * w).float()
    return f @ f.transpose(1, 2) / (c * h * w)


# --------------------------------------------------------------------------------------------
# VGG19
# --------------------------------------------------------------------------------------------


def _default_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG19_WEIGHTS_FILE


def _build_vgg19_features(n_layers: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_ch = 3
    for out_ch, n_conv in _VGG19_BLOCKS:
        for _ in range(n_conv):
            # Not in-place: pre-ReLU activations must survive for the BasicSR layer set.
            layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.ReLU(inplace=False)]
            in_ch = out_ch
        layers.append(nn.MaxPool2d(2, 2))
    return nn.Sequential(*layers[:n_layers])


class VGGFeatureExtractor(nn.Module):
    """Frozen VGG19 returning named intermediate activations of ImageNet-normalised inputs.

    Args:
        layers: names such as ``"relu1_1"`` or ``"conv5_4"``.
        weights_path: VGG19 checkpoint (torchvision layout, ``features.<i>.weight``); default
            ``$TORCH_HOME/hub/checkpoints/vgg19-dcbb9e9d.pth``.
        allow_random_weights: fall back to a seeded random initialisation when no file exists.
        use_input_norm: ImageNet-normalise the input (otherwise VGG19 sees [0, 1] images).

    Raises:
        MissingWeightsError: no weights file and random weights not allowed.
    """

    def __init__(
        self,
        layers: list[str],
        weights_path: str | os.PathLike | None = None,
        allow_random_weights: bool = False,
        use_input_norm: bool = True,
    ) -> None:
        super().__init__()
        self.use_input_norm = use_input_norm
        unknown = [name for name in layers if name not in VGG19_LAYERS]
        if unknown or not layers:
            raise ValueError(f"layers must be VGG19 layer names like 'relu3_1', got {layers!r}")
        self.layers = list(layers)
        n_layers = max(VGG19_LAYERS.index(name) for name in layers) + 1
        self.features = _build_vgg19_features(n_layers)
        self._index = {VGG19_LAYERS.index(name): name for name in layers}

        path = Path(weights_path).expanduser() if weights_path else _default_weights_path()
        if path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = {
                k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")
            }
            own = self.features.state_dict()
            missing = [k for k in own if k not in state]
            if missing:
                raise ValueError(
                    f"{path} is not a torchvision VGG19 checkpoint (missing {missing})"
                )
            self.features.load_state_dict({k: state[k] for k in own})
            self.pretrained = True
        elif allow_random_weights:
            logger.warning(
                "VGG19 weights not found at %s; using random weights (allow_random_weights): "
                "perceptual and style losses are not meaningful.",
                path,
            )
            gen = torch.Generator().manual_seed(0)
            for module in self.features:
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=gen)
                    nn.init.zeros_(module.bias)
            self.pretrained = False
        else:
            raise MissingWeightsError(
                f"VGG19 ImageNet weights ({VGG19_WEIGHTS_FILE}) were not found at {path}. "
                f"Download {_VGG19_URL} and put it in {path.parent} (torchvision's cache, "
                "set by $TORCH_HOME), or point to the file with the training config's "
                "perceptual.weights_path. For tests only, perceptual.allow_random_weights=true "
                "uses random features."
            )
        self.requires_grad_(False)
        self.eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), False)

    def train(self, mode: bool = True) -> VGGFeatureExtractor:
        # Always frozen in eval mode, whatever the surrounding module does.
        return super().train(False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named activations of ``x`` (``(B, 3, H, W)`` in [0, 1])."""
        h = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype) if self.use_input_norm else x
        out = {}
        for i, module in enumerate(self.features):
            h = module(h)
            if i in self._index:
                out[self._index[i]] = h
        return out


class PerceptualLoss(nn.Module):
    """VGG19 perceptual (feature L1) and style (Gram L1) losses between prediction and target.

    Weights per layer come from the layer set; the trainer multiplies the two results by the
    config's total weights (AOT: 0.1 and 250; BasicSR / Real-ESRGAN: 1 and 0).

    Args:
        config: layer set, weights location and the random-weights escape hatch.
    """

    def __init__(self, config: PerceptualConfig | None = None) -> None:
        super().__init__()
        cfg = config or PerceptualConfig()
        if cfg.layer_set not in LAYER_SETS:
            raise ValueError(
                f"layer_set must be one of {sorted(LAYER_SETS)}, got {cfg.layer_set!r}"
            )
        preset = LAYER_SETS[cfg.layer_set]
        self.perceptual_layers = dict(cfg.perceptual_layers or preset["perceptual"])
        self.style_layers = dict(cfg.style_layers or preset["style"])
        names = sorted(set(self.perceptual_layers) | set(self.style_layers), key=VGG19_LAYERS.index)
        self.vgg = VGGFeatureExtractor(
            names, cfg.weights_path, cfg.allow_random_weights, cfg.use_input_norm
        )

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(perceptual, style)`` scalar losses; gradients flow into ``pred`` only."""
        fp = self.vgg(pred)
        with torch.no_grad():
            ft = self.vgg(target)
        perceptual = pred.new_zeros(())
        for name, w in self.perceptual_layers.items():
            perceptual = perceptual + w * F.l1_loss(fp[name], ft[name])
        style = pred.new_zeros(())
        for name, w in self.style_layers.items():
            style = style + w * F.l1_loss(gram_matrix(fp[name]), gram_matrix(ft[name]))
        return perceptual, style


# --------------------------------------------------------------------------------------------
# SM-PatchGAN
# --------------------------------------------------------------------------------------------


class SMPatchDiscriminator(ModelMixin, ConfigMixin):
    """AOT-GAN's soft-mask PatchGAN discriminator.

    Five 4x4 convolutions (3->64 s2, ->128 s2, ->256 s2, ->512 s1, ->1 s1, padding 1), spectral
    norm and no bias on the first four, LeakyReLU 0.2, no normalisation. The patch map is
    bilinearly upsampled (align_corners) to the input size so it lines up with the mask.

    Args:
        in_channels: image channels.
        base_channels: width of the first layer (AOT: 64).
    """

    @register_to_config
    def __init__(self, in_channels: int = 3, base_channels: int = 64) -> None:
        super().__init__()
        c = base_channels
        sn = nn.utils.parametrizations.spectral_norm
        self.layers = nn.Sequential(
            sn(nn.Conv2d(in_channels, c, 4, 2, 1, bias=False)),
            nn.LeakyReLU(0.2),
            sn(nn.Conv2d(c, 2 * c, 4, 2, 1, bias=False)),
            nn.LeakyReLU(0.2),
            sn(nn.Conv2d(2 * c, 4 * c, 4, 2, 1, bias=False)),
            nn.LeakyReLU(0.2),
            sn(nn.Conv2d(4 * c, 8 * c, 4, 1, 1, bias=False)),
            nn.LeakyReLU(0.2),
            nn.Conv2d(8 * c, 1, 4, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patch scores for ``x`` (``(B, 3, H, W)`` in [0, 1]), upsampled to ``(B, 1, H, W)``."""
        if x.shape[-2] < 32 or x.shape[-1] < 32:
            raise ValueError(f"SMPatchDiscriminator needs inputs of at least 32x32, got {x.shape}")
        # AOT trains on [-1, 1] images.
        y = self.layers(x * 2 - 1)
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=True)


# --------------------------------------------------------------------------------------------
# prior training: pixel loss, U-Net discriminator, vanilla GAN
# --------------------------------------------------------------------------------------------


def pixel_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Mean ``"l1"`` or ``"l2"`` (squared error) between ``pred`` and ``target``."""
    if kind == "l1":
        return F.l1_loss(pred, target)
    if kind == "l2":
        return F.mse_loss(pred, target)
    raise ValueError(f"pixel loss must be 'l1' or 'l2', got {kind!r}")


class UNetDiscriminatorSN(ModelMixin, ConfigMixin):
    """Real-ESRGAN's U-Net discriminator with spectral norm (BasicSR ``UNetDiscriminatorSN``).

    conv0 3x3 (bias); three 4x4 stride-2 spectral-norm convolutions C->2C->4C->8C; three times a
    bilinear x2 upsampling and a 3x3 spectral-norm convolution back to 4C, 2C, C, each plus the
    encoder feature of that size (skip connections); two more 3x3 spectral-norm convolutions;
    a final 3x3 convolution to one channel. LeakyReLU 0.2 after every convolution but the last.
    The output is a per-pixel realness logit map of the input's size.

    Args:
        in_channels: image channels.
        base_channels: ``C`` (Real-ESRGAN: 64).
        skip_connection: add the encoder features in the decoder.
    """

    @register_to_config
    def __init__(
        self, in_channels: int = 3, base_channels: int = 64, skip_connection: bool = True
    ) -> None:
        super().__init__()
        c = base_channels
        sn = nn.utils.parametrizations.spectral_norm
        self.skip_connection = skip_connection
        self.conv0 = nn.Conv2d(in_channels, c, 3, 1, 1)
        self.conv1 = sn(nn.Conv2d(c, c * 2, 4, 2, 1, bias=False))
        self.conv2 = sn(nn.Conv2d(c * 2, c * 4, 4, 2, 1, bias=False))
        self.conv3 = sn(nn.Conv2d(c * 4, c * 8, 4, 2, 1, bias=False))
        self.conv4 = sn(nn.Conv2d(c * 8, c * 4, 3, 1, 1, bias=False))
        self.conv5 = sn(nn.Conv2d(c * 4, c * 2, 3, 1, 1, bias=False))
        self.conv6 = sn(nn.Conv2d(c * 2, c, 3, 1, 1, bias=False))
        self.conv7 = sn(nn.Conv2d(c, c, 3, 1, 1, bias=False))
        self.conv8 = sn(nn.Conv2d(c, c, 3, 1, 1, bias=False))
        self.conv9 = nn.Conv2d(c, 1, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Realness logits ``(B, 1, H, W)`` of ``x`` (``(B, C, H, W)`` in [0, 1], H and W
        multiples of 8)."""
        if x.shape[-2] % 8 or x.shape[-1] % 8:
            raise ValueError(
                f"UNetDiscriminatorSN needs a height and width divisible by 8, got {x.shape}"
            )

        def act(t: torch.Tensor) -> torch.Tensor:
            return F.leaky_relu(t, 0.2)

        def up(t: torch.Tensor) -> torch.Tensor:
            return F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)

        x0 = act(self.conv0(x))
        x1 = act(self.conv1(x0))
        x2 = act(self.conv2(x1))
        x3 = act(self.conv3(x2))
        x4 = act(self.conv4(up(x3)))
        if self.skip_connection:
            x4 = x4 + x2
        x5 = act(self.conv5(up(x4)))
        if self.skip_connection:
            x5 = x5 + x1
        x6 = act(self.conv6(up(x5)))
        if self.skip_connection:
            x6 = x6 + x0
        out = act(self.conv7(x6))
        out = act(self.conv8(out))
        return self.conv9(out)


def vanilla_gan_loss(logits: torch.Tensor, target_is_real: bool) -> torch.Tensor:
    """BasicSR's ``vanilla`` GAN loss: binary cross-entropy of logits against 1 or 0.

    The generator uses ``vanilla_gan_loss(D(fake), True)``; the discriminator
    ``vanilla_gan_loss(D(real), True) + vanilla_gan_loss(D(fake.detach()), False)``.
    """
    target = torch.ones_like(logits) if target_is_real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


def gaussian_blur(x: torch.Tensor, kernel_size: int = 71, sigma: float = 10.0) -> torch.Tensor:
    """Separable Gaussian blur with zero padding (the size is kept).

    Args:
        x: ``(B, C, H, W)``.
        kernel_size: odd kernel size.
        sigma: standard deviation in pixels.

    Returns:
        Blurred tensor, same shape.
    """
    if kernel_size % 2 == 0 or kernel_size < 1 or sigma <= 0:
        raise ValueError(f"need an odd kernel_size and sigma > 0, got {kernel_size}, {sigma}")
    ax = torch.arange(kernel_size, dtype=torch.float64, device=x.device) - kernel_size // 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = (g / g.sum()).to(x.dtype)
    c = x.shape[1]
    p = kernel_size // 2
    kx = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    ky = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)
    x = F.conv2d(x, kx, padding=(0, p), groups=c)
    return F.conv2d(x, ky, padding=(p, 0), groups=c)


def soft_mask_labels(
    mask: torch.Tensor, kernel_size: int = 71, sigma: float = 10.0
) -> torch.Tensor:
    """SM-PatchGAN soft labels: the hole mask blurred at full resolution with zero padding.

    Values lie in [0, 1]: 1 deep inside a hole, falling off across its border (and towards the
    image border, because of the zero padding).
    """
    return gaussian_blur(mask.float(), kernel_size, sigma).clamp(0, 1)


def discriminator_loss(
    d_fake: torch.Tensor,
    d_real: torch.Tensor,
    soft_labels: torch.Tensor,
    *,
    reproduce_aot_code_form: bool = False,
) -> torch.Tensor:
    """LSGAN discriminator loss with soft mask labels.

    Paper form: ``E[(D(comp) - (1 - s))^2] + E[(D(y) - 1)^2]`` (real regions of the composite
    count as real). Code form (AOT's released ``smgan``): ``MSE(D(comp), s) + MSE(D(y), 0)``.

    Args:
        d_fake: ``D(comp.detach())``, ``(B, 1, H, W)``.
        d_real: ``D(y)``, ``(B, 1, H, W)``.
        soft_labels: ``s``, ``(B, 1, H, W)``.
        reproduce_aot_code_form: use the code form instead of the paper form.

    Returns:
        Scalar loss.
    """
    if reproduce_aot_code_form:
        return F.mse_loss(d_fake, soft_labels) + F.mse_loss(d_real, torch.zeros_like(d_real))
    return ((d_fake - (1 - soft_labels)) ** 2).mean() + ((d_real - 1) ** 2).mean()


def generator_adversarial_loss(
    d_fake: torch.Tensor,
    mask: torch.Tensor,
    *,
    reproduce_aot_code_form: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """LSGAN generator loss on the holes.

    Paper form: ``E[m (D(comp) - 1)^2] / mean(m)``. Code form: ``mean(MSE(D(comp), 1) * m /
    mean(m))``, where the scalar MSE makes the mask weighting cancel.

    Args:
        d_fake: ``D(comp)``, ``(B, 1, H, W)``.
        mask: ``(B, 1, H, W)`` hole mask.
        reproduce_aot_code_form: use the code form.
        eps: added to ``mean(m)``.

    Returns:
        Scalar loss.
    """
    m = mask.to(d_fake.dtype)
    if reproduce_aot_code_form:
        return (F.mse_loss(d_fake, torch.ones_like(d_fake)) * m / (m.mean() + eps)).mean()
    return (m * (d_fake - 1) ** 2).mean() / (m.mean() + eps)
