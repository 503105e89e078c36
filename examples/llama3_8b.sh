#!/usr/bin/env bash
# Llama-3 8B pretraining on GPUs, pure BF16 with stochastic rounding by default
# (the architecture of Meta's Llama 3 8B: grouped-query attention with 8 key/value
# heads, SwiGLU, RMSNorm, RoPE base 500000, untied embeddings, no biases, 128256-token
# tokenizer; Megatron-LM's 8B recipe otherwise: seq 8192, AdamW betas 0.9/0.95,
# weight decay 0.1, init std 0.0134, cosine decay after a linear warmup; bf16-sr at
# 2x the mixed-precision learning rate).
#
#   DATA_PATH=/data/llama3_text_document TOKENIZER=/models/Meta-Llama-3-8B \
#     bash examples/llama3_8b.sh
#   PRECISION=bf16-mixed ... bash examples/llama3_8b.sh     # the mixed-precision baseline
#
# Tokenize with the same tokenizer: tools/preprocess_data.py --tokenizer-type
# HuggingFaceTokenizer --tokenizer-model $TOKENIZER --append-eod ...
# Defaults: 32 layers, hidden 4096, FFN 14336, 32 heads / 8 groups; global batch 128 x 8192
# tokens, 60000 iterations (~63B tokens), warmup 2000; mixed-precision LR 1.5e-4;
# TP 2 x PP 1, the rest data parallel (distributed optimizer); no activation recompute.
# Every setting is overridable by environment variables: see examples/llama_common.sh.
MODEL_NAME=llama3_8b
NUM_LAYERS=32 HIDDEN=4096 FFN_HIDDEN=14336 NUM_HEADS=32 NUM_QUERY_GROUPS=8
SEQ_LENGTH=8192 ROTARY_BASE=500000 NORM_EPS=1e-5 INIT_STD=0.0134
MIXED_LR=1.5e-4
DEFAULT_GBS=128 DEFAULT_MBS=1
DEFAULT_TRAIN_ITERS=60000 DEFAULT_WARMUP_ITERS=2000
DEFAULT_TP=2 DEFAULT_PP=1
# No activation recompute. tools/estimate.py for these flags (vocabulary 128256, 8 GPUs):
# 42.5 GiB per rank without recompute, 42.5 with --recompute-granularity selective
# (flash attention keeps no s x s matrix, so the attention core selective re-runs
# holds almost nothing: 0.02 GiB saved, for a second flash-attention forward per layer),
# 21.7 with full recompute at +32% FLOPs per step. Without recompute the run fits
# an 80 GB H100 with ~32 GiB to spare; add EXTRA_ARGS="--recompute-granularity full
# --recompute-method uniform --recompute-num-layers 1" only for a larger MBS or
# SEQ_LENGTH that does not fit.
MODEL_EXTRA_ARGS=""
source "$(dirname "${BASH_SOURCE[0]}")/llama_common.sh"
