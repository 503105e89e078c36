# The part of examples/gpt_common.sh and examples/llama_common.sh that does not depend on the
# model family (sourced, not run): the precision recipe, the parallel layout, the optimizer,
# checkpoint and logging flags, and the torchrun launch.
#
# Needs from the sourcing script: MODEL_NAME MIXED_LR DEFAULT_GBS DEFAULT_MBS
# DEFAULT_TRAIN_ITERS DEFAULT_WARMUP_ITERS DEFAULT_TP DEFAULT_PP. Reads the user's PRECISION LR
# LR_MULT MIN_LR TP PP GBS MBS TRAIN_ITERS WARMUP_ITERS CHECKPOINT TENSORBOARD GPUS_PER_NODE
# NNODES NODE_RANK MASTER_ADDR MASTER_PORT EXTRA_ARGS DRY_RUN (the family scripts document them).
# Sets: root precision lr tp world_size data_path common_args; defines launch_pretrain_gpt.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

precision="${PRECISION:-bf16-sr}"
if [ -z "${LR_MULT:-}" ]; then
  if [ "$precision" = bf16-sr ]; then LR_MULT=2; else LR_MULT=1; fi
fi
lr="${LR:-$(awk -v a="$MIXED_LR" -v m="$LR_MULT" 'BEGIN { printf "%.3g", a * m }')}"
min_lr="${MIN_LR:-$(awk -v a="$lr" 'BEGIN { printf "%.3g", a / 10 }')}"
tp="${TP:-$DEFAULT_TP}"
pp="${PP:-$DEFAULT_PP}"
if [ -z "${GPUS_PER_NODE:-}" ]; then
  GPUS_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${GPUS_PER_NODE:-0}" -gt 0 ] || GPUS_PER_NODE=8
fi
nnodes="${NNODES:-1}"
world_size=$(( GPUS_PER_NODE * nnodes ))
checkpoint="${CHECKPOINT:-$root/checkpoints/${MODEL_NAME}-${precision}}"

if [ "${DRY_RUN:-0}" != 1 ]; then
  : "${DATA_PATH:?set DATA_PATH to the Megatron .bin/.idx prefix(es) of the training data}"
fi
# shellcheck disable=SC2206  # DATA_PATH may hold weight-prefix pairs
data_path=(${DATA_PATH:-/path/to/data_text_document})

common_args=(
  --micro-batch-size "${MBS:-$DEFAULT_MBS}" --global-batch-size "${GBS:-$DEFAULT_GBS}"
  --train-iters "${TRAIN_ITERS:-$DEFAULT_TRAIN_ITERS}"
  --lr "$lr" --min-lr "$min_lr" --lr-decay-style cosine
  --lr-warmup-iters "${WARMUP_ITERS:-$DEFAULT_WARMUP_ITERS}"
  --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --weight-decay 0.1 --clip-grad 1.0
  --precision "$precision"
  --tensor-model-parallel-size "$tp" --pipeline-model-parallel-size "$pp"
  --use-distributed-optimizer --overlap-grad-reduce
  --save "$checkpoint" --load "$checkpoint" --save-interval 1000
  --log-interval 10 --eval-interval 1000 --eval-iters 10
  --tensorboard-dir "${TENSORBOARD:-$checkpoint/tensorboard}"
)
if [ "$tp" -gt 1 ]; then
  common_args+=(--sequence-parallel)
fi

# launch_pretrain_gpt FLAG...: torchrun pretrain_gpt.py with the flags and EXTRA_ARGS, on
# GPUS_PER_NODE x NNODES processes; with DRY_RUN=1 prints WORLD_SIZE=<n> and the flags, one
# per line, instead.
launch_pretrain_gpt() {
  local args=("$@")
  # shellcheck disable=SC2206
  args+=(${EXTRA_ARGS:-})
  if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "WORLD_SIZE=$world_size"
    printf '%s\n' "${args[@]}"
    exit 0
  fi
  cd "$root"
  mkdir -p "$checkpoint"  # --load of a missing folder is an error; an empty one starts fresh
  # NCCL errors end the job with the flight recorder's dump in $checkpoint/nccl_flight_recorder/.
  # shellcheck source=examples/nccl_env.sh
  source "$root/examples/nccl_env.sh"
  export_nccl_error_handling "$checkpoint/nccl_flight_recorder"
  # Several nodes with --async-save (the one Gloo group, for the background checkpoint writes):
  # export GLOO_SOCKET_IFNAME=<the interface the nodes reach each other by, e.g. ib0 or eth0>.
  echo "[$MODEL_NAME] --precision $precision --lr $lr on $world_size GPUs (TP $tp x PP $pp x" \
       "DP $(( world_size / (tp * pp) ))); checkpoints in $checkpoint"
  exec "${TORCHRUN:-torchrun}" --nproc_per_node "$GPUS_PER_NODE" --nnodes "$nnodes" \
    --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-localhost}" \
    --master_port "${MASTER_PORT:-6000}" pretrain_gpt.py "${args[@]}"
}
