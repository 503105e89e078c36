"""The errors that end a training job with a message instead of a traceback."""
from __future__ import annotations

import sys
from contextlib import contextmanager

from megatron_sr import checkpointing
from megatron_sr.replica_check import ReplicaMismatch


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many consecutive skipped steps)."""


class CommunicationError(RuntimeError):
    """A collective or point-to-point transfer timed out (a rank stalled past
    --distributed-timeout-minutes) or failed (a peer died); the message names
    the phase and the collective."""


# Errors a user fixes: bad flags, an unusable checkpoint, a training that cannot
# go on, a dead or stalled rank, diverged replicas.
JOB_ERRORS = (ValueError, checkpointing.CheckpointError, TrainingStopped, CommunicationError,
              ReplicaMismatch)


@contextmanager
def exit_on_job_error():
    """The errors of `JOB_ERRORS` end the process with one line
    `error: <message>` on stderr and exit status 1 instead of a traceback."""
    try:
        yield
    except JOB_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
