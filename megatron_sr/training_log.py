"""What a Megatron-LM user reads from a training run: the log line, the
TensorBoard scalars, Weights & Biases, per-phase timers and the profiler.

All of it is written by the last rank (it holds the loss), except the
profiler, which records on the ranks of --profile-ranks.

Log line, Megatron's fields in Megatron's order and formats, then ours:

     [2026-11-30 02:30:00.123456] iteration       10/     100 | consumed samples:          80 |
     elapsed time per iteration (ms): 512.3 | throughput per GPU (TFLOP/s/GPU): 0.1 |
     learning rate: 1.000000E-04 | global batch size:     8 | lm loss: 5.123456E+00 |
     loss scale: 1.0 | grad norm: 0.812 | number of skipped iterations:   0 |
     number of nan iterations:   0 | throughput (tokens/s): 1234.5 | update absorption: 0.0123 |

(one line; "loss scale" is always 1.0: no bf16 strategy scales the loss).

TensorBoard (`MetricsWriter`): Megatron's tags `learning-rate`, `batch-size`,
`lm loss`, `loss-scale`, `world-size`, `grad-norm`, each also as
"<tag> vs samples" (x axis: consumed samples); `iteration-time` and
`throughput` (TFLOP/s per device) and "<timer>-time" with
--log-timers-to-tensorboard; `lm loss validation` (and with
--log-validation-ppl-to-tensorboard `lm loss validation ppl`), each with its
"vs samples"; `params-norm` (--log-params-norm) and `num-zeros`
(--log-num-zeros-in-grad), also in the log line after "grad norm", with
their "vs samples"; the memory scalars of `memory_scalars`
(--log-memory-to-tensorboard). Ours beside them: `throughput/tokens-per-s`,
`throughput/tflops-per-device`, `update-absorption`, `skipped-iterations`,
`nan-iterations`, `consumed-samples`, `memory/peak-bytes`. With
--wandb-project (and --wandb-entity) every scalar also goes to Weights &
Biases (`wandb` is an optional dependency; WANDB_MODE=offline works without a
network). The tag
strings live in the torch-free `megatron_sr.metric_names`, which
tools/compare_runs.py reads too.

A log step's values travel as one `StepMetrics` (the log line and the
scalars); `LogInterval` measures the steps since the last log line; the run's
description and training-state sizes are written once (`write_run_summary`,
`memory_report`).
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import time
from contextlib import contextmanager
from typing import Optional

import torch

from megatron_sr import metric_names as tags


def format_log_line(*, iteration: int, train_iters: int, consumed_samples: int, elapsed_ms: float,
                    tflops_per_device: float, lr: float, global_batch_size: int,
                    loss: Optional[float], grad_norm: float, skipped: int, nan_iterations: int,
                    tokens_per_s: float, update_absorption: Optional[float],
                    num_zeros_in_grad: Optional[int] = None, params_norm: Optional[float] = None,
                    now: Optional[datetime.datetime] = None) -> str:
    """Megatron's training log line with our fields appended (module docstring);
    "num zeros" (printed as Megatron prints its float count) and "params norm"
    follow "grad norm" when given."""
    now = now or datetime.datetime.now()
    parts = [f" [{now.strftime('%Y-%m-%d %H:%M:%S.%f')}] iteration {iteration:8d}/{train_iters:8d}",
             f"consumed samples: {consumed_samples:12d}",
             f"elapsed time per iteration (ms): {elapsed_ms:.1f}",
             f"throughput per GPU (TFLOP/s/GPU): {tflops_per_device:.1f}",
             f"learning rate: {lr:.6E}",
             f"global batch size: {global_batch_size:5d}"]
    if loss is not None:
        parts.append(f"lm loss: {loss:.6E}")
    parts += [f"loss scale: {1.0:.1f}", f"grad norm: {grad_norm:.3f}"]
    if num_zeros_in_grad is not None:
        parts.append(f"num zeros: {float(num_zeros_in_grad)}")
    if params_norm is not None:
        parts.append(f"params norm: {params_norm:.3f}")
    parts += [f"number of skipped iterations: {skipped:3d}",
              f"number of nan iterations: {nan_iterations:3d}",
              f"throughput (tokens/s): {tokens_per_s:.1f}"]
    if update_absorption is not None:
        parts.append(f"update absorption: {update_absorption:.4f}")
    return " | ".join(parts) + " |"


@dataclasses.dataclass(frozen=True)
class StepMetrics:
    """What the logging rank reports at a log step (module docstring): the
    log line (`log_line`) and the same values as scalars (`scalars`).
    `step_seconds` and `phase_seconds` are means per step over the interval
    since the last log line; `phase_seconds` is None without
    --log-timers-to-tensorboard. `loss` and `update_absorption` may be None
    (no last stage on this rank; absorption not measured); `params_norm`,
    `num_zeros_in_grad` and `memory` ({tag: value} of `memory_scalars`) are
    None without their flags."""

    iteration: int
    train_iters: int
    consumed_samples: int
    step_seconds: float
    tflops_per_device: float
    tokens_per_s: float
    lr: float
    global_batch_size: int
    world_size: int
    loss: Optional[float]
    grad_norm: float
    skipped_iterations: int
    nan_iterations: int
    update_absorption: Optional[float]
    peak_memory_bytes: int
    phase_seconds: Optional[dict[str, float]] = None
    params_norm: Optional[float] = None
    num_zeros_in_grad: Optional[int] = None
    memory: Optional[dict[str, int]] = None

    def log_line(self, now: Optional[datetime.datetime] = None) -> str:
        return format_log_line(
            iteration=self.iteration, train_iters=self.train_iters,
            consumed_samples=self.consumed_samples, elapsed_ms=self.step_seconds * 1000,
            tflops_per_device=self.tflops_per_device, lr=self.lr,
            global_batch_size=self.global_batch_size, loss=self.loss, grad_norm=self.grad_norm,
            skipped=self.skipped_iterations, nan_iterations=self.nan_iterations,
            tokens_per_s=self.tokens_per_s, update_absorption=self.update_absorption,
            num_zeros_in_grad=self.num_zeros_in_grad, params_norm=self.params_norm, now=now)

    def scalars(self) -> dict[str, float]:
        """{tag: value} of this step, the tags of `megatron_sr.metric_names`."""
        scalars = {tags.LEARNING_RATE: self.lr, tags.BATCH_SIZE: self.global_batch_size,
                   tags.LOSS_SCALE: 1.0, tags.WORLD_SIZE: self.world_size,
                   tags.GRAD_NORM: self.grad_norm, tags.TOKENS_PER_S: self.tokens_per_s,
                   tags.TFLOPS_PER_DEVICE: self.tflops_per_device,
                   tags.SKIPPED_ITERATIONS: self.skipped_iterations,
                   tags.NAN_ITERATIONS: self.nan_iterations,
                   tags.CONSUMED_SAMPLES: self.consumed_samples,
                   tags.PEAK_BYTES: self.peak_memory_bytes}
        if self.loss is not None:
            scalars[tags.TRAIN_LOSS] = self.loss
        if self.update_absorption is not None:
            scalars[tags.ABSORPTION] = self.update_absorption
        if self.params_norm is not None:
            scalars[tags.PARAMS_NORM] = self.params_norm
        if self.num_zeros_in_grad is not None:
            scalars[tags.NUM_ZEROS] = self.num_zeros_in_grad
        if self.memory is not None:
            scalars.update(self.memory)
        if self.phase_seconds is not None:
            scalars[tags.ITERATION_TIME] = self.step_seconds
            scalars[tags.THROUGHPUT] = self.tflops_per_device
            scalars.update({tags.timer_tag(name): seconds
                            for name, seconds in self.phase_seconds.items()})
        return scalars


class LogInterval:
    """The steps since the last log line: their wall time and samples.
    `add(seconds, samples)` after each step; `take()` at a log step returns
    (steps, samples, seconds) and starts the next interval."""

    def __init__(self):
        self.seconds, self.steps, self.samples = 0.0, 0, 0

    def add(self, seconds: float, samples: int) -> None:
        self.seconds += seconds
        self.steps += 1
        self.samples += samples

    def take(self) -> tuple[int, int, float]:
        taken = (self.steps, self.samples, self.seconds)
        self.seconds, self.steps, self.samples = 0.0, 0, 0
        return taken


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak memory so far: torch.cuda.max_memory_allocated on
    CUDA, else the peak resident set size (ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def memory_scalars(device: torch.device) -> dict[str, int]:
    """--log-memory-to-tensorboard's {tag: value} for this process now. On
    CUDA the caching allocator's statistics of `device` (Megatron's four
    tags: bytes allocated now and at peak, bytes reserved, live allocations);
    on a CPU, which has no allocator statistics, the resident memory now and
    at peak (VmRSS and VmHWM of /proc/self/status) as the allocated bytes.
    Host-side reads only, no device sync."""
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        return {tags.MEM_RESERVED: stats["reserved_bytes.all.current"],
                tags.MEM_ALLOCATED: stats["allocated_bytes.all.current"],
                tags.MEM_MAX_ALLOCATED: stats["allocated_bytes.all.peak"],
                tags.MEM_ALLOCATED_COUNT: stats["allocation.all.current"]}
    kib = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                kib[name] = int(value.split()[0])
    return {tags.MEM_ALLOCATED: kib["VmRSS"] * 1024, tags.MEM_MAX_ALLOCATED: kib["VmHWM"] * 1024}


def memory_report(optimizer) -> dict[str, int]:
    """This rank's training-state bytes of `optimizer` (a DistributedOptimizer):
    params, grads, master, optimizer, total."""
    sizes = optimizer.memory_bytes()
    sizes["total"] = sum(sizes.values())
    return sizes


def format_memory_report(precision: str, reports: list[dict[str, int]]) -> str:
    """The set-up line of the largest of the ranks' `memory_report`s."""
    worst = max(reports, key=lambda r: r["total"])
    mib = 1 << 20
    fields = " | ".join(f"{k}: {worst[k] / mib:.2f} MiB" for k in
                        ("params", "grads", "master", "optimizer", "total"))
    return (f"[memory] training state per rank (max over {len(reports)} ranks), "
            f"--precision {precision}: {fields}")


