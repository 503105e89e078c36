"""--rampup-batch-size START INCREMENT SAMPLES and --step-batch-size-schedule
'TOKENS:BATCH ...': Megatron's batch-size ramp and step schedule, their
iteration counts under --train-samples, and a run that follows each."""
import re

import pytest

from job_harness import pretrain_worker, tiny_gpt_argv
from multiprocess import run_ranks

from megatron_sr.config import parse_args
from megatron_sr.config import TrainingConfig, global_batch_size_at


def _megatron_ramp(start, increment, samples, global_batch_size, consumed):
    """Megatron-LM's RampupBatchsizeNumMicroBatchesCalculator.update, transcribed."""
    steps = (global_batch_size - start) // increment
    per_increment = samples / steps
    if consumed > samples:
        return global_batch_size
    return min(global_batch_size, start + int(consumed / per_increment) * increment)


def test_ramp_follows_megatrons_calculator():
    training = TrainingConfig(global_batch_size=1536, rampup_batch_size=(16, 16, 5859375))
    for consumed in (0, 15, 61_000, 61_035, 61_036, 3_000_000, 5_859_375, 5_859_376, 10**9):
        assert global_batch_size_at(training, consumed) == _megatron_ramp(
            16, 16, 5859375, 1536, consumed), consumed
    assert global_batch_size_at(TrainingConfig(global_batch_size=8), 100) == 8


def _argv(**flags):
    return tiny_gpt_argv(**{"global_batch_size": 8, "rampup_batch_size": (2, 2, 12), **flags})


# --seq-length 16: thresholds at 0, 4 and 10 samples.
SCHEDULE = "0:2 64:4 160:8"


def _schedule_argv(**flags):
    return tiny_gpt_argv(**{"step_batch_size_schedule": SCHEDULE, **flags})


def _megatron_step_schedule(schedule, consumed):
    """Megatron-LM's StepBatchsizeNumMicroBatchesCalculator._get_batch_size_for_samples,
    transcribed: `schedule` is its sorted (threshold samples, batch size) list."""
    batch_size = schedule[0][1]
    for threshold, size in schedule:
        if consumed >= threshold:
            batch_size = size
        else:
            break
    return batch_size


def _megatron_step_train_iters(training, train_samples):
    """Megatron-LM's update_train_iters under a step schedule, transcribed."""
    iterations = consumed = 0
    while consumed < train_samples:
        consumed += global_batch_size_at(training, consumed)
        iterations += 1
    return iterations


def test_train_samples_count_the_ramp_steps():
    # 3 increments of 2 over 12 samples (one per 4 samples): batches 2, 2, 4, 6 (14
    # consumed, past the ramp), then (60 - 14) // 8 = 5 full batches: Megatron's count.
    job = parse_args(_argv(train_iters=None, train_samples=60), world_size=1)
    assert [global_batch_size_at(job.training, c) for c in (0, 2, 4, 8, 14)] == [2, 2, 4, 6, 8]
    assert job.training.train_iters == 4 + 5


def test_step_schedule_follows_megatrons_calculator():
    job = parse_args(_schedule_argv(train_iters=4), world_size=1)
    assert job.training.step_batch_size_schedule == ((0, 2), (4, 4), (10, 8))
    assert job.training.global_batch_size == 8 and job.training.rampup_batch_size is None
    for consumed in (0, 3, 4, 9, 10, 11, 10**6):
        assert global_batch_size_at(job.training, consumed) == _megatron_step_schedule(
            [(0, 2), (4, 4), (10, 8)], consumed), consumed


def test_step_schedule_parses_suffixes_commas_and_split_words():
    schedule = ((0, 16), (1171875, 320), (5859375, 1536))  # tokens / 2048
    for words in (["0:16 2.4B:320 12B:1536"], ["0:16,2.4b:320,", "12000M:1536"],
                  ["0:16", "2400000K:320", "0.012T:1536"]):
        job = parse_args(_schedule_argv(step_batch_size_schedule=words, seq_length=2048,
                                        micro_batch_size=16, train_iters=4), world_size=1)
        assert job.training.step_batch_size_schedule == schedule, words


