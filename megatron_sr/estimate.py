"""Memory, communication and FLOPs of a training job, per rank, before running it.

`estimate_job(job)` takes the validated `JobConfig` that `pretrain_gpt.py`
trains (from `megatron_sr.arguments`; its vocabulary already padded by
`JobConfig.with_vocab_size`) and returns a `JobEstimate`: for every pipeline
stage (all TP and DP ranks of a stage hold the same sizes) the bytes of
parameters, gradients, master weights, optimizer state and activations, the
bytes each rank sends per step, and the model FLOPs per step.
`tools/estimate.py` is its command line; docs/SCALING.md its tables.

Parameters (exact, not approximate). `rank_parameters` lists this
rank's parameters by global name in the model's registration order, from an
analytic count of the GPT of `megatron_sr.model` (t = TP size, h hidden,
f ffn, V padded vocabulary, P max positions):
  embedding (first stage):  word V/t x h, learned positions P x h (replicated)
  per layer:  2 norms (h, + h bias for LayerNorm; replicated), qkv q'/t x h
              (+ q'/t bias) with q' = (heads + 2 query groups) x head dim, proj
              h x heads x head dim / t (+ h bias, replicated), --qk-layernorm's
              two norms of head dim (replicated), fc1 f'/t x h
              (+ f'/t bias) with f' = 2f for SwiGLU else f, fc2 h x f/t (+ h bias)
  final norm and output layer (last stage): output V/t x h, which is a tied
              copy of the word embedding when PP > 1 (no own weight on a
              single stage with tied embeddings).
The buffers are `ParamAndGradBuffer`'s: one per rank over the parameters of
all its model chunks (chunk order, then registration order), stored in
reverse, cut into buckets of `bucket_size` elements (the tied word embedding
alone in its own) and padded by the shared `compute_buffer_layout`. The
DP collectives work in place on them: no bucket is ever copied. params = buffer elements x param bytes, grads =
buffer elements x grad bytes (--grad-reduce-dtype or the strategy's); master
and optimizer (m, v, Kahan) = the rank's shard elements x their bytes, where
the shard is each bucket / DP with --use-distributed-optimizer and the whole
bucket without. These are exactly what the training job's memory report
(`training.memory_report`, i.e. `DistributedOptimizer.memory_bytes()`) says.

Activations (model of what autograd keeps for backward in this code, bytes
per micro-batch, per layer; s sequence, b micro-batch, a heads, S = s/t
under --sequence-parallel else s, m the bytes of a matmul input: 2 (bf16,
also under amp's autocast), 4 for the fp32 strategy; r the params dtype's
bytes (the residual stream: 4 for fp32 and amp); d = 1 if --hidden-dropout > 0
else 0; k the bytes of a dropout mask element: 1 on CUDA (torch's fused
kernel keeps a bool mask), m elsewhere (the CPU keeps it in the activation dtype)):
  norms (x2)       the input in the residual dtype r Sbh + fp32 statistics
                   (LayerNorm: mean, rstd 8Sb; RMSNorm: rstd 4Sb)
  attention        qkv input m Sbh (under --sequence-parallel the shard: the
                   column-parallel linear all-gathers it again in backward),
                   qkv output m sbq'/t (q, k, v saved by the
                   attention kernel; q' = (heads + 2 groups) x head dim, 3h without
                   GQA; + m sb(heads + groups) x head dim/t for RoPE's rotated q, k),
                   attention output m sb(heads x head dim)/t (the kernel writes it in q's layout, so
                   it is also proj's input) + log-sum-exp 4 a/t sb
  MLP              fc1 input m Sbh (the shard, as qkv's); GELU: fc1 output + activation 2m sbf/t;
                   SwiGLU: fc1 output 2m sbf/t, silu(gate) and product 2m sbf/t
  dropout masks    2dk Sbh (the two residual dropouts)
  --recompute-granularity selective drops the log-sum-exp (the core attention
  is recomputed from q, k, v, kept as the checkpoint's inputs); full keeps
  only each layer's input, r Sbh.
Each chunk with RoPE adds its fp32 cos and sin tables, 8 s rotary_dim bytes
(shared by its layers). The first stage adds token ids and the embedding's
dropout mask, the last the final norm, the output layer's input m Sbh and
the fp32 softmax of the cross entropy 4 sbV/t (the cross entropy's only fp32
logits-sized tensor). tests/test_scale_simulation.py measures these figures
at full size (7B and 70B-class layers, one rank of 64 and 512) and finds
them exact. Attention is the memory-efficient kernel (no s^2
matrix; what a GPU runs, and the CPU with --attention-dropout 0). The
pipeline schedule also holds each micro-batch's received input and its output
(r Sbh each) until its backward. Not modelled: transient working memory of
forward and backward (e.g. the logits before the cross entropy), allocator
fragmentation, CUDA context and communication buffers, autocast's bf16 weight
copies under amp.

In flight: the schedule's peak of micro-batches whose forward ran but whose
backward did not, simulated per stage: 1 without pipelining, PP - p on stage
p under 1F1B, and under interleaving the (chunk, micro-batch) pairs of the
warm-up plus one (`megatron_sr.pipeline_parallel.schedules`).

Start-up (`setup_peak`): `build_model` allocates the rank's parameters and
draws them chunk by chunk on the device (`initialize_parameters`:
INIT_CHUNK_ELEMENTS elements at a time, INIT_BYTES_PER_ELEMENT of
temporaries each; no full weight), then `ParamAndGradBuffer` allocates the
param and grad buffers before moving the parameters in: peak = max(params +
init temporaries, 2 x params + grads), before any optimizer state or
activation exists.

Overlap (`grad_reduce_overlap`, `param_gather_overlap`: fractions of the DP
bytes). With --overlap-grad-reduce each bucket's reduce-scatter starts from
the backward hook that completes it, during the step's last micro-batch's
backward; only the bucket completed last (the last bucket: the first layers,
or the embedding's own bucket on the first stage) starts when backward ends.
With --overlap-param-gather the all-gathers are issued after the step, first
layers first, and each bucket is waited for by the forward that needs it;
only the last bucket (needed by the first forward module) is waited for at
once. Whether the overlappable bytes hide entirely depends on link and
compute speed (docs/SCALING.md works an example).

Communication: bytes each rank sends per step, ring algorithms (all-reduce
of N bytes over g ranks sends 2(g-1)/g N; reduce-scatter and all-gather
(g-1)/g N). Data parallel: reduce-scatter of the grad buffer and all-gather
of the param buffer with the distributed optimizer, else an all-reduce of the
grad buffer. Tensor parallel, per micro-batch and layer: 4 all-reduces of
[s, b, h] in the matmul dtype (forward and backward of attention and MLP;
under --sequence-parallel an all-gather plus a reduce-scatter each, the same
bytes), 6 with full recomputation; the embedding (forward all-reduce, + the
backward all-gather with SP), the output layer (backward all-reduce, or
all-gather + reduce-scatter with SP) and the cross entropy (3 fp32 [s, b]
all-reduces); per step the sequence-parallel parameters' grads. Pipeline:
each chunk sends its output forward (except the model's last) and its input
gradient backward (except the model's first), r Sbh per micro-batch; per
step the tied embedding's gradient all-reduce between first and last stage.
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_sr.config import JobConfig, build_parser, job_config_from_args
from megatron_sr.config import ModelConfig, ParallelConfig
from megatron_sr.data.tokenizers import build_tokenizer
from megatron_sr.model.gpt_model import WORD_EMBEDDING_NAME, flops_per_token
from megatron_sr.model.parallel_layout import (INIT_BYTES_PER_ELEMENT, INIT_CHUNK_ELEMENTS,
                                               chunk_layers)
from megatron_sr.optimizer.param_buffer import DEFAULT_BUCKET_SIZE, compute_buffer_layout
from megatron_sr.precision.strategies import STRATEGIES, PrecisionStrategy, get_strategy
from megatron_sr.training import grad_dtype

# ----- parameters ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ParameterEntry:
    """One parameter on one rank: its global name, its elements on this rank, and
    whether it is a TP slice (False: replicated over the TP group)."""

    name: str
    numel: int
    tensor_parallel: bool


def _norm_entries(config: ModelConfig, prefix: str, size: Optional[int] = None
                  ) -> list[ParameterEntry]:
    h = config.hidden_size if size is None else size
    entries = [ParameterEntry(f"{prefix}.weight", h, False)]
    if config.normalization == "LayerNorm":
        entries.append(ParameterEntry(f"{prefix}.bias", h, False))
    return entries


def _layer_entries(config: ModelConfig, tp: int, layer: int) -> list[ParameterEntry]:
    h, f, bias = config.hidden_size, config.ffn_hidden_size, config.add_bias_linear
    fc1_out = (2 * f if config.activation == "swiglu" else f) // tp
    attention, mlp = f"decoder.layers.{layer}.self_attention", f"decoder.layers.{layer}.mlp"
    entries = _norm_entries(config, f"decoder.layers.{layer}.input_layernorm")
    qkv, proj_in = config.qkv_size // tp, config.query_projection_size // tp
    entries.append(ParameterEntry(f"{attention}.linear_qkv.weight", qkv * h, True))
    if bias:
        entries.append(ParameterEntry(f"{attention}.linear_qkv.bias", qkv, True))
    entries.append(ParameterEntry(f"{attention}.linear_proj.weight", h * proj_in, True))
    if bias:
        entries.append(ParameterEntry(f"{attention}.linear_proj.bias", h, False))
    if config.qk_layernorm:
        for which in ("q_layernorm", "k_layernorm"):
            entries += _norm_entries(config, f"{attention}.{which}", config.head_dim)
    entries += _norm_entries(config, f"decoder.layers.{layer}.pre_mlp_layernorm")
    entries.append(ParameterEntry(f"{mlp}.linear_fc1.weight", fc1_out * h, True))
    if bias:
        entries.append(ParameterEntry(f"{mlp}.linear_fc1.bias", fc1_out, True))
    entries.append(ParameterEntry(f"{mlp}.linear_fc2.weight", h * (f // tp), True))
    if bias:
        entries.append(ParameterEntry(f"{mlp}.linear_fc2.bias", h, False))
    return entries


@dataclass(frozen=True)
class ChunkPlacement:
    """Model chunk `virtual_rank` of pipeline rank `pipeline_rank`: which layers it holds
    and whether it holds the embedding (pre_process) or the output layer (post_process)."""

    pipeline_rank: int
    virtual_rank: int
    layer_offset: int
    num_layers: int
    pre_process: bool
    post_process: bool


def chunk_placements(model: ModelConfig, parallel: ParallelConfig, pipeline_rank: int
                     ) -> list[ChunkPlacement]:
    """The chunks `build_model` builds on `pipeline_rank` (Megatron's interleaving:
    chunk v of rank p holds model chunk v * PP + p)."""
    pp = parallel.pipeline_model_parallel_size
    layers = chunk_layers(model.num_layers, pp, parallel.virtual_pipeline_model_parallel_size,
                          pipeline_rank)
    return [ChunkPlacement(pipeline_rank, v, chunk.start, len(chunk),
                           pre_process=v == 0 and pipeline_rank == 0,
                           post_process=v == len(layers) - 1 and pipeline_rank == pp - 1)
            for v, chunk in enumerate(layers)]


def chunk_parameters(model: ModelConfig, parallel: ParallelConfig, chunk: ChunkPlacement
                     ) -> list[ParameterEntry]:
    """A chunk's parameters on one TP rank, in registration order."""
    tp = parallel.tensor_model_parallel_size
    h, vocab_per_rank = model.hidden_size, model.vocab_size // tp
    tied = not model.untie_embeddings_and_output_weights
    entries = []
    if chunk.pre_process:
        entries.append(ParameterEntry(WORD_EMBEDDING_NAME, vocab_per_rank * h, True))
        if model.position_embedding_type == "learned_absolute":
            entries.append(ParameterEntry("embedding.position_embeddings.weight",
                                          model.max_position_embeddings * h, False))
    for layer in range(chunk.layer_offset, chunk.layer_offset + chunk.num_layers):
        entries += _layer_entries(model, tp, layer)
    if chunk.post_process:
        entries += _norm_entries(model, "decoder.final_layernorm")
        if not (tied and chunk.pre_process):
            entries.append(ParameterEntry(WORD_EMBEDDING_NAME if tied else "output_layer.weight",
                                          vocab_per_rank * h, True))
    return entries


