"""Contiguous parameter and gradient buffers, split into buckets and shards.

Every parameter of this rank's model chunks becomes a view into one flat
`param_buffer` (dtype: the strategy's param dtype) and gets a `main_grad`
view into one flat `grad_buffer` (dtype: the strategy's grad dtype, or
`--grad-reduce-dtype`). Backward accumulates `param.grad` into `main_grad`
with a post-accumulate hook and frees `param.grad`, so gradients of all
micro-batches of a step sum in the grad buffer (with gradient-accumulation
fusion the wgrad GEMM has added it already and sets
`param.grad_added_to_main_grad`: `megatron_sr.tensor_parallel.grad_accumulation_fusion`).

Rounding of the adds (`grad_rounding`, `--grad-accumulation-rounding`): with
"stochastic" (bf16 buffers only) every add after the first of a step rounds
the fp32 sum stochastically (`megatron_sr.precision.grad_accumulation`),
keyed by `grad_accumulation_key(seed, accumulation_step, micro-batch,
parameter name, TP rank if sharded)`; the micro-batch is the add's index in
the step's global batch, k * dp + dp_rank for this rank's k-th add of the
parameter since `zero_grad`. The first add of a bf16 grad goes into zeros
and is exact, so it skips the rounding (an fp32 grad, of fp32 parameters with
a bf16 buffer, is rounded stochastically on every add). The
optimizer keeps `accumulation_step` at its next step's number, so a resumed
run draws the same bits. Each parameter carries `grad_accumulation_key()`,
the key of its next add (None: round to nearest), for the fused wgrad GEMM.

The buffer is cut into buckets (consecutive parameters, in the reverse of
the model's order, so that backward fills bucket 0 first and the forward
needs the last bucket first), each padded to a multiple of
`data_parallel_size * SHARD_ALIGN` elements; the tied word embedding has a
bucket of its own, so that its DP shards cover the same elements on the first
and the last pipeline stage. With the distributed optimizer, data-parallel
rank r owns the r-th of the `data_parallel_size` equal slices of every
bucket: after backward the grads are reduce-scattered (mean over DP) into that
slice, in place, the optimizer updates it, and the parameters are
all-gathered back, in place, last bucket (the first layers) first. Without
the distributed optimizer every rank owns the whole bucket and grads are
all-reduced (mean).

Model-parallel gradient sums, after the DP reduction and on the shard only
(they commute with the DP mean): the grads of sequence-parallel parameters
(norms, row-parallel biases under --sequence-parallel) are summed over the
TP group, the tied word embedding's over the embedding group (first and last
pipeline stage). So no bucket waits for them: with overlap_grad_reduce every
bucket's reduce-scatter starts from the backward hooks.

In-place collectives: the reduce-scatter's output is this rank's slice of its
input and the all-gather's input is this rank's slice of its output (NCCL's
in-place convention; Gloo on the CPU gives the same results, which
tests/test_distributed_optimizer.py checks bit for bit), so no bucket is copied.

`compute_buffer_layout` is a pure function of the parameter sizes, so
`tools/estimate.py` predicts the same padded sizes that training allocates.
All ranks of a data-parallel group call every collective method here in the
same order.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_sr import parallel_state
from megatron_sr.model.parallel_layout import param_is_unique_in_model
from megatron_sr.precision.grad_accumulation import stochastic_add_, stochastic_round_into_
from megatron_sr.random import grad_accumulation_key

SHARD_ALIGN = 64
"""Each rank's slice of a bucket is a multiple of this many elements."""

PARAM_ALIGN = 64
"""Each parameter starts at a multiple of this many elements, so every shard
segment starts on an even element of its parameter: the fused AdamW step
draws Philox bits for element pairs and runs fastest on aligned pairs."""

DEFAULT_BUCKET_SIZE = 40_000_000

_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _size(group: Optional[dist.ProcessGroup]) -> int:
    return dist.get_world_size(group) if group is not None else 1


