"""The training loop: `train` runs steps until --train-iters or an exit,
`train_step` is one optimizer step, `evaluate` the validation loss, and
`LossAccumulator` keeps the training losses between log lines on the device.

A step on every rank: forward-backward over the step's micro-batches (the
pipeline schedule of `megatron_sr.pipeline_parallel`; with
--overlap-grad-reduce each bucket's DP reduction starts from the backward
hooks), then the optimizer: the DP reduction's end, the model-parallel grad
sums on the shard, AdamW (`DistributedOptimizer.step`). Every communicating
phase runs inside `communication_phase`, which names it when a rank stalls or
dies. What to save and when to stop is `RunPolicy`'s; what is logged is
`StepMetrics` (`megatron_sr.training_log`), written by the last rank.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_sr import checkpointing, fault_injection, metric_names, parallel_state
from megatron_sr.config import JobConfig
from megatron_sr.config import global_batch_size_at
from megatron_sr.model import flops_per_token
from megatron_sr.optimizer.distributed_optimizer import DistributedOptimizer
from megatron_sr.optimizer.lr_schedules import LRScheduler, learning_rate_at
from megatron_sr.pipeline_parallel import get_forward_backward_func
from megatron_sr.replica_check import check_replicas
from megatron_sr.training.communication import communication_phase
from megatron_sr.training.console import is_last_rank, print_rank_0, print_rank_last
from megatron_sr.training.data import DataStreams
from megatron_sr.training.forward_step import ForwardStep, make_forward_step
from megatron_sr.training.policy import RunPolicy, SignalFlag
from megatron_sr.training.progress import ProgressLog
from megatron_sr.training_log import (LogInterval, MetricsWriter, PhaseTimers, StepMetrics,
                                      StepProfiler, memory_scalars, open_metrics_writer,
                                      peak_memory_bytes, write_run_summary)


@dataclasses.dataclass
class StepReport:
    loss: Optional[float]  # mean over micro-batches and DP ranks; last stage only
    grad_norm: float
    skipped: bool
    update_absorption: Optional[float]
    exit_flags: tuple[bool, ...] = ()  # the step's `exit_flags`, OR-ed over all ranks
    params_norm: Optional[float] = None  # when the context measured it
    num_zeros_in_grad: Optional[int] = None  # when the context counted them


class LossAccumulator:
    """The training losses of the steps since the last log line, kept on the
    device so that no step waits for a loss. Last stage only: elsewhere nothing
    is added and the means are None.

    - `add(local_mean)`: an applied step's mean over its micro-batches on this
      rank (an fp32 device scalar).
    - `start_reduction(step_loss)`: on a step whose loss is read (a log step),
      before its optimizer step: one async all-reduce over the DP group of
      [sum of the losses added so far, this step's loss]. Queued ahead of the
      step's parameter all-gathers (NCCL runs a communicator's collectives in
      order), so reading it never waits for them and the next forward still
      overlaps them.
    - `finish_reduction(applied)`: after the optimizer step (and after `add`
      of an applied step): waits, reads both (one host sync), returns this
      step's DP-mean loss and keeps the interval's mean for the log line.
    - `mean_over_data_parallel()`: at the log line: the mean over the
      interval's applied steps and the DP ranks, from that reduction when it
      covers every added loss, else by one all-reduce and host sync here;
      None when no step was added. Starts the next interval.
    """

    def __init__(self):
        self.values: list[torch.Tensor] = []
        self._pending: Optional[tuple] = None  # (work, [sum, step loss], losses covered)
        self._reduced: Optional[tuple[float, int]] = None  # (interval mean, losses covered)

    def add(self, local_mean: torch.Tensor) -> None:
        self.values.append(local_mean)

    def start_reduction(self, step_loss: torch.Tensor) -> None:
        added = torch.stack(self.values).sum() if self.values else torch.zeros_like(step_loss)
        sums = torch.stack([added, step_loss.float()])
        work = dist.all_reduce(sums, group=parallel_state.get_data_parallel_group(),
                               async_op=True)
        self._pending = (work, sums, len(self.values))

    def finish_reduction(self, applied: bool) -> float:
        (work, sums, covered), self._pending = self._pending, None
        work.wait()
        interval_sum, step_loss = (sums / parallel_state.get_data_parallel_world_size()).tolist()
        if applied:
            interval_sum, covered = interval_sum + step_loss, covered + 1
        self._reduced = (interval_sum / covered, covered) if covered else None
        return step_loss

    def mean_over_data_parallel(self) -> Optional[float]:
        values, self.values = self.values, []
        reduced, self._reduced = self._reduced, None
        if not values:
            return None
        if reduced is not None and reduced[1] == len(values):
            return reduced[0]
        return _average_over_dp(values, values[0].device)


def _local_mean(values: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """This rank's mean micro-batch loss, an fp32 device scalar (None without losses)."""
    return torch.stack([v.float() for v in values]).mean() if values else None


