#!/usr/bin/env bash
# The paper's precision experiment in miniature, on the CPU: a small GPT on the
# sample corpus (GPT-2 BPE), trained with each precision strategy at 1x, 2x and
# 4x a base learning rate with cosine decay, then tools/compare_runs.py draws
# the loss curves and tabulates final validation loss/perplexity, tokens/s and
# memory. Runs are sequential, one rank each (2 intra-op threads): about a
# minute each on 2 idle cores, ~13 minutes for the 15 runs (docs/RESULTS.md).
#
#   bash examples/reproduce_sr_cpu.sh                 # the full sweep: 15 runs
#   QUICK=1 bash examples/reproduce_sr_cpu.sh         # 30 iterations per run (smoke test)
#
# Environment:
#   OUT          output folder (default .cache/reproduce_sr; tensorboard/<run>/, logs/<run>.log)
#   STRATEGIES   default "bf16-mixed bf16-sr bf16 bf16-kahan fp32"
#   LR_MULTS     default "1 2 4";  BASE_LR default 6e-4 (min LR = LR/100, cosine)
#   TRAIN_ITERS  default 150 (QUICK=1: 30);  EVAL_INTERVAL default 50 (QUICK=1: 15)
#   THREADS      intra-op threads per run (default 2);  SEED default 1234 (init, data order, SR bits)
#   ADAMW_BACKEND  MEGATRON_SR_ADAMW_BACKEND of the runs (default compiled: one fixed
#                backend for the whole sweep, every segment through the torch.compile'd
#                step; the results recorded in docs/RESULTS.md used it. The backends are
#                bit-identical, so this changes tokens/s only. "default" = the CPU default.)
#   PLOT         PNG to write (default docs/results/reproduce_sr_cpu.png);
#   TABLE        markdown table to write (default $OUT/results.md)
# A run whose log ends with its final validation line is skipped when the
# script is started again, so an interrupted sweep resumes where it stopped
# (delete $OUT/logs/<run>.log to redo one). Runs are ordered by learning rate
# first, so a partial sweep already compares every strategy at 1x.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${VENV:-$root/.venv}/bin/python"
out="${OUT:-$root/.cache/reproduce_sr}"
cd "$root"

if [ "${QUICK:-0}" = 1 ]; then
  train_iters="${TRAIN_ITERS:-30}"; eval_interval="${EVAL_INTERVAL:-15}"; eval_iters=4
else
  train_iters="${TRAIN_ITERS:-150}"; eval_interval="${EVAL_INTERVAL:-50}"; eval_iters=8
fi
if (( train_iters % eval_interval != 0 )); then
  echo "TRAIN_ITERS ($train_iters) must be a multiple of EVAL_INTERVAL ($eval_interval):" \
       "the final validation loss is the one logged at the last iteration" >&2
  exit 1
fi
strategies="${STRATEGIES:-bf16-mixed bf16-sr bf16 bf16-kahan fp32}"
lr_mults="${LR_MULTS:-1 2 4}"
base_lr="${BASE_LR:-6e-4}"
seed="${SEED:-1234}"
adamw_backend="${ADAMW_BACKEND:-compiled}"
[ "$adamw_backend" = default ] && adamw_backend=""
mkdir -p "$out/logs" "$out/tensorboard"

# The sample corpus, tokenized with GPT-2's BPE into $OUT (once).
read -r corpus vocab merges < <("$py" -c "
from megatron_sr.data.sample_files import gpt2_bpe_files, sample_corpus
print(sample_corpus(), *gpt2_bpe_files())")
prefix="$out/sample_text_document"
if [ ! -f "$prefix.idx" ]; then
  "$py" tools/preprocess_data.py --input "$corpus" --output-prefix "$out/sample" \
    --tokenizer-type GPT2BPETokenizer --vocab-file "$vocab" --merge-file "$merges" \
    --append-eod --workers 2 --log-interval 500
fi

for mult in $lr_mults; do
  lr=$("$py" -c "print(f'{$base_lr * $mult:.3g}')")
  min_lr=$("$py" -c "print(f'{$base_lr * $mult / 100:.3g}')")
  for precision in $strategies; do
    run="${precision}_lr${lr}"
    log="$out/logs/$run.log"
    if [ -f "$log" ] && grep -q "validation loss at iteration $train_iters " "$log"; then
      echo "[sweep] $run: done before, skipped"; continue
    fi
    rm -rf "$out/tensorboard/$run"
    echo "[sweep] $(date +%H:%M:%S) $run"
    MEGATRON_SR_ADAMW_BACKEND="$adamw_backend" \
    OMP_NUM_THREADS="${THREADS:-2}" "$py" pretrain_gpt.py \
      --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 64 \
      --max-position-embeddings 64 --attention-dropout 0 --hidden-dropout 0 \
      --micro-batch-size 4 --global-batch-size 4 --train-iters "$train_iters" \
      --lr "$lr" --min-lr "$min_lr" --lr-decay-style cosine --lr-warmup-iters 10 \
      --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --seed "$seed" \
      --precision "$precision" \
      --data-path "$prefix" --split 98,2,0 \
      --tokenizer-type GPT2BPETokenizer --vocab-file "$vocab" --merge-file "$merges" \
      --data-cache-path "$out/index-cache" \
      --log-interval 5 --eval-interval "$eval_interval" --eval-iters "$eval_iters" \
      --tensorboard-dir "$out/tensorboard/$run" >"$log" 2>&1 \
      || { echo "[sweep] $run failed, see $log" >&2; tail -5 "$log" >&2; }
    grep "validation loss at iteration $train_iters " "$log" || true
  done
done

"$py" tools/compare_runs.py "$out"/tensorboard/* \
  --plot "${PLOT:-$root/docs/results/reproduce_sr_cpu.png}" --table "${TABLE:-$out/results.md}"
