"""A rank SIGKILLed mid-checkpoint-save, mid-commit and mid-iteration: the
job stops (torchrun tears the other ranks down, no hang), the last complete
checkpoint survives, and resuming with --load ends bit-identical to a run
that never failed (weights, optimizer state, scheduler, RNG states)."""
import os

import pytest

from fault_harness import (TRAIN_ITERS, assert_checkpoints_equal, fault_env, iteration_dir,
                           job_argv, run_job, temporary_dir, tracker)
from megatron_sr import checkpointing

pytestmark = pytest.mark.slow


def _assert_killed(run, rank: int) -> None:
    assert run.returncode != 0, str(run)
    assert "[fault-injection] kill" in run.output, str(run)
    assert "Signal 9 (SIGKILL)" in run.output and f"rank      : {rank}" in run.output, str(run)


def _is_complete(save: str, iteration: int) -> bool:
    return os.path.isfile(os.path.join(iteration_dir(save, iteration),
                                       checkpointing.MANIFEST_FILENAME))


def test_sigkill_mid_save_mid_commit_and_mid_iteration_then_resume_is_bit_identical(
        reference, tmp_path):
    save = str(tmp_path / "ckpt")
    os.makedirs(save)
    argv = job_argv(save=save, load=save)  # as a restarted job is launched: same flags each time
    log = str(tmp_path / "log")

    # 1. Rank 1 dies while the ranks write iteration 4: rank 0's file is in the
    #    temporary directory, rank 1's is not, nothing names it.
    run = run_job(4, argv, log + "1", fault_env("kill@checkpoint-write,iteration=4,rank=1"))
    _assert_killed(run, rank=1)
    assert tracker(save) == 2 and _is_complete(save, 2)
    assert not os.path.exists(iteration_dir(save, 4))
    assert os.path.isdir(temporary_dir(save, 4))
    assert not os.path.exists(os.path.join(temporary_dir(save, 4), checkpointing.MANIFEST_FILENAME))

    # 2. Restart: resumes from 2. Rank 0 dies after iteration 4's directory is
    #    complete but before the tracker names it: the tracker still says 2.
    run = run_job(4, argv, log + "2", fault_env("kill@checkpoint-commit,iteration=4,rank=0"))
    assert "[checkpoint] loaded iteration 2" in run.output, str(run)
    _assert_killed(run, rank=0)
    assert tracker(save) == 2 and _is_complete(save, 4)
    assert not os.path.exists(temporary_dir(save, 4))

    # 3. Restart: resumes from 2 again, saves 4, rank 1 dies in the middle of
    #    iteration 5 (after its forward-backward, before the gradient syncs).
    run = run_job(4, argv, log + "3", fault_env("kill@train-step,iteration=5,rank=1"))
    assert "[checkpoint] loaded iteration 2" in run.output, str(run)
    _assert_killed(run, rank=1)
    assert tracker(save) == 4

    # 4. Restart without a fault: resumes from 4 and finishes.
    run = run_job(4, argv, log + "4")
    assert run.returncode == 0, str(run)
    assert "[checkpoint] loaded iteration 4" in run.output, str(run)
    assert tracker(save) == TRAIN_ITERS
    assert sorted(os.listdir(save)) == ["iter_0000002", "iter_0000004", "iter_0000006",
                                        checkpointing.TRACKER_FILENAME]
    for iteration in (4, TRAIN_ITERS):
        assert_checkpoints_equal(reference, save, iteration)
