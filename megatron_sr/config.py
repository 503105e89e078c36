"""Typed configurations, passed explicitly to the parts that use them.

`megatron_sr.arguments` parses Megatron-style flags into these; tests and
library users build them directly. Field names follow Megatron-LM's flag
names (``--num-layers`` -> ``num_layers``) so a reader of either code base
finds their way in the other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class ModelConfig:
    """Shape and numerics of the GPT. `vocab_size` is the padded size the
    embedding is built with (divisible by the TP size)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    seq_length: int
    ffn_hidden_size: Optional[int] = None  # default 4 * hidden_size (SwiGLU: as given)
    max_position_embeddings: Optional[int] = None  # default seq_length
    position_embedding_type: str = "learned_absolute"  # or "rope"
    rotary_base: float = 10000.0
    normalization: str = "LayerNorm"  # or "RMSNorm"
    layernorm_epsilon: float = 1e-5
    activation: str = "gelu"  # or "swiglu", "squared_relu"
    add_bias_linear: bool = True
    untie_embeddings_and_output_weights: bool = False
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    params_dtype: torch.dtype = torch.bfloat16
    recompute_granularity: Optional[str] = None  # None, "full" or "selective"
    # "full" only: "uniform" checkpoints groups of recompute_num_layers layers,
    # "block" the first recompute_num_layers layers of each chunk (None: uniform, 1).
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    # Grouped-query attention: key/value heads (None: one per query head).
    num_query_groups: Optional[int] = None
    kv_channels: Optional[int] = None  # head dimension (`head_dim`); None: hidden / heads
    rotary_percent: float = 1.0  # fraction of each head's features RoPE rotates
    rotary_interleaved: bool = False  # rotate (even, odd) feature pairs instead of halves
    use_rope_scaling: bool = False  # Llama-3.x frequency scaling (original context 8192)
    rope_scaling_factor: float = 8.0
    qk_layernorm: bool = False  # a norm over each head's q and k features
    apply_layernorm_1p: bool = False  # norms hold gamma - 1 (zero-centered), compute with gamma
    # Linear layers add their weight gradients into main_grad in the wgrad GEMM
    # (megatron_sr.tensor_parallel.grad_accumulation_fusion).
    gradient_accumulation_fusion: bool = False

    def __post_init__(self):
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads

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
    def rotary_dim(self) -> int:
        """Features per head that RoPE rotates (the first ones; the rest pass through)."""
        return int(self.head_dim * self.rotary_percent)


