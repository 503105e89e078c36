# Shared launcher of examples/llama3_8b.sh and examples/llama2_7b.sh (sourced, not run).
#
# The sourcing script sets the model and its mixed-precision recipe:
#   NUM_LAYERS HIDDEN FFN_HIDDEN NUM_HEADS NUM_QUERY_GROUPS   model shape
#   SEQ_LENGTH ROTARY_BASE NORM_EPS INIT_STD                  the family's constants
#   MIXED_LR DEFAULT_GBS DEFAULT_MBS DEFAULT_TRAIN_ITERS DEFAULT_WARMUP_ITERS DEFAULT_TP DEFAULT_PP
#   MODEL_EXTRA_ARGS                                          further model flags
#
# The user overrides with environment variables:
#   PRECISION     bf16-sr (default) | bf16-mixed | amp | bf16 | bf16-kahan | fp32
#   LR            peak LR (default: MIXED_LR x LR_MULT)
#   LR_MULT       default 2 for bf16-sr (SR tolerates and benefits from a higher LR), else 1
#   MIN_LR        default LR / 10 (cosine decay to it over the run)
#   DATA_PATH     Megatron .bin/.idx prefix(es) tokenized with TOKENIZER (required)
#   TOKENIZER     the model's Hugging Face tokenizer: a local folder holding tokenizer.json,
#                 or the file (required; nothing is downloaded)
#   CHECKPOINT    --save/--load folder (default ./checkpoints/<name>-<precision>)
#   TENSORBOARD   default $CHECKPOINT/tensorboard
#   TP PP         tensor / pipeline parallel sizes; the rest is data parallel
#   GBS MBS TRAIN_ITERS WARMUP_ITERS
#   GPUS_PER_NODE (default: visible GPUs, else 8)  NNODES(1) NODE_RANK(0)
#   MASTER_ADDR(localhost) MASTER_PORT(6000)
#   EXTRA_ARGS    appended to the pretrain_gpt.py flags (word-split)
#   DRY_RUN=1     print WORLD_SIZE=<n> and the pretrain_gpt.py flags, one per line, and exit
#                 (tests/test_examples.py validates them this way)
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
  : "${TOKENIZER:?set TOKENIZER to the tokenizer.json of the model (or a local folder holding it)}"
fi
# shellcheck disable=SC2206  # DATA_PATH may hold weight-prefix pairs
data_path=(${DATA_PATH:-/path/to/data_text_document})

args=(
  --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN" --ffn-hidden-size "$FFN_HIDDEN"
  --num-attention-heads "$NUM_HEADS" --group-query-attention --num-query-groups "$NUM_QUERY_GROUPS"
  --seq-length "$SEQ_LENGTH" --max-position-embeddings "$SEQ_LENGTH"
  --position-embedding-type rope --rotary-base "$ROTARY_BASE" --swiglu
  --normalization RMSNorm --norm-epsilon "$NORM_EPS" --init-method-std "$INIT_STD"
  --untie-embeddings-and-output-weights --disable-bias-linear
  --attention-dropout 0 --hidden-dropout 0
  --micro-batch-size "${MBS:-$DEFAULT_MBS}" --global-batch-size "${GBS:-$DEFAULT_GBS}"
  --train-iters "${TRAIN_ITERS:-$DEFAULT_TRAIN_ITERS}"
  --lr "$lr" --min-lr "$min_lr" --lr-decay-style cosine
  --lr-warmup-iters "${WARMUP_ITERS:-$DEFAULT_WARMUP_ITERS}"
  --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --weight-decay 0.1 --clip-grad 1.0
  --precision "$precision"
  --tensor-model-parallel-size "$tp" --pipeline-model-parallel-size "$pp"
  --use-distributed-optimizer --overlap-grad-reduce
  --data-path "${data_path[@]}" --split 99,1,0
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model "${TOKENIZER:-/path/to/tokenizer}"
  --save "$checkpoint" --load "$checkpoint" --save-interval 1000
  --log-interval 10 --eval-interval 1000 --eval-iters 10
  --tensorboard-dir "${TENSORBOARD:-$checkpoint/tensorboard}"
)
if [ "$tp" -gt 1 ]; then
  args+=(--sequence-parallel)
fi
# shellcheck disable=SC2206
args+=(${MODEL_EXTRA_ARGS:-} ${EXTRA_ARGS:-})

if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "WORLD_SIZE=$world_size"
  printf '%s\n' "${args[@]}"
  exit 0
fi

cd "$root"
mkdir -p "$checkpoint"  # --load of a missing folder is an error; an empty one starts fresh
echo "[$MODEL_NAME] --precision $precision --lr $lr on $world_size GPUs (TP $tp x PP $pp x" \
     "DP $(( world_size / (tp * pp) ))); checkpoints in $checkpoint"
exec "${TORCHRUN:-torchrun}" --nproc_per_node "$GPUS_PER_NODE" --nnodes "$nnodes" \
  --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-localhost}" \
  --master_port "${MASTER_PORT:-6000}" pretrain_gpt.py "${args[@]}"
