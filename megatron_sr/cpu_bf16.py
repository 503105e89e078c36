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

`scaled_dot_product_attention` does the same for attention: torch's CPU flash
attention in FP32 on the exact FP32 copies of BF16 q, k, v, output rounded to
BF16 once; it keeps q, k, v, the BF16 output and the FP32 log-sum-exp for
backward, as the BF16 kernel does. A GPU's flash attention also computes
q k^T and the softmax in FP32 but rounds the probabilities to BF16 before
multiplying by v; here they stay FP32, so the result is slightly more precise
than a GPU's, never less. With dropout, an explicit mask or grouped heads it
falls back to autograd through the casts (FP32 copies saved).

Under `torch.autocast("cpu", dtype=torch.bfloat16)` (the `amp` strategy) both
take the same path for FP32 or BF16 inputs: they cast them to BF16 as autocast
would and compute as above, so amp is not left on torch's emulated BF16 GEMM.
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


def emulates_bf16_products(*tensors: torch.Tensor) -> bool:
    """Whether products of these tensors (all BF16 on this CPU, which has no native
    BF16) are computed here as FP32 products of the exact upcasts, rounded once."""
    return all(t.dtype is torch.bfloat16 and t.device.type == "cpu" for t in tensors) \
        and not cpu_has_native_bf16()


def _emulated_autocast(*tensors: torch.Tensor) -> bool:
    """CPU tensors that torch.autocast(bfloat16) would cast to BF16 for a product
    that torch would then emulate on this CPU."""
    return (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") is torch.bfloat16
            and all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16)
                    for t in tensors)
            and not cpu_has_native_bf16())


def _no_autocast() -> torch.autocast:
    """Autocast off on the CPU, for the FP32 products of this module's paths."""
    return torch.autocast("cpu", enabled=False)


def _bf16(*tensors: Optional[torch.Tensor]) -> list[Optional[torch.Tensor]]:
    return [None if t is None else t.to(torch.bfloat16) for t in tensors]


class _LinearInFp32(torch.autograd.Function):
    """y = x W^T + b for BF16 x [..., in], W [out, in], b [out]: FP32 products of
    the exact upcasts, each result rounded to BF16 once. Saves x and W (BF16)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        with _no_autocast():
            return F.linear(x.float(), weight.float(),
                            None if bias is None else bias.float()).to(torch.bfloat16)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_x = linear_input_grad(grad_y, weight) if ctx.needs_input_grad[0] else None
        grad_weight, grad_bias = linear_weight_and_bias_grads(
            grad_y, x, ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
        return grad_x, grad_weight, grad_bias


def linear_input_grad(grad_y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """d(x W^T + b)/dx for output gradient grad_y [..., out] and W [out, in] (one
    dtype, autocast off): grad_y W [..., in], bit-identical to what autograd
    gives `linear` (emulated: the FP32 product rounded to BF16 once; else the
    product of F.linear's backward)."""
    if emulates_bf16_products(grad_y, weight):
        with _no_autocast():
            return (grad_y.float() @ weight.float()).to(torch.bfloat16)
    return grad_y.matmul(weight)


def linear_weight_and_bias_grads(grad_y: torch.Tensor, x: torch.Tensor, weight: bool, bias: bool
                                 ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(grad_y^T x [out, in] if `weight`, the row sum of grad_y [out] if `bias`) for
    `linear(x, W, b)`, x [..., in] and grad_y [..., out] of one dtype, autocast
    off; bit-identical to autograd's, as `linear_input_grad`."""
    grad_weight = grad_bias = None
    if emulates_bf16_products(grad_y, x):
        with _no_autocast():
            rows = grad_y.float().reshape(-1, grad_y.shape[-1])
            if weight:
                grad_weight = (rows.T @ x.float().reshape(-1, x.shape[-1])).to(torch.bfloat16)
            if bias:
                grad_bias = rows.sum(0).to(torch.bfloat16)
        return grad_weight, grad_bias
    rows = grad_y.reshape(-1, grad_y.shape[-1])
    if weight:
        grad_weight = rows.t().mm(x.reshape(-1, x.shape[-1]))
    if bias:
        grad_bias = rows.sum(0)
    return grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor,
           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`; for BF16 inputs on a CPU without native BF16,
    computed in FP32 from the exact upcasts and rounded to BF16 once (see the
    module docstring). Output dtype and shape are those of `F.linear`."""
    if emulates_bf16_products(x, weight):
        return _LinearInFp32.apply(x, weight, bias)
    if _emulated_autocast(x, weight):
        return _LinearInFp32.apply(*_bf16(x, weight, bias))
    return F.linear(x, weight, bias)


_cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_cpu_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _FlashAttentionInFp32(torch.autograd.Function):
    """Causal or full attention of BF16 q, k, v [b, heads, s, d] by torch's CPU
    flash kernel in FP32; saves q, k, v, the BF16 output and the FP32 log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, is_causal, scale):
        with _no_autocast():
            out, logsumexp = _cpu_flash(q.float(), k.float(), v.float(), 0.0, is_causal,
                                        scale=scale)
        out = out.to(torch.bfloat16)
        ctx.save_for_backward(q, k, v, out, logsumexp)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, logsumexp = ctx.saved_tensors
        with _no_autocast():
            grads = _cpu_flash_backward(grad_out.float(), q.float(), k.float(), v.float(),
                                        out.float(), logsumexp, 0.0, ctx.is_causal,
                                        scale=ctx.scale)
        return (*(grad.to(torch.bfloat16) for grad in grads), None, None)


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                 attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 **kwargs) -> torch.Tensor:
    """`F.scaled_dot_product_attention`; for BF16 inputs on a CPU without native
    BF16, computed in FP32 and rounded to BF16 once (see the module docstring)."""
    if _emulated_autocast(q, k, v):
        q, k, v = _bf16(q, k, v)
        with _no_autocast():
            return scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                is_causal=is_causal, scale=scale, **kwargs)
    if not emulates_bf16_products(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, **kwargs)
    if attn_mask is None and dropout_p == 0.0 and not kwargs and q.shape[1] == k.shape[1]:
        return _FlashAttentionInFp32.apply(q, k, v, is_causal, scale)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask,
                                          dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                                          **kwargs).to(torch.bfloat16)
