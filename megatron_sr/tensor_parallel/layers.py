"""Linear and embedding layers split across the tensor-parallel (TP) group.

With `gradient_accumulation_fusion` the linear layers add their own weight's
gradient into its `main_grad` in the wgrad GEMM
(`megatron_sr.tensor_parallel.grad_accumulation_fusion`).

Parameter attributes (set here, read by the model builder, `finalize_model_grads`,
the optimizer and checkpointing):

- `tensor_model_parallel` (bool): the parameter is a slice of a larger logical
  tensor; each TP rank holds a different slice. False: replicated, identical
  on every TP rank.
- `partition_dim` (int or None): the dim along which the logical tensor is
  sliced; `partition_stride` (int): the logical tensor is `stride` equal
  blocks along that dim and each block is sliced (SwiGLU's [gate; up] fc1
  weight has stride 2). `shard_full_tensor`, `full_tensor_from_shards` and `full_shape`
  apply the rule.
- `sequence_parallel` (bool): replicated parameter that sees only this rank's
  sequence shard under --sequence-parallel, so its gradient is partial and
  must be summed over TP (row-parallel bias; norms set it too).
- `shared_embedding` (bool): the tied word-embedding weight, held by the
  first stage and (as the output layer's copy) by the last; set by GPTModel.
- `init_method`: `init_method(out, element_index, key)` fills fp32 `out` with the
  initial values of the elements at `element_index` (int64, out's shape: their
  indices in the logical, unsharded tensor), drawn from Philox key `key`
  (`megatron_sr.random.init_key`); so each rank draws only its own slice and
  every TP layout gets the same values (`megatron_sr.model.initialize_parameters`).

Layers never initialize their own values: a freshly built layer holds
uninitialized memory until `initialize_parameters` (megatron_sr.model) or a
test fills it. Every TP rank of a group calls forward and backward together.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_sr import parallel_state
from megatron_sr.cpu_bf16 import linear, linear_input_grad, linear_weight_and_bias_grads
from megatron_sr.random import philox_normal
from megatron_sr.tensor_parallel.grad_accumulation_fusion import (
    fused_input_grad,
    fused_weight_and_bias_grads,
    linear_with_grad_accumulation,
)
from megatron_sr.tensor_parallel.mappings import (
    all_gather_sequence,
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_sequence,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)

InitMethod = Callable[[torch.Tensor, torch.Tensor, int], None]


@dataclass(frozen=True)
class TensorParallelRank:
    """The slice a layer holds: TP rank `rank` of `size`. Layers built with
    `tp=None` take the TP group's (`parallel_state`, after
    `initialize_model_parallel`); a shape-only build on `meta` without process
    groups (`megatron_sr.model.parameter_specs`) passes its own."""

    rank: int
    size: int


def tensor_parallel_rank(tp: Optional[TensorParallelRank] = None) -> TensorParallelRank:
    """`tp`, or when None this rank's place in its TP group."""
    if tp is not None:
        return tp
    return TensorParallelRank(parallel_state.get_tensor_model_parallel_rank(),
                              parallel_state.get_tensor_model_parallel_world_size())


def normal_init(std: float) -> InitMethod:
    """N(0, std^2) by counter-based Philox (`megatron_sr.random.philox_normal`)."""
    return partial(_fill_normal, std=std)


def _fill_normal(out: torch.Tensor, element_index: torch.Tensor, key: int, std: float) -> None:
    out.copy_(philox_normal(element_index, key) * std)


def constant_init(value: float) -> InitMethod:
    return partial(_fill_constant, value=value)


def _fill_constant(out: torch.Tensor, element_index: torch.Tensor, key: int, value: float) -> None:
    out.fill_(value)


def set_parallel_attributes(param: nn.Parameter, *, tensor_model_parallel: bool,
                            partition_dim: Optional[int] = None, partition_stride: int = 1,
                            sequence_parallel: bool = False, init_method: InitMethod) -> None:
    param.tensor_model_parallel = tensor_model_parallel
    param.partition_dim = partition_dim if tensor_model_parallel else None
    param.partition_stride = partition_stride
    param.sequence_parallel = sequence_parallel
    param.shared_embedding = False  # GPTModel marks the tied word-embedding copies
    param.init_method = init_method


def full_shape(param: torch.Tensor, tp_size: int) -> tuple[int, ...]:
    """Shape of the logical tensor `param` is a TP slice of."""
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    return tuple(shape)


