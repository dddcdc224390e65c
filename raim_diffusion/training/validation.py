"""Validation metrics of the trainers: the very metrics of ``raim eval`` (one implementation).

PSNR and SSIM (and LPIPS / DISTS when their weights are cached) come from
[`raim_diffusion.metrics.IQAMetrics`] with the challenge's conventions, so a validation number
and a ``raim eval`` number of the same images are the same number.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.utils import logging

from raim_diffusion.errors import MissingWeightsError

logger = logging.get_logger(__name__)

__all__ = ["ValidationMetrics", "LPIPSLoss"]


class ValidationMetrics:
    """PSNR/SSIM of ``raim eval``, plus optional metrics used only when their weights exist.

    Args:
        metrics: metrics that must be available (default PSNR and SSIM).
        device: where the metrics run.
        optional: metrics added when their weights are cached (LPIPS, DISTS), skipped quietly
            otherwise.
    """

    def __init__(
        self,
        metrics: Sequence[str] = ("psnr", "ssim"),
        device: str | torch.device = "cpu",
        optional: Sequence[str] = (),
    ) -> None:
        from raim_diffusion.metrics import IQAMetrics

        self._sets = [IQAMetrics(",".join(metrics), device=device)]
        for name in optional:
            try:
                self._sets.append(IQAMetrics(name, device=device))
            except (MissingWeightsError, OSError, RuntimeError) as err:
                logger.info("validation without %s: %s", name, err)

    @property
    def names(self) -> list[str]:
        """The metrics computed."""
        return [m for s in self._sets for m in s.metrics]

    @torch.no_grad()
    def __call__(self, pred: torch.Tensor, gt: torch.Tensor) -> dict[str, float]:
        """Metrics of one image pair ``(1, 3, H, W)`` in [0, 1]."""
        out: dict[str, float] = {}
        pred = pred.float().clamp(0, 1)
        for metrics in self._sets:
            out.update({k: float(v.mean()) for k, v in metrics(pred, gt.float()).items()})
        return out


class LPIPSLoss(torch.nn.Module):
    """LPIPS (pyiqa's, the metric of ``raim eval``) as a differentiable loss.

    Raises:
        MissingWeightsError: its weights are not cached (the message says where they go).
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        super().__init__()
        from raim_diffusion.metrics import IQAMetrics

        net = IQAMetrics("lpips", device=device)._nets["lpips"]
        net.as_loss = True
        net.loss_weight = 1.0
        net.loss_reduction = "mean"
        self.net = net.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> LPIPSLoss:
        # Always frozen in eval mode, whatever the surrounding module does.
        return super().train(False)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS of ``pred`` against ``target`` (both in [0, 1]); differentiable in pred."""
        return self.net(pred.clamp(0, 1), target)
