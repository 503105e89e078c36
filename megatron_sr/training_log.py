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
--log-timers-to-tensorboard; `lm loss validation` and `lm loss validation ppl`
(and their "vs samples"). Ours beside them: `throughput/tokens-per-s`,
`throughput/tflops-per-device`, `update-absorption`, `skipped-iterations`,
`nan-iterations`, `consumed-samples`, `memory/peak-bytes`. With
--wandb-project every scalar also goes to Weights & Biases (`wandb` is an
optional dependency; WANDB_MODE=offline works without a network).
"""
from __future__ import annotations

import datetime
import os
import time
from contextlib import contextmanager
from typing import Optional

import torch


def format_log_line(*, iteration: int, train_iters: int, consumed_samples: int, elapsed_ms: float,
                    tflops_per_device: float, lr: float, global_batch_size: int,
                    loss: Optional[float], grad_norm: float, skipped: int, nan_iterations: int,
                    tokens_per_s: float, update_absorption: Optional[float],
                    now: Optional[datetime.datetime] = None) -> str:
    """Megatron's training log line with our fields appended (module docstring)."""
    now = now or datetime.datetime.now()
    parts = [f" [{now.strftime('%Y-%m-%d %H:%M:%S.%f')}] iteration {iteration:8d}/{train_iters:8d}",
             f"consumed samples: {consumed_samples:12d}",
             f"elapsed time per iteration (ms): {elapsed_ms:.1f}",
             f"throughput per GPU (TFLOP/s/GPU): {tflops_per_device:.1f}",
             f"learning rate: {lr:.6E}",
             f"global batch size: {global_batch_size:5d}"]
    if loss is not None:
        parts.append(f"lm loss: {loss:.6E}")
    parts += [f"loss scale: {1.0:.1f}", f"grad norm: {grad_norm:.3f}",
              f"number of skipped iterations: {skipped:3d}",
              f"number of nan iterations: {nan_iterations:3d}",
              f"throughput (tokens/s): {tokens_per_s:.1f}"]
    if update_absorption is not None:
        parts.append(f"update absorption: {update_absorption:.4f}")
    return " | ".join(parts) + " |"


# Scalars Megatron also writes against consumed samples ("<tag> vs samples").
VS_SAMPLES_TAGS = frozenset({"learning-rate", "batch-size", "lm loss", "loss-scale", "world-size",
                             "grad-norm", "lm loss validation", "lm loss validation ppl"})


class MetricsWriter:
    """TensorBoard (--tensorboard-dir) and Weights & Biases (--wandb-project)
    scalars of the logging rank; a no-op where neither is configured.

    `scalar(tag, value, iteration, consumed_samples)` writes `tag` at step
    `iteration`, and for the tags of `VS_SAMPLES_TAGS` also "<tag> vs
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
            if consumed_samples is not None and tag in VS_SAMPLES_TAGS:
                self.writer.add_scalar(f"{tag} vs samples", value, consumed_samples)
        if self.wandb_run is not None:
            self.wandb_run.log({tag: value}, step=iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


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
        wandb_run = wandb.init(project=training.wandb_project, name=training.wandb_exp_name,
                               dir=save_dir, config=run_config or {}, reinit="finish_previous")
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
