"""The precision strategies of `--precision`, as one table of data.

Every part of megatron_sr that depends on the precision strategy (the model
builder, the gradient buffers, the optimizer, checkpointing) asks this table
instead of branching on strategy names:

    strategy = get_strategy(config.precision, config.optimizer_state_dtype)
    grad_buffer = torch.zeros(n, dtype=strategy.grad_dtype)

A `PrecisionStrategy` says which torch dtype each tensor of the AdamW update
is stored in, and how a value computed in fp32 is rounded when it is written
back to a bf16 tensor: "nearest" (round to nearest even), "stochastic" (SR,
see `megatron_sr.precision.rounding`) or, for the parameter only, "kahan"
(round to nearest plus a bf16 compensation buffer holding what was lost).
Writes to fp32 tensors are exact and need no rounding mode.

`--optimizer-state-dtype {bf16,fp32}` changes the dtype of Adam's m and v for
the pure-bf16 strategies (an ablation); the other strategies already keep
them in fp32 and reject the flag.

The gradient buffer's two options act on a row too (`with_grad_buffer`):
`--grad-reduce-dtype {bf16,fp32}` replaces `grad_dtype`, and
`--grad-accumulation-rounding {nearest,stochastic}` sets `grad_rounding`, how
each micro-batch's gradient is rounded when it is added into a bf16 buffer
(`megatron_sr.precision.grad_accumulation`); every row rounds to nearest.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

# DEFAULT_STRATEGY is read from here by the flags (`--precision`'s default).
from megatron_sr.precision.names import DEFAULT_STRATEGY  # noqa: F401

_STATE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GRAD_ROUNDINGS = ("nearest", "stochastic")


@dataclass(frozen=True)
class PrecisionStrategy:
    """Storage dtypes and rounding of one precision strategy.

    `master_dtype` / `kahan_dtype` are None when the strategy keeps no fp32
    master copy / no compensation buffer. `param_rounding` applies to the
    write of the model parameter (for bf16-mixed: the bf16 copy of the fp32
    master), `state_rounding` to the writes of m and v when they are bf16.
    `autocast` is True for `amp`, whose fp32 model runs under
    `torch.autocast(dtype=torch.bfloat16)`. `grad_rounding` ("nearest" or
    "stochastic") applies to the adds of micro-batch gradients into the
    gradient buffer when `grad_dtype` is bf16 ("stochastic" needs it).
    """

    name: str
    param_dtype: torch.dtype
    grad_dtype: torch.dtype
    master_dtype: Optional[torch.dtype]
    exp_avg_dtype: torch.dtype
    exp_avg_sq_dtype: torch.dtype
    kahan_dtype: Optional[torch.dtype]
    param_rounding: str
    state_rounding: str
    autocast: bool = False
    grad_rounding: str = "nearest"

    @property
    def bytes_per_param(self) -> int:
        """Bytes of parameter, gradient and optimizer state per parameter,
        without any sharding by the distributed optimizer."""
        dtypes = [self.param_dtype, self.grad_dtype, self.master_dtype,
                  self.exp_avg_dtype, self.exp_avg_sq_dtype, self.kahan_dtype]
        return sum(d.itemsize for d in dtypes if d is not None)

    @property
    def uses_random_bits(self) -> bool:
        """True when some write of the AdamW step draws Philox bits."""
        stochastic_param = self.param_rounding == "stochastic" and self.param_dtype == torch.bfloat16
        stochastic_state = self.state_rounding == "stochastic" and torch.bfloat16 in (
            self.exp_avg_dtype, self.exp_avg_sq_dtype)
        return stochastic_param or stochastic_state

    @property
    def is_pure_bf16(self) -> bool:
        """bf16 parameters and gradients, no fp32 master copy."""
        return self.param_dtype == torch.bfloat16 and self.master_dtype is None


_F32, _BF16 = torch.float32, torch.bfloat16

STRATEGIES = {
    s.name: s
    for s in (
        PrecisionStrategy("fp32", _F32, _F32, None, _F32, _F32, None, "nearest", "nearest"),
        PrecisionStrategy("amp", _F32, _F32, None, _F32, _F32, None, "nearest", "nearest", autocast=True),
        PrecisionStrategy("bf16-mixed", _BF16, _F32, _F32, _F32, _F32, None, "nearest", "nearest"),
        PrecisionStrategy("bf16", _BF16, _BF16, None, _BF16, _BF16, None, "nearest", "nearest"),
        PrecisionStrategy("bf16-sr", _BF16, _BF16, None, _BF16, _BF16, None, "stochastic", "stochastic"),
        PrecisionStrategy("bf16-kahan", _BF16, _BF16, None, _BF16, _BF16, _BF16, "kahan", "stochastic"),
    )
}


def get_strategy(name: str, optimizer_state_dtype: Optional[str] = None) -> PrecisionStrategy:
    """The strategy called `name` (a `--precision` value), with m and v
    stored in `optimizer_state_dtype` ("bf16" or "fp32"; None keeps the
    strategy's default). Raises ValueError naming the flag on a bad value."""
    if name not in STRATEGIES:
        raise ValueError(f"--precision {name!r}: unknown strategy, choose one of {sorted(STRATEGIES)}")
    strategy = STRATEGIES[name]
    if optimizer_state_dtype is None:
        return strategy
    if optimizer_state_dtype not in _STATE_DTYPES:
        raise ValueError(f"--optimizer-state-dtype {optimizer_state_dtype!r}: choose 'bf16' or 'fp32'")
    if not strategy.is_pure_bf16:
        raise ValueError(
            f"--optimizer-state-dtype only applies to the pure-bf16 strategies (bf16, bf16-sr, "
            f"bf16-kahan); --precision {name} keeps its optimizer state in fp32")
    state_dtype = _STATE_DTYPES[optimizer_state_dtype]
    return dataclasses.replace(strategy, exp_avg_dtype=state_dtype, exp_avg_sq_dtype=state_dtype)


def with_grad_buffer(strategy: PrecisionStrategy, grad_reduce_dtype: Optional[str] = None,
                     grad_accumulation_rounding: Optional[str] = None) -> PrecisionStrategy:
    """`strategy` with the gradient buffer of `--grad-reduce-dtype`
    (`grad_reduce_dtype` "bf16"/"fp32"; None keeps the row's grad dtype) and
    `--grad-accumulation-rounding` (None keeps "nearest"). Raises ValueError
    naming the flag when stochastic accumulation meets an fp32 buffer, whose
    adds are exact enough to need no rounding mode."""
    if grad_reduce_dtype is not None:
        if grad_reduce_dtype not in _STATE_DTYPES:
            raise ValueError(f"--grad-reduce-dtype {grad_reduce_dtype!r}: choose 'bf16' or 'fp32'")
        strategy = dataclasses.replace(strategy, grad_dtype=_STATE_DTYPES[grad_reduce_dtype])
    if grad_accumulation_rounding is None:
        return strategy
    if grad_accumulation_rounding not in GRAD_ROUNDINGS:
        raise ValueError(f"--grad-accumulation-rounding {grad_accumulation_rounding!r}: choose one of "
                         f"{list(GRAD_ROUNDINGS)}")
    if grad_accumulation_rounding == "stochastic" and strategy.grad_dtype != torch.bfloat16:
        cause = ("--grad-reduce-dtype fp32" if grad_reduce_dtype == "fp32"
                 else f"--precision {strategy.name}")
        raise ValueError(f"--grad-accumulation-rounding stochastic rounds adds into a bf16 gradient buffer, "
                         f"but {cause} accumulates in fp32: drop the flag, or use a pure-bf16 strategy "
                         f"with the bf16 buffer")
    return dataclasses.replace(strategy, grad_rounding=grad_accumulation_rounding)


def grad_dtype(job, strategy: PrecisionStrategy) -> torch.dtype:
    """The grad buffer's dtype of the run `job` (a JobConfig): its
    --grad-reduce-dtype, else `strategy`'s."""
    if job.optimizer.grad_reduce_dtype is None:
        return strategy.grad_dtype
    return _STATE_DTYPES[job.optimizer.grad_reduce_dtype]
