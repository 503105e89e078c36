"""Megatron-LM's MMapIndexedDataset: a ``.bin`` of tokens and an ``.idx`` that indexes it.

Byte-compatible with Megatron-LM in both directions. A dataset at ``prefix``
is two files:

``prefix.bin``  the token ids of every sequence, concatenated, in one dtype,
                no header.
``prefix.idx``  little-endian, in this order:

                ======  =====================  =====================================
                bytes   type                   content
                ======  =====================  =====================================
                9       char[9]                magic ``b"MMIDIDX\\x00\\x00"``
                8       uint64                 version, 1
                1       uint8                  dtype code (`DTYPE_CODES`)
                8       uint64                 S, the number of sequences
                8       uint64                 D, the number of document indices
                4 S     int32[S]               sequence lengths, in tokens
                8 S     int64[S]               sequence pointers, byte offsets in .bin
                8 D     int64[D]               document indices: 0, then the number
                                               of sequences at the end of each document
                ======  =====================  =====================================

Our preprocessing writes one sequence per document (D = S + 1); the GPT
dataset treats sequences as its documents, as Megatron's does.

`IndexedDataset` memory-maps both files after checking the header, that the
``.idx`` has exactly the size its counts imply, that the pointers are the
running sum of the lengths, and that the ``.bin`` holds exactly the bytes the
index promises; any failure is an `IndexedDatasetError` naming the file.
`IndexedDatasetBuilder` writes under temporary names and renames into place
only in `finalize`, so an interrupted writer leaves no valid-looking pair.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from typing import Iterable, Optional, Sequence

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# Megatron's dtype codes; the code is the byte stored in the header.
DTYPE_CODES = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
    6: np.float64, 7: np.float32, 8: np.uint16,
}
_CODE_OF_DTYPE = {np.dtype(t): code for code, t in DTYPE_CODES.items()}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, document indices


class IndexedDatasetError(ValueError):
    """A ``.bin``/``.idx`` pair that does not follow the format; the message names the file."""


def optimal_token_dtype(vocab_size: int) -> type:
    """Megatron's choice: uint16 when the vocabulary has fewer than 65500 ids, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def exists(prefix: str) -> bool:
    return os.path.isfile(bin_path(prefix)) and os.path.isfile(idx_path(prefix))


