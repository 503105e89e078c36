"""Checkpoints in Megatron-LM's layout, written atomically and verified on load.

The package: this module holds the legacy format (`--ckpt-format torch`), the
publish step both formats share (temporary directory, manifest, rename,
tracker last, recovery of an interrupted replace), the checks that keep a run
from writing over another's, and the training job's entry points
(`save_training_checkpoint`, `load_training_checkpoint`, `finish_pending_save`)
which dispatch on the format. `torch_dist` is the default sharded format on
torch.distributed.checkpoint (`global_blocks` describes what a rank owns in
global coordinates); `megatron_lm` reads and writes Megatron-LM's own files.

Legacy layout under `--save`:

    latest_checkpointed_iteration.txt        the iteration number, written last
    iter_0000100/
        checksums.json                        manifest: layout, file sizes, sha256
        mp_rank_00/model_optim_rng.pt         TP rank 00 (PP=1)
        mp_rank_00_001/model_optim_rng.pt     TP rank 00, PP stage 001 (PP>1)

One file per (TP rank, PP stage), written by the rank of data-parallel index
0 of that position. It holds the model parameters and the optimizer state
keyed by global parameter name (the optimizer state is gathered over DP to
that rank only, so the checkpoint loads at any DP size), plus the scheduler,
the iteration, the consumed samples and the RNG states of every DP rank.

Atomicity: every file goes to `.iter_0000100.tmp/`, which is renamed to
`iter_0000100/` only after all ranks have written and fsynced their files and
the manifest is complete; the tracker file is replaced last. A crash at any
point leaves the previous checkpoint and tracker intact; a failed write on
any rank removes the temporary directory and raises `CheckpointError` on
every rank (no rank is left waiting in a collective).

Loading treats the directory as untrusted: the tracker must hold ASCII
digits; the manifest must be well formed, list exactly the files its format
and layout write, each a path inside the directory, and the directory must
hold nothing else (no unlisted file, no symbolic link); each file's size and
sha256 must match (truncation, bit flips); `torch_dist` metadata goes
through a restricted unpickler (`dcp_metadata`). The load is strict: the
saved parameters are exactly the model's, with its shapes and vocabulary (up
to padding). Anything else is a `CheckpointError` naming the file and what
is wrong.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import stat
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_sr import fault_injection
from megatron_sr.files import sha256_file

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
MANIFEST_FILENAME = "checksums.json"
STATE_FILENAME = "model_optim_rng.pt"
CHECKPOINT_VERSION = 1
_TRACKER_MAX_BYTES = 64
_ITERATION_NUMBER = re.compile(r"[0-9]{1,12}")  # ASCII only: str.isdigit() accepts superscripts
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file."""


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def rank_dir_name(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    """Megatron's per-rank directory: mp_rank_TT, or mp_rank_TT_PPP with PP > 1."""
    return f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather_objects(value: Any) -> list[Any]:
    if not dist.is_initialized():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def save_checkpoint(save_dir: str, iteration: int, state: Optional[dict], *, tp_rank: int,
                    pp_rank: int, tp_size: int, pp_size: int) -> str:
    """Writes this rank's `state` (None on ranks that write nothing, i.e.
    data-parallel index > 0) into the checkpoint of `iteration`.

    Called by every rank of the world. Returns the final directory. Raises
    CheckpointError on every rank if any rank failed to write.
    """
    rank, _ = _world()
    final_dir = os.path.join(save_dir, iteration_dir_name(iteration))
    tmp_dir = os.path.join(save_dir, "." + iteration_dir_name(iteration) + ".tmp")
    error = None
    if rank == 0:
        try:
            os.makedirs(save_dir, exist_ok=True)
            recover_interrupted_publish(save_dir)
            shutil.rmtree(tmp_dir, ignore_errors=True)
            os.makedirs(tmp_dir)
        except (OSError, CheckpointError) as exc:
            error = f"rank 0 could not create {tmp_dir}: {exc}"
    errors = _all_gather_objects(error)
    if any(errors):
        raise CheckpointError(f"checkpoint save to {save_dir} failed: "
                              f"{next(e for e in errors if e)}")
    entry = None
    if state is not None:
        relpath = os.path.join(rank_dir_name(tp_rank, pp_rank, pp_size), STATE_FILENAME)
        try:
            os.makedirs(os.path.join(tmp_dir, os.path.dirname(relpath)), exist_ok=True)
            fault_injection.at("checkpoint-write", iteration)
            entry = {"file": relpath, **_write_state_file(os.path.join(tmp_dir, relpath), state)}
        except Exception as exc:  # report any failure to every rank instead of hanging them
            error = f"rank {rank} could not write {os.path.join(tmp_dir, relpath)}: {exc}"
    reports = _all_gather_objects((error, entry))
    failures = [e for e, _ in reports if e]
    if rank == 0 and not failures:
        try:
            _publish(save_dir, tmp_dir, iteration, [e for _, e in reports if e is not None],
                     tp_size, pp_size)
        except OSError as exc:
            failures.append(f"rank 0 could not finalize {final_dir}: {exc}")
    if rank == 0 and failures:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    failures = _all_gather_objects(failures)[0]
    if failures:
        raise CheckpointError(f"checkpoint save of iteration {iteration} to {save_dir} failed "
                              f"(previous checkpoint left intact): {'; '.join(failures)}")
    return final_dir


def _publish(save_dir: str, tmp_dir: str, iteration: int, entries: list[dict], tp_size: int,
             pp_size: int, checkpoint_format: str = "torch") -> str:
    """Completes a checkpoint whose files are written and fsynced in `tmp_dir`:
    writes the manifest, renames `tmp_dir` to `iter_XXXXXXX` (moving an older
    save of the same iteration aside first, and deleting it only afterwards),
    then replaces the tracker. Returns the final directory."""
    final_dir = os.path.join(save_dir, iteration_dir_name(iteration))
    manifest = {"iteration": iteration, "checkpoint_version": CHECKPOINT_VERSION,
                "format": checkpoint_format,
                "tensor_model_parallel_size": tp_size, "pipeline_model_parallel_size": pp_size,
                "files": {e["file"]: {"size": e["size"], "sha256": e["sha256"]} for e in entries}}
    _write_json(os.path.join(tmp_dir, MANIFEST_FILENAME), manifest)
    replaced = None
    if os.path.exists(final_dir):
        replaced = final_dir + ".replaced"
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


REPLACED_SUFFIX = ".replaced"


def recover_interrupted_publish(save_dir: str) -> list[str]:
    """Finishes or rolls back a `_publish` that died while replacing an
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


def holds_checkpoints(directory: str) -> bool:
    """Whether `directory` holds a tracker or any iteration directory."""
    if not os.path.isdir(directory):
        return False
    return any(entry == TRACKER_FILENAME or entry.startswith("iter_")
               for entry in os.listdir(directory))


def write_checkpoint(save_dir: str, iteration: int, rank_states: dict, tp_size: int,
                     pp_size: int) -> str:
    """Writes a whole checkpoint from one process (offline tools: conversion):
    `rank_states` maps (tp_rank, pp_rank) to the state of that rank's file.
    Atomic like `save_checkpoint`; on failure nothing of it remains."""
    tmp_dir = os.path.join(save_dir, "." + iteration_dir_name(iteration) + ".tmp")
    os.makedirs(save_dir, exist_ok=True)
    recover_interrupted_publish(save_dir)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    try:
        entries = []
        for (tp_rank, pp_rank), state in sorted(rank_states.items()):
            relpath = os.path.join(rank_dir_name(tp_rank, pp_rank, pp_size), STATE_FILENAME)
            os.makedirs(os.path.join(tmp_dir, os.path.dirname(relpath)))
            entries.append({"file": relpath,
                            **_write_state_file(os.path.join(tmp_dir, relpath), state)})
        return _publish(save_dir, tmp_dir, iteration, entries, tp_size, pp_size)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def resolve_checkpoint_dir(path: str) -> str:
    """The iteration directory `path` names: a --save directory (its tracker's
    iteration) or an iter_XXXXXXX directory itself."""
    if os.path.isfile(os.path.join(path, MANIFEST_FILENAME)):
        return path
    iteration = read_tracker(path)
    if iteration is not None:
        directory = os.path.join(path, iteration_dir_name(iteration))
        replaced = directory + REPLACED_SUFFIX
        # A replacement interrupted before the new copy was renamed in: read the old
        # copy where it lies (offline readers do not repair; the next save does).
        if not os.path.exists(directory) and os.path.isfile(
                os.path.join(replaced, MANIFEST_FILENAME)):
            return replaced
    if iteration is None:
        from megatron_sr.checkpointing.megatron_lm import megatron_lm_layout
        if megatron_lm_layout(path):
            raise CheckpointError(megatron_lm_layout(path))
        if os.path.isdir(path) and os.path.basename(os.path.normpath(path)).startswith("iter_"):
            read_manifest(path)  # raises: incomplete checkpoint
        raise CheckpointError(f"{path} holds no checkpoint: neither {TRACKER_FILENAME} nor "
                              f"{MANIFEST_FILENAME} is there")
    return os.path.join(path, iteration_dir_name(iteration))


def read_all_rank_states(path: str) -> tuple[str, dict, dict]:
    """Every rank file of the checkpoint `path` names, verified:
    (iteration directory, manifest, {(tp_rank, pp_rank): state})."""
    directory = resolve_checkpoint_dir(path)
    manifest = read_manifest(directory)
    tp, pp = manifest["tensor_model_parallel_size"], manifest["pipeline_model_parallel_size"]
    states = {(t, p): load_state_file(directory, t, p, tp, pp)
              for t in range(tp) for p in range(pp)}
    return directory, manifest, states


def _write_json(path: str, value: dict) -> None:
    _write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def _write_text(path: str, text: str) -> None:
    partial = path + ".partial"
    with open(partial, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def read_tracker_value(path: str, *, allow_release: bool = False):
    """The content of the tracker file at `path`: an iteration number (ASCII
    digits), or "release" (Megatron-LM's release checkpoint) when
    `allow_release`. CheckpointError naming `path` and what it holds otherwise
    (not UTF-8, another word, a digit other than 0-9 such as a superscript)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_TRACKER_MAX_BYTES + 1)
    except OSError as exc:
        raise CheckpointError(f"{path} could not be read: {exc.strerror or exc}") from None
    if len(raw) > _TRACKER_MAX_BYTES:
        raise CheckpointError(f"{path} holds more than {_TRACKER_MAX_BYTES} bytes: a tracker "
                              f"holds one iteration number")
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not UTF-8 text ({raw[:20]!r}): a tracker holds one "
                              f"iteration number") from None
    if _ITERATION_NUMBER.fullmatch(text):
        return int(text)
    if text == "release":
        if allow_release:
            return text
        raise CheckpointError(f"{path} names 'release', a Megatron-LM release checkpoint: "
                              f"import it with tools/checkpoint_convert.py --from-megatron")
    raise CheckpointError(f"{path}: expected an iteration number (or Megatron-LM's 'release'), "
                          f"found {text[:40]!r}")