def _average_over_dp(values: list[torch.Tensor], device) -> Optional[float]:
    """Mean of this rank's micro-batch losses, averaged over the DP group;
    None on ranks without the last stage (which pass an empty list)."""
    if not values:
        return None
    local = torch.stack([v.float() for v in values]).mean().to(device)
    dist.all_reduce(local, group=parallel_state.get_data_parallel_group())
    return local.item() / parallel_state.get_data_parallel_world_size()


@dataclasses.dataclass
class StepContext:
    """What the loop tells `train_step` about the step it runs (all optional).

    iteration: 1-based, as logged; names the step in errors.
    loss_accumulator: an applied step adds this rank's micro-batch mean to it.
    measure_update_absorption: the optimizer measures it (the loop's log steps).
    measure_params_norm, count_zeros_in_grad: the optimizer measures the params
        norm and counts the zero gradient elements (--log-params-norm,
        --log-num-zeros-in-grad, on the loop's log steps), together with the
        update absorption (`DistributedOptimizer.step`).
    timers: time the phases (--log-timers-to-tensorboard).
    num_microbatches: per data-parallel rank (None: the job's; --rampup-batch-size
        and --step-batch-size-schedule vary it).
    exit_flags: called on this rank after the forward-backward; its booleans
        ride in the optimizer's grad-norm all-reduce and come back OR-ed over all
        ranks in `StepReport.exit_flags` (no collective of their own).
    """

    iteration: Optional[int] = None
    loss_accumulator: Optional[LossAccumulator] = None
    measure_update_absorption: bool = False
    measure_params_norm: bool = False
    count_zeros_in_grad: bool = False
    timers: Optional[PhaseTimers] = None
    num_microbatches: Optional[int] = None
    exit_flags: Optional[Callable[[], Sequence[bool]]] = None


def train_step(job: JobConfig, model, optimizer: DistributedOptimizer, iterators, lr: float,
               forward_step, decoupled_lr: Optional[float] = None,
               reduce_loss: Optional[bool] = None,
               context: Optional[StepContext] = None) -> StepReport:
    """One optimizer step on every rank (module docstring) at learning rate
    `lr`; `decoupled_lr` (--decoupled-lr) is the embedding and output layer's.
    `context`: see `StepContext` (None: a step on its own).
    Loss: `reduce_loss` (default: when the context has no accumulator; the
    loop passes its log steps) averages this rank's micro-batch mean over DP
    into `StepReport.loss`: one all-reduce, issued before the optimizer step
    together with the accumulator's interval sum
    (`LossAccumulator.start_reduction`), and one host sync after it. A skipped
    step always reports its loss, so that a NaN loss is seen (all DP ranks
    skip together)."""
    context = context or StepContext()
    timers = context.timers or PhaseTimers(False, torch.device("cpu"))
    num_microbatches = context.num_microbatches or job.num_microbatches
    iteration, accumulated = context.iteration, context.loss_accumulator
    optimizer.buffer.zero_grad()
    optimizer.buffer.prepare_grad_sync(num_microbatches)
    for chunk in model:
        chunk.train()
    forward_backward = get_forward_backward_func()
    if isinstance(forward_step, ForwardStep):
        with communication_phase(job, "loss-token count all-reduce", iteration):
            iterators = forward_step.prepare_step(iterators, model, num_microbatches)
    with communication_phase(job, "forward-backward (pipeline p2p, tensor-parallel collectives)",
                             iteration), timers.phase("forward-backward"):
        losses = forward_backward(forward_step_func=forward_step, data_iterator=iterators,
                                  model=model, num_microbatches=num_microbatches,
                                  seq_length=job.model.seq_length,
                                  micro_batch_size=job.training.micro_batch_size)
    fault_injection.at("train-step", iteration)
    local_loss = _local_mean(losses)
    read_loss = (accumulated is None if reduce_loss is None else reduce_loss) \
        and local_loss is not None
    accumulator = accumulated if accumulated is not None else LossAccumulator()
    if read_loss:
        with communication_phase(job, "loss averaging", iteration):
            accumulator.start_reduction(local_loss)
    with communication_phase(job, "optimizer step", iteration), timers.phase("optimizer"):
        result = optimizer.step(lr, measure_update_absorption=context.measure_update_absorption,
                                decoupled_lr=decoupled_lr,
                                host_flags=context.exit_flags() if context.exit_flags else (),
                                measure_params_norm=context.measure_params_norm,
                                count_zeros_in_grad=context.count_zeros_in_grad)
    if accumulated is not None and local_loss is not None and not result.skipped:
        accumulated.add(local_loss)
    loss = None
    with communication_phase(job, "loss averaging", iteration):
        if read_loss:
            loss = accumulator.finish_reduction(applied=not result.skipped)
        elif result.skipped:
            loss = _average_over_dp(losses, optimizer.buffer.param_buffer.device)
    return StepReport(loss=loss, grad_norm=result.grad_norm,
                      skipped=result.skipped, update_absorption=result.update_absorption,
                      exit_flags=result.host_flags, params_norm=result.params_norm,
                      num_zeros_in_grad=result.num_zeros_in_grad)


