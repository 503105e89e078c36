"""Triton kernels: the SR cast and the fused AdamW step of every strategy.

The Triton twins of `megatron_sr.precision.rounding` and of the torch path
in `megatron_sr.precision.adamw`; for the same inputs they write the same
bits (checked under `TRITON_INTERPRET=1` on the CPU). Callers go through
`rounding`/`adamw`, which validate inputs; the launchers here assume
contiguous 1-D tensors of equal length on one device.

Random bits: element `i` of the logical tensor (i = offset + position in the
segment) takes `tl.randint4x(key, i // 2)`; the even element uses the low,
the odd element the high 16 bits of each word; word 0 rounds the parameter,
1 exp_avg, 2 exp_avg_sq. Math runs in fp32 registers with IEEE division and
square root; each tensor is read once and written once.
"""
from __future__ import annotations

import triton
import triton.language as tl

BLOCK_SIZE = 1024

# The *_WRITE constexprs are the write-mode codes of megatron_sr.precision.adamw:
# 0 exact (fp32 tensor), 1 bf16 round to nearest even, 2 bf16 stochastic,
# 3 (param only) bf16 round to nearest with the residual kept in the kahan buffer.
_WRITE_STOCHASTIC = 2


@triton.jit
def _random16(word, shift):
    return (word >> shift) & 0xFFFF


@triton.jit
def _sr_to_bf16(x, random16):
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + random16) & 0xFFFF0000
    rounded = tl.where(x != x, bits | 0x00400000, rounded)
    return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _rtn_to_bf16(x):
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    rounded = tl.where(x != x, bits | 0x00400000, rounded)
    return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _write(ptr, value, mask, random16, MODE: tl.constexpr):
    if MODE == 0:
        tl.store(ptr, value, mask=mask)
    elif MODE == 1:
        tl.store(ptr, _rtn_to_bf16(value), mask=mask)
    else:
        tl.store(ptr, _sr_to_bf16(value, random16), mask=mask)


@triton.jit(do_not_specialize=["seed", "offset", "n"])
def _sr_cast_kernel(x_ptr, out_ptr, seed, offset, n, BLOCK: tl.constexpr):
    position = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = position < n
    index = offset.to(tl.int64) + position
    word0, _, _, _ = tl.randint4x(seed.to(tl.int64), index >> 1)
    shift = ((index & 1) * 16).to(tl.uint32)
    x = tl.load(x_ptr + position, mask=mask)
    tl.store(out_ptr + position, _sr_to_bf16(x, _random16(word0, shift)), mask=mask)


@triton.jit(do_not_specialize=["seed", "offset", "n"])
def _adamw_kernel(
    param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, master_ptr, kahan_ptr,
    lr, beta1, one_minus_beta1, beta2, one_minus_beta2,
    inv_bias_correction1, inv_bias_correction2, eps, decay,
    seed, offset, n,
    PARAM_WRITE: tl.constexpr, EXP_AVG_WRITE: tl.constexpr, EXP_AVG_SQ_WRITE: tl.constexpr,
    HAS_MASTER: tl.constexpr, NEEDS_RANDOM: tl.constexpr, BLOCK: tl.constexpr,
):
    position = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = position < n
    if NEEDS_RANDOM:
        index = offset.to(tl.int64) + position
        word0, word1, word2, _ = tl.randint4x(seed.to(tl.int64), index >> 1)
        shift = ((index & 1) * 16).to(tl.uint32)
        random_param = _random16(word0, shift)
        random_exp_avg = _random16(word1, shift)
        random_exp_avg_sq = _random16(word2, shift)
    else:
        random_param = 0
        random_exp_avg = 0
        random_exp_avg_sq = 0

    grad = tl.load(grad_ptr + position, mask=mask).to(tl.float32)
    exp_avg = tl.load(exp_avg_ptr + position, mask=mask).to(tl.float32)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + position, mask=mask).to(tl.float32)
    if HAS_MASTER:
        weight = tl.load(master_ptr + position, mask=mask)
    else:
        weight = tl.load(param_ptr + position, mask=mask).to(tl.float32)

    exp_avg = exp_avg * beta1 + grad * one_minus_beta1
    exp_avg_sq = exp_avg_sq * beta2 + (grad * grad) * one_minus_beta2
    denom = tl.sqrt_rn(exp_avg_sq * inv_bias_correction2) + eps
    update = tl.div_rn(exp_avg * inv_bias_correction1, denom)
    weight = weight * decay - update * lr

    _write(exp_avg_ptr + position, exp_avg, mask, random_exp_avg, EXP_AVG_WRITE)
    _write(exp_avg_sq_ptr + position, exp_avg_sq, mask, random_exp_avg_sq, EXP_AVG_SQ_WRITE)
    if HAS_MASTER:
        tl.store(master_ptr + position, weight, mask=mask)
        tl.store(param_ptr + position, _rtn_to_bf16(weight), mask=mask)
    elif PARAM_WRITE == 3:
        target = weight + tl.load(kahan_ptr + position, mask=mask).to(tl.float32)
        param = _rtn_to_bf16(target)
        tl.store(param_ptr + position, param, mask=mask)
        tl.store(kahan_ptr + position, _rtn_to_bf16(target - param.to(tl.float32)), mask=mask)
    else:
        _write(param_ptr + position, weight, mask, random_param, PARAM_WRITE)


def _grid(n: int):
    return (triton.cdiv(n, BLOCK_SIZE),)


def sr_cast(x, out, seed: int, offset: int) -> None:
    """SR of contiguous fp32 `x` into bf16 `out` (same length), stream 0."""
    n = x.numel()
    if n:
        _sr_cast_kernel[_grid(n)](x, out, seed, offset, n, BLOCK=BLOCK_SIZE)


def adamw_step(param, grad, exp_avg, exp_avg_sq, master, kahan, coefficients, seed: int, offset: int,
               *, param_write: int, exp_avg_write: int, exp_avg_sq_write: int) -> None:
    """Launch the fused AdamW kernel. `coefficients` holds, as Python floats
    already rounded to fp32: lr, beta1, 1-beta1, beta2, 1-beta2,
    1/bias_correction1, 1/bias_correction2, eps, 1-lr*weight_decay.
    `master` / `kahan` may be None (then `param` stands in for the unused
    pointer)."""
    n = param.numel()
    if n == 0:
        return
    needs_random = _WRITE_STOCHASTIC in (param_write, exp_avg_write, exp_avg_sq_write)
    _adamw_kernel[_grid(n)](
        param, grad, exp_avg, exp_avg_sq,
        param if master is None else master, param if kahan is None else kahan,
        *coefficients, seed, offset, n,
        PARAM_WRITE=param_write, EXP_AVG_WRITE=exp_avg_write, EXP_AVG_SQ_WRITE=exp_avg_sq_write,
        HAS_MASTER=master is not None, NEEDS_RANDOM=needs_random, BLOCK=BLOCK_SIZE,
    )