def read_tracker(load_dir: str) -> Optional[int]:
    """The iteration named by `load_dir`'s tracker file, or None when there is
    none; CheckpointError when it holds anything but an iteration number."""
    path = os.path.join(load_dir, TRACKER_FILENAME)
    if not os.path.lexists(path):
        return None
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is not a regular file")
    return read_tracker_value(path)


def read_manifest(iteration_dir: str) -> dict:
    """The manifest of a complete checkpoint directory, checked: a JSON object
    with the layout, the format and {relative path: {"size", "sha256"}} of
    exactly the files that format and layout write, each a path inside the
    directory; and no file, link or directory in it that the manifest does not
    list. CheckpointError naming the file and what is wrong otherwise."""
    path = os.path.join(iteration_dir, MANIFEST_FILENAME)
    if not os.path.isdir(iteration_dir):
        raise CheckpointError(f"checkpoint directory {iteration_dir} does not exist")
    if not os.path.lexists(path):
        from megatron_sr.checkpointing.megatron_lm import megatron_lm_layout
        if megatron_lm_layout(iteration_dir):
            raise CheckpointError(megatron_lm_layout(iteration_dir))
        raise CheckpointError(f"{iteration_dir} is not a complete checkpoint: {MANIFEST_FILENAME} "
                              "is missing (the save was interrupted?)")
    if os.path.islink(path) or not os.path.isfile(path):
        raise CheckpointError(f"{path} is not a regular file")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    _check_manifest(path, manifest)
    _check_listing(iteration_dir, manifest["files"])
    return manifest