class IndexedDataset:
    """Read-only, memory-mapped view of ``prefix.bin``/``prefix.idx``.

    ``len(ds)`` is the number of sequences; ``ds[i]`` is sequence i as a numpy
    array of the file's dtype (a view into the mapping: copy before writing);
    ``ds.get(i, offset, length)`` reads part of it.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        index_file, data_file = idx_path(prefix), bin_path(prefix)
        for path in (index_file, data_file):
            if not os.path.isfile(path):
                raise IndexedDatasetError(f"{path}: no such file (dataset prefix {prefix!r})")
        self.dtype, self.sequence_lengths, self.sequence_pointers, self.document_indices = (
            _read_index(index_file))
        itemsize = np.dtype(self.dtype).itemsize
        expected_bin_bytes = int(self.sequence_lengths.sum(dtype=np.int64)) * itemsize
        actual_bin_bytes = os.path.getsize(data_file)
        if actual_bin_bytes != expected_bin_bytes:
            raise IndexedDatasetError(
                f"{data_file}: has {actual_bin_bytes} bytes but {index_file} describes "
                f"{expected_bin_bytes} ({len(self.sequence_lengths)} sequences of "
                f"{np.dtype(self.dtype).name}); the file is truncated or belongs to another index")
        if expected_bin_bytes:
            self._tokens = np.memmap(data_file, dtype=self.dtype, mode="r")
        else:
            self._tokens = np.empty(0, dtype=self.dtype)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, idx: int) -> np.ndarray:
        return self.get(idx)

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``offset .. offset+length-1`` of sequence `idx` (to its end if length is None)."""
        if not -len(self) <= idx < len(self):
            raise IndexError(f"{self.prefix}: sequence {idx} out of range [0, {len(self)})")
        sequence_length = int(self.sequence_lengths[idx])
        if length is None:
            length = sequence_length - offset
        if offset < 0 or length < 0 or offset + length > sequence_length:
            raise IndexError(f"{self.prefix}: tokens [{offset}, {offset + length}) are outside "
                             f"sequence {idx} of length {sequence_length}")
        start = int(self.sequence_pointers[idx]) // np.dtype(self.dtype).itemsize + offset
        return self._tokens[start:start + length]

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def token_id_range(self, chunk_tokens: int = 1 << 26, cache_path: Optional[str] = None
                       ) -> Optional[tuple[int, int]]:
        """(smallest, largest) token id in the ``.bin`` (None when it is empty):
        one pass over the memory map, `chunk_tokens` at a time. With
        `cache_path` (``--data-cache-path``) the result is kept there in a small
        JSON keyed by the ``.bin``'s path, size and modification time, so later
        runs skip the pass (minutes on a terabyte corpus)."""
        record = None
        if cache_path:
            stat = os.stat(bin_path(self.prefix))
            key = f"{os.path.abspath(bin_path(self.prefix))}|{stat.st_size}|{stat.st_mtime_ns}"
            digest = hashlib.sha256(key.encode()).hexdigest()[:32]
            record = os.path.join(cache_path, f"{digest}-token-id-range.json")
            if os.path.isfile(record):
                return _read_token_id_range(record)
        id_range = None
        if self.num_tokens:
            low, high = None, None
            for start in range(0, len(self._tokens), chunk_tokens):
                chunk = self._tokens[start:start + chunk_tokens]
                chunk_low, chunk_high = chunk.min(), chunk.max()
                low = chunk_low if low is None else min(low, chunk_low)
                high = chunk_high if high is None else max(high, chunk_high)
            id_range = (int(low), int(high))
        if record is not None:
            os.makedirs(cache_path, exist_ok=True)
            fd, partial = tempfile.mkstemp(dir=cache_path, suffix=".partial")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"bin": bin_path(self.prefix), "token_id_range": id_range}, f)
            os.replace(partial, record)
        return id_range

    def check_fits_vocabulary(self, vocab_size: int, cache_path: Optional[str] = None) -> None:
        """IndexedDatasetError unless every token id is an integer in [0, vocab_size):
        a dataset tokenized with another (larger) vocabulary than the run's.
        `cache_path`: see `token_id_range`."""
        if not np.issubdtype(np.dtype(self.dtype), np.integer):
            raise IndexedDatasetError(f"{idx_path(self.prefix)}: token dtype "
                                      f"{np.dtype(self.dtype).name} is not an integer type")
        id_range = self.token_id_range(cache_path=cache_path)
        if id_range is not None and (id_range[0] < 0 or id_range[1] >= vocab_size):
            raise IndexedDatasetError(
                f"{bin_path(self.prefix)}: token ids span [{id_range[0]}, {id_range[1]}] but the "
                f"tokenizer has {vocab_size} ids [0, {vocab_size - 1}]: the dataset was made with "
                f"another tokenizer (check --tokenizer-type, --vocab-file, --tokenizer-model, "
                f"--vocab-size)")