def own_buckets(model: ModelConfig, entries: list[ParameterEntry]) -> list[bool]:
    """Which entries get a bucket of their own: the tied word embedding's copies."""
    tied = not model.untie_embeddings_and_output_weights
    return [tied and entry.name == WORD_EMBEDDING_NAME for entry in entries]


def buffer_layout(model: ModelConfig, entries: list[ParameterEntry], data_parallel_size: int,
                  bucket_size: int = DEFAULT_BUCKET_SIZE):
    """The `BufferLayout` `ParamAndGradBuffer` builds for a rank's parameters (model order)."""
    return compute_buffer_layout([e.numel for e in reversed(entries)], data_parallel_size,
                                 bucket_size, list(reversed(own_buckets(model, entries))))


def rank_parameters(model: ModelConfig, parallel: ParallelConfig, pipeline_rank: int
                    ) -> list[ParameterEntry]:
    """Every parameter a rank of `pipeline_rank` holds, all its chunks in order: the
    order in which `ParamAndGradBuffer` receives them."""
    return [entry for chunk in chunk_placements(model, parallel, pipeline_rank)
            for entry in chunk_parameters(model, parallel, chunk)]


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


# ----- activations ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ActivationBytes:
    """One micro-batch through one chunk: `saved` is what autograd keeps for backward,
    `pipeline` what the schedule holds besides (received input, output)."""

    saved: int
    pipeline: int

    @property
    def total(self) -> int:
        return self.saved + self.pipeline