def _check_manifest(path: str, manifest) -> None:
    def bad(what: str):
        return CheckpointError(f"{path} is not a valid checkpoint manifest: {what}")

    if not isinstance(manifest, dict):
        raise bad(f"it holds a JSON {type(manifest).__name__}, not an object")
    for key, least in (("iteration", 0), ("tensor_model_parallel_size", 1),
                       ("pipeline_model_parallel_size", 1)):
        value = manifest.get(key)
        if type(value) is not int or value < least:
            raise bad(f'"{key}" is {value!r}, not an integer >= {least}')
    checkpoint_format = manifest.setdefault("format", "torch")
    if checkpoint_format not in ("torch", "torch_dist"):
        raise bad(f'"format" is {checkpoint_format!r}, not "torch" or "torch_dist"')
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise bad('"files" is not an object of file entries')
    for relpath, entry in files.items():
        if not _is_inner_path(relpath):
            raise bad(f"the entry {relpath!r} is not a path inside the checkpoint directory "
                      f"(absolute, '..', '.' or empty parts are refused)")
        if not (isinstance(entry, dict) and type(entry.get("size")) is int
                and entry["size"] >= 0 and isinstance(entry.get("sha256"), str)
                and _SHA256.fullmatch(entry["sha256"])):
            raise bad(f'the entry of {relpath} is not {{"size": bytes, "sha256": 64 hex digits}}')
    tp, pp = manifest["tensor_model_parallel_size"], manifest["pipeline_model_parallel_size"]
    if checkpoint_format == "torch":
        expected = {os.path.join(rank_dir_name(t, p, pp), STATE_FILENAME)
                    for t in range(tp) for p in range(pp)}
        unexpected = sorted(set(files) ^ expected)
        if unexpected:
            what = "not one of them" if unexpected[0] in files else "missing"
            raise bad(f"a TP={tp} x PP={pp} checkpoint has one {STATE_FILENAME} per rank; "
                      f"{unexpected[0]} is {what}")
    else:
        from megatron_sr.checkpointing.torch_dist import METADATA_FILENAME, is_data_file_name

        stray = sorted(f for f in files if f != METADATA_FILENAME and not is_data_file_name(f))
        if stray or METADATA_FILENAME not in files:
            raise bad(f"a torch_dist checkpoint holds {METADATA_FILENAME} and __<rank>_0.distcp "
                      f"files; {stray[0] if stray else METADATA_FILENAME} is "
                      f"{'not one of them' if stray else 'missing'}")


