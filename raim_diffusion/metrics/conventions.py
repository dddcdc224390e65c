"""The one place where the metric conventions (channel, border, range, backbone) are fixed.

The NTIRE 2024 RAIM challenge computed its metrics with pyiqa's default settings, so the
defaults here are pyiqa's defaults (pyiqa 0.1.x, ``pyiqa/default_model_configs.py``):

- ``psnr``: all three **RGB** channels (``test_y_channel=False``), inputs in ``[0, 1]``,
  ``data_range=1``, no rounding, ``10*log10(1 / (MSE + 1e-8))``.
- ``ssim``: the **Y channel** (``test_y_channel=True``) of YIQ, i.e. ``0.299 R + 0.587 G + 0.114 B``
  (the same weights as BT.601 full-range luma), scaled to ``[0, 255]`` and **rounded** to
  integers like MATLAB, 11x11 Gaussian window with sigma 1.5, "valid" filtering, no
  downsampling, computed in float64.
- ``lpips``: AlexNet backbone, LPIPS v0.1 (pyiqa's ``lpips``; ``lpips-vgg`` is the VGG one).
- ``dists``: VGG16 backbone with the official DISTS weights.
- ``niqe``: no-reference, on the restored image only, Y channel of YIQ rounded to ``[0, 255]``,
  the original MATLAB pristine model ``niqe_modelparameters.mat``, 96x96 blocks.
- No border is cropped (``crop_border=0``) for any metric.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ALL_METRICS",
    "DEFAULT_CONVENTIONS",
    "FULL_REFERENCE_METRICS",
    "LOWER_IS_BETTER",
    "NO_REFERENCE_METRICS",
    "MetricConventions",
]

#: Metrics that compare a restored image with its ground truth.
FULL_REFERENCE_METRICS: tuple[str, ...] = ("psnr", "ssim", "lpips", "dists")
#: Metrics computed on the restored image alone.
NO_REFERENCE_METRICS: tuple[str, ...] = ("niqe",)
#: The five metrics of the challenge SCORE, in the order the formula lists them.
ALL_METRICS: tuple[str, ...] = FULL_REFERENCE_METRICS + NO_REFERENCE_METRICS
#: Metrics where a smaller value means a better image.
LOWER_IS_BETTER: frozenset[str] = frozenset({"lpips", "dists", "niqe"})

_COLOR_SPACES = ("yiq", "ycbcr")
_LPIPS_NETS = ("alex", "vgg")


@dataclass(frozen=True)
class MetricConventions:
    """How each metric treats the images. The defaults are the challenge's (pyiqa defaults).

    Args:
        psnr_y_channel (`bool`, defaults to `False`):
            Compute PSNR on the luma channel instead of on the three RGB channels.
        ssim_y_channel (`bool`, defaults to `True`):
            Compute SSIM on the luma channel (rounded to 8-bit levels) instead of on RGB.
        niqe_y_channel (`bool`, defaults to `True`):
            NIQE on the luma channel; `False` uses pyiqa's grey conversion of the same weights.
        color_space (`str`, defaults to `"yiq"`):
            Where the luma comes from: `"yiq"` (full-range, ``0.299/0.587/0.114``) or `"ycbcr"`
            (BT.601 limited range ``16..235``, what many SR papers and BasicSR call "Y").
        crop_border (`int`, defaults to `0`):
            Pixels removed from every side of both images before PSNR, SSIM and NIQE.
        lpips_net (`str`, defaults to `"alex"`):
            LPIPS backbone, `"alex"` (pyiqa ``lpips``) or `"vgg"` (pyiqa ``lpips-vgg``).
        data_range (`float`, defaults to `1.0`):
            The value of a white pixel in the tensors handed to the metrics. Images are always
            converted to float in ``[0, 1]`` at the edge, so this stays 1.
    """

    psnr_y_channel: bool = False
    ssim_y_channel: bool = True
    niqe_y_channel: bool = True
    color_space: str = "yiq"
    crop_border: int = 0
    lpips_net: str = "alex"
    data_range: float = 1.0

    def __post_init__(self) -> None:
        if self.color_space not in _COLOR_SPACES:
            raise ValueError(
                f"color_space={self.color_space!r} is not supported; use one of {_COLOR_SPACES}."
            )
        if not isinstance(self.crop_border, int) or self.crop_border < 0:
            raise ValueError(f"crop_border={self.crop_border!r} must be an integer >= 0.")
        if self.lpips_net not in _LPIPS_NETS:
            raise ValueError(
                f"lpips_net={self.lpips_net!r} is not supported; use one of {_LPIPS_NETS}."
            )
        if self.data_range != 1.0:
            raise ValueError(
                f"data_range={self.data_range!r}: images are handed to the metrics as float "
                "tensors in [0, 1], so data_range must be 1.0."
            )

    def pyiqa_options(self, metric: str) -> tuple[str, dict]:
        """The pyiqa metric name and keyword options that implement ``metric`` here.

        Args:
            metric (`str`): One of `ALL_METRICS`.

        Returns:
            `tuple[str, dict]`: the name for ``pyiqa.create_metric`` and its keyword options.
        """
        if metric == "psnr":
            return "psnr", {
                "test_y_channel": self.psnr_y_channel,
                "color_space": self.color_space,
                "crop_border": self.crop_border,
            }
        if metric == "ssim":
            return "ssim", {
                "test_y_channel": self.ssim_y_channel,
                "color_space": self.color_space,
                "crop_border": self.crop_border,
            }
        if metric == "lpips":
            return ("lpips" if self.lpips_net == "alex" else "lpips-vgg"), {}
        if metric == "dists":
            return "dists", {}
        if metric == "niqe":
            return "niqe", {
                "test_y_channel": self.niqe_y_channel,
                "color_space": self.color_space,
                "crop_border": self.crop_border,
            }
        raise ValueError(f"metric={metric!r} is not one of {ALL_METRICS}.")


#: The challenge's conventions.
DEFAULT_CONVENTIONS = MetricConventions()
