"""`--ckpt-format torch_dist`: sharded checkpoints on torch.distributed.checkpoint (DCP).

Layout under `--save` (the tracker, the manifest and the atomic publish are
both formats', see `checkpointing.manifest` and `checkpointing.publish`):

    latest_checkpointed_iteration.txt       written last
    iter_0000100/
        checksums.json                       manifest: format, layout, size + sha256 per file
        .metadata                            DCP: every tensor's global shape and chunks
        __<rank>_0.distcp                    DCP: what global rank <rank> owns

What a rank writes (keys of the DCP state dict), nothing gathered:

    model/<global name>                 its TP slice of each parameter, at DP index 0 only;
                                        TP-replicated ones on TP rank 0 only, the last
                                        stage's copy of a tied embedding not at all
    optimizer/<kind>/<global name>      its DP shard of m, v (master, kahan): the
                                        ranges of the flattened TP slice its shard
                                        holds (`global_blocks.flat_range_blocks`)
    common                              rank 0: iteration, consumed samples, args,
                                        scheduler, optimizer step counters, the
                                        parts left out ("omitted")
    rng_state/ppPPP_tpTT_dpDDDDD        every rank: its RNG states

--no-save-optim leaves out the `optimizer/` entries (and the scheduler and
step counters of `common`), --no-save-rng the `rng_state/` entries.

Every tensor is described in its global (TP = 1) shape, so a load asks for
the blocks of the new layout and DCP reads the overlapping pieces: any TP, PP
and DP size loads any checkpoint. The padded vocabulary (which grows with
the TP size) is the one dim allowed to differ: rows beyond the saved ones keep
their initial values, saved rows beyond the model's are dropped (padding).

Host memory: a synchronous save writes from the rank's own tensors; an async
save (`--async-save`) first copies them to the CPU, so at most what the rank
owns is held twice. The files are written in a background thread over a Gloo
group of its own; the next save, or the end of training, waits for it and
publishes it (manifest, rename, tracker: collective over the world). A
process killed before that leaves only `.iter_XXXXXXX.tmp/` behind: the
previous checkpoint stays the one the tracker names.

Precision: tensors load into the dtypes of this run (`copy_` casts; fp32 ->
bf16 rounds to nearest). A kind of optimizer state the checkpoint lacks is
derived: the fp32 master copy from the loaded bf16 weights (bf16-mixed from a
pure-bf16 checkpoint, exact), the Kahan compensation as zeros; a kind it has
and this run does not use is ignored (bf16-sr from bf16-mixed drops the
master copy: the weights are its bf16 rounding).
"""
from __future__ import annotations

import concurrent.futures
import os
import warnings
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from megatron_sr import fault_injection, parallel_state
from megatron_sr.checkpointing import global_blocks
from megatron_sr.checkpointing.dcp_metadata import CheckpointReader
from megatron_sr.checkpointing.global_blocks import GlobalBlocks
from megatron_sr.checkpointing.manifest import (METADATA_FILENAME, CheckpointError, file_entry,
                                                is_data_file_name, verify_file)
from megatron_sr.checkpointing.publish import all_gather_objects, publish_written
from megatron_sr.checkpointing.rng import set_rng_state
from megatron_sr.checkpointing.strict_load import (check_saved_parts, check_vocabulary,
                                                   extra_parameters_message)
from megatron_sr.model import named_parameters_global
from megatron_sr.model.parallel_layout import param_is_unique_in_model

FORMAT = "torch_dist"
COMMON_KEY = "common"


def reader(directory: str, manifest: dict) -> CheckpointReader:
    """The DCP reader of a verified checkpoint: metadata through the
    restricted unpickler, data only from the manifest's files (see
    `dcp_metadata`)."""
    return CheckpointReader(directory, os.path.join(directory, METADATA_FILENAME),
                            frozenset(f for f in manifest["files"] if is_data_file_name(f)))


def rng_key(pp_rank: int, tp_rank: int, dp_rank: int) -> str:
    return f"rng_state/pp{pp_rank:03d}_tp{tp_rank:02d}_dp{dp_rank:05d}"


def _add(state: dict, key: str, shape, dtype: torch.dtype, blocks: list) -> None:
    if key in state:
        state[key].blocks.update({tuple(o): d for o, d in blocks})
    else:
        state[key] = GlobalBlocks(shape, dtype, blocks)