@dataclass
class ParallelConfig:
    """How the world is split. data_parallel_size is derived:
    world = tensor x pipeline x data."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    distributed_backend: Optional[str] = None  # None: nccl with CUDA, else gloo
    distributed_timeout_minutes: float = 10.0


@dataclass
class OptimizerConfig:
    """AdamW, the precision strategy, LR schedule and gradient handling."""

    precision: str = "bf16-sr"
    optimizer_state_dtype: Optional[str] = None  # None: the strategy's default
    grad_reduce_dtype: Optional[str] = None  # None: the strategy's grad dtype
    grad_accumulation_rounding: str = "nearest"  # or "stochastic" (bf16 grad buffers only)
    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_decay_style: str = "linear"  # constant, linear, cosine, WSD
    lr_decay_iters: Optional[int] = None
    lr_warmup_iters: int = 0
    lr_warmup_fraction: Optional[float] = None
    lr_wsd_decay_iters: Optional[int] = None
    lr_wsd_decay_style: str = "linear"  # linear, cosine, exponential, minus_sqrt
    lr_warmup_init: float = 0.0  # warmup starts here and rises linearly to lr
    # On resume, a schedule that differs from the checkpoint's is an error unless one
    # side is chosen: the flags (override) or the checkpoint (use_checkpoint).
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False
    # The word embedding and output layer follow the same schedule shape between
    # these (Megatron's --decoupled-lr / --decoupled-min-lr); None: lr / min_lr.
    decoupled_lr: Optional[float] = None
    decoupled_min_lr: Optional[float] = None


@dataclass
class DataConfig:
    """Where samples come from. `data_path` is Megatron's list: prefixes,
    optionally each preceded by a weight."""

    data_path: list[str] = field(default_factory=list)
    split: str = "969,30,1"
    data_cache_path: Optional[str] = None
    mock_data: bool = False
    tokenizer_type: str = "GPT2BPETokenizer"
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    tokenizer_model: Optional[str] = None
    vocab_size: Optional[int] = None  # NullTokenizer only
    tiktoken_pattern: str = "v2"
    tiktoken_num_special_tokens: int = 1000
    seq_length: int = 1024
    num_workers: int = 0
    # Document-aware batches (eod = the tokenizer's end-of-document id):
    eod_mask_loss: bool = False  # no loss where the input token is eod
    reset_position_ids: bool = False  # positions restart after each eod
    reset_attention_mask: bool = False  # attention stays within a document


@dataclass
class TrainingConfig:
    """The loop: batch sizes, length, evaluation, logging, checkpoints."""

    micro_batch_size: int = 1
    global_batch_size: Optional[int] = None  # default micro x data-parallel size
    train_iters: Optional[int] = None  # from --train-samples: train_samples // global_batch_size
    train_samples: Optional[int] = None
    eval_interval: int = 1000
    eval_iters: int = 100
    log_interval: int = 100
    exit_interval: Optional[int] = None
    exit_duration_in_mins: Optional[float] = None
    seed: int = 1234
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None
    no_load_optim: bool = False
    no_load_rng: bool = False
    finetune: bool = False
    override_existing_checkpoints: bool = False  # --save may hold another run's checkpoints
    ckpt_format: str = "torch_dist"  # or "torch" (legacy per-rank files)
    async_save: bool = False  # torch_dist only: write in the background
    tensorboard_dir: Optional[str] = None
    max_skipped_iterations: int = 10
    # (start, increment, samples): the global batch grows from start by increment
    # up to global_batch_size over the first `samples` samples (Megatron's ramp-up).
    rampup_batch_size: Optional[tuple[int, int, int]] = None
    # ((first sample, global batch size), ...), first samples strictly increasing from 0:
    # the step's global batch is that of the last entry whose first sample has been
    # consumed (--step-batch-size-schedule, its token thresholds divided by the sequence
    # length); global_batch_size is then the largest of them.
    step_batch_size_schedule: Optional[tuple[tuple[int, int], ...]] = None
    calculate_per_token_loss: bool = False
    log_timers_to_tensorboard: bool = False
    wandb_project: Optional[str] = None
    wandb_exp_name: Optional[str] = None
    wandb_save_dir: Optional[str] = None
    profile: bool = False
    profile_step_start: int = 10
    profile_step_end: int = 12
    profile_ranks: tuple[int, ...] = (0,)
    exit_signal: str = "SIGTERM"  # also saves and exits, besides SIGTERM
    # Every this many iterations, check that DP and TP replicas are bitwise equal
    # (megatron_sr.replica_check); None: never.
    check_weight_hash_interval: Optional[int] = None


def global_batch_size_at(training: TrainingConfig, consumed_samples: int) -> int:
    """The global batch size of the step that starts after `consumed_samples`
    samples: --global-batch-size, or under --rampup-batch-size START INCREMENT
    SAMPLES Megatron's ramp: START + INCREMENT x (consumed_samples //
    (SAMPLES / number of increments)), at most --global-batch-size; under
    --step-batch-size-schedule the batch size of the last entry whose first
    sample is <= `consumed_samples`."""
    if training.step_batch_size_schedule is not None:
        size = training.step_batch_size_schedule[0][1]
        for first_sample, batch_size in training.step_batch_size_schedule:
            if first_sample > consumed_samples:
                break
            size = batch_size
        return size
    if training.rampup_batch_size is None:
        return training.global_batch_size
    start, increment, samples = training.rampup_batch_size
    increments = (training.global_batch_size - start) // increment
    if increments == 0 or consumed_samples > samples:
        return training.global_batch_size
    per_increment = samples / increments
    return min(training.global_batch_size, start + increment * int(consumed_samples / per_increment))


def validate_parallel_layout(model: ModelConfig, parallel: ParallelConfig, world_size: int,
                             num_microbatches: Optional[int] = None) -> int:
    """Checks that the model splits over the layout; returns the data-parallel size.

    Raises ValueError naming the flags at fault. Shared by `pretrain_gpt.py`'s
    argument validation, the model builder and `tools/estimate.py`, so every
    entry point gives the same message for the same mistake.
    `num_microbatches` (per data-parallel rank, per step) is checked when given.
    """
    tp = parallel.tensor_model_parallel_size
    pp = parallel.pipeline_model_parallel_size
    vp = parallel.virtual_pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise ValueError(f"--tensor-model-parallel-size ({tp}) and --pipeline-model-parallel-size "
                         f"({pp}) must be >= 1")
    if world_size % (tp * pp) != 0:
        raise ValueError(
            f"world size ({world_size}) is not divisible by --tensor-model-parallel-size ({tp}) "
            f"x --pipeline-model-parallel-size ({pp})")
    if model.kv_channels is None and model.hidden_size % model.num_attention_heads != 0:
        raise ValueError(f"--hidden-size ({model.hidden_size}) is not divisible by "
                         f"--num-attention-heads ({model.num_attention_heads}); or give "
                         f"--kv-channels (the head dimension)")
    if model.num_attention_heads % tp != 0:
        raise ValueError(f"--num-attention-heads ({model.num_attention_heads}) is not divisible by "
                         f"--tensor-model-parallel-size ({tp})")
    if model.num_attention_heads % model.num_query_groups != 0:
        raise ValueError(f"--num-attention-heads ({model.num_attention_heads}) is not divisible by "
                         f"--num-query-groups ({model.num_query_groups})")
    if model.num_query_groups % tp != 0:
        raise ValueError(f"--num-query-groups ({model.num_query_groups}) is not divisible by "
                         f"--tensor-model-parallel-size ({tp}): TP splits the key/value groups")
    if model.ffn_hidden_size % tp != 0:
        raise ValueError(f"--ffn-hidden-size ({model.ffn_hidden_size}) is not divisible by "
                         f"--tensor-model-parallel-size ({tp})")
    if model.vocab_size % tp != 0:
        raise ValueError(f"padded vocab size ({model.vocab_size}) is not divisible by "
                         f"--tensor-model-parallel-size ({tp})")
    if model.position_embedding_type == "rope" and (model.rotary_dim % 2 != 0
                                                    or model.rotary_dim < 2):
        raise ValueError(f"--position-embedding-type rope needs an even number (>= 2) of rotated "
                         f"features per head: head dimension {model.head_dim} (--kv-channels, "
                         f"default --hidden-size / --num-attention-heads) x --rotary-percent "
                         f"{model.rotary_percent} gives {model.rotary_dim}")
    if vp is None:
        if model.num_layers % pp != 0:
            raise ValueError(f"--num-layers ({model.num_layers}) is not divisible by "
                             f"--pipeline-model-parallel-size ({pp})")
    else:
        if pp < 2:
            raise ValueError("--num-layers-per-virtual-pipeline-stage needs "
                             "--pipeline-model-parallel-size > 1")
        if model.num_layers % (pp * vp) != 0:
            raise ValueError(
                f"--num-layers ({model.num_layers}) is not divisible by --pipeline-model-parallel-size "
                f"({pp}) x virtual stages ({vp})")
        if num_microbatches is not None and num_microbatches % pp != 0:
            raise ValueError(
                f"interleaved pipelining needs the number of micro-batches per step "
                f"({num_microbatches} = --global-batch-size / (--micro-batch-size x data-parallel "
                f"size)) to be a multiple of --pipeline-model-parallel-size ({pp})")
    if parallel.sequence_parallel and model.seq_length % tp != 0:
        raise ValueError(f"--sequence-parallel needs --seq-length ({model.seq_length}) divisible by "
                         f"--tensor-model-parallel-size ({tp})")
    if parallel.overlap_param_gather and not parallel.use_distributed_optimizer:
        raise ValueError("--overlap-param-gather needs --use-distributed-optimizer")
    return world_size // (tp * pp)
