"""AdamW over the shards of a `ParamAndGradBuffer`: ZeRO-1 with stochastic rounding.

Every rank keeps the optimizer state (Adam m and v, the fp32 master copy for
bf16-mixed, the Kahan compensation for bf16-kahan) of its shard only, in the
dtypes of the precision strategy. One `step`:

1. finishes the gradient reduction (reduce-scatter over DP with the
   distributed optimizer, all-reduce without it);
2. computes the global grad norm from the shards, on the device in fp32,
   with one all-reduce over the world, counting every model element once
   (the training loop's exit flags ride in the same all-reduce); from it,
   still on the device, the gradients' factor: the clip coefficient, or NaN
   when the norm is NaN/Inf;
3. runs the fused `adamw_shard_step` once per bucket shard (one kernel launch
   on a GPU), bucket by bucket in forward order (the bucket of the first
   layers first), over the shard's table of parameter segments, with each
   segment's SR key of (seed, step, parameter name, TP rank if sharded) and
   its offset inside its parameter, so the random bits do not depend on the
   data-parallel size or on the buffer layout; the kernels scale the
   gradients by the factor, and write nothing when it is NaN: a step with a
   NaN/Inf grad norm is skipped on every rank, bit-exactly;
4. all-gathers the updated parameters over DP (distributed optimizer only):
   each bucket's all-gather is launched right after that bucket's update, so
   it overlaps the next buckets' updates (on a step that measures log-step
   statistics, update absorption, params norm or zero gradients, all of them
   after those statistics' one all-reduce instead); then reads the grad norm
   (and the statistics) on the host: the step's only host sync, after every
   launch is queued. A skipped step gathers the unchanged shards, which every
   rank already holds in full.

All ranks of the world call `step`, `state_dict` and `load_state_dict`
together (they communicate).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_sr.config import OptimizerConfig
from megatron_sr.optimizer.param_buffer import ParamAndGradBuffer, ShardSegment, all_gather_into
from megatron_sr.precision.adamw import SegmentTable, adamw_shard_step, sr_key_tensor
from megatron_sr.precision.strategies import PrecisionStrategy
from megatron_sr.random import sr_key

_STATE_KINDS = ("exp_avg", "exp_avg_sq", "master", "kahan")
# The parameters --decoupled-lr applies to (Megatron's embedding and output layer weights).
DECOUPLED_LR_PARAMETERS = frozenset({"embedding.word_embeddings.weight", "output_layer.weight"})


@dataclass
class StepResult:
    """What one optimizer step did. grad_norm is before clipping;
    update_absorption is None unless measured (see `step`); host_flags: the
    step's `host_flags`, each OR-ed over all ranks; params_norm (after the
    update) and num_zeros_in_grad are None unless requested (see `step`)."""

    grad_norm: float
    skipped: bool
    update_absorption: Optional[float] = None
    host_flags: tuple[bool, ...] = ()
    params_norm: Optional[float] = None
    num_zeros_in_grad: Optional[int] = None


class DistributedOptimizer:
    """AdamW on this rank's shard of `buffer` (the whole buffer without sharding).

    strategy: the precision strategy; decides the state dtypes and rounding.
    seed: the SR seed (`--seed`); the SR key also mixes in the step number.
    """

    def __init__(self, buffer: ParamAndGradBuffer, strategy: PrecisionStrategy,
                 config: OptimizerConfig, seed: int):
        self.buffer = buffer
        self.strategy = strategy
        self.config = config
        self.seed = seed
        self.step_count = 0  # applied (not skipped) steps: Adam's t and the SR stream
        self.skipped_steps = 0
        device = buffer.param_buffer.device
        dtypes = {"exp_avg": strategy.exp_avg_dtype, "exp_avg_sq": strategy.exp_avg_sq_dtype,
                  "master": strategy.master_dtype, "kahan": strategy.kahan_dtype}
        self.state: dict[str, list[torch.Tensor]] = {}
        for kind, dtype in dtypes.items():
            if dtype is not None:
                self.state[kind] = [torch.zeros(buffer.shard_numel(b), dtype=dtype, device=device)
                                    for b in range(len(buffer.layout.bucket_ranges))]
        self.reset_master_from_params()
        self._norm_group = None  # the world
        # Whether a segment's elements count in model-wide sums (grad norm, update
        # absorption) on this rank: each model element is counted on exactly one rank.
        self._counted = [buffer.infos[segment.param_index].count_in_grad_norm
                         and (buffer.distributed or buffer.dp_rank == 0)
                         for segment in buffer.segments]
        self._counted_grads: list[torch.Tensor] = []
        self._counted_grads_of: Optional[torch.Tensor] = None
        # Per bucket, its segments in shard order and their table (built once: the layout is fixed).
        self._bucket_segments: list[list[ShardSegment]] = [[] for _ in buffer.layout.bucket_ranges]
        for segment in buffer.segments:
            self._bucket_segments[segment.bucket_index].append(segment)
        self._tables = []
        for members in self._bucket_segments:
            members.sort(key=lambda segment: segment.shard_start)
            self._tables.append(SegmentTable(
                [m.shard_start for m in members], [m.numel for m in members], [m.param_offset for m in members],
                [buffer.infos[m.param_index].weight_decay for m in members]))
        # Per bucket, the index of its first key in `_sr_keys` (buckets in index order).
        self._first_keys = [sum(len(m) for m in self._bucket_segments[:bucket])
                            for bucket in range(len(self._bucket_segments))]
        self._decoupled_group_cache: dict[int, list] = {}  # see _decoupled_groups

    @property
    def step_count(self) -> int:
        """Applied (not skipped) steps: Adam's t and the SR stream. Setting it
        (a step, a skipped step taken back, a checkpoint load) also sets the
        buffer's `accumulation_step` to the next step, whose gradients the
        buffer accumulates (`--grad-accumulation-rounding stochastic` keys)."""
        return self._step_count

    @step_count.setter
    def step_count(self, value: int) -> None:
        self._step_count = value
        self.buffer.accumulation_step = value + 1

    # ----- state helpers -------------------------------------------------------------
    def reset_master_from_params(self) -> None:
        """Sets the fp32 master copy (if the strategy has one) to the current params."""
        if "master" not in self.state:
            return
        for bucket, master in enumerate(self.state["master"]):
            start, end = self.buffer.shard_range(bucket)
            master.copy_(self.buffer.param_buffer[start:end])

    def _segment_state(self, segment: ShardSegment, kind: str) -> Optional[torch.Tensor]:
        tensors = self.state.get(kind)
        if tensors is None:
            return None
        return tensors[segment.bucket_index][segment.shard_start:segment.shard_start + segment.numel]

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank allocates: params, grads, master, optimizer (m, v, kahan)."""
        sizes = self.buffer.memory_bytes()

        def total(kinds):
            return sum(t.numel() * t.element_size() for k in kinds for t in self.state.get(k, []))

        sizes["master"] = total(["master"])
        sizes["optimizer"] = total(["exp_avg", "exp_avg_sq", "kahan"])
        return sizes

    # ----- the step --------------------------------------------------------------------
    def _grad_norm(self, host_flags: Sequence[bool] = ()) -> torch.Tensor:
        """Global L2 norm of the reduced grads and the world's `host_flags`: an
        fp32 tensor [1 + len(host_flags)] on the grads' device, the norm first
        (NaN/Inf propagate; a norm beyond ~1.8e19 overflows to Inf), then per
        flag the number of ranks that set it. fp32 norms of the counted
        segments (`torch._foreach_norm`: a few multi-tensor kernels on CUDA, no
        fp64 copies), their squares summed, one all-reduce over the world that
        carries the flags too (a sum of 0/1 is exact in fp32 up to 2**24
        ranks). No host sync."""
        grads = self.buffer.grad_buffer
        if self._counted_grads_of is not grads:
            self._counted_grads = [grads[segment.buffer_start:segment.buffer_end]
                                   for segment, counted in zip(self.buffer.segments, self._counted) if counted]
            self._counted_grads_of = grads
        if self._counted_grads:
            norms = torch._foreach_norm(self._counted_grads, 2, dtype=torch.float32)
            squares = torch.stack(norms).square().sum()
        else:
            squares = torch.zeros((), dtype=torch.float32, device=grads.device)
        reduced = squares.reshape(1)
        if host_flags:
            # Pinned on a GPU: a copy from pageable memory would wait for the stream
            # (backward's kernels), a host sync before the step's one.
            flags = torch.tensor([float(bool(f)) for f in host_flags], dtype=torch.float32,
                                 pin_memory=grads.is_cuda)
            reduced = torch.cat([reduced, flags.to(grads.device, non_blocking=True)])
        if dist.is_initialized():
            dist.all_reduce(reduced, group=self._norm_group)
        return torch.cat([reduced[:1].sqrt(), reduced[1:]])

    def _grad_scale(self, grad_norm: torch.Tensor) -> torch.Tensor:
        """The gradients' factor, on the device: clip_grad / (norm + 1e-6) when
        clipping is on and the norm exceeds clip_grad, else 1; NaN when the
        norm is NaN/Inf (the kernels then write nothing)."""
        clip = self.config.clip_grad
        scale = torch.ones_like(grad_norm)
        if clip > 0:
            scale = torch.where(grad_norm > clip, clip / (grad_norm + 1e-6), scale)
        return torch.where(torch.isfinite(grad_norm), scale, torch.full_like(grad_norm, math.nan))

    def _sr_keys(self, step: int) -> torch.Tensor:
        """The SR keys of every bucket's segments at `step`, in table order,
        as one int64 tensor on the buffers' device (one asynchronous copy)."""
        keys = {}
        ordered = []
        for members in self._bucket_segments:
            for segment in members:
                if segment.param_index not in keys:
                    info = self.buffer.infos[segment.param_index]
                    keys[segment.param_index] = sr_key(self.seed, step, info.name, info.sr_tp_rank)
                ordered.append(keys[segment.param_index])
        return sr_key_tensor(ordered, self.buffer.param_buffer.device)

    def _decoupled_groups(self, bucket: int) -> list[tuple[SegmentTable, torch.Tensor, bool]]:
        """Bucket `bucket`'s segments split into (table, their indices in the
        bucket's key order, whether --decoupled-lr applies), built once; one
        AdamW launch per non-empty group."""
        if bucket not in self._decoupled_group_cache:
            members = self._bucket_segments[bucket]
            groups = []
            for decoupled in (False, True):
                chosen = [i for i, m in enumerate(members) if decoupled == (
                    self.buffer.infos[m.param_index].name in DECOUPLED_LR_PARAMETERS)]
                if chosen:
                    picked = [members[i] for i in chosen]
                    table = SegmentTable(
                        [m.shard_start for m in picked], [m.numel for m in picked],
                        [m.param_offset for m in picked],
                        [self.buffer.infos[m.param_index].weight_decay for m in picked])
                    indices = torch.tensor(chosen, dtype=torch.long,
                                           device=self.buffer.param_buffer.device)
                    groups.append((table, indices, decoupled))
            self._decoupled_group_cache[bucket] = groups
        return self._decoupled_group_cache[bucket]

    def step(self, lr: float, measure_update_absorption: bool = False,
             decoupled_lr: Optional[float] = None,
             host_flags: Sequence[bool] = (), measure_params_norm: bool = False,
             count_zeros_in_grad: bool = False) -> StepResult:
        """One AdamW step at learning rate `lr` on the reduced grads.

        `host_flags`: this rank's booleans for the training loop's exit
        decisions; they travel in the grad-norm all-reduce and come back
        OR-ed over the world in `StepResult.host_flags` (read at the same host
        sync as the norm: no collective of their own).

        `decoupled_lr` (--decoupled-lr): the learning rate of the word
        embedding and the output layer instead of `lr`.

        The log-step statistics, each measured by every rank on its shard's
        counted segments (every model element on exactly one rank):
        `measure_update_absorption`: the fraction of stored elements (the
        master copy where there is one) whose update was non-zero but whose
        stored value did not change (RTN stagnation); `measure_params_norm`
        (--log-params-norm): the L2 norm of the stored values after the
        update; `count_zeros_in_grad` (--log-num-zeros-in-grad): the number of
        zero elements of the reduced gradients. With any of them the step has
        one fp64 all-reduce over the world more, of all of them together
        (exact counts up to 2**53), issued after the last bucket's update and
        before the parameter all-gathers (which then no longer overlap the
        updates); it is read at the step's one host sync.
        """
        self.buffer.finish_grad_sync()
        norm_and_flags = self._grad_norm(host_flags)
        grad_norm = norm_and_flags[0]
        grad_scale = self._grad_scale(grad_norm)
        zeros = self._zeros_in_grad() if count_zeros_in_grad else None
        reduce_statistics = measure_update_absorption or measure_params_norm or count_zeros_in_grad
        cfg = self.config
        grads = self.buffer.grad_buffer
        params = self.buffer.param_buffer
        # Adam's t and the SR stream of this step; taken back below if the step is skipped.
        self.step_count += 1
        keys = self._sr_keys(self.step_count)
        counts = torch.zeros(2, dtype=torch.float64, device=params.device)  # absorbed, updated
        for bucket in reversed(range(len(self._tables))):  # forward order, as the all-gathers
            table, first_key = self._tables[bucket], self._first_keys[bucket]
            start, end = self.buffer.shard_range(bucket)
            master = self.state["master"][bucket] if "master" in self.state else None
            stored = master if master is not None else params[start:end]
            before = stored.clone() if measure_update_absorption else None
            groups = ([(table, keys[first_key:first_key + len(table)], lr)]
                      if decoupled_lr is None else
                      [(group, keys[first_key + indices], decoupled_lr if decoupled else lr)
                       for group, indices, decoupled in self._decoupled_groups(bucket)])
            for segments, sr_keys, segments_lr in groups:
                adamw_shard_step(
                    self.strategy, params[start:end], grads[start:end],
                    self.state["exp_avg"][bucket], self.state["exp_avg_sq"][bucket],
                    master=master, kahan=self.state["kahan"][bucket] if "kahan" in self.state else None,
                    segments=segments, sr_keys=sr_keys, lr=segments_lr, beta1=cfg.adam_beta1,
                    beta2=cfg.adam_beta2, eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                    step=self.step_count, grad_scale=grad_scale)
            # At lr = 0 (the first warmup step) no update is non-zero: nothing is absorbed.
            if before is not None and lr > 0:
                counts += self._absorption_counts(bucket, before, stored)
            if not reduce_statistics:
                self.buffer.gather_bucket_params(bucket)
        read = norm_and_flags
        if reduce_statistics:
            parts = ([counts] if measure_update_absorption else []) + (
                [self._params_norm_squares()] if measure_params_norm else []) + (
                [zeros] if zeros is not None else [])
            statistics = torch.cat(parts)
            if dist.is_initialized():
                # Before the parameter all-gathers, so that reading it never waits for them.
                dist.all_reduce(statistics, group=self._norm_group)
            self.buffer.gather_params()
            read = torch.cat([norm_and_flags.double(), statistics])
        norm, *values = read.tolist()  # the step's host sync
        flags = tuple(count > 0 for count in values[:len(host_flags)])
        values = values[len(host_flags):]
        absorption = None
        if measure_update_absorption:
            (absorbed, updated), values = values[:2], values[2:]
            absorption = absorbed / updated if updated > 0 else 0.0
        params_norm = math.sqrt(values.pop(0)) if measure_params_norm else None
        num_zeros = int(values.pop(0)) if count_zeros_in_grad else None
        if not math.isfinite(norm):
            self.step_count -= 1
            self.skipped_steps += 1
            return StepResult(grad_norm=float("nan"), skipped=True, host_flags=flags,
                              params_norm=params_norm, num_zeros_in_grad=num_zeros)
        return StepResult(grad_norm=norm, skipped=False, update_absorption=absorption,
                          host_flags=flags, params_norm=params_norm, num_zeros_in_grad=num_zeros)

    def _counted_stored(self) -> list[torch.Tensor]:
        """This rank's counted segments (views) of the stored values: the fp32
        master copy where the strategy has one, else the parameters."""
        chosen = [segment for segment, counted in zip(self.buffer.segments, self._counted)
                  if counted]
        if "master" in self.state:
            return [self._segment_state(segment, "master") for segment in chosen]
        params = self.buffer.param_buffer
        return [params[segment.buffer_start:segment.buffer_end] for segment in chosen]

    def _params_norm_squares(self) -> torch.Tensor:
        """The squared L2 norm of this rank's counted stored values, an fp64
        tensor [1] on the device (fp32 norms per segment; no host sync)."""
        stored = self._counted_stored()
        device = self.buffer.param_buffer.device
        if not stored:
            return torch.zeros(1, dtype=torch.float64, device=device)
        norms = torch._foreach_norm(stored, 2, dtype=torch.float32)
        return torch.stack(norms).double().square().sum().reshape(1)

    def _zeros_in_grad(self) -> torch.Tensor:
        """The number of zero elements of this rank's counted reduced
        gradients (`_grad_norm` selected them), an fp64 tensor [1] on the
        device; one count kernel per segment, no host sync."""
        grads = self._counted_grads
        device = self.buffer.grad_buffer.device
        if not grads:
            return torch.zeros(1, dtype=torch.float64, device=device)
        nonzero = torch.stack([torch.count_nonzero(grad) for grad in grads]).sum()
        return (sum(grad.numel() for grad in grads) - nonzero).double().reshape(1)

    def _absorption_counts(self, bucket: int, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        """(absorbed, updated) element counts of one bucket shard's counted
        segments, from the stored values before and after the step."""
        counts = torch.zeros(2, dtype=torch.float64, device=after.device)
        for segment, counted in zip(self.buffer.segments, self._counted):
            if not counted or segment.bucket_index != bucket:
                continue
            shard = slice(segment.shard_start, segment.shard_start + segment.numel)
            moved = self._segment_state(segment, "exp_avg") != 0
            if self.config.weight_decay and self.buffer.infos[segment.param_index].weight_decay:
                moved |= before[shard] != 0
            counts[0] += (moved & (after[shard] == before[shard])).sum()
            counts[1] += moved.sum()
        return counts

    # ----- checkpoints ---------------------------------------------------------------------
    def _full_bucket(self, kind: str, bucket: int, dst: Optional[int]) -> Optional[torch.Tensor]:
        """The whole of bucket `bucket`'s `kind` state (1-D, its dtype): this
        rank's shard when it is not sharded; else gathered over the DP group:
        all-gathered when `dst` is None, gathered to DP rank `dst` only (None
        on the others). Every DP rank calls it with the same arguments."""
        shard = self.state[kind][bucket]
        if not self.buffer.distributed or self.buffer.dp_size == 1:
            return shard
        full = None
        if dst is None or self.buffer.dp_rank == dst:
            full = torch.empty(shard.numel() * self.buffer.dp_size, dtype=shard.dtype,
                               device=shard.device)
        if dst is None:
            all_gather_into(full, shard.contiguous(), group=self.buffer.group)
        else:
            pieces = list(full.chunk(self.buffer.dp_size)) if full is not None else None
            dist.gather(shard.contiguous(), pieces, group=self.buffer.group, group_dst=dst)
        return full

    def state_dict(self, dst: Optional[int] = None) -> Optional[dict]:
        """The optimizer state per parameter (full, unsharded tensors keyed by
        global name, on the CPU), so a checkpoint loads at any data-parallel size.
        Collective over the DP group (every DP rank calls it with the same `dst`).
        `dst` None: every DP rank gets the same dict (an all-gather of the
        shards); a DP-group rank: only that rank receives the other ranks'
        shards and gets the dict, the others send theirs and get None (the
        legacy checkpoint's writer)."""
        if dst is not None and self.buffer.dp_rank != dst and not (
                self.buffer.distributed and self.buffer.dp_size > 1):
            return None  # the state is replicated: nothing to send
        per_param: dict[str, dict[str, torch.Tensor]] = {}
        layout = self.buffer.layout
        for kind in self.state:
            for bucket, members in enumerate(layout.bucket_params):
                full = self._full_bucket(kind, bucket, dst)
                if full is None:
                    continue
                bucket_start = layout.bucket_ranges[bucket][0]
                for index in members:
                    start, end = layout.param_ranges[index]
                    param = self.buffer.params[index]
                    per_param.setdefault(self.buffer.infos[index].name, {})[kind] = (
                        full[start - bucket_start:end - bucket_start].view_as(param).clone().cpu())
        if dst is not None and self.buffer.dp_rank != dst:
            return None
        return {"strategy": self.strategy.name, "step": self.step_count,
                "skipped_steps": self.skipped_steps, "params": per_param}

    def state_segments(self):
        """Yields (parameter, kind, param_offset, state) for every segment of this
        rank's shard and every state kind: `state` is the 1-D view of this rank's
        optimizer state holding elements [param_offset, param_offset + numel) of
        the flattened TP-local parameter. No communication, no copy: a sharded
        checkpoint (`checkpointing.torch_dist`) saves into and loads from these
        views. Without the distributed optimizer every DP rank yields the whole
        parameters (replicated state)."""
        for segment in self.buffer.segments:
            param = self.buffer.params[segment.param_index]
            for kind in self.state:
                yield param, kind, segment.param_offset, self._segment_state(segment, kind)

    def load_state_dict(self, state: dict) -> None:
        """Restores what `state_dict` returned, at any data-parallel size.
        Raises ValueError naming the parameter and the mismatch."""
        saved = state["params"]
        for segment in self.buffer.segments:
            index = segment.param_index
            name = self.buffer.infos[index].name
            if name not in saved:
                raise ValueError(f"checkpoint has no optimizer state for parameter {name}")
            shape = tuple(self.buffer.params[index].shape)
            for kind in self.state:
                if kind not in saved[name]:
                    raise ValueError(
                        f"checkpoint optimizer state of {name} has no {kind!r} (it was saved with "
                        f"--precision {state.get('strategy')}, this run uses {self.strategy.name})")
                tensor = saved[name][kind]
                if tuple(tensor.shape) != shape:
                    raise ValueError(f"checkpoint optimizer state {kind!r} of {name} has shape "
                                     f"{tuple(tensor.shape)}, the model's parameter has {shape}")
                flat = tensor.reshape(-1)[segment.param_offset:segment.param_offset + segment.numel]
                self._segment_state(segment, kind).copy_(flat)
        self.step_count = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
