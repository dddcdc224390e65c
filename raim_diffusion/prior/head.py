"""MiAlgo's learned refinement head: a per-pixel blend of the input back into the restoration.

MiAlgo (NTIRE 2024 RAIM winner) adds to its restorer a tiny network that looks at the
low-quality input and the restorer's output and predicts, per pixel, how much of the
restoration to keep: ``HR = (1 - alpha) * LR + alpha * out`` (spec section 9). Stage 1 applies
it when a prior folder holds one ([`PriorModel`] saves and loads it), in place of the fixed
``input_blend``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

__all__ = ["RefinementHead"]


class RefinementHead(ModelMixin, ConfigMixin):
    """Three convolutions on ``[LR, restoration]`` predicting a per-pixel alpha in [0, 1].

    Args:
        channels (`int`, defaults to 3): Image channels of each input.
        hidden_channels (`int`, defaults to 16): Width of the two hidden layers (MiAlgo: at
            most 16).
        kernel_size (`int`, defaults to 3): Odd kernel size of every convolution.
        init_alpha (`float`, defaults to 0.95): Alpha everywhere at initialisation (the last
            layer's weights start at zero), so an untrained head keeps most of the restoration.
    """

    @register_to_config
    def __init__(
        self,
        channels: int = 3,
        hidden_channels: int = 16,
        kernel_size: int = 3,
        init_alpha: float = 0.95,
    ) -> None:
        super().__init__()
        if kernel_size % 2 == 0 or kernel_size < 1:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        if not 0 < init_alpha < 1:
            raise ValueError(f"init_alpha must lie in (0, 1), got {init_alpha}")
        if not 1 <= hidden_channels <= 64:
            raise ValueError(f"hidden_channels must lie in [1, 64], got {hidden_channels}")
        p = kernel_size // 2
        self.conv1 = nn.Conv2d(2 * channels, hidden_channels, kernel_size, padding=p)
        self.conv2 = nn.Conv2d(hidden_channels, hidden_channels, kernel_size, padding=p)
        self.conv3 = nn.Conv2d(hidden_channels, 1, kernel_size, padding=p)
        with torch.no_grad():
            self.conv3.weight.zero_()
            self.conv3.bias.fill_(float(torch.logit(torch.tensor(init_alpha))))

    def alpha(self, lr: torch.Tensor, restored: torch.Tensor) -> torch.Tensor:
        """Per-pixel alpha ``(N, 1, H, W)`` in [0, 1] from the input and the restoration
        (both ``(N, channels, H, W)``, the same size)."""
        if lr.shape != restored.shape:
            raise ValueError(
                f"lr {tuple(lr.shape)} and restored {tuple(restored.shape)} must have the same "
                "shape; resize the input to the output size first"
            )
        h = F.leaky_relu(self.conv1(torch.cat([lr, restored], dim=1)), 0.2)
        h = F.leaky_relu(self.conv2(h), 0.2)
        return torch.sigmoid(self.conv3(h))

    def forward(self, lr: torch.Tensor, restored: torch.Tensor) -> torch.Tensor:
        """``(1 - alpha) * lr + alpha * restored``."""
        a = self.alpha(lr, restored).to(restored.dtype)
        return torch.lerp(lr.to(restored.dtype), restored, a)