def _param_blocks(param: torch.Tensor, tp_rank: int) -> list:
    local = param.detach().view(global_blocks.logical_shape(param, param.shape))
    return [(global_blocks.tp_slice_offsets(param, tp_rank), local)]


def _state_blocks(param: torch.Tensor, offset: int, state: torch.Tensor, tp_rank: int) -> list:
    base = global_blocks.tp_slice_offsets(param, tp_rank)
    blocks, position = [], 0
    for offsets, sizes in global_blocks.flat_range_blocks(
            offset, offset + state.numel(), global_blocks.logical_shape(param, param.shape)):
        numel = 1
        for size in sizes:
            numel *= size
        blocks.append((tuple(b + o for b, o in zip(base, offsets)),
                       state[position:position + numel].view(sizes)))
        position += numel
    return blocks


def tensor_state(model, optimizer, *, writing: bool) -> dict[str, GlobalBlocks]:
    """The model and optimizer tensors of this rank as `GlobalBlocks` views of
    its own storage (no copy). `writing`: only what this rank writes (see the
    module doc); otherwise everything it holds (a load fills all of it)."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    state = model_state(model, writing=writing)
    replicated_state = not optimizer.buffer.distributed
    for param, kind, offset, view in optimizer.state_segments():
        if writing and ((replicated_state and dp_rank != 0) or not param_is_unique_in_model(param)):
            continue
        _add(state, f"optimizer/{kind}/{param.global_name}",
             global_blocks.global_logical_shape(param, tp_size), view.dtype,
             _state_blocks(param, offset, view, tp_rank))
    return state


def model_state(model, *, writing: bool = False) -> dict[str, GlobalBlocks]:
    """The `model/<name>` part of `tensor_state`: this rank's parameters as
    `GlobalBlocks` views (no copy)."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    state: dict[str, GlobalBlocks] = {}
    for name, param in named_parameters_global(model):
        if writing and (dp_rank != 0 or not param_is_unique_in_model(param)):
            continue
        _add(state, f"model/{name}", global_blocks.global_logical_shape(param, tp_size),
             param.dtype, _param_blocks(param, tp_rank))
    return state


def _staged(state: dict) -> dict:
    """A copy of `state` whose tensors are CPU copies (what an async save writes
    while training changes the originals)."""
    staged = {}
    for key, value in state.items():
        if isinstance(value, GlobalBlocks):
            value = GlobalBlocks(value.shape, value.dtype,
                                 [(o, d.detach().to("cpu", copy=True))
                                  for o, d in value.blocks.items()])
        staged[key] = value
    return staged


