"""ParallelConfig, each field with its flag, and the check that a model splits over a layout."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_sr.config.flags import check_fields, flag
from megatron_sr.config.model import ModelConfig


@dataclass
class ParallelConfig:
    """How the world is split. data_parallel_size is derived:
    world = tensor x pipeline x data. `virtual_pipeline_model_parallel_size` has
    no flag of its own: `megatron_sr.config.derived` computes it from
    --num-layers-per-virtual-pipeline-stage."""

    tensor_model_parallel_size: int = flag("--tensor-model-parallel-size", group="distributed",
                                           default=1)
    pipeline_model_parallel_size: int = flag("--pipeline-model-parallel-size",
                                             group="distributed", default=1)
    virtual_pipeline_model_parallel_size: Optional[int] = None
    sequence_parallel: bool = flag(
        "--sequence-parallel", group="distributed", default=False,
        help="Split norms and dropout along the sequence over the TP ranks.")
    use_distributed_optimizer: bool = flag(
        "--use-distributed-optimizer", group="distributed", default=False,
        help="Shard optimizer state over data-parallel ranks (ZeRO-1).")
    overlap_grad_reduce: bool = flag("--overlap-grad-reduce", group="distributed", default=False)
    overlap_param_gather: bool = flag("--overlap-param-gather", group="distributed",
                                      default=False, help="Needs --use-distributed-optimizer.")
    distributed_backend: Optional[str] = flag(
        "--distributed-backend", group="distributed", default=None, choices=("nccl", "gloo"),
        help="Default: nccl with CUDA, gloo without.")
    distributed_timeout_minutes: float = flag(
        "--distributed-timeout-minutes", group="distributed", default=10.0, interval="(0, inf)",
        help="A collective that waits longer fails the job.")

    def __post_init__(self):
        check_fields(self)


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
