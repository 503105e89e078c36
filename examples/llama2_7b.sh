#!/usr/bin/env bash
# Llama-2 7B pretraining on GPUs, pure BF16 with stochastic rounding by default
# (the architecture of Meta's Llama 2 7B: multi-head attention, SwiGLU with FFN 11008,
# RMSNorm, RoPE base 10000, seq 4096, untied embeddings, no biases, 32000-token
# tokenizer; AdamW betas 0.9/0.95, weight decay 0.1, cosine decay to LR/10 after a
# 2000-iteration warmup as in the Llama 2 paper; bf16-sr at 2x the mixed-precision LR).
#
#   DATA_PATH=/data/llama2_text_document TOKENIZER=/models/Llama-2-7b-hf \
#     bash examples/llama2_7b.sh
#
# Defaults: 32 layers, hidden 4096, 32 heads; global batch 1024 x 4096 tokens (4M, the
# paper's), 50000 iterations (~210B tokens); mixed-precision LR 3e-4; TP 2 x PP 1, the rest
# data parallel (distributed optimizer); activation recompute: selective.
# Every setting is overridable by environment variables: see examples/llama_common.sh.
MODEL_NAME=llama2_7b
NUM_LAYERS=32 HIDDEN=4096 FFN_HIDDEN=11008 NUM_HEADS=32 NUM_QUERY_GROUPS=32
SEQ_LENGTH=4096 ROTARY_BASE=10000 NORM_EPS=1e-5 INIT_STD=0.02
MIXED_LR=3e-4
DEFAULT_GBS=1024 DEFAULT_MBS=1
DEFAULT_TRAIN_ITERS=50000 DEFAULT_WARMUP_ITERS=2000
DEFAULT_TP=2 DEFAULT_PP=1
MODEL_EXTRA_ARGS="--recompute-granularity selective"
source "$(dirname "${BASH_SOURCE[0]}")/llama_common.sh"