def _write(state: dict, tmp_dir: str, iteration: int, group) -> tuple[Optional[str], list]:
    """Writes `state` with DCP into `tmp_dir` (collective over `group`, which
    holds every rank); returns (error, manifest entries of this rank's files)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        fault_injection.at("checkpoint-write", iteration)
        writer = dcp.FileSystemWriter(tmp_dir, single_file_per_rank=True, sync_files=True)
        dcp.save(state, storage_writer=writer, planner=global_blocks.SavePlanner(),
                 process_group=group, no_dist=not dist.is_initialized())
        mine = sorted(f for f in os.listdir(tmp_dir) if f.startswith(f"__{rank}_"))
        if rank == 0:
            mine.append(METADATA_FILENAME)
        return None, [file_entry(tmp_dir, f) for f in mine]
    except (Exception, CheckpointException) as exc:  # reported to every rank by `publish_written`
        return f"rank {rank} could not write its part of {tmp_dir}: {exc}", []


class _PendingSave:
    """An async save whose files are being written by a background thread."""

    def __init__(self, future, save_dir: str, tmp_dir: str, iteration: int, layout: tuple):
        self.future, self.save_dir, self.tmp_dir = future, save_dir, tmp_dir
        self.iteration, self.layout = iteration, layout


_PENDING: Optional[_PendingSave] = None
_EXECUTOR: Optional[concurrent.futures.ThreadPoolExecutor] = None
_ASYNC_GROUP: Optional[tuple] = None  # (the world it was made in, the group)


def _async_group():
    """A Gloo group of the whole world for the background writes, so they never
    interleave with the training's collectives. Created on the first async
    save of each world (every rank calls it there): a process that runs a
    second job after the first destroyed its process groups gets a new one."""
    global _ASYNC_GROUP
    if not dist.is_initialized():
        return None
    world = dist.group.WORLD
    if _ASYNC_GROUP is None or _ASYNC_GROUP[0] is not world:
        _ASYNC_GROUP = (world, dist.new_group(backend="gloo"))
    return _ASYNC_GROUP[1]


def wait_for_pending_save() -> Optional[str]:
    """Waits for the async save in flight (if any) and publishes it; returns its
    directory. Every rank calls it (the next save does, and the end of
    training). CheckpointError on every rank if any rank failed to write."""
    global _PENDING
    pending, _PENDING = _PENDING, None
    if pending is None:
        return None
    path = publish_written(pending.save_dir, pending.tmp_dir, pending.iteration,
                           pending.layout, FORMAT, pending.future.result())
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[checkpoint] saved iteration {pending.iteration} to {path} (async)", flush=True)
    return path


def save(job, iteration: int, common: dict, model, optimizer, tmp_dir: str,
         rng: Optional[dict]) -> Optional[str]:
    """Writes this rank's part of the checkpoint of `iteration` into `tmp_dir`
    (created by rank 0) and publishes it, or, with --async-save, starts the
    write in the background and returns None: the model, the optimizer state
    unless --no-save-optim, and `rng` (None: --no-save-rng). Every rank calls it."""
    global _PENDING, _EXECUTOR
    training = job.training
    if training.no_save_optim:
        state = model_state(model, writing=True)
    else:
        state = tensor_state(model, optimizer, writing=True)
    if dist.get_rank() == 0:
        state[COMMON_KEY] = common
    if rng is not None:
        state[rng_key(parallel_state.get_pipeline_model_parallel_rank(),
                      parallel_state.get_tensor_model_parallel_rank(),
                      parallel_state.get_data_parallel_rank())] = rng
    layout = (parallel_state.get_tensor_model_parallel_world_size(),
              parallel_state.get_pipeline_model_parallel_world_size())
    if not training.async_save:
        return publish_written(training.save, tmp_dir, iteration, layout, FORMAT,
                               _write(state, tmp_dir, iteration, None))
    group = _async_group()
    staged = _staged(state)
    if _EXECUTOR is None:
        _EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                          thread_name_prefix="async-save")
    _PENDING = _PendingSave(_EXECUTOR.submit(_write, staged, tmp_dir, iteration, group),
                            training.save, tmp_dir, iteration, layout)
    return None


def verify(directory: str, manifest: dict) -> None:
    """Checks size and sha256 of the checkpoint's files, split over the ranks
    (rank r checks every world_size-th file); CheckpointError on every rank
    naming the first bad file. Collective over the world."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    error = None
    for relpath in sorted(manifest["files"])[rank::world]:
        try:
            verify_file(os.path.join(directory, relpath), manifest["files"][relpath])
        except CheckpointError as exc:
            error = str(exc)
            break
    errors = [e for e in all_gather_objects(error) if e]
    if errors:
        raise CheckpointError(errors[0])


def _fit(key: str, wanted: GlobalBlocks, saved_shape: torch.Size, directory: str) -> GlobalBlocks:
    if wanted.shape == saved_shape:
        return wanted
    vocab = key.endswith(("word_embeddings.weight", "output_layer.weight"))
    if vocab and wanted.shape[1:] == saved_shape[1:]:
        return wanted.clipped_to(saved_shape)
    raise CheckpointError(
        f"{directory}: {key} has shape {tuple(saved_shape)} in the checkpoint but "
        f"{tuple(wanted.shape)} in this model (check --hidden-size, --ffn-hidden-size, "
        f"--num-attention-heads, --swiglu and the vocabulary)")


