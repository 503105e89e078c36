"""Memory, communication and FLOPs of a training job, per rank, before running it.

`estimate_job(job)` takes the validated `JobConfig` that `pretrain_gpt.py`
trains (from `megatron_sr.config`; its vocabulary already padded by
`JobConfig.with_vocab_size`) and returns a `JobEstimate`: for every pipeline
stage (all TP and DP ranks of a stage hold the same sizes) the bytes of
parameters, gradients, master weights, optimizer state and activations, the
bytes each rank sends per step, and the model FLOPs per step.
`tools/estimate.py` is its command line; docs/SCALING.md its tables.

Each module's docstring gives its formulas:
  parameters     the rank's parameters (read from the model built on `meta`),
                 its param/grad buffers, master weights and optimizer state,
                 start-up peak (exact)
  activations    what a micro-batch leaves for backward, micro-batches in flight
  communication  bytes sent per step over DP, TP and PP, DP overlap
  job            `estimate_job`, `StageEstimate`, `JobEstimate`
  report         `format_estimate`, `format_comparison`
  command_line   from a `pretrain_gpt.py` command line to the report
"""
from megatron_sr.estimate.activations import (
    ActivationBytes,
    chunk_activation_bytes,
    in_flight_chunk_counts,
    layer_saved_bytes,
)
from megatron_sr.estimate.command_line import (
    GPT2_VOCAB_SIZE,
    add_estimate_args,
    estimate_from_argv,
    jobs_from_args,
    report_from_argv,
)
from megatron_sr.estimate.job import JobEstimate, StageEstimate, estimate_job
from megatron_sr.estimate.parameters import buffer_layout, own_buckets, startup_bytes, state_bytes
from megatron_sr.estimate.report import DEVICE_MEMORY_GIB, GIB, format_comparison, format_estimate
from megatron_sr.model.parallel_layout import ChunkPlacement, chunk_placements
from megatron_sr.model.parameter_specs import ParameterSpec, chunk_parameters, rank_parameters
