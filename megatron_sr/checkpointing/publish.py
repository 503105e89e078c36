"""The atomic publish both formats share, and the collectives around it.

One save, every rank of the world taking part:

  1. `prepare_temporary_directory` (rank 0, its outcome broadcast to every
     rank): finishes or rolls back an interrupted publish
     (`recover_interrupted_publish`), removes what a crashed save left in
     `.iter_XXXXXXX.tmp/` and creates it afresh;
  2. every rank writes and fsyncs its files into that directory (the format's
     code: `legacy`, `torch_dist`);
  3. `publish_written` (all-gathers the ranks' results): rank 0 writes the
     manifest, renames the directory to `iter_XXXXXXX` and replaces the
     tracker last (`publish`); if any rank failed, rank 0 removes the
     temporary directory instead and every rank raises the same
     `CheckpointError` (one more all-gather), so no rank is left waiting in
     a collective.

A crash at any point leaves the previous checkpoint and the tracker intact.
Re-saving an existing iteration moves the old directory aside
(`iter_XXXXXXX.replaced`) and deletes it only after the new one is in place;
the next save or load on rank 0 finishes or rolls back a replacement that
died half-way.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Optional, TypeVar

import torch.distributed as dist

from megatron_sr import fault_injection
from megatron_sr.checkpointing.manifest import (CHECKPOINT_VERSION, MANIFEST_FILENAME,
                                                REPLACED_SUFFIX, TRACKER_FILENAME,
                                                CheckpointError, iteration_dir_name)

T = TypeVar("T")


def rank0() -> bool:
    """Whether this process is global rank 0 (or runs without process groups)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order: one all_gather_object over the
    world ([value] without process groups). Every rank calls it."""
    if not dist.is_initialized():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def collective_on_rank0(function: Callable[[], T]) -> T:
    """Runs `function` on rank 0 and hands its result (or its CheckpointError)
    to every rank: one broadcast over the world. Every rank calls it."""
    result, error = None, None
    if rank0():
        try:
            result = function()
        except CheckpointError as exc:
            error = str(exc)
    if dist.is_initialized():
        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error:
        raise CheckpointError(error)
    return result


def log_recovery(actions: list[str]) -> None:
    """Prints what `recover_interrupted_publish` did, one line per action."""
    for action in actions:
        print(f"[checkpoint] {action}", flush=True)


def temporary_dir(save_dir: str, iteration: int) -> str:
    """Where the files of `iteration`'s checkpoint are written before it is published."""
    return os.path.join(save_dir, "." + iteration_dir_name(iteration) + ".tmp")


def prepare_temporary_directory(save_dir: str, iteration: int) -> str:
    """Step 1 of a save, run by the one process that writes `save_dir`'s
    directories (rank 0; an offline tool): creates `save_dir`, recovers an
    interrupted publish there (printing what it did), and creates an empty
    temporary directory for `iteration`, which it returns. CheckpointError
    naming both directories when any of it fails. Every rank of a job calls
    it through `collective_on_rank0`."""
    tmp_dir = temporary_dir(save_dir, iteration)
    try:
        os.makedirs(save_dir, exist_ok=True)
        log_recovery(recover_interrupted_publish(save_dir))
        shutil.rmtree(tmp_dir, ignore_errors=True)
        os.makedirs(tmp_dir)
    except (OSError, CheckpointError) as exc:
        raise CheckpointError(f"checkpoint save to {save_dir} failed: rank 0 could not create "
                              f"{tmp_dir}: {exc}") from exc
    return tmp_dir


