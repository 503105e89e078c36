"""The fused AdamW step: one entry point for every precision strategy.

`adamw_step(...)` updates, in place, one contiguous segment of one
parameter: its parameter values, gradient, Adam moments and, depending on
the strategy, fp32 master copy or bf16 Kahan compensation. Callers: the
distributed optimizer (on each rank's shard of each parameter) and the
standalone `megatron_sr.optimizer.AdamW` (on whole parameters).

Update (AdamW with bias correction and decoupled weight decay), in fp32:

    m <- beta1*m + (1-beta1)*g          v <- beta2*v + (1-beta2)*g*g
    w <- w*(1 - lr*wd) - lr * (m/bc1) / (sqrt(v/bc2) + eps)
    bc1 = 1 - beta1^step,  bc2 = 1 - beta2^step

Each stored tensor is rounded once, as the strategy's table row says
(`megatron_sr.precision.strategies`): fp32 tensors exactly; bf16 params
with SR (bf16-sr), round-to-nearest (bf16), RTN of the fp32 master
(bf16-mixed) or RTN plus a compensation buffer that keeps the lost residual
(bf16-kahan); bf16 m and v with the strategy's `state_rounding`.

SR bits come from Philox key `sr_key` (see `megatron_sr.random.sr_key`) and
the element's position in the parameter's logical tensor, `offset + i`; so
one call over a tensor equals calls over any contiguous shards with their
offsets, bit for bit, on any backend.

Backends (bit-identical for the same inputs; NaN payloads aside):
- "native": C code (`megatron_sr.precision.native`, `native_kernel.c`) built
  with the system C compiler on first use and cached; the default for CPU
  tensors. Without a compiler (or when the build fails) it warns once and
  the CPU default becomes "compiled" / "eager" as below.
- "triton": the kernel of `megatron_sr.precision.kernels`; the default for
  CUDA tensors, usable on the CPU under TRITON_INTERPRET=1 (slow, for tests).
- "compiled": the torch path fused by `torch.compile` (dynamic shapes, so
  sizes do not recompile; one compile per strategy), working on pairs of
  elements so that one Philox call serves two; without "native", the
  default on the CPU for segments of at least COMPILE_MIN_NUMEL elements.
- "eager": the same torch code without compilation, in chunks.
The env var MEGATRON_SR_ADAMW_BACKEND forces one ("native" falls back like
the default when it cannot be built); MEGATRON_SR_COMPILE=0 turns the
torch CPU fallback from "compiled" into "eager".
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch

from megatron_sr.precision import native, rounding
from megatron_sr.precision.strategies import PrecisionStrategy, get_strategy

BACKENDS = ("native", "triton", "compiled", "eager")
BACKEND_ENV = "MEGATRON_SR_ADAMW_BACKEND"
COMPILE_ENV = "MEGATRON_SR_COMPILE"
EAGER_CHUNK = 1 << 16
COMPILE_MIN_NUMEL = 1 << 16
_RECOMPILE_LIMIT = 64

# How a computed fp32 value is written back; the kernels' *_WRITE constexprs use the same codes.
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


def adamw_coefficients(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                       step: int) -> torch.Tensor:
    """The nine fp32 scalars both backends compute with: lr, beta1, 1-beta1,
    beta2, 1-beta2, 1/bc1, 1/bc2, eps, 1-lr*wd (derived in float64, then
    rounded once to fp32)."""
    values = [lr, beta1, 1.0 - beta1, beta2, 1.0 - beta2,
              1.0 / (1.0 - beta1 ** step), 1.0 / (1.0 - beta2 ** step), eps, 1.0 - lr * weight_decay]
    return torch.tensor(values, dtype=torch.float32)


def _round_for_write(value: torch.Tensor, mode: int, random16) -> torch.Tensor:
    if mode == WRITE_EXACT:
        return value
    if mode == WRITE_STOCHASTIC:
        return rounding.sr_round_bits(value, random16)
    return rounding.round_nearest(value)


def _adamw_values(grad, exp_avg, exp_avg_sq, weight, coefficients):
    """AdamW on fp32 values: new (exp_avg, exp_avg_sq, weight). The single
    definition of the arithmetic, op for op the Triton kernel's."""
    lr, beta1, one_minus_beta1, beta2, one_minus_beta2, inv_bc1, inv_bc2, eps, decay = coefficients.unbind(0)
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


def _fused_update(param, grad, exp_avg, exp_avg_sq, master, kahan, coefficients, round_keys, offset,
                  param_write: int, exp_avg_write: int, exp_avg_sq_write: int) -> None:
    """The torch twin of kernels._adamw_kernel on 1-D tensors, one element
    at a time; `offset` is an int64 0-d tensor, `round_keys` from
    `rounding.philox_key_tensor`."""
    random_param = random_exp_avg = random_exp_avg_sq = None
    if _needs_random(param_write, exp_avg_write, exp_avg_sq_write):
        index = torch.arange(param.numel(), dtype=torch.int64, device=param.device) + offset
        random_param, random_exp_avg, random_exp_avg_sq, _ = rounding.random_halfwords(index, round_keys)

    weight = param.float() if master is None else master
    m, v, weight = _adamw_values(grad.float(), exp_avg.float(), exp_avg_sq.float(), weight, coefficients)

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


