"""megatron_sr.precision: everything that depends on the precision strategy.

- `strategies`: the table of storage dtypes and rounding per `--precision`.
- `rounding`: Philox4x32-10 bits and the stochastic / nearest fp32 -> bf16 casts (torch).
- `kernels`: the Triton SR cast and fused AdamW step (imported lazily: needs triton).
- `adamw`: `adamw_shard_step` and `adamw_step`, the entry points of the fused update;
  `backend` picks the backend, `adamw_torch` is the reference arithmetic,
  `adamw_compiled` its torch.compile form, `native` the C kernel.
"""
from megatron_sr.precision.adamw import adamw_step
from megatron_sr.precision.rounding import round_nearest, stochastic_round
from megatron_sr.precision.strategies import STRATEGIES, PrecisionStrategy, get_strategy

__all__ = ["STRATEGIES", "PrecisionStrategy", "adamw_step", "get_strategy", "round_nearest", "stochastic_round"]
