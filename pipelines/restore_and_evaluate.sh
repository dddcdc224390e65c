#!/usr/bin/env bash
# Restore a folder of low-quality images, then score the results against ground truth with
# the challenge metrics (PSNR, SSIM, LPIPS, DISTS, NIQE and the SCORE).
#   pipelines/restore_and_evaluate.sh LQ_DIR GT_DIR OUT_DIR [CONFIG] [extra raim restore args]
# Multi-GPU: RAIM_LAUNCH="accelerate launch --multi_gpu --num_processes 8 -m" pipelines/...
set -euo pipefail
LQ=${1:?low-quality folder}; GT=${2:?ground-truth folder}; OUT=${3:?output folder}
CONFIG=${4:-sdxl}; shift $(( $# < 4 ? $# : 4 ))
LAUNCH=${RAIM_LAUNCH:-python -m}
$LAUNCH raim_diffusion.cli restore "$LQ" -o "$OUT/images" --config "$CONFIG" "$@" || \
  echo "some images failed; see $OUT/images/failures*.jsonl" >&2
raim eval --pred "$OUT/images" --gt "$GT" --csv "$OUT/metrics.csv" --json "$OUT/metrics.json"
