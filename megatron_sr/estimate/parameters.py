"""Parameters, their buffers and optimizer state per rank (exact, not approximate).

`rank_parameters` lists a rank's parameters as training holds them: the
chunks `build_model` builds on that pipeline rank, built on `meta` with the
job's TP size (`megatron_sr.model.parameter_specs`), so the global names,
elements per TP rank, TP slicing and registration order are the model's own.
The last stage holds a copy of a tied word embedding when PP > 1 (a single
stage with tied embeddings has no output weight of its own).

The buffers are `ParamAndGradBuffer`'s: one per rank over the parameters of
all its model chunks (chunk order, then registration order), stored in
reverse, cut into buckets of `bucket_size` elements (the tied word embedding
alone in its own) and padded by the shared `compute_buffer_layout`. The DP
collectives work in place on them: no bucket is ever copied. params = buffer
elements x param bytes, grads = buffer elements x grad bytes
(--grad-reduce-dtype or the strategy's); master and optimizer (m, v, Kahan) =
the rank's shard elements x their bytes, where the shard is each bucket / DP
with --use-distributed-optimizer and the whole bucket without. These are
exactly what the training job's memory report (`training.memory_report`,
i.e. `DistributedOptimizer.memory_bytes()`) says.

Start-up (`startup_bytes`): `build_model` allocates the rank's parameters
and draws them chunk by chunk on the device (`initialize_parameters`:
INIT_CHUNK_ELEMENTS elements at a time, INIT_BYTES_PER_ELEMENT of
temporaries each; no full weight), then `ParamAndGradBuffer` allocates the
param and grad buffers before moving the parameters in: peak = max(params +
init temporaries, 2 x params + grads), before any optimizer state or
activation exists.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_sr.config import ModelConfig
from megatron_sr.model.parallel_layout import INIT_BYTES_PER_ELEMENT, INIT_CHUNK_ELEMENTS
from megatron_sr.model.parameter_specs import ParameterSpec
from megatron_sr.optimizer.param_buffer import (DEFAULT_BUCKET_SIZE, BufferLayout,
                                                compute_buffer_layout)
from megatron_sr.precision.strategies import PrecisionStrategy


def own_buckets(specs: list[ParameterSpec]) -> list[bool]:
    """Which parameters get a bucket of their own: the tied word embedding's copies."""
    return [spec.shared_embedding for spec in specs]


def buffer_layout(model: ModelConfig, specs: list[ParameterSpec], data_parallel_size: int,
                  bucket_size: int = DEFAULT_BUCKET_SIZE) -> BufferLayout:
    """The `BufferLayout` `ParamAndGradBuffer` builds for a rank's parameters
    (`rank_parameters`, model order). The parameters carry all it needs (their
    tied-embedding mark included); `model`, the config they were built from,
    stays in the signature for its callers."""
    return compute_buffer_layout([spec.numel for spec in reversed(specs)], data_parallel_size,
                                 bucket_size, list(reversed(own_buckets(specs))))


def state_bytes(numels: list[int], strategy: PrecisionStrategy, grad_buffer_dtype: torch.dtype,
                data_parallel_size: int, distributed: bool,
                bucket_size: int = DEFAULT_BUCKET_SIZE,
                own_bucket: Optional[list[bool]] = None) -> dict[str, int]:
    """{"params", "grads", "master", "optimizer"} bytes a rank allocates for parameters of
    `numels` (model order; `own_bucket` as `own_buckets`): what
    `DistributedOptimizer.memory_bytes()` reports."""
    layout = compute_buffer_layout(list(reversed(numels)), data_parallel_size, bucket_size,
                                   None if own_bucket is None else list(reversed(own_bucket)))
    shard = sum((end - start) // (data_parallel_size if distributed else 1)
                for start, end in layout.bucket_ranges)
    optimizer_dtypes = [strategy.exp_avg_dtype, strategy.exp_avg_sq_dtype, strategy.kahan_dtype]
    return {"params": layout.numel * strategy.param_dtype.itemsize,
            "grads": layout.numel * grad_buffer_dtype.itemsize,
            "master": shard * (strategy.master_dtype.itemsize if strategy.master_dtype else 0),
            "optimizer": shard * sum(d.itemsize for d in optimizer_dtypes if d is not None)}


def startup_bytes(numels: list[int], strategy: PrecisionStrategy, held: dict[str, int],
                  device: str) -> tuple[int, int]:
    """(init temporaries, start-up peak) in bytes on a rank with parameters of
    `numels` and the buffers `held` (`state_bytes`), on `device` ("cuda" or "cpu")."""
    init_temporary = INIT_BYTES_PER_ELEMENT * min(max(numels),
                                                  INIT_CHUNK_ELEMENTS.get(device, 1 << 20))
    model_params = sum(numels) * strategy.param_dtype.itemsize
    return init_temporary, max(model_params + init_temporary,
                               model_params + held["params"] + held["grads"])
