"""The transformer layer: pre-norm self-attention and MLP, split over TP ranks.

Activations are [s, b, h] (sequence first, as in Megatron), or [s / tp, b, h]
between the TP regions under --sequence-parallel. Inside a layer:

    x = x + dropout(attention(norm_1(x)))      qkv: column-parallel, proj: row-parallel
    x = x + dropout(mlp(norm_2(x)))            fc1: column-parallel, fc2: row-parallel

Each TP rank owns num_attention_heads / tp heads and ffn_hidden_size / tp MLP
features; the only communication is inside the parallel linears (an
all-reduce per block, or all-gather + reduce-scatter with sequence
parallelism). Dropout on TP-sharded activations draws from the per-TP-rank
stream (`megatron_sr.random.get_rng_tracker().fork()`), on replicated ones
from the default stream, so replicated activations stay identical.

Activation recomputation (--recompute-granularity): `full` keeps only each
layer's input and reruns the layer in backward; `selective` reruns only the
core attention (softmax(q k^T) v), the part whose activations grow with s^2.

Inference: a `KVCache` passed down the forward keeps every layer's keys and
values of the tokens seen so far (this TP rank's heads only), so generating a
token attends over the cache instead of recomputing the whole prefix.
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_sr import parallel_state
from megatron_sr.config import ModelConfig
from megatron_sr.cpu_bf16 import scaled_dot_product_attention
from megatron_sr.model.norms import build_norm
from megatron_sr.random import get_rng_tracker
from megatron_sr.tensor_parallel import ColumnParallelLinear, RowParallelLinear, normal_init


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


class RotaryEmbedding(nn.Module):
    """RoPE tables: cos, sin of shape [s, b or 1, 1, head_dim] in fp32."""

    def __init__(self, head_dim: int, base: float, device=None):
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
        inv_freq = 1.0 / base ** exponents
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_length: int, position_ids: Optional[torch.Tensor]):
        if position_ids is None:
            positions = torch.arange(seq_length, device=self.inv_freq.device)[:, None]  # [s, 1]
        else:
            positions = position_ids.t()  # [s, b]
        angles = positions.float()[..., None] * self.inv_freq  # [s, b, d/2]
        angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]  # [s, b, 1, d]
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the two halves of each head's features ([s, b, heads, d]), in fp32."""
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


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
    """Causal multi-head self-attention over this rank's heads.

    linear_qkv's full weight is [3h, h] with rows grouped per head as
    (q, k, v) x head_dim, so a contiguous TP slice holds whole heads.
    """

    def __init__(self, config: ModelConfig, *, sequence_parallel: bool, device=None):
        super().__init__()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.num_heads = config.num_attention_heads // tp
        self.head_dim = config.head_dim
        self.dropout_p = config.attention_dropout
        self.recompute_core = config.recompute_granularity == "selective"
        h, kw = config.hidden_size, dict(params_dtype=config.params_dtype, device=device)
        self.linear_qkv = ColumnParallelLinear(
            h, 3 * h, bias=config.add_bias_linear, init_method=normal_init(config.init_method_std),
            sequence_parallel=sequence_parallel, **kw)
        self.linear_proj = RowParallelLinear(
            h, h, bias=config.add_bias_linear, init_method=normal_init(residual_init_std(config)),
            sequence_parallel=sequence_parallel, **kw)

    def forward(self, x: torch.Tensor, rope: Optional[tuple],
                kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        qkv = self.linear_qkv(x)  # [s, b, 3 * h / tp]
        s, b, _ = qkv.shape
        q, k, v = qkv.view(s, b, self.num_heads, 3, self.head_dim).unbind(dim=3)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.store(self, k, v)
        if self.recompute_core and self.training:
            y = recompute(self.core_attention, q, k, v)
        else:
            y = self.core_attention(q, k, v)
        return self.linear_proj(y)

    def core_attention(self, q, k, v):
        """softmax(q k^T / sqrt(d), causal) v: q [s_q, b, heads, d] are the last
        s_q of the s_k positions of k, v [s_k, b, heads, d] (s_q < s_k when
        earlier keys come from a KVCache) -> [s_q, b, heads * d]."""
        s_q, s_k = q.shape[0], k.shape[0]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d]
        p = self.dropout_p if self.training else 0.0
        causal_mask = None
        if s_q != s_k:  # query i sits at position s_k - s_q + i
            causal_mask = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril(s_k - s_q)
        with get_rng_tracker().fork() if p > 0 else nullcontext():
            y = scaled_dot_product_attention(q, k, v, attn_mask=causal_mask, dropout_p=p,
                                             is_causal=causal_mask is None)
        b, heads, s, d = y.shape
        return y.permute(2, 0, 1, 3).reshape(s, b, heads * d)


class MLP(nn.Module):
    """fc2(act(fc1(x))), act = GeLU, or SwiGLU with fc1 = [gate; up].

    With SwiGLU the full fc1 weight is [2 * ffn, h] (gate rows, then up
    rows) and each TP rank holds its slice of both (partition_stride=2).
    """

    def __init__(self, config: ModelConfig, *, sequence_parallel: bool, device=None):
        super().__init__()
        if config.activation not in ("gelu", "swiglu"):
            raise ValueError(f"activation must be 'gelu' or 'swiglu' (--swiglu), "
                             f"got {config.activation!r}")
        self.swiglu = config.activation == "swiglu"
        h, f = config.hidden_size, config.ffn_hidden_size
        kw = dict(params_dtype=config.params_dtype, device=device)
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
        else:
            y = F.gelu(y)
        return self.linear_fc2(y)


class TransformerLayer(nn.Module):
    def __init__(self, config: ModelConfig, *, sequence_parallel: bool, device=None):
        super().__init__()
        self.hidden_dropout = config.hidden_dropout
        self.sequence_parallel = sequence_parallel
        kw = dict(sequence_parallel=sequence_parallel, device=device)
        self.input_layernorm = build_norm(config, **kw)
        self.self_attention = SelfAttention(config, **kw)
        self.pre_mlp_layernorm = build_norm(config, **kw)
        self.mlp = MLP(config, **kw)

    def forward(self, x: torch.Tensor, rope: Optional[tuple] = None,
                kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        x = x + self.residual_dropout(self.self_attention(self.input_layernorm(x), rope, kv_cache))
        x = x + self.residual_dropout(self.mlp(self.pre_mlp_layernorm(x)))
        return x

    def residual_dropout(self, y: torch.Tensor) -> torch.Tensor:
        # Under sequence parallelism each TP rank holds a different sequence shard.
        return dropout(y, self.hidden_dropout, self.training, tp_sharded=self.sequence_parallel)


class TransformerBlock(nn.Module):
    """This chunk's layers, plus the final norm on the last pipeline stage."""

    def __init__(self, config: ModelConfig, num_layers: int, *, final_norm: bool,
                 sequence_parallel: bool, device=None):
        super().__init__()
        self.recompute_layers = config.recompute_granularity == "full"
        self.layers = nn.ModuleList(
            TransformerLayer(config, sequence_parallel=sequence_parallel, device=device)
            for _ in range(num_layers))
        self.final_layernorm = (
            build_norm(config, sequence_parallel=sequence_parallel, device=device)
            if final_norm else None)

    def forward(self, x: torch.Tensor, rope: Optional[tuple] = None,
                kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        for layer in self.layers:
            if self.recompute_layers and self.training:
                x = recompute(layer, x, rope)
            else:
                x = layer(x, rope, kv_cache)
        return x if self.final_layernorm is None else self.final_layernorm(x)
