#!/usr/bin/env bash
# The SR precision sweep of docs/RESULTS.md on the CPU (examples/sr_sweep.py says what runs):
# a 6-layer x 256 GPT on the sample corpus with a 4096-piece BPE, 2.1M training tokens per run,
# every strategy at 1x/2x/4x the best bf16-mixed LR, 3 seeds, and the bf16 vs fp32
# gradient-accumulation ablation. Finished runs land in docs/results/sr_sweep/runs/ and are
# skipped when the script starts again, so it resumes where it stopped, on any machine.
#
#   bash examples/reproduce_sr_sweep.sh                 # run (2 at a time, 1 thread each)
#   bash examples/reproduce_sr_sweep.sh --commit        # and git-commit each finished run
#   bash examples/reproduce_sr_sweep.sh --dry-run       # the plan and what is done
#   bash examples/reproduce_sr_sweep.sh --report        # docs/results/sr_sweep.{md,png} from
#                                                       # the finished runs
#   bash examples/reproduce_sr_sweep.sh --v2 --commit   # the second sweep: the interleaved corpus
#                                                       # (train and validation sample both sources),
#                                                       # 2e-3 and 4e-3, the SR-accumulation ablation
#                                                       # and a longer arm, in docs/results/sr_sweep_v2/
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${VENV:-$root/.venv}/bin/python"
[ -x "$py" ] || VENV="${VENV:-$root/.venv}" bash "$root/tools/install.sh"
cd "$root"
# The sweep's own data folder, tokenized with the tokenizer its committed runs used (once the
# first run of the sweep has committed it): every run, on any machine, sees the same tokens.
# v2 tokenizes the interleaved corpus, in a data folder of its own, with the first sweep's
# tokenizer until its own first start has committed the copy it used.
SAMPLE_DIR="$root/.cache/sr_sweep_data"
committed_tokenizer="$root/docs/results/sr_sweep/tokenizer.model"
for arg in "$@"; do
  if [ "$arg" = --v2 ]; then
    SAMPLE_DIR="$root/.cache/sr_sweep_v2_data"
    SAMPLE_INTERLEAVED=1
    [ -f "$root/docs/results/sr_sweep_v2/tokenizer.model" ] \
      && committed_tokenizer="$root/docs/results/sr_sweep_v2/tokenizer.model"
  fi
done
[ -f "$committed_tokenizer" ] && SAMPLE_TOKENIZER_SOURCE="$committed_tokenizer"
source "$root/examples/sample_data.sh"
exec "$py" examples/sr_sweep.py --data-prefix "$sample_prefix" --tokenizer-model "$sample_tokenizer" "$@"