def _is_inner_path(relpath) -> bool:
    """Whether `relpath` names a path inside a directory: relative, without
    '..', '.' or empty parts, and not the manifest itself."""
    if not isinstance(relpath, str) or not relpath or relpath.startswith("/") \
            or "\\" in relpath or "\0" in relpath or relpath == MANIFEST_FILENAME:
        return False
    return all(part not in ("", ".", "..") for part in relpath.split("/"))


def _check_listing(iteration_dir: str, files: dict) -> None:
    """CheckpointError naming the first entry of `iteration_dir` (recursively)
    that is a symbolic link, neither a file nor a directory, or a file the
    manifest's `files` does not list."""
    def walk(directory: str, prefix: str) -> None:
        with os.scandir(directory) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                relpath = prefix + entry.name
                if entry.is_symlink():
                    raise CheckpointError(f"{entry.path} is a symbolic link: a checkpoint holds "
                                          f"only its own files (refused)")
                if entry.is_dir(follow_symlinks=False):
                    walk(entry.path, relpath + "/")
                elif not entry.is_file(follow_symlinks=False):
                    raise CheckpointError(f"{entry.path} is not a regular file (refused)")
                elif relpath != MANIFEST_FILENAME and relpath not in files:
                    raise CheckpointError(f"{entry.path} is not listed in the checkpoint's "
                                          f"{MANIFEST_FILENAME}, so it cannot be verified "
                                          f"(refused; remove it if it does not belong there)")

    walk(iteration_dir, "")


