"""BF16 matrix products on this CPU: torch's BF16 GEMM vs FP32 vs megatron_sr's path.

    python bench/cpu_bf16_matmul.py [--tokens 2048 --hidden 256 --out 1024 --threads 1]

Times, side by side in one run, the forward + backward of one linear layer
(x [tokens, hidden] @ W^T [hidden, out]) three ways: FP32, torch's BF16 GEMM
(`F.linear` on BF16 tensors: native on CPUs with AVX512-BF16/AMX, emulated
elsewhere) and `megatron_sr.cpu_bf16.linear` forced to its FP32-GEMM path; then
FP32 inputs under `torch.autocast(bfloat16)` (the amp strategy) through torch's
op and through megatron_sr's; and the same for causal attention. Prints each as
a ratio to FP32 and the line the training job's [setup] prints for this CPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_sr import cpu_bf16  # noqa: E402


def _time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _linear_case(linear, dtype, tokens, hidden, out):
    x = torch.randn(tokens, hidden).to(dtype).requires_grad_()
    w = torch.randn(out, hidden).to(dtype).requires_grad_()

    def step():
        linear(x, w).float().sum().backward()
    return step


def _attention_case(attention, dtype, tokens, hidden):
    heads = max(1, hidden // 64)
    batch, seq = max(1, tokens // 256), min(tokens, 256)
    q, k, v = (torch.randn(batch, heads, seq, hidden // heads).to(dtype).requires_grad_()
               for _ in range(3))

    def step():
        attention(q, k, v, is_causal=True).float().sum().backward()
    return step


def _under_autocast(op):
    def run(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return op(*args, **kwargs)
    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--out", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["MEGATRON_SR_CPU_BF16_GEMM"] = "fp32"
    cpu_bf16.cpu_has_native_bf16.cache_clear()
    cases = {
        "linear": (lambda dt, f: _linear_case(f, dt, args.tokens, args.hidden, args.out),
                   F.linear, cpu_bf16.linear),
        "attention": (lambda dt, f: _attention_case(f, dt, args.tokens, args.hidden),
                      F.scaled_dot_product_attention, cpu_bf16.scaled_dot_product_attention),
    }
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {args.threads} thread(s); "
          f"forward + backward, best of {args.repeats}; ratio = time / FP32 time")
    print(f"{'op':<10} {'fp32':>8} {'torch bf16':>11} {'megatron_sr bf16':>17} "
          f"{'torch amp':>10} {'megatron_sr amp':>16}")
    for name, (make, torch_op, our_op) in cases.items():
        fp32 = _time(make(torch.float32, torch_op), args.repeats)
        ratios = [_time(make(dtype, op), args.repeats) / fp32 for dtype, op in (
            (torch.bfloat16, torch_op), (torch.bfloat16, our_op),
            (torch.float32, _under_autocast(torch_op)), (torch.float32, _under_autocast(our_op)))]
        print(f"{name:<10} {1.0:>8.2f} {ratios[0]:>11.2f} {ratios[1]:>17.2f} {ratios[2]:>10.2f} "
              f"{ratios[3]:>16.2f}")
    del os.environ["MEGATRON_SR_CPU_BF16_GEMM"]
    cpu_bf16.cpu_has_native_bf16.cache_clear()
    print(f"[setup] on this CPU: {cpu_bf16.cpu_bf16_summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
