"""GPT training samples from Megatron ``.bin``/``.idx`` datasets: splits, indices, blending.

Entry point: ``build_gpt_datasets(data_config, tokenizer, train_valid_test_num_samples,
seed) -> (train, valid, test)``. Each is a map-style dataset (or None for a
split that is asked for 0 samples) whose item ``i`` is ``{"tokens":
LongTensor[seq_length + 1]}``: inputs are ``tokens[:-1]``, labels
``tokens[1:]``. Items are a pure function of (data, split, sample counts,
``seq_length``, seed): the stream is deterministic and independent of workers
or ranks.

Semantics (Megatron-LM's GPT dataset, indices built with numpy):

- **Split**: ``--split 949,50,1`` divides the sequences (= documents, one per
  document as `tools/preprocess_data.py` writes them) of every prefix into
  three contiguous ranges proportional to the weights; splits never share a
  document.
- **Document index**: the split's documents, each epoch in a fresh seeded
  permutation, for as many epochs as the requested samples need.
- **Sample index**: sample ``k`` is the ``seq_length + 1`` tokens at
  positions ``k*seq_length .. (k+1)*seq_length`` of the concatenation of the
  documents in document-index order (consecutive samples share one token; a
  sample may span documents). Row ``k`` holds (document-index position,
  offset) of position ``k*seq_length``.
- **Shuffle index**: a seeded permutation of all samples of those epochs;
  item ``i`` is sample ``shuffle_index[i]``. ``len(dataset)`` is the number of
  samples of the built epochs, at least the number requested.
- **Cache**: with ``--data-cache-path``, the three indices are saved as .npy
  files named by a hash of everything they depend on (prefix, the document
  range and its lengths, sample count, seq_length, seed, split) and reused when
  the hash matches; writes are atomic, so concurrent ranks are safe. Without
  it, indices are built in memory (seconds for 10^8 tokens).
- **Blending**: ``--data-path 0.3 A 0.7 B`` draws each split's stream from the
  prefixes by deterministic stride scheduling: the j-th sample of prefix d is
  due at time ``(j + 1/2) / w_d`` and samples are served in due order, so after
  any n samples prefix d has served within ±(number of prefixes) of ``w_d n``.
  Unweighted prefixes are weighted by their token counts.
- **Separate splits** (``--train-data-path``, ``--valid-data-path``,
  ``--test-data-path``, Megatron's per-split blends): each split reads all
  documents of its own prefixes (weighted as in ``--data-path``); ``--split``
  plays no part, and a split no flag names is None.
- **Mock data** (``--mock-data``): seeded uniform random tokens, no files.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch

from megatron_sr.data.indexed_dataset import IndexedDataset

if TYPE_CHECKING:  # megatron_sr.config imports this module's parsers
    from megatron_sr.config import DataConfig

SPLIT_NAMES = ("train", "valid", "test")
_INDEX_FORMAT_VERSION = 1  # bump when the index construction changes meaning


INDEX_BYTES_PER_SAMPLE = 24  # a sample-index row (two int64) and a shuffle-index entry


def memory_bytes() -> int:
    """This machine's physical memory, the bound on any index a run builds."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_split(split: str) -> list[float]:
    """``--split "949,50,1"`` -> three fractions summing to 1 (missing parts are 0)."""
    try:
        parts = [float(p) for p in split.replace("/", ",").split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"--split {split!r}: expected up to three comma-separated "
                         f"numbers") from None
    if not 1 <= len(parts) <= 3 or not all(0 <= p < math.inf for p in parts) or \
            not 0 < sum(parts) < math.inf:
        raise ValueError(f"--split {split!r}: expected up to three finite non-negative numbers "
                         f"with a positive sum, e.g. 969,30,1")
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    return [p / total for p in parts]


