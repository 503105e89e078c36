"""What a Megatron user reads: the log line, TensorBoard tags (with "vs
samples"), Weights & Biases in offline mode, per-phase timers, and the
profiler's trace; end to end through pretrain() on one rank."""
import dataclasses
import datetime
import glob
import io
import json
import os
import sys

import pytest

from job_harness import pretrain_worker, tiny_gpt_argv
from multiprocess import run_ranks

from megatron_sr.config import TrainingConfig
from megatron_sr.training_log import (MetricsWriter, PhaseTimers, format_log_line,
                                      open_metrics_writer)

# Megatron-LM's training_log with --log-throughput, for these values, then our two fields.
MEGATRON_LINE = (
    " [2026-11-30 02:30:00.123456] iteration       10/     100 | consumed samples:           80 |"
    " elapsed time per iteration (ms): 512.3 | throughput per GPU (TFLOP/s/GPU): 123.5 |"
    " learning rate: 1.000000E-04 | global batch size:     8 | lm loss: 5.123457E+00 |"
    " loss scale: 1.0 | grad norm: 0.812 | number of skipped iterations:   0 |"
    " number of nan iterations:   0 |")


def test_log_line_is_megatrons_then_ours():
    line = format_log_line(
        iteration=10, train_iters=100, consumed_samples=80, elapsed_ms=512.34,
        tflops_per_device=123.45, lr=1e-4, global_batch_size=8, loss=5.1234567,
        grad_norm=0.8123, skipped=0, nan_iterations=0, tokens_per_s=1234.56,
        update_absorption=0.01234, now=datetime.datetime(2026, 11, 30, 2, 30, 0, 123456))
    assert line == MEGATRON_LINE + " throughput (tokens/s): 1234.6 | update absorption: 0.0123 |"



def test_a_log_step_is_one_object_line_and_scalars():
    """StepMetrics gives the log line above and the scalars under the tags of
    the torch-free megatron_sr.metric_names (what tools/compare_runs.py reads)."""
    from megatron_sr import metric_names as tags
    from megatron_sr.training_log import StepMetrics

    values = StepMetrics(
        iteration=10, train_iters=100, consumed_samples=80, step_seconds=0.51234,
        tflops_per_device=123.45, tokens_per_s=1234.56, lr=1e-4, global_batch_size=8,
        world_size=2, loss=5.1234567, grad_norm=0.8123, skipped_iterations=0, nan_iterations=0,
        update_absorption=0.01234, peak_memory_bytes=3 << 20, phase_seconds={"optimizer": 0.25})
    line = values.log_line(now=datetime.datetime(2026, 11, 30, 2, 30, 0, 123456))
    assert line == MEGATRON_LINE + " throughput (tokens/s): 1234.6 | update absorption: 0.0123 |"
    scalars = values.scalars()
    assert scalars[tags.TRAIN_LOSS] == 5.1234567 and scalars[tags.ABSORPTION] == 0.01234
    assert scalars[tags.ITERATION_TIME] == 0.51234 and scalars["optimizer-time"] == 0.25
    assert scalars[tags.PEAK_BYTES] == 3 << 20 and scalars[tags.WORLD_SIZE] == 2
    quiet = dataclasses.replace(values, loss=None, update_absorption=None, phase_seconds=None)
    assert not {tags.TRAIN_LOSS, tags.ABSORPTION, tags.ITERATION_TIME} & set(quiet.scalars())


def test_metric_names_import_without_torch():
    import subprocess

    code = ("import sys; sys.modules['torch'] = None; "
            "import megatron_sr.metric_names, megatron_sr.precision.names")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)

def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_scalars_are_also_written_against_consumed_samples(tmp_path):
    metrics = open_metrics_writer(TrainingConfig(tensorboard_dir=str(tmp_path)), True)
    metrics.scalar("lm loss", 2.5, 3, consumed_samples=24)
    metrics.scalar("update-absorption", 0.5, 3, consumed_samples=24)
    metrics.close()
    scalars = _scalars(tmp_path)
    assert scalars["lm loss"] == [(3, 2.5)] and scalars["lm loss vs samples"] == [(24, 2.5)]
    assert scalars["update-absorption"] == [(3, 0.5)]
    assert "update-absorption vs samples" not in scalars
    assert open_metrics_writer(TrainingConfig(tensorboard_dir=str(tmp_path)), False).writer is None


