#!/usr/bin/env bash
# GPT 2.7B (~2.7B parameters) pretraining on GPUs, pure BF16 with stochastic
# rounding by default (the paper's recipe in spirit: seq 2048, RoPE, untied
# embeddings, AdamW betas 0.9/0.95, weight decay 0.1, cosine decay after a
# linear warmup; bf16-sr at 2x the mixed-precision learning rate).
#
#   DATA_PATH=/data/pile_text_document VOCAB=gpt2-vocab.json MERGES=gpt2-merges.txt \
#     bash examples/gpt_2.7b.sh
#   PRECISION=bf16-mixed ... bash examples/gpt_2.7b.sh     # the mixed-precision baseline
#
# Defaults: 32 layers, hidden 2560, 32 heads; global batch 512 x 2048 tokens,
# 51500 iterations (~54B tokens), warmup 2000; mixed-precision LR 1.6e-4;
# TP 1 x PP 1, the rest data parallel (distributed optimizer); no activation recompute
# (with SDPA attention, selective recompute would save ~0.1% of the activations for
# ~3% more FLOPs: docs/PERFORMANCE.md, "Selective recompute with SDPA attention").
# Every setting is overridable by environment variables: see examples/gpt_common.sh.
MODEL_NAME=gpt_2.7b
NUM_LAYERS=32 HIDDEN=2560 NUM_HEADS=32
MIXED_LR=1.6e-4
DEFAULT_GBS=512 DEFAULT_MBS=2
DEFAULT_TRAIN_ITERS=51500 DEFAULT_WARMUP_ITERS=2000
DEFAULT_TP=1 DEFAULT_PP=1
source "$(dirname "${BASH_SOURCE[0]}")/gpt_common.sh"