def split_document_ranges(split: str, num_documents: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) document ranges for train, valid, test."""
    bounds = np.round(np.cumsum([0.0] + parse_split(split)) * num_documents).astype(np.int64)
    bounds[-1] = num_documents
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(3)]


def parse_data_path(data_path: Sequence[str], flag: str = "--data-path"
                    ) -> list[tuple[Optional[float], str]]:
    """``["0.3", "A", "0.7", "B"]`` -> [(0.3, "A"), (0.7, "B")]; ``["A", "B"]`` -> weights None.
    `flag`: the flag that gave the list (--data-path, --train-data-path, ...), which
    errors name."""
    if not data_path:
        raise ValueError(f"{flag} is empty: give one or more dataset prefixes, or --mock-data")

    def is_number(text: str) -> bool:  # "nan" and "inf" too: they are no prefixes
        try:
            float(text)
            return True
        except ValueError:
            return False

    if not is_number(data_path[0]):
        if any(is_number(p) for p in data_path):
            raise ValueError(f"{flag} {' '.join(data_path)}: either weight every prefix "
                             f"or none")
        return [(None, p) for p in data_path]
    if len(data_path) % 2 != 0 or not all(is_number(w) for w in data_path[0::2]):
        raise ValueError(f"{flag} {' '.join(data_path)}: expected weight-prefix pairs")
    pairs = [(float(w), p) for w, p in zip(data_path[0::2], data_path[1::2])]
    if not all(0 <= w < math.inf for w, _ in pairs) or not 0 < sum(w for w, _ in pairs) < math.inf:
        raise ValueError(f"{flag} {' '.join(data_path)}: weights must be finite and "
                         f"non-negative, with a positive finite sum")
    return pairs


def build_document_index(documents: np.ndarray, num_epochs: int,
                         rng: np.random.RandomState) -> np.ndarray:
    """The documents of each epoch in a fresh permutation, epochs concatenated (int64)."""
    return np.concatenate([rng.permutation(documents) for _ in range(num_epochs)]).astype(np.int64)


def build_sample_index(sequence_lengths: np.ndarray, document_index: np.ndarray,
                       seq_length: int, num_samples: int) -> np.ndarray:
    """(num_samples + 1, 2) int64: (document-index position, offset) of token
    position ``k * seq_length`` of the concatenated documents, for k = 0..num_samples."""
    starts = np.zeros(len(document_index) + 1, dtype=np.int64)
    np.cumsum(sequence_lengths[document_index], dtype=np.int64, out=starts[1:])
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    if positions[-1] >= starts[-1]:
        raise ValueError(f"{num_samples} samples of {seq_length}+1 tokens need more than the "
                         f"{starts[-1]} tokens of the document index")
    # Rightmost document whose start is <= the position: skips empty documents.
    document_positions = np.searchsorted(starts, positions, side="right") - 1
    sample_index = np.empty((num_samples + 1, 2), dtype=np.int64)
    sample_index[:, 0] = document_positions
    sample_index[:, 1] = positions - starts[document_positions]
    return sample_index


def blending_indices(weights: Sequence[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index int16[n], dataset_sample_index int64[n]) by stride scheduling (module doc)."""
    weights = np.asarray(weights, dtype=np.float64)
    weights = weights / weights.sum()
    due_times, owners = [], []
    for dataset, weight in enumerate(weights):
        if weight <= 0:
            continue
        count = int(np.ceil(weight * num_samples)) + len(weights) + 1
        due_times.append((np.arange(count, dtype=np.float64) + 0.5) / weight)
        owners.append(np.full(count, dataset, dtype=np.int16))
    due_times, owners = np.concatenate(due_times), np.concatenate(owners)
    order = np.lexsort((owners, due_times))[:num_samples]  # due time, then dataset id
    dataset_index = owners[order]
    dataset_sample_index = np.empty(num_samples, dtype=np.int64)
    for dataset in range(len(weights)):
        chosen = dataset_index == dataset
        dataset_sample_index[chosen] = np.arange(int(chosen.sum()), dtype=np.int64)
    return dataset_index, dataset_sample_index


@dataclass(frozen=True)
class _IndexKey:
    """Everything the three indices of one split of one prefix depend on."""

    prefix: str
    split: str
    document_range: tuple[int, int]
    lengths_digest: str
    num_samples: int
    seq_length: int
    seed: int

    def digest(self) -> str:
        description = dict(self.__dict__, version=_INDEX_FORMAT_VERSION)
        return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]


