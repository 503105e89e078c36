"""BF16 matrix products and attention on CPUs without native BF16 arithmetic.

A GPU's tensor cores multiply BF16 inputs exactly, accumulate in FP32 and
round the result to BF16 once. CPUs with AVX512-BF16 or AMX do the same in
hardware; on the others (AVX2-only x86, most of them) torch emulates a BF16
GEMM element by element and runs 3-7x slower than the FP32 GEMM on the same
shapes. `linear` computes a BF16 product on such a CPU as the FP32 GEMM of
the exact FP32 copies of its inputs, rounded to BF16 once: the same numbers
a tensor core produces (up to the order of the FP32 accumulation), at FP32
speed. Autograd follows the casts, so the backward products are computed the
same way and return BF16 gradients. Costs: transient FP32 copies of the
inputs, kept for backward (this path exists for CPU test benches, not for
memory-bound runs). Everywhere else `linear` is `F.linear`.

`scaled_dot_product_attention` does the same for attention: FP32 attention on
the exact FP32 copies of BF16 q, k, v, output rounded to BF16 once. A GPU's
flash attention also computes q k^T and the softmax in FP32 but rounds the
probabilities to BF16 before multiplying by v; here they stay FP32, so the
result is slightly more precise than a GPU's, never less.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F

_NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The feature flags of this machine's CPU (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies BF16 in hardware (AVX512-BF16 or AMX-BF16).
    `MEGATRON_SR_CPU_BF16_GEMM=native|fp32` overrides the detection."""
    forced = os.environ.get("MEGATRON_SR_CPU_BF16_GEMM", "")
    if forced not in ("", "native", "fp32"):
        raise ValueError(f"MEGATRON_SR_CPU_BF16_GEMM={forced!r}: expected 'native' or 'fp32'")
    if forced:
        return forced == "native"
    return any(flag in cpu_flags() for flag in _NATIVE_BF16_CPU_FLAGS)


def cpu_bf16_summary() -> str:
    """One line for the [setup] log: the CPU's vector capability and how BF16
    products run on it."""
    capability = torch.backends.cpu.get_cpu_capability()
    if cpu_has_native_bf16():
        return f"CPU capability {capability} with native BF16 products"
    return (f"CPU capability {capability}: no native BF16 products on this CPU, so BF16 "
            f"matmuls run as FP32 GEMMs of the BF16 values (same results, FP32 speed): "
            f"bf16 strategies are no faster than fp32 here; use them for correctness, not speed")


def linear(x: torch.Tensor, weight: torch.Tensor,
           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`; for BF16 inputs on a CPU without native BF16,
    computed in FP32 from the exact upcasts and rounded to BF16 once (see the
    module docstring). Output dtype and shape are those of `F.linear`."""
    if _emulated_bf16(x, weight):
        return F.linear(x.float(), weight.float(),
                        None if bias is None else bias.float()).to(torch.bfloat16)
    return F.linear(x, weight, bias)


def _emulated_bf16(*tensors: torch.Tensor) -> bool:
    return all(t.dtype is torch.bfloat16 and t.device.type == "cpu" for t in tensors) \
        and not cpu_has_native_bf16()


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 **kwargs) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, **kwargs)`; for BF16 inputs on a
    CPU without native BF16, computed in FP32 and rounded to BF16 once."""
    if _emulated_bf16(q, k, v):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                              **kwargs).to(torch.bfloat16)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)
