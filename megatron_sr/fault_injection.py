"""Test hooks that inject a fault at a named point of the training job.

The fault-injection suite (`tests/faults/`) sets one environment variable on
the ranks of a real `torchrun pretrain_gpt.py` run:

    MEGATRON_SR_FAULT="<action>@<point>[,iteration=N][,rank=R]"

e.g. `kill@train-step,iteration=5,rank=1`: rank 1 SIGKILLs itself in the
middle of iteration 5. Without `iteration` the fault fires at the first
visit of the point; without `rank`, on every rank. It fires at most once
per process.

Actions:
    kill      SIGKILL this process (a crashed or OOM-killed rank)
    sigterm   send SIGTERM to this process (a scheduler's preemption notice)
    stall     sleep for an hour: a hung rank; SIGTERM's default action is
              restored first, so the launcher's teardown ends it
    enospc    raise OSError(ENOSPC) (a full disk)
    eio       raise OSError(EIO) (a failing disk)
    bitflip   flip the lowest bit of the first element of the last tensor the
              point hands over (a silently corrupted replica)

Points (where the job calls `at`):
    setup                training.pretrain, after the process groups exist and
                         before the model is built and the checkpoint loaded
    train-step           training.train_step, after the forward-backward and
                         before the gradient syncs (mid-iteration)
    checkpoint-write     checkpointing.legacy.save_checkpoint, where a rank
                         writes its state file (into the temporary directory);
                         with --ckpt-format torch_dist where a rank starts
                         writing its shard (the background thread with
                         --async-save)
    checkpoint-commit    checkpointing.publish.publish on rank 0, after the
                         checkpoint directory is in place and before the
                         tracker file names it
    checkpoint-replace   checkpointing.publish.publish on rank 0, re-saving an
                         iteration that exists: after the old directory is
                         moved aside, before the new one is renamed in
    weight-hash          replica_check.check_replicas, before it hashes this
                         rank's parameters (handed over in model order: on a
                         one-stage GPT with tied embeddings the last is the
                         final norm's, which every TP and DP rank holds a
                         copy of; with an output layer, its TP-split weight)

NaN gradients: MEGATRON_SR_INJECT_NAN_GRAD_AT="3,4" (1-based iterations, as
logged) makes the backward of those iterations produce NaN gradients on every
rank, "3,4,rank=1" on rank 1 only (the others must learn it from the
reductions), while the loss keeps its value (`nan_grad_iterations`; the training loop
poisons the loss's gradient).

Unset (always, outside the tests) the hooks cost one global lookup and a
comparison with None.
"""
from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    import torch

FAULT_ENV = "MEGATRON_SR_FAULT"
ACTIONS = ("kill", "sigterm", "stall", "enospc", "eio", "bitflip")
POINTS = ("setup", "train-step", "checkpoint-write", "checkpoint-commit", "checkpoint-replace",
          "weight-hash")
STALL_SECONDS = 3600


@dataclass
class Fault:
    action: str
    point: str
    iteration: Optional[int] = None
    rank: Optional[int] = None
    fired: bool = False


def parse_fault(text: str) -> Fault:
    """`<action>@<point>[,iteration=N][,rank=R]` -> Fault; ValueError naming the variable."""
    head, *options = [part.strip() for part in text.split(",")]
    action, _, point = head.partition("@")
    if action not in ACTIONS or point not in POINTS:
        raise ValueError(f"${FAULT_ENV}={text!r}: expected <action>@<point>[,iteration=N][,rank=R]"
                         f" with action in {ACTIONS} and point in {POINTS}")
    fault = Fault(action, point)
    for option in options:
        key, _, value = option.partition("=")
        if key not in ("iteration", "rank") or not value.isdigit():
            raise ValueError(f"${FAULT_ENV}={text!r}: unknown option {option!r} "
                             f"(iteration=N, rank=R)")
        setattr(fault, key, int(value))
    return fault


_FAULT: Optional[Fault] = (parse_fault(os.environ[FAULT_ENV])
                           if os.environ.get(FAULT_ENV) else None)


def at(point: str, iteration: Optional[int] = None,
       tensors: Sequence[tuple[str, torch.Tensor]] = ()) -> None:
    """Fires the configured fault if it names `point` (and this iteration and
    rank). Called by the job at the points listed in the module doc;
    `tensors`: (name, tensor) pairs that `bitflip` may corrupt."""
    if _FAULT is None:
        return
    _fire(_FAULT, point, iteration, tensors)


def _fire(fault: Fault, point: str, iteration: Optional[int],
          tensors: Sequence[tuple[str, torch.Tensor]] = ()) -> None:
    if fault.fired or fault.point != point:
        return
    if fault.iteration is not None and fault.iteration != iteration:
        return
    if fault.rank is not None and fault.rank != _rank():
        return
    if fault.action == "bitflip" and not tensors:
        raise ValueError(f"${FAULT_ENV}: bitflip needs a point that hands over tensors "
                         f"(weight-hash), not {point}")
    fault.fired = True
    where = f"{point} (iteration {iteration}, rank {_rank()})"
    target = f": {tensors[-1][0]}" if fault.action == "bitflip" else ""
    print(f"[fault-injection] {fault.action} at {where}{target}", flush=True)
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.action == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    elif fault.action == "stall":
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(STALL_SECONDS)
    elif fault.action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {where})")
    elif fault.action == "eio":
        raise OSError(errno.EIO, f"Input/output error (injected at {where})")
    elif fault.action == "bitflip":
        _flip_lowest_bit(tensors[-1][1])


def _flip_lowest_bit(tensor: torch.Tensor) -> None:
    """XORs bit 0 of `tensor`'s first element, in place (any dtype)."""
    import torch

    flat = tensor.detach().reshape(-1)
    bits = flat.view({1: torch.uint8, 2: torch.int16, 4: torch.int32,
                      8: torch.int64}[flat.element_size()])
    bits[:1] ^= 1


def _rank() -> int:
    """This process's global rank: the process group's once it exists, else $RANK."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


NAN_GRAD_ENV = "MEGATRON_SR_INJECT_NAN_GRAD_AT"


def nan_grad_iterations() -> frozenset[int]:
    """The iterations named by $MEGATRON_SR_INJECT_NAN_GRAD_AT for this rank
    (empty when unset, or when a `rank=R` item names another rank)."""
    text = os.environ.get(NAN_GRAD_ENV, "").strip()
    items = [item.strip() for item in text.split(",") if item.strip()]
    ranks = [item for item in items if item.startswith("rank=")]
    try:
        iterations = frozenset(int(item) for item in items if item not in ranks)
        rank = int(ranks[-1][len("rank="):]) if ranks else None
    except ValueError:
        raise ValueError(f"${NAN_GRAD_ENV}={text!r}: expected comma-separated "
                         f"iteration numbers and an optional rank=R, e.g. 3,4,rank=1") from None
    if rank is not None and rank != _rank():
        return frozenset()
    return iterations