def write_run_summary(writer, job, optimizer) -> None:
    """TensorBoard records of what the run `job` (a JobConfig) is, written once
    at start by the logging rank: text "run/config" (precision, LR schedule,
    sizes, layout) and scalars "memory/<kind>-bytes" of this rank's training
    state (`memory_report` of `optimizer`), so that tools/compare_runs.py can
    label and tabulate runs from the event files."""
    opt, model, training = job.optimizer, job.model, job.training
    rows = {"precision": opt.precision, "lr": opt.lr, "min-lr": opt.min_lr,
            "lr-decay-style": opt.lr_decay_style, "lr-warmup-iters": opt.lr_warmup_iters,
            "weight-decay": opt.weight_decay, "train-iters": training.train_iters,
            "global-batch-size": training.global_batch_size,
            "micro-batch-size": training.micro_batch_size, "seed": training.seed,
            "grad-reduce-dtype": opt.grad_reduce_dtype or "strategy default",
            "grad-accumulation-rounding": opt.grad_accumulation_rounding,
            "seq-length": model.seq_length,
            "num-layers": model.num_layers, "hidden-size": model.hidden_size,
            "world-size": job.world_size,
            "tensor-model-parallel-size": job.parallel.tensor_model_parallel_size,
            "pipeline-model-parallel-size": job.parallel.pipeline_model_parallel_size}
    writer.add_text(tags.CONFIG_TEXT, "\n".join(f"{k}: {v}" for k, v in rows.items()), 0)
    for kind, size in memory_report(optimizer).items():
        writer.add_scalar(tags.memory_tag(kind), size, 0)


