# Shared launcher of examples/llama3_8b.sh and examples/llama2_7b.sh (sourced, not run); the part
# shared with the GPT scripts is examples/launch_common.sh.
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
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"

if [ "${DRY_RUN:-0}" != 1 ]; then
  : "${TOKENIZER:?set TOKENIZER to the tokenizer.json of the model (or a local folder holding it)}"
fi
# shellcheck disable=SC2206  # further model flags of the sourcing script, word-split
model_extra_args=(${MODEL_EXTRA_ARGS:-})
launch_pretrain_gpt \
  --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN" --ffn-hidden-size "$FFN_HIDDEN" \
  --num-attention-heads "$NUM_HEADS" --group-query-attention --num-query-groups "$NUM_QUERY_GROUPS" \
  --seq-length "$SEQ_LENGTH" --max-position-embeddings "$SEQ_LENGTH" \
  --position-embedding-type rope --rotary-base "$ROTARY_BASE" --swiglu \
  --normalization RMSNorm --norm-epsilon "$NORM_EPS" --init-method-std "$INIT_STD" \
  --untie-embeddings-and-output-weights --disable-bias-linear \
  --attention-dropout 0 --hidden-dropout 0 \
  "${common_args[@]}" \
  --data-path "${data_path[@]}" --split 99,1,0 \
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model "${TOKENIZER:-/path/to/tokenizer}" \
  "${model_extra_args[@]}"
