"""JSONL -> Megatron ``.bin``/``.idx``: the engine behind `tools/preprocess_data.py`.

Contract of `preprocess`:

- Inputs are read in the given order, each file line by line (``.gz`` files
  decompressed on the fly). Each non-blank line must be a UTF-8 JSON object
  whose every ``json_keys`` value is a string. A line that is not is *invalid*:
  an `InvalidInputError` naming ``file:line`` and the fault, or, with
  ``skip_invalid``, counted and left out. Blank lines are ignored.
- Per key, each document's tokens (plus eod with ``append_eod``) become one
  sequence and one document of ``{output_prefix}_{key}_document``; a document
  with no tokens is skipped and counted. A key left with no document at all
  (an empty or all-blank input) is an error: nothing is written. A text the
  tokenizer refuses (a NullTokenizer word that is no id) makes the line invalid.
- Keys must be distinct; a ``.gz`` input that is not gzip or is cut short is an
  `InvalidInputError` naming the file; an output prefix that cannot be written
  (its folder is a file, or read-only) a ValueError naming ``--output-prefix``.
- Tokenization runs in ``workers`` processes started with the 'spawn' method
  (no fork of a process that may hold torch threads). Lines travel in batches
  and results are written back in input order, so the output is byte-identical
  for any number of workers.
- Outputs are written under temporary names and renamed into place only after
  every input was read without error: a failed or killed run leaves no
  ``.bin``/``.idx`` that looks valid. A SIGKILLed run leaves its ``*.tmp-PID-*``
  files; the next run of the same output prefix removes those whose process is
  gone (`indexed_dataset.remove_stale_temporaries`).
"""
from __future__ import annotations

import contextlib
import errno
import gzip
import json
import multiprocessing
import multiprocessing.connection
import os
import sys
import signal
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import IO, Iterator, Optional, Sequence

import numpy as np

from megatron_sr.data.indexed_dataset import (IndexedDatasetBuilder, optimal_token_dtype,
                                              remove_stale_temporaries)
from megatron_sr.data.tokenizers import Tokenizer, build_tokenizer

BATCH_BYTES = 256 * 1024  # lines sent to a worker at once; small enough to balance 2+ workers


class InvalidInputError(ValueError):
    """A malformed input line; the message starts with ``file:line:``."""


@dataclass(frozen=True)
class TokenizerSpec:
    """What a worker needs to build its own tokenizer (the arguments of `build_tokenizer`)."""

    tokenizer_type: str
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    tokenizer_model: Optional[str] = None
    vocab_size: Optional[int] = None
    tiktoken_pattern: str = "v2"
    tiktoken_num_special_tokens: int = 1000
    gpt2_backend: str = "auto"  # GPT2BPETokenizer: auto, tiktoken, tokenizers or regex

    def build(self) -> Tokenizer:
        return build_tokenizer(self.tokenizer_type, self.vocab_file, self.merge_file,
                               self.tokenizer_model, self.vocab_size, self.tiktoken_pattern,
                               self.tiktoken_num_special_tokens, self.gpt2_backend)


@dataclass
class PreprocessStats:
    documents: dict[str, int] = field(default_factory=dict)  # written, per key
    tokens: dict[str, int] = field(default_factory=dict)  # written, per key
    empty_documents: dict[str, int] = field(default_factory=dict)  # skipped, per key
    invalid_lines: int = 0
    input_bytes: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class _Batch:
    path: str
    first_line_number: int
    lines: list[bytes]
    token_dtype: str  # numpy dtype string of the output


def output_prefix_for_key(output_prefix: str, key: str) -> str:
    return f"{output_prefix}_{key}_document"


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Each ``--input`` is a file or a glob (matches sorted by name); duplicates kept once."""
    import glob

    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            what = ("the pattern matches no file" if glob.has_magic(pattern) else
                    "is a directory, not a file" if os.path.isdir(pattern) else "no such file")
            raise FileNotFoundError(f"--input {pattern}: {what}")
        files.extend(m for m in matches if m not in files)
    return files


def _open_binary(path: str) -> IO[bytes]:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _read_batches(paths: Sequence[str], token_dtype: str) -> Iterator[_Batch]:
    for path in paths:
        try:
            yield from _read_file_batches(path, token_dtype)
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            what = "a .gz input that is cut short or corrupt" if path.endswith(".gz") else \
                "cannot be read"
            raise InvalidInputError(f"{path}: {what} ({getattr(e, 'strerror', None) or e})"
                                    ) from None


def _read_file_batches(path: str, token_dtype: str) -> Iterator[_Batch]:
    with _open_binary(path) as f:
        lines: list[bytes] = []
        batch_bytes = 0
        first_line_number = 1
        for line_number, line in enumerate(f, start=1):
            lines.append(line)
            batch_bytes += len(line)
            if batch_bytes >= BATCH_BYTES:
                yield _Batch(path, first_line_number, lines, token_dtype)
                lines, batch_bytes, first_line_number = [], 0, line_number + 1
        if lines:
            yield _Batch(path, first_line_number, lines, token_dtype)


# Per-process state of a tokenization worker, set once by `_start_worker`.
_worker_tokenizer: Optional[Tokenizer] = None
_worker_settings: tuple = ()


def _start_worker(tokenizer_spec: TokenizerSpec, json_keys: tuple[str, ...], append_eod: bool,
                  tokenizer: Optional[Tokenizer] = None) -> None:
    """Sets this process up to run `_encode_batch`; builds the tokenizer unless given."""
    global _worker_tokenizer, _worker_settings
    _worker_tokenizer = tokenizer if tokenizer is not None else tokenizer_spec.build()
    _worker_settings = (json_keys, append_eod)


def _worker_main(connection, worker_args: tuple) -> None:
    """A tokenization process: encodes the batches it receives until None.
    SIGINT and SIGTERM are the parent's to handle (it kills its workers after
    removing its temporary files); a worker whose parent died exits at once,
    also when it finds the pipe closed before its watcher thread fires."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    threading.Thread(target=_exit_with, args=(parent.sentinel,), daemon=True).start()
    _start_worker(*worker_args)
    while True:
        try:
            batch = connection.recv()
            if batch is None:
                return
            connection.send(_encode_batch(batch))
        except (EOFError, BrokenPipeError, ConnectionResetError):
            return  # the parent closed its end or died: nothing is left to send to


