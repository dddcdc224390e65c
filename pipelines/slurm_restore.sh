#!/usr/bin/env bash
# Restore a large folder on a SLURM cluster: N nodes x G GPUs, one raim process per GPU.
#   sbatch --nodes=4 pipelines/slurm_restore.sh /data/in /data/out sdxl
# A rerun (or `sbatch --dependency=afternotok:...` after a preemption) skips every finished
# output, so the job resumes where it stopped; failures are listed in OUT/failures.rankN.jsonl.
#SBATCH --job-name=raim-restore
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --requeue
set -euo pipefail
IN=${1:?input folder}; OUT=${2:?output folder}; CONFIG=${3:-sdxl}
GPUS=${SLURM_GPUS_ON_NODE:-8}
MASTER=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun accelerate launch \
  --multi_gpu --num_machines "$SLURM_NNODES" --num_processes $((SLURM_NNODES * GPUS)) \
  --machine_rank "$SLURM_NODEID" --main_process_ip "$MASTER" --main_process_port 29500 \
  -m raim_diffusion.cli restore "$IN" -o "$OUT" --config "$CONFIG" --quiet