def _first_line(exc: BaseException) -> str:
    """One line for `exc`: for DCP's CheckpointException (whose message holds
    every rank's traceback) the first failing rank's exception, else the
    first line of the message."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, (inner, _) = sorted(failures.items(), key=lambda item: item[0])[0]
        return f"rank {rank}: {_first_line(inner)}"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


def _read_common(checkpoint_reader: CheckpointReader, directory: str, *,
                 alone: bool = False) -> dict:
    """The checkpoint's `common` entry (rank 0's plain values, read with
    weights_only); collective over the world like every `dcp.load`, unless
    `alone` (or without process groups): then this process reads it by itself."""
    state: dict = {COMMON_KEY: None}
    no_dist = alone or not dist.is_initialized()
    try:
        with warnings.catch_warnings():  # DCP warns that no_dist reads in one process: meant
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=checkpoint_reader,
                     planner=global_blocks.LoadPlanner(), no_dist=no_dist)
    except (Exception, CheckpointException) as exc:
        raise CheckpointError(f"{directory} could not be read: {_first_line(exc)}") from exc
    if not isinstance(state[COMMON_KEY], dict):
        raise CheckpointError(f"{directory}: its {COMMON_KEY!r} entry is not a dict")
    return state[COMMON_KEY]


def read_common_alone(directory: str, manifest: dict) -> dict:
    """The `common` entry of the torch_dist checkpoint in `directory`, read by
    the calling process alone (no collective, also when process groups exist)
    and without checking the files' checksums: the metadata goes through the
    restricted unpickler and the entry loads with weights_only. For a look at
    the run's description before the job starts (--use-checkpoint-args); the
    load verifies every file."""
    checkpoint_reader = reader(directory, manifest)
    if COMMON_KEY not in checkpoint_reader.read_metadata().state_dict_metadata:
        raise CheckpointError(f"{os.path.join(directory, METADATA_FILENAME)} has no "
                              f"{COMMON_KEY!r} entry: not a megatron_sr checkpoint")
    return _read_common(checkpoint_reader, directory, alone=True)


def _check_same_model(wanted: dict, saved: dict, directory: str) -> None:
    """CheckpointError on every rank when the checkpoint holds a parameter no
    rank of this model has (the load is strict; a missing one is refused per
    rank by `load`). Collective over the world: gathers the model's names."""
    mine = sorted(key for key in wanted if key.startswith("model/"))
    held = {key for names in all_gather_objects(mine) for key in names}
    extra = sorted(key[len("model/"):] for key in saved
                   if key.startswith("model/") and key not in held)
    if extra:
        raise CheckpointError(extra_parameters_message(directory, extra))


def load(job, directory: str, manifest: dict, model, optimizer, *, load_optim: bool,
         load_rng: bool) -> dict:
    """Loads a torch_dist checkpoint into this rank's model (and optimizer
    state, RNG) at this run's layout; returns the `common` entry. Every rank
    calls it; CheckpointError names the file or parameter at fault. Strict:
    every saved parameter must be one of the model's with its shape, and the
    vocabulary the same up to padding; nothing is loaded otherwise."""
    verify(directory, manifest)
    checkpoint_reader = reader(directory, manifest)
    saved = checkpoint_reader.read_metadata().state_dict_metadata
    if COMMON_KEY not in saved:
        raise CheckpointError(f"{os.path.join(directory, METADATA_FILENAME)} has no "
                              f"{COMMON_KEY!r} entry: not a megatron_sr checkpoint")
    common = _read_common(checkpoint_reader, directory)
    check_vocabulary(job, common.get("args"), directory)
    check_saved_parts(common, directory, load_optim=load_optim, load_rng=load_rng)
    wanted = tensor_state(model, optimizer, writing=False)
    _check_same_model(wanted, saved, directory)
    state: dict = {}
    missing_kinds = set()
    for key, blocks in wanted.items():
        if key.startswith("optimizer/") and not load_optim:
            continue
        if key not in saved:
            if key.startswith("optimizer/"):
                missing_kinds.add(key.split("/")[1])
                continue
            raise CheckpointError(f"{directory} has no parameter {key[len('model/'):]}: the "
                                  f"checkpoint was saved from a different model (e.g. "
                                  f"--num-layers, --swiglu, --disable-bias-linear or tied "
                                  f"embeddings)")
        state[key] = _fit(key, blocks, saved[key].size, directory)
    same_layout = (manifest["tensor_model_parallel_size"],
                   manifest["pipeline_model_parallel_size"]) == (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size())
    key = rng_key(parallel_state.get_pipeline_model_parallel_rank(),
                  parallel_state.get_tensor_model_parallel_rank(),
                  parallel_state.get_data_parallel_rank())
    if load_rng and same_layout and key in saved:
        state[key] = None
    try:
        dcp.load(state, storage_reader=checkpoint_reader,
                 planner=global_blocks.LoadPlanner())
    except (Exception, CheckpointException) as exc:
        raise CheckpointError(f"{directory} could not be read: {_first_line(exc)}") from exc
    if load_optim:
        kinds = set(optimizer.state) - missing_kinds
        if "master" not in kinds:
            optimizer.reset_master_from_params()
        if "kahan" in optimizer.state and "kahan" not in kinds:
            for tensor in optimizer.state["kahan"]:
                tensor.zero_()
        if missing_kinds - {"master", "kahan"}:
            raise CheckpointError(f"{directory} holds no optimizer state "
                                  f"{sorted(missing_kinds)}: load it with --no-load-optim")
        optimizer.step_count = int(common["optimizer"]["step"])
        optimizer.skipped_steps = int(common["optimizer"]["skipped_steps"])
    common["rng_loaded"] = state.get(key) is not None
    if common["rng_loaded"]:
        set_rng_state(state[key])
    return common