class GPTDataset(torch.utils.data.Dataset):
    """Samples of one split of one prefix; see the module doc for the indices."""

    INDEX_NAMES = ("document_index", "sample_index", "shuffle_index")

    def __init__(self, indexed_dataset: IndexedDataset, split: str,
                 document_range: tuple[int, int], num_samples: int, seq_length: int, seed: int,
                 cache_path: Optional[str] = None):
        start, end = document_range
        if num_samples < 1:
            raise ValueError(f"{indexed_dataset.prefix} ({split}): num_samples must be >= 1")
        lengths = indexed_dataset.sequence_lengths[start:end]
        tokens_per_epoch = int(lengths.sum(dtype=np.int64))
        if tokens_per_epoch == 0:
            raise ValueError(f"{indexed_dataset.prefix}: the {split} split (documents "
                             f"[{start}, {end}) of {len(indexed_dataset)}) has no tokens; adjust "
                             f"--split or give more data")
        self.indexed_dataset = indexed_dataset
        self.split = split
        self.seq_length = seq_length
        key = _IndexKey(os.path.abspath(indexed_dataset.prefix), split, (start, end),
                        hashlib.sha256(np.ascontiguousarray(lengths).tobytes()).hexdigest(),
                        num_samples, seq_length, seed)
        self.loaded_from_cache = False
        cached = self._load(cache_path, key) if cache_path else None
        if cached is not None:
            self.document_index, self.sample_index, self.shuffle_index = cached
            self.loaded_from_cache = True
            return
        num_epochs = -(-(num_samples * seq_length + 1) // tokens_per_epoch)
        samples_in_epochs = (num_epochs * tokens_per_epoch - 1) // seq_length
        index_bytes = 8 * num_epochs * (end - start) + INDEX_BYTES_PER_SAMPLE * samples_in_epochs
        if index_bytes > memory_bytes():
            raise ValueError(
                f"{indexed_dataset.prefix} ({split}): {num_samples} samples of {seq_length} "
                f"tokens take {num_epochs} epochs of its {end - start} documents, whose indices "
                f"need {index_bytes / 2**30:.0f} GiB, more than this machine's memory "
                f"({memory_bytes() / 2**30:.0f} GiB): check --global-batch-size, --train-iters "
                f"or --train-samples, and --eval-iters")
        rng = np.random.RandomState(seed)
        self.document_index = build_document_index(np.arange(start, end, dtype=np.int64),
                                                   num_epochs, rng)
        self.sample_index = build_sample_index(indexed_dataset.sequence_lengths,
                                               self.document_index, seq_length, samples_in_epochs)
        self.shuffle_index = rng.permutation(samples_in_epochs).astype(np.int64)
        if cache_path:
            self._save(cache_path, key)

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return {"tokens": torch.from_numpy(self.sample_tokens(idx))}

    def sample_tokens(self, idx: int) -> np.ndarray:
        """The seq_length + 1 tokens of item `idx`, int64."""
        sample = int(self.shuffle_index[idx])
        first_position, first_offset = (int(v) for v in self.sample_index[sample])
        last_position, last_offset = (int(v) for v in self.sample_index[sample + 1])
        read = self.indexed_dataset.get
        if first_position == last_position:
            pieces = [read(int(self.document_index[first_position]), first_offset,
                           last_offset - first_offset + 1)]
        else:
            pieces = [read(int(self.document_index[first_position]), first_offset)]
            pieces += [read(int(self.document_index[p]))
                       for p in range(first_position + 1, last_position)]
            pieces.append(read(int(self.document_index[last_position]), 0, last_offset + 1))
        return np.concatenate(pieces).astype(np.int64)

    @classmethod
    def _paths(cls, cache_path: str, key: _IndexKey) -> dict[str, str]:
        stem = os.path.join(cache_path, f"{key.digest()}-GPTDataset-{key.split}")
        paths = {name: f"{stem}-{name}.npy" for name in cls.INDEX_NAMES}
        paths["description"] = f"{stem}-description.json"
        return paths

    @classmethod
    def _load(cls, cache_path: str, key: _IndexKey):
        paths = cls._paths(cache_path, key)
        if not all(os.path.isfile(p) for p in paths.values()):
            return None
        indices = []
        for name in cls.INDEX_NAMES:
            try:
                indices.append(np.load(paths[name], mmap_mode="r", allow_pickle=False))
            except (OSError, ValueError, EOFError) as e:
                raise ValueError(f"--data-cache-path {cache_path}: {paths[name]} is not a "
                                 f"readable index ({e}); delete it to rebuild it") from None
            if indices[-1].dtype != np.int64 or indices[-1].ndim != (2 if name == "sample_index"
                                                                      else 1):
                raise ValueError(f"--data-cache-path {cache_path}: {paths[name]} holds "
                                 f"{indices[-1].dtype} {indices[-1].shape}, not this index; "
                                 f"delete it to rebuild it")
        return tuple(indices)

    def _save(self, cache_path: str, key: _IndexKey) -> None:
        os.makedirs(cache_path, exist_ok=True)
        paths = self._paths(cache_path, key)
        for name in self.INDEX_NAMES:
            _atomic_write(paths[name], lambda f, a=getattr(self, name): np.save(f, a))
        # The description is written last: its presence marks a complete set.
        _atomic_write(paths["description"], lambda f: f.write(
            json.dumps(dict(key.__dict__, version=_INDEX_FORMAT_VERSION), indent=1).encode()))


def _atomic_write(path: str, write) -> None:
    fd, staging = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-",
                                   dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)