def _read_index(index_file: str):
    """(dtype, lengths int32[S], pointers int64[S], document indices int64[D]), validated."""
    file_bytes = os.path.getsize(index_file)
    if file_bytes < _HEADER.size:
        raise IndexedDatasetError(f"{index_file}: {file_bytes} bytes is shorter than the "
                                  f"{_HEADER.size}-byte header")
    with open(index_file, "rb") as f:
        magic, version, dtype_code, num_sequences, num_document_indices = _HEADER.unpack(
            f.read(_HEADER.size))
    if magic != MAGIC:
        raise IndexedDatasetError(f"{index_file}: wrong magic {magic!r} (expected {MAGIC!r}); "
                                  f"not a Megatron MMapIndexedDataset index")
    if version != VERSION:
        raise IndexedDatasetError(f"{index_file}: unsupported version {version} "
                                  f"(this reader knows version {VERSION})")
    if dtype_code not in DTYPE_CODES:
        raise IndexedDatasetError(f"{index_file}: unknown dtype code {dtype_code} "
                                  f"(known: {sorted(DTYPE_CODES)})")
    expected_bytes = _HEADER.size + 12 * num_sequences + 8 * num_document_indices
    if file_bytes != expected_bytes:
        raise IndexedDatasetError(
            f"{index_file}: has {file_bytes} bytes but its header ({num_sequences} sequences, "
            f"{num_document_indices} document indices) implies {expected_bytes}; truncated or "
            f"corrupt")
    index = np.memmap(index_file, dtype=np.uint8, mode="r") if file_bytes > _HEADER.size else None
    offset = _HEADER.size

    def take(dtype, count):
        nonlocal offset
        if count == 0:
            return np.empty(0, dtype=dtype)
        array = np.frombuffer(index, dtype=dtype, count=count, offset=offset)
        offset += count * np.dtype(dtype).itemsize
        return array

    lengths = take(np.int32, num_sequences)
    pointers = take(np.int64, num_sequences)
    document_indices = take(np.int64, num_document_indices)
    dtype = DTYPE_CODES[dtype_code]
    if num_sequences:
        if lengths.min() < 0:
            raise IndexedDatasetError(f"{index_file}: negative sequence length")
        expected_pointers = np.zeros(num_sequences, dtype=np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=expected_pointers[1:])
        expected_pointers *= np.dtype(dtype).itemsize
        if not np.array_equal(pointers, expected_pointers):
            first_bad = int(np.flatnonzero(pointers != expected_pointers)[0])
            raise IndexedDatasetError(
                f"{index_file}: sequence pointer {first_bad} is {int(pointers[first_bad])}, "
                f"expected {int(expected_pointers[first_bad])} (the running byte sum of lengths)")
    if num_document_indices == 0 or document_indices[0] != 0 \
            or document_indices[-1] != num_sequences or np.any(np.diff(document_indices) < 0):
        raise IndexedDatasetError(
            f"{index_file}: document indices must rise from 0 to the number of sequences "
            f"({num_sequences})")
    return dtype, lengths, pointers, document_indices


def _read_token_id_range(record: str) -> Optional[tuple[int, int]]:
    """The (smallest, largest) id kept in the --data-cache-path file `record`."""
    try:
        with open(record, encoding="utf-8") as f:
            cached = json.load(f)["token_id_range"]
        if cached is None:
            return None
        low, high = cached
        if type(low) is int and type(high) is int and low <= high:
            return low, high
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        pass
    raise IndexedDatasetError(f"--data-cache-path: {record} is not a token-id-range record "
                              f"written by megatron_sr; delete it to rebuild it")


