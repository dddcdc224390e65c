"""Challenge metrics (PSNR, SSIM, LPIPS, DISTS, NIQE via pyiqa), the SCORE, and the user study.

Conventions (channels, border, backbones) are fixed in one place,
`raim_diffusion.metrics.conventions`; see its docstring for what the challenge used.
"""

from __future__ import annotations

from .conventions import (
    ALL_METRICS,
    DEFAULT_CONVENTIONS,
    FULL_REFERENCE_METRICS,
    NO_REFERENCE_METRICS,
    MetricConventions,
)
from .evaluate import EvaluationResult, ImagePair, PairingError, evaluate_folders, pair_images
from .iqa import IQAMetrics, parse_metric_list
from .score import SCORE_TERMS, challenge_score, mean_metrics, mean_of_scores, score_of_means
from .study import StudyError, StudyScores, build_study, load_judge_file, score_study, write_study
from .weights import WEIGHT_FILES, WeightFile, resolve_weights

__all__ = [
    "ALL_METRICS",
    "DEFAULT_CONVENTIONS",
    "FULL_REFERENCE_METRICS",
    "NO_REFERENCE_METRICS",
    "SCORE_TERMS",
    "WEIGHT_FILES",
    "EvaluationResult",
    "IQAMetrics",
    "ImagePair",
    "MetricConventions",
    "PairingError",
    "StudyError",
    "StudyScores",
    "WeightFile",
    "build_study",
    "challenge_score",
    "evaluate_folders",
    "load_judge_file",
    "mean_metrics",
    "mean_of_scores",
    "pair_images",
    "parse_metric_list",
    "resolve_weights",
    "score_of_means",
    "score_study",
    "write_study",
]