def verify_file(path: str, expected: dict) -> None:
    """CheckpointError naming `path` unless its size and sha256 are the
    manifest's `expected` {"size", "sha256"}."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing from the checkpoint") from None
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path} is not a regular file (a link or a device): refused")
    size = info.st_size
    if size != expected["size"]:
        raise CheckpointError(f"{path} is {size} bytes, the manifest says {expected['size']}: "
                              "the file is truncated or was modified")
    if sha256_file(path) != expected["sha256"]:
        raise CheckpointError(f"{path} fails its sha256 checksum: the file is corrupted")


def file_entry(directory: str, relpath: str) -> dict:
    """The manifest entry of a written file: {"file", "size", "sha256"}."""
    path = os.path.join(directory, relpath)
    return {"file": relpath, "size": os.path.getsize(path), "sha256": sha256_file(path)}


def load_state_file(iteration_dir: str, tp_rank: int, pp_rank: int, tp_size: int,
                    pp_size: int, verify: bool = True) -> dict:
    """Reads the state of (tp_rank, pp_rank) from a complete checkpoint directory,
    after checking the layout and (with `verify`) the file's size and sha256."""
    manifest = read_manifest(iteration_dir)
    saved_layout = (manifest["tensor_model_parallel_size"], manifest["pipeline_model_parallel_size"])
    if saved_layout != (tp_size, pp_size):
        raise CheckpointError(
            f"{iteration_dir} was saved with --tensor-model-parallel-size {saved_layout[0]} "
            f"--pipeline-model-parallel-size {saved_layout[1]}; this run uses {tp_size} and "
            f"{pp_size} (reshape it with tools/checkpoint_convert.py)")
    relpath = os.path.join(rank_dir_name(tp_rank, pp_rank, pp_size), STATE_FILENAME)
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


# ----- the training job's checkpoint -------------------------------------------------------

def _plain(value):
    """A dataclass/dict/list tree with torch dtypes turned into strings, so the
    checkpoint loads with `weights_only=True`."""
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def job_description(job) -> dict:
    """The run's configuration as plain data: what tools (text generation,
    conversion) need to rebuild the model and tokenizer from a checkpoint."""
    import dataclasses

    return _plain({"model": dataclasses.asdict(job.model),
                   "parallel": dataclasses.asdict(job.parallel),
                   "optimizer": dataclasses.asdict(job.optimizer),
                   "data": dataclasses.asdict(job.data),
                   "unpadded_vocab_size": job.unpadded_vocab_size})


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.cpu().numpy().tobytes()


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def rng_state() -> dict:
    """This rank's RNG states (python, numpy, torch CPU/CUDA, the TP tracker) as
    plain Python values (bytes for generator states): they travel through
    `all_gather_object` and load with `weights_only=True`."""
    import random

    import numpy as np

    from megatron_sr.random import get_rng_tracker

    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"random": random.getstate(),
             "numpy": [kind, keys.astype(np.uint32).tobytes(), position, has_gauss,
                       cached_gaussian],
             "torch": _tensor_bytes(torch.get_rng_state()),
             "tracker": {name: _tensor_bytes(t) for name, t in
                         get_rng_tracker().get_states().items()}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = _tensor_bytes(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict) -> None:
    """Restores what `rng_state` returned."""
    import random

    import numpy as np

    from megatron_sr.random import get_rng_tracker

    version, internal, gauss_next = state["random"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, np.frombuffer(keys, dtype=np.uint32), position, has_gauss,
                         cached_gaussian))
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_bytes_tensor(state["cuda"]))
    get_rng_tracker().set_states({name: _bytes_tensor(b) for name, b in state["tracker"].items()})


