#!/usr/bin/env bash
# One independent job per sub-folder with a SLURM array (no inter-node communication):
#   ls -d /data/in/*/ > folders.txt
#   sbatch --array=1-$(wc -l < folders.txt) pipelines/slurm_array.sh folders.txt /data/out sdxl
#SBATCH --job-name=raim-array
#SBATCH --gpus=1
#SBATCH --time=12:00:00
set -euo pipefail
LIST=${1:?file with one input folder per line}; OUT=${2:?output folder}; CONFIG=${3:-sdxl}
FOLDER=$(sed -n "${SLURM_ARRAY_TASK_ID}p" "$LIST")
raim restore "$FOLDER" -o "$OUT/$(basename "$FOLDER")" --config "$CONFIG" --quiet