class MetricsWriter:
    """TensorBoard (--tensorboard-dir) and Weights & Biases (--wandb-project)
    scalars of the logging rank; a no-op where neither is configured.

    `scalar(tag, value, iteration, consumed_samples)` writes `tag` at step
    `iteration`, and for the tags of `metric_names.VS_SAMPLES_TAGS` also "<tag> vs
    samples" at step `consumed_samples`. `writer` is the SummaryWriter (None
    without --tensorboard-dir), for the records other than scalars.
    """

    def __init__(self, writer, wandb_run=None):
        self.writer = writer
        self.wandb_run = wandb_run

    def scalar(self, tag: str, value: float, iteration: int,
               consumed_samples: Optional[int] = None) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, iteration)
            if consumed_samples is not None and tag in tags.VS_SAMPLES_TAGS:
                self.writer.add_scalar(f"{tag} vs samples", value, consumed_samples)
        if self.wandb_run is not None:
            self.wandb_run.log({tag: value}, step=iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()

    def step(self, values: StepMetrics) -> None:
        """The scalars of a log step, at its iteration and consumed samples."""
        for tag, value in values.scalars().items():
            self.scalar(tag, value, values.iteration, values.consumed_samples)


def open_metrics_writer(training, is_logging_rank: bool, run_config: Optional[dict] = None
                        ) -> MetricsWriter:
    """The logging rank's writer for `training` (a TrainingConfig): TensorBoard
    with --tensorboard-dir, wandb with --wandb-project (ImportError naming the
    package when it is missing). Other ranks get an inactive writer."""
    if not is_logging_rank:
        return MetricsWriter(None)
    writer = None
    if training.tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=training.tensorboard_dir, max_queue=100)
    wandb_run = None
    if training.wandb_project:
        try:
            import wandb
        except ImportError as error:
            raise ImportError("--wandb-project needs the `wandb` package: pip install wandb") \
                from error
        save_dir = training.wandb_save_dir or os.path.join(training.save or ".", "wandb")
        os.makedirs(save_dir, exist_ok=True)
        wandb_run = wandb.init(project=training.wandb_project, entity=training.wandb_entity,
                               name=training.wandb_exp_name, dir=save_dir,
                               config=run_config or {}, reinit="finish_previous")
    return MetricsWriter(writer, wandb_run)


