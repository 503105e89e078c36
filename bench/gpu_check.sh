#!/usr/bin/env bash
# One-GPU check of megatron_sr, in under 8 minutes on an H100/H200:
#   1. the fused AdamW kernel of every strategy against copy bandwidth
#      (bench/optimizer_step.py on CUDA, Triton backend);
#   2. SR bit-identity on CUDA: the Triton kernel against the torch reference
#      (on CUDA and on the CPU) for every strategy, 2^20+3 elements, odd offsets,
#      three steps; then the repository's Triton/GPU tests (pytest -m gpu and
#      the *triton* tests, which compare the CUDA kernel with the CPU torch path);
#   3. bench/train_step.py on a ~400M GPT (24 x 1024, seq 2048, RoPE, untied,
#      GPT-2 vocabulary) for bf16-mixed, amp and bf16-sr: tokens/s, TFLOP/s,
#      MFU against the dense BF16 peak, peak CUDA memory (max_memory_allocated).
# Everything is written to $OUT (default gpu_check_<date>/): gpu_check.md (the
# summary, markdown) and one log per part. Exit status: non-zero if a part failed.
#
#   bash bench/gpu_check.sh                 # on a machine with a GPU
#   CPU_SMOKE=1 bash bench/gpu_check.sh     # the same steps on the CPU with tiny sizes
#                                           # (Triton in interpreter mode): checks the script
# Environment: VENV (default .venv, else the python on PATH), OUT, MODEL_ARGS (train_step
# model flags), STRATEGIES (default bf16-mixed,amp,bf16-sr), NUMEL (kernel benchmark).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ -x "${VENV:-$root/.venv}/bin/python" ]; then py="${VENV:-$root/.venv}/bin/python"; else py=python; fi
out="${OUT:-$root/gpu_check_$(date +%Y%m%d_%H%M%S)}"
mkdir -p "$out"
summary="$out/gpu_check.md"
strategies="${STRATEGIES:-bf16-mixed,amp,bf16-sr}"
status=0

