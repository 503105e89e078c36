"""When the loop saves, stops, and gives up: the save / exit / signal cadence.

- `SignalFlag`: SIGTERM and --exit-signal set a flag instead of killing the
  rank; installed by `pretrain` before set-up, so a signal while a large
  checkpoint loads is not lost.
- `exit_conditions`: this rank's exit flags for a step; they ride in the
  step's grad-norm all-reduce and come back OR-ed over all ranks, so every
  rank stops at the same iteration with no collective of their own.
- `RunPolicy`: from those agreed flags and the iteration, whether to save
  (--save-interval, on every exit, at the end) and whether to stop
  (--exit-interval, --exit-duration-in-mins, a signal); and the count of
  consecutive skipped steps (--max-skipped-iterations; the NaN/Inf check that
  --no-check-for-nan-in-loss-and-grad switches off).
"""
from __future__ import annotations

import signal
import time
from typing import Optional, Sequence

from megatron_sr.config import TrainingConfig
from megatron_sr.training.console import print_rank_0
from megatron_sr.training.errors import TrainingStopped


class SignalFlag:
    """Set by SIGTERM or --exit-signal (`received` names it); the loop checks it
    (OR-ed over all ranks in the step's grad-norm all-reduce, `exit_conditions`)
    after each step. `restore()` puts the previous handlers back."""

    def __init__(self, exit_signal: str = "SIGTERM"):
        self.received: Optional[str] = None
        self._previous = {number: signal.signal(number, self._handle) for number in
                          {signal.SIGTERM, signal.Signals[exit_signal]}}

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def restore(self):
        for number, previous in self._previous.items():
            signal.signal(number, previous)


def exit_conditions(received: Optional[str], training: TrainingConfig,
                    start_time: float) -> list[bool]:
    """This rank's exit flags, in the order the loop reads them back: SIGTERM
    received, another --exit-signal received, --exit-duration-in-mins passed
    since `start_time` (time.time()). `received`: the signal `SignalFlag`
    recorded, or None."""
    elapsed_min = (time.time() - start_time) / 60
    return [received == "SIGTERM", received not in (None, "SIGTERM"),
            bool(training.exit_duration_in_mins and elapsed_min > training.exit_duration_in_mins)]


class RunPolicy:
    """The loop's cadence of `training` (--save, --save-interval,
    --exit-interval, --exit-duration-in-mins, --exit-signal,
    --max-skipped-iterations) for a run resumed at `start_iteration`.
    `signals` is the installed `SignalFlag`; `start_time` (time.time()) is where
    --exit-duration-in-mins counts from. Host-side only: the flags it reads
    were agreed over all ranks by the step, so every rank decides alike."""

    def __init__(self, training: TrainingConfig, start_iteration: int, signals: SignalFlag,
                 start_time: float):
        self.training, self.start_iteration = training, start_iteration
        self.signals, self.start_time = signals, start_time
        self.consecutive_skips = 0

    def exit_flags(self) -> list[bool]:
        """This rank's flags for the step's all-reduce (`exit_conditions`)."""
        return exit_conditions(self.signals.received, self.training, self.start_time)

    def after_step(self, iteration: int, skipped: bool, grad_norm: float) -> None:
        """Counts consecutive skipped steps; raises TrainingStopped at
        --max-skipped-iterations of them (not with
        --no-check-for-nan-in-loss-and-grad)."""
        if not skipped:
            self.consecutive_skips = 0
            return
        self.consecutive_skips += 1
        print_rank_0(f"[warning] iteration {iteration}: grad norm is {grad_norm}, "
                     f"step skipped ({self.consecutive_skips} in a row)")
        limit = self.training.max_skipped_iterations
        if self.training.check_for_nan_in_loss_and_grad and self.consecutive_skips >= limit:
            raise TrainingStopped(
                f"{self.consecutive_skips} consecutive iterations had NaN/Inf gradients "
                f"(--max-skipped-iterations {limit}); stopping instead of training on "
                f"garbage. Resume from the last checkpoint with a lower --lr or a smaller "
                f"--clip-grad.")

    def save_at_interval(self, iteration: int) -> bool:
        """--save and --save-interval divides `iteration`."""
        training = self.training
        return bool(training.save and training.save_interval
                    and iteration % training.save_interval == 0)

    def exit_reason(self, iteration: int, agreed_flags: Sequence[bool]) -> Optional[str]:
        """Why the loop stops after `iteration`, None to go on. `agreed_flags`:
        the step's `exit_conditions`, OR-ed over all ranks."""
        got_sigterm, got_exit_signal, out_of_time = agreed_flags
        if got_sigterm:
            return "SIGTERM received"
        if got_exit_signal:
            return f"{self.training.exit_signal} received"
        if out_of_time:
            return "--exit-duration-in-mins reached"
        interval = self.training.exit_interval
        return "--exit-interval reached" if interval and iteration % interval == 0 else None

    def save_at_exit(self, iteration: int) -> bool:
        """Save on an exit, unless the interval save just wrote this iteration."""
        return bool(self.training.save) and not self.save_at_interval(iteration)

    def save_at_end(self, iteration: int) -> bool:
        """Save at --train-iters, unless the interval save just did, or no step
        ran (resumed at --train-iters): re-saving would replace the very
        checkpoint the tracker names, with a window where it does not exist."""
        return self.save_at_exit(iteration) and iteration > self.start_iteration
