"""`estimate_job`: one job's memory and communication per pipeline stage, and its
model FLOPs, from the parts in `parameters`, `activations` and `communication`."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_sr.config import JobConfig
from megatron_sr.estimate.activations import chunk_activation_bytes, in_flight_chunk_counts
from megatron_sr.estimate.communication import (data_parallel_overlap, data_parallel_sent,
                                                pipeline_sent, tensor_parallel_sent)
from megatron_sr.estimate.parameters import buffer_layout, own_buckets, startup_bytes, state_bytes
from megatron_sr.model.gpt_model import flops_per_token
from megatron_sr.model.parallel_layout import chunk_placements
from megatron_sr.model.parameter_specs import rank_parameters
from megatron_sr.optimizer.param_buffer import DEFAULT_BUCKET_SIZE
from megatron_sr.precision.strategies import PrecisionStrategy, get_strategy
from megatron_sr.precision.strategies import grad_dtype


@dataclass(frozen=True)
class StageEstimate:
    """Per rank of one pipeline stage: bytes held, and bytes sent per step."""

    pipeline_rank: int
    num_parameters: int  # elements on one rank (TP slice), tied copy included
    params: int
    grads: int
    master: int
    optimizer: int
    activations_per_microbatch: int  # all chunks of the rank, one micro-batch each
    activations_saved_per_microbatch: int  # of which kept by autograd
    microbatches_in_flight: list[int]  # per chunk, at the schedule's peak
    activations_peak: int
    sent_grad_reduce_scatter: float
    sent_param_all_gather: float
    sent_grad_all_reduce: float
    sent_tensor_parallel: float
    sent_pipeline: float
    init_temporary: int  # peak temporaries of drawing the initial weights
    setup_peak: int  # start-up: max(params + init temporaries, 2 x params + grads)
    grad_reduce_overlap: float  # fraction of DP grad bytes launched before backward ends
    param_gather_overlap: float  # fraction of DP param bytes not waited for at once

    @property
    def state(self) -> int:
        return self.params + self.grads + self.master + self.optimizer

    @property
    def total(self) -> int:
        return self.state + self.activations_peak

    @property
    def sent_total(self) -> float:
        return (self.sent_grad_reduce_scatter + self.sent_param_all_gather
                + self.sent_grad_all_reduce + self.sent_tensor_parallel + self.sent_pipeline)


@dataclass(frozen=True)
class JobEstimate:
    job: JobConfig
    strategy: PrecisionStrategy
    stages: list[StageEstimate]
    model_flops_per_step: float  # all ranks together

    @property
    def peak_stage(self) -> StageEstimate:
        """The stage whose ranks need the most memory."""
        return max(self.stages, key=lambda stage: stage.total)

    @property
    def num_parameters(self) -> int:
        """Parameters of the whole model, each counted once."""
        model, tp = self.job.model, self.job.parallel.tensor_model_parallel_size
        unique = {spec.name: spec.numel * (tp if spec.tensor_parallel else 1)
                  for stage in range(self.job.parallel.pipeline_model_parallel_size)
                  for spec in rank_parameters(model, self.job.parallel, stage)}
        return sum(unique.values())


def estimate_job(job: JobConfig, bucket_size: int = DEFAULT_BUCKET_SIZE,
                 device: str = "cuda") -> JobEstimate:
    """Per-stage memory and communication, and model FLOPs, of the job `job`.

    `job.model.vocab_size` must be the padded vocabulary (`JobConfig.with_vocab_size`).
    `bucket_size`: elements per grad-buffer bucket (`ParamAndGradBuffer`'s).
    `device`: where the job runs, "cuda" or "cpu" (activations differ in the dropout masks).
    """
    if device not in ("cuda", "cpu"):
        raise ValueError(f"estimate_job: device must be 'cuda' or 'cpu', got {device!r}")
    if job.model.vocab_size < 1:
        raise ValueError("estimate_job needs the vocabulary size: call "
                         "job.with_vocab_size(tokenizer vocabulary size) first")
    model, parallel = job.model, job.parallel
    strategy = get_strategy(job.optimizer.precision, job.optimizer.optimizer_state_dtype)
    grads = grad_dtype(job, strategy)
    dp, distributed = job.data_parallel_size, parallel.use_distributed_optimizer
    stages = []
    for pipeline_rank in range(parallel.pipeline_model_parallel_size):
        chunks = chunk_placements(model, parallel, pipeline_rank)
        specs = rank_parameters(model, parallel, pipeline_rank)
        numels = [spec.numel for spec in specs]
        held = state_bytes(numels, strategy, grads, dp, distributed, bucket_size,
                           own_buckets(specs))
        init_temporary, setup_peak = startup_bytes(numels, strategy, held, device)
        per_chunk = [chunk_activation_bytes(model, parallel, strategy,
                                            job.training.micro_batch_size, chunk, device)
                     for chunk in chunks]
        in_flight = in_flight_chunk_counts(parallel.pipeline_model_parallel_size,
                                           parallel.virtual_pipeline_model_parallel_size,
                                           pipeline_rank, job.num_microbatches,
                                           [a.total for a in per_chunk])
        layout = buffer_layout(model, specs, dp, bucket_size)
        stages.append(StageEstimate(
            pipeline_rank=pipeline_rank, num_parameters=sum(numels), **held,
            activations_per_microbatch=sum(a.total for a in per_chunk),
            activations_saved_per_microbatch=sum(a.saved for a in per_chunk),
            microbatches_in_flight=in_flight,
            activations_peak=sum(n * a.total for n, a in zip(in_flight, per_chunk)),
            **data_parallel_sent(layout, strategy, grads, dp, distributed),
            sent_tensor_parallel=tensor_parallel_sent(job, strategy, grads, chunks),
            sent_pipeline=pipeline_sent(job, strategy, grads, chunks),
            init_temporary=init_temporary, setup_peak=setup_peak,
            **data_parallel_overlap(job, layout)))
    tokens_per_step = job.training.global_batch_size * model.seq_length
    return JobEstimate(job=job, strategy=strategy, stages=stages,
                       model_flops_per_step=flops_per_token(model) * tokens_per_step)