@dataclass(frozen=True)
class ParamInfo:
    """What the buffers and the optimizer need to know about one parameter.

    name: global name, the same for every TP/PP layout (SR key, checkpoints).
    sr_tp_rank: this rank's TP rank for TP-sharded parameters; None for
        parameters replicated over TP (they draw the same SR bits on all TP ranks).
    weight_decay: whether AdamW's decoupled decay applies (not for biases, norms).
    count_in_grad_norm: False for copies whose elements another rank already
        counts (TP-replicated parameters on TP rank > 0, the tied output copy
        of the word embedding on the last pipeline stage).
    sequence_parallel_grad: its grad is partial over the TP group (a
        sequence-parallel norm or bias): summed over TP after the DP reduction.
    tied_embedding: a copy of the tied word embedding (first or last pipeline
        stage): its own bucket; its grad is summed over the embedding group
        after the DP reduction.
    """

    name: str
    sr_tp_rank: Optional[int]
    weight_decay: bool
    count_in_grad_norm: bool
    sequence_parallel_grad: bool = False
    tied_embedding: bool = False


def param_infos(params: Sequence[torch.nn.Parameter]) -> list[ParamInfo]:
    """The `ParamInfo` of each of this rank's parameters, read off the
    attributes the model's layers set: global name, TP sharding, weight decay
    (not for biases and norms, i.e. 1-D tensors), counting in the grad norm,
    model-parallel grad sums. Called after the model-parallel groups exist."""
    return [ParamInfo(name=p.global_name,
                      sr_tp_rank=(parallel_state.get_tensor_model_parallel_rank()
                                  if p.tensor_model_parallel else None),
                      weight_decay=p.dim() > 1,
                      count_in_grad_norm=param_is_unique_in_model(p),
                      sequence_parallel_grad=bool(getattr(p, "sequence_parallel", False)),
                      tied_embedding=bool(getattr(p, "shared_embedding", False)))
            for p in params]


@dataclass(frozen=True)
class BufferLayout:
    """Where each parameter and bucket lives in the flat buffers (element indices)."""

    param_ranges: tuple[tuple[int, int], ...]
    bucket_ranges: tuple[tuple[int, int], ...]
    bucket_params: tuple[tuple[int, ...], ...]

    @property
    def numel(self) -> int:
        return self.bucket_ranges[-1][1] if self.bucket_ranges else 0