if [ "${CPU_SMOKE:-0}" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  device=cpu; numel="${NUMEL:-65536}"; check_numel=4099; kernel_backend=compiled
  model_args="${MODEL_ARGS:---num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --max-position-embeddings 64 --micro-batch-size 2 --vocab-size 1000 --position-embedding-type rope --untie-embeddings-and-output-weights}"
  bench_iters="--warmup 1 --iters 2 --block 1"
  pytest_filter="triton and not slow"
  pytest_files="tests/test_precision_rounding.py"
else
  device=cuda; numel="${NUMEL:-67108864}"; check_numel=1048579; kernel_backend=triton
  model_args="${MODEL_ARGS:---num-layers 24 --hidden-size 1024 --num-attention-heads 16 --seq-length 2048 --max-position-embeddings 2048 --micro-batch-size 8 --vocab-size 50257 --position-embedding-type rope --untie-embeddings-and-output-weights}"
  bench_iters="--warmup 2 --iters 8 --block 2"
  pytest_filter="triton or gpu"
  pytest_files="tests/test_precision_rounding.py tests/test_precision_adamw.py"
fi

run_part() {  # run_part NAME TIMEOUT_S COMMAND...: logs to $out/NAME.log, records failure
  local name=$1 limit=$2; shift 2
  echo "[gpu_check] $(date +%H:%M:%S) $name: $*"
  if timeout "$limit" "$@" >"$out/$name.log" 2>&1; then
    echo "[gpu_check] $name: ok"
  else
    echo "[gpu_check] $name: FAILED (exit $?), see $out/$name.log"; status=1
  fi
}

{
  echo "# megatron_sr GPU check ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  "$py" -c "import torch, platform; d = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU (CPU smoke run)'
print(f'- device: {d}; torch {torch.__version__}, CUDA {torch.version.cuda}; python {platform.python_version()}')"
} >"$summary"

# 1. Kernel benchmark.
run_part optimizer_step 120 "$py" bench/optimizer_step.py --device "$device" --numel "$numel" \
  --backend "$kernel_backend" --repeats 10

# 2. Bit identity: Triton kernel vs torch reference.
run_part bit_identity 240 "$py" - "$device" "$check_numel" <<'EOF'
import sys

import torch

from megatron_sr.precision.adamw import adamw_step
from megatron_sr.precision.strategies import STRATEGIES, get_strategy

device, numel = sys.argv[1], int(sys.argv[2])
hyper = dict(lr=3e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def state(strategy, seed):
    g = torch.Generator().manual_seed(seed)
    rand = lambda scale: torch.randn(numel, generator=g) * scale
    s = dict(param=rand(0.05).to(strategy.param_dtype), grad=rand(1e-3).to(strategy.grad_dtype),
             exp_avg=rand(1e-4).to(strategy.exp_avg_dtype),
             exp_avg_sq=rand(1e-4).square().to(strategy.exp_avg_sq_dtype))
    if strategy.master_dtype is not None:
        s["master"] = s["param"].to(strategy.master_dtype)
    if strategy.kahan_dtype is not None:
        s["kahan"] = torch.zeros(numel, dtype=strategy.kahan_dtype)
    return s


def bits(t):
    t = t.cpu()
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


failures = 0
variants = [(n, None) for n in STRATEGIES] + [("bf16-sr", "fp32")]
for name, state_dtype in variants:
    strategy = get_strategy(name, state_dtype)
    for offset in (0, 7, (1 << 32) + 3):
        runs = {}
        for label, dev, backend in (("triton", device, "triton"), ("torch-" + device, device, "eager"),
                                    ("torch-cpu", "cpu", "eager")):
            s = {k: v.to(dev) for k, v in state(strategy, offset % 97).items()}
            for step in (1, 2, 3):
                adamw_step(strategy, **s, **hyper, step=step, sr_key=0x5EED + step, offset=offset,
                           backend=backend)
            runs[label] = s
        for label in list(runs)[1:]:
            bad = [k for k in runs["triton"] if not torch.equal(bits(runs["triton"][k]), bits(runs[label][k]))]
            ok = not bad
            failures += not ok
            print(f"{name:<11} m,v={state_dtype or 'default':<7} offset={offset:<11} triton vs {label:<10}: "
                  f"{'bit-identical' if ok else 'DIFFERENT in ' + ','.join(bad)}")
print(f"{failures} mismatches over {numel} elements x 3 steps")
sys.exit(1 if failures else 0)
EOF
# shellcheck disable=SC2086
run_part pytest_gpu 240 "$py" -m pytest -q -p no:cacheprovider $pytest_files -k "$pytest_filter"

# 3. Training step per strategy.
# shellcheck disable=SC2086
run_part train_step 300 "$py" bench/train_step.py --device "$device" --strategies "$strategies" \
  $bench_iters --markdown "$out/train_step.md" -- $model_args

{
  echo
  echo "## 1. Fused AdamW step vs copy bandwidth (bench/optimizer_step.py --numel $numel)"
  echo; echo '```'; cat "$out/optimizer_step.log"; echo '```'
  echo
  echo "## 2. SR bit identity, Triton vs torch (${check_numel} elements, 3 steps)"
  echo; echo '```'; grep -E "mismatches|DIFFERENT" "$out/bit_identity.log" || tail -5 "$out/bit_identity.log"
  tail -1 "$out/pytest_gpu.log"; echo '```'
  echo
  echo "## 3. Training step (bench/train_step.py)"
  echo
  if [ -f "$out/train_step.md" ]; then cat "$out/train_step.md"; else echo '```'; tail -20 "$out/train_step.log"; echo '```'; fi
  echo
  echo "Status: $([ $status = 0 ] && echo 'all parts passed' || echo 'SOME PARTS FAILED (see the logs)')"
} >>"$summary"
echo "[gpu_check] summary: $summary"
cat "$summary"
exit $status
