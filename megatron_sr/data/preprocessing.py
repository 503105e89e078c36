"""JSONL -> Megatron ``.bin``/``.idx``: the engine behind `tools/preprocess_data.py`.

Contract of `preprocess`:

- Inputs are read in the given order, each file line by line (``.gz`` files
  decompressed on the fly). Each non-blank line must be a UTF-8 JSON object
  whose every ``json_keys`` value is a string. A line that is not is *invalid*:
  an `InvalidInputError` naming ``file:line`` and the fault, or, with
  ``skip_invalid``, counted and left out. Blank lines are ignored.
- Per key, each document's tokens (plus eod with ``append_eod``) become one
  sequence and one document of ``{output_prefix}_{key}_document``; a document
  with no tokens is skipped and counted.
- Tokenization runs in ``workers`` processes started with the 'spawn' method
  (no fork of a process that may hold torch threads). Lines travel in batches
  and results are written back in input order, so the output is byte-identical
  for any number of workers.
- Outputs are written under temporary names and renamed into place only after
  every input was read without error: a failed or killed run leaves no
  ``.bin``/``.idx`` that looks valid (a killed run may leave ``*.tmp-*`` files).
"""
from __future__ import annotations

import contextlib
import gzip
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Iterator, Optional, Sequence

import numpy as np

from megatron_sr.data.indexed_dataset import IndexedDatasetBuilder, optimal_token_dtype
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
            what = "the pattern matches no file" if glob.has_magic(pattern) else "no such file"
            raise FileNotFoundError(f"--input {pattern}: {what}")
        files.extend(m for m in matches if m not in files)
    return files


def _open_binary(path: str) -> IO[bytes]:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _read_batches(paths: Sequence[str], token_dtype: str) -> Iterator[_Batch]:
    for path in paths:
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
        if not isinstance(record, dict):
            results.append(f"expected a JSON object, got {type(record).__name__}")
            continue
        problem = next((f"missing key {k!r}" if k not in record else
                        f"key {k!r} is a {type(record[k]).__name__}, not a string"
                        for k in json_keys if not isinstance(record.get(k), str)), None)
        if problem:
            results.append(problem)
            continue
        per_key = []
        for key in json_keys:
            ids = _worker_tokenizer.tokenize(record[key])
            if ids and append_eod:
                ids.append(_worker_tokenizer.eod)
            per_key.append(np.asarray(ids, dtype=token_dtype))
        results.append(tuple(per_key))
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
    paths = expand_inputs(inputs)
    # Sizes of compressed inputs say nothing about the text they hold: no ETA then.
    total_bytes = (None if any(p.endswith(".gz") for p in paths)
                   else sum(os.path.getsize(p) for p in paths))
    stats = PreprocessStats(documents={k: 0 for k in json_keys}, tokens={k: 0 for k in json_keys},
                            empty_documents={k: 0 for k in json_keys})
    worker_args = (tokenizer_spec, tuple(json_keys), append_eod)
    started = time.perf_counter()
    documents_seen = 0
    with contextlib.ExitStack() as stack:
        if workers > 1:  # workers start up while this process loads its own tokenizer
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(
                workers, initializer=_start_worker, initargs=worker_args))
        tokenizer = tokenizer_spec.build()
        token_dtype = np.dtype(optimal_token_dtype(tokenizer.vocab_size))
        builders = [stack.enter_context(
            IndexedDatasetBuilder(output_prefix_for_key(output_prefix, key), token_dtype))
            for key in json_keys]
        batches = _read_batches(paths, token_dtype.str)
        if workers == 1:
            _start_worker(*worker_args, tokenizer=tokenizer)
            encoded_batches = map(_encode_batch, batches)
        else:
            encoded_batches = pool.imap(_encode_batch, batches, chunksize=1)
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
        for builder in builders:
            builder.finalize()
    stats.seconds = time.perf_counter() - started
    return stats