def publish(save_dir: str, tmp_dir: str, iteration: int, entries: list[dict], tp_size: int,
            pp_size: int, checkpoint_format: str) -> str:
    """Completes a checkpoint whose files are written and fsynced in `tmp_dir`
    (`entries`: their manifest entries, `manifest.file_entry`): writes the
    manifest, renames `tmp_dir` to `iter_XXXXXXX` (moving an older save of the
    same iteration aside first, and deleting it only afterwards), then
    replaces the tracker. Returns the final directory. Run by one process;
    OSError when a write or rename fails."""
    final_dir = os.path.join(save_dir, iteration_dir_name(iteration))
    manifest = {"iteration": iteration, "checkpoint_version": CHECKPOINT_VERSION,
                "format": checkpoint_format,
                "tensor_model_parallel_size": tp_size, "pipeline_model_parallel_size": pp_size,
                "files": {e["file"]: {"size": e["size"], "sha256": e["sha256"]} for e in entries}}
    _write_text(os.path.join(tmp_dir, MANIFEST_FILENAME),
                json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    replaced = None
    if os.path.exists(final_dir):
        replaced = final_dir + REPLACED_SUFFIX
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final_dir, replaced)
        fault_injection.at("checkpoint-replace", iteration)
    os.replace(tmp_dir, final_dir)
    _fsync_dir(save_dir)
    fault_injection.at("checkpoint-commit", iteration)
    _write_text(os.path.join(save_dir, TRACKER_FILENAME), f"{iteration}\n")
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    return final_dir


def publish_written(save_dir: str, tmp_dir: str, iteration: int, layout: tuple[int, int],
                    checkpoint_format: str, result: tuple[Optional[str], list[dict]]) -> str:
    """Step 3 of a save: `result` is this rank's (error or None, manifest
    entries of the files it wrote into `tmp_dir`); `layout` is (TP size, PP
    size). Rank 0 publishes when no rank failed and removes `tmp_dir` when any
    did. Returns the final directory; CheckpointError on every rank, naming
    each failure, otherwise. Collective over the world (two all-gathers)."""
    reports = all_gather_objects(result)
    failures = [error for error, _ in reports if error]
    final_dir = os.path.join(save_dir, iteration_dir_name(iteration))
    if rank0() and not failures:
        try:
            publish(save_dir, tmp_dir, iteration, [e for _, entries in reports for e in entries],
                    *layout, checkpoint_format=checkpoint_format)
        except OSError as exc:
            failures.append(f"rank 0 could not finalize {final_dir}: {exc}")
    if rank0() and failures:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    failures = all_gather_objects(failures)[0]
    if failures:
        raise CheckpointError(f"checkpoint save of iteration {iteration} to {save_dir} failed "
                              f"(previous checkpoint left intact): {'; '.join(failures)}")
    return final_dir


def recover_interrupted_publish(save_dir: str) -> list[str]:
    """Finishes or rolls back a `publish` that died while replacing an
    iteration directory (the old one moved to `iter_XXXXXXX.replaced`).

    For every `iter_XXXXXXX.replaced` in `save_dir`: if `iter_XXXXXXX` is a
    complete checkpoint (the new one was published), the old copy is deleted;
    otherwise the old copy is moved back (roll back), so the iteration the
    tracker names exists again. Called by the one process that writes
    `save_dir` (rank 0) before it writes anything there. Returns what it did,
    one line per directory; raises CheckpointError naming the directory when
    a rename fails.
    """
    if not os.path.isdir(save_dir):
        return []
    actions = []
    for entry in sorted(os.listdir(save_dir)):
        if not (entry.startswith("iter_") and entry.endswith(REPLACED_SUFFIX)):
            continue
        replaced = os.path.join(save_dir, entry)
        final = replaced[:-len(REPLACED_SUFFIX)]
        try:
            if os.path.isfile(os.path.join(final, MANIFEST_FILENAME)):
                shutil.rmtree(replaced)
                actions.append(f"removed {replaced}: {final} was published")
            else:
                if os.path.exists(final):  # an incomplete directory under the final name
                    shutil.rmtree(final)
                os.replace(replaced, final)
                _fsync_dir(save_dir)
                actions.append(f"restored {final} from {replaced}: its replacement was "
                               "interrupted")
        except OSError as exc:
            raise CheckpointError(f"could not recover the interrupted replacement of {final} "
                                  f"(from {replaced}): {exc}") from exc
    return actions


def _write_text(path: str, text: str) -> None:
    """Writes `text` to `path` through a temporary name, fsynced before the rename."""
    partial = path + ".partial"
    with open(partial, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