@torch.no_grad()
def evaluate(job: JobConfig, model, iterators, forward_step) -> Optional[float]:
    """Mean validation loss over --eval-iters steps (last stage; None elsewhere)."""
    device = parallel_state.get_default_device()
    for chunk in model:
        chunk.eval()
    forward_backward = get_forward_backward_func()
    losses = []
    for _ in range(job.training.eval_iters):
        losses += forward_backward(forward_step_func=forward_step, data_iterator=iterators,
                                   model=model, num_microbatches=job.num_microbatches,
                                   seq_length=job.model.seq_length,
                                   micro_batch_size=job.training.micro_batch_size,
                                   forward_only=True)
    for chunk in model:
        chunk.train()
    return _average_over_dp(losses, device)


def run_evaluation(job: JobConfig, model, data: DataStreams, forward_step, iteration: int,
                   metrics: Optional[MetricsWriter], consumed_samples: Optional[int] = None,
                   split: str = "valid") -> Optional[float]:
    """Evaluates on the validation split ("valid") or the test split ("test")
    from its start; prints loss and perplexity and, for the validation split
    with `metrics` (None: none written), writes the loss scalar (and the
    perplexity's with --log-validation-ppl-to-tensorboard)."""
    iterators = data.valid_iterators() if split == "valid" else data.test_iterators()
    with communication_phase(job, "evaluation" if split == "valid" else "test evaluation",
                             iteration):
        loss = evaluate(job, model, iterators, forward_step)
    if loss is not None and is_last_rank():
        ppl = math.exp(min(20.0, loss))
        where = "" if split == "valid" else " on test set"
        line = f"validation loss at iteration {iteration}{where} | lm loss value: {loss:.6E} | " \
               f"lm loss PPL: {ppl:.6E} |"
        print("-" * len(line) + "\n" + line + "\n" + "-" * len(line), flush=True)
        if metrics is not None and split == "valid":
            metrics.scalar(metric_names.VALID_LOSS, loss, iteration, consumed_samples)
            if job.training.log_validation_ppl_to_tensorboard:
                metrics.scalar(metric_names.VALID_PPL, ppl, iteration, consumed_samples)
    return loss


def save(job: JobConfig, iteration: int, consumed_samples: int, model, optimizer, scheduler):
    """`checkpointing.save_training_checkpoint` on every rank, with its log line."""
    start = time.perf_counter()
    with communication_phase(job, "checkpoint save", iteration):
        path = checkpointing.save_training_checkpoint(job, iteration, consumed_samples, model,
                                                      optimizer, scheduler)
    done = f"saved iteration {iteration} to {path}" if path else \
        f"writing iteration {iteration} in the background (--async-save)"
    print_rank_0(f"[checkpoint] {done} ({time.perf_counter() - start:.2f} s)")


def decoupled_lr_at(job: JobConfig, iteration: int) -> Optional[float]:
    """--decoupled-lr's schedule at step `iteration` (0-based): this run's
    schedule shape from --decoupled-lr down to --decoupled-min-lr (default
    --min-lr); None without --decoupled-lr."""
    opt = job.optimizer
    if opt.decoupled_lr is None:
        return None
    decoupled = dataclasses.replace(
        opt, lr=opt.decoupled_lr,
        min_lr=opt.min_lr if opt.decoupled_min_lr is None else opt.decoupled_min_lr)
    return learning_rate_at(iteration, decoupled, job.training.train_iters)


