#!/usr/bin/env bash
# The README's main job, on a fresh machine without a GPU:
#   1. installs megatron_sr into .venv (CPU build of torch),
#   2. builds the sample corpus (King James Bible + Shakespeare) and the GPT-2
#      BPE files, and tokenizes the corpus into Megatron .bin/.idx files,
#   3. trains a tiny GPT in pure BF16 with stochastic rounding (--precision
#      bf16-sr) with torchrun on 4 CPU ranks: tensor parallel 2 x pipeline
#      parallel 2, printing Megatron's log lines and the validation perplexity.
# Environment: VENV (default .venv), WORK (data/checkpoints, default .cache/quickstart),
# TRAIN_ITERS (default 300), NPROC (default 4: TP=2 x PP=2).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv}"
work="${WORK:-$root/.cache/quickstart}"
VENV="$venv" bash "$root/tools/install.sh"
py="$venv/bin/python"
cd "$root"
mkdir -p "$work"

read -r corpus vocab merges < <("$py" -c "
from megatron_sr.data.sample_files import gpt2_bpe_files, sample_corpus
print(sample_corpus(), *gpt2_bpe_files())")
prefix="$work/sample"
if [ ! -f "${prefix}_text_document.idx" ]; then
  "$py" tools/preprocess_data.py --input "$corpus" --output-prefix "$prefix" \
    --tokenizer-type GPT2BPETokenizer --vocab-file "$vocab" --merge-file "$merges" \
    --append-eod --workers 2 --log-interval 500
fi

rm -rf "$work/checkpoints" "$work/tensorboard"
OMP_NUM_THREADS=1 "$venv/bin/torchrun" --standalone --nproc_per_node "${NPROC:-4}" pretrain_gpt.py \
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \
  --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 64 \
  --max-position-embeddings 64 --attention-dropout 0 --hidden-dropout 0 \
  --micro-batch-size 4 --global-batch-size 16 --train-iters "${TRAIN_ITERS:-300}" \
  --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-iters 20 \
  --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0 --precision bf16-sr \
  --data-path "${prefix}_text_document" --split 98,2,0 \
  --tokenizer-type GPT2BPETokenizer --vocab-file "$vocab" --merge-file "$merges" \
  --data-cache-path "$work/index-cache" \
  --log-interval 10 --eval-interval 100 --eval-iters 5 \
  --save "$work/checkpoints" --save-interval 100 --tensorboard-dir "$work/tensorboard"
