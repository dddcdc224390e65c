"""PSNR, SSIM, LPIPS, DISTS and NIQE through pyiqa, offline, with the challenge conventions.

pyiqa (``pip install "raim-diffusion[eval]"``) provides the reference implementations the
challenge used. This module only builds them with the conventions of
`raim_diffusion.metrics.conventions` and the weights found by
`raim_diffusion.metrics.weights` (never downloading), and runs them on batches.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.hub
from diffusers.utils import logging

from ..errors import MissingWeightsError
from .conventions import (
    ALL_METRICS,
    DEFAULT_CONVENTIONS,
    FULL_REFERENCE_METRICS,
    MetricConventions,
)
from .weights import required_weight_files, resolve_weights

logger = logging.get_logger(__name__)

__all__ = ["EVAL_INSTALL_HINT", "IQAMetrics", "parse_metric_list", "require_pyiqa"]

# The smallest image side each metric can measure (pyiqa would fail deep inside, or return NaN
# for an empty crop). NIQE: one 96x96 block (MATLAB release and pyiqa); SSIM: one 11x11
# Gaussian window ("valid" filtering); LPIPS: AlexNet's pooling needs 31 pixels, VGG16's 16.
# Found by running the pyiqa networks on growing inputs; DISTS works from 1 pixel.
_MIN_SIDE = {"psnr": 1, "ssim": 11, "lpips": 31, "lpips-vgg": 16, "dists": 1, "niqe": 96}
# Metrics measured after crop_border is removed from every side.
_CROPPED = ("psnr", "ssim", "niqe")


def parse_metric_list(metrics: str | Sequence[str] | None) -> tuple[str, ...]:
    """Normalise a metric selection (``"psnr,ssim"`` or a list) to a tuple in canonical order.

    Args:
        metrics (`str` or `Sequence[str]`, *optional*): `None` means all five.

    Returns:
        `tuple[str, ...]`: distinct metric names, ordered as in `ALL_METRICS`.
    """
    if metrics is None:
        return ALL_METRICS
    if isinstance(metrics, str):
        names = [m.strip().lower() for m in metrics.split(",") if m.strip()]
    else:
        names = [str(m).strip().lower() for m in metrics]
    unknown = [m for m in names if m not in ALL_METRICS]
    if unknown or not names:
        raise ValueError(
            f"metrics={metrics!r}: unknown or empty selection {unknown}; "
            f"choose a comma-separated subset of {', '.join(ALL_METRICS)}."
        )
    return tuple(m for m in ALL_METRICS if m in names)


#: How to install what the metrics need.
EVAL_INSTALL_HINT = 'pip install "raim-diffusion[eval]"'


def require_pyiqa():
    """Import pyiqa, which every metric here runs on, or say how to install it.

    Called before anything else a metric needs (weight files, images), so a missing install is
    reported as such rather than as missing weights.

    Returns:
        The `pyiqa` module.

    Raises:
        `ImportError`: pyiqa is not installed, or is installed but cannot be imported (the
            message says which, and how to install the ``eval`` extra).
    """
    try:
        import pyiqa
    except ImportError as exc:  # the eval extra is optional
        if exc.name == "pyiqa":
            raise ImportError(
                f"the metrics need pyiqa, which is not installed: {EVAL_INSTALL_HINT}",
                name="pyiqa",
            ) from exc
        raise ImportError(
            f"the metrics need pyiqa, which is installed but cannot be imported ({exc}); "
            f"reinstall it with {EVAL_INSTALL_HINT}",
            name="pyiqa",
        ) from exc
    return pyiqa


@contextlib.contextmanager
def _backbone_hub_dir(backbones: dict[str, Path]) -> Iterator[None]:
    """Let torchvision find backbones that live in ``weights_dir`` rather than the hub cache.

    pyiqa builds its AlexNet/VGG16 with ``weights='IMAGENET1K_V1'``, which torchvision looks up
    in ``torch.hub.get_dir()/checkpoints``. There is no argument to point it elsewhere, so for
    the duration of the construction only the hub folder is switched to a temporary one that
    links to the given files, and switched back afterwards.
    """
    if not backbones:
        yield
        return
    previous = torch.hub._hub_dir  # None means "derive from $TORCH_HOME"; restored exactly
    with tempfile.TemporaryDirectory(prefix="raim-hub-") as tmp:
        ckpt = Path(tmp) / "checkpoints"
        ckpt.mkdir()
        for name, path in backbones.items():
            os.symlink(path.resolve(), ckpt / name)
        torch.hub.set_dir(tmp)
        try:
            yield
        finally:
            torch.hub._hub_dir = previous


class IQAMetrics:
    """A set of image-quality metrics evaluated together on batches.

    Args:
        metrics (`str` or `Sequence[str]`, *optional*):
            Subset of ``psnr, ssim, lpips, dists, niqe`` (comma-separated or a list); all five
            by default.
        device (`str` or `torch.device`, *optional*):
            Where to run; CUDA when available, else CPU.
        conventions (`MetricConventions`, *optional*):
            Channel / border / backbone conventions; the challenge's by default.
        weights_dir (`str` or `os.PathLike`, *optional*):
            Folder searched first for the weight files (see `raim_diffusion.metrics.weights`).

    Raises:
        `MissingWeightsError`: if a needed weight file is neither in ``weights_dir`` nor cached.
        `ImportError`: if pyiqa is not installed.

    Example:
        ```py
        >>> m = IQAMetrics("psnr,ssim,niqe", device="cpu")
        >>> values = m(pred, gt)  # dict of float64 tensors of shape (N,)
        ```
    """

    def __init__(
        self,
        metrics: str | Sequence[str] | None = None,
        device: str | torch.device | None = None,
        conventions: MetricConventions = DEFAULT_CONVENTIONS,
        weights_dir: str | os.PathLike | None = None,
    ) -> None:
        if not isinstance(conventions, MetricConventions):
            raise TypeError(
                f"conventions must be a MetricConventions, got {type(conventions).__name__}."
            )
        self.metrics = parse_metric_list(metrics)
        # The install first: without pyiqa, a list of missing weight files would mislead.
        pyiqa = require_pyiqa()
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.conventions = conventions
        self.weights_dir = Path(weights_dir) if weights_dir is not None else None

        pyiqa_names = {m: conventions.pyiqa_options(m) for m in self.metrics}
        # Check every file before building anything, so one error lists all missing files.
        found = resolve_weights([name for name, _ in pyiqa_names.values()], weights_dir)
        self._nets: dict[str, torch.nn.Module] = {}
        for metric, (name, options) in pyiqa_names.items():
            options = dict(options)
            backbones: dict[str, Path] = {}
            hub_dir = Path(torch.hub.get_dir())
            for wf in required_weight_files(name):
                path = found[wf.name]
                if wf.kind == "pyiqa":
                    options["pretrained_model_path"] = str(path)
                elif path != wf.cache_path(hub_dir):
                    backbones[wf.name] = path
            # pyiqa reports loading with print(); keep stdout clean for the CLI tables.
            chatter = io.StringIO()
            try:
                with _backbone_hub_dir(backbones), contextlib.redirect_stdout(chatter):
                    net = pyiqa.create_metric(name, device=self.device, **options)
            except (OSError, RuntimeError) as exc:
                if "download" in str(exc).lower() or "urlopen" in str(exc).lower():
                    raise MissingWeightsError(
                        f"pyiqa tried to download weights for {metric}: {exc}"
                    ) from exc
                raise
            if chatter.getvalue().strip():
                logger.debug(chatter.getvalue().strip())
            self._nets[metric] = net

    @property
    def needs_reference(self) -> bool:
        """Whether any selected metric needs a ground-truth image."""
        return any(m in FULL_REFERENCE_METRICS for m in self.metrics)

    def _check_size(self, hw: tuple[int, int]) -> None:
        """Raise a `ValueError` naming every selected metric the image is too small for."""
        crop = self.conventions.crop_border
        too_small = []
        for metric in self.metrics:
            name = self.conventions.pyiqa_options(metric)[0]
            need = _MIN_SIDE[name]
            side = min(hw) - (2 * crop if metric in _CROPPED else 0)
            if side < need:
                cropped = f" after crop_border={crop}" if crop and metric in _CROPPED else ""
                too_small.append(f"{metric.upper()} needs at least {need}x{need}{cropped}")
        if too_small:
            raise ValueError(
                f"image of {hw[1]}x{hw[0]} pixels is too small: " + "; ".join(too_small) + "."
            )

    @torch.no_grad()
    def __call__(
        self, pred: torch.Tensor, gt: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Evaluate every selected metric on a batch.

        Args:
            pred (`torch.Tensor`): Restored images, (N, 3, H, W) float in [0, 1].
            gt (`torch.Tensor`, *optional*):
                Ground truth of the same shape; required when a full-reference metric is selected.

        Returns:
            `dict[str, torch.Tensor]`: metric -> float64 CPU tensor of shape (N,).
        """
        if not isinstance(pred, torch.Tensor) or pred.ndim != 4 or pred.shape[1] != 3:
            raise ValueError(
                f"pred must be a (N, 3, H, W) tensor, got "
                f"{tuple(pred.shape) if isinstance(pred, torch.Tensor) else type(pred).__name__}."
            )
        if self.needs_reference:
            if gt is None:
                needing = [m for m in self.metrics if m in FULL_REFERENCE_METRICS]
                raise ValueError(f"gt is required for {needing}.")
            if not isinstance(gt, torch.Tensor) or gt.shape != pred.shape:
                raise ValueError(
                    f"gt must be a tensor shaped like pred {tuple(pred.shape)}, got "
                    f"{tuple(gt.shape) if isinstance(gt, torch.Tensor) else type(gt).__name__}."
                )
        lo, hi = float(pred.min()), float(pred.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"pred values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}].")
        self._check_size(tuple(pred.shape[-2:]))
        pred = pred.to(self.device, torch.float32)
        if gt is not None:
            gt = gt.to(self.device, torch.float32)
        out: dict[str, torch.Tensor] = {}
        n = pred.shape[0]
        for metric, net in self._nets.items():
            if metric == "psnr":
                # pyiqa computes in the input dtype; float64 keeps the MSE of large images exact.
                value = net(pred.double(), gt.double())
            elif metric in FULL_REFERENCE_METRICS:
                value = net(pred, gt)
            else:
                value = net(pred)
            out[metric] = value.detach().reshape(n).to("cpu", torch.float64)
        return out
