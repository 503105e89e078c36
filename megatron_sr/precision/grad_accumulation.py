"""Stochastically rounded adds of micro-batch gradients into a bf16 gradient buffer.

With several micro-batches per step, a bf16 gradient buffer rounds after
every add: `main_grad <- bf16(main_grad + grad)`. Round to nearest loses a
micro-batch's contribution whenever it is below half an ulp of the running
sum (the bias the fp32 buffer avoids at 2 more bytes per parameter);
`--grad-accumulation-rounding stochastic` rounds the fp32 sum with SR
instead, so `E[SR(a + g)] = a + g` and the accumulated gradient is unbiased.

Contract (docs/DESIGN.md, "Stochastic rounding: the contract"): the fp32 sum
`float(main_grad) + float(grad)` (one IEEE add) is rounded as
`rounding.stochastic_round` rounds, drawing stream 0 of the key
`megatron_sr.random.grad_accumulation_key(seed, step, micro-batch,
parameter name, TP rank if sharded)`; element i of the parameter's tensor on
this rank uses Philox counter i // 2 (offset 0: the buffer's hook adds whole
parameters). The torch reference here, the C kernel (`native`) and the
Triton kernel (`kernels._sr_add_kernel`, no FMA) write the same bits.

`stochastic_add_` is the hook's add (bf16 += bf16); `stochastic_round_into_`
writes an fp32 sum computed elsewhere (the wgrad GEMM of gradient-accumulation
fusion, `main_grad + g^T x` in fp32) into the bf16 buffer with the same
rounding. Backends as for the AdamW step (`megatron_sr.precision.backend`):
"native" on CPU tensors, "triton" on CUDA ones, the torch reference for
"compiled" and "eager".
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_sr.precision import native
from megatron_sr.precision.backend import resolve_backend
from megatron_sr.precision.rounding import MAX_KEY, stochastic_round


def _check(name: str, target: torch.Tensor, source: torch.Tensor, source_dtype: torch.dtype,
           key: int, offset: int) -> None:
    if target.dtype != torch.bfloat16 or source.dtype != source_dtype:
        raise TypeError(f"{name}: needs a bf16 target and a {source_dtype} source, got "
                        f"{target.dtype} and {source.dtype}")
    if target.shape != source.shape or target.device != source.device:
        raise ValueError(f"{name}: target {tuple(target.shape)} on {target.device} and source "
                         f"{tuple(source.shape)} on {source.device} must match")
    if not target.is_contiguous():
        raise ValueError(f"{name}: the target must be contiguous (a view into the gradient buffer)")
    if not 0 <= key <= MAX_KEY or offset < 0:
        raise ValueError(f"{name}: key {key} must be in [0, 2^63) and offset {offset} >= 0")


def stochastic_add_(accumulator: torch.Tensor, addend: torch.Tensor, key: int, offset: int = 0,
                    backend: Optional[str] = None) -> torch.Tensor:
    """accumulator <- SR(float(accumulator) + float(addend)), in place.

    accumulator: contiguous bf16 tensor (a parameter's `main_grad`); addend:
    bf16 of the same shape and device; key: Philox key below 2^63
    (`grad_accumulation_key`); offset: the logical index of the first element.
    `backend`: see the module docstring (None: the default for the device).
    Returns `accumulator`."""
    _check("stochastic_add_", accumulator, addend, torch.bfloat16, key, offset)
    chosen = resolve_backend(backend, accumulator.device, accumulator.numel())
    if chosen == "native":
        native.stochastic_add_(accumulator, addend.contiguous(), key, offset)
    elif chosen == "triton":
        from megatron_sr.precision import kernels
        kernels.sr_add(accumulator, addend.contiguous(), key, offset)
    else:
        total = accumulator.float() + addend.float()
        accumulator.copy_(stochastic_round(total, key, offset))
    return accumulator


def stochastic_round_into_(target: torch.Tensor, value: torch.Tensor, key: int, offset: int = 0,
                           backend: Optional[str] = None) -> torch.Tensor:
    """target <- SR(value), in place: fp32 `value` rounded into the contiguous
    bf16 `target` of the same shape, with `stochastic_add_`'s key and offset
    rules (so value = float(target) + float(addend) gives its bits).
    Returns `target`."""
    _check("stochastic_round_into_", target, value, torch.float32, key, offset)
    chosen = resolve_backend(backend, target.device, target.numel())
    if chosen == "native":
        target.copy_(native.stochastic_round(value, key, offset))
    elif chosen == "triton":
        from megatron_sr.precision import kernels
        kernels.sr_cast(value.contiguous(), target, key, offset)
    else:
        target.copy_(stochastic_round(value, key, offset))
    return target