def save_training_checkpoint(job, iteration: int, consumed_samples: int, model, optimizer,
                             scheduler) -> str:
    """Saves model, optimizer, scheduler, progress and RNG states of `iteration`
    under --save. Every rank calls it (the optimizer state and the RNG states
    are gathered over DP; the DP-rank-0 rank of each (TP, PP) position writes, and
    only it receives the other DP ranks' optimizer shards)."""
    from megatron_sr import parallel_state
    from megatron_sr.model import named_parameters_global

    if job.training.ckpt_format == "torch_dist":
        return _save_torch_dist(job, iteration, consumed_samples, model, optimizer, scheduler)
    optimizer.buffer.wait_param_gather()
    optimizer_state = optimizer.state_dict(dst=0)  # gathered to the writer only
    dp_group = parallel_state.get_data_parallel_group()
    rng_states: list = [None] * parallel_state.get_data_parallel_world_size()
    dist.all_gather_object(rng_states, rng_state(), group=dp_group)
    state = None
    if parallel_state.get_data_parallel_rank() == 0:
        state = {"checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
                 "consumed_train_samples": consumed_samples, "args": job_description(job),
                 "model": {name: p.detach().clone().cpu()
                           for name, p in named_parameters_global(model)},
                 "optimizer": optimizer_state, "lr_scheduler": scheduler.state_dict(),
                 "rng_state": rng_states}
    return save_checkpoint(job.training.save, iteration, state,
                           tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                           pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
                           tp_size=parallel_state.get_tensor_model_parallel_world_size(),
                           pp_size=parallel_state.get_pipeline_model_parallel_world_size())


def _save_torch_dist(job, iteration: int, consumed_samples: int, model, optimizer,
                     scheduler) -> Optional[str]:
    """The torch_dist save (see `checkpointing.torch_dist`): waits for an async
    save in flight, prepares the temporary directory on rank 0, then writes."""
    from megatron_sr.checkpointing import torch_dist

    torch_dist.wait_for_pending_save()
    save_dir = job.training.save
    tmp_dir = os.path.join(save_dir, "." + iteration_dir_name(iteration) + ".tmp")

    def prepare() -> None:
        try:
            os.makedirs(save_dir, exist_ok=True)
            _log_recovery(recover_interrupted_publish(save_dir))
            shutil.rmtree(tmp_dir, ignore_errors=True)
            os.makedirs(tmp_dir)
        except OSError as exc:
            raise CheckpointError(f"checkpoint save to {save_dir} failed: rank 0 could not "
                                  f"create {tmp_dir}: {exc}") from exc

    _collective_on_rank0(prepare)
    optimizer.buffer.wait_param_gather()
    common = {"checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
              "consumed_train_samples": consumed_samples, "args": job_description(job),
              "lr_scheduler": scheduler.state_dict(),
              "optimizer": {"strategy": optimizer.strategy.name, "step": optimizer.step_count,
                            "skipped_steps": optimizer.skipped_steps}}
    return torch_dist.save(job, iteration, common, model, optimizer, tmp_dir, rng_state())


def finish_pending_save() -> Optional[str]:
    """Waits for an async save in flight and publishes it (returns its directory,
    None when there was none). Every rank calls it before the job ends."""
    from megatron_sr.checkpointing import torch_dist

    return torch_dist.wait_for_pending_save()


def load_model_state(model, saved: dict, source: str) -> None:
    """Copies `saved` (global name -> tensor) into this rank's parameters. The
    load is strict: CheckpointError naming the parameter when the model has a
    name `saved` lacks, `saved` has one the model lacks (e.g. a layer more), or
    a shape differs. Nothing is copied unless every name and shape match."""
    from megatron_sr.model import named_parameters_global

    params = dict(named_parameters_global(model))
    for name, param in params.items():
        if name not in saved:
            raise CheckpointError(f"{source} has no parameter {name}: the checkpoint was "
                                  f"saved from a different model (e.g. --num-layers, "
                                  f"--swiglu, --disable-bias-linear or tied embeddings)")
        tensor = saved[name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(
                f"{source}: parameter {name} has shape {tuple(tensor.shape)} in the checkpoint "
                f"but {tuple(param.shape)} in this model (check --hidden-size, "
                f"--ffn-hidden-size, --num-attention-heads, the vocabulary and TP size)")
    extra = sorted(set(saved) - set(params))
    if extra:
        raise CheckpointError(extra_parameters_message(source, extra))
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])


