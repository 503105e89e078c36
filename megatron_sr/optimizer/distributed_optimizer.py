"""AdamW over the shards of a `ParamAndGradBuffer`: ZeRO-1 with stochastic rounding.

Every rank keeps the optimizer state (Adam m and v, the fp32 master copy for
bf16-mixed, the Kahan compensation for bf16-kahan) of its shard only, in the
dtypes of the precision strategy. One `step`:

1. finishes the gradient reduction (reduce-scatter over DP with the
   distributed optimizer, all-reduce without it);
2. computes the global grad norm from the shards with one all-reduce over
   the world, counting every model element once, and skips the step on every
   rank when it is NaN/Inf;
3. clips, then runs the fused `adamw_step` on each parameter segment of the
   shard, with the SR key of (seed, step, parameter name, TP rank if sharded)
   and the segment's offset inside its parameter, so the random bits do not
   depend on the data-parallel size or on the buffer layout;
4. all-gathers the updated parameters (distributed optimizer only).

All ranks of the world call `step`, `state_dict` and `load_state_dict`
together (they communicate).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_sr.config import OptimizerConfig
from megatron_sr.optimizer.param_buffer import ParamAndGradBuffer, ShardSegment, all_gather_into
from megatron_sr.precision.adamw import adamw_step
from megatron_sr.precision.strategies import PrecisionStrategy
from megatron_sr.random import sr_key

_STATE_KINDS = ("exp_avg", "exp_avg_sq", "master", "kahan")


@dataclass
class StepResult:
    """What one optimizer step did. grad_norm is before clipping;
    update_absorption is None unless measured (see `step`)."""

    grad_norm: float
    skipped: bool
    update_absorption: Optional[float] = None


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
    def _grad_norm(self) -> float:
        """Global L2 norm of the reduced grads; NaN/Inf propagate."""
        grads = self.buffer.grad_buffer
        # Accumulated on the grads' device: no host sync per segment.
        squares = torch.zeros((), dtype=torch.float64, device=grads.device)
        for segment, counted in zip(self.buffer.segments, self._counted):
            if counted:
                squares += grads[segment.buffer_start:segment.buffer_end].double().square().sum()
        if dist.is_initialized():
            dist.all_reduce(squares, group=self._norm_group)
        return math.sqrt(squares.item()) if math.isfinite(squares.item()) else float("nan")

    def step(self, lr: float, measure_update_absorption: bool = False) -> StepResult:
        """One AdamW step at learning rate `lr` on the reduced grads.

        With `measure_update_absorption`, also returns the fraction of stored
        elements (the master copy where there is one) whose update was
        non-zero but whose stored value did not change: RTN stagnation.
        """
        self.buffer.finish_grad_sync()
        grad_norm = self._grad_norm()
        if not math.isfinite(grad_norm):
            self.skipped_steps += 1
            return StepResult(grad_norm=grad_norm, skipped=True)
        cfg = self.config
        grads = self.buffer.grad_buffer
        if cfg.clip_grad > 0 and grad_norm > cfg.clip_grad:
            coef = cfg.clip_grad / (grad_norm + 1e-6)
            for bucket in range(len(self.buffer.layout.bucket_ranges)):
                start, end = self.buffer.shard_range(bucket)
                grads[start:end].mul_(coef)
        self.step_count += 1
        params = self.buffer.param_buffer
        absorbed = torch.zeros((), dtype=torch.float64, device=params.device)
        updated = torch.zeros((), dtype=torch.float64, device=params.device)
        for segment, counted in zip(self.buffer.segments, self._counted):
            info = self.buffer.infos[segment.param_index]
            param = params[segment.buffer_start:segment.buffer_end]
            master = self._segment_state(segment, "master")
            stored = master if master is not None else param
            before = stored.clone() if measure_update_absorption else None
            weight_decay = cfg.weight_decay if info.weight_decay else 0.0
            adamw_step(
                self.strategy, param, grads[segment.buffer_start:segment.buffer_end],
                self._segment_state(segment, "exp_avg"), self._segment_state(segment, "exp_avg_sq"),
                master=master, kahan=self._segment_state(segment, "kahan"),
                lr=lr, beta1=cfg.adam_beta1, beta2=cfg.adam_beta2, eps=cfg.adam_eps,
                weight_decay=weight_decay, step=self.step_count,
                sr_key=sr_key(self.seed, self.step_count, info.name, info.sr_tp_rank),
                offset=segment.param_offset)
            # At lr = 0 (the first warmup step) no update is non-zero: nothing is absorbed.
            if before is not None and lr > 0 and counted:
                moved = self._segment_state(segment, "exp_avg") != 0
                if weight_decay:
                    moved |= before != 0
                updated += moved.sum()
                absorbed += (moved & (stored == before)).sum()
        self.buffer.gather_params()
        absorption = None
        if measure_update_absorption:
            counts = torch.stack([absorbed, updated])
            if dist.is_initialized():
                dist.all_reduce(counts, group=self._norm_group)
            absorption = (counts[0] / counts[1]).item() if counts[1] > 0 else 0.0
        return StepResult(grad_norm=grad_norm, skipped=False, update_absorption=absorption)

    # ----- checkpoints ---------------------------------------------------------------------
    def _full_bucket(self, kind: str, bucket: int) -> torch.Tensor:
        shard = self.state[kind][bucket]
        if not self.buffer.distributed or self.buffer.dp_size == 1:
            return shard
        full = torch.empty(shard.numel() * self.buffer.dp_size, dtype=shard.dtype,
                           device=shard.device)
        all_gather_into(full, shard.contiguous(), group=self.buffer.group)
        return full

    def state_dict(self) -> dict:
        """The optimizer state per parameter (full, unsharded tensors keyed by
        global name), so a checkpoint loads at any data-parallel size.
        Collective over the DP group; every DP rank gets the same dict."""
        per_param: dict[str, dict[str, torch.Tensor]] = {}
        layout = self.buffer.layout
        for kind in self.state:
            for bucket, members in enumerate(layout.bucket_params):
                full = self._full_bucket(kind, bucket)
                bucket_start = layout.bucket_ranges[bucket][0]
                for index in members:
                    start, end = layout.param_ranges[index]
                    param = self.buffer.params[index]
                    per_param.setdefault(self.buffer.infos[index].name, {})[kind] = (
                        full[start - bucket_start:end - bucket_start].view_as(param).clone().cpu())
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
