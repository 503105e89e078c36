"""--rampup-batch-size START INCREMENT SAMPLES: Megatron's batch-size ramp,
its iteration count under --train-samples, and a run that follows it."""
import re

import pytest

from job_harness import pretrain_worker, tiny_gpt_argv
from multiprocess import run_ranks

from megatron_sr.arguments import parse_args
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


def test_train_samples_count_the_ramp_steps():
    # 3 increments of 2 over 12 samples (one per 4 samples): batches 2, 2, 4, 6 (14
    # consumed, past the ramp), then (60 - 14) // 8 = 5 full batches: Megatron's count.
    job = parse_args(_argv(train_iters=None, train_samples=60), world_size=1)
    assert [global_batch_size_at(job.training, c) for c in (0, 2, 4, 8, 14)] == [2, 2, 4, 6, 8]
    assert job.training.train_iters == 4 + 5


def test_ramp_flags_are_checked():
    with pytest.raises(ValueError, match="--rampup-batch-size 3 2 12: START and INCREMENT must "
                                         "be multiples of --micro-batch-size"):
        parse_args(_argv(rampup_batch_size=(3, 2, 12), train_iters=4), world_size=1)
    with pytest.raises(ValueError, match="must be START plus a multiple of INCREMENT"):
        parse_args(_argv(rampup_batch_size=(2, 4, 12), train_iters=4), world_size=1)


@pytest.mark.slow
def test_a_run_logs_the_ramping_batch_sizes():
    (result,) = run_ranks(pretrain_worker, 1, _argv(train_iters=6))
    sizes = [int(m) for m in re.findall(r"global batch size:\s+(\d+) \|", result["stdout"])]
    consumed = [int(m) for m in re.findall(r"consumed samples:\s+(\d+) \|", result["stdout"])]
    expected, total = [], 0
    training = TrainingConfig(global_batch_size=8, rampup_batch_size=(2, 2, 12))
    for _ in range(6):
        expected.append(global_batch_size_at(training, total))
        total += expected[-1]
    assert sizes == expected and expected[0] == 2 and expected[-1] == 8
    assert consumed == [sum(expected[:i + 1]) for i in range(6)]
