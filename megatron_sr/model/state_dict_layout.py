"""Offline reshaping of a GPT's weights between TP/PP layouts, without process groups.

Two forms of the same weights, both keyed by global parameter names (the
`global_name` of `megatron_sr.model.named_parameters_global`):

- the FULL state dict: one dict, every parameter unsharded, as a TP=1, PP=1
  model holds it (`global_parameter_names(config)` lists its keys in model
  order; a tied model has no "output_layer.weight");
- RANK state dicts: {(tp_rank, pp_rank): dict}, what the rank with those
  coordinates holds: the parameters of its chunks (all its virtual stages in
  one dict), each sliced to its TP shard. With tied embeddings and PP > 1 the
  last stage also holds its copy of "embedding.word_embeddings.weight" (the
  output layer's weight), under that name.

`split_state_dict` and `merge_state_dicts` convert between the two; both only
slice and concatenate, so full -> ranks -> full is bit-exact at any layout.
Which dim a parameter is split along follows the TP layers
(`megatron_sr.tensor_parallel`): `tensor_parallel_split(name, config)`; a test
checks it against the parameters `build_model` creates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from megatron_sr.config import ModelConfig, ParallelConfig, validate_parallel_layout
from megatron_sr.model.gpt_model import WORD_EMBEDDING_NAME
from megatron_sr.model.parallel_layout import chunk_layers
from megatron_sr.tensor_parallel import full_tensor_from_shards, shard_full_tensor

RankStateDicts = dict[tuple[int, int], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class TensorParallelSplit:
    """How a TP-sharded parameter is sliced; carries the attribute names that
    `shard_full_tensor` and `full_tensor_from_shards` read from a parameter."""

    partition_dim: int
    partition_stride: int = 1
    tensor_model_parallel: bool = True


def _layer_parameter_names(config: ModelConfig, layer: int) -> list[str]:
    norm_names = ["weight", "bias"] if config.normalization == "LayerNorm" else ["weight"]
    linear_names = ["weight", "bias"] if config.add_bias_linear else ["weight"]
    prefix = f"decoder.layers.{layer}."
    names = [f"{prefix}input_layernorm.{n}" for n in norm_names]
    names += [f"{prefix}self_attention.linear_qkv.{n}" for n in linear_names]
    names += [f"{prefix}self_attention.linear_proj.{n}" for n in linear_names]
    if config.qk_layernorm:
        names += [f"{prefix}self_attention.{which}.{n}" for which in ("q_layernorm", "k_layernorm")
                  for n in norm_names]
    names += [f"{prefix}pre_mlp_layernorm.{n}" for n in norm_names]
    names += [f"{prefix}mlp.linear_fc1.{n}" for n in linear_names]
    names += [f"{prefix}mlp.linear_fc2.{n}" for n in linear_names]
    return names


def _embedding_names(config: ModelConfig) -> list[str]:
    names = [WORD_EMBEDDING_NAME]
    if config.position_embedding_type == "learned_absolute":
        names.append("embedding.position_embeddings.weight")
    return names


def _final_names(config: ModelConfig) -> list[str]:
    norm_names = ["weight", "bias"] if config.normalization == "LayerNorm" else ["weight"]
    return [f"decoder.final_layernorm.{n}" for n in norm_names]


def global_parameter_names(config: ModelConfig) -> list[str]:
    """Keys of the full state dict of `config`'s model, in model order."""
    names = _embedding_names(config)
    for layer in range(config.num_layers):
        names += _layer_parameter_names(config, layer)
    names += _final_names(config)
    if config.untie_embeddings_and_output_weights:
        names.append("output_layer.weight")
    return names


def pipeline_rank_parameter_names(config: ModelConfig, pipeline_size: int,
                                  virtual_size: Optional[int], pipeline_rank: int) -> list[str]:
    """Keys of the state dict of pipeline rank `pipeline_rank` (every TP rank
    of a stage holds the same names)."""
    last = pipeline_rank == pipeline_size - 1
    names = _embedding_names(config) if pipeline_rank == 0 else []
    for layers in chunk_layers(config.num_layers, pipeline_size, virtual_size, pipeline_rank):
        for layer in layers:
            names += _layer_parameter_names(config, layer)
    if last:
        names += _final_names(config)
        if config.untie_embeddings_and_output_weights:
            names.append("output_layer.weight")
        elif pipeline_size > 1:
            names.append(WORD_EMBEDDING_NAME)  # the last stage's copy of the tied embedding
    return names