def consumed_after(job: JobConfig, consumed_samples: int, steps: int) -> int:
    """Consumed samples after `steps` more steps (global batch sizes may ramp up)."""
    for _ in range(steps):
        consumed_samples += global_batch_size_at(job.training, consumed_samples)
    return consumed_samples


def open_job_metrics(job: JobConfig) -> MetricsWriter:
    """TensorBoard / wandb writer on the last rank (inactive elsewhere)."""
    return open_metrics_writer(job.training, is_last_rank(),
                               run_config=checkpointing.job_description(job))


class _TrainingRun:
    """The state of one `train` call: the forward steps, the policy, the
    loss accumulator and log interval, the timers, the profiler and the
    progress log (--log-progress)."""

    def __init__(self, job: JobConfig, model, optimizer: DistributedOptimizer,
                 scheduler: LRScheduler, data: DataStreams, forward_step_func: Optional[Callable],
                 metrics: MetricsWriter, policy: RunPolicy,
                 progress: Optional[ProgressLog] = None):
        self.job, self.model, self.optimizer, self.scheduler = job, model, optimizer, scheduler
        self.data, self.metrics, self.policy, self.progress = data, metrics, policy, progress
        training = job.training
        self.device = parallel_state.get_default_device()
        self.forward_step, self.nan_grad_step = (
            make_forward_step(optimizer.strategy, self.device, nan_gradients=nan,
                              forward_step_func=forward_step_func,
                              per_token_loss=training.calculate_per_token_loss)
            for nan in (False, True))
        self.nan_grad_iterations = fault_injection.nan_grad_iterations()
        if metrics.writer is not None:
            write_run_summary(metrics.writer, job, optimizer)
        self.timers = PhaseTimers(training.log_timers_to_tensorboard and is_last_rank(),
                                  self.device)
        self.profiler = StepProfiler(training, dist.get_rank(), self.device)
        self.flops_per_sample = flops_per_token(job.model) * job.model.seq_length
        self.losses, self.interval, self.nan_iterations = LossAccumulator(), LogInterval(), 0

    def run(self, iteration: int, consumed_samples: int) -> tuple[int, bool]:
        """Steps from `iteration` to --train-iters or an exit (see `train`)."""
        training, policy = self.job.training, self.policy
        iterators = self.data.train_iterators(consumed_samples)
        while iteration < training.train_iters:
            batch_size = global_batch_size_at(training, consumed_samples)
            report, lr = self._step(iterators, iteration + 1, batch_size)
            iteration += 1
            consumed_samples += batch_size
            self.scheduler.step()
            self.nan_iterations += int(report.skipped and report.loss is not None
                                       and not math.isfinite(report.loss))
            policy.after_step(iteration, report.skipped, report.grad_norm)
            if iteration % training.log_interval == 0:
                self._log(report, iteration, consumed_samples, batch_size, lr)
            self._periodic(iteration, consumed_samples)
            reason = policy.exit_reason(iteration, report.exit_flags)
            if reason is not None:
                if policy.save_at_exit(iteration):
                    self._save(iteration, consumed_samples)
                print_rank_0(f"[exit] {reason} at iteration {iteration}")
                return iteration, True
        if policy.save_at_end(iteration):
            self._save(iteration, consumed_samples)
        return iteration, False

    def _step(self, iterators, iteration: int, batch_size: int) -> tuple[StepReport, float]:
        """Step `iteration` (1-based) of `batch_size` samples, profiled and
        timed; returns its report and learning rate."""
        training = self.job.training
        lr = self.scheduler.get_lr()
        log_now = iteration % training.log_interval == 0
        start = time.perf_counter()
        self.profiler.before_step(iteration)
        samples_per_microbatch_step = training.micro_batch_size * self.job.data_parallel_size
        context = StepContext(iteration=iteration, loss_accumulator=self.losses,
                              measure_update_absorption=log_now, timers=self.timers,
                              measure_params_norm=log_now and training.log_params_norm,
                              count_zeros_in_grad=log_now and training.log_num_zeros_in_grad,
                              num_microbatches=batch_size // samples_per_microbatch_step,
                              exit_flags=self.policy.exit_flags)
        report = train_step(self.job, self.model, self.optimizer, iterators, lr,
                            self.nan_grad_step if iteration in self.nan_grad_iterations
                            else self.forward_step,
                            decoupled_lr=decoupled_lr_at(self.job, self.scheduler.iteration),
                            reduce_loss=log_now, context=context)
        self.profiler.after_step(iteration)
        self.interval.add(time.perf_counter() - start, batch_size)
        return report, lr

    def _log(self, report: StepReport, iteration: int, consumed_samples: int, batch_size: int,
             lr: float) -> None:
        """The log line and scalars of the interval ending at `iteration`."""
        steps, samples, seconds = self.interval.take()
        with communication_phase(self.job, "loss averaging", iteration):
            loss = self.losses.mean_over_data_parallel()
        tflops = self.flops_per_sample * samples / seconds / dist.get_world_size() / 1e12
        phases = ({name: total / steps for name, total in self.timers.pop().items()}
                  if self.timers.enabled else None)
        values = StepMetrics(
            iteration=iteration, train_iters=self.job.training.train_iters,
            consumed_samples=consumed_samples, step_seconds=seconds / steps,
            tflops_per_device=tflops, tokens_per_s=samples * self.job.model.seq_length / seconds,
            lr=lr, global_batch_size=batch_size, world_size=self.job.world_size,
            loss=loss, grad_norm=report.grad_norm,
            skipped_iterations=self.optimizer.skipped_steps, nan_iterations=self.nan_iterations,
            update_absorption=report.update_absorption,
            peak_memory_bytes=peak_memory_bytes(self.device), phase_seconds=phases,
            params_norm=report.params_norm, num_zeros_in_grad=report.num_zeros_in_grad,
            memory=(memory_scalars(self.device)
                    if self.job.training.log_memory_to_tensorboard else None))
        print_rank_last(values.log_line())
        self.metrics.step(values)

    def _periodic(self, iteration: int, consumed_samples: int) -> None:
        """--eval-interval, --check-weight-hash-across-dp-replicas-interval and
        --save-interval, after step `iteration`."""
        training = self.job.training
        if training.eval_interval and iteration % training.eval_interval == 0 \
                and self.data.valid is not None:
            run_evaluation(self.job, self.model, self.data, self.forward_step, iteration,
                           self.metrics, consumed_samples)
        if training.check_weight_hash_interval \
                and iteration % training.check_weight_hash_interval == 0:
            self.optimizer.buffer.wait_param_gather()
            with communication_phase(self.job, "replica check", iteration):
                check_replicas(self.model, iteration)
        if self.policy.save_at_interval(iteration):
            self._save(iteration, consumed_samples)

    def _save(self, iteration: int, consumed_samples: int) -> None:
        save(self.job, iteration, consumed_samples, self.model, self.optimizer, self.scheduler)
        if self.progress is not None:
            self.progress.checkpoint_saved(iteration, consumed_samples,
                                           self.job.training.async_save)


