#!/usr/bin/env bash
# One rank of a job whose ranks srun starts one task each: maps Slurm's task
# variables to those torch.distributed's env:// initialization reads, then runs
# the command (pretrain_gpt.py joins with `init_process_group(backend)`).
#
#   srun ... bash examples/slurm/rank_env.sh python pretrain_gpt.py [flags]
#
# RANK = SLURM_PROCID (global task id), WORLD_SIZE = SLURM_NTASKS, LOCAL_RANK =
# SLURM_LOCALID (the task's index on its node: its GPU is LOCAL_RANK modulo the
# GPUs the task sees, so a launcher that binds one GPU per task works too).
# MASTER_ADDR / MASTER_PORT: the rendezvous on rank 0's node, exported by the
# batch script (examples/slurm/pretrain_gpt.sbatch).
set -euo pipefail
: "${SLURM_PROCID:?run under srun (SLURM_PROCID is not set)}"
: "${MASTER_ADDR:?export MASTER_ADDR (the first node of the job) before srun}"
: "${MASTER_PORT:?export MASTER_PORT before srun}"
export RANK="$SLURM_PROCID" WORLD_SIZE="$SLURM_NTASKS" LOCAL_RANK="$SLURM_LOCALID"
exec "$@"
