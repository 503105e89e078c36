"""The torch reference of the fused AdamW step: the arithmetic every backend follows.

`adamw_values` is the one definition of the update on fp32 values; the
Triton kernel (`kernels._adamw_kernel`) and the C kernel (`native_kernel.c`)
repeat it op for op, with no multiply-add contraction and correctly rounded
division and square root, and so write the same bits. `update_elements`
applies it to one segment element by element (the "eager" backend, and the
edges of the compiled one), `update_pairs` to pairs of elements that
share one Philox call (the body of the "compiled" backend,
`megatron_sr.precision.adamw_compiled`).

Write modes: how a computed fp32 value is stored. The kernels' *_WRITE
constexprs and the C kernel use the same codes.
"""
from __future__ import annotations

import struct

import torch

from megatron_sr.precision import rounding
from megatron_sr.precision.strategies import PrecisionStrategy

EAGER_CHUNK = 1 << 16

WRITE_EXACT, WRITE_NEAREST, WRITE_STOCHASTIC, WRITE_KAHAN = 0, 1, 2, 3


def _write_mode(dtype: torch.dtype, rounding_mode: str) -> int:
    if dtype == torch.float32:
        return WRITE_EXACT
    return {"nearest": WRITE_NEAREST, "stochastic": WRITE_STOCHASTIC, "kahan": WRITE_KAHAN}[rounding_mode]


def write_modes(strategy: PrecisionStrategy) -> tuple[int, int, int]:
    """(param, exp_avg, exp_avg_sq) write modes of a strategy. With a master
    copy, the param write is always RTN of the master."""
    param_mode = WRITE_NEAREST if strategy.master_dtype is not None else _write_mode(
        strategy.param_dtype, strategy.param_rounding)
    return (param_mode,
            _write_mode(strategy.exp_avg_dtype, strategy.state_rounding),
            _write_mode(strategy.exp_avg_sq_dtype, strategy.state_rounding))


def adamw_coefficient_values(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                             step: int, grad_scale: float = 1.0) -> list[float]:
    """The ten scalars every backend computes with, as Python floats holding
    fp32 values: lr, beta1, 1-beta1, beta2, 1-beta2, 1/bc1, 1/bc2, eps,
    1-lr*wd, grad_scale (derived in float64, then rounded once to fp32). The
    gradient is multiplied by grad_scale in fp32 before use (1.0: exactly
    the gradient)."""
    values = [lr, beta1, 1.0 - beta1, beta2, 1.0 - beta2,
              1.0 / (1.0 - beta1 ** step), 1.0 / (1.0 - beta2 ** step), eps, 1.0 - lr * weight_decay,
              grad_scale]
    # struct's 'f' rounds a double to the nearest fp32, as torch's float64 -> float32 cast does.
    return list(struct.unpack("10f", struct.pack("10f", *values)))


def adamw_coefficients(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                       step: int, grad_scale: float = 1.0) -> torch.Tensor:
    """`adamw_coefficient_values` as an fp32 tensor of ten values (CPU)."""
    return torch.tensor(adamw_coefficient_values(lr, beta1, beta2, eps, weight_decay, step, grad_scale),
                        dtype=torch.float32)


def _round_for_write(value: torch.Tensor, mode: int, random16) -> torch.Tensor:
    if mode == WRITE_EXACT:
        return value
    if mode == WRITE_STOCHASTIC:
        return rounding.sr_round_bits(value, random16)
    return rounding.round_nearest(value)


def adamw_values(grad, exp_avg, exp_avg_sq, weight, coefficients):
    """AdamW on fp32 values: new (exp_avg, exp_avg_sq, weight). The single
    definition of the arithmetic, op for op the Triton and C kernels'."""
    (lr, beta1, one_minus_beta1, beta2, one_minus_beta2, inv_bc1, inv_bc2, eps, decay,
     grad_scale) = coefficients.unbind(0)
    grad = grad * grad_scale
    exp_avg = exp_avg * beta1 + grad * one_minus_beta1
    exp_avg_sq = exp_avg_sq * beta2 + (grad * grad) * one_minus_beta2
    # torch.sqrt of fp32 on the CPU is not always correctly rounded (up to
    # 1 ulp off); the square root of the float64 value, rounded to fp32, is,
    # and it is what Triton's sqrt_rn returns.
    denom = torch.sqrt((exp_avg_sq * inv_bc2).double()).float() + eps
    update = (exp_avg * inv_bc1) / denom
    return exp_avg, exp_avg_sq, weight * decay - update * lr


def _needs_random(param_write: int, exp_avg_write: int, exp_avg_sq_write: int) -> bool:
    # Written with == rather than `in (...)`: torch 2.13's dynamo misevaluates
    # `in` over closure ints under dynamic=True.
    return (param_write == WRITE_STOCHASTIC or exp_avg_write == WRITE_STOCHASTIC
            or exp_avg_sq_write == WRITE_STOCHASTIC)


