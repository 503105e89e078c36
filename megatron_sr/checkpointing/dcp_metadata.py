"""Reading DCP's `.metadata` without running what a crafted file asks for.

torch.distributed.checkpoint stores a checkpoint's metadata (every tensor's
global shape, its chunks, and where each chunk lies) as a pickle, and its
`FileSystemReader.read_metadata` unpickles it with plain `pickle.load`: a
file whose pickle names `os.system` runs a command (torch 2.13 offers no
restricted mode for it). `MetadataUnpickler` resolves only the classes that
metadata is made of (`ALLOWED_GLOBALS`: the dataclasses of
`torch.distributed.checkpoint.metadata`, `_StorageInfo`, `torch.Size`,
dtypes, layouts, memory formats, `pathlib` paths) and refuses any other name
before anything of the payload runs. Calling an allowed class builds a
plain value; none of them reaches the file system, a process or an import.

`CheckpointReader` is the `FileSystemReader` every load of a torch_dist
checkpoint uses (`torch_dist.load`, `read_full`): its metadata comes from
the restricted unpickler, is checked for shape (a `Metadata` whose storage
entries are `_StorageInfo`s), and every data file it names must be one of
the checkpoint's manifest entries (a plain name in the directory, verified
before): a `..`, an absolute path or an unlisted file is refused by name.
"""
from __future__ import annotations

import pathlib
import pickle

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo

from megatron_sr.checkpointing.manifest import CheckpointError

_METADATA_CLASSES = ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                     "ChunkStorageMetadata", "TensorProperties", "MetadataIndex", "StorageMeta",
                     "_MEM_FORMAT_ENCODING")


def _allowed_globals() -> dict[tuple[str, str], object]:
    allowed: dict[tuple[str, str], object] = {
        (dcp_metadata.__name__, name): getattr(dcp_metadata, name)
        for name in _METADATA_CLASSES if hasattr(dcp_metadata, name)}
    allowed[(_StorageInfo.__module__, "_StorageInfo")] = _StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    allowed[("pathlib", "PosixPath")] = pathlib.PosixPath
    allowed[("pathlib", "PurePosixPath")] = pathlib.PurePosixPath
    try:  # what metadata written by older torch (before DCP had its own) refers to
        from torch.distributed._shard.sharded_tensor import metadata as sharded_metadata
    except ImportError:
        sharded_metadata = None
    for name in ("TensorProperties", "MEM_FORMAT_ENCODING"):
        if sharded_metadata is not None and hasattr(sharded_metadata, name):
            allowed[(sharded_metadata.__name__, name)] = getattr(sharded_metadata, name)
    for name, value in vars(torch).items():
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = value
    return allowed


ALLOWED_GLOBALS = _allowed_globals()


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside `ALLOWED_GLOBALS`."""

    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.qualified_name = f"{module}.{name}"


class MetadataUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only `ALLOWED_GLOBALS` (RefusedGlobal
    otherwise) and has no persistent ids (pickle refuses those itself)."""

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedGlobal(module, name) from None


def read_metadata_file(path: str, data_files: frozenset[str]) -> dcp_metadata.Metadata:
    """The DCP `Metadata` in the file at `path`, unpickled by
    `MetadataUnpickler` and checked: its storage entries name only files of
    `data_files` (plain names in the checkpoint directory). CheckpointError
    naming `path` (and the class or file at fault) otherwise. Runs in the
    calling process only; no collective."""
    try:
        with open(path, "rb") as f:
            metadata = MetadataUnpickler(f).load()
    except RefusedGlobal as exc:
        raise CheckpointError(f"{path} names {exc.qualified_name}, which is not part of DCP "
                              f"metadata: refused without running it (a crafted or foreign "
                              f"file)") from None
    except OSError as exc:
        raise CheckpointError(f"{path} could not be read: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - any malformed pickle (truncated, wrong opcodes)
        raise CheckpointError(f"{path} is not a readable DCP metadata file "
                              f"({type(exc).__name__}: {str(exc)[:120]}): truncated or "
                              f"corrupted") from None
    _check_metadata(path, metadata, data_files)
    return metadata


def _check_metadata(path: str, metadata, data_files: frozenset[str]) -> None:
    def bad(what: str):
        return CheckpointError(f"{path} is not valid DCP metadata: {what}")

    if not isinstance(metadata, dcp_metadata.Metadata):
        raise bad(f"it holds a {type(metadata).__name__}, not a Metadata")
    entries = metadata.state_dict_metadata
    if not isinstance(entries, dict) or not all(
            isinstance(key, str) and isinstance(value, (dcp_metadata.TensorStorageMetadata,
                                                        dcp_metadata.BytesStorageMetadata))
            for key, value in entries.items()):
        raise bad("its state_dict_metadata is not a map of names to storage metadata")
    for key, value in entries.items():
        if isinstance(value, dcp_metadata.TensorStorageMetadata) and not (
                isinstance(value.size, torch.Size)
                and isinstance(getattr(value.properties, "dtype", None), torch.dtype)):
            raise bad(f"the entry of {key} has no tensor size or dtype")
    storage = metadata.storage_data
    if not isinstance(storage, dict):
        raise bad("its storage_data is not a map")
    for index, info in storage.items():
        if not (isinstance(index, dcp_metadata.MetadataIndex) and isinstance(info, _StorageInfo)
                and isinstance(info.relative_path, str) and isinstance(info.offset, int)
                and isinstance(info.length, int) and info.offset >= 0 and info.length >= 0):
            raise bad("a storage entry is not a (MetadataIndex, _StorageInfo) pair of a file "
                      "name, offset and length")
        if info.relative_path not in data_files:
            raise CheckpointError(f"{path} stores {index.fqn} in {info.relative_path!r}, which "
                                  f"is not a file of this checkpoint's manifest: refused (a "
                                  f"crafted path?)")


class CheckpointReader(FileSystemReader):
    """A `FileSystemReader` of one checkpoint directory whose metadata comes
    from `read_metadata_file` (read once, then reused by `dcp.load`).
    `data_files`: the manifest's file names, verified by the caller; storage
    entries naming anything else are refused."""

    def __init__(self, directory: str, metadata_path: str, data_files: frozenset[str]):
        super().__init__(directory)
        self._metadata_path = metadata_path
        self._data_files = data_files
        self._metadata = None

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointError(f"{self._metadata_path}: a per-rank DCP metadata file was "
                                  f"asked for; megatron_sr checkpoints have one metadata file")
        if self._metadata is None:
            metadata = read_metadata_file(self._metadata_path, self._data_files)
            if hasattr(dcp_metadata, "StorageMeta") and hasattr(self, "load_id"):
                # What FileSystemReader.read_metadata adds (torch >= 2.4).
                if getattr(metadata, "storage_meta", None) is None:
                    metadata.storage_meta = dcp_metadata.StorageMeta()
                metadata.storage_meta.load_id = self.load_id
            self._metadata = metadata
        return self._metadata