def open_for_model(directory: str, manifest: dict) -> tuple[CheckpointReader, dict]:
    """(reader, `common` entry) of a torch_dist checkpoint, after verifying its
    files (split over the ranks): what a tool that loads only the weights
    (`load_model`) reads first, to learn the model. Every rank calls it."""
    verify(directory, manifest)
    checkpoint_reader = reader(directory, manifest)
    if COMMON_KEY not in checkpoint_reader.read_metadata().state_dict_metadata:
        raise CheckpointError(f"{os.path.join(directory, METADATA_FILENAME)} has no "
                              f"{COMMON_KEY!r} entry: not a megatron_sr checkpoint")
    return checkpoint_reader, _read_common(checkpoint_reader, directory)


def load_model(checkpoint_reader: CheckpointReader, directory: str, model) -> None:
    """Reads this rank's blocks of the `model/` entries into `model` (its
    parameters at this run's layout): no optimizer state, no RNG state, no
    other rank's blocks (DCP reads only the stored chunks that overlap
    them). Strict as `load`. Every rank calls it (after `open_for_model`)."""
    saved = checkpoint_reader.read_metadata().state_dict_metadata
    wanted = model_state(model)
    _check_same_model(wanted, saved, directory)
    state = {}
    for key, blocks in wanted.items():
        if key not in saved:
            raise CheckpointError(f"{directory} has no parameter {key[len('model/'):]}: the "
                                  f"checkpoint was saved from a different model")
        state[key] = _fit(key, blocks, saved[key].size, directory)
    try:
        dcp.load(state, storage_reader=checkpoint_reader, planner=global_blocks.LoadPlanner(),
                 no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as exc:
        raise CheckpointError(f"{directory} could not be read: {_first_line(exc)}") from exc


def read_full(directory: str, manifest: dict, *, optimizer: bool = True
              ) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """Reads a whole torch_dist checkpoint in one process (offline tools, tests),
    after verifying its files: (common, {key: full tensor in its stored
    (logical) shape}, {rng key: RNG state}). Holds the whole model in memory.
    Without `optimizer` only `common` and the `model/` entries are read (no
    optimizer state, no RNG states: the last dict is empty)."""
    verify(directory, manifest)
    checkpoint_reader = reader(directory, manifest)
    metadata = checkpoint_reader.read_metadata().state_dict_metadata
    if COMMON_KEY not in metadata:
        raise CheckpointError(f"{os.path.join(directory, METADATA_FILENAME)} has no "
                              f"{COMMON_KEY!r} entry: not a megatron_sr checkpoint")
    state = {key: (torch.empty(md.size, dtype=md.properties.dtype) if hasattr(md, "size")
                   else None) for key, md in metadata.items()
             if optimizer or key == COMMON_KEY or key.startswith("model/")}
    try:
        dcp.load(state, storage_reader=checkpoint_reader, planner=global_blocks.LoadPlanner(),
                 no_dist=True)
    except (Exception, CheckpointException) as exc:
        raise CheckpointError(f"{directory} could not be read: {_first_line(exc)}") from exc
    if not isinstance(state[COMMON_KEY], dict):
        raise CheckpointError(f"{directory}: its {COMMON_KEY!r} entry is not a dict")
    tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    rng = {key: value for key, value in state.items() if key.startswith("rng_state/")}
    return state[COMMON_KEY], tensors, rng