def _exit_with(parent_sentinel: int) -> None:
    multiprocessing.connection.wait([parent_sentinel])
    os._exit(1)


class _Workers:
    """`count` spawned tokenization processes, one pipe each. Batch k goes to
    worker k % count and results are read back in batch order, one batch in
    flight per worker (so neither end of a pipe can block the other): the
    output order is the input order. Leaving the ``with`` block ends them
    after the last batch, or, on any error or signal, kills them without
    waiting on anything they hold."""

    def __init__(self, count: int, worker_args: tuple):
        context = multiprocessing.get_context("spawn")
        self._connections, self._processes = [], []
        for _ in range(count):
            parent_end, child_end = context.Pipe()
            process = context.Process(target=_worker_main, args=(child_end, worker_args),
                                      daemon=True)
            process.start()
            child_end.close()
            self._connections.append(parent_end)
            self._processes.append(process)

    def imap(self, batches: Iterator[_Batch]) -> Iterator[tuple]:
        in_flight: list[int] = []
        for worker, batch in zip(range(len(self._processes)), batches):
            self._connections[worker].send(batch)
            in_flight.append(worker)
        while in_flight:
            worker = in_flight.pop(0)
            try:
                result = self._connections[worker].recv()
            except EOFError:
                raise RuntimeError(f"tokenization worker {worker} died (exit code "
                                   f"{self._processes[worker].exitcode})") from None
            batch = next(batches, None)
            if batch is not None:
                self._connections[worker].send(batch)
                in_flight.append(worker)
            yield result

    def __enter__(self) -> "_Workers":
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is None:
            for connection, process in zip(self._connections, self._processes):
                connection.send(None)
                process.join()
        else:
            for process in self._processes:
                process.kill()
                process.join()


def _encode_batch(batch: _Batch) -> tuple[str, int, int, list]:
    """(file, number of its first line, bytes read, per line: None if blank, a
    str saying why it is invalid, or a tuple of token arrays, one per key)."""
    json_keys, append_eod = _worker_settings
    token_dtype = np.dtype(batch.token_dtype)
    results: list = []
    for line in batch.lines:
        if not line.strip():
            results.append(None)
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            results.append(f"not valid UTF-8 (byte {e.start})")
            continue
        except json.JSONDecodeError as e:
            results.append(f"malformed JSON ({e.msg} at column {e.colno})")
            continue
        except RecursionError:
            results.append("JSON nested too deeply to read")
            continue
        if not isinstance(record, dict):
            results.append(f"expected a JSON object, got {type(record).__name__}")
            continue
        problem = next((f"missing key {k!r}" if k not in record else
                        f"key {k!r} is a {type(record[k]).__name__}, not a string"
                        for k in json_keys if not isinstance(record.get(k), str)), None)
        if problem:
            results.append(problem)
            continue
        try:
            per_key = [_worker_tokenizer.tokenize(record[key]) for key in json_keys]
        except ValueError as e:
            results.append(f"the tokenizer refuses the text: {e}")
            continue
        for ids in per_key:
            if ids and append_eod:
                ids.append(_worker_tokenizer.eod)
        results.append(tuple(np.asarray(ids, dtype=token_dtype) for ids in per_key))
    return batch.path, batch.first_line_number, sum(len(line) for line in batch.lines), results


def _progress_line(stats: PreprocessStats, documents: int, elapsed: float,
                   total_bytes: Optional[int]) -> str:
    rate_docs = documents / max(elapsed, 1e-9)
    rate_bytes = stats.input_bytes / max(elapsed, 1e-9)
    line = (f"processed {documents} documents ({rate_docs:.0f} docs/s, "
            f"{rate_bytes / 1e6:.2f} MB/s)")
    if total_bytes:
        remaining = max(total_bytes - stats.input_bytes, 0) / max(rate_bytes, 1e-9)
        line += f", {100 * stats.input_bytes / total_bytes:.0f}% of input, ETA {remaining:.0f} s"
    return line


