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
The names each rank holds and the dim each parameter is split along
(`tensor_parallel_split(name, config)`) are read from the model itself, built
on `meta` (`megatron_sr.model.parameter_specs`).
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from megatron_sr.config import ModelConfig, ParallelConfig, validate_parallel_layout
from megatron_sr.model.parameter_specs import (ParameterSpec, TensorParallelSplit,
                                               model_parameters, rank_parameters)
from megatron_sr.tensor_parallel import full_tensor_from_shards, shard_full_tensor

RankStateDicts = dict[tuple[int, int], dict[str, torch.Tensor]]


def global_parameter_names(config: ModelConfig) -> list[str]:
    """Keys of the full state dict of `config`'s model, in model order."""
    return [spec.name for spec in model_parameters(config)]


def _pipeline_rank_specs(config: ModelConfig, pipeline_size: int, virtual_size: Optional[int],
                         pipeline_rank: int) -> list[ParameterSpec]:
    parallel = ParallelConfig(pipeline_model_parallel_size=pipeline_size,
                              virtual_pipeline_model_parallel_size=virtual_size)
    return rank_parameters(config, parallel, pipeline_rank)


def pipeline_rank_parameter_names(config: ModelConfig, pipeline_size: int,
                                  virtual_size: Optional[int], pipeline_rank: int) -> list[str]:
    """Keys of the state dict of pipeline rank `pipeline_rank` (every TP rank
    of a stage holds the same names; with tied embeddings and PP > 1 the last
    stage's copy of the word embedding is among them)."""
    return [spec.name for spec in
            _pipeline_rank_specs(config, pipeline_size, virtual_size, pipeline_rank)]


def tensor_parallel_split(name: str, config: ModelConfig) -> Optional[TensorParallelSplit]:
    """How parameter `name` is sliced over TP ranks; None: replicated. Raises
    KeyError naming `name` when `config`'s model has no such parameter."""
    splits = {spec.name: spec.split for spec in model_parameters(config)}
    if name not in splits:
        raise KeyError(f"tensor_parallel_split: the model of this config has no parameter {name!r}")
    return splits[name]


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
        specs = _pipeline_rank_specs(config, pp, vp, pp_rank)
        for tp_rank in range(tp):
            ranks[(tp_rank, pp_rank)] = {
                spec.name: _shard(full_state[spec.name], spec.split, tp_rank, tp)
                for spec in specs}
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
        specs = _pipeline_rank_specs(config, pp, virtual_pipeline_parallel_size, pp_rank)
        for tp_rank in range(tp):
            check_parameter_names(f"state dict of (tp_rank, pp_rank) = ({tp_rank}, {pp_rank})",
                                  list(rank_states[(tp_rank, pp_rank)]),
                                  [spec.name for spec in specs])
        for spec in specs:
            if spec.name in merged:  # the last stage's copy of the tied embedding
                continue
            shards = [rank_states[(tp_rank, pp_rank)][spec.name] for tp_rank in range(tp)]
            merged[spec.name] = (shards[0].clone() if spec.split is None
                                 else full_tensor_from_shards(shards, spec.split))
    return {name: merged[name] for name in global_parameter_names(config)}