def shard_full_tensor(full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp_size: int
                      ) -> torch.Tensor:
    """This TP rank's slice of the logical tensor `full` (a view for stride 1)."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim, stride = param.partition_dim, param.partition_stride
    blocks = full.chunk(stride, dim=dim)
    return torch.cat([block.chunk(tp_size, dim=dim)[tp_rank] for block in blocks], dim=dim)


def shard_element_index(param: torch.Tensor, tp_rank: int, tp_size: int,
                        rows: Optional[slice] = None) -> torch.Tensor:
    """int64 tensor of `param`'s shape (or of `param[rows]`): the index of each of
    this TP rank's elements in the row-major logical tensor (`full_shape`),
    the same slicing rule as `shard_full_tensor`. Never builds the full tensor."""
    full = full_shape(param, tp_size)
    dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
    index = torch.zeros((), dtype=torch.int64, device=param.device)
    full_stride = 1
    for d in range(len(full) - 1, -1, -1):
        local = torch.arange(param.shape[d], dtype=torch.int64, device=param.device)
        if d == 0 and rows is not None:
            local = local[rows]
        if d == dim:
            per_block = param.shape[d] // param.partition_stride  # this rank's part of a block
            block, within = local // per_block, local % per_block
            local = block * (full[d] // param.partition_stride) + tp_rank * per_block + within
        shape = [1] * len(full)
        shape[d] = -1
        index = index + (local * full_stride).view(shape)
        full_stride *= full[d]
    return index


def full_tensor_from_shards(shards: list[torch.Tensor], param: torch.Tensor) -> torch.Tensor:
    """The logical tensor from all TP ranks' slices (ordered by TP rank); inverse
    of `shard_full_tensor`. A replicated parameter returns shards[0]."""
    if not getattr(param, "tensor_model_parallel", False):
        return shards[0]
    dim, stride = param.partition_dim, param.partition_stride
    per_rank_blocks = [shard.chunk(stride, dim=dim) for shard in shards]
    return torch.cat([torch.cat([blocks[b] for blocks in per_rank_blocks], dim=dim)
                      for b in range(stride)], dim=dim)


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by "
                         f"--tensor-model-parallel-size ({denominator})")
    return numerator // denominator


def _autocast_on(device_type: str) -> bool:
    """Whether torch.autocast is on for `device_type` (never for `meta`)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _autocast_off(device_type: str):
    return (torch.autocast(device_type, enabled=False)
            if torch.amp.is_autocast_available(device_type) else nullcontext())