class BlendedDataset(torch.utils.data.Dataset):
    """Exactly `num_samples` items drawn from `datasets` in proportion to `weights`."""

    def __init__(self, datasets: Sequence[Optional[torch.utils.data.Dataset]],
                 weights: Sequence[float], num_samples: int):
        self.datasets = list(datasets)
        self.dataset_index, self.dataset_sample_index = blending_indices(weights, num_samples)

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        dataset = self.datasets[int(self.dataset_index[idx])]
        return dataset[int(self.dataset_sample_index[idx])]


class MockGPTDataset(torch.utils.data.Dataset):
    """`num_samples` items of seeded uniform random tokens in [0, vocab_size)."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int,
                 split_number: int = 0):
        self.num_samples, self.seq_length, self.vocab_size = num_samples, seq_length, vocab_size
        self.seed, self.split_number = seed, split_number

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"mock sample {idx} out of range [0, {self.num_samples})")
        rng = np.random.default_rng((self.seed, self.split_number, idx))
        tokens = rng.integers(0, self.vocab_size, size=self.seq_length + 1, dtype=np.int64)
        return {"tokens": torch.from_numpy(tokens)}


PER_SPLIT_FLAGS = ("--train-data-path", "--valid-data-path", "--test-data-path")


def _split_blends(data_config: DataConfig) -> list[Optional[tuple[str, list]]]:
    """Per split: (the flag naming its datasets, [(weight or None, prefix)]), or
    None for a split no flag names."""
    if data_config.data_path:
        return [("--data-path", parse_data_path(data_config.data_path))] * 3
    paths = (data_config.train_data_path, data_config.valid_data_path,
             data_config.test_data_path)
    if not any(paths):
        parse_data_path(data_config.data_path)  # the error: no datasets at all
    return [(flag, parse_data_path(path, flag)) if path else None
            for flag, path in zip(PER_SPLIT_FLAGS, paths)]


def build_gpt_datasets(data_config: DataConfig, tokenizer, train_valid_test_num_samples:
                       Sequence[int], seed: int):
    """(train, valid, test) datasets for `data_config`; see the module doc.

    `tokenizer` supplies the vocabulary size (any object with ``vocab_size``, or
    None): the range of ``--mock-data``, and the bound every token id of a
    dataset must lie under (IndexedDatasetError otherwise, checked at build
    time in one pass over each ``.bin``). A split asked for 0 samples, or that
    no --train/valid/test-data-path names, is None.
    """
    if len(train_valid_test_num_samples) != 3:
        raise ValueError("train_valid_test_num_samples must hold three counts")
    seq_length = data_config.seq_length
    if seq_length < 1:
        raise ValueError(f"--seq-length must be >= 1, got {seq_length}")
    if data_config.mock_data:
        return tuple(MockGPTDataset(n, seq_length, tokenizer.vocab_size, seed, number) if n > 0
                     else None for number, n in enumerate(train_valid_test_num_samples))
    blends = _split_blends(data_config)
    opened: dict[str, IndexedDataset] = {}

    def open_dataset(flag: str, prefix: str) -> IndexedDataset:
        if prefix not in opened:
            dataset = IndexedDataset(prefix)
            if tokenizer is not None:  # a wrong tokenizer would train on ids it cannot mean
                dataset.check_fits_vocabulary(tokenizer.vocab_size, data_config.data_cache_path)
            if flag != "--data-path" and dataset.num_tokens == 0:
                raise ValueError(f"{flag} {prefix}: the dataset has no tokens")
            opened[prefix] = dataset
        return opened[prefix]

    splits = []
    for number, (name, num_samples) in enumerate(zip(SPLIT_NAMES, train_valid_test_num_samples)):
        if num_samples <= 0 or blends[number] is None:
            splits.append(None)
            continue
        flag, weighted_prefixes = blends[number]
        indexed = [open_dataset(flag, prefix) for _, prefix in weighted_prefixes]
        if weighted_prefixes[0][0] is None:
            weights = [float(ds.num_tokens) for ds in indexed]
        else:
            weights = [w for w, _ in weighted_prefixes]
        # --data-path: this split's share of every prefix; a split's own flag: all of it.
        ranges = [split_document_ranges(data_config.split, len(ds))[number]
                  if flag == "--data-path" else (0, len(ds)) for ds in indexed]
        if len(indexed) == 1:
            splits.append(GPTDataset(indexed[0], name, ranges[0], num_samples, seq_length,
                                     seed, data_config.data_cache_path))
            continue
        dataset_index, _ = blending_indices(weights, num_samples)
        counts = np.bincount(dataset_index, minlength=len(indexed))
        parts = [GPTDataset(ds, name, document_range, int(count), seq_length, seed,
                            data_config.data_cache_path) if count > 0 else None
                 for ds, document_range, count in zip(indexed, ranges, counts)]
        splits.append(BlendedDataset(parts, weights, num_samples))
    return tuple(splits)
