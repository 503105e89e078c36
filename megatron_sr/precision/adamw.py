"""The fused AdamW step: the entry points for every precision strategy.

`adamw_shard_step(...)` updates, in place, many segments of one bucket shard
(the distributed optimizer's unit: one kernel launch on a GPU);
`adamw_step(...)` one contiguous segment of one parameter (the standalone
`megatron_sr.optimizer.AdamW`). Each updates the parameter values, gradient
reads, Adam moments and, depending on the strategy, fp32 master copy or bf16
Kahan compensation.

Update (AdamW with bias correction and decoupled weight decay), in fp32:

    g <- g * grad_scale      (1 unless clipping: exactly the gradient)
    m <- beta1*m + (1-beta1)*g          v <- beta2*v + (1-beta2)*g*g
    w <- w*(1 - lr*wd) - lr * (m/bc1) / (sqrt(v/bc2) + eps)
    bc1 = 1 - beta1^step,  bc2 = 1 - beta2^step

Each stored tensor is rounded once, as the strategy's table row says
(`megatron_sr.precision.strategies`): fp32 tensors exactly; bf16 params
with SR (bf16-sr), round-to-nearest (bf16), RTN of the fp32 master
(bf16-mixed) or RTN plus a compensation buffer that keeps the lost residual
(bf16-kahan); bf16 m and v with the strategy's `state_rounding`. The
arithmetic is defined once, in `megatron_sr.precision.adamw_torch`.

SR bits come from the segment's Philox key (see `megatron_sr.random.sr_key`)
and the element's position in the parameter's logical tensor, `offset + i`;
so one call over a tensor equals calls over any contiguous shards with their
offsets, bit for bit, on any backend (`megatron_sr.precision.backend`).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from megatron_sr.precision import native, rounding
from megatron_sr.precision.adamw_compiled import run_compiled
from megatron_sr.precision.adamw_torch import adamw_coefficient_values, adamw_coefficients, run_eager, write_modes
from megatron_sr.precision.backend import (BACKEND_ENV, BACKENDS, COMPILE_ENV, COMPILE_MIN_NUMEL,
                                           resolve_backend, torch_cpu_backend)
from megatron_sr.precision.strategies import PrecisionStrategy, get_strategy

__all__ = ["BACKENDS", "BACKEND_ENV", "COMPILE_ENV", "COMPILE_MIN_NUMEL", "SegmentTable", "adamw_coefficients",
           "adamw_shard_step", "adamw_step", "resolve_backend", "sr_key_tensor", "write_modes"]

_BLOCK_SIZE = 1024  # kernels.BLOCK_SIZE, without importing triton on the CPU paths


class SegmentTable:
    """The segments one `adamw_shard_step` call updates in its shard tensors.

    Segment k covers elements [starts[k], starts[k] + lengths[k]) of the
    shard tensors; its first element has index offsets[k] in its
    parameter's logical tensor (the SR counter); weight_decay[k] says
    whether weight decay applies to it. Segments do not overlap and are
    given in increasing order of start. Built once per bucket shard (the
    layout is fixed); `device_table` uploads the Triton kernel's form once
    per device, `native_table` builds the C kernel's once.
    """

    def __init__(self, starts: Sequence[int], lengths: Sequence[int], offsets: Sequence[int],
                 weight_decay: Sequence[bool]):
        if not len(starts) == len(lengths) == len(offsets) == len(weight_decay):
            raise ValueError("SegmentTable: starts, lengths, offsets and weight_decay differ in length")
        end = 0
        for start, length, offset in zip(starts, lengths, offsets):
            if start < end or length < 0 or offset < 0:
                raise ValueError(f"SegmentTable: segment at {start} (length {length}, offset {offset}) overlaps "
                                 f"the previous one (ending at {end}) or has a negative length or offset")
            end = start + length
        self.starts, self.lengths, self.offsets = list(starts), list(lengths), list(offsets)
        self.weight_decay = [bool(flag) for flag in weight_decay]
        self.extent = end
        self._device_tables: dict[torch.device, tuple[torch.Tensor, int]] = {}
        self._native_table: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.starts)

    def native_table(self) -> torch.Tensor:
        """The C kernel's table (`native.adamw_shard_step`): int64 [len(self), 4] on
        the CPU, rows (start, length, offset, weight decay 0/1)."""
        if self._native_table is None:
            rows = [[start, length, offset, int(decays)] for start, length, offset, decays in
                    zip(self.starts, self.lengths, self.offsets, self.weight_decay)]
            self._native_table = torch.tensor(rows, dtype=torch.int64).reshape(-1, 4)
        return self._native_table

    def device_table(self, device: torch.device) -> tuple[torch.Tensor, int]:
        """(int64 table of `kernels._adamw_kernel`, [len(self) + 1, 5], on
        `device`; the number of programs of one launch)."""
        device = torch.device(device)
        if device not in self._device_tables:
            rows, first_block = [], 0
            for start, length, offset, decays in zip(self.starts, self.lengths, self.offsets, self.weight_decay):
                rows.append([start, length, offset, first_block, int(decays)])
                first_block += -(-(length + offset % 2) // _BLOCK_SIZE) if length else 0
            rows.append([self.extent, 0, 0, first_block, 0])
            self._device_tables[device] = (torch.tensor(rows, dtype=torch.int64, device=device), first_block)
        return self._device_tables[device]


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


def _check_keys(sr_keys: Sequence[int]) -> None:
    for key in sr_keys:
        if not 0 <= key <= rounding.MAX_KEY:
            raise ValueError(f"adamw_step: sr_key {key} must be in [0, 2^63)")


def sr_key_tensor(sr_keys: Union[Sequence[int], torch.Tensor], device: torch.device) -> torch.Tensor:
    """The SR keys as an int64 tensor on `device`; host ints travel through
    pinned memory on CUDA (an asynchronous copy: no host sync)."""
    if isinstance(sr_keys, torch.Tensor):
        return sr_keys.to(device=device, dtype=torch.int64)
    keys = torch.tensor(list(sr_keys), dtype=torch.int64, pin_memory=device.type == "cuda")
    return keys.to(device, non_blocking=True)


def adamw_shard_step(strategy: Union[str, PrecisionStrategy], param: torch.Tensor, grad: torch.Tensor,
                     exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, master: Optional[torch.Tensor] = None,
                     kahan: Optional[torch.Tensor] = None, segments: SegmentTable,
                     sr_keys: Union[Sequence[int], torch.Tensor], lr: float, beta1: float, beta2: float,
                     eps: float, weight_decay: float, step: int, grad_scale: Optional[torch.Tensor] = None,
                     backend: Optional[str] = None) -> None:
    """One AdamW step, in place, on every segment of `segments` in the 1-D
    shard tensors (same length, at least `segments.extent`; the dtypes of
    `strategy`; elements outside the segments are not touched).

    `sr_keys[k]`: the Philox key of segment k at this step (host ints, or an
    int64 tensor, best already on the device). `weight_decay` applies to the
    segments whose flag is set. `grad_scale`: None (gradients as they are)
    or a 0-d fp32 tensor on the tensors' device: the factor of every
    gradient (the clip coefficient); when it is NaN or +-Inf nothing is
    written, so a step with a non-finite grad norm is skipped bit-exactly.
    With the Triton backend this is one kernel launch and reads nothing on
    the host (no sync); the native backend is one C call; the torch backends
    run segment by segment. All but Triton read `grad_scale` and the keys on
    the host (free for CPU tensors).
    """
    if isinstance(strategy, str):
        strategy = get_strategy(strategy)
    _validate(strategy, dict(param=param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                             master=master, kahan=kahan))
    if param.dim() != 1 or param.numel() < segments.extent:
        raise ValueError(f"adamw_shard_step: the shard tensors must be 1-D with at least {segments.extent} "
                         f"elements (the segments' extent), got shape {tuple(param.shape)}")
    if len(sr_keys) != len(segments):
        raise ValueError(f"adamw_shard_step: {len(sr_keys)} sr_keys for {len(segments)} segments")
    if grad_scale is not None and (grad_scale.dtype != torch.float32 or grad_scale.numel() != 1
                                   or grad_scale.device != param.device):
        raise ValueError(f"adamw_shard_step: grad_scale must be one fp32 value on {param.device}, got "
                         f"{grad_scale.dtype} of shape {tuple(grad_scale.shape)} on {grad_scale.device}")
    if step < 1:
        raise ValueError(f"adamw_step: step must be >= 1, got {step}")
    modes = write_modes(strategy)
    tensors = (param, grad, exp_avg, exp_avg_sq, master, kahan)
    if resolve_backend(backend, param.device, segments.extent) == "triton":
        from megatron_sr.precision import kernels

        if not isinstance(sr_keys, torch.Tensor):
            _check_keys(sr_keys)
        table, total_blocks = segments.device_table(param.device)
        coefficients = adamw_coefficient_values(lr, beta1, beta2, eps, weight_decay, step)[:9]
        kernels.adamw_step(*tensors, coefficients, table, sr_key_tensor(sr_keys, param.device),
                           None if grad_scale is None else grad_scale.reshape(()), total_blocks,
                           param_write=modes[0], exp_avg_write=modes[1], exp_avg_sq_write=modes[2])
        return

    scale = 1.0 if grad_scale is None else float(grad_scale)
    if not math.isfinite(scale):
        return
    keys = sr_keys.tolist() if isinstance(sr_keys, torch.Tensor) else list(sr_keys)
    _check_keys(keys)
    with_decay = adamw_coefficients(lr, beta1, beta2, eps, weight_decay, step, scale)
    without_decay = adamw_coefficients(lr, beta1, beta2, eps, 0.0, step, scale)
    if (resolve_backend(backend, param.device, segments.extent) == "native"
            and native.supports(*modes, has_master=master is not None, grad_dtype=grad.dtype)):
        native.adamw_shard_step(*tensors, segments, keys, with_decay, without_decay, param_write=modes[0],
                                exp_avg_write=modes[1], exp_avg_sq_write=modes[2])
        return
    for start, length, offset, decays, key in zip(segments.starts, segments.lengths, segments.offsets,
                                                  segments.weight_decay, keys):
        if length:
            flat = [t[start:start + length] if t is not None else None for t in tensors]
            _run_segment(resolve_backend(backend, param.device, length), flat,
                         with_decay if decays else without_decay, key, offset, modes)


def _run_segment(chosen: str, flat, coefficients: torch.Tensor, sr_key: int,
                 offset: int, modes) -> None:
    """One segment on a CPU-side backend ("native", "compiled", "eager")."""
    if chosen == "native":
        if native.supports(*modes, has_master=flat[4] is not None, grad_dtype=flat[1].dtype):
            native.adamw_step(*flat, coefficients, sr_key, offset, param_write=modes[0],
                              exp_avg_write=modes[1], exp_avg_sq_write=modes[2])
            return
        chosen = torch_cpu_backend(flat[0].numel())
    device = flat[0].device
    coefficients = coefficients.to(device)
    round_keys = rounding.philox_key_tensor(sr_key, device=device)
    if chosen == "compiled":
        run_compiled(flat, coefficients, round_keys, offset, modes)
    else:
        run_eager(flat, coefficients, round_keys, offset, modes)


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
    if offset < 0:
        raise ValueError(f"adamw_step: offset must be >= 0, got {offset}")
    if step < 1:
        raise ValueError(f"adamw_step: step must be >= 1, got {step}")
    _check_keys([sr_key])
    flat = [t.view(-1) if t is not None else None for t in (param, grad, exp_avg, exp_avg_sq, master, kahan)]
    adamw_shard_step(strategy, *flat[:4], master=flat[4], kahan=flat[5],
                     segments=SegmentTable([0], [param.numel()], [offset], [True]), sr_keys=[sr_key], lr=lr,
                     beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step, backend=backend)