def _fused_update_pairs(param, grad, exp_avg, exp_avg_sq, master, kahan, coefficients, round_keys, pair_offset,
                        param_write: int, exp_avg_write: int, exp_avg_sq_write: int) -> None:
    """`_fused_update` on pairs of elements (even logical index first), each
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
        halves.append(_adamw_values(_unpack_pairs(grad)[half], _unpack_pairs(exp_avg)[half],
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


_compiled_updates = {}


def _get_compiled_update(function, modes: tuple[int, int, int]):
    """`function` (`_fused_update` or `_fused_update_pairs`) compiled for one
    combination of write modes (fixed per strategy, so a run compiles once
    per form; sizes are dynamic)."""
    cache_key = (function.__name__, modes)
    if cache_key not in _compiled_updates:
        def update(param, grad, exp_avg, exp_avg_sq, master, kahan, coefficients, round_keys, offset):
            function(param, grad, exp_avg, exp_avg_sq, master, kahan, coefficients, round_keys, offset, *modes)

        compiled = torch.compile(update, dynamic=True, fullgraph=True)

        def run_compiled(*args):
            # Every (form, modes) pair shares `update`'s code object, and so
            # dynamo's per-code-object recompile limit (default 8).
            with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
                compiled(*args)

        _compiled_updates[cache_key] = run_compiled
    return _compiled_updates[cache_key]


def _as_pair_words(tensor: torch.Tensor):
    """`tensor` (even length) viewed as int32 (bf16 pairs) or int64 (fp32
    pairs) words, or None when its start, or the size of its storage (which
    torch.compile checks), is not a multiple of the word size."""
    word_dtype = torch.int32 if tensor.element_size() == 2 else torch.int64
    if tensor.data_ptr() % word_dtype.itemsize or tensor.untyped_storage().nbytes() % word_dtype.itemsize:
        return None
    return tensor.view(word_dtype)


def _run_compiled(flat, coefficients, round_keys, offset: int, modes) -> None:
    """The compiled torch path: pairs for the even-aligned body of the
    segment; a lone first element (odd offset) and last element, or a whole
    segment whose storage is not pair-aligned, go element by element."""
    numel = flat[0].numel()
    device = flat[0].device
    body_start = offset % 2
    body_end = body_start + (numel - body_start) // 2 * 2
    body = [t[body_start:body_end] if t is not None else None for t in flat]
    words = [_as_pair_words(t) if t is not None else None for t in body]
    if any(w is None and t is not None for w, t in zip(words, body)):
        offset_tensor = torch.tensor(offset, dtype=torch.int64, device=device)
        _get_compiled_update(_fused_update, modes)(*flat, coefficients, round_keys, offset_tensor)
        return
    if body_end > body_start:
        pair_offset = torch.tensor((offset + body_start) // 2, dtype=torch.int64, device=device)
        _get_compiled_update(_fused_update_pairs, modes)(*words, coefficients, round_keys, pair_offset)
    for start, end in ((0, body_start), (body_end, numel)):
        if end > start:
            piece = [t[start:end] if t is not None else None for t in flat]
            offset_tensor = torch.tensor(offset + start, dtype=torch.int64, device=device)
            _fused_update(*piece, coefficients, round_keys, offset_tensor, *modes)


def _torch_cpu_backend(numel: int) -> str:
    """"compiled" for segments of at least COMPILE_MIN_NUMEL elements, "eager"
    for smaller ones (whose time is overhead) and when MEGATRON_SR_COMPILE=0."""
    if os.environ.get(COMPILE_ENV, "1") == "0" or numel < COMPILE_MIN_NUMEL:
        return "eager"
    return "compiled"


def resolve_backend(backend: Optional[str], device: torch.device, numel: int) -> str:
    """The backend a call runs on: `backend` if given, else the env var
    MEGATRON_SR_ADAMW_BACKEND, else "triton" for CUDA and "native" for CPU
    tensors. "native" that cannot be built (one warning) becomes the torch
    CPU backend of `_torch_cpu_backend`."""
    chosen = backend or os.environ.get(BACKEND_ENV) or None
    if chosen is None:
        if device.type == "cuda":
            return "triton"
        if device.type == "cpu" and native.available():
            return "native"
        return _torch_cpu_backend(numel)
    if chosen not in BACKENDS:
        raise ValueError(f"adamw_step: backend {chosen!r} (argument or ${BACKEND_ENV}) must be one of {BACKENDS}")
    if chosen == "native":
        if device.type != "cpu":
            raise ValueError(f"adamw_step: backend 'native' needs CPU tensors, got {device}")
        if not native.available():
            return _torch_cpu_backend(numel)
    if chosen == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("adamw_step: backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 "
                         "set before triton is imported")
    return chosen


def _validate(strategy: PrecisionStrategy, tensors: dict) -> None:
    expected_dtypes = {
        "param": strategy.param_dtype, "grad": strategy.grad_dtype, "exp_avg": strategy.exp_avg_dtype,
        "exp_avg_sq": strategy.exp_avg_sq_dtype, "master": strategy.master_dtype,
        "kahan": strategy.kahan_dtype,
    }
    reference = tensors["param"]
    if not isinstance(reference, torch.Tensor):
        raise TypeError(f"adamw_step: param must be a torch.Tensor, got {type(reference).__name__}")
    for name, expected in expected_dtypes.items():
        tensor = tensors[name]
        if expected is None:
            if tensor is not None:
                raise ValueError(f"adamw_step: strategy {strategy.name!r} keeps no {name}, but {name} was given")
            continue
        if tensor is None:
            raise ValueError(f"adamw_step: strategy {strategy.name!r} needs a {name} tensor ({expected})")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"adamw_step: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype != expected:
            raise TypeError(f"adamw_step: {name} has dtype {tensor.dtype}, strategy {strategy.name!r} "
                            f"stores it as {expected}")
        if tensor.device != reference.device:
            raise ValueError(f"adamw_step: {name} is on {tensor.device}, param on {reference.device}")
        if tensor.shape != reference.shape:
            raise ValueError(f"adamw_step: {name} has shape {tuple(tensor.shape)}, param has "
                             f"{tuple(reference.shape)}")
        if not tensor.is_contiguous():
            raise ValueError(f"adamw_step: {name} must be contiguous")


def adamw_step(strategy: Union[str, PrecisionStrategy], param: torch.Tensor, grad: torch.Tensor,
               exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, master: Optional[torch.Tensor] = None,
               kahan: Optional[torch.Tensor] = None, lr: float, beta1: float, beta2: float, eps: float,
               weight_decay: float, step: int, sr_key: int, offset: int = 0,
               backend: Optional[str] = None) -> None:
    """One AdamW step, in place, on a contiguous segment of one parameter.

    All tensors have the same shape and device and the dtypes of `strategy`
    (a `PrecisionStrategy` or its name); `master` / `kahan` are given exactly
    when the strategy keeps them. `step` counts from 1. `sr_key` is the
    Philox key of this parameter at this step (`megatron_sr.random.sr_key`),
    `offset` the index of the segment's first element in the parameter's
    logical tensor. `grad` is only read. Raises TypeError/ValueError naming
    the offending tensor or argument.
    """
    if isinstance(strategy, str):
        strategy = get_strategy(strategy)
    _validate(strategy, dict(param=param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                             master=master, kahan=kahan))
    if step < 1:
        raise ValueError(f"adamw_step: step must be >= 1, got {step}")
    if offset < 0:
        raise ValueError(f"adamw_step: offset must be >= 0, got {offset}")
    if not 0 <= sr_key <= rounding.MAX_KEY:
        raise ValueError(f"adamw_step: sr_key {sr_key} must be in [0, 2^63)")

    chosen = resolve_backend(backend, param.device, param.numel())
    coefficients = adamw_coefficients(lr, beta1, beta2, eps, weight_decay, step)
    param_write, exp_avg_write, exp_avg_sq_write = write_modes(strategy)
    flat = [t.view(-1) if t is not None else None for t in (param, grad, exp_avg, exp_avg_sq, master, kahan)]

    if chosen == "triton":
        from megatron_sr.precision import kernels

        kernels.adamw_step(*flat, coefficients.tolist(), sr_key, offset, param_write=param_write,
                           exp_avg_write=exp_avg_write, exp_avg_sq_write=exp_avg_sq_write)
        return

    modes = (param_write, exp_avg_write, exp_avg_sq_write)
    if chosen == "native":
        if native.supports(*modes, has_master=master is not None, grad_dtype=grad.dtype):
            native.adamw_step(*flat, coefficients, sr_key, offset, param_write=param_write,
                              exp_avg_write=exp_avg_write, exp_avg_sq_write=exp_avg_sq_write)
            return
        chosen = _torch_cpu_backend(param.numel())

    coefficients = coefficients.to(param.device)
    round_keys = rounding.philox_key_tensor(sr_key, device=param.device)
    if chosen == "compiled":
        _run_compiled(flat, coefficients, round_keys, offset, modes)
        return
    numel = param.numel()
    for start in range(0, numel, EAGER_CHUNK):
        end = min(start + EAGER_CHUNK, numel)
        chunk = [t[start:end] if t is not None else None for t in flat]
        offset_tensor = torch.tensor(offset + start, dtype=torch.int64, device=param.device)
        _fused_update(*chunk, coefficients, round_keys, offset_tensor, *modes)