def tensor_parallel_split(name: str, config: ModelConfig) -> Optional[TensorParallelSplit]:
    """How parameter `name` is sliced over TP ranks; None: replicated."""
    stride = 2 if config.activation == "swiglu" else 1
    if name in (WORD_EMBEDDING_NAME, "output_layer.weight"):
        return TensorParallelSplit(partition_dim=0)
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        return TensorParallelSplit(partition_dim=0)
    if name.endswith(("linear_fc1.weight", "linear_fc1.bias")):
        return TensorParallelSplit(partition_dim=0, partition_stride=stride)
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return TensorParallelSplit(partition_dim=1)
    return None


def check_parameter_names(what: str, have, expected) -> None:
    """Raises ValueError naming `what` and the missing and unexpected names."""
    missing = [n for n in expected if n not in have]
    unexpected = [n for n in have if n not in set(expected)]
    if missing or unexpected:
        raise ValueError(f"{what} does not match the model config: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")


def split_state_dict(full_state: Mapping[str, torch.Tensor], config: ModelConfig, *,
                     tensor_parallel_size: int, pipeline_parallel_size: int,
                     virtual_pipeline_parallel_size: Optional[int] = None) -> RankStateDicts:
    """The rank state dicts of the layout, from the full state dict.

    Raises ValueError naming the flags when the model does not split over the
    layout, or listing the names when `full_state` is not this config's model.
    Every returned tensor owns its storage (saving one does not save the full
    tensor) and keeps the input's dtype.
    """
    tp, pp, vp = tensor_parallel_size, pipeline_parallel_size, virtual_pipeline_parallel_size
    validate_parallel_layout(config, ParallelConfig(tensor_model_parallel_size=tp,
                                                    pipeline_model_parallel_size=pp,
                                                    virtual_pipeline_model_parallel_size=vp),
                             world_size=tp * pp)
    check_parameter_names("full state dict", list(full_state), global_parameter_names(config))
    ranks: RankStateDicts = {}
    for pp_rank in range(pp):
        names = pipeline_rank_parameter_names(config, pp, vp, pp_rank)
        for tp_rank in range(tp):
            ranks[(tp_rank, pp_rank)] = {
                name: _shard(full_state[name], tensor_parallel_split(name, config), tp_rank, tp)
                for name in names}
    return ranks


def _shard(full: torch.Tensor, split: Optional[TensorParallelSplit], tp_rank: int,
           tp: int) -> torch.Tensor:
    if split is None:
        return full.clone()
    return shard_full_tensor(full, split, tp_rank, tp).clone()


def merge_state_dicts(rank_states: Mapping[tuple[int, int], Mapping[str, torch.Tensor]],
                      config: ModelConfig, *,
                      virtual_pipeline_parallel_size: Optional[int] = None
                      ) -> dict[str, torch.Tensor]:
    """The full state dict from the rank state dicts of one layout.

    The TP and PP sizes are read from the keys, which must cover the whole
    grid (tp_rank, pp_rank); `virtual_pipeline_parallel_size` must be the one
    the ranks were built with. Replicated parameters are taken from TP rank 0
    and the tied embedding from the first stage (training keeps the copies
    bit-identical). Raises ValueError naming the missing ranks or parameters.
    """
    tp = 1 + max(tp_rank for tp_rank, _ in rank_states)
    pp = 1 + max(pp_rank for _, pp_rank in rank_states)
    missing_ranks = [(t, p) for t in range(tp) for p in range(pp) if (t, p) not in rank_states]
    if missing_ranks:
        raise ValueError(f"merge_state_dicts: no state dict for (tp_rank, pp_rank) "
                         f"{missing_ranks} of a TP={tp} x PP={pp} layout")
    validate_parallel_layout(config, ParallelConfig(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=virtual_pipeline_parallel_size), world_size=tp * pp)
    merged: dict[str, torch.Tensor] = {}
    for pp_rank in range(pp):
        names = pipeline_rank_parameter_names(config, pp, virtual_pipeline_parallel_size, pp_rank)
        for tp_rank in range(tp):
            check_parameter_names(f"state dict of (tp_rank, pp_rank) = ({tp_rank}, {pp_rank})",
                         list(rank_states[(tp_rank, pp_rank)]), names)
        for name in names:
            if name in merged:  # the last stage's copy of the tied embedding
                continue
            shards = [rank_states[(tp_rank, pp_rank)][name] for tp_rank in range(tp)]
            split = tensor_parallel_split(name, config)
            merged[name] = (shards[0].clone() if split is None
                            else full_tensor_from_shards(shards, split))
    return {name: merged[name] for name in global_parameter_names(config)}
