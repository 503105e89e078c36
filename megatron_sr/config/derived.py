"""Config values computed from several flags: Megatron's rules for the sizes a
flag leaves unset, and its flags that count in another unit.

- `--swiglu` without `--ffn-hidden-size`: 4 x hidden x 2/3 rounded down to a
  multiple of 64 (the parameter count of a 4h GELU MLP).
- `--num-layers-per-virtual-pipeline-stage` -> virtual pipeline size
  (layers / pipeline size / layers per stage).
- `--group-query-attention` gates `--num-query-groups`.
- `--lr-*-samples` (with `--train-samples`) -> iterations, the nearest when not a
  multiple of the global batch size (with a notice): the schedule counts iterations.
- `--sequence-parallel` with TP 1 is ignored with a warning, as in Megatron.
- `--no-position-embedding` is accepted with `--position-embedding-type rope`
  only, as in Megatron (no model without position information is built).
The global batch size, its ramp and the run length are `batch_size`'s.

Each function reads parsed flags (an argparse Namespace whose Megatron aliases
`megatron_compat.apply_megatron_flags` has resolved) and raises ValueError naming
the flags at fault. The flags that are no config field, only read here, are
`DerivationFlags`.
"""
from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass
from typing import Optional

from megatron_sr.config.flags import flag
from megatron_sr.precision.strategies import PrecisionStrategy


@dataclass
class DerivationFlags:
    """Flags read only to derive a config field (never held by a config)."""

    num_layers_per_virtual_pipeline_stage: Optional[int] = flag(
        "--num-layers-per-virtual-pipeline-stage", group="distributed", default=None, minimum=1,
        help="Interleaved 1F1B: layers per model chunk; virtual stages = num layers / pipeline "
             "size / this.")
    squared_relu: bool = flag(
        "--squared-relu", group="network size", default=False,
        help="Squared-ReLU MLP (relu(x)^2) instead of GELU.")
    group_query_attention: bool = flag(
        "--group-query-attention", group="network size", default=False,
        help="Grouped-query attention: --num-query-groups key/value heads.")
    add_position_embedding: bool = flag(
        "--no-position-embedding", group="network size", default=True, action="store_false",
        help="Megatron's legacy switch: accepted with --position-embedding-type rope (which has "
             "no learned position table), refused otherwise.")
    lr_decay_samples: Optional[int] = flag(
        "--lr-decay-samples", group="learning rate", default=None, minimum=1,
        help="--lr-decay-iters in samples (with --train-samples).")
    lr_warmup_samples: Optional[int] = flag(
        "--lr-warmup-samples", group="learning rate", default=None, minimum=0,
        help="--lr-warmup-iters in samples (with --train-samples).")
    lr_wsd_decay_samples: Optional[int] = flag(
        "--lr-wsd-decay-samples", group="learning rate", default=None, minimum=1,
        help="--lr-wsd-decay-iters in samples (with --train-samples).")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_recompute(args: argparse.Namespace) -> None:
    if (args.recompute_method or args.recompute_num_layers) and \
            args.recompute_granularity != "full":
        raise ValueError("--recompute-method and --recompute-num-layers apply to "
                         "--recompute-granularity full only")


def check_position_embedding(args: argparse.Namespace) -> None:
    """--no-position-embedding restates rope (Megatron-LM refuses it with any
    other position embedding too): no model without position information is built."""
    if not args.add_position_embedding and args.position_embedding_type != "rope":
        raise ValueError(f"--no-position-embedding with --position-embedding-type "
                         f"{args.position_embedding_type}: megatron_sr builds no model without "
                         f"position information; give --position-embedding-type rope (where "
                         f"the flag only says there is no learned position table), or drop "
                         f"--no-position-embedding")


def check_gradient_accumulation_fusion(args: argparse.Namespace,
                                       strategy: PrecisionStrategy) -> bool:
    if args.gradient_accumulation_fusion and strategy.autocast:
        raise ValueError(f"--gradient-accumulation-fusion does not apply to --precision "
                         f"{strategy.name} (autocast computes the products in BF16 from FP32 "
                         f"weights): drop it, or use bf16-mixed")
    return args.gradient_accumulation_fusion


def derive_num_query_groups(args: argparse.Namespace) -> Optional[int]:
    if not args.group_query_attention:
        if args.num_query_groups is not None and args.num_query_groups != args.num_attention_heads:
            raise ValueError(f"--num-query-groups {args.num_query_groups} needs "
                             f"--group-query-attention")
        return None
    if args.num_query_groups is None:
        raise ValueError("--group-query-attention needs --num-query-groups")
    return args.num_query_groups


def derive_activation(args: argparse.Namespace) -> str:
    """The MLP activation: "gelu", "swiglu" (--swiglu) or "squared_relu" (--squared-relu)."""
    if not args.squared_relu:
        return args.activation
    if args.activation == "swiglu":
        raise ValueError("--squared-relu and --swiglu are exclusive: give one")
    return "squared_relu"


def derive_ffn_hidden_size(args: argparse.Namespace) -> int:
    if args.ffn_hidden_size is not None:
        return args.ffn_hidden_size
    if args.activation != "swiglu":
        return 4 * args.hidden_size
    size = int(4 * args.hidden_size * 2 / 3 / 64) * 64
    if size == 0:
        raise ValueError(f"--swiglu with --hidden-size {args.hidden_size} (< 48) gives no default "
                         f"MLP size (4h x 2/3 rounded down to a multiple of 64): give "
                         f"--ffn-hidden-size")
    return size


def derive_virtual_pipeline_size(args: argparse.Namespace) -> Optional[int]:
    per_stage = args.num_layers_per_virtual_pipeline_stage
    if per_stage is None:
        return None
    pp = args.pipeline_model_parallel_size
    if args.num_layers % (pp * per_stage) != 0:
        raise ValueError(f"--num-layers ({args.num_layers}) is not divisible by "
                         f"--pipeline-model-parallel-size ({pp}) x "
                         f"--num-layers-per-virtual-pipeline-stage ({per_stage})")
    return args.num_layers // pp // per_stage


def derive_sequence_parallel(args: argparse.Namespace) -> bool:
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        warnings.warn("--sequence-parallel has no effect with --tensor-model-parallel-size 1; "
                      "ignored", stacklevel=3)
        return False
    return args.sequence_parallel


def derive_iters_or_samples(args: argparse.Namespace, name: str, global_batch_size: int,
                      notices: Optional[list[str]] = None) -> Optional[int]:
    """The value of --<name>-iters, or --<name>-samples converted to iterations
    (rounded to the nearest when not a multiple of the global batch size, with
    a notice: the schedule counts iterations)."""
    iters, samples = getattr(args, name + "_iters"), getattr(args, name + "_samples")
    iters_flag, samples_flag = _flag(name + "_iters"), _flag(name + "_samples")
    if samples is None:
        return iters
    if args.train_samples is None:
        raise ValueError(f"{samples_flag} needs --train-samples; with --train-iters use {iters_flag}")
    if iters:  # --lr-warmup-iters defaults to 0, the others to None
        raise ValueError(f"{iters_flag} and {samples_flag} are exclusive: give one")
    iterations = round(samples / global_batch_size)
    if samples % global_batch_size != 0 and notices is not None:
        notices.append(f"[flags] {samples_flag} {samples} is not a multiple of --global-batch-size "
                       f"{global_batch_size}: the schedule counts iterations and uses "
                       f"{iterations} ({iterations * global_batch_size} samples)")
    return iterations
