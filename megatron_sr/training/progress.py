"""--log-progress: <--save>/progress.txt, the job history a cluster's
accounting reads, in Megatron-LM's format.

One line per event, tab-separated:

    2026-12-07 23:50:00\tJob ID: 4242\t# GPUs: 1024\tStarting job
    2026-12-08 01:50:00\tJob ID: 4242\t# GPUs: 1024\tSaved checkpoint\tIteration: 2000\t
        Job throughput: 412.3 TFLOP/s/GPU\tCumulative throughput: 409.8 TFLOP/s/GPU\t
        Floating-point operations: 1.23e+22\tTokens (in billions): 16.78

(the second is one line). "Job ID" is $SLURM_JOB_ID (empty outside Slurm);
"Starting job" is written when the job starts, the other line after each
checkpoint save ("Saving async checkpoint" with --async-save, whose files
are still being written). Floating-point operations so far are the model's
training FLOPs per sample (`megatron_sr.model.flops_per_token`) times the
consumed samples, so a resumed job counts on from its checkpoint. Job
throughput: this job's operations since its start over its wall time since
it started; cumulative throughput: since the first "Starting job" of the
current run of jobs with this world size (a change of world size starts a
new run), from the operations of the last "Saved checkpoint" before it.

Rank 0 writes; the file is only appended to. Host-side only: nothing is
communicated and no device is synchronized.
"""
from __future__ import annotations

import datetime
import os
import time
from typing import Optional

PROGRESS_FILENAME = "progress.txt"
_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
STARTING_JOB, SAVED, SAVING_ASYNC = "Starting job", "Saved checkpoint", "Saving async checkpoint"


def _field(token: str) -> str:
    """The value of a "Name: value" token."""
    return token.split(": ", 1)[1]


def append_progress(save: str, world_size: int, text: str) -> None:
    """Appends the line of event `text` to <save>/progress.txt (created with
    its folder). Called by rank 0 only."""
    os.makedirs(save, exist_ok=True)
    now = datetime.datetime.now().strftime(_TIME_FORMAT)
    with open(os.path.join(save, PROGRESS_FILENAME), "a", encoding="utf-8") as progress:
        progress.write(f"{now}\tJob ID: {os.environ.get('SLURM_JOB_ID', '')}\t"
                       f"# GPUs: {world_size}\t{text}\n")


def cumulative_start(path: str, world_size: int) -> Optional[tuple[datetime.datetime, float]]:
    """(time, floating-point operations so far) where the current run of jobs
    with `world_size` GPUs started, read from the progress file at `path`;
    None when it has no "Starting job" line of this world size after the last
    change of world size. Raises ValueError naming the file and line of a line
    that is not in the format above."""
    start, latest_operations = None, 0.0
    with open(path, encoding="utf-8") as progress:
        for number, line in enumerate(progress, start=1):
            tokens = line.rstrip("\n").split("\t")
            try:
                gpus = int(_field(tokens[2]))
                if tokens[3] == SAVED:
                    latest_operations = float(_field(tokens[7]))
                if gpus != world_size:
                    start = None
                elif tokens[3] == STARTING_JOB and start is None:
                    start = (datetime.datetime.strptime(tokens[0], _TIME_FORMAT),
                             latest_operations)
            except (IndexError, ValueError) as error:
                raise ValueError(f"{path} line {number} is not a progress line "
                                 f"({error}): {line.strip()!r}") from error
    return start


class ProgressLog:
    """The loop's --log-progress writer for a job that started at
    `job_start_time` (time.time()) with `start_samples` consumed samples.
    `flops_per_sample`: training FLOPs of one sample. Every rank may hold one;
    only `rank` 0 writes."""

    def __init__(self, save: str, world_size: int, rank: int, seq_length: int,
                 flops_per_sample: float, job_start_time: float, start_samples: int):
        self.save, self.world_size, self.rank = save, world_size, rank
        self.seq_length, self.flops_per_sample = seq_length, flops_per_sample
        self.job_start_time, self.start_samples = job_start_time, start_samples

    def checkpoint_saved(self, iteration: int, consumed_samples: int, async_save: bool) -> None:
        """The line of a save of `iteration` at `consumed_samples`."""
        if self.rank != 0:
            return
        operations = consumed_samples * self.flops_per_sample
        tera_per_gpu = 1e12 * self.world_size
        job = (operations - self.start_samples * self.flops_per_sample) / (
            (time.time() - self.job_start_time) * tera_per_gpu)
        path = os.path.join(self.save, PROGRESS_FILENAME)
        start = cumulative_start(path, self.world_size) if os.path.exists(path) else None
        if start is None:  # no "Starting job" line: this job is the run
            start = (datetime.datetime.fromtimestamp(self.job_start_time),
                     self.start_samples * self.flops_per_sample)
        elapsed = max((datetime.datetime.now() - start[0]).total_seconds(), 1e-9)
        cumulative = (operations - start[1]) / (elapsed * tera_per_gpu)
        tokens = consumed_samples * self.seq_length
        append_progress(self.save, self.world_size,
                        f"{SAVING_ASYNC if async_save else SAVED}\tIteration: {iteration}\t"
                        f"Job throughput: {job:.1f} TFLOP/s/GPU\t"
                        f"Cumulative throughput: {cumulative:.1f} TFLOP/s/GPU\t"
                        f"Floating-point operations: {operations:.2e}\t"
                        f"Tokens (in billions): {tokens / 1e9:.2f}")
