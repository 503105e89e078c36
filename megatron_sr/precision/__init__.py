"""megatron_sr.precision: everything that depends on the precision strategy.

- `names`: the strategies' names and the default (torch-free, for the tools).
- `strategies`: the table of storage dtypes and rounding per `--precision`.
- `rounding`: Philox4x32-10 bits and the stochastic / nearest fp32 -> bf16 casts (torch).
- `kernels`: the Triton SR cast and fused AdamW step (imported lazily: needs triton).
- `adamw`: `adamw_shard_step` and `adamw_step`, the entry points of the fused update;
  `backend` picks the backend, `adamw_torch` is the reference arithmetic,
  `adamw_compiled` its torch.compile form, `native` the C kernel.

The package itself imports nothing, so that `names` loads without torch;
import from the modules.
"""