class PhaseTimers:
    """Time of the phases of a step (--log-timers-to-tensorboard).

    `phase(name)` times a block. On the CPU: the host's wall time of the
    block. On CUDA: a timing event on the current stream at each end, so the
    time is the device's, from where the block's work starts on the stream to
    where it ends (waits in between included), and no phase synchronizes the
    device; `pop()` waits for the interval's events (one synchronization, at
    log steps). `pop()` returns {name: seconds summed since the last pop} and
    resets. Host-side only: no communication (Megatron reports the max over
    ranks; this is the logging rank's own time).
    """

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = {}
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self._events.append((name, start, end))
            return
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - begin

    def pop(self) -> dict[str, float]:
        for name, start, end in self._events:
            end.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + start.elapsed_time(end) / 1e3
        self._events = []
        seconds, self.seconds = self.seconds, {}
        return seconds


class StepProfiler:
    """--profile: the torch profiler over iterations [--profile-step-start,
    --profile-step-end) on the ranks of --profile-ranks; the trace is written
    to --tensorboard-dir (TensorBoard's profiler plugin reads it), or to
    ./profile without one.

    The loop calls `before_step(iteration)` with the 1-based iteration about
    to run and `after_step(iteration)` once it is done; `close()` stops a
    profile the run left open.
    """

    def __init__(self, training, rank: int, device: torch.device):
        self.start, self.end = training.profile_step_start, training.profile_step_end
        self.enabled = training.profile and rank in training.profile_ranks
        self.folder = training.tensorboard_dir or "profile"
        self.device = device
        self.profiler = None

    def before_step(self, iteration: int) -> None:
        if self.enabled and self.profiler is None and iteration == self.start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(
                activities=activities, record_shapes=True, with_stack=False,
                on_trace_ready=torch.profiler.tensorboard_trace_handler(self.folder))
            self.profiler.__enter__()

    def after_step(self, iteration: int) -> None:
        if self.profiler is not None:
            self.profiler.step()
            if iteration + 1 >= self.end:
                self.close()

    def close(self) -> None:
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.profiler = None
