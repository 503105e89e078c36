"""Megatron-LM's legacy checkpoint layout (`--ckpt-format torch`, megatron-core models).

What Megatron-LM writes and reads (checkpoint version 3.0):

    latest_checkpointed_iteration.txt
    iter_0000100/mp_rank_TT[_PPP]/model_optim_rng.pt
        {"args": argparse.Namespace, "checkpoint_version": 3.0, "iteration": int,
         "model": the GPTModel's state dict of this TP/PP rank, ...}

The model state dict uses megatron-core's names of the local (non
Transformer-Engine) spec, which are our global names except that layers are
numbered per pipeline stage (`decoder.layers.0` is the stage's first layer)
and the last stage's copy of a tied embedding is `output_layer.weight`. The
fused QKV rows are grouped per query group as (q, k, v): without grouped-query
attention that is our per-head (q, k, v). SwiGLU's fc1 is [gate; up] per TP
rank, as ours. Only the weights travel: a Megatron-LM run starts from an
exported checkpoint with `--finetune` (or `--no-load-optim --no-load-rng`),
and an imported one is a checkpoint of the same iteration without optimizer
state. Virtual pipeline stages (`model0`, `model1`, ...) and the pre-core
`language_model` layout are refused with a message.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import torch

from megatron_sr.config import ModelConfig
from megatron_sr.model.gpt_model import WORD_EMBEDDING_NAME
from megatron_sr.model.parallel_layout import chunk_layers
from megatron_sr.model.state_dict_layout import merge_state_dicts, split_state_dict

MEGATRON_CHECKPOINT_VERSION = 3.0
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _renumber(name: str, mapping: dict[int, int]) -> str:
    match = _LAYER.match(name)
    if match is None:
        return name
    return f"decoder.layers.{mapping[int(match.group(1))]}." + name[match.end():]


def _stage_layers(config: ModelConfig, pp: int, pp_rank: int) -> list[int]:
    return list(chunk_layers(config.num_layers, pp, None, pp_rank)[0])


def megatron_args(config: ModelConfig, description: dict, tp: int, pp: int,
                  iteration: int, consumed_train_samples: int) -> argparse.Namespace:
    """The `args` Namespace Megatron-LM stores and checks on load."""
    data = description.get("data", {})
    return argparse.Namespace(
        num_layers=config.num_layers, hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size, num_attention_heads=config.num_attention_heads,
        kv_channels=config.head_dim, group_query_attention=False,
        num_query_groups=config.num_attention_heads, seq_length=config.seq_length,
        max_position_embeddings=config.max_position_embeddings,
        position_embedding_type=config.position_embedding_type,
        add_position_embedding=config.position_embedding_type == "learned_absolute",
        rotary_base=config.rotary_base, normalization=config.normalization,
        norm_epsilon=config.layernorm_epsilon, swiglu=config.activation == "swiglu",
        add_bias_linear=config.add_bias_linear,
        untie_embeddings_and_output_weights=config.untie_embeddings_and_output_weights,
        hidden_dropout=config.hidden_dropout, attention_dropout=config.attention_dropout,
        init_method_std=config.init_method_std, padded_vocab_size=config.vocab_size,
        make_vocab_size_divisible_by=description.get("make_vocab_size_divisible_by", 1),
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=None,
        params_dtype=config.params_dtype, bf16=config.params_dtype == torch.bfloat16,
        fp16=False, tokenizer_type=data.get("tokenizer_type"), vocab_file=data.get("vocab_file"),
        merge_file=data.get("merge_file"), tokenizer_model=data.get("tokenizer_model"),
        vocab_size=data.get("vocab_size"), iteration=iteration,
        consumed_train_samples=consumed_train_samples, use_legacy_models=False,
        transformer_impl="local", ckpt_format="torch")


def export_megatron_lm(model: dict[str, torch.Tensor], config: ModelConfig, description: dict,
                       iteration: int, consumed_train_samples: int, save_dir: str, tp: int,
                       pp: int) -> str:
    """Writes the full state dict `model` as a Megatron-LM legacy checkpoint of
    `iteration` at TP `tp` x PP `pp` into `save_dir` (tracker included).
    Returns the iteration directory."""
    ranks = split_state_dict(model, config, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    args = megatron_args(config, description, tp, pp, iteration, consumed_train_samples)
    directory = os.path.join(save_dir, f"iter_{iteration:07d}")
    for (tp_rank, pp_rank), state in sorted(ranks.items()):
        mapping = {g: i for i, g in enumerate(_stage_layers(config, pp, pp_rank))}
        stage = {}
        for name, tensor in state.items():
            if name == WORD_EMBEDDING_NAME and pp_rank == pp - 1 and pp > 1:
                name = "output_layer.weight"  # the last stage's copy of the tied embedding
            stage[_renumber(name, mapping)] = tensor
        rank_dir = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
        os.makedirs(os.path.join(directory, rank_dir))
        torch.save({"args": args, "checkpoint_version": MEGATRON_CHECKPOINT_VERSION,
                    "iteration": iteration, "model": stage,
                    "num_floating_point_operations_so_far": 0},
                   os.path.join(directory, rank_dir, "model_optim_rng.pt"))
    with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(f"{iteration}\n")
    return directory


def _read(path: str) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def model_config_from_megatron_args(args: argparse.Namespace) -> ModelConfig:
    """Our ModelConfig from a Megatron-LM checkpoint's args; ValueError naming
    the Megatron flag we cannot express."""
    if getattr(args, "group_query_attention", False) and \
            args.num_query_groups != args.num_attention_heads:
        raise ValueError(f"the Megatron-LM checkpoint uses --group-query-attention "
                         f"(--num-query-groups {args.num_query_groups}): not supported")
    kv = getattr(args, "kv_channels", None)
    if kv and kv * args.num_attention_heads != args.hidden_size:
        raise ValueError(f"the Megatron-LM checkpoint has --kv-channels {kv} != hidden size / "
                         f"heads: not supported")
    dtype = args.params_dtype if isinstance(getattr(args, "params_dtype", None), torch.dtype) \
        else (torch.bfloat16 if getattr(args, "bf16", False) else torch.float32)
    return ModelConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads, vocab_size=args.padded_vocab_size,
        seq_length=args.seq_length, ffn_hidden_size=args.ffn_hidden_size,
        max_position_embeddings=args.max_position_embeddings,
        position_embedding_type=getattr(args, "position_embedding_type", "learned_absolute"),
        rotary_base=float(getattr(args, "rotary_base", 10000)),
        normalization=getattr(args, "normalization", "LayerNorm"),
        layernorm_epsilon=getattr(args, "norm_epsilon", 1e-5),
        activation="swiglu" if getattr(args, "swiglu", False) else "gelu",
        add_bias_linear=getattr(args, "add_bias_linear", True),
        untie_embeddings_and_output_weights=getattr(args, "untie_embeddings_and_output_weights",
                                                    False),
        hidden_dropout=getattr(args, "hidden_dropout", 0.1),
        attention_dropout=getattr(args, "attention_dropout", 0.1),
        init_method_std=getattr(args, "init_method_std", 0.02), params_dtype=dtype)


def import_megatron_lm(path: str) -> tuple[argparse.Namespace, ModelConfig, int,
                                           dict[str, torch.Tensor]]:
    """Reads a Megatron-LM legacy checkpoint (a --save directory or an
    iter_XXXXXXX directory): (args, ModelConfig, iteration, full state dict).
    ValueError naming the file or the unsupported layout; CheckpointError on a
    tracker that holds neither an iteration number nor "release"."""
    from megatron_sr.checkpointing import read_tracker_value

    tracker = os.path.join(path, "latest_checkpointed_iteration.txt")
    if os.path.isfile(tracker):
        value = read_tracker_value(tracker, allow_release=True)
        path = os.path.join(path, "release" if value == "release" else f"iter_{value:07d}")
    rank_dirs = sorted(d for d in (os.listdir(path) if os.path.isdir(path) else [])
                       if d.startswith("mp_rank_"))
    if not rank_dirs:
        raise ValueError(f"{path} holds no Megatron-LM mp_rank_* directories")
    first = _read(os.path.join(path, rank_dirs[0], "model_optim_rng.pt"))
    args = first["args"]
    if "model" not in first:
        raise ValueError(f"{path}: no 'model' entry (virtual pipeline stages 'model0', ... are "
                         f"not supported)")
    if any(k.startswith("language_model") for k in first["model"]):
        raise ValueError(f"{path}: the pre-megatron-core 'language_model' layout "
                         f"(--use-legacy-models) is not supported")
    config = model_config_from_megatron_args(args)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    ranks: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for tp_rank in range(tp):
        for pp_rank in range(pp):
            rank_dir = f"mp_rank_{tp_rank:02d}" if pp == 1 else \
                f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
            file = os.path.join(path, rank_dir, "model_optim_rng.pt")
            if not os.path.isfile(file):
                raise ValueError(f"{file} is missing (TP={tp} x PP={pp} checkpoint)")
            state = _read(file)["model"]
            mapping = dict(enumerate(_stage_layers(config, pp, pp_rank)))
            renamed = {}
            for name, tensor in state.items():
                if name.endswith("_extra_state"):
                    continue
                if (name == "output_layer.weight" and pp > 1 and pp_rank == pp - 1
                        and not config.untie_embeddings_and_output_weights):
                    name = WORD_EMBEDDING_NAME
                renamed[_renumber(name, mapping)] = tensor
            ranks[(tp_rank, pp_rank)] = renamed
    return args, config, int(first["iteration"]), merge_state_dicts(ranks, config)


def description_from_megatron_args(args: argparse.Namespace, config: ModelConfig) -> dict:
    """Our checkpoint "args" (`checkpointing.job_description`'s shape) for an
    imported Megatron-LM checkpoint."""
    from megatron_sr.checkpointing.description import plain_data as _plain
    from megatron_sr.config import DataConfig, OptimizerConfig, ParallelConfig

    tokenizer_type = getattr(args, "tokenizer_type", None) or "NullTokenizer"
    data = DataConfig(tokenizer_type=tokenizer_type, vocab_file=getattr(args, "vocab_file", None),
                      merge_file=getattr(args, "merge_file", None),
                      tokenizer_model=getattr(args, "tokenizer_model", None),
                      vocab_size=getattr(args, "vocab_size", None), seq_length=config.seq_length)
    return _plain({"model": dataclasses.asdict(config),
                   "parallel": dataclasses.asdict(ParallelConfig(
                       tensor_model_parallel_size=args.tensor_model_parallel_size,
                       pipeline_model_parallel_size=args.pipeline_model_parallel_size)),
                   "optimizer": dataclasses.asdict(OptimizerConfig()),
                   "data": dataclasses.asdict(data), "unpadded_vocab_size": None,
                   "imported_from": {"megatron_lm": True}})


def consumed_samples(args: argparse.Namespace) -> int:
    return int(getattr(args, "consumed_train_samples", 0) or 0)

