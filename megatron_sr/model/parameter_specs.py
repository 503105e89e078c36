"""The model's parameters as data, read from the model itself.

`chunk_parameters` builds a chunk as `build_model` does (`GPTModel`, the
same pre/post-process, layers, TP size and sequence parallelism), on the
`meta` device, without process groups (it passes its TP slice explicitly)
and without drawing any value, and reads each parameter's `global_name`,
shape and the attributes the TP layers set
(`megatron_sr.tensor_parallel.layers`). So the estimator
(`megatron_sr.estimate`) and the offline reshaping of state dicts
(`state_dict_layout`) know the parameters that training holds, in the order
it holds them, from one place: the model's code. Building a 70B-class chunk
on `meta` takes some 0.1 s; the results are cached per (config, chunk, TP
size, sequence parallelism).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch

from megatron_sr.config import ModelConfig, ParallelConfig
from megatron_sr.model.gpt_model import GPTModel
from megatron_sr.model.parallel_layout import ChunkPlacement, chunk_placements
from megatron_sr.tensor_parallel import TensorParallelRank


@dataclass(frozen=True)
class TensorParallelSplit:
    """How a TP-sharded parameter is sliced; carries the attribute names that
    `shard_full_tensor` and `full_tensor_from_shards` read from a parameter."""

    partition_dim: int
    partition_stride: int = 1
    tensor_model_parallel: bool = True


@dataclass(frozen=True)
class ParameterSpec:
    """One parameter as a rank holds it: `name` its global name (the tied
    embedding's copy on the last stage is named like the original),
    `shape` its shape on one TP rank, and its TP attributes."""

    name: str
    shape: tuple[int, ...]
    tensor_parallel: bool  # a TP slice (False: replicated over the TP group)
    partition_dim: Optional[int]  # the dim it is sliced along (None: replicated)
    partition_stride: int  # the logical tensor is this many blocks, each sliced
    sequence_parallel: bool  # replicated, its gradient summed over TP
    shared_embedding: bool  # a copy of the tied word embedding

    @property
    def numel(self) -> int:
        """Elements on one TP rank."""
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def split(self) -> Optional[TensorParallelSplit]:
        """How it is sliced over TP ranks; None: replicated."""
        if not self.tensor_parallel:
            return None
        return TensorParallelSplit(self.partition_dim, self.partition_stride)


def _spec(param: torch.nn.Parameter) -> ParameterSpec:
    return ParameterSpec(name=param.global_name, shape=tuple(param.shape),
                         tensor_parallel=param.tensor_model_parallel,
                         partition_dim=param.partition_dim,
                         partition_stride=param.partition_stride,
                         sequence_parallel=param.sequence_parallel,
                         shared_embedding=param.shared_embedding)


def _config_items(model: ModelConfig) -> tuple:
    return tuple((field.name, getattr(model, field.name))
                 for field in dataclasses.fields(model) if field.init)


@lru_cache(maxsize=256)
def _meta_chunk(config_items: tuple, tensor_parallel_size: int, sequence_parallel: bool,
                chunk: ChunkPlacement) -> tuple[ParameterSpec, ...]:
    model = ModelConfig(**dict(config_items))
    built = GPTModel(model, pre_process=chunk.pre_process, post_process=chunk.post_process,
                     layer_offset=chunk.layer_offset, num_layers=chunk.num_layers,
                     sequence_parallel=sequence_parallel, device=torch.device("meta"),
                     tp=TensorParallelRank(rank=0, size=tensor_parallel_size))
    return tuple(_spec(param) for param in built.parameters())


def chunk_parameters(model: ModelConfig, parallel: ParallelConfig, chunk: ChunkPlacement
                     ) -> tuple[ParameterSpec, ...]:
    """The parameters of `chunk` on one TP rank (all TP ranks hold the same
    shapes), in registration order. Raises what `GPTModel` raises for a
    config it cannot build (e.g. sizes not divisible by the TP size)."""
    return _meta_chunk(_config_items(model), parallel.tensor_model_parallel_size,
                       parallel.sequence_parallel, chunk)


def rank_parameters(model: ModelConfig, parallel: ParallelConfig, pipeline_rank: int
                    ) -> list[ParameterSpec]:
    """Every parameter a rank of `pipeline_rank` holds, all its chunks in order:
    the order in which `ParamAndGradBuffer` receives them."""
    return [spec for chunk in chunk_placements(model, parallel, pipeline_rank)
            for spec in chunk_parameters(model, parallel, chunk)]


def model_parameters(model: ModelConfig) -> list[ParameterSpec]:
    """The parameters of the whole model at TP = PP = 1 (full shapes), in model
    order; a tied model has no output-layer weight."""
    return rank_parameters(model, ParallelConfig(), 0)
