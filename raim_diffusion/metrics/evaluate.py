"""Evaluate a folder of restored images against a folder of ground truths.

Files are paired by their path relative to the folder without the suffix (``a/0001.png`` in
``--pred`` pairs with ``a/0001.jpg`` in ``--gt``). Every pairing problem (a prediction without
ground truth, a ground truth without prediction, two files with the same stem, different sizes)
is reported up front, all at once, before any metric runs. Images of equal size are evaluated in
batches.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.utils import logging

from ..errors import InvalidImageError, RaimError
from ..ops import resize
from ._io import atomic_write, find_images, image_size, load_rgb
from .conventions import ALL_METRICS, DEFAULT_CONVENTIONS, FULL_REFERENCE_METRICS, MetricConventions
from .iqa import IQAMetrics, parse_metric_list, require_pyiqa
from .score import challenge_score, mean_metrics, mean_of_scores, score_of_means

logger = logging.get_logger(__name__)

__all__ = ["EvaluationResult", "ImagePair", "PairingError", "evaluate_folders", "pair_images"]

_MAX_LISTED = 20


class PairingError(RaimError, ValueError):
    """The prediction and ground-truth folders do not pair up one to one."""


@dataclass(frozen=True)
class ImagePair:
    """A restored image and its ground truth (`None` in no-reference mode).

    Args:
        name (`str`): The prediction's path relative to its folder (the report's key).
        pred (`Path`): The restored image.
        gt (`Path`, *optional*): Its ground truth.
    """

    name: str
    pred: Path
    gt: Path | None = None


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def _index_by_stem(folder: Path, role: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise PairingError(f"--{role} {str(folder)!r} is not a folder.")
    files = find_images(folder)
    index: dict[str, Path] = {}
    clashes: list[str] = []
    for f in files:
        key = f.relative_to(folder).with_suffix("").as_posix()
        if key in index:
            clashes.append(f"{index[key].name} / {f.name}")
        index[key] = f
    if clashes:
        raise PairingError(
            f"--{role} {str(folder)!r} has several images with the same name stem, so pairing "
            f"is ambiguous: {_listing(clashes)}."
        )
    if not index:
        raise PairingError(f"--{role} {str(folder)!r} holds no images.")
    return index


def _check_distinct_folders(pred_dir: Path, gt_dir: Path) -> None:
    """Refuse a prediction folder that is, holds or lies in the ground-truth folder: the
    images would be compared with themselves, or found as both predictions and ground truths."""
    if not (pred_dir.is_dir() and gt_dir.is_dir()):
        return  # _index_by_stem names the missing folder
    pred, gt = pred_dir.resolve(), gt_dir.resolve()
    if pred == gt:
        raise PairingError(
            f"--pred {str(pred_dir)!r} and --gt {str(gt_dir)!r} are the same folder; the "
            "predictions would be compared with themselves."
        )
    for inner, outer, a, b in ((pred, gt, "pred", "gt"), (gt, pred, "gt", "pred")):
        if outer in inner.parents:
            raise PairingError(
                f"--{a} {str(inner)!r} lies inside --{b} {str(outer)!r}, so its images would "
                f"be read as --{b} images too; use two separate folders."
            )


def pair_images(
    pred_dir: str | os.PathLike, gt_dir: str | os.PathLike | None = None
) -> list[ImagePair]:
    """Pair restored images with ground truths by relative path without suffix.

    Args:
        pred_dir (`str` or `os.PathLike`): Folder of restored images.
        gt_dir (`str` or `os.PathLike`, *optional*): Folder of ground truths; `None` for NIQE only.

    Returns:
        `list[ImagePair]`: sorted by name.

    Raises:
        `PairingError`: listing every missing and extra file, or stem clashes; or folders that
            are the same or nested.
    """
    pred_dir = Path(pred_dir)
    if gt_dir is not None:
        _check_distinct_folders(pred_dir, Path(gt_dir))
    preds = _index_by_stem(pred_dir, "pred")
    if gt_dir is None:
        return [ImagePair(p.relative_to(pred_dir).as_posix(), p) for _, p in sorted(preds.items())]
    gt_dir = Path(gt_dir)
    gts = _index_by_stem(gt_dir, "gt")
    missing = sorted(set(gts) - set(preds))
    extra = sorted(set(preds) - set(gts))
    if missing or extra:
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} ground truth(s) in {str(gt_dir)!r} have no prediction in "
                f"{str(pred_dir)!r}: {_listing([gts[k].name for k in missing])}"
            )
        if extra:
            parts.append(
                f"{len(extra)} prediction(s) in {str(pred_dir)!r} have no ground truth in "
                f"{str(gt_dir)!r}: {_listing([preds[k].name for k in extra])}"
            )
        raise PairingError("; ".join(parts) + ".")
    return [
        ImagePair(preds[k].relative_to(pred_dir).as_posix(), preds[k], gts[k])
        for k in sorted(preds)
    ]


def _check_sizes(pairs: list[ImagePair], resize_pred: bool) -> tuple[dict, dict[str, str]]:
    """Read each header once: sizes for batching, unreadable files, size mismatches."""
    sizes: dict[str, tuple[int, int]] = {}
    failures: dict[str, str] = {}
    mismatched: list[str] = []
    for pair in pairs:
        try:
            pred_hw = image_size(pair.pred)
            gt_hw = image_size(pair.gt) if pair.gt is not None else pred_hw
        except InvalidImageError as exc:
            failures[pair.name] = str(exc)
            continue
        if pred_hw != gt_hw and not resize_pred:
            mismatched.append(
                f"{pair.name} ({pred_hw[1]}x{pred_hw[0]} vs gt {gt_hw[1]}x{gt_hw[0]})"
            )
        sizes[pair.name] = gt_hw
    if mismatched:
        raise PairingError(
            f"{len(mismatched)} prediction(s) differ in size from their ground truth "
            f"(width x height): {_listing(mismatched)}. Pass --resize-pred (resize_pred=True) "
            "to resize predictions to the ground-truth size with antialiased bicubic."
        )
    return sizes, failures


@dataclass
class EvaluationResult:
    """Per-image metric values and their summary.

    Args:
        per_image (`dict[str, dict[str, float]]`):
            file name -> metric -> value; holds ``"score"`` too when all five metrics were run.
        mean (`dict[str, float]`): metric -> mean over the evaluated images.
        score (`float`, *optional*):
            The challenge SCORE of the set (score of means == mean of scores); `None` unless all
            five metrics were run.
        failures (`dict[str, str]`): file name -> why it could not be evaluated.
    """

    per_image: dict[str, dict[str, float]]
    mean: dict[str, float]
    score: float | None
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics that were computed, in canonical order."""
        return tuple(m for m in ALL_METRICS if m in self.mean)

    def mean_of_scores(self) -> float | None:
        """Mean of the per-image SCOREs (`None` without all five metrics)."""
        return mean_of_scores(self.per_image) if self.score is not None else None

    def score_of_means(self) -> float | None:
        """SCORE of the per-metric means (`None` without all five metrics)."""
        return score_of_means(self.per_image) if self.score is not None else None

    def to_dict(self) -> dict:
        """``{"per_image": {file: {metric: value}}, "mean": {metric: value}, "score": ...}``."""
        return {"per_image": self.per_image, "mean": self.mean, "score": self.score}

    def write_json(self, path: str | os.PathLike) -> Path:
        """Write `to_dict` as JSON (atomically). Returns the path."""
        with atomic_write(path, mode="w") as fh:
            # NaN/inf are not JSON: written as null.
            json.dump(_finite_or_none(self.to_dict()), fh, indent=2, allow_nan=False)
            fh.write("\n")
        return Path(path)

    def write_csv(self, path: str | os.PathLike) -> Path:
        """One row per image, then a ``mean`` row; a ``score`` column when available."""
        columns = list(self.metrics) + (["score"] if self.score is not None else [])
        with atomic_write(path, mode="w") as fh:
            writer = csv.writer(fh)
            writer.writerow(["file", *columns])
            for name, row in self.per_image.items():
                writer.writerow([name, *(repr(row[c]) for c in columns)])
            summary = dict(self.mean, score=self.score)
            writer.writerow(["mean", *(repr(summary[c]) for c in columns)])
        return Path(path)

    def format_table(self, per_image: bool = True) -> str:
        """A plain-text table of the per-image values (optional) and the summary."""
        columns = list(self.metrics) + (["score"] if self.score is not None else [])
        rows = list(self.per_image.items()) if per_image else []
        summary = dict(self.mean)
        if self.score is not None:
            summary["score"] = self.score
        rows.append(("mean", summary))
        width = max([4, *(len(name) for name, _ in rows)])
        lines = [f"{'file':<{width}}  " + "  ".join(f"{c:>9}" for c in columns)]
        for name, row in rows:
            lines.append(f"{name:<{width}}  " + "  ".join(f"{row[c]:>9.4f}" for c in columns))
        if per_image and len(rows) > 1:
            lines.insert(len(lines) - 1, "-" * len(lines[0]))
        return "\n".join(lines)


