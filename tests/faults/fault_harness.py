"""Runs the real job, `torchrun pretrain_gpt.py`, on CPU ranks with a fault
injected, bounded by a timeout, and reads what it left behind.

Every launch uses `torchrun --standalone` (a free rendezvous port, so
concurrent runs do not collide) in its own session: on a timeout the whole
process group is SIGKILLed and the test fails with "hung", it never waits
forever. Faults are injected through the job's test hooks
(`megatron_sr.fault_injection`, $MEGATRON_SR_FAULT, and
$MEGATRON_SR_INJECT_NAN_GRAD_AT).
"""
from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from typing import Callable, Optional

from job_harness import (assert_states_equal, checkpoint_files, copy_checkpoint,  # noqa: F401
                         tiny_gpt_argv)

from megatron_sr import checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRETRAIN = os.path.join(REPO, "pretrain_gpt.py")
HOOK_ENVS = ("MEGATRON_SR_FAULT", "MEGATRON_SR_INJECT_NAN_GRAD_AT")

# The job most cases share: TP=2 x DP=2 on 4 ranks with the distributed
# optimizer (the optimizer state is sharded, gathered into the checkpoint and
# re-sharded on load), 6 steps, a checkpoint every 2.
TRAIN_ITERS = 6
SAVE_INTERVAL = 2


def job_argv(save: Optional[str] = None, **flags) -> list[str]:
    values = dict(tensor_model_parallel_size=2, use_distributed_optimizer=True,
                  global_batch_size=8, train_iters=TRAIN_ITERS)
    if save is not None:
        values.update(save=save, save_interval=SAVE_INTERVAL)
    values.update(flags)
    return tiny_gpt_argv(**values)


@dataclasses.dataclass
class JobRun:
    returncode: int
    output: str  # stdout and stderr of torchrun and every rank, interleaved
    seconds: float

    def __str__(self) -> str:
        return f"exit {self.returncode} after {self.seconds:.1f} s:\n{self.output[-6000:]}"


def _environment(env: Optional[dict[str, str]]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in HOOK_ENVS}
    base.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=REPO + os.pathsep +
                base.get("PYTHONPATH", ""))
    base.pop("TRITON_INTERPRET", None)
    base.update(env or {})
    return base


class Job:
    """A running `torchrun pretrain_gpt.py`; output goes to `log_path`."""

    def __init__(self, nproc: int, argv: list[str], log_path: str,
                 env: Optional[dict[str, str]] = None):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={nproc}", PRETRAIN, *argv]
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.start = time.monotonic()
        self.process = subprocess.Popen(command, cwd=REPO, stdout=self._log,
                                        stderr=subprocess.STDOUT, env=_environment(env),
                                        start_new_session=True)

    def output(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_for(self, text: str, timeout: float) -> None:
        """Waits until `text` appears in the output (AssertionError on timeout or exit)."""
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.process.poll() is not None:
                raise AssertionError(f"the job exited before printing {text!r}:\n"
                                     f"{self.output()[-6000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"{text!r} not printed within {timeout} s")
            time.sleep(0.1)

    def wait_for_progress(self, pattern: "re.Pattern[str]", count: int, timeout: float,
                          poll: float = 0.005) -> list[float]:
        """Waits until `count` lines of the output match `pattern` (the job's own
        progress: iteration lines, save phases) and returns the monotonic time
        at which each was first seen. Polls every `poll` s, so the times follow
        the job's pace on a fast machine too. AssertionError if the job exits
        or `timeout` passes first."""
        deadline = time.monotonic() + timeout
        seen: list[float] = []
        while len(seen) < count:
            matches = len(pattern.findall(self.output()))
            now = time.monotonic()
            seen.extend([now] * (min(matches, count) - len(seen)))
            if len(seen) >= count:
                break
            if self.process.poll() is not None:
                raise AssertionError(f"the job exited after {len(seen)} of {count} progress "
                                     f"lines:\n{self.output()[-6000:]}")
            if now > deadline:
                self.kill()
                raise AssertionError(f"{count} progress lines not printed within {timeout} s")
            time.sleep(poll)
        return seen

    def worker_pids(self) -> list[int]:
        """The ranks' processes (torchrun's children)."""
        return _children(self.process.pid)

    def kill(self) -> None:
        """SIGKILLs the whole job at once, as a node failure would: torchrun and
        every process below it. torchrun starts each rank in a session of its
        own, so killing torchrun's process group alone would leave the ranks
        running on as orphans (training, saving) behind the test's back."""
        pids = [self.process.pid]
        for pid in pids:  # grows while it is walked: children of children
            pids.extend(_children(pid))
        for pid in pids:
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    def wait(self, timeout: float) -> JobRun:
        """The finished run; kills the process group and fails if it hangs past `timeout`."""
        try:
            self.process.wait(timeout=max(1.0, timeout - (time.monotonic() - self.start)))
        except subprocess.TimeoutExpired:
            self.kill()
            self.process.wait()
            raise AssertionError(f"the job hung: still running after {timeout} s\n"
                                 f"{self.output()[-6000:]}") from None
        finally:
            self._log.close()
        # A rank of a failed job may outlive torchrun briefly; never leak one.
        self.kill()
        return JobRun(self.process.returncode, self.output(), time.monotonic() - self.start)


def _children(pid: int) -> list[int]:
    """The child processes of `pid` (Linux /proc; [] once it has exited)."""
    children = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children.extend(int(child) for child in f.read().split())
    except (FileNotFoundError, ProcessLookupError):
        pass
    return children


def run_job(nproc: int, argv: list[str], log_path: str, env: Optional[dict[str, str]] = None,
            timeout: float = 150) -> JobRun:
    return Job(nproc, argv, log_path, env).wait(timeout)


def fault_env(spec: str) -> dict[str, str]:
    return {"MEGATRON_SR_FAULT": spec}


def tracker(save_dir: str) -> Optional[int]:
    return checkpointing.read_tracker(save_dir)


def iteration_dir(save_dir: str, iteration: int) -> str:
    return os.path.join(save_dir, checkpointing.iteration_dir_name(iteration))


def temporary_dir(save_dir: str, iteration: int) -> str:
    return os.path.join(save_dir, "." + checkpointing.iteration_dir_name(iteration) + ".tmp")


def assert_error_line(run: JobRun, *needles: str) -> str:
    """The job failed (exit != 0) and some rank printed `error: ...` containing every needle."""
    assert run.returncode != 0, str(run)
    lines = [line for line in run.output.splitlines() if line.startswith("error: ")
             or "]:error: " in line]
    matching = [line for line in lines if all(n in line for n in needles)]
    assert matching, f"no `error:` line with {needles}; error lines: {lines}\n{run}"
    return matching[0]


def assert_checkpoints_equal(save_a: str, save_b: str, iteration: int) -> None:
    """Every file of `iteration` (every TP/PP rank: weights, optimizer state,
    scheduler, progress, RNG states) is bit-identical in the two directories."""
    files_a, files_b = checkpoint_files(save_a, iteration), checkpoint_files(save_b, iteration)
    assert files_a.keys() == files_b.keys()
    for rank_dir in files_a:
        assert_states_equal(files_a[rank_dir], files_b[rank_dir], rank_dir)


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
