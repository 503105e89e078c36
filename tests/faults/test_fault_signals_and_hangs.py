"""SIGTERM (preemption): the ranks agree, save and exit 0. A rank that stalls
in a collective: the others fail after --distributed-timeout-minutes with a
message naming the phase and the collective, never hang. A full disk while
saving: the error is reported and the previous checkpoint stays intact."""
import os
import re
import signal

import pytest

from fault_harness import (Job, assert_error_line, checkpoint_files, fault_env, iteration_dir,
                           job_argv, run_job, temporary_dir, tracker)

pytestmark = pytest.mark.slow

TIMEOUT_MINUTES = 0.15  # 9 s: short, yet no false timeout on a loaded 2-core CI machine


def _two_rank_argv(**flags):
    """DP=2 on 2 ranks (the distributed optimizer shards over both)."""
    return job_argv(tensor_model_parallel_size=1, **flags)


def _sigterm_mid_run(tmp_path, target):
    save = str(tmp_path / "ckpt")
    job = Job(2, _two_rank_argv(save=save, train_iters=100000, save_interval=100000),
              str(tmp_path / "log"))
    job.wait_for(" iteration        3/", timeout=120)
    os.kill(target(job), signal.SIGTERM)
    return save, job.wait(timeout=90)


def _assert_saved_at_sigterm(save, run):
    stopped = re.search(r"\[exit\] SIGTERM received at iteration (\d+)", run.output)
    assert stopped, str(run)
    iteration = int(stopped.group(1))
    assert iteration >= 3 and tracker(save) == iteration
    state = checkpoint_files(save, iteration)["mp_rank_00"]  # verifies size and sha256
    assert state["iteration"] == iteration
    assert state["consumed_train_samples"] == iteration * 8


def test_sigterm_to_one_rank_saves_a_checkpoint_and_exits_0(tmp_path):
    # One rank only (as a scheduler's notice): the others learn it by the all-reduce.
    save, run = _sigterm_mid_run(tmp_path, lambda job: job.worker_pids()[0])
    assert run.returncode == 0, str(run)
    _assert_saved_at_sigterm(save, run)


def test_sigterm_to_torchrun_saves_a_checkpoint(tmp_path):
    """torchrun forwards SIGTERM to every rank: they save and exit 0, but
    torchrun itself then exits 1 (it reports that it was signalled)."""
    save, run = _sigterm_mid_run(tmp_path, lambda job: job.process.pid)
    assert run.returncode != 0 and "SignalException" in run.output, str(run)
    _assert_saved_at_sigterm(save, run)


def test_sigterm_during_setup_is_kept_until_the_first_step_saves(tmp_path):
    """A signal while the job sets up (Slurm's time-limit signal while a large
    checkpoint loads) neither kills the rank nor is lost: the first step runs,
    the ranks save it and exit 0."""
    save = str(tmp_path / "ckpt")
    run = run_job(2, _two_rank_argv(save=save, train_iters=100000, save_interval=100000),
                  str(tmp_path / "log"), fault_env("sigterm@setup,rank=1"))
    assert run.returncode == 0, str(run)
    assert "[exit] SIGTERM received at iteration 1" in run.output, str(run)
    assert tracker(save) == 1


@pytest.mark.parametrize("point, iteration, stalled_rank, phase", [
    ("train-step", 3, 1, "optimizer step (data-parallel grad reduce-scatter) at iteration 3"),
    ("checkpoint-write", 4, 0,
     "checkpoint save (all-gather of the ranks' write results) at iteration 4"),
])
def test_a_rank_stalled_in_a_collective_fails_the_job_naming_it(tmp_path, point, iteration,
                                                                stalled_rank, phase):
    save = str(tmp_path / "ckpt")
    run = run_job(2, _two_rank_argv(save=save, distributed_timeout_minutes=TIMEOUT_MINUTES),
                  str(tmp_path / "log"),
                  fault_env(f"stall@{point},iteration={iteration},rank={stalled_rank}"),
                  timeout=120)
    assert_error_line(run, f"rank {1 - stalled_rank}: {phase}",
                      f"timed out after --distributed-timeout-minutes {TIMEOUT_MINUTES:g}")
    assert run.returncode == 1, str(run)
    assert tracker(save) == 2  # what was saved before the stall is still the checkpoint
    checkpoint_files(save, 2)


def test_no_space_left_while_saving_keeps_the_previous_checkpoint(tmp_path):
    save = str(tmp_path / "ckpt")
    # TP=2, DP=1: both ranks write a file; rank 1's write fails.
    run = run_job(2, job_argv(save=save), str(tmp_path / "log"),
                  fault_env("enospc@checkpoint-write,iteration=4,rank=1"))
    assert_error_line(run, "checkpoint save of iteration 4", "previous checkpoint left intact",
                      "rank 1 could not write", "No space left on device")
    assert run.returncode == 1, str(run)
    assert "iteration        5/" not in run.output  # it stopped instead of training on unsaved
    assert tracker(save) == 2
    assert not os.path.exists(iteration_dir(save, 4)) and not os.path.exists(temporary_dir(save, 4))
    files = checkpoint_files(save, 2)  # intact: sizes and sha256 match, and it loads
    assert sorted(files) == ["mp_rank_00", "mp_rank_01"]
