"""Communication failures named by phase and collective.

`communication_phase(job, phase, iteration)` wraps each communicating phase of
the job (forward-backward, the optimizer step, loss averaging, evaluation, a
checkpoint save, the replica check): a backend error or timeout inside it is
re-raised as `CommunicationError` naming the phase, the collective (read off
the failing stack through `_COLLECTIVE_OF_FUNCTION`) and the iteration, so a
stalled or dead rank ends the job with a message, not a hang or a backend trace.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch.distributed as dist

from megatron_sr import checkpointing
from megatron_sr.config import JobConfig
from megatron_sr.replica_check import ReplicaMismatch
from megatron_sr.training.errors import CommunicationError, TrainingStopped

# Innermost function on the failing stack -> the collective it runs: refines
# a phase that spans several collectives (the optimizer step, a checkpoint save).
_COLLECTIVE_OF_FUNCTION = {
    "communicate": "pipeline p2p send/recv",
    "_sum_model_parallel_grads": "model-parallel grad all-reduce",
    "_launch_grad_reduce": "data-parallel grad reduce-scatter",
    "finish_grad_sync": "data-parallel grad reduce-scatter",
    "_grad_norm": "grad-norm all-reduce",
    "gather_params": "parameter all-gather",
    "wait_param_gather": "parameter all-gather",
    "_full_bucket": "optimizer-state all-gather",
    "all_gather_objects": "all-gather of the ranks' write results",
    "save_training_checkpoint": "all-gather of the RNG states",
    "_average_over_dp": "loss all-reduce",
    "start_reduction": "loss all-reduce",
    "finish_reduction": "loss all-reduce",
    "_all_gather_hashes": "weight-hash all-gather",
}
# Gloo's messages do not always name Gloo: a stalled peer's recv timeout can
# surface as "Application timeout caused pair closure".
_COMMUNICATION_FAILURE_MARKERS = ("gloo", "nccl", "timed out", "timeout", "connection closed",
                                  "connection reset", "broken pipe", "pair closure")


def _is_communication_failure(exc: BaseException) -> bool:
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in _COMMUNICATION_FAILURE_MARKERS)


def _failing_collective(exc: BaseException) -> Optional[str]:
    """The collective of the innermost function of `_COLLECTIVE_OF_FUNCTION` on
    the stack `exc` was raised through; None when none is on it."""
    collective = None
    frame = exc.__traceback__
    while frame is not None:
        collective = _COLLECTIVE_OF_FUNCTION.get(frame.tb_frame.f_code.co_name, collective)
        frame = frame.tb_next
    return collective


@contextmanager
def communication_phase(job: JobConfig, phase: str, iteration: Optional[int] = None):
    """Re-raises a communication failure inside the block as CommunicationError
    naming `phase`, the collective (from the failing stack) and the iteration.
    Other exceptions, and the job's own errors, pass through unchanged."""
    try:
        yield
    except (CommunicationError, checkpointing.CheckpointError, TrainingStopped, ReplicaMismatch):
        raise
    except Exception as exc:
        if not _is_communication_failure(exc):
            raise
        collective = _failing_collective(exc)
        timeout = job.parallel.distributed_timeout_minutes
        timed_out = "timed out" in str(exc).lower() or "timeout" in str(exc).lower()
        cause = (f"timed out after --distributed-timeout-minutes {timeout:g}: a rank stalled"
                 if timed_out else "failed: a peer rank died or closed its connection")
        where = f"{phase} ({collective})" if collective else phase
        at_iteration = f" at iteration {iteration}" if iteration is not None else ""
        rank = dist.get_rank() if dist.is_initialized() else 0
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise CommunicationError(f"rank {rank}: {where}{at_iteration} {cause} "
                                 f"[{detail}]") from exc