def _matmul_bytes(strategy: PrecisionStrategy) -> int:
    return 2 if strategy.autocast else strategy.param_dtype.itemsize


def _norm_saved_bytes(model: ModelConfig, strategy: PrecisionStrategy, tokens: int) -> int:
    """A norm keeps its input (the residual stream's dtype) and fp32 row statistics."""
    statistics = 4 if model.normalization == "RMSNorm" else 8
    return strategy.param_dtype.itemsize * tokens * model.hidden_size + statistics * tokens


def _dropout_mask_bytes(strategy: PrecisionStrategy, device: str) -> int:
    return 1 if device == "cuda" else _matmul_bytes(strategy)


def layer_saved_bytes(model: ModelConfig, parallel: ParallelConfig, strategy: PrecisionStrategy,
                      micro_batch_size: int, device: str = "cuda") -> int:
    """Bytes one transformer layer keeps for backward per micro-batch (module docstring)."""
    tp = parallel.tensor_model_parallel_size
    s, b, h, f = model.seq_length, micro_batch_size, model.hidden_size, model.ffn_hidden_size
    tokens, local_tokens = s * b, (s // tp if parallel.sequence_parallel else s) * b
    m, residual = _matmul_bytes(strategy), strategy.param_dtype.itemsize
    if model.recompute_granularity == "full":
        return residual * local_tokens * h
    # q, k, v (heads + 2 groups heads of head_dim); RoPE keeps its rotated q and k too.
    query, key = model.query_projection_size, model.num_query_groups * model.head_dim
    rotated = query + key if model.position_embedding_type == "rope" else 0
    qkv_output = m * tokens * (model.qkv_size + rotated) // tp
    log_sum_exp = 4 * tokens * model.num_attention_heads // tp
    if model.recompute_granularity == "selective":
        log_sum_exp = 0
    attention = m * local_tokens * h + qkv_output + m * tokens * query // tp + log_sum_exp
    mlp_matrices = 4 if model.activation == "swiglu" else 2
    mlp = m * local_tokens * h + mlp_matrices * m * tokens * f // tp
    mask_bytes = _dropout_mask_bytes(strategy, device)
    dropout_masks = 2 * mask_bytes * local_tokens * h if model.hidden_dropout > 0 else 0
    return 2 * _norm_saved_bytes(model, strategy, local_tokens) + attention + mlp + dropout_masks


def chunk_activation_bytes(model: ModelConfig, parallel: ParallelConfig,
                           strategy: PrecisionStrategy, micro_batch_size: int,
                           chunk: ChunkPlacement, device: str = "cuda") -> ActivationBytes:
    """One micro-batch's activations held by one chunk between its forward and backward,
    on `device` ("cuda" or "cpu": they differ in the dropout masks)."""
    tp = parallel.tensor_model_parallel_size
    s, b, h = model.seq_length, micro_batch_size, model.hidden_size
    tokens, local_tokens = s * b, (s // tp if parallel.sequence_parallel else s) * b
    m, residual = _matmul_bytes(strategy), strategy.param_dtype.itemsize
    saved = chunk.num_layers * layer_saved_bytes(model, parallel, strategy, micro_batch_size,
                                                 device)
    if model.position_embedding_type == "rope" and chunk.num_layers > 0:
        saved += 2 * 4 * s * model.rotary_dim  # cos, sin [s, 1, 1, rotary_dim] fp32
    if chunk.pre_process:
        saved += 9 * tokens if tp > 1 else 8 * tokens  # token ids (TP: local ids and mask)
        if model.hidden_dropout > 0:
            saved += _dropout_mask_bytes(strategy, device) * local_tokens * h
    if chunk.post_process:
        saved += _norm_saved_bytes(model, strategy, local_tokens) + m * local_tokens * h
        saved += 4 * tokens * model.vocab_size // tp + 9 * tokens  # softmax, target, mask
    stage_tensor = residual * local_tokens * h
    # A received input is also a saved tensor when the first layer keeps it itself:
    # its norm does (and so does full recomputation's checkpoint).
    input_saved = chunk.num_layers > 0
    pipeline = 0
    if not chunk.pre_process and not input_saved:
        pipeline += stage_tensor
    if not chunk.post_process:
        pipeline += stage_tensor
    return ActivationBytes(saved, pipeline)


def in_flight_chunk_counts(pipeline_size: int, virtual_size: Optional[int], pipeline_rank: int,
                           num_microbatches: int, chunk_bytes: list[int]) -> list[int]:
    """Per chunk of this rank, the micro-batches whose activations it holds at the
    schedule's peak (the moment of the most held bytes, `chunk_bytes` per
    micro-batch and chunk; ties: the earliest), following `pipeline_parallel.schedules`."""
    pp, vp, m = pipeline_size, virtual_size or 1, num_microbatches
    if pp == 1:
        return [1]
    if virtual_size is None:
        return [min(pp - pipeline_rank, m)]
    total = m * vp
    warmup = total if m == pp else min((pp - pipeline_rank - 1) * 2 + (vp - 1) * pp, total)

    def chunk_of(step: int, forward: bool) -> int:
        c = (step % (pp * vp)) // pp
        return c if forward else vp - 1 - c

    def held_bytes(counts: list[int]) -> int:
        return sum(n * nbytes for n, nbytes in zip(counts, chunk_bytes))

    held, best = [0] * vp, [0] * vp
    backward = 0
    for step in range(total):
        held[chunk_of(step, True)] += 1
        if held_bytes(held) > held_bytes(best):
            best = list(held)
        if step >= warmup:  # steady state: one backward follows each forward
            held[chunk_of(backward, False)] -= 1
            backward += 1
    return best


# ----- communication -------------------------------------------------------------------------

def _ring_all_reduce(nbytes: float, group: int) -> float:
    return 2 * (group - 1) / group * nbytes


def _ring_gather_or_scatter(nbytes: float, group: int) -> float:
    return (group - 1) / group * nbytes


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
        unique = {entry.name: entry.numel * (tp if entry.tensor_parallel else 1)
                  for stage in range(self.job.parallel.pipeline_model_parallel_size)
                  for entry in rank_parameters(model, self.job.parallel, stage)}
        return sum(unique.values())


def _tensor_parallel_sent(job: JobConfig, strategy: PrecisionStrategy,
                          chunks: list[ChunkPlacement]) -> float:
    model, parallel = job.model, job.parallel
    tp = parallel.tensor_model_parallel_size
    if tp == 1:
        return 0.0
    s, b, h = model.seq_length, job.training.micro_batch_size, model.hidden_size
    activation = s * b * h * _matmul_bytes(strategy)
    residual_activation = s * b * h * strategy.param_dtype.itemsize
    all_reduces_per_layer = 6 if model.recompute_granularity == "full" else 4
    per_layer = all_reduces_per_layer * _ring_all_reduce(activation, tp)
    per_microbatch = 0.0
    for chunk in chunks:
        per_microbatch += chunk.num_layers * per_layer
        if chunk.pre_process:
            per_microbatch += _ring_all_reduce(residual_activation, tp)
            if parallel.sequence_parallel:
                per_microbatch += _ring_gather_or_scatter(residual_activation, tp)
        if chunk.post_process:
            per_microbatch += _ring_all_reduce(activation, tp)
            per_microbatch += _ring_all_reduce(3 * 4 * s * b, tp)  # cross entropy, fp32
    per_step = 0.0
    if parallel.sequence_parallel:  # the grads of norms and row-parallel biases
        sequence_parallel_numel = sum(
            entry.numel for chunk in chunks for entry in chunk_parameters(model, parallel, chunk)
            if not entry.tensor_parallel and "position_embeddings" not in entry.name)
        grad_bytes = sequence_parallel_numel * grad_dtype(job, strategy).itemsize
        per_step = _ring_all_reduce(grad_bytes, tp)
    return job.num_microbatches * per_microbatch + per_step


def _pipeline_sent(job: JobConfig, strategy: PrecisionStrategy,
                   chunks: list[ChunkPlacement]) -> float:
    model, parallel = job.model, job.parallel
    if parallel.pipeline_model_parallel_size == 1:
        return 0.0
    tp = parallel.tensor_model_parallel_size
    local_s = model.seq_length // tp if parallel.sequence_parallel else model.seq_length
    message = local_s * job.training.micro_batch_size * model.hidden_size \
        * strategy.param_dtype.itemsize
    sends = sum((not chunk.post_process) + (not chunk.pre_process) for chunk in chunks)
    sent = job.num_microbatches * sends * message
    tied = not model.untie_embeddings_and_output_weights
    if tied and any(chunk.pre_process or chunk.post_process for chunk in chunks):
        embedding = model.vocab_size // tp * model.hidden_size * grad_dtype(job, strategy).itemsize
        sent += _ring_all_reduce(embedding, 2)
    return sent


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
    b = job.training.micro_batch_size
    stages = []
    for pipeline_rank in range(parallel.pipeline_model_parallel_size):
        chunks = chunk_placements(model, parallel, pipeline_rank)
        entries = rank_parameters(model, parallel, pipeline_rank)
        numels = [entry.numel for entry in entries]
        held = state_bytes(numels, strategy, grads, dp, distributed, bucket_size,
                           own_buckets(model, entries))
        per_chunk = [chunk_activation_bytes(model, parallel, strategy, b, chunk, device)
                     for chunk in chunks]
        in_flight = in_flight_chunk_counts(parallel.pipeline_model_parallel_size,
                                           parallel.virtual_pipeline_model_parallel_size,
                                           pipeline_rank, job.num_microbatches,
                                           [a.total for a in per_chunk])
        layout = buffer_layout(model, entries, dp, bucket_size)
        buffer_numel = layout.numel
        grad_bytes, param_bytes = buffer_numel * grads.itemsize, \
            buffer_numel * strategy.param_dtype.itemsize
        last_start, last_end = layout.bucket_ranges[-1]
        overlappable = 1 - (last_end - last_start) / buffer_numel if dp > 1 else 0.0
        init_temporary = INIT_BYTES_PER_ELEMENT * min(max(numels),
                                                      INIT_CHUNK_ELEMENTS.get(device, 1 << 20))
        model_params = sum(numels) * strategy.param_dtype.itemsize
        stages.append(StageEstimate(
            pipeline_rank=pipeline_rank, num_parameters=sum(numels), **held,
            activations_per_microbatch=sum(a.total for a in per_chunk),
            activations_saved_per_microbatch=sum(a.saved for a in per_chunk),
            microbatches_in_flight=in_flight,
            activations_peak=sum(n * a.total for n, a in zip(in_flight, per_chunk)),
            sent_grad_reduce_scatter=(_ring_gather_or_scatter(grad_bytes, dp) if distributed
                                      else 0.0),
            sent_param_all_gather=_ring_gather_or_scatter(param_bytes, dp) if distributed else 0.0,
            sent_grad_all_reduce=0.0 if distributed else _ring_all_reduce(grad_bytes, dp),
            sent_tensor_parallel=_tensor_parallel_sent(job, strategy, chunks),
            sent_pipeline=_pipeline_sent(job, strategy, chunks),
            init_temporary=init_temporary,
            setup_peak=max(model_params + init_temporary,
                           model_params + held["params"] + held["grads"]),
            grad_reduce_overlap=overlappable if parallel.overlap_grad_reduce else 0.0,
            param_gather_overlap=(overlappable if parallel.overlap_param_gather and distributed
                                  else 0.0)))
    tokens_per_step = job.training.global_batch_size * model.seq_length
    return JobEstimate(job=job, strategy=strategy, stages=stages,
                       model_flops_per_step=flops_per_token(model) * tokens_per_step)


# ----- reports -------------------------------------------------------------------------------

GIB = 2 ** 30


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f}"


def _layout_line(job: JobConfig) -> str:
    parallel, model = job.parallel, job.model
    vp = parallel.virtual_pipeline_model_parallel_size
    parts = [f"TP={parallel.tensor_model_parallel_size}",
             f"PP={parallel.pipeline_model_parallel_size}" + (f" x VP={vp}" if vp else ""),
             f"DP={job.data_parallel_size}", f"world={job.world_size}",
             f"micro-batch={job.training.micro_batch_size}",
             f"global batch={job.training.global_batch_size}",
             f"micro-batches/step={job.num_microbatches}"]
    if parallel.sequence_parallel:
        parts.append("sequence parallel")
    if parallel.use_distributed_optimizer:
        parts.append("distributed optimizer")
    if model.recompute_granularity:
        parts.append(f"recompute {model.recompute_granularity}")
    return ", ".join(parts)


def format_estimate(estimate: JobEstimate) -> str:
    """The per-rank report of one strategy, in GiB (2^30 bytes)."""
    job = estimate.job
    lines = [f"model: {estimate.num_parameters / 1e9:.3f} B parameters (vocab padded to "
             f"{job.model.vocab_size}); precision {estimate.strategy.name}",
             f"layout: {_layout_line(job)}",
             "",
             "memory per rank (GiB)",
             f"{'stage':>5} {'params':>8} {'grads':>8} {'master':>8} {'optim':>8} "
             f"{'act/mb':>8} {'in flight':>10} {'act peak':>9} {'total':>8}"]
    for stage in estimate.stages:
        lines.append(
            f"{stage.pipeline_rank:>5} {_gib(stage.params):>8} {_gib(stage.grads):>8} "
            f"{_gib(stage.master):>8} {_gib(stage.optimizer):>8} "
            f"{_gib(stage.activations_per_microbatch):>8} "
            f"{'+'.join(map(str, stage.microbatches_in_flight)):>10} "
            f"{_gib(stage.activations_peak):>9} {_gib(stage.total):>8}")
    lines += ["", "sent per rank per step (GiB)",
              f"{'stage':>5} {'DP r-scat':>10} {'DP a-gath':>10} {'DP a-red':>9} {'TP':>8} "
              f"{'PP':>8} {'total':>8}"]
    for stage in estimate.stages:
        lines.append(
            f"{stage.pipeline_rank:>5} {_gib(stage.sent_grad_reduce_scatter):>10} "
            f"{_gib(stage.sent_param_all_gather):>10} {_gib(stage.sent_grad_all_reduce):>9} "
            f"{_gib(stage.sent_tensor_parallel):>8} {_gib(stage.sent_pipeline):>8} "
            f"{_gib(stage.sent_total):>8}")
    lines += ["", "start-up and overlap per rank",
              f"{'stage':>5} {'init tmp':>9} {'setup peak':>11} {'grad-reduce overlap':>20} "
              f"{'param-gather overlap':>21}"]
    for stage in estimate.stages:
        lines.append(
            f"{stage.pipeline_rank:>5} {_gib(stage.init_temporary):>9} "
            f"{_gib(stage.setup_peak):>11} {stage.grad_reduce_overlap:>20.3f} "
            f"{stage.param_gather_overlap:>21.3f}")
    flops = estimate.model_flops_per_step
    lines += ["", f"model FLOPs per step: {flops:.4g} ({flops / job.world_size:.4g} per rank)"]
    return "\n".join(lines)


DEVICE_MEMORY_GIB = {"80GB": 81559 / 1024, "141GB": 143771 / 1024}
"""What nvidia-smi reports as total memory of an H100 80GB and an H200 141GB, in GiB."""


def format_comparison(estimates: list[JobEstimate],
                      references: tuple[str, ...] = ("bf16-mixed", "amp"),
                      device_memory_gib: Optional[dict[str, float]] = None,
                      markdown: bool = False) -> str:
    """One row per strategy: the peak rank's memory (GiB), the ratio of its total to
    each of `references`' totals, and which of `device_memory_gib` it fits in
    (total <= capacity; no headroom for what the estimate leaves out)."""
    device_memory_gib = DEVICE_MEMORY_GIB if device_memory_gib is None else device_memory_gib
    by_name = {e.strategy.name: e for e in estimates}
    refs = [name for name in references if name in by_name]
    header = (["precision", "params", "grads", "master", "optimizer", "activations", "total"]
              + [f"vs {r}" for r in refs] + ["fits in"])
    rows = []
    for estimate in estimates:
        stage = estimate.peak_stage
        fits = [name for name, gib in device_memory_gib.items() if stage.total / GIB <= gib]
        rows.append([estimate.strategy.name]
                    + [_gib(n) for n in (stage.params, stage.grads, stage.master, stage.optimizer,
                                         stage.activations_peak, stage.total)]
                    + [f"{stage.total / by_name[r].peak_stage.total:.3f}" for r in refs]
                    + [", ".join(fits) or "none"])
    title = (f"layout: {_layout_line(estimates[0].job)}\n"
             f"peak rank's memory (GiB); vs X = this total / X's total")
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    else:
        widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
        lines = [" ".join(cell.rjust(width) if i else cell.ljust(width)
                          for i, (cell, width) in enumerate(zip(row, widths)))
                 for row in [header] + rows]
    return title + "\n\n" + "\n".join(lines)


# ----- from a launch command -----------------------------------------------------------------

GPT2_VOCAB_SIZE = 50257
"""The tokenizer vocabulary assumed when the command names no readable tokenizer files."""


def add_estimate_args(parser: argparse.ArgumentParser) -> None:
    """The estimator's own flags, added to `pretrain_gpt.py`'s parser."""
    group = parser.add_argument_group("estimate")
    sizes = group.add_mutually_exclusive_group()
    sizes.add_argument("--world-size", type=int,
                       help="Ranks of the job (what torchrun would start).")
    sizes.add_argument("--data-parallel-size", type=int,
                       help="Data-parallel size; world size = TP x PP x this (default 1).")
    group.add_argument("--compare", nargs="*", choices=tuple(STRATEGIES), metavar="PRECISION",
                       help="Estimate these --precision strategies (default: all) side by side.")
    group.add_argument("--markdown", action="store_true",
                       help="Print the --compare table as Markdown.")
    group.add_argument("--bucket-size", type=int, default=DEFAULT_BUCKET_SIZE,
                       help="Elements per gradient-buffer bucket.")


def _tokenizer_vocab_size(args: argparse.Namespace) -> tuple[int, bool]:
    """(the tokenizer's vocabulary size, whether it was read from the command's tokenizer);
    without readable tokenizer files: --vocab-size, else GPT-2's 50257."""
    try:
        tokenizer = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file,
                                    args.tokenizer_model, args.vocab_size)
    except (ValueError, OSError):
        return (args.vocab_size or GPT2_VOCAB_SIZE), False
    return tokenizer.vocab_size, True