class IndexedDatasetBuilder:
    """Writes ``prefix.bin``/``prefix.idx`` with tokens of `dtype`.

    Add sequences with `add_item` and close each document with `end_document`
    (or use `add_document`), append whole datasets with `add_index`, then call
    `finalize`. Until then the data lives under temporary names; `abort` (or
    leaving a ``with`` block by an exception) deletes them.
    """

    def __init__(self, prefix: str, dtype: type = np.int32):
        if np.dtype(dtype) not in _CODE_OF_DTYPE:
            raise ValueError(f"{prefix}: dtype {np.dtype(dtype).name} has no Megatron dtype code")
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self._temporary_suffix = f".tmp-{os.getpid()}-{id(self):x}"
        directory = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(directory, exist_ok=True)
        self._data_file = open(bin_path(prefix) + self._temporary_suffix, "wb")
        self._sequence_lengths: list[int] = []
        self._document_indices: list[int] = [0]
        self._finished = False

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        elif not self._finished:
            self.finalize()

    def add_item(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Appends one sequence."""
        array = np.asarray(tokens)
        if array.ndim != 1:
            raise ValueError(f"{self.prefix}: a sequence must be 1-D, got shape {array.shape}")
        if array.size and array.dtype != self.dtype:
            limits = np.iinfo(self.dtype) if np.issubdtype(self.dtype, np.integer) else None
            if limits is not None and np.issubdtype(array.dtype, np.integer) and (
                    array.min() < limits.min or array.max() > limits.max):
                raise ValueError(f"{self.prefix}: token ids [{array.min()}, {array.max()}] do not "
                                 f"fit in {self.dtype.name}")
            array = array.astype(self.dtype)
        self._data_file.write(array.tobytes(order="C"))
        self._sequence_lengths.append(int(array.size))

    def end_document(self) -> None:
        self._document_indices.append(len(self._sequence_lengths))

    def add_document(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Appends one sequence and closes it as a document."""
        self.add_item(tokens)
        self.end_document()

    def add_index(self, prefix: str) -> None:
        """Appends every sequence and document of the dataset at `prefix`."""
        other = IndexedDataset(prefix)
        if np.dtype(other.dtype) != self.dtype:
            raise ValueError(f"{idx_path(prefix)}: dtype {np.dtype(other.dtype).name} differs "
                             f"from the output's {self.dtype.name}")
        sequences_before = len(self._sequence_lengths)
        self._sequence_lengths.extend(other.sequence_lengths.tolist())
        self._document_indices.extend((other.document_indices[1:] + sequences_before).tolist())
        with open(bin_path(prefix), "rb") as source:
            shutil.copyfileobj(source, self._data_file, length=16 << 20)

    def finalize(self) -> None:
        """Writes the index and moves both files to their final names."""
        if self._finished:
            raise RuntimeError(f"{self.prefix}: builder already finalized or aborted")
        if self._document_indices[-1] != len(self._sequence_lengths):
            self.end_document()
        self._data_file.flush()
        os.fsync(self._data_file.fileno())
        self._data_file.close()
        lengths = np.asarray(self._sequence_lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        document_indices = np.asarray(self._document_indices, dtype=np.int64)
        temporary_index = idx_path(self.prefix) + self._temporary_suffix
        with open(temporary_index, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, _CODE_OF_DTYPE[self.dtype], len(lengths),
                                 len(document_indices)))
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(document_indices.tobytes())
            f.flush()
            os.fsync(f.fileno())
        # An old .idx next to a new .bin would look like a pair: remove it first,
        # and move the .idx in last.
        if os.path.exists(idx_path(self.prefix)):
            os.remove(idx_path(self.prefix))
        os.replace(bin_path(self.prefix) + self._temporary_suffix, bin_path(self.prefix))
        os.replace(temporary_index, idx_path(self.prefix))
        self._finished = True

    def abort(self) -> None:
        """Deletes the temporary files; the final names are left untouched."""
        if self._finished:
            return
        self._data_file.close()
        for path in (bin_path(self.prefix) + self._temporary_suffix,
                     idx_path(self.prefix) + self._temporary_suffix):
            if os.path.exists(path):
                os.remove(path)
        self._finished = True


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temporaries(prefix: str) -> list[str]:
    """Deletes ``prefix.bin.tmp-PID-*`` and ``prefix.idx.tmp-PID-*`` left by an
    `IndexedDatasetBuilder` whose process PID no longer runs (a SIGKILLed run);
    a live process's files and every final name are left alone. Returns the
    deleted paths."""
    directory = os.path.dirname(os.path.abspath(prefix))
    if not os.path.isdir(directory):
        return []
    removed = []
    for name in sorted(os.listdir(directory)):
        for final in (bin_path(os.path.basename(prefix)), idx_path(os.path.basename(prefix))):
            pid, _, rest = name[len(final) + len(".tmp-"):].partition("-")
            if (name.startswith(final + ".tmp-") and pid.isdecimal() and rest
                    and not _process_exists(int(pid))):
                path = os.path.join(directory, name)
                os.remove(path)
                removed.append(path)
    return removed


def write_dataset(prefix: str, documents: Iterable[Sequence[int]], dtype: type = np.int32) -> None:
    """Writes each document as one sequence; a convenience for tests and tools."""
    with IndexedDatasetBuilder(prefix, dtype) as builder:
        for document in documents:
            builder.add_document(document)