def evaluate_folders(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike | None = None,
    *,
    metrics: str | Sequence[str] | None = None,
    device: str | torch.device | None = None,
    conventions: MetricConventions = DEFAULT_CONVENTIONS,
    weights_dir: str | os.PathLike | None = None,
    batch_size: int = 4,
    resize_pred: bool = False,
    progress: bool | Callable | None = None,
    iqa: IQAMetrics | None = None,
) -> EvaluationResult:
    """Compute the metrics (and the challenge SCORE) over a folder of restored images.

    Args:
        pred_dir (`str` or `os.PathLike`): Restored images.
        gt_dir (`str` or `os.PathLike`, *optional*):
            Ground truths; without it only no-reference metrics (NIQE) can run.
        metrics (`str` or `Sequence[str]`, *optional*):
            Subset of ``psnr, ssim, lpips, dists, niqe``. Defaults to all five with ``gt_dir``,
            ``niqe`` without.
        device (`str` or `torch.device`, *optional*): CUDA when available, else CPU.
        conventions (`MetricConventions`, *optional*): Defaults to the challenge's.
        weights_dir (`str` or `os.PathLike`, *optional*): Extra folder searched for weights.
        batch_size (`int`, defaults to 4): Images of the same size evaluated together.
        resize_pred (`bool`, defaults to `False`):
            Resize predictions to the ground-truth size (antialiased bicubic) instead of failing.
        progress (`bool`, *optional*): Show a tqdm progress bar (`None`: only on a terminal).
        iqa (`IQAMetrics`, *optional*): Reuse already built metrics (then ``metrics``,
            ``device``, ``conventions`` and ``weights_dir`` are taken from it).

    Returns:
        `EvaluationResult`

    Raises:
        `ImportError`: pyiqa (the ``eval`` extra) is not installed; checked first.
        `PairingError`: missing / extra / clashing / mismatched files (all listed).
        `MissingWeightsError`: weights for a selected metric are not available offline.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1.")
    if iqa is None:
        require_pyiqa()  # an incomplete install is reported before the folders are read
        if metrics is None:
            metrics = ALL_METRICS if gt_dir is not None else ("niqe",)
        selected = parse_metric_list(metrics)
        if gt_dir is None:
            needing = [m for m in selected if m in FULL_REFERENCE_METRICS]
            if needing:
                raise ValueError(
                    f"metrics {needing} compare with a ground truth: pass gt_dir (--gt), or "
                    "select only no-reference metrics (--metrics niqe)."
                )
        pairs = pair_images(pred_dir, gt_dir)
        sizes, failures = _check_sizes(pairs, resize_pred)
        iqa = IQAMetrics(selected, device=device, conventions=conventions, weights_dir=weights_dir)
    else:
        if gt_dir is None and iqa.needs_reference:
            raise ValueError("The given iqa needs a ground truth: pass gt_dir (--gt).")
        pairs = pair_images(pred_dir, gt_dir)
        sizes, failures = _check_sizes(pairs, resize_pred)

    # Group by size (stable order) so each batch stacks without padding.
    groups: dict[tuple[int, int], list[ImagePair]] = {}
    for pair in pairs:
        if pair.name in sizes:
            groups.setdefault(sizes[pair.name], []).append(pair)
    batches = [
        (hw, items[i : i + batch_size])
        for hw, items in groups.items()
        for i in range(0, len(items), batch_size)
    ]

    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(pairs) - len(failures),
        desc="eval",
        unit="img",
        disable=False if progress else (None if progress is None else True),
    )
    values: dict[str, dict[str, float]] = {}
    for hw, batch in batches:
        preds, gts, names = [], [], []
        for pair in batch:
            try:
                p = resize(load_rgb(pair.pred), hw)
                g = load_rgb(pair.gt) if pair.gt is not None and iqa.needs_reference else None
            except InvalidImageError as exc:
                failures[pair.name] = str(exc)
                logger.info(f"{pair.name}: {exc}")
                bar.update(1)
                continue
            preds.append(p)
            if g is not None:
                gts.append(g)
            names.append(pair.name)
        if not names:
            continue
        pred_t = torch.cat(preds)
        gt_t = torch.cat(gts) if gts else None
        try:
            rows = _evaluate_batch(iqa, pred_t, gt_t)
        except ValueError as exc:  # e.g. too small for NIQE: these images fail, others go on
            for name in names:
                failures[name] = str(exc)
                logger.info(f"{name}: {exc}")
            bar.update(len(names))
            continue
        for name, row in zip(names, rows, strict=True):
            values[name] = row
        bar.update(len(names))
    bar.close()

    if not values:
        raise RaimError(
            f"No image could be evaluated ({len(failures)} failed): "
            + _listing([f"{k}: {v}" for k, v in failures.items()])
        )
    per_image = {name: values[name] for name in sorted(values)}
    full = all(m in iqa.metrics for m in ALL_METRICS)
    mean = mean_metrics(per_image)
    if full:
        for row in per_image.values():
            row["score"] = float(challenge_score(row))
    score = float(challenge_score(mean)) if full else None
    if score is not None and not math.isfinite(score):
        logger.warning(f"The SCORE is not finite ({score}); check the per-image values.")
    return EvaluationResult(per_image=per_image, mean=mean, score=score, failures=failures)


def _finite_or_none(obj):
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _evaluate_batch(
    iqa: IQAMetrics, pred: torch.Tensor, gt: torch.Tensor | None
) -> list[dict[str, float]]:
    """Evaluate a batch; on out-of-memory, fall back to one image at a time."""
    try:
        out = iqa(pred, gt)
    except torch.OutOfMemoryError:
        if pred.shape[0] == 1:
            raise
        logger.warning(
            f"Out of memory on a batch of {pred.shape[0]} images of {tuple(pred.shape[-2:])}; "
            "evaluating them one at a time."
        )
        if iqa.device.type == "cuda":
            torch.cuda.empty_cache()
        rows: list[dict[str, float]] = []
        for i in range(pred.shape[0]):
            rows.extend(
                _evaluate_batch(iqa, pred[i : i + 1], gt[i : i + 1] if gt is not None else None)
            )
        return rows
    return [{m: float(out[m][i]) for m in iqa.metrics} for i in range(pred.shape[0])]