def jobs_from_args(args: argparse.Namespace) -> list[JobConfig]:
    """Validated jobs (vocabulary padded) for parsed `pretrain_gpt.py` + estimator flags:
    one, or with --compare one per strategy it names (all when it names none).
    Validation is `job_config_from_args`'s, so a bad layout raises the same
    ValueError as `pretrain_gpt.py`. Flags a training run needs but an estimate
    does not get placeholders: --lr, --train-iters, --mock-data."""
    args = copy.copy(args)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if args.world_size is None:
        dp = 1 if args.data_parallel_size is None else args.data_parallel_size
        if dp < 1:
            raise ValueError(f"--data-parallel-size must be >= 1, got {dp}")
        args.world_size = tp * pp * dp
    if args.world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {args.world_size}")
    if args.lr is None:
        args.lr = 1e-4
    if args.train_iters is None and args.train_samples is None:
        args.train_iters = 1
    if not args.data_path:
        args.mock_data = True
    vocab_size, from_tokenizer = _tokenizer_vocab_size(args)
    if not from_tokenizer:
        args.tokenizer_type, args.vocab_size = "NullTokenizer", vocab_size
    variants = [args]
    if args.compare is not None:
        variants = []
        for name in args.compare or STRATEGIES:
            strategy = STRATEGIES[name]
            variant = copy.copy(args)
            variant.precision, variant.bf16 = name, False
            if not strategy.is_pure_bf16:
                variant.optimizer_state_dtype = None
            variants.append(variant)
    return [job_config_from_args(variant, variant.world_size).with_vocab_size(vocab_size)
            for variant in variants]


def estimate_from_argv(argv: Optional[list[str]]) -> tuple[argparse.Namespace, list[JobEstimate]]:
    """Parses a `pretrain_gpt.py` command line (+ estimator flags) and estimates it."""
    args = build_parser(extra_args_provider=add_estimate_args).parse_args(argv)
    return args, [estimate_job(job, args.bucket_size) for job in jobs_from_args(args)]


def report_from_argv(argv: Optional[list[str]]) -> str:
    """What `tools/estimate.py` prints for `argv`: the per-stage report, or with
    --compare the strategies side by side. Raises ValueError on a bad layout."""
    args, estimates = estimate_from_argv(argv)
    if args.compare is not None:
        return format_comparison(estimates, markdown=args.markdown)
    return format_estimate(estimates[0])