def train(job: JobConfig, model, optimizer: DistributedOptimizer, scheduler: LRScheduler,
          data: DataStreams, start_iteration: int, consumed_samples: int,
          forward_step_func: Optional[Callable] = None,
          metrics: Optional[MetricsWriter] = None,
          exit_flag: Optional[SignalFlag] = None,
          job_start_time: Optional[float] = None) -> tuple[int, bool]:
    """Runs steps until --train-iters or an exit condition; returns (last
    iteration, whether an exit condition stopped it early). Saves with --save
    at --save-interval and on every exit (`RunPolicy`). All ranks call it.
    `forward_step_func`: see `pretrain`.
    `metrics`: the caller's writer (left open); None: one opened and closed here.
    `exit_flag`: the caller's signal flag, installed before set-up so that a
    signal then is not lost (left installed); None: one installed and restored
    here. `job_start_time` (time.time()): where --exit-duration-in-mins counts
    from, as Megatron-LM counts from the job's start; None: this call's start."""
    own_metrics = metrics is None
    metrics = open_job_metrics(job) if own_metrics else metrics
    own_flag = exit_flag is None
    signals = SignalFlag(job.training.exit_signal) if own_flag else exit_flag
    start_time = time.time() if job_start_time is None else job_start_time
    run = None
    try:
        progress = None
        if job.training.log_progress and job.training.save:
            progress = ProgressLog(job.training.save, job.world_size, dist.get_rank(),
                                   job.model.seq_length,
                                   flops_per_token(job.model) * job.model.seq_length,
                                   start_time, consumed_samples)
        run = _TrainingRun(job, model, optimizer, scheduler, data, forward_step_func, metrics,
                           RunPolicy(job.training, start_iteration, signals, start_time),
                           progress)
        return run.run(start_iteration, consumed_samples)
    finally:
        if own_flag:
            signals.restore()
        if run is not None:
            run.profiler.close()
        if own_metrics:
            metrics.close()