def test_wandb_offline_run_records_the_scalars(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    training = TrainingConfig(wandb_project="megatron-sr-test", wandb_exp_name="offline",
                              wandb_save_dir=str(tmp_path))
    metrics = open_metrics_writer(training, True, run_config={"model": {"num_layers": 2}})
    assert isinstance(metrics, MetricsWriter) and metrics.writer is None
    run = metrics.wandb_run
    assert (run.name, run.project, run.config["model"]["num_layers"]) == (
        "offline", "megatron-sr-test", 2)
    metrics.scalar("lm loss", 2.5, 1, consumed_samples=8)
    metrics.scalar("lm loss", 2.0, 2, consumed_samples=16)
    metrics.close()
    run_files = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(run_files) == 1 and os.path.getsize(run_files[0]) > 0
    assert wandb.run is None


@pytest.mark.slow
def test_pretrain_writes_megatrons_tags_timers_and_a_profile(tmp_path):
    argv = tiny_gpt_argv(train_iters=4, tensorboard_dir=str(tmp_path / "tb"),
                         log_timers_to_tensorboard=True, profile=True, profile_step_start=2,
                         profile_step_end=4)
    (result,) = run_ranks(pretrain_worker, 1, argv)
    scalars = _scalars(tmp_path / "tb")
    for tag in ("learning-rate", "batch-size", "lm loss", "loss-scale", "world-size",
                "grad-norm"):
        assert [step for step, _ in scalars[tag]] == [1, 2, 3, 4], tag
        assert [step for step, _ in scalars[tag + " vs samples"]] == [2, 4, 6, 8], tag
    for tag in ("iteration-time", "throughput", "forward-backward-time", "optimizer-time"):
        assert len(scalars[tag]) == 4 and all(value >= 0 for _, value in scalars[tag]), tag
    traces = glob.glob(str(tmp_path / "tb" / "*.pt.trace.json*"))
    assert len(traces) == 1, os.listdir(tmp_path / "tb")
    with open(traces[0], encoding="utf-8") as f:
        names = {event.get("name") for event in json.load(f)["traceEvents"]}
    assert {"aten::scaled_dot_product_attention", "c10d::allreduce_"} <= names


class _RecordingStream(io.RawIOBase):
    """A file descriptor's stand-in: records every write call."""

    def __init__(self):
        self.calls = []

    def writable(self):
        return True

    def write(self, data):
        self.calls.append(bytes(data))
        return len(data)


def test_cpu_phase_timers_sum_the_blocks_wall_time_until_popped():
    import time

    import torch

    timers = PhaseTimers(True, torch.device("cpu"))
    for _ in range(2):
        with timers.phase("optimizer"):
            time.sleep(0.02)
    seconds = timers.pop()
    assert list(seconds) == ["optimizer"] and 0.04 <= seconds["optimizer"] < 1.0
    assert timers.pop() == {}


@pytest.mark.gpu
def test_cuda_phase_timers_time_the_device_without_synchronizing():
    """A phase ends while its kernel still runs (no device sync); pop() waits
    and reports the device time of the kernel."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    timers = PhaseTimers(True, torch.device("cuda"))
    with timers.phase("forward-backward"):
        torch.cuda._sleep(1_000_000_000)  # ~0.5 s of device time on current GPUs
    assert not timers._events[-1][2].query()  # the phase's end is still queued
    assert timers.pop()["forward-backward"] > 0.1


def test_ranks_write_each_line_whole_even_when_unbuffered(monkeypatch):
    """PYTHONUNBUFFERED=1 gives stdout an unbuffered binary layer with write-through
    text: `print` then writes a line and its newline in two calls, and another rank
    sharing the stdout can write in between. The job makes each line one call."""
    from megatron_sr.training import write_whole_lines

    raw = _RecordingStream()
    unbuffered = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
    monkeypatch.setattr(sys, "stdout", unbuffered)
    print("before", flush=True)
    write_whole_lines()
    print("[checkpoint] saved iteration 2", flush=True)
    print(" iteration        2/       8 | lm loss: 7.0")
    assert raw.calls == [b"before", b"\n", b"[checkpoint] saved iteration 2\n",
                         b" iteration        2/       8 | lm loss: 7.0\n"]
