#!/usr/bin/env bash
# GPT 6.7B (~6.7B parameters) pretraining on GPUs, pure BF16 with stochastic
# rounding by default (the paper's recipe in spirit: seq 2048, RoPE, untied
# embeddings, AdamW betas 0.9/0.95, weight decay 0.1, cosine decay after a
# linear warmup; bf16-sr at 2x the mixed-precision learning rate).
#
#   DATA_PATH=/data/pile_text_document VOCAB=gpt2-vocab.json MERGES=gpt2-merges.txt \
#     bash examples/gpt_6.7b.sh
#   PRECISION=bf16-mixed ... bash examples/gpt_6.7b.sh     # the mixed-precision baseline
#
# Defaults: 32 layers, hidden 4096, 32 heads; global batch 1024 x 2048 tokens,
# 64000 iterations (~134B tokens), warmup 2000; mixed-precision LR 1.2e-4;
# TP 2 x PP 1, the rest data parallel (distributed optimizer); no activation recompute
# (with SDPA attention, selective recompute would save ~0.1% of the activations for
# ~3% more FLOPs: docs/PERFORMANCE.md, "Selective recompute with SDPA attention").
# Every setting is overridable by environment variables: see examples/gpt_common.sh.
MODEL_NAME=gpt_6.7b
NUM_LAYERS=32 HIDDEN=4096 NUM_HEADS=32
MIXED_LR=1.2e-4
DEFAULT_GBS=1024 DEFAULT_MBS=1
DEFAULT_TRAIN_ITERS=64000 DEFAULT_WARMUP_ITERS=2000
DEFAULT_TP=2 DEFAULT_PP=1
source "$(dirname "${BASH_SOURCE[0]}")/gpt_common.sh"
