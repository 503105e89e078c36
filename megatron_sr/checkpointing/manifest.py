"""What a published checkpoint is, and how a reader checks one it did not write.

Under a --save directory (both formats):

    latest_checkpointed_iteration.txt        the tracker: the iteration number, written last
    iter_0000100/                            one published checkpoint
        checksums.json                       the manifest: format, layout, size + sha256 per file
        ...                                  the files the format writes (below)

The files each format lists, and nothing else:

    torch        mp_rank_TT/model_optim_rng.pt, or mp_rank_TT_PPP/... with PP > 1
                 (one per TP rank and PP stage, `rank_dir_name`)
    torch_dist   .metadata and __<rank>_0.distcp files (DCP's)

Readers treat the directory as untrusted: the tracker must hold ASCII digits;
the manifest must be well formed and list exactly the files its format and
layout write, each a path inside the directory; the directory must hold
nothing else (no unlisted file, no symbolic link); each file's size and
sha256 must match. Anything else is a `CheckpointError` naming the file and
what is wrong. Everything here runs in the calling process, no collective.
"""
from __future__ import annotations

import json
import os
import re
import stat
from typing import Optional

from megatron_sr.files import sha256_file

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
MANIFEST_FILENAME = "checksums.json"
STATE_FILENAME = "model_optim_rng.pt"  # the torch format's per-rank file
METADATA_FILENAME = ".metadata"  # torch_dist: DCP's metadata
CHECKPOINT_VERSION = 1
FORMATS = ("torch", "torch_dist")
REPLACED_SUFFIX = ".replaced"  # an iteration directory moved aside while it is re-saved
_TRACKER_MAX_BYTES = 64
_ITERATION_NUMBER = re.compile(r"[0-9]{1,12}")  # ASCII only: str.isdigit() accepts superscripts
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DATA_FILE = re.compile(r"__[0-9]+_[0-9]+\.distcp")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file."""


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def rank_dir_name(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    """Megatron's per-rank directory: mp_rank_TT, or mp_rank_TT_PPP with PP > 1."""
    return f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def is_data_file_name(name: str) -> bool:
    """Whether `name` is one of the data files DCP writes (`__<rank>_<n>.distcp`)."""
    return _DATA_FILE.fullmatch(name) is not None


def is_iteration_directory(path: str) -> bool:
    """Whether `path` is itself a (complete or not) iteration directory rather
    than a --save directory: it holds a manifest, or is named iter_XXXXXXX."""
    return os.path.lexists(os.path.join(path, MANIFEST_FILENAME)) or (
        os.path.isdir(path) and re.fullmatch(r"iter_[0-9]+", os.path.basename(
            os.path.normpath(path))) is not None)


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
        refuse_megatron_lm_layout(path)
        if os.path.isdir(path) and os.path.basename(os.path.normpath(path)).startswith("iter_"):
            read_manifest(path)  # raises: incomplete checkpoint
        raise CheckpointError(f"{path} holds no checkpoint: neither {TRACKER_FILENAME} nor "
                              f"{MANIFEST_FILENAME} is there")
    return os.path.join(path, iteration_dir_name(iteration))


def refuse_megatron_lm_layout(directory: str) -> None:
    """CheckpointError naming the conversion command when `directory` (a save or an
    iteration directory) is Megatron-LM's own checkpoint rather than ours: such a
    directory lacks our tracker or manifest by design, it was not interrupted."""
    from megatron_sr.checkpointing.megatron_lm import megatron_lm_layout  # model imports: error path only
    message = megatron_lm_layout(directory)
    if message:
        raise CheckpointError(message)


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
        refuse_megatron_lm_layout(iteration_dir)
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
    if checkpoint_format not in FORMATS:
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
