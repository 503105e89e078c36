"""A rank's part of a global tensor as rectangular blocks, for torch.distributed.checkpoint.

Every tensor of a `--ckpt-format torch_dist` checkpoint is stored in its
global (TP=1, DP=1) shape; each rank contributes the blocks it owns, with
their offsets in that global tensor, and a load asks for the blocks the
loading rank owns in the new layout (DCP reads the overlapping parts of the
saved blocks). Two kinds of ownership reach here:

- a TP slice of a parameter: one block, the whole local tensor at the offset
  of the TP rank along the partition dim;
- a DP shard of the optimizer state: a contiguous range of a parameter's
  flattened TP slice, which `flat_range_blocks` cuts into at most
  2 x ndim - 1 rectangles (partial leading row, full rows, partial last row,
  recursively), each a contiguous piece of the 1-D state shard.

A TP-split parameter with partition stride s (SwiGLU's fused [gate; up],
s = 2) is stored as the logical view [s, n / s, ...] so that every TP slice
is one block: its global tensor does not depend on the TP size.

`GlobalBlocks` implements the hooks DCP's default planners call
(`__create_write_items__`, `__create_chunk_list__`, `size`); `SavePlanner`
and `LoadPlanner` find a block by its offsets.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex,
                                                   TensorProperties)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

Block = tuple[tuple[int, ...], torch.Tensor]  # (offsets in the global tensor, data)


def flat_range_blocks(start: int, end: int, shape: Sequence[int]
                      ) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """[(offsets, sizes)] of rectangles that tile the flat range [start, end) of
    a row-major tensor of `shape`, in order; each is contiguous in memory."""
    if start >= end:
        return []
    if len(shape) <= 1:
        return [((start,), (end - start,))] if shape else [((), ())]
    inner = math.prod(shape[1:])
    first_full, end_full = -(-start // inner), end // inner
    if first_full > end_full:  # inside one row
        row = start // inner
        return [((row, *o), (1, *s)) for o, s in
                flat_range_blocks(start - row * inner, end - row * inner, shape[1:])]
    blocks = []
    if start < first_full * inner:
        row = first_full - 1
        blocks += [((row, *o), (1, *s)) for o, s in
                   flat_range_blocks(start - row * inner, inner, shape[1:])]
    if end_full > first_full:
        blocks.append(((first_full, *[0] * (len(shape) - 1)),
                       (end_full - first_full, *shape[1:])))
    if end > end_full * inner:
        blocks += [((end_full, *o), (1, *s)) for o, s in
                   flat_range_blocks(0, end - end_full * inner, shape[1:])]
    return blocks


def logical_shape(param: torch.Tensor, local_shape: Sequence[int]) -> tuple[int, ...]:
    """The shape `param`'s TP slice (or its global tensor, given the global
    shape) is stored in: the partition dim split into [stride, n / stride]."""
    stride = getattr(param, "partition_stride", 1)
    if not getattr(param, "tensor_model_parallel", False) or stride == 1:
        return tuple(local_shape)
    dim = param.partition_dim
    return (*local_shape[:dim], stride, local_shape[dim] // stride, *local_shape[dim + 1:])


def tp_slice_offsets(param: torch.Tensor, tp_rank: int) -> tuple[int, ...]:
    """Offsets of this TP rank's slice in the logical global tensor."""
    local = logical_shape(param, param.shape)
    offsets = [0] * len(local)
    if getattr(param, "tensor_model_parallel", False):
        dim = param.partition_dim + (1 if getattr(param, "partition_stride", 1) > 1 else 0)
        offsets[dim] = tp_rank * local[dim]
    return tuple(offsets)


def global_logical_shape(param: torch.Tensor, tp_size: int) -> tuple[int, ...]:
    local = list(logical_shape(param, param.shape))
    if getattr(param, "tensor_model_parallel", False):
        dim = param.partition_dim + (1 if getattr(param, "partition_stride", 1) > 1 else 0)
        local[dim] *= tp_size
    return tuple(local)


class GlobalBlocks:
    """Blocks of one global tensor held by this rank (possibly none).

    `shape` is the global shape, `dtype` the stored dtype (the blocks' own:
    a load copies into them, casting). Blocks must not overlap.
    """

    def __init__(self, shape: Sequence[int], dtype: torch.dtype, blocks: list[Block]):
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.blocks = {tuple(offsets): data for offsets, data in blocks}

    def size(self) -> torch.Size:
        return self.shape

    def __create_write_items__(self, fqn: str, _object) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, torch.Size(offsets)), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(
                              chunk=ChunkStorageMetadata(offsets=torch.Size(offsets),
                                                         sizes=data.shape),
                              properties=TensorProperties(dtype=self.dtype), size=self.shape))
                for offsets, data in self.blocks.items()]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=data.shape)
                for offsets, data in self.blocks.items()]

    def block(self, offsets) -> torch.Tensor:
        return self.blocks[tuple(offsets)]

    def clipped_to(self, shape: Sequence[int]) -> "GlobalBlocks":
        """The same blocks cut to a global tensor of `shape` (a checkpoint whose
        dim 0, the padded vocabulary, differs): parts outside are not loaded."""
        clipped = []
        for offsets, data in self.blocks.items():
            rows = min(data.shape[0], shape[0] - offsets[0]) if offsets else 0
            if offsets and rows > 0:
                clipped.append((offsets, data[:rows]))
        return GlobalBlocks(shape, self.dtype, clipped)


class SavePlanner(DefaultSavePlanner):
    """DCP's default save planner, finding `GlobalBlocks` data by offsets."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def lookup_object(self, index: MetadataIndex):
        value = self.state_dict[index.fqn]
        if isinstance(value, GlobalBlocks):
            return value.block(index.offset)
        return super().lookup_object(index)


class LoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, copying into `GlobalBlocks` by offsets."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        # The default one first maps the state dict's leaves through a meta-device
        # initializer that does not know GlobalBlocks; nothing here is on meta.
        self.original_state_dict = self.state_dict = state_dict
        self.metadata = metadata
        self.is_coordinator = is_coordinator

    def load_bytes(self, read_item, value) -> None:
        # Not DCP's pickle load: a checkpoint's non-tensor entries are plain data.
        self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        value = self.state_dict[index.fqn]
        if isinstance(value, GlobalBlocks):
            return value.block(index.offset)
        return super().lookup_tensor(index)