def update_elements(param, grad, exp_avg, exp_avg_sq, master, kahan, coefficients, round_keys, offset,
                  param_write: int, exp_avg_write: int, exp_avg_sq_write: int) -> None:
    """The torch twin of kernels._adamw_kernel on 1-D tensors of one segment, one element
    at a time; `offset` is an int64 0-d tensor, `round_keys` from
    `rounding.philox_key_tensor`."""
    random_param = random_exp_avg = random_exp_avg_sq = None
    if _needs_random(param_write, exp_avg_write, exp_avg_sq_write):
        index = torch.arange(param.numel(), dtype=torch.int64, device=param.device) + offset
        random_param, random_exp_avg, random_exp_avg_sq, _ = rounding.random_halfwords(index, round_keys)

    weight = param.float() if master is None else master
    m, v, weight = adamw_values(grad.float(), exp_avg.float(), exp_avg_sq.float(), weight, coefficients)

    exp_avg.copy_(_round_for_write(m, exp_avg_write, random_exp_avg))
    exp_avg_sq.copy_(_round_for_write(v, exp_avg_sq_write, random_exp_avg_sq))
    if master is not None:
        master.copy_(weight)
        param.copy_(rounding.round_nearest(weight))
    elif param_write == WRITE_KAHAN:
        # The residual comes from the integer bit pattern: inductor may fold
        # a float -> bf16 -> float round trip away, which would zero it.
        target = weight + kahan.float()
        new_param = rounding.nearest_pattern(target).view(torch.float32)
        param.copy_(new_param)
        kahan.copy_(rounding.round_nearest(target - new_param))
    else:
        param.copy_(_round_for_write(weight, param_write, random_param))


def _unpack_pairs(words):
    """(even, odd) fp32 values of pair words: int32 words hold two bf16
    values, int64 words two fp32 values (the even element in the low half)."""
    if words.dtype == torch.int32:
        return (words << 16).view(torch.float32), (words & -65536).view(torch.float32)
    return (words & 0xFFFFFFFF).to(torch.int32).view(torch.float32), (words >> 32).to(torch.int32).view(torch.float32)


def _pack_bf16_patterns(even_pattern, odd_pattern):
    """int32 pair word from two bf16 results given as fp32 bit patterns."""
    return odd_pattern | ((even_pattern >> 16) & 0xFFFF)


def _pack_fp32(even, odd):
    """int64 pair word from two fp32 values."""
    return (odd.view(torch.int32).to(torch.int64) << 32) | (even.view(torch.int32).to(torch.int64) & 0xFFFFFFFF)


def _pair_word(even, odd, mode: int, random_even, random_odd):
    if mode == WRITE_EXACT:
        return _pack_fp32(even, odd)
    if mode == WRITE_STOCHASTIC:
        return _pack_bf16_patterns(rounding.sr_pattern(even, random_even), rounding.sr_pattern(odd, random_odd))
    return _pack_bf16_patterns(rounding.nearest_pattern(even), rounding.nearest_pattern(odd))


def update_pairs(param, grad, exp_avg, exp_avg_sq, master, kahan, coefficients, round_keys, pair_offset,
                        param_write: int, exp_avg_write: int, exp_avg_sq_write: int) -> None:
    """`update_elements` on pairs of elements (even logical index first), each
    tensor viewed as pair words (`_unpack_pairs`): one Philox call serves
    both elements of a pair, as the counter i // 2 implies, which halves the
    random-bit work of the per-element form. Same results bit for bit
    (NaN payloads aside). `pair_offset` = logical index of the first pair / 2."""
    randoms = [(None, None)] * 3
    if _needs_random(param_write, exp_avg_write, exp_avg_sq_write):
        pair_index = torch.arange(param.numel(), dtype=torch.int64, device=param.device) + pair_offset
        words = rounding.philox4x32(pair_index, round_keys)[:3]
        randoms = [((word & 0xFFFF).to(torch.int32), ((word >> 16) & 0xFFFF).to(torch.int32)) for word in words]
    (random_param, random_exp_avg, random_exp_avg_sq) = randoms

    halves = []
    for half in (0, 1):
        weight = _unpack_pairs(param if master is None else master)[half]
        halves.append(adamw_values(_unpack_pairs(grad)[half], _unpack_pairs(exp_avg)[half],
                                    _unpack_pairs(exp_avg_sq)[half], weight, coefficients))
    (m_even, v_even, w_even), (m_odd, v_odd, w_odd) = halves

    exp_avg.copy_(_pair_word(m_even, m_odd, exp_avg_write, *random_exp_avg))
    exp_avg_sq.copy_(_pair_word(v_even, v_odd, exp_avg_sq_write, *random_exp_avg_sq))
    if master is not None:
        master.copy_(_pack_fp32(w_even, w_odd))
        param.copy_(_pair_word(w_even, w_odd, WRITE_NEAREST, None, None))
    elif param_write == WRITE_KAHAN:
        kahan_even, kahan_odd = _unpack_pairs(kahan)
        target_even, target_odd = w_even + kahan_even, w_odd + kahan_odd
        param_even, param_odd = rounding.nearest_pattern(target_even), rounding.nearest_pattern(target_odd)
        param.copy_(_pack_bf16_patterns(param_even, param_odd))
        kahan.copy_(_pair_word(target_even - param_even.view(torch.float32),
                               target_odd - param_odd.view(torch.float32), WRITE_NEAREST, None, None))
    else:
        param.copy_(_pair_word(w_even, w_odd, param_write, *random_param))


def run_eager(flat, coefficients: torch.Tensor, round_keys: torch.Tensor, offset: int, modes) -> None:
    """The "eager" backend on one segment: `update_elements` in chunks of
    EAGER_CHUNK elements. `flat`: (param, grad, exp_avg, exp_avg_sq, master,
    kahan) 1-D views, None where the strategy keeps no such tensor."""
    numel = flat[0].numel()
    for start in range(0, numel, EAGER_CHUNK):
        end = min(start + EAGER_CHUNK, numel)
        chunk = [t[start:end] if t is not None else None for t in flat]
        offset_tensor = torch.tensor(offset + start, dtype=torch.int64, device=flat[0].device)
        update_elements(*chunk, coefficients, round_keys, offset_tensor, *modes)
