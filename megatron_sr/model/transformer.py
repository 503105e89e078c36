"""The transformer layer: pre-norm self-attention and MLP, split over TP ranks.

Activations are [s, b, h] (sequence first, as in Megatron), or [s / tp, b, h]
between the TP regions under --sequence-parallel. Inside a layer:

    x = x + dropout(attention(norm_1(x)))      qkv: column-parallel, proj: row-parallel
    x = x + dropout(mlp(norm_2(x)))            fc1: column-parallel, fc2: row-parallel

Each TP rank owns num_attention_heads / tp heads and ffn_hidden_size / tp MLP
features; the only communication is inside the parallel linears (an
all-reduce per block, or all-gather + reduce-scatter with sequence
parallelism). Under sequence parallelism qkv and fc1 keep only their
[s / tp, b, h] input shard for backward and all-gather it again there,
overlapped with their input-gradient GEMM (`ColumnParallelLinear`).

Kept for backward per layer (what `megatron_sr.estimate.layer_saved_bytes`
counts and tests/test_scale_simulation.py measures at full size): each
norm's input in the residual dtype and its fp32 per-row statistics; the
[s / tp, b, h] (or [s, b, h]) inputs of qkv and fc1; the qkv output (q, k, v)
and RoPE's rotated q, k; the attention output (proj's input) and the
attention kernel's log-sum-exp; the MLP's hidden activations. Dropout on TP-sharded activations draws from the per-TP-rank
stream (`megatron_sr.random.get_rng_tracker().fork()`), on replicated ones
from the default stream, so replicated activations stay identical.

Activation recomputation (--recompute-granularity): `full` keeps only the
input of each group of layers (--recompute-method, --recompute-num-layers;
see TransformerBlock) and reruns the group in backward; `selective` reruns
only the core attention (softmax(q k^T) v), the part whose activations grow
with s^2.

Attention: grouped-query (heads / groups query heads share a key/value
head), SDPA with `enable_gqa`; RoPE on the first head_dim x --rotary-percent
features; optional qk-layernorm per head. An attention mask replaces the
causal one: a `DocumentMask` (--reset-attention-mask) runs causal SDPA
document by document over each sample's packed documents, so no s x s mask or
score matrix exists and SDPA keeps its fused kernels (with GQA too); a
boolean tensor [b, 1, s_q, s_k] goes to SDPA as it is (its math path).

Inference: a `KVCache` passed down the forward keeps every layer's keys and
values of the tokens seen so far (this TP rank's heads only), so generating a
token attends over the cache instead of recomputing the whole prefix.
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_sr.config import ModelConfig
from megatron_sr.cpu_bf16 import scaled_dot_product_attention
from megatron_sr.data.document_masks import DocumentMask
from megatron_sr.model.norms import build_norm
from megatron_sr.random import get_rng_tracker
from megatron_sr.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,
                                         TensorParallelRank, normal_init, tensor_parallel_rank)

# What may replace the causal mask: see SelfAttention.core_attention.
AttentionMask = Union[torch.Tensor, DocumentMask]


def dropout(x: torch.Tensor, p: float, training: bool, tp_sharded: bool) -> torch.Tensor:
    """Dropout drawing from the per-TP-rank stream when `x` differs across TP ranks."""
    if not training or p == 0.0:
        return x
    with get_rng_tracker().fork() if tp_sharded else nullcontext():
        return F.dropout(x, p, training=True)


def recompute(function: Callable, *args):
    """Runs `function(*args)` keeping only its inputs; backward reruns it.

    The rerun sees the same default RNG state (torch's checkpoint restores it)
    and the same TP-stream state (restored here), so dropout masks and hence
    gradients are the same as without recomputation. Collectives inside
    `function` rerun in backward on every rank of the group alike.
    """
    tracker = get_rng_tracker()
    states_at_forward = {}

    @contextmanager
    def on_forward():
        states_at_forward.update(tracker.get_states())
        yield

    @contextmanager
    def on_recompute():
        current = tracker.get_states()
        tracker.set_states(states_at_forward)
        try:
            yield
        finally:
            tracker.set_states(current)

    return checkpoint(function, *args, use_reentrant=False,
                      context_fn=lambda: (on_forward(), on_recompute()))


def llama3_scaled_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float = 1.0,
                           high_freq_factor: float = 4.0,
                           original_max_position_embeddings: int = 8192) -> torch.Tensor:
    """Llama-3.x RoPE scaling (--use-rope-scaling --rope-scaling-factor), as
    Megatron and Hugging Face's "llama3" rope type compute it: wavelengths
    longer than the original context / low_freq_factor are divided by `factor`,
    shorter than context / high_freq_factor kept, the band between interpolated."""
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """RoPE tables: cos, sin of shape [s, b or 1, 1, rotary_dim] in fp32.

    rotary_dim = head_dim x --rotary-percent; frequencies base^(-2i / rotary_dim).
    Feature j of the table belongs to frequency j mod rotary_dim/2 (halves,
    the default) or j // 2 (--rotary-interleaved), matching `apply_rope`.
    """

    def __init__(self, config: ModelConfig, device=None):
        super().__init__()
        dim = config.rotary_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim
        inv_freq = 1.0 / config.rotary_base ** exponents
        if config.use_rope_scaling:
            inv_freq = llama3_scaled_inv_freq(inv_freq, config.rope_scaling_factor)
        self.interleaved = config.rotary_interleaved
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_length: int, position_ids: Optional[torch.Tensor]):
        if position_ids is None:
            positions = torch.arange(seq_length, device=self.inv_freq.device)[:, None]  # [s, 1]
        else:
            positions = position_ids.t()  # [s, b]
        angles = positions.float()[..., None] * self.inv_freq  # [s, b, d/2]
        if self.interleaved:
            angles = angles.repeat_interleave(2, dim=-1)[:, :, None, :]  # [s, b, 1, d]
        else:
            angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]  # [s, b, 1, d]
        return angles.cos(), angles.sin(), self.interleaved


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               interleaved: bool = False) -> torch.Tensor:
    """Rotates the first rotary_dim features of each head ([s, b, heads, d]) in
    fp32: pairs (j, j + rotary_dim/2), or (2i, 2i + 1) when `interleaved`;
    features past rotary_dim (--rotary-percent < 1) pass unchanged."""
    rotary_dim = cos.shape[-1]
    x32, passed = x[..., :rotary_dim].float(), x[..., rotary_dim:]
    if interleaved:
        even, odd = x32[..., 0::2], x32[..., 1::2]
        rotated = torch.stack([-odd, even], dim=-1).flatten(-2)
    else:
        first, second = x32.chunk(2, dim=-1)
        rotated = torch.cat([-second, first], dim=-1)
    y = (x32 * cos + rotated * sin).to(x.dtype)
    return y if passed.shape[-1] == 0 else torch.cat([y, passed], dim=-1)


class KVCache:
    """Keys and values of the tokens seen so far, for every attention layer of
    one model chunk on this TP rank (its heads only).

    Buffers are [max_sequence_length, b, heads / tp, head_dim] in the
    activations' dtype, allocated on a layer's first `store`. One forward of
    the model stores s new tokens at positions [sequence_offset,
    sequence_offset + s) in every layer, then `advance(s)` moves the offset
    (GPTModel.forward calls it). Used with a single chunk (PP=1), without
    sequence parallelism, in eval mode; the batch size is fixed by the first
    forward.
    """

    def __init__(self, max_sequence_length: int):
        self.max_sequence_length = max_sequence_length
        self.sequence_offset = 0  # tokens cached so far = position of the next token
        self.keys: dict[nn.Module, torch.Tensor] = {}
        self.values: dict[nn.Module, torch.Tensor] = {}

    def store(self, layer: nn.Module, k: torch.Tensor, v: torch.Tensor):
        """Caches `layer`'s new k, v [s, b, heads, d]; returns all its cached
        keys and values [sequence_offset + s, b, heads, d]."""
        end = self.sequence_offset + k.shape[0]
        if end > self.max_sequence_length:
            raise ValueError(f"KVCache: {end} tokens exceed the cache's max_sequence_length "
                             f"({self.max_sequence_length})")
        if layer not in self.keys:
            shape = (self.max_sequence_length, *k.shape[1:])
            self.keys[layer], self.values[layer] = k.new_empty(shape), v.new_empty(shape)
        self.keys[layer][self.sequence_offset:end] = k
        self.values[layer][self.sequence_offset:end] = v
        return self.keys[layer][:end], self.values[layer][:end]

    def advance(self, num_tokens: int) -> None:
        self.sequence_offset += num_tokens


def residual_init_std(config: ModelConfig) -> float:
    """Std of the layers writing into the residual stream (attention output
    projection, MLP fc2): std / sqrt(2 * num_layers), as in GPT-2."""
    return config.init_method_std / math.sqrt(2.0 * config.num_layers)


class SelfAttention(nn.Module):
    """Causal self-attention over this rank's heads, with grouped-query attention.

    num_attention_heads query heads share num_query_groups key/value heads
    (--group-query-attention --num-query-groups; equal counts: multi-head,
    one group: multi-query). linear_qkv's full weight is
    [(heads + 2 x groups) x d, h] in Megatron's fused layout: rows grouped per
    query group as (q of its heads/groups heads, k, v) x d, so a contiguous TP
    slice holds whole groups (groups / tp per rank) with their query heads.
    With one head per group this is the per-head (q, k, v) layout. Its bias
    (every linear's, or linear_qkv's alone with --add-qkv-bias) has the same
    row layout and TP slices; it starts at zero.
    """

    def __init__(self, config: ModelConfig, *, sequence_parallel: bool, device=None,
                 tp: Optional[TensorParallelRank] = None):
        super().__init__()
        tp_size = tensor_parallel_rank(tp).size
        self.num_heads = config.num_attention_heads // tp_size
        self.num_groups = config.num_query_groups // tp_size
        self.head_dim = config.head_dim
        self.dropout_p = config.attention_dropout
        self.recompute_core = config.recompute_granularity == "selective"
        h, kw = config.hidden_size, dict(
            params_dtype=config.params_dtype, device=device, tp=tp,
            gradient_accumulation_fusion=config.gradient_accumulation_fusion)
        self.linear_qkv = ColumnParallelLinear(
            h, config.qkv_size, bias=config.qkv_bias,
            init_method=normal_init(config.init_method_std),
            sequence_parallel=sequence_parallel, **kw)
        self.linear_proj = RowParallelLinear(
            config.query_projection_size, h, bias=config.add_bias_linear,
            init_method=normal_init(residual_init_std(config)),
            sequence_parallel=sequence_parallel, **kw)
        self.q_layernorm = self.k_layernorm = None
        if config.qk_layernorm:
            norm = dict(size=config.head_dim, sequence_parallel=False, partial_grad=True,
                        device=device)
            self.q_layernorm = build_norm(config, **norm)
            self.k_layernorm = build_norm(config, **norm)

    def forward(self, x: torch.Tensor, rope: Optional[tuple],
                kv_cache: Optional[KVCache] = None,
                attention_mask: Optional[AttentionMask] = None) -> torch.Tensor:
        qkv = self.linear_qkv(x)  # [s, b, (heads + 2 groups) * d / tp]
        s, b, _ = qkv.shape
        per_group = self.num_heads // self.num_groups
        qkv = qkv.view(s, b, self.num_groups, per_group + 2, self.head_dim)
        q = qkv[:, :, :, :per_group].reshape(s, b, self.num_heads, self.head_dim)
        k, v = qkv[:, :, :, per_group], qkv[:, :, :, per_group + 1]  # [s, b, groups, d]
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.store(self, k, v)
        if self.recompute_core and self.training:
            y = recompute(self.core_attention, q, k, v, attention_mask)
        else:
            y = self.core_attention(q, k, v, attention_mask)
        return self.linear_proj(y)

    def core_attention(self, q, k, v, attention_mask: Optional[AttentionMask] = None):
        """softmax(q k^T / sqrt(d), causal) v: q [s_q, b, heads, d] are the last
        s_q of the s_k positions of k, v [s_k, b, groups, d] (s_q < s_k when
        earlier keys come from a KVCache); query head i reads key/value group
        i // (heads / groups). `attention_mask` replaces the causal mask: a
        `DocumentMask` of [b, s] (s_q == s_k; causal within each document), or
        [b, 1, s_q, s_k] bool, True = may attend. Returns [s_q, b, heads * d]."""
        s_q, s_k = q.shape[0], k.shape[0]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads or groups, s, d]
        p = self.dropout_p if self.training else 0.0
        gqa = dict(enable_gqa=True) if q.shape[1] != k.shape[1] else {}
        with get_rng_tracker().fork() if p > 0 else nullcontext():
            if isinstance(attention_mask, DocumentMask):
                y = _attention_per_document(q, k, v, attention_mask, p, gqa)
            else:
                mask = attention_mask
                if mask is None and s_q != s_k:  # query i sits at position s_k - s_q + i
                    mask = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril(s_k - s_q)
                y = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                 is_causal=mask is None, **gqa)
        b, heads, s, d = y.shape
        return y.permute(2, 0, 1, 3).reshape(s, b, heads * d)


def _attention_per_document(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            mask: DocumentMask, dropout_p: float, gqa: dict) -> torch.Tensor:
    """Causal attention within each document of `mask`: q [b, heads, s, d],
    k, v [b, groups, s, d] -> [b, heads, s, d]. One causal SDPA call per
    (sample, document) over that document's positions, so the largest
    intermediate is one document's scores (none with a fused kernel); the
    results equal masked SDPA with `mask.dense()` up to the order of the
    floating-point sums (attention dropout draws other bits)."""
    b, s = mask.document_ids.shape
    if q.shape[0] != b or q.shape[2] != s or k.shape[2] != s:
        raise ValueError(f"document mask of {b} samples x {s} positions does not fit queries "
                         f"{tuple(q.shape)} and keys {tuple(k.shape)} ([b, heads, s, d]; "
                         f"document masks need the whole sequence, no KV cache)")
    rows = []
    for row, documents in enumerate(mask.segments()):
        pieces = [scaled_dot_product_attention(
                      q[row:row + 1, :, start:end], k[row:row + 1, :, start:end],
                      v[row:row + 1, :, start:end], dropout_p=dropout_p, is_causal=True, **gqa)
                  for start, end in documents]
        rows.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
    return torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]


class MLP(nn.Module):
    """fc2(act(fc1(x))), act = GeLU, squared ReLU (relu(x)^2), or SwiGLU with fc1 = [gate; up].

    With SwiGLU the full fc1 weight is [2 * ffn, h] (gate rows, then up
    rows) and each TP rank holds its slice of both (partition_stride=2).
    """

    def __init__(self, config: ModelConfig, *, sequence_parallel: bool, device=None,
                 tp: Optional[TensorParallelRank] = None):
        super().__init__()
        if config.activation not in ("gelu", "swiglu", "squared_relu"):
            raise ValueError(f"activation must be 'gelu', 'swiglu' (--swiglu) or "
                             f"'squared_relu' (--squared-relu), got {config.activation!r}")
        self.activation = config.activation
        self.swiglu = config.activation == "swiglu"
        h, f = config.hidden_size, config.ffn_hidden_size
        kw = dict(params_dtype=config.params_dtype, device=device, tp=tp,
                  gradient_accumulation_fusion=config.gradient_accumulation_fusion)
        self.linear_fc1 = ColumnParallelLinear(
            h, 2 * f if self.swiglu else f, bias=config.add_bias_linear,
            init_method=normal_init(config.init_method_std), sequence_parallel=sequence_parallel,
            partition_stride=2 if self.swiglu else 1, **kw)
        self.linear_fc2 = RowParallelLinear(
            f, h, bias=config.add_bias_linear, init_method=normal_init(residual_init_std(config)),
            sequence_parallel=sequence_parallel, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear_fc1(x)
        if self.swiglu:
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        elif self.activation == "squared_relu":
            y = F.relu(y).square()
        else:
            y = F.gelu(y)
        return self.linear_fc2(y)


class TransformerLayer(nn.Module):
    def __init__(self, config: ModelConfig, *, sequence_parallel: bool, device=None,
                 tp: Optional[TensorParallelRank] = None):
        super().__init__()
        self.hidden_dropout = config.hidden_dropout
        self.sequence_parallel = sequence_parallel
        kw = dict(sequence_parallel=sequence_parallel, device=device)
        self.input_layernorm = build_norm(config, **kw)
        self.self_attention = SelfAttention(config, **kw, tp=tp)
        self.pre_mlp_layernorm = build_norm(config, **kw)
        self.mlp = MLP(config, **kw, tp=tp)

    def forward(self, x: torch.Tensor, rope: Optional[tuple] = None,
                kv_cache: Optional[KVCache] = None,
                attention_mask: Optional[AttentionMask] = None) -> torch.Tensor:
        y = self.self_attention(self.input_layernorm(x), rope, kv_cache, attention_mask)
        x = x + self.residual_dropout(y)
        x = x + self.residual_dropout(self.mlp(self.pre_mlp_layernorm(x)))
        return x

    def residual_dropout(self, y: torch.Tensor) -> torch.Tensor:
        # Under sequence parallelism each TP rank holds a different sequence shard.
        return dropout(y, self.hidden_dropout, self.training, tp_sharded=self.sequence_parallel)


class TransformerBlock(nn.Module):
    """This chunk's layers, plus the final norm on the last pipeline stage.

    Full recomputation (--recompute-granularity full) checkpoints, in
    training, with --recompute-method uniform (the default) groups of
    --recompute-num-layers (default 1) consecutive layers, each group keeping
    only its input; with block, the first --recompute-num-layers layers of
    this chunk one by one, the others keep their activations.
    """

    def __init__(self, config: ModelConfig, num_layers: int, *, final_norm: bool,
                 sequence_parallel: bool, device=None, tp: Optional[TensorParallelRank] = None):
        super().__init__()
        self.recompute_layers = config.recompute_granularity == "full"
        self.recompute_method = config.recompute_method or "uniform"
        self.recompute_num_layers = config.recompute_num_layers or 1
        self.layers = nn.ModuleList(
            TransformerLayer(config, sequence_parallel=sequence_parallel, device=device, tp=tp)
            for _ in range(num_layers))
        self.final_layernorm = (
            build_norm(config, sequence_parallel=sequence_parallel, device=device)
            if final_norm else None)

    def _run_layers(self, first: int, end: int, x: torch.Tensor, rope, attention_mask):
        for layer in self.layers[first:end]:
            x = layer(x, rope, None, attention_mask)
        return x

    def forward(self, x: torch.Tensor, rope: Optional[tuple] = None,
                kv_cache: Optional[KVCache] = None,
                attention_mask: Optional[AttentionMask] = None) -> torch.Tensor:
        if self.recompute_layers and self.training:
            n, step = len(self.layers), self.recompute_num_layers
            if self.recompute_method == "uniform":
                for first in range(0, n, step):
                    x = recompute(self._run_layers, first, min(first + step, n), x, rope,
                                  attention_mask)
            else:  # block
                for i in range(n):
                    x = (recompute(self._run_layers, i, i + 1, x, rope, attention_mask)
                         if i < step else self._run_layers(i, i + 1, x, rope, attention_mask))
        else:
            for layer in self.layers:
                x = layer(x, rope, kv_cache, attention_mask)
        return x if self.final_layernorm is None else self.final_layernorm(x)