@pytest.mark.parametrize("train_samples", [1, 2, 3, 4, 9, 10, 11, 60, 61])
def test_train_samples_count_the_scheduled_steps(train_samples):
    job = parse_args(_schedule_argv(train_samples=train_samples), world_size=1)
    assert job.training.train_iters == _megatron_step_train_iters(job.training, train_samples)
    if train_samples == 60:  # 2, 2 (to 4), 4, 4 (to 12), then 6 x 8 (to 60)
        assert job.training.train_iters == 10


@pytest.mark.parametrize("flags, message", [
    (dict(rampup_batch_size=(2, 2, 12)), "and --rampup-batch-size are exclusive"),
    (dict(step_batch_size_schedule="0:2 64:3"), "batch size 3 of entry '64:3' is not a positive "
                                                "multiple of --micro-batch-size"),
    (dict(step_batch_size_schedule="0:0"), "batch size 0 of entry '0:0' is not a positive"),
    (dict(step_batch_size_schedule="16:2 64:4"), "the first entry must be at 0 tokens"),
    (dict(step_batch_size_schedule="0:2 64:4 70:8"), "entry '70:8' starts at sample 4 .* not "
                                                     "after the previous entry's 4"),
    (dict(step_batch_size_schedule="0:2 64"), "entry '64' is not TOKENS:BATCH"),
    (dict(step_batch_size_schedule="0:2 6.4x:4"), "'6.4x' in entry '6.4x:4' is not a whole count"),
    (dict(step_batch_size_schedule="0:2 0.5:4"), "'0.5' in entry '0.5:4' is not a whole count"),
    (dict(global_batch_size=4), r"--global-batch-size \(4\) with --step-batch-size-schedule "
                                r"must be the schedule's largest batch size \(8\)"),
])
def test_step_schedule_flags_are_checked(flags, message):
    with pytest.raises(ValueError, match=message):
        parse_args(_schedule_argv(train_iters=4, **flags), world_size=1)


def test_step_schedule_checks_interleaved_micro_batch_counts():
    with pytest.raises(ValueError, match="batch size 2 of entry '0:2': interleaved pipelining"):
        parse_args(_schedule_argv(train_iters=4, step_batch_size_schedule="0:2 64:8",
                                  pipeline_model_parallel_size=2,
                                  num_layers_per_virtual_pipeline_stage=1, num_layers=4),
                   world_size=2)


def test_ramp_flags_are_checked():
    with pytest.raises(ValueError, match="--rampup-batch-size 3 2 12: START and INCREMENT must "
                                         "be multiples of --micro-batch-size"):
        parse_args(_argv(rampup_batch_size=(3, 2, 12), train_iters=4), world_size=1)
    with pytest.raises(ValueError, match="must be START plus a multiple of INCREMENT"):
        parse_args(_argv(rampup_batch_size=(2, 4, 12), train_iters=4), world_size=1)


@pytest.mark.slow
@pytest.mark.parametrize("argv", [_argv, _schedule_argv], ids=["rampup", "step-schedule"])
def test_a_run_logs_the_ramping_batch_sizes(argv):
    flags = argv(train_iters=6)
    (result,) = run_ranks(pretrain_worker, 1, flags)
    sizes = [int(m) for m in re.findall(r"global batch size:\s+(\d+) \|", result["stdout"])]
    consumed = [int(m) for m in re.findall(r"consumed samples:\s+(\d+) \|", result["stdout"])]
    expected, total = [], 0
    training = parse_args(flags, world_size=1).training
    for _ in range(6):
        expected.append(global_batch_size_at(training, total))
        total += expected[-1]
    assert sizes == expected and expected[0] == 2 and expected[-1] == 8
    assert consumed == [sum(expected[:i + 1]) for i in range(6)]
