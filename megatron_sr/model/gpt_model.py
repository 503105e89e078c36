"""GPT: token (+ learned position) embedding, transformer layers, final norm,
output layer, loss. One `GPTModel` is one pipeline chunk.

    tokens [b, s] --embedding--> [s, b, h] --layers--> --final norm--> --output layer-->
    logits [s, b, V / tp] --vocab-parallel cross entropy--> loss [b, s] (fp32)

A chunk with `pre_process` holds the embedding, one with `post_process` the
final norm and output layer; intermediate chunks take their input through
`set_input_tensor` (the pipeline schedule calls it) and return hidden states
[s, b, h] ([s / tp, b, h] with --sequence-parallel) in the params dtype.
Build chunks with `megatron_sr.model.build_model`, which also initializes
their values; a `GPTModel` constructed directly holds uninitialized memory.

Tied embeddings (the default; --untie-embeddings-and-output-weights unties):
on a single stage the output layer multiplies by the word-embedding matrix
itself; with pipelining the last stage keeps its own copy, marked
`shared_embedding=True` and named like the original, initialized equal, and
kept equal by summing both gradients (the optimizer's buffer, or
`finalize_model_grads` outside it).

Inference with a KV cache: `forward(tokens, kv_cache=KVCache(max_len))` on a
single-chunk model (PP=1, no sequence parallelism) feeds the next tokens only;
their positions continue from `kv_cache.sequence_offset` unless
`position_ids` are given, and the cache advances by the number of tokens fed.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megatron_sr import parallel_state
from megatron_sr.config import ModelConfig
from megatron_sr.model.transformer import (AttentionMask, KVCache, RotaryEmbedding, TransformerBlock,
                                          dropout)
from megatron_sr.tensor_parallel import (
    ColumnParallelLinear,
    TensorParallelRank,
    VocabParallelEmbedding,
    normal_init,
    scatter_to_sequence_parallel_region,
    set_parallel_attributes,
    vocab_parallel_cross_entropy,
)

WORD_EMBEDDING_NAME = "embedding.word_embeddings.weight"


class GPTEmbedding(nn.Module):
    """tokens [b, s] -> [s, b, h] (or this rank's [s / tp, b, h] shard)."""

    def __init__(self, config: ModelConfig, *, sequence_parallel: bool, device=None,
                 tp: Optional[TensorParallelRank] = None):
        super().__init__()
        self.sequence_parallel = sequence_parallel
        self.dropout_p = config.hidden_dropout
        self.word_embeddings = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, init_method=normal_init(config.init_method_std),
            params_dtype=config.params_dtype, device=device, tp=tp)
        self.position_embeddings = None
        if config.position_embedding_type == "learned_absolute":
            self.position_embeddings = nn.Embedding(config.max_position_embeddings,
                                                    config.hidden_size, dtype=config.params_dtype,
                                                    device=device)
            set_parallel_attributes(self.position_embeddings.weight, tensor_model_parallel=False,
                                    init_method=normal_init(config.init_method_std))

    def forward(self, tokens: torch.Tensor, position_ids: Optional[torch.Tensor]) -> torch.Tensor:
        x = self.word_embeddings(tokens)
        if self.position_embeddings is not None:
            if position_ids is None:
                position_ids = torch.arange(tokens.shape[1], device=tokens.device)
            x = x + self.position_embeddings(position_ids)
        x = x.transpose(0, 1).contiguous()
        if self.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x)
        return dropout(x, self.dropout_p, self.training, tp_sharded=self.sequence_parallel)