class _SequenceParallelLinear(torch.autograd.Function):
    """y = gather(x) W^T + b for a sequence-parallel column-parallel linear: x
    [s / tp, b, in] is this rank's sequence shard, W [out / tp, in] this rank's
    rows, y [s, b, out / tp]. Keeps only the shard for backward, not the
    gathered [s, b, in] (tp times smaller), and all-gathers it again there.

    Communication (all ranks of the TP group call forward and backward together):
    - forward: one all-gather of x over the TP group, before the GEMM;
    - backward: (1) the all-gather of the saved shard is launched
      asynchronously; (2) the input-gradient GEMM grad_y W runs meanwhile (it
      needs only W); (3) its [s, b, in] result, partial on each rank, is
      reduce-scattered asynchronously to the [s / tp, b, in] input gradient;
      (4) after waiting for the all-gather, the weight-gradient GEMM
      grad_y^T gather(x) (and the bias's row sum) runs while the
      reduce-scatter is in flight; (5) backward waits for the reduce-scatter
      and returns. Without a weight gradient to compute there is no re-gather.
    The gathered input is alive only within forward and from (4) to the end of
    backward.

    The products are those of `megatron_sr.cpu_bf16.linear` (emulated BF16 on
    CPUs without native BF16, else `F.linear`), or, with `fused` (the weight
    has a `main_grad`), of the gradient-accumulation-fused linear, whose
    weight gradient goes into `main_grad`: same values, to the bit, as an
    all-gather followed by those linears. Under `torch.autocast` the inputs are
    cast to the autocast dtype first (as autocast casts F.linear's), and the
    gradients come back in the inputs' dtypes (the input gradient is cast
    before the reduce-scatter, so that it sums in the input's dtype).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, fused):
        device = x.device.type
        ctx.input_dtype = x.dtype
        if _autocast_on(device):
            dtype = torch.get_autocast_dtype(device)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        ctx.parameter = weight if fused else None
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        total, _ = all_gather_sequence(x)
        with _autocast_off(device):
            return linear(total, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_y = grad_y.to(weight.dtype)
        need_weight = ctx.needs_input_grad[1]
        need_bias = ctx.has_bias and ctx.needs_input_grad[2]
        total, gather = x, None  # the shard stands in for dtype checks when W needs no grad
        if need_weight:
            total, gather = all_gather_sequence(x, async_op=True)
        grad_x = scatter = None
        with _autocast_off(grad_y.device.type):
            if ctx.needs_input_grad[0]:
                grad_total = (fused_input_grad if ctx.parameter is not None
                              else linear_input_grad)(grad_y, weight).to(ctx.input_dtype)
                grad_x, scatter = reduce_scatter_sequence(grad_total, async_op=True)
            if gather is not None:
                gather.wait()
            if ctx.parameter is not None:
                grad_weight, grad_bias = fused_weight_and_bias_grads(
                    ctx.parameter, grad_y, total, need_weight, need_bias)
            else:
                grad_weight, grad_bias = linear_weight_and_bias_grads(grad_y, total, need_weight,
                                                                      need_bias)
        if scatter is not None:
            scatter.wait()
        return grad_x, grad_weight, grad_bias, None


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A's rows (output features) split over TP ranks.

    Input: [s, b, in] replicated, or [s / tp, b, in] when sequence_parallel
    (all-gathered here, and again in backward: only the shard is kept for
    backward, see `_SequenceParallelLinear`; backward reduce-scatters the
    input gradient).
    Output: [s, b, out / tp] on each rank (or [s, b, out] with gather_output).
    `forward(x, weight=...)` takes an external weight of the local shape
    instead of the own one: the tied output layer uses the word embedding's
    (never gradient-accumulation fused).
    """

    def __init__(self, input_size: int, output_size: int, *, bias: bool, init_method: InitMethod,
                 params_dtype: torch.dtype, device=None, gather_output: bool = False,
                 sequence_parallel: bool = False, partition_stride: int = 1,
                 skip_weight_param: bool = False, gradient_accumulation_fusion: bool = False,
                 tp: Optional[TensorParallelRank] = None):
        super().__init__()
        tp_size = tensor_parallel_rank(tp).size
        if gather_output and (sequence_parallel or partition_stride != 1):
            raise ValueError("ColumnParallelLinear: gather_output needs partition_stride=1 "
                             "and no sequence parallelism")
        self.output_size_per_partition = _divide(output_size, tp_size, "output features")
        _divide(self.output_size_per_partition, partition_stride, "output features per stride")
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        self.gradient_accumulation_fusion = gradient_accumulation_fusion
        kw = dict(dtype=params_dtype, device=device)
        if skip_weight_param:
            self.weight = None
        else:
            self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, input_size, **kw))
            set_parallel_attributes(self.weight, tensor_model_parallel=True, partition_dim=0,
                                    partition_stride=partition_stride, init_method=init_method)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.output_size_per_partition, **kw))
            set_parallel_attributes(self.bias, tensor_model_parallel=True, partition_dim=0,
                                    partition_stride=partition_stride,
                                    init_method=constant_init(0.0))
        else:
            self.bias = None

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        weight = self.weight if weight is None else weight
        fused = (self.gradient_accumulation_fusion and weight is self.weight
                 and getattr(weight, "main_grad", None) is not None
                 and not _autocast_on(x.device.type))
        if self.sequence_parallel:
            return _SequenceParallelLinear.apply(x, weight, self.bias, fused)
        x = copy_to_tensor_model_parallel_region(x)
        if fused:
            y = linear_with_grad_accumulation(x, weight, self.bias)
        else:
            y = linear(x, weight, self.bias)
        return gather_from_tensor_model_parallel_region(y) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A's columns (input features) split over TP ranks.

    Input: [s, b, in / tp] (input_is_parallel) or [s, b, in] replicated (each
    rank keeps its slice). The partial products are all-reduced, or
    reduce-scattered to [s / tp, b, out] when sequence_parallel. The bias is
    replicated and added after the reduction.
    """

    def __init__(self, input_size: int, output_size: int, *, bias: bool, init_method: InitMethod,
                 params_dtype: torch.dtype, device=None, input_is_parallel: bool = True,
                 sequence_parallel: bool = False, gradient_accumulation_fusion: bool = False,
                 tp: Optional[TensorParallelRank] = None):
        super().__init__()
        tp_size = tensor_parallel_rank(tp).size
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel needs input_is_parallel")
        self.input_size_per_partition = _divide(input_size, tp_size, "input features")
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        self.gradient_accumulation_fusion = gradient_accumulation_fusion
        kw = dict(dtype=params_dtype, device=device)
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_partition, **kw))
        set_parallel_attributes(self.weight, tensor_model_parallel=True, partition_dim=1,
                                init_method=init_method)
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size, **kw))
            set_parallel_attributes(self.bias, tensor_model_parallel=False,
                                    sequence_parallel=sequence_parallel,
                                    init_method=constant_init(0.0))
        else:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x)
        fused = self.gradient_accumulation_fusion
        y = (linear_with_grad_accumulation if fused else linear)(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y)
        else:
            y = reduce_from_tensor_model_parallel_region(y)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary (rows) split over TP ranks.

    Rank r holds rows [r * V / tp, (r + 1) * V / tp). Input: token ids of any
    shape; output: that shape + [hidden], replicated (each rank contributes
    its rows, zeros elsewhere, and the TP group all-reduces).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, init_method: InitMethod,
                 params_dtype: torch.dtype, device=None, tp: Optional[TensorParallelRank] = None):
        super().__init__()
        tp = tensor_parallel_rank(tp)
        per_rank = _divide(num_embeddings, tp.size, "padded vocab size")
        self.vocab_start = tp.rank * per_rank
        self.vocab_end = self.vocab_start + per_rank
        self.tp_size = tp.size
        self.weight = nn.Parameter(torch.empty(per_rank, embedding_dim, dtype=params_dtype,
                                               device=device))
        set_parallel_attributes(self.weight, tensor_model_parallel=True, partition_dim=0,
                                init_method=init_method)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(tokens, self.weight)
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)
        local = (tokens - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_model_parallel_region(out)