def preprocess(inputs: Sequence[str], output_prefix: str, tokenizer_spec: TokenizerSpec,
               json_keys: Sequence[str] = ("text",), append_eod: bool = False, workers: int = 1,
               skip_invalid: bool = False, log_interval: int = 1000,
               log: Optional[IO[str]] = sys.stderr) -> PreprocessStats:
    """Tokenizes the JSONL `inputs` (files or globs), one dataset per key; see the module doc."""
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if not json_keys:
        raise ValueError("--json-keys must name at least one key")
    if len(set(json_keys)) != len(json_keys):
        raise ValueError(f"--json-keys {' '.join(json_keys)}: a key is given twice (each key "
                         f"writes one dataset)")
    paths = expand_inputs(inputs)
    for key in json_keys:
        for stale in remove_stale_temporaries(output_prefix_for_key(output_prefix, key)):
            if log is not None:
                print(f"removed {stale}, left by a killed run", file=log)
    output_folder = os.path.dirname(os.path.abspath(output_prefix))
    with _removed_on_error_if_new(output_folder):
        return _preprocess(paths, output_prefix, tokenizer_spec, json_keys, append_eod, workers,
                           skip_invalid, log_interval, log, inputs)


@contextlib.contextmanager
def _removed_on_error_if_new(folder: str):
    """A failed run does not leave behind an empty output folder it created."""
    existed = os.path.isdir(folder)
    try:
        yield
    except BaseException:
        if not existed and os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)
        raise


def _preprocess(paths: list[str], output_prefix: str, tokenizer_spec: TokenizerSpec,
                json_keys: Sequence[str], append_eod: bool, workers: int, skip_invalid: bool,
                log_interval: int, log: Optional[IO[str]], inputs: Sequence[str]
                ) -> PreprocessStats:
    # Sizes of compressed inputs say nothing about the text they hold: no ETA then.
    total_bytes = (None if any(p.endswith(".gz") for p in paths)
                   else sum(os.path.getsize(p) for p in paths))
    stats = PreprocessStats(documents={k: 0 for k in json_keys}, tokens={k: 0 for k in json_keys},
                            empty_documents={k: 0 for k in json_keys})
    worker_args = (tokenizer_spec, tuple(json_keys), append_eod)
    started = time.perf_counter()
    documents_seen = 0
    with contextlib.ExitStack() as stack:
        tokenizer = tokenizer_spec.build()  # a bad tokenizer file fails before workers start
        if workers > 1:
            pool = stack.enter_context(_Workers(workers, worker_args))
        token_dtype = np.dtype(optimal_token_dtype(tokenizer.vocab_size))
        try:
            builders = [stack.enter_context(
                IndexedDatasetBuilder(output_prefix_for_key(output_prefix, key), token_dtype))
                for key in json_keys]
        except OSError as e:
            why = ("a file stands where a folder is needed" if e.errno in (errno.EEXIST,
                   errno.ENOTDIR) else e.strerror)
            raise ValueError(f"--output-prefix {output_prefix}: cannot write "
                             f"{e.filename or output_prefix} ({why})") from None
        batches = _read_batches(paths, token_dtype.str)
        if workers == 1:
            _start_worker(*worker_args, tokenizer=tokenizer)
            encoded_batches = map(_encode_batch, batches)
        else:
            encoded_batches = pool.imap(batches)
        for path, first_line_number, batch_bytes, results in encoded_batches:
            for line_number, result in enumerate(results, start=first_line_number):
                if result is None:
                    continue
                if isinstance(result, str):
                    if not skip_invalid:
                        raise InvalidInputError(f"{path}:{line_number}: {result} (pass "
                                                f"--skip-invalid to skip such lines)")
                    stats.invalid_lines += 1
                    continue
                documents_seen += 1
                for key, builder, tokens in zip(json_keys, builders, result):
                    if tokens.size == 0:
                        stats.empty_documents[key] += 1
                        continue
                    builder.add_document(tokens)
                    stats.documents[key] += 1
                    stats.tokens[key] += int(tokens.size)
                if log is not None and log_interval > 0 and documents_seen % log_interval == 0:
                    print(_progress_line(stats, documents_seen, time.perf_counter() - started,
                                         total_bytes), file=log, flush=True)
            stats.input_bytes += batch_bytes
        empty = [key for key in json_keys if stats.documents[key] == 0]
        if empty:
            raise InvalidInputError(
                f"--input {' '.join(inputs)}: no document with tokens under key "
                f"{empty[0]!r} ({documents_seen} documents, {stats.invalid_lines} invalid lines): "
                f"nothing to write")
        for builder in builders:
            builder.finalize()
    stats.seconds = time.perf_counter() - started
    return stats