def extra_parameters_message(source: str, extra: list[str]) -> str:
    more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
    return (f"{source} holds parameter {extra[0]}{more}, which this model lacks: the checkpoint "
            f"was saved from a different model (e.g. a larger --num-layers, "
            f"--untie-embeddings-and-output-weights or biases); loads are strict")


def check_vocabulary(job, description: dict, source: str) -> None:
    """CheckpointError unless the checkpoint's unpadded vocabulary (its "args")
    is this run's: only the padding rows of the embedding may differ between
    them. Checkpoints that do not record it (imported from Megatron-LM) pass."""
    saved = description.get("unpadded_vocab_size") if isinstance(description, dict) else None
    if saved is not None and saved != job.unpadded_vocab_size:
        raise CheckpointError(
            f"{source} was trained with a vocabulary of {saved} tokens, this run's tokenizer has "
            f"{job.unpadded_vocab_size} (check --tokenizer-type, --vocab-file, --vocab-size): "
            f"the embedding may differ only in its padding rows")


def is_iteration_directory(path: str) -> bool:
    """Whether `path` is itself a (complete or not) iteration directory rather
    than a --save directory: it holds a manifest, or is named iter_XXXXXXX."""
    return os.path.lexists(os.path.join(path, MANIFEST_FILENAME)) or (
        os.path.isdir(path) and re.fullmatch(r"iter_[0-9]+", os.path.basename(
            os.path.normpath(path))) is not None)


def load_training_checkpoint(job, model, optimizer, scheduler) -> tuple[int, int]:
    """Restores the latest checkpoint under --load into model, optimizer,
    scheduler and RNG; returns (iteration, consumed samples), (0, 0) without
    --load or when it holds no checkpoint yet. Honors --no-load-optim,
    --no-load-rng and --finetune (weights only, iteration 0). Every rank calls it."""
    from megatron_sr import parallel_state

    training = job.training
    check_save_directory(training)
    if not training.load:
        return 0, 0
    _collective_on_rank0(lambda: _log_recovery(recover_interrupted_publish(training.load)))
    iteration, directory = _collective_on_rank0(lambda: _load_target(training.load))
    if iteration is None:
        if rank0():
            print(f"[checkpoint] no {TRACKER_FILENAME} in {training.load}: training from scratch",
                  flush=True)
        return 0, 0
    if read_manifest(directory)["format"] == "torch_dist":
        return _load_torch_dist(job, directory, iteration, model, optimizer, scheduler)
    state = load_state_file(directory, parallel_state.get_tensor_model_parallel_rank(),
                            parallel_state.get_pipeline_model_parallel_rank(),
                            parallel_state.get_tensor_model_parallel_world_size(),
                            parallel_state.get_pipeline_model_parallel_world_size())
    check_vocabulary(job, state.get("args"), directory)
    load_model_state(model, state["model"], directory)
    if training.finetune:
        return _start_fine_tuning(optimizer, iteration, directory)
    if training.no_load_optim:
        optimizer.reset_master_from_params()
    else:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["lr_scheduler"])
    states = state.get("rng_state")
    if not training.no_load_rng and states is None and rank0():
        print(f"[checkpoint] {directory} carries no RNG states (it was reshaped by "
              f"tools/checkpoint_convert.py): dropout continues from --seed", flush=True)
    if not training.no_load_rng and states is not None:
        dp_rank = parallel_state.get_data_parallel_rank()
        if dp_rank < len(states):
            set_rng_state(states[dp_rank])
        else:
            seed_new_data_parallel_rank(training.seed, dp_rank, iteration)
    if rank0():
        print(f"[checkpoint] loaded iteration {iteration} from {directory}", flush=True)
    return iteration, int(state["consumed_train_samples"])