class GPTModel(nn.Module):
    """Layers [layer_offset, layer_offset + num_layers) of the GPT of `config`.

    forward(tokens [b, s] int64, position_ids [b, s] or None, labels [b, s] or None,
            kv_cache KVCache or None, attention_mask DocumentMask, [b, 1, s, s] bool or None):
      - post_process and labels: per-token loss [b, s], fp32;
      - post_process, no labels: logits [b, s, V / tp] of this TP rank's vocabulary slice;
      - otherwise: hidden states [s, b, h] ([s / tp, b, h] with sequence_parallel).
    Non-first chunks ignore `tokens` and read `set_input_tensor`'s tensor;
    `position_ids` matter to every chunk when RoPE is used (None: 0..s-1), and
    `attention_mask` (replaces the causal mask; see `SelfAttention.core_attention`)
    to every chunk.
    Every parameter has `global_name`, its name in the unsplit model.
    `tp`: the TP slice to hold (default: this rank's in its TP group; a
    shape-only build on `meta` passes one, `megatron_sr.model.parameter_specs`).
    """

    def __init__(self, config: ModelConfig, *, pre_process: bool = True, post_process: bool = True,
                 layer_offset: int = 0, num_layers: Optional[int] = None,
                 sequence_parallel: bool = False, device=None,
                 tp: Optional[TensorParallelRank] = None):
        super().__init__()
        if config.recompute_granularity not in (None, "full", "selective"):
            raise ValueError(f"--recompute-granularity must be 'full' or 'selective', "
                             f"got {config.recompute_granularity!r}")
        if config.position_embedding_type not in ("learned_absolute", "rope"):
            raise ValueError(f"--position-embedding-type must be 'learned_absolute' or 'rope', "
                             f"got {config.position_embedding_type!r}")
        self.config = config
        self.pre_process, self.post_process = pre_process, post_process
        self.layer_offset = layer_offset
        self.sequence_parallel = sequence_parallel
        self.tied = not config.untie_embeddings_and_output_weights
        num_layers = config.num_layers if num_layers is None else num_layers

        if pre_process:
            self.embedding = GPTEmbedding(config, sequence_parallel=sequence_parallel, device=device,
                                          tp=tp)
        self.rotary_pos_emb = (RotaryEmbedding(config, device)
                               if config.position_embedding_type == "rope" else None)
        self.decoder = TransformerBlock(config, num_layers, final_norm=post_process,
                                        sequence_parallel=sequence_parallel, device=device, tp=tp)
        if post_process:
            self.output_layer = ColumnParallelLinear(
                config.hidden_size, config.vocab_size, bias=False,
                init_method=normal_init(config.init_method_std), params_dtype=config.params_dtype,
                device=device, sequence_parallel=sequence_parallel,
                skip_weight_param=self.tied and pre_process,
                gradient_accumulation_fusion=config.gradient_accumulation_fusion, tp=tp)
        if self.tied and pre_process:
            self.embedding.word_embeddings.weight.shared_embedding = True
        if self.tied and post_process and not pre_process:
            self.output_layer.weight.shared_embedding = True
        self.input_tensor: Optional[torch.Tensor] = None
        self._name_parameters()

    def _name_parameters(self) -> None:
        for name, param in self.named_parameters():
            parts = name.split(".")
            if parts[:2] == ["decoder", "layers"]:
                parts[2] = str(int(parts[2]) + self.layer_offset)
            param.global_name = (WORD_EMBEDDING_NAME if getattr(param, "shared_embedding", False)
                                 else ".".join(parts))

    def set_input_tensor(self, input_tensor: Optional[torch.Tensor]) -> None:
        """The activation received from the previous pipeline stage."""
        self.input_tensor = input_tensor

    def forward(self, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None,
                kv_cache: Optional[KVCache] = None,
                attention_mask: Optional[AttentionMask] = None) -> torch.Tensor:
        if kv_cache is not None:
            if not (self.pre_process and self.post_process) or self.sequence_parallel:
                raise ValueError("GPTModel: a KVCache needs the whole model in one chunk "
                                 "(pipeline parallel size 1) and no --sequence-parallel")
            if position_ids is None:
                b, s = tokens.shape
                start = kv_cache.sequence_offset
                position_ids = torch.arange(start, start + s, device=tokens.device).expand(b, s)
        x = self.embedding(tokens, position_ids) if self.pre_process else self.input_tensor
        rope = None
        if self.rotary_pos_emb is not None:
            tp = parallel_state.get_tensor_model_parallel_world_size()
            seq_length = x.shape[0] * (tp if self.sequence_parallel else 1)
            rope = self.rotary_pos_emb(seq_length, position_ids)
        x = self.decoder(x, rope, kv_cache, attention_mask)
        if kv_cache is not None:
            kv_cache.advance(tokens.shape[1])
        if not self.post_process:
            return x
        shared = self.embedding.word_embeddings.weight if self.tied and self.pre_process else None
        logits = self.output_layer(x, weight=shared)  # [s, b, V / tp]
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        return vocab_parallel_cross_entropy(logits, labels.t()).t().contiguous()


def flops_per_token(config: ModelConfig, training: bool = True) -> float:
    """Matmul FLOPs per token of the whole model (all TP/PP ranks together).

    Forward, per layer, with d the head dim, n heads and g query groups:
    2 * h * (n + 2g) * d for qkv, 2 * n * d * h for proj (4h^2 together when
    g = n and n * d = h), 2 * (2 or 3) * h * f for the MLP (SwiGLU has three
    matrices), 2 * 2 * s * n * d for q k^T and (attention) v, counted without
    the causal half-saving, as PaLM's MFU does; plus 2 * h * V for the logits.
    Training = forward + backward (2x forward); full recomputation adds one
    more forward of the layers (every layer under --recompute-method uniform;
    under block --recompute-num-layers layers, counted once as for a single
    pipeline chunk). Norms, softmax and
    elementwise ops are left out (a few percent).
    """
    h, f, s = config.hidden_size, config.ffn_hidden_size, config.seq_length
    mlp_matrices = 3 if config.activation == "swiglu" else 2
    attention = 2 * h * (config.qkv_size + config.query_projection_size)
    per_layer = attention + 2 * (mlp_matrices * h * f + 2 * s * config.query_projection_size)
    layers = config.num_layers * per_layer
    logits = 2 * h * config.vocab_size
    if not training:
        return float(layers + logits)
    recompute = 0
    if config.recompute_granularity == "full":
        recompute = layers
        if config.recompute_method == "block":
            recompute = min(config.recompute_num_layers or 1, config.num_layers) * per_layer
    return float(3 * (layers + logits) + recompute)
