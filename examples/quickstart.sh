#!/usr/bin/env bash
# The README's main job, on a fresh machine without a GPU:
#   1. installs megatron_sr into .venv (CPU build of torch),
#   2. builds the sample corpus (King James Bible + Shakespeare), trains a 4096-piece BPE
#      vocabulary on it (so that the model is mostly transformer, not embedding) and tokenizes
#      the corpus into Megatron .bin/.idx files (examples/sample_data.sh),
#   3. trains a small GPT in pure BF16 with stochastic rounding (--precision bf16-sr) with
#      torchrun on 4 CPU ranks, tensor parallel 2 x pipeline parallel 2, printing Megatron's
#      log lines and the validation perplexity, and saves a checkpoint,
#   4. prints a sample generated from that checkpoint with tools/text_generation.py.
# Measured times per kind of CPU: docs/GUIDE.md#quickstart.
# Environment: VENV (default .venv), WORK (checkpoints/TensorBoard, default .cache/quickstart),
# TRAIN_ITERS (default 100).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv}"
work="${WORK:-$root/.cache/quickstart}"
VENV="$venv" bash "$root/tools/install.sh"
py="$venv/bin/python"
cd "$root"
mkdir -p "$work"
source "$root/examples/sample_data.sh"

train_iters="${TRAIN_ITERS:-100}"
rm -rf "$work/checkpoints" "$work/tensorboard"
OMP_NUM_THREADS=1 "$venv/bin/torchrun" --standalone --nproc_per_node 4 pretrain_gpt.py \
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel \
  --num-layers 4 --hidden-size 256 --num-attention-heads 4 --seq-length 128 \
  --max-position-embeddings 128 --attention-dropout 0 --hidden-dropout 0 \
  --micro-batch-size 4 --global-batch-size 16 --train-iters "$train_iters" \
  --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 10 \
  --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0 --precision bf16-sr \
  --data-path "$sample_prefix" --split 98,2,0 \
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$sample_tokenizer" \
  --data-cache-path "$work/index-cache" \
  --log-interval 10 --eval-interval "$train_iters" --eval-iters 10 \
  --save "$work/checkpoints" --save-interval "$train_iters" --tensorboard-dir "$work/tensorboard"

echo "[sample] a continuation sampled from the checkpoint just saved (temperature 0.8, top-k 40):"
"$py" tools/text_generation.py --load "$work/checkpoints" --prompt "And God said" \
  --max-new-tokens 40 --temperature 0.8 --top-k 40 --seed 1234
