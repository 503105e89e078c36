"""Autograd-aware communication across the tensor-parallel (TP) group.

Every function here is called by all ranks of a TP group with tensors of the
same shape and dtype; the backward pass runs the conjugate collective, so a
layer written with them is differentiable end to end. With TP size 1 each is
the identity.

    function                                  forward             backward
    copy_to_tensor_model_parallel_region      identity            all-reduce
    reduce_from_tensor_model_parallel_region  all-reduce          identity
    scatter_to_tensor_model_parallel_region   keep my last-dim    all-gather last dim
                                              slice
    gather_from_tensor_model_parallel_region  all-gather last dim keep my slice
    scatter_to_sequence_parallel_region       keep my dim-0 slice all-gather dim 0
    gather_from_sequence_parallel_region      all-gather dim 0    reduce-scatter dim 0
                                                                  (or keep my slice)
    reduce_scatter_to_sequence_parallel_region reduce-scatter     all-gather dim 0
                                              dim 0

Sequence-parallel tensors are [s / tp, b, h]: the sequence is dim 0, as in
the transformer's [s, b, h] activations. Reductions run in the tensor's dtype
(bf16 activations are summed in bf16, like NCCL does).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_sr import parallel_state

# torch >= 2.10 names the flat collectives *_single; older releases *_tensor.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _tp():
    return (parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_group())


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    size, group = _tp()
    if size == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _split_last(x: torch.Tensor) -> torch.Tensor:
    size, _ = _tp()
    if size == 1:
        return x
    if x.shape[-1] % size:
        raise ValueError(f"last dim {x.shape[-1]} not divisible by TP size {size}")
    return x.chunk(size, dim=-1)[parallel_state.get_tensor_model_parallel_rank()].contiguous()


def _gather_last(x: torch.Tensor) -> torch.Tensor:
    size, group = _tp()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _split_first(x: torch.Tensor) -> torch.Tensor:
    size, _ = _tp()
    if size == 1:
        return x
    if x.shape[0] % size:
        raise ValueError(f"sequence length {x.shape[0]} not divisible by TP size {size} "
                         f"(--sequence-parallel needs --seq-length divisible by "
                         f"--tensor-model-parallel-size)")
    # A copy, not a view: a view would keep the whole [s, b, h] storage alive for
    # as long as autograd keeps the shard.
    return x.chunk(size, dim=0)[parallel_state.get_tensor_model_parallel_rank()].clone(
        memory_format=torch.contiguous_format)


def all_gather_sequence(x: torch.Tensor, async_op: bool = False):
    """[s / tp, b, ...] shards of the TP group -> (the full [s, b, ...], the
    collective's Work when `async_op`, else None). Every rank of the TP group
    calls it with the same shape; with `async_op` the output may be read only
    after `work.wait()`. Not autograd-aware (the building block of the
    functions below and of the sequence-parallel linear)."""
    size, group = _tp()
    if size == 1:
        return x, None
    out = torch.empty((x.shape[0] * size, *x.shape[1:]), dtype=x.dtype, device=x.device)
    return out, _all_gather_flat(out, x.contiguous(), group=group, async_op=async_op)


def reduce_scatter_sequence(x: torch.Tensor, async_op: bool = False):
    """Partial [s, b, ...] on each rank of the TP group -> (this rank's summed
    [s / tp, b, ...] shard, the Work when `async_op`, else None); as
    `all_gather_sequence`."""
    size, group = _tp()
    if size == 1:
        return x, None
    if x.shape[0] % size:
        raise ValueError(f"sequence length {x.shape[0]} not divisible by TP size {size}")
    out = torch.empty((x.shape[0] // size, *x.shape[1:]), dtype=x.dtype, device=x.device)
    return out, _reduce_scatter_flat(out, x.contiguous(), group=group, async_op=async_op)


def _gather_first(x: torch.Tensor) -> torch.Tensor:
    return all_gather_sequence(x)[0]


def _reduce_scatter_first(x: torch.Tensor) -> torch.Tensor:
    return reduce_scatter_sequence(x)[0]


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad)


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x)  # in place: the caller passes a fresh matmul output

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ScatterLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split_last(x)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad)


class _GatherLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _gather_last(x)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad)


class _ScatterFirst(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split_first(x)

    @staticmethod
    def backward(ctx, grad):
        return _gather_first(grad)


class _GatherFirst(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, grad_is_partial):
        ctx.grad_is_partial = grad_is_partial
        return _gather_first(x)

    @staticmethod
    def backward(ctx, grad):
        if ctx.grad_is_partial:
            return _reduce_scatter_first(grad), None
        return _split_first(grad), None


class _ReduceScatterFirst(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _reduce_scatter_first(x)

    @staticmethod
    def backward(ctx, grad):
        return _gather_first(grad)


def copy_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Entry of a TP region whose input is replicated: each rank's backward
    holds a partial input gradient, summed here."""
    return _Copy.apply(x)


def reduce_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Exit of a TP region: sums the ranks' partial outputs."""
    return _Reduce.apply(x)


def scatter_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Keeps this rank's slice of the last dim of a replicated tensor."""
    return _ScatterLast.apply(x)


def gather_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Concatenates the ranks' last-dim slices into the full tensor."""
    return _GatherLast.apply(x)


def scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """[s, b, h] replicated -> this rank's [s / tp, b, h] shard."""
    return _ScatterFirst.apply(x)


def gather_from_sequence_parallel_region(x: torch.Tensor, grad_is_partial: bool = True
                                         ) -> torch.Tensor:
    """[s / tp, b, h] shards -> the full [s, b, h] on every rank.

    `grad_is_partial=True` (the input of a column-parallel layer): each rank's
    output gradient is a partial sum, so backward reduce-scatters; False: the
    gradient is replicated, so backward keeps this rank's slice.
    """
    return _GatherFirst.apply(x, grad_is_partial)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Partial [s, b, h] on each rank -> this rank's summed [s / tp, b, h] shard
    (the exit of a row-parallel layer under sequence parallelism)."""
    return _ReduceScatterFirst.apply(x)