def _load_target(load: str) -> tuple[Optional[int], Optional[str]]:
    """(iteration, iteration directory) that --load names: its tracker's
    iteration, or, when --load is an iteration directory itself, that
    iteration (as the offline tools read it); (None, None) for a directory
    without checkpoints. CheckpointError on anything else."""
    if not os.path.isdir(load):
        raise CheckpointError(f"--load {load}: no such directory")
    iteration = read_tracker(load)
    if iteration is not None:
        return iteration, os.path.join(load, iteration_dir_name(iteration))
    if not is_iteration_directory(load):
        from megatron_sr.checkpointing.megatron_lm import megatron_lm_layout
        if megatron_lm_layout(load):  # e.g. Megatron-LM's release/ directory itself
            raise CheckpointError(megatron_lm_layout(load))
        return None, None
    iteration = read_manifest(load)["iteration"]
    name = os.path.basename(os.path.normpath(load))
    if name != iteration_dir_name(iteration):
        raise CheckpointError(f"--load {load}: its {MANIFEST_FILENAME} is of iteration "
                              f"{iteration}, not of the iteration its name says")
    print(f"[checkpoint] --load {load} is an iteration directory: loading iteration "
          f"{iteration} (not the latest one its parent's tracker names)", flush=True)
    return iteration, load


def _load_torch_dist(job, directory: str, iteration: int, model, optimizer,
                     scheduler) -> tuple[int, int]:
    from megatron_sr import parallel_state
    from megatron_sr.checkpointing import torch_dist

    training = job.training
    load_optim = not (training.finetune or training.no_load_optim)
    common = torch_dist.load(job, directory, read_manifest(directory), model, optimizer,
                             load_optim=load_optim,
                             load_rng=not (training.finetune or training.no_load_rng))
    if training.finetune:
        return _start_fine_tuning(optimizer, iteration, directory)
    if load_optim:
        scheduler.load_state_dict(common["lr_scheduler"])
    else:
        optimizer.reset_master_from_params()
    if not training.no_load_rng and not common["rng_loaded"]:
        seed_new_data_parallel_rank(training.seed, parallel_state.get_data_parallel_rank(),
                                    iteration)
    if rank0():
        print(f"[checkpoint] loaded iteration {iteration} from {directory}", flush=True)
    return iteration, int(common["consumed_train_samples"])


def _start_fine_tuning(optimizer, iteration: int, directory: str) -> tuple[int, int]:
    """--finetune after the weights are loaded: the optimizer's master state restarts
    from them and training counts from iteration 0 (the caller skips the rest)."""
    optimizer.reset_master_from_params()
    if rank0():
        print(f"[checkpoint] --finetune: loaded weights of iteration {iteration} from "
              f"{directory}; optimizer, scheduler and iteration start fresh", flush=True)
    return 0, 0


def seed_new_data_parallel_rank(seed: int, dp_rank: int, iteration: int) -> None:
    """Seeds the RNG streams of a data-parallel rank the checkpoint has no state
    for (resuming at a larger DP size) from (seed, DP rank, iteration): its
    dropout masks are its own, not a copy of DP rank 0's stream. The TP and PP
    offsets of `model_parallel_seed` still apply, so the streams shared by the
    TP ranks of one position stay shared."""
    from megatron_sr.random import model_parallel_seed

    digest = hashlib.sha256(f"resume|{seed}|{dp_rank}|{iteration}".encode()).digest()
    model_parallel_seed(int.from_bytes(digest[:4], "little") % (2 ** 31 - 10 ** 6))


def check_save_directory(training) -> None:
    """Refuses (CheckpointError on every rank) a --save directory that cannot
    hold this run's checkpoints: one that lies inside a published checkpoint,
    one below a file or not writable, and one that holds checkpoints of
    another run (not --load, nor --load's parent when --load is one of its
    iteration directories) unless --override-existing-checkpoints is given.
    Rank 0 looks; every rank calls it."""
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

    error = _collective_on_rank0(look)
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


def _collective_on_rank0(function):
    """Runs `function` on rank 0 and hands its result (or its CheckpointError)
    to every rank: one broadcast over the world."""
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


def _log_recovery(actions: list[str]) -> None:
    for action in actions:
        print(f"[checkpoint] {action}", flush=True)


def rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
