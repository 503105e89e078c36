"""Bytes each rank sends per step, and how much of the data-parallel traffic
can overlap with compute.

Ring algorithms: an all-reduce of N bytes over g ranks sends 2(g-1)/g N;
a reduce-scatter or an all-gather (g-1)/g N.
- Data parallel: reduce-scatter of the grad buffer and all-gather of the
  param buffer with the distributed optimizer, else an all-reduce of the
  grad buffer.
- Tensor parallel, per micro-batch and layer, of [s, b, h] in the matmul
  dtype: 4 all-reduces (forward: proj's and fc2's outputs; backward: qkv's
  and fc1's input gradients), 5 with full recomputation (whose recomputed
  forward stops at the last saved tensor, fc2's input: proj's all-reduce
  once more); under --sequence-parallel each all-reduce is an all-gather
  plus a reduce-scatter (the same bytes) and backward all-gathers qkv's and
  fc1's inputs again (the linears keep the sequence shard): 6 all-gathers
  and 4 reduce-scatters, 8 and 5 with full recomputation. Also the embedding
  (forward all-reduce, + the backward all-gather with SP), the output layer
  (backward all-reduce, or with SP its input all-gathered in forward and
  again in backward and its input gradient reduce-scattered) and the cross
  entropy (3 fp32 [s, b] all-reduces); per step the grads of the
  sequence-parallel parameters (norms, row-parallel biases).
  tests/test_collective_census.py counts these collectives in a whole step
  at 1,024 ranks.
- Pipeline: each chunk sends its output forward (except the model's last)
  and its input gradient backward (except the model's first), r Sbh per
  micro-batch; per step the tied embedding's gradient all-reduce between the
  first and the last stage.

Overlap (`data_parallel_overlap`: fractions of the DP bytes). With
--overlap-grad-reduce each bucket's reduce-scatter starts from the backward
hook that completes it, during the step's last micro-batch's backward; only
the bucket completed last (the last bucket: the first layers, or the
embedding's own bucket on the first stage) starts when backward ends. With
--overlap-param-gather the all-gathers are issued after the step, first
layers first, and each bucket is waited for by the forward that needs it;
only the last bucket (needed by the first forward module) is waited for at
once. Whether the overlappable bytes hide entirely depends on link and
compute speed (docs/SCALING.md works an example).
"""
from __future__ import annotations

import torch

from megatron_sr.config import JobConfig
from megatron_sr.estimate.activations import matmul_bytes
from megatron_sr.model.parallel_layout import ChunkPlacement
from megatron_sr.model.parameter_specs import chunk_parameters
from megatron_sr.optimizer.param_buffer import BufferLayout
from megatron_sr.precision.strategies import PrecisionStrategy


def ring_all_reduce(nbytes: float, group: int) -> float:
    """Bytes each of `group` ranks sends in a ring all-reduce of `nbytes`."""
    return 2 * (group - 1) / group * nbytes


def ring_gather_or_scatter(nbytes: float, group: int) -> float:
    """Bytes each of `group` ranks sends in a ring all-gather or reduce-scatter of `nbytes`."""
    return (group - 1) / group * nbytes


def data_parallel_sent(layout: BufferLayout, strategy: PrecisionStrategy,
                       grad_buffer_dtype: torch.dtype, data_parallel_size: int,
                       distributed: bool) -> dict[str, float]:
    """{"sent_grad_reduce_scatter", "sent_param_all_gather", "sent_grad_all_reduce"}:
    bytes a rank sends per step over its DP group for the buffers of `layout`."""
    dp = data_parallel_size
    grad_bytes = layout.numel * grad_buffer_dtype.itemsize
    param_bytes = layout.numel * strategy.param_dtype.itemsize
    return {"sent_grad_reduce_scatter": ring_gather_or_scatter(grad_bytes, dp) if distributed
            else 0.0,
            "sent_param_all_gather": ring_gather_or_scatter(param_bytes, dp) if distributed
            else 0.0,
            "sent_grad_all_reduce": 0.0 if distributed else ring_all_reduce(grad_bytes, dp)}


