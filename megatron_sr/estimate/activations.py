"""Activation memory per rank: what one micro-batch leaves for backward, and how
many micro-batches the pipeline schedule holds at its peak.

The model of what autograd keeps for backward in this code (bytes
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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_sr.config import ModelConfig, ParallelConfig
from megatron_sr.model.parallel_layout import ChunkPlacement
from megatron_sr.precision.strategies import PrecisionStrategy


@dataclass(frozen=True)
class ActivationBytes:
    """One micro-batch through one chunk: `saved` is what autograd keeps for backward,
    `pipeline` what the schedule holds besides (received input, output)."""

    saved: int
    pipeline: int

    @property
    def total(self) -> int:
        return self.saved + self.pipeline


def matmul_bytes(strategy: PrecisionStrategy) -> int:
    """Bytes of a matmul input element (bf16 under autocast, else the params dtype's)."""
    return 2 if strategy.autocast else strategy.param_dtype.itemsize


def _norm_saved_bytes(model: ModelConfig, strategy: PrecisionStrategy, tokens: int) -> int:
    """A norm keeps its input (the residual stream's dtype) and fp32 row statistics."""
    statistics = 4 if model.normalization == "RMSNorm" else 8
    return strategy.param_dtype.itemsize * tokens * model.hidden_size + statistics * tokens


def _dropout_mask_bytes(strategy: PrecisionStrategy, device: str) -> int:
    return 1 if device == "cuda" else matmul_bytes(strategy)


def layer_saved_bytes(model: ModelConfig, parallel: ParallelConfig, strategy: PrecisionStrategy,
                      micro_batch_size: int, device: str = "cuda") -> int:
    """Bytes one transformer layer keeps for backward per micro-batch (module docstring)."""
    tp = parallel.tensor_model_parallel_size
    s, b, h, f = model.seq_length, micro_batch_size, model.hidden_size, model.ffn_hidden_size
    tokens, local_tokens = s * b, (s // tp if parallel.sequence_parallel else s) * b
    m, residual = matmul_bytes(strategy), strategy.param_dtype.itemsize
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
    m, residual = matmul_bytes(strategy), strategy.param_dtype.itemsize
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
