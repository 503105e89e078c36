"""A rank SIGKILLed mid-checkpoint-save, mid-commit and mid-iteration: the
job stops (torchrun tears the other ranks down, no hang), the last complete
checkpoint survives, and resuming with --load ends bit-identical to a run
that never failed (weights, optimizer state, scheduler, RNG states). The
same for --ckpt-format torch_dist, sync and async: SIGKILLs of the whole job
at random moments, a rank killed in its background write, and SIGTERM."""
import os
import re
import time
from typing import Callable

import pytest

from fault_harness import (SAVE_INTERVAL, TRAIN_ITERS, assert_checkpoints_equal, fault_env, iteration_dir,
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


# ----- --ckpt-format torch_dist ---------------------------------------------------------------

def _torch_dist_state(save: str, iteration: int) -> dict:
    from megatron_sr.checkpointing import torch_dist

    directory = iteration_dir(save, iteration)
    common, tensors, rng = torch_dist.read_full(directory, checkpointing.read_manifest(directory))
    return {"common": common, "tensors": tensors, "rng": rng}


@pytest.fixture(scope="module")
def torch_dist_reference(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("torch_dist_reference")
    save = str(root / "ckpt")
    run = run_job(4, job_argv(save=save, ckpt_format="torch_dist"), str(root / "log"))
    assert run.returncode == 0, str(run)
    return save


# Kills per mode; the issue asks for 10 (MEGATRON_SR_KILL_MOMENTS=10), each costs a restart.
KILL_MOMENTS = int(os.environ.get("MEGATRON_SR_KILL_MOMENTS", "3"))

# The job's progress lines: one per iteration, and per save "saved iteration N"
# (sync) or "writing iteration N in the background" then "saved iteration N ... (async)".
PROGRESS = re.compile(r"^ \[[^]]*\] iteration +\d+/|^\[checkpoint\] (?:saved|writing) iteration",
                      re.MULTILINE)


def _progress_lines_left(resumed_from: int, async_save: bool) -> int:
    """How many PROGRESS lines a launch that resumes after `resumed_from` prints."""
    saves = sum(1 for it in range(resumed_from + 1, TRAIN_ITERS + 1) if it % SAVE_INTERVAL == 0)
    return TRAIN_ITERS - resumed_from + saves * (2 if async_save else 1)


def _kill_moment(rng, lines_left: int, times: Callable[[int], list[float]]) -> tuple[int, float]:
    """Picks a moment from the job's own progress: a random progress line k (at
    least two before the last, so that work remains) and a random fraction of
    the shortest gap between the lines seen up to k (the job's fastest pace: a
    first save or the start-up can take many iterations' time); waits for line
    k and returns (k, the delay after it). `times(k)` waits for line k and
    returns the times lines 1..k were seen."""
    k = rng.randint(2, lines_left - 2)
    seen = times(k)
    return k, rng.random() * min(b - a for a, b in zip(seen, seen[1:]))


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_sigkill_at_random_moments_of_torch_dist_saves_then_resume_is_bit_identical(
        torch_dist_reference, async_save, tmp_path):
    """The job (TP2 x DP2, checkpoints at 2, 4, 6) is SIGKILLed KILL_MOMENTS
    times. Each moment comes from the job's own progress, not from a wall
    clock: after a random one of its progress lines (iterations, save phases),
    at a random fraction of the job's median time between two such lines, so
    the kills land in or around saves and before the end on a fast machine as
    on a slow one. After each kill the tracker names a complete checkpoint (or
    none) and the next launch resumes from it. The last launch finishes and
    ends bit-identical to the uninterrupted run."""
    import random

    from fault_harness import Job

    rng = random.Random(14 + async_save)
    save = str(tmp_path / "ckpt")
    os.makedirs(save)
    argv = job_argv(save=save, load=save, ckpt_format="torch_dist", async_save=async_save)
    kills = []  # (resumed from, progress line k, delay after it, exit code, tracker after)
    for moment in range(KILL_MOMENTS):
        resumed_from = tracker(save) or 0
        lines_left = _progress_lines_left(resumed_from, async_save)
        if lines_left < 4:  # too little left to land a kill inside it
            break
        job = Job(4, argv, str(tmp_path / f"log{moment}"))
        k, delay = _kill_moment(rng, lines_left,
                                lambda k: job.wait_for_progress(PROGRESS, k, timeout=150))
        time.sleep(delay)
        job.kill()
        run = job.wait(timeout=60)
        iteration = tracker(save)
        if iteration is not None:  # whatever the tracker names is complete and verified
            _torch_dist_state(save, iteration)
        kills.append((resumed_from, k, round(delay, 3), run.returncode, iteration))
    # Otherwise every launch finished before its kill and nothing here was tested.
    assert any(code != 0 and after != TRAIN_ITERS for _, _, _, code, after in kills), kills
    job = Job(4, argv, str(tmp_path / "log-final"))
    run = job.wait(timeout=240)
    assert run.returncode == 0, str(run)
    assert tracker(save) == TRAIN_ITERS
    from job_harness import assert_states_equal
    assert_states_equal(_torch_dist_state(save, TRAIN_ITERS),
                        _torch_dist_state(torch_dist_reference, TRAIN_ITERS))


def test_sigkill_during_an_async_save_leaves_the_previous_checkpoint(torch_dist_reference,
                                                                     tmp_path):
    save = str(tmp_path / "ckpt")
    os.makedirs(save)
    argv = job_argv(save=save, load=save, ckpt_format="torch_dist", async_save=True)
    run = run_job(4, argv, str(tmp_path / "log1"),
                  fault_env("kill@checkpoint-write,iteration=4,rank=1"))
    _assert_killed(run, rank=1)
    assert tracker(save) == 2 and _is_complete(save, 2)
    assert not os.path.exists(iteration_dir(save, 4))
    run = run_job(4, argv, str(tmp_path / "log2"))
    assert run.returncode == 0, str(run)
    assert "[checkpoint] loaded iteration 2" in run.output, str(run)
    from job_harness import assert_states_equal
    assert_states_equal(_torch_dist_state(save, TRAIN_ITERS),
                        _torch_dist_state(torch_dist_reference, TRAIN_ITERS))


def test_sigterm_then_resume_of_torch_dist_is_bit_identical(torch_dist_reference, tmp_path):
    """SIGTERM to one rank mid-run (a preemption): the ranks save the current
    iteration and exit 0; the restart ends bit-identical to the uninterrupted run."""
    save = str(tmp_path / "ckpt")
    os.makedirs(save)
    argv = job_argv(save=save, load=save, ckpt_format="torch_dist", async_save=True)
    run = run_job(4, argv, str(tmp_path / "log1"),
                  fault_env("sigterm@train-step,iteration=3,rank=1"))
    assert run.returncode == 0, str(run)
    assert "[exit] SIGTERM received at iteration 3" in run.output, str(run)
    assert tracker(save) == 3 and _is_complete(save, 3)
    run = run_job(4, argv, str(tmp_path / "log2"))
    assert run.returncode == 0 and "[checkpoint] loaded iteration 3" in run.output, str(run)
    from job_harness import assert_states_equal
    assert_states_equal(_torch_dist_state(save, TRAIN_ITERS),
                        _torch_dist_state(torch_dist_reference, TRAIN_ITERS))
