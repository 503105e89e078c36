"""ModelConfig: shape and numerics of the GPT, each field with its flag.

Field names follow Megatron-LM's flag names (``--num-layers`` -> ``num_layers``)
so a reader of either code base finds their way in the other. Fields without a
flag are derived: `vocab_size` from the tokenizer (`JobConfig.with_vocab_size`),
`params_dtype` from --precision (`megatron_sr.config.arguments`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_sr.config.flags import check_fields, flag

NORMALIZATIONS = ("LayerNorm", "RMSNorm")


def normalization_name(name: str) -> str:
    """--normalization's canonical spelling of `name`, matched in any case
    (Megatron-DeepSpeed scripts write rmsnorm, layernorm); an unknown name is
    returned as it is, for the parser's list of choices to refuse."""
    return {known.lower(): known for known in NORMALIZATIONS}.get(name.lower(), name)


@dataclass
class ModelConfig:
    """Shape and numerics of the GPT. `vocab_size` is the padded size the
    embedding is built with (divisible by the TP size)."""

    num_layers: int = flag("--num-layers", group="network size", required=True, minimum=1,
                           help="Number of transformer layers (required).")
    hidden_size: int = flag("--hidden-size", group="network size", required=True, minimum=1,
                            help="Transformer hidden size (required).")
    num_attention_heads: int = flag("--num-attention-heads", group="network size", required=True,
                                    minimum=1, help="Attention heads (required).")
    vocab_size: int  # no flag: the tokenizer's, padded (0 until it is known)
    seq_length: int = flag("--seq-length", group="data", required=True, minimum=1,
                           help="Tokens per sample (required).")
    ffn_hidden_size: Optional[int] = flag(
        "--ffn-hidden-size", group="network size", default=None, minimum=1,
        help="MLP hidden size. Default 4 x hidden size; with --swiglu, 4 x hidden size x 2/3 "
             "rounded down to a multiple of 64.")
    max_position_embeddings: Optional[int] = flag(
        "--max-position-embeddings", group="network size", default=None, minimum=1,
        help="Learned position table size. Default --seq-length.")
    position_embedding_type: str = flag("--position-embedding-type", group="network size",
                                        default="learned_absolute",
                                        choices=("learned_absolute", "rope"))
    rotary_base: float = flag("--rotary-base", group="network size", default=10000.0,
                              interval="(0, inf)",
                              help="Base of the rotary frequencies (rope only).")
    normalization: str = flag("--normalization", group="network size", default="LayerNorm",
                              choices=NORMALIZATIONS, type=normalization_name,
                              help="The norms' kind, in any case (rmsnorm is RMSNorm).")
    layernorm_epsilon: float = flag("--norm-epsilon", group="network size", default=1e-5,
                                    interval="(0, inf)", help="Epsilon of the norms.")
    activation: str = flag("--swiglu", group="network size", default="gelu",
                           action="store_const", const="swiglu",
                           help="SwiGLU MLP instead of GELU.")
    add_bias_linear: bool = flag("--disable-bias-linear", group="network size", default=True,
                                 action="store_false", help="No biases in the linear layers.")
    add_qkv_bias: bool = flag("--add-qkv-bias", group="network size", default=False,
                              help="A bias on the query/key/value projection even with "
                                   "--disable-bias-linear (Qwen-style attention).")
    untie_embeddings_and_output_weights: bool = flag(
        "--untie-embeddings-and-output-weights", group="network size", default=False,
        help="Separate input embedding and output layer weights.")
    hidden_dropout: float = flag("--hidden-dropout", group="regularization", default=0.1,
                                 interval="[0, 1)")
    attention_dropout: float = flag("--attention-dropout", group="regularization", default=0.1,
                                    interval="[0, 1)")
    init_method_std: float = flag("--init-method-std", group="initialization", default=0.02,
                                  interval="(0, inf)",
                                  help="Standard deviation of the normal weight init.")
    params_dtype: torch.dtype = torch.bfloat16  # no flag: the --precision strategy's
    recompute_granularity: Optional[str] = flag(
        "--recompute-granularity", group="training", default=None, choices=("full", "selective"),
        help="Activation recomputation: whole layers, or the attention core.")
    # "full" only: "uniform" checkpoints groups of recompute_num_layers layers,
    # "block" the first recompute_num_layers layers of each chunk (None: uniform, 1).
    recompute_method: Optional[str] = flag(
        "--recompute-method", group="training", default=None, choices=("uniform", "block"),
        help="With --recompute-granularity full: checkpoint groups of --recompute-num-layers "
             "layers (uniform, default) or only the first --recompute-num-layers layers of each "
             "pipeline chunk (block).")
    recompute_num_layers: Optional[int] = flag(
        "--recompute-num-layers", group="training", default=None, minimum=1,
        help="Layers per group (uniform) or recomputed layers per chunk (block); default 1.")
    # Grouped-query attention: key/value heads (None: one per query head).
    num_query_groups: Optional[int] = flag(
        "--num-query-groups", group="network size", default=None, minimum=1,
        help="Key/value heads with --group-query-attention (1: multi-query).")
    kv_channels: Optional[int] = flag(
        "--kv-channels", group="network size", default=None, minimum=1,
        help="Head dimension. Default --hidden-size / --num-attention-heads.")
    rotary_percent: float = flag("--rotary-percent", group="network size", default=1.0,
                                 interval="(0, 1]",
                                 help="Fraction of each head's features RoPE rotates, in (0, 1].")
    rotary_interleaved: bool = flag(
        "--rotary-interleaved", group="network size", default=False,
        help="RoPE rotates (even, odd) feature pairs instead of the two halves.")
    use_rope_scaling: bool = flag("--use-rope-scaling", group="network size", default=False,
                                  help="Llama-3.x RoPE frequency scaling (original context 8192).")
    rope_scaling_factor: float = flag("--rope-scaling-factor", group="network size", default=8.0,
                                      interval="(0, inf)", help="Factor of --use-rope-scaling.")
    qk_layernorm: bool = flag("--qk-layernorm", group="network size", default=False,
                              help="Normalize each head's queries and keys (--normalization's "
                                   "kind).")
    apply_layernorm_1p: bool = flag("--apply-layernorm-1p", group="network size", default=False,
                                    help="Norm weights are stored as gamma - 1 (initialized to 0).")
    # Linear layers add their weight gradients into main_grad in the wgrad GEMM
    # (megatron_sr.tensor_parallel.grad_accumulation_fusion).
    gradient_accumulation_fusion: bool = flag(
        "--gradient-accumulation-fusion", group="training", default=False,
        negative="--no-gradient-accumulation-fusion",
        negative_help="Megatron's flag: the default here.",
        help="The linear layers' wgrad GEMMs add into the gradient buffer directly (one BF16 "
             "rounding per micro-batch instead of two; with an FP32 buffer the product is not "
             "rounded to BF16: on a GPU this needs apex), saving a weight-sized write and read "
             "per weight and micro-batch. Off by default (Megatron-LM's default is on): it "
             "changes the bits of bf16-mixed runs and of runs with several micro-batches per "
             "step. Not with amp.")

    def __post_init__(self):
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        check_fields(self)

    @property
    def head_dim(self) -> int:
        """--kv-channels, default hidden_size / num_attention_heads."""
        if self.kv_channels is not None:
            return self.kv_channels
        return self.hidden_size // self.num_attention_heads

    @property
    def query_projection_size(self) -> int:
        """Features of all query heads together (= hidden_size unless --kv-channels differs)."""
        return self.num_attention_heads * self.head_dim

    @property
    def qkv_size(self) -> int:
        """Output features of linear_qkv: queries, then one key and one value per group."""
        return (self.num_attention_heads + 2 * self.num_query_groups) * self.head_dim

    @property
    def qkv_bias(self) -> bool:
        """linear_qkv has a bias: every linear has one, or --add-qkv-bias."""
        return self.add_bias_linear or self.add_qkv_bias

    @property
    def rotary_dim(self) -> int:
        """Features per head that RoPE rotates (the first ones; the rest pass through)."""
        return int(self.head_dim * self.rotary_percent)
