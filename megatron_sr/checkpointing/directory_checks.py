"""Checks that keep a run from writing where it must not.

Before anything is written: an output directory (--save, a conversion's
--save) must not lie inside a published checkpoint, must be creatable and
writable, and --save must not hold another run's checkpoints (whose tracker
and iterations a save would replace) unless --override-existing-checkpoints
says so. These functions look only; they create nothing.
"""
from __future__ import annotations

import os
import re
from typing import Optional

from megatron_sr.checkpointing.manifest import (MANIFEST_FILENAME, TRACKER_FILENAME,
                                                CheckpointError, is_iteration_directory,
                                                read_tracker)
from megatron_sr.checkpointing.publish import collective_on_rank0


def holds_checkpoints(directory: str) -> bool:
    """Whether `directory` holds a tracker or any iteration directory."""
    if not os.path.isdir(directory):
        return False
    return any(entry == TRACKER_FILENAME or entry.startswith("iter_")
               for entry in os.listdir(directory))


def check_save_directory(training) -> None:
    """Refuses (CheckpointError on every rank) a --save directory that cannot
    hold this run's checkpoints: one that lies inside a published checkpoint,
    one below a file or not writable, and one that holds checkpoints of
    another run (not --load, nor --load's parent when --load is one of its
    iteration directories) unless --override-existing-checkpoints is given.
    Rank 0 looks; every rank calls it (one broadcast)."""
    save, load = training.save, training.load
    if not save:
        return

    def look() -> Optional[str]:
        problem = unusable_output_directory(save, "--save")
        if problem or getattr(training, "override_existing_checkpoints", False):
            return problem
        same_run = load and (os.path.realpath(save) == os.path.realpath(load) or (
            is_iteration_directory(load)
            and os.path.realpath(save) == os.path.dirname(os.path.realpath(load))))
        if same_run or not holds_checkpoints(save):
            return None
        iteration = read_tracker(save)
        what = f"a tracker naming iteration {iteration}" if iteration is not None \
            else "iteration directories"
        return (f"--save {save} holds checkpoints of another run ({what}); saving there would "
                f"replace its tracker and its iterations of the same numbers. Resume that run "
                f"with --load {save}, choose an empty directory, or pass "
                f"--override-existing-checkpoints")

    error = collective_on_rank0(look)
    if error:
        raise CheckpointError(error)


def unusable_output_directory(path: str, flag: str) -> Optional[str]:
    """Why `path` cannot be written as an output directory, or None: it lies
    inside a published checkpoint (it, or a directory above it, is an
    iter_XXXXXXX directory holding a manifest), or the nearest existing
    directory on its way is a file or is not writable. Looks only; creates
    nothing."""
    absolute = os.path.abspath(path)
    probe = absolute
    while True:
        if re.fullmatch(r"iter_[0-9]+(\.replaced)?", os.path.basename(probe)) \
                and os.path.isfile(os.path.join(probe, MANIFEST_FILENAME)):
            return (f"{flag} {path} lies inside the published checkpoint {probe}: writing there "
                    f"would change it; choose a directory outside it")
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    existing = absolute
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{flag} {path}: {existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{flag} {path}: {existing} is not writable"
    return None