def compute_buffer_layout(numels: Sequence[int], data_parallel_size: int,
                          bucket_size: int = DEFAULT_BUCKET_SIZE,
                          own_bucket: Optional[Sequence[bool]] = None) -> BufferLayout:
    """Lays parameters of the given sizes (already in buffer order) out in buckets.

    Each parameter starts at a multiple of PARAM_ALIGN elements; a bucket
    closes once it holds at least `bucket_size` elements and is padded to a
    multiple of `data_parallel_size * SHARD_ALIGN`. A parameter with
    `own_bucket[i]` (the tied word embedding) is alone in its bucket.
    """
    if data_parallel_size < 1 or bucket_size < 1:
        raise ValueError(f"data_parallel_size ({data_parallel_size}) and bucket_size "
                         f"({bucket_size}) must be >= 1")
    quantum = data_parallel_size * SHARD_ALIGN
    param_ranges, bucket_ranges, bucket_params = [], [], []
    start = bucket_start = 0
    members: list[int] = []
    alone = list(own_bucket) if own_bucket is not None else [False] * len(numels)

    def close_bucket():
        nonlocal start, bucket_start, members
        end = bucket_start + -(-(start - bucket_start) // quantum) * quantum
        bucket_ranges.append((bucket_start, end))
        bucket_params.append(tuple(members))
        start = bucket_start = end
        members = []

    for index, numel in enumerate(numels):
        start = -(-start // PARAM_ALIGN) * PARAM_ALIGN
        param_ranges.append((start, start + numel))
        members.append(index)
        start += numel
        if (start - bucket_start >= bucket_size or index == len(numels) - 1 or alone[index]
                or alone[index + 1]):
            close_bucket()
    return BufferLayout(tuple(param_ranges), tuple(bucket_ranges), tuple(bucket_params))


@dataclass(frozen=True)
class ShardSegment:
    """The part of one parameter that lies in this rank's shard of one bucket.

    buffer_start/end index the flat buffers; shard_start/end index the
    bucket's optimizer-state tensors; param_offset is the position of the
    segment's first element in the parameter (the SR counter offset)."""

    param_index: int
    bucket_index: int
    buffer_start: int
    buffer_end: int
    shard_start: int
    param_offset: int

    @property
    def numel(self) -> int:
        return self.buffer_end - self.buffer_start


class ParamAndGradBuffer:
    """Flat param/grad storage for `params`, with DP grad sync and param gather.

    params: this rank's parameters in model order (the buffer stores them
        reversed). Their data is moved into the buffer; they stay views of it.
    distributed: shard buckets over DP (ZeRO-1) or keep them whole (all-reduce).
    overlap_grad_reduce: launch each bucket's reduction asynchronously as soon
        as the last micro-batch's backward has produced all its grads.
    overlap_param_gather: launch the all-gathers asynchronously after the step
        (first-needed bucket first) and wait for each bucket right before the
        forward that reads it.
    tensor_parallel_group: sums the grads of `sequence_parallel_grad` params
        (None: TP = 1, nothing to sum).
    embedding_group: sums the grads of the `tied_embedding` param (None on
        ranks outside it, or when it is one rank: PP = 1).
    grad_rounding: "nearest" or "stochastic" (`--grad-accumulation-rounding`;
        "stochastic" needs a bf16 grad buffer); `seed` keys its random bits.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], infos: Sequence[ParamInfo],
                 param_dtype: torch.dtype, grad_dtype: torch.dtype,
                 data_parallel_group: Optional[dist.ProcessGroup], distributed: bool,
                 bucket_size: int = DEFAULT_BUCKET_SIZE, overlap_grad_reduce: bool = False,
                 overlap_param_gather: bool = False,
                 tensor_parallel_group: Optional[dist.ProcessGroup] = None,
                 embedding_group: Optional[dist.ProcessGroup] = None,
                 grad_rounding: str = "nearest", seed: int = 0):
        if grad_rounding not in ("nearest", "stochastic"):
            raise ValueError(f"--grad-accumulation-rounding {grad_rounding!r}: choose 'nearest' or 'stochastic'")
        if grad_rounding == "stochastic" and grad_dtype != torch.bfloat16:
            raise ValueError(f"--grad-accumulation-rounding stochastic needs a bf16 gradient buffer, "
                             f"this one is {grad_dtype}")
        if len(params) != len(infos):
            raise ValueError(f"{len(params)} params but {len(infos)} ParamInfo entries")
        for param in params:
            if param.dtype != param_dtype:
                raise TypeError(f"parameter of shape {tuple(param.shape)} is {param.dtype}, "
                                f"the strategy stores parameters in {param_dtype}")
        order = list(reversed(range(len(params))))
        self.params = [params[i] for i in order]
        self.infos = [infos[i] for i in order]
        self.group = data_parallel_group
        self.dp_size = dist.get_world_size(data_parallel_group) if dist.is_initialized() else 1
        self.dp_rank = dist.get_rank(data_parallel_group) if dist.is_initialized() else 0
        self.distributed = distributed
        self.layout = compute_buffer_layout([p.numel() for p in self.params], self.dp_size,
                                            bucket_size, [i.tied_embedding for i in self.infos])
        device = self.params[0].device if self.params else torch.device("cpu")
        self.param_buffer = torch.zeros(self.layout.numel, dtype=param_dtype, device=device)
        self.grad_buffer = torch.zeros(self.layout.numel, dtype=grad_dtype, device=device)
        for param, (start, end) in zip(self.params, self.layout.param_ranges):
            view = self.param_buffer[start:end].view_as(param)
            view.copy_(param.data)
            param.data = view
            param.main_grad = self.grad_buffer[start:end].view_as(param)
            param.grad_added_to_main_grad = False
        self.grad_rounding = grad_rounding
        self.seed = seed
        self.accumulation_step = 1  # the step the grads accumulating now feed (the optimizer sets it)
        self._grads_added = [0] * len(self.params)  # per param: adds since zero_grad
        self._index_of_param = {id(param): index for index, param in enumerate(self.params)}
        for index, param in enumerate(self.params):
            param.grad_accumulation_key = functools.partial(self._accumulation_key, index)
        self.segments = self._shard_segments()
        self._tp_group = tensor_parallel_group if _size(tensor_parallel_group) > 1 else None
        self._embedding_group = embedding_group if _size(embedding_group) > 1 else None
        self._sequence_parallel_segments = [
            s for s in self.segments if self.infos[s.param_index].sequence_parallel_grad]
        self._tied_segments = [s for s in self.segments
                               if self.infos[s.param_index].tied_embedding]
        self.overlap_grad_reduce = overlap_grad_reduce
        self.overlap_param_gather = overlap_param_gather and distributed
        self._bucket_of_param = {}
        for bucket, members in enumerate(self.layout.bucket_params):
            for index in members:
                self._bucket_of_param[id(self.params[index])] = bucket
        self._grad_handles: list[Optional[dist.Work]] = [None] * len(self.layout.bucket_ranges)
        self._gather_handles: list[Optional[dist.Work]] = [None] * len(self.layout.bucket_ranges)
        self._pending_grads = [-1] * len(self.layout.bucket_ranges)
        self._grad_launched = [False] * len(self.layout.bucket_ranges)
        self._hooks = [p.register_post_accumulate_grad_hook(self._accumulate_grad)
                       for p in self.params]

    # ----- layout -----------------------------------------------------------------
    def shard_range(self, bucket: int) -> tuple[int, int]:
        """[start, end) buffer indices of this rank's shard of `bucket`."""
        start, end = self.layout.bucket_ranges[bucket]
        if not self.distributed:
            return start, end
        size = (end - start) // self.dp_size
        return start + self.dp_rank * size, start + (self.dp_rank + 1) * size

    def _shard_segments(self) -> list[ShardSegment]:
        segments = []
        for bucket, members in enumerate(self.layout.bucket_params):
            shard_start, shard_end = self.shard_range(bucket)
            for index in members:
                p_start, p_end = self.layout.param_ranges[index]
                start, end = max(p_start, shard_start), min(p_end, shard_end)
                if start < end:
                    segments.append(ShardSegment(index, bucket, start, end,
                                                 start - shard_start, start - p_start))
        return segments

    def shard_numel(self, bucket: int) -> int:
        start, end = self.shard_range(bucket)
        return end - start

    # ----- gradients ---------------------------------------------------------------
    def zero_grad(self) -> None:
        self.grad_buffer.zero_()
        self._grads_added = [0] * len(self.params)

    def _accumulation_key(self, index: int) -> Optional[int]:
        """The Philox key of the next add into param `index`'s main_grad at
        `accumulation_step`, or None when adds round to nearest."""
        if self.grad_rounding != "stochastic":
            return None
        info = self.infos[index]
        micro_batch = self._grads_added[index] * self.dp_size + self.dp_rank
        return grad_accumulation_key(self.seed, self.accumulation_step, micro_batch, info.name,
                                     info.sr_tp_rank)

    def prepare_grad_sync(self, num_microbatches: int) -> None:
        """Arms the overlapped reduction: a bucket launches once each of its
        params has accumulated `num_microbatches` grads. Call before the
        step's forward-backward; a no-op without overlap."""
        for bucket, members in enumerate(self.layout.bucket_params):
            self._pending_grads[bucket] = len(members) * num_microbatches

    def _accumulate_grad(self, param: torch.nn.Parameter) -> None:
        index = self._index_of_param[id(param)]
        if param.grad_added_to_main_grad:  # the wgrad GEMM added it (gradient-accumulation fusion)
            param.grad_added_to_main_grad = False
        elif self.grad_rounding == "stochastic" and param.grad.dtype != torch.bfloat16:
            stochastic_round_into_(param.main_grad, param.main_grad.float() + param.grad.float(),
                                   self._accumulation_key(index))
        elif self.grad_rounding == "stochastic" and self._grads_added[index] > 0:
            stochastic_add_(param.main_grad, param.grad, self._accumulation_key(index))
        else:
            param.main_grad.add_(param.grad)
        self._grads_added[index] += 1
        param.grad = None
        if not self.overlap_grad_reduce:
            return
        bucket = self._bucket_of_param[id(param)]
        if self._pending_grads[bucket] > 0:
            self._pending_grads[bucket] -= 1
            if self._pending_grads[bucket] == 0:
                self._launch_grad_reduce(bucket, async_op=True)

    def _launch_grad_reduce(self, bucket: int, async_op: bool) -> None:
        self._grad_launched[bucket] = True
        start, end = self.layout.bucket_ranges[bucket]
        grads = self.grad_buffer[start:end]
        if self.dp_size > 1:
            grads.mul_(1.0 / self.dp_size)
            if self.distributed:
                shard_start, shard_end = self.shard_range(bucket)
                handle = _reduce_scatter(self.grad_buffer[shard_start:shard_end], grads,
                                         group=self.group, async_op=async_op)
            else:
                handle = dist.all_reduce(grads, group=self.group, async_op=async_op)
            self._grad_handles[bucket] = handle if async_op else None

    def finish_grad_sync(self) -> None:
        """Reduces (mean over DP) every bucket not already launched, waits for
        all, then sums the model-parallel partial grads on this rank's shard:
        sequence-parallel ones over TP (one coalesced all-reduce), the tied
        embedding's over the embedding group. After it, this rank's shard of
        the grad buffer holds the full gradient (DP mean). Every rank calls it
        after the step's last backward."""
        for bucket, launched in enumerate(self._grad_launched):
            if not launched:
                self._launch_grad_reduce(bucket, async_op=False)
        for bucket, handle in enumerate(self._grad_handles):
            if handle is not None:
                handle.wait()
            self._grad_handles[bucket] = None
            self._grad_launched[bucket] = False
            self._pending_grads[bucket] = -1
        self._sum_model_parallel_grads()

    def _segment_grads(self, segments: list[ShardSegment]) -> list[torch.Tensor]:
        return [self.grad_buffer[s.buffer_start:s.buffer_end] for s in segments]

    def _sum_model_parallel_grads(self) -> None:
        """TP sum of the sequence-parallel segments, embedding-group sum of the
        tied embedding's segment, on this rank's shard. The TP ranks of a group
        (and the two stages of an embedding group, whose tied bucket has the
        same size) hold the same segments, so the collectives match."""
        if self._tp_group is not None and self._sequence_parallel_segments:
            grads = self._segment_grads(self._sequence_parallel_segments)
            flat = torch.cat(grads)
            dist.all_reduce(flat, group=self._tp_group)
            for grad, summed in zip(grads, torch.split(flat, [g.numel() for g in grads])):
                grad.copy_(summed)
        if self._embedding_group is not None:
            for grad in self._segment_grads(self._tied_segments):
                dist.all_reduce(grad, group=self._embedding_group)

    # ----- parameters ----------------------------------------------------------------
    def gather_params(self) -> None:
        """All-gathers every bucket's shards into the full parameter buffer
        (distributed optimizer only), in the order the forward needs them (the
        last bucket, holding the first layers, first); asynchronous with
        overlap_param_gather."""
        for bucket in reversed(range(len(self.layout.bucket_ranges))):  # forward order
            self.gather_bucket_params(bucket)

    def gather_bucket_params(self, bucket: int) -> None:
        """All-gathers bucket `bucket`'s shards over the DP group into its part
        of the full parameter buffer (distributed optimizer only; nothing with
        one DP rank); asynchronous with overlap_param_gather (wait with
        `wait_param_gather`). Every DP rank calls it for the same buckets in
        the same order."""
        if not self.distributed or self.dp_size == 1:
            return
        start, end = self.layout.bucket_ranges[bucket]
        shard_start, shard_end = self.shard_range(bucket)
        handle = all_gather_into(self.param_buffer[start:end],
                                 self.param_buffer[shard_start:shard_end],
                                 group=self.group, async_op=self.overlap_param_gather)
        self._gather_handles[bucket] = handle if self.overlap_param_gather else None

    def wait_param_gather(self, param: Optional[torch.nn.Parameter] = None) -> None:
        """Waits for the pending all-gather of `param`'s bucket (of all buckets if None)."""
        buckets = (range(len(self._gather_handles)) if param is None
                   else [self._bucket_of_param[id(param)]])
        for bucket in buckets:
            handle = self._gather_handles[bucket]
            if handle is not None:
                handle.wait()
                self._gather_handles[bucket] = None

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank allocates for parameters and gradients."""
        return {"params": self.param_buffer.numel() * self.param_buffer.element_size(),
                "grads": self.grad_buffer.numel() * self.grad_buffer.element_size()}

    def wait_before_forward(self, modules: Sequence[torch.nn.Module]) -> None:
        """With overlap_param_gather, makes every submodule that owns parameters
        wait for its buckets' all-gathers right before its forward runs."""
        if not self.overlap_param_gather:
            return

        def wait_for(own: list[torch.nn.Parameter]):
            def hook(_module, _args) -> None:  # returns None: the forward's inputs stay as they are
                for param in own:
                    self.wait_param_gather(param)
            return hook

        for module in modules:
            for submodule in module.modules():
                own = list(submodule.parameters(recurse=False))
                if own:
                    submodule.register_forward_pre_hook(wait_for(own))
