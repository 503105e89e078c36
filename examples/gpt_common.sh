# Shared launcher of examples/gpt_{350m,1.3b,2.7b,6.7b}.sh (sourced, not run); the part shared
# with the Llama scripts is examples/launch_common.sh.
#
# The sourcing script sets the model size and its mixed-precision recipe:
#   NUM_LAYERS HIDDEN NUM_HEADS   model shape
#   MIXED_LR                      peak LR of (bf16, fp32) mixed precision (GPT-3's for the size)
#   DEFAULT_GBS DEFAULT_MBS       global / micro batch (sequences of 2048 tokens)
#   DEFAULT_TRAIN_ITERS DEFAULT_WARMUP_ITERS DEFAULT_TP DEFAULT_PP
#
# The user overrides with environment variables:
#   PRECISION     bf16-sr (default) | bf16-mixed | amp | bf16 | bf16-kahan | fp32
#   LR            peak LR (default: MIXED_LR x LR_MULT)
#   LR_MULT       default 2 for bf16-sr (SR tolerates and benefits from a higher LR), else 1
#   MIN_LR        default LR / 10 (cosine decay to it over the run)
#   DATA_PATH     Megatron .bin/.idx prefix(es), e.g. "/data/pile_text_document" or
#                 "0.7 /data/a_text_document 0.3 /data/b_text_document"   (required)
#   VOCAB MERGES  GPT-2 BPE files (required)
#   CHECKPOINT    --save/--load folder (default ./checkpoints/<name>-<precision>)
#   TENSORBOARD   default $CHECKPOINT/tensorboard
#   TP PP         tensor / pipeline parallel sizes (defaults per size); the rest is data parallel
#   GBS MBS TRAIN_ITERS WARMUP_ITERS SEQ_LENGTH(2048)
#   GPUS_PER_NODE (default: visible GPUs, else 8)  NNODES(1) NODE_RANK(0)
#   MASTER_ADDR(localhost) MASTER_PORT(6000)
#   EXTRA_ARGS    appended to the pretrain_gpt.py flags (word-split)
#   DRY_RUN=1     print WORLD_SIZE=<n> and the pretrain_gpt.py flags, one per line, and exit
#                 (tests/test_examples.py validates them this way)
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"

if [ "${DRY_RUN:-0}" != 1 ]; then
  : "${VOCAB:?set VOCAB to the GPT-2 BPE vocabulary (vocab.json / encoder.json)}"
  : "${MERGES:?set MERGES to the GPT-2 BPE merges (merges.txt / vocab.bpe)}"
fi
seq_length="${SEQ_LENGTH:-2048}"
launch_pretrain_gpt \
  --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN" --num-attention-heads "$NUM_HEADS" \
  --seq-length "$seq_length" --max-position-embeddings "$seq_length" \
  --position-embedding-type rope --untie-embeddings-and-output-weights \
  --normalization LayerNorm --init-method-std 0.02 \
  --attention-dropout 0 --hidden-dropout 0 \
  "${common_args[@]}" \
  --data-path "${data_path[@]}" --split 969,30,1 \
  --tokenizer-type GPT2BPETokenizer \
  --vocab-file "${VOCAB:-/path/to/gpt2-vocab.json}" --merge-file "${MERGES:-/path/to/gpt2-merges.txt}"