def data_parallel_overlap(job: JobConfig, layout: BufferLayout) -> dict[str, float]:
    """{"grad_reduce_overlap", "param_gather_overlap"}: the fractions of the DP
    bytes that --overlap-grad-reduce and --overlap-param-gather can hide (all
    buckets but the last)."""
    parallel, dp = job.parallel, job.data_parallel_size
    last_start, last_end = layout.bucket_ranges[-1]
    overlappable = 1 - (last_end - last_start) / layout.numel if dp > 1 else 0.0
    return {"grad_reduce_overlap": overlappable if parallel.overlap_grad_reduce else 0.0,
            "param_gather_overlap": (overlappable if parallel.overlap_param_gather
                                     and parallel.use_distributed_optimizer else 0.0)}


def tensor_parallel_sent(job: JobConfig, strategy: PrecisionStrategy,
                         grad_buffer_dtype: torch.dtype, chunks: list[ChunkPlacement]) -> float:
    """Bytes a rank holding `chunks` sends per step over its TP group."""
    model, parallel = job.model, job.parallel
    tp = parallel.tensor_model_parallel_size
    if tp == 1:
        return 0.0
    s, b, h = model.seq_length, job.training.micro_batch_size, model.hidden_size
    activation = s * b * h * matmul_bytes(strategy)
    residual_activation = s * b * h * strategy.param_dtype.itemsize
    full = model.recompute_granularity == "full"
    if parallel.sequence_parallel:
        per_layer = (13 if full else 10) * ring_gather_or_scatter(activation, tp)
    else:
        per_layer = (5 if full else 4) * ring_all_reduce(activation, tp)
    per_microbatch = 0.0
    for chunk in chunks:
        per_microbatch += chunk.num_layers * per_layer
        if chunk.pre_process:
            per_microbatch += ring_all_reduce(residual_activation, tp)
            if parallel.sequence_parallel:
                per_microbatch += ring_gather_or_scatter(residual_activation, tp)
        if chunk.post_process:
            per_microbatch += (3 * ring_gather_or_scatter(activation, tp)
                               if parallel.sequence_parallel else ring_all_reduce(activation, tp))
            per_microbatch += ring_all_reduce(3 * 4 * s * b, tp)  # cross entropy, fp32
    per_step = 0.0
    if parallel.sequence_parallel:
        sequence_parallel_numel = sum(spec.numel for chunk in chunks
                                      for spec in chunk_parameters(model, parallel, chunk)
                                      if spec.sequence_parallel)
        per_step = ring_all_reduce(sequence_parallel_numel * grad_buffer_dtype.itemsize, tp)
    return job.num_microbatches * per_microbatch + per_step


def pipeline_sent(job: JobConfig, strategy: PrecisionStrategy, grad_buffer_dtype: torch.dtype,
                  chunks: list[ChunkPlacement]) -> float:
    """Bytes a rank holding `chunks` sends per step to other pipeline stages."""
    model, parallel = job.model, job.parallel
    if parallel.pipeline_model_parallel_size == 1:
        return 0.0
    tp = parallel.tensor_model_parallel_size
    local_s = model.seq_length // tp if parallel.sequence_parallel else model.seq_length
    message = local_s * job.training.micro_batch_size * model.hidden_size \
        * strategy.param_dtype.itemsize
    sends = sum((not chunk.post_process) + (not chunk.pre_process) for chunk in chunks)
    sent = job.num_microbatches * sends * message
    tied_copy = sum(spec.numel for chunk in chunks
                    for spec in chunk_parameters(model, parallel, chunk) if spec.shared_embedding)
    if tied_copy:
        sent += ring_all_reduce(tied_copy * grad_buffer_dtype.itemsize, 2)
    return sent
