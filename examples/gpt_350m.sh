#!/usr/bin/env bash
# GPT 350M (~350M parameters) pretraining on GPUs, pure BF16 with stochastic
# rounding by default (the paper's recipe in spirit: seq 2048, RoPE, untied
# embeddings, AdamW betas 0.9/0.95, weight decay 0.1, cosine decay after a
# linear warmup; bf16-sr at 2x the mixed-precision learning rate).
#
#   DATA_PATH=/data/pile_text_document VOCAB=gpt2-vocab.json MERGES=gpt2-merges.txt \
#     bash examples/gpt_350m.sh
#   PRECISION=bf16-mixed ... bash examples/gpt_350m.sh     # the mixed-precision baseline
#
# Defaults: 24 layers, hidden 1024, 16 heads; global batch 256 x 2048 tokens,
# 13500 iterations (~7B tokens), warmup 500; mixed-precision LR 3e-4;
# TP 1 x PP 1, the rest data parallel (distributed optimizer).
# Every setting is overridable by environment variables: see examples/gpt_common.sh.
MODEL_NAME=gpt_350m
NUM_LAYERS=24 HIDDEN=1024 NUM_HEADS=16
MIXED_LR=3e-4
DEFAULT_GBS=256 DEFAULT_MBS=8
DEFAULT_TRAIN_ITERS=13500 DEFAULT_WARMUP_ITERS=500
DEFAULT_TP=1 DEFAULT_PP=1
source "$(dirname "${BASH_SOURCE[0]}")/gpt_common.sh"
