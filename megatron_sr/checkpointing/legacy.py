"""`--ckpt-format torch`: Megatron-LM's legacy layout, one torch file per rank.

    latest_checkpointed_iteration.txt        the iteration number, written last
    iter_0000100/
        checksums.json                        manifest: layout, file sizes, sha256
        mp_rank_00/model_optim_rng.pt         TP rank 00 (PP=1)
        mp_rank_00_001/model_optim_rng.pt     TP rank 00, PP stage 001 (PP>1)

One file per (TP rank, PP stage), written by the rank of data-parallel index
0 of that position. In a training checkpoint it holds the model parameters
and the optimizer state keyed by global parameter name (the optimizer state
is gathered over DP to that rank only, so the checkpoint loads at any DP
size), plus the scheduler, the iteration, the consumed samples and the RNG
states of every DP rank (`training_checkpoint` builds it). The files are
written into the temporary directory and published as `publish` describes;
they are read with `torch.load(weights_only=True)` after their size and
sha256 are checked against the manifest.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist

from megatron_sr import fault_injection
from megatron_sr.checkpointing.manifest import (STATE_FILENAME, CheckpointError, rank_dir_name,
                                                read_manifest, resolve_checkpoint_dir,
                                                verify_file)
from megatron_sr.checkpointing.publish import (collective_on_rank0, prepare_temporary_directory,
                                               publish, publish_written)

FORMAT = "torch"


def _state_file_relpath(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    return os.path.join(rank_dir_name(tp_rank, pp_rank, pp_size), STATE_FILENAME)


def _write_state_file(path: str, state: dict) -> dict:
    """Writes `state` with torch.save to `path` (via a temporary name, fsynced);
    returns {"size": bytes, "sha256": hex}."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getbuffer()
    partial = path + ".partial"
    with open(partial, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def save_checkpoint(save_dir: str, iteration: int, state: Optional[dict], *, tp_rank: int,
                    pp_rank: int, tp_size: int, pp_size: int) -> str:
    """Writes this rank's `state` (None on ranks that write nothing, i.e.
    data-parallel index > 0) into the checkpoint of `iteration`.

    Called by every rank of the world. Returns the final directory. Raises
    CheckpointError on every rank if any rank failed to write.
    """
    tmp_dir = collective_on_rank0(lambda: prepare_temporary_directory(save_dir, iteration))
    error, entries = None, []
    if state is not None:
        relpath = _state_file_relpath(tp_rank, pp_rank, pp_size)
        try:
            os.makedirs(os.path.join(tmp_dir, os.path.dirname(relpath)), exist_ok=True)
            fault_injection.at("checkpoint-write", iteration)
            entries = [{"file": relpath,
                        **_write_state_file(os.path.join(tmp_dir, relpath), state)}]
        except Exception as exc:  # report any failure to every rank instead of hanging them
            rank = dist.get_rank() if dist.is_initialized() else 0
            error = f"rank {rank} could not write {os.path.join(tmp_dir, relpath)}: {exc}"
    return publish_written(save_dir, tmp_dir, iteration, (tp_size, pp_size), FORMAT,
                           (error, entries))


def write_checkpoint(save_dir: str, iteration: int, rank_states: dict, tp_size: int,
                     pp_size: int) -> str:
    """Writes a whole checkpoint from one process (offline tools: conversion):
    `rank_states` maps (tp_rank, pp_rank) to the state of that rank's file.
    Atomic like `save_checkpoint`; on failure nothing of it remains."""
    tmp_dir = prepare_temporary_directory(save_dir, iteration)
    try:
        entries = []
        for (tp_rank, pp_rank), state in sorted(rank_states.items()):
            relpath = _state_file_relpath(tp_rank, pp_rank, pp_size)
            os.makedirs(os.path.join(tmp_dir, os.path.dirname(relpath)))
            entries.append({"file": relpath,
                            **_write_state_file(os.path.join(tmp_dir, relpath), state)})
        return publish(save_dir, tmp_dir, iteration, entries, tp_size, pp_size, FORMAT)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def load_state_file(iteration_dir: str, tp_rank: int, pp_rank: int, tp_size: int,
                    pp_size: int, verify: bool = True) -> dict:
    """Reads the state of (tp_rank, pp_rank) from a complete checkpoint directory,
    after checking the layout and (with `verify`) the file's size and sha256."""
    manifest = read_manifest(iteration_dir)
    saved_layout = (manifest["tensor_model_parallel_size"],
                    manifest["pipeline_model_parallel_size"])
    if saved_layout != (tp_size, pp_size):
        raise CheckpointError(
            f"{iteration_dir} was saved with --tensor-model-parallel-size {saved_layout[0]} "
            f"--pipeline-model-parallel-size {saved_layout[1]}; this run uses {tp_size} and "
            f"{pp_size} (reshape it with tools/checkpoint_convert.py)")
    relpath = _state_file_relpath(tp_rank, pp_rank, pp_size)
    path = os.path.join(iteration_dir, relpath)
    expected = manifest["files"].get(relpath)
    if expected is None or not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing from the checkpoint")
    if verify:
        verify_file(path, expected)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} could not be read: {exc}") from exc


def read_all_rank_states(path: str) -> tuple[str, dict, dict]:
    """Every rank file of the checkpoint `path` names, verified:
    (iteration directory, manifest, {(tp_rank, pp_rank): state})."""
    directory = resolve_checkpoint_dir(path)
    manifest = read_manifest(directory)
    tp, pp = manifest["tensor_model_parallel_size"], manifest["pipeline_model_parallel_size"]
    states = {(t, p): load_state_file(directory, t, p, tp, pp)
              for t in range(tp) for p in range(pp)}
    return directory, manifest, states
