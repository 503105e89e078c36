"""Tokenizers selected by Megatron-LM's ``--tokenizer-type`` names.

Every tokenizer offers the same small interface (`Tokenizer`):

- ``vocab_size``: number of token ids, eod included (ids are ``0 .. vocab_size-1``);
- ``eod``: the end-of-document id that `tools/preprocess_data.py --append-eod` adds;
- ``tokenize(text) -> list[int]`` and ``detokenize(ids) -> str``.

`build_tokenizer` maps the flag values to classes:

============================  =====================================================
``GPT2BPETokenizer``          byte-level BPE from ``--vocab-file`` (encoder.json or
                              vocab.json) and ``--merge-file`` (vocab.bpe or
                              merges.txt); eod is ``<|endoftext|>``.
``SentencePieceTokenizer``,   a SentencePiece model from ``--tokenizer-model``; eod
``GPTSentencePieceTokenizer`` is the model's end-of-sentence piece (``</s>``), as in
                              Megatron's GPT SentencePiece tokenizer.
``NullTokenizer``             text is space-separated ids below ``--vocab-size``; eod
                              is ``--vocab-size`` itself, so ``vocab_size`` is one more.
============================  =====================================================

Nothing here imports torch: the preprocessing workers load this module alone.
"""
from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from functools import lru_cache
from typing import Mapping, Optional, Sequence


class Tokenizer(ABC):
    """The interface the preprocessing tool and the datasets rely on."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids this tokenizer can produce, eod included."""

    @property
    @abstractmethod
    def eod(self) -> int:
        """Id appended after each document."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Ids of `text`, without eod."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of `ids`; ``detokenize(tokenize(t)) == t`` for the lossless tokenizers."""


@lru_cache(maxsize=None)
def _byte_to_printable() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    Bytes that are already visible, non-space Latin-1 characters map to
    themselves; the remaining ones (control bytes, space, a few Latin-1 gaps)
    map, in increasing byte order, to the code points starting at 256. The
    vocabulary files are written in these characters.
    """
    visible = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
               + list(range(ord("\xae"), ord("\xff") + 1)))
    mapping = {b: chr(b) for b in visible}
    next_code_point = 256
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(next_code_point)
            next_code_point += 1
    return mapping


# GPT-2's pre-tokenization: English contractions, runs of letters, of digits,
# of other symbols (each optionally led by one space), and whitespace runs,
# where a run followed by a non-space leaves its last space to the next word.
_GPT2_PRETOKENIZE_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
                             r"""|\s+(?!\S)|\s+""")


class GPT2BPETokenizer(Tokenizer):
    """Byte-level BPE with GPT-2's files; merges of each pre-token are cached."""

    END_OF_TEXT = "<|endoftext|>"

    def __init__(self, vocab_file: str, merge_file: str):
        import regex

        self._encoder = _read_json_vocab(vocab_file)
        self._decoder = {i: piece for piece, i in self._encoder.items()}
        self._merge_rank = _read_merges(merge_file)
        if self.END_OF_TEXT not in self._encoder:
            raise ValueError(f"--vocab-file {vocab_file}: has no {self.END_OF_TEXT!r} entry, "
                             f"so it is not a GPT-2 vocabulary")
        self._eod = self._encoder[self.END_OF_TEXT]
        self._byte_encoder = _byte_to_printable()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        self._pretokenizer = regex.compile(_GPT2_PRETOKENIZE_PATTERN)
        self._merge_cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self._encoder)

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        ids: list[int] = []
        for pretoken in self._pretokenizer.findall(text):
            cached = self._merge_cache.get(pretoken)
            if cached is None:
                printable = "".join(self._byte_encoder[b] for b in pretoken.encode("utf-8"))
                cached = [self._encoder[piece] for piece in self._merge(printable)]
                self._merge_cache[pretoken] = cached
            ids.extend(cached)
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        printable = "".join(self._decoder[int(i)] for i in ids)
        return bytes(self._byte_decoder[c] for c in printable).decode("utf-8", errors="replace")

    def _merge(self, word: str) -> list[str]:
        """Applies the lowest-ranked merge present until none applies."""
        parts = list(word)
        while len(parts) > 1:
            best_rank, best_at = None, -1
            for at in range(len(parts) - 1):
                rank = self._merge_rank.get((parts[at], parts[at + 1]))
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best_at = rank, at
            if best_rank is None:
                break
            first, second = parts[best_at], parts[best_at + 1]
            merged: list[str] = []
            at = 0
            while at < len(parts):
                if at < len(parts) - 1 and parts[at] == first and parts[at + 1] == second:
                    merged.append(first + second)
                    at += 2
                else:
                    merged.append(parts[at])
                    at += 1
            parts = merged
        return parts


def _read_json_vocab(vocab_file: str) -> dict[str, int]:
    try:
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"--vocab-file {vocab_file}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--vocab-file {vocab_file}: not a JSON piece->id map ({e})") from None
    if not isinstance(vocab, dict):
        raise ValueError(f"--vocab-file {vocab_file}: expected a JSON object mapping pieces to ids")
    return vocab


def _read_merges(merge_file: str) -> dict[tuple[str, str], int]:
    try:
        with open(merge_file, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        raise FileNotFoundError(f"--merge-file {merge_file}: no such file") from None
    ranks: dict[tuple[str, str], int] = {}
    for line_number, line in enumerate(lines, start=1):
        if not line or line.startswith("#version"):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise ValueError(f"--merge-file {merge_file}:{line_number}: expected two "
                             f"space-separated pieces, got {line!r}")
        ranks[(pair[0], pair[1])] = len(ranks)
    return ranks


class SentencePieceTokenizer(Tokenizer):
    """A trained SentencePiece model (see `tools/train_tokenizer.py`)."""

    def __init__(self, tokenizer_model: str):
        import sentencepiece

        if not os.path.isfile(tokenizer_model):
            raise FileNotFoundError(f"--tokenizer-model {tokenizer_model}: no such file")
        self._processor = sentencepiece.SentencePieceProcessor()
        try:
            self._processor.Load(tokenizer_model)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"--tokenizer-model {tokenizer_model}: not a SentencePiece model "
                             f"({e})") from None
        self._eod = self._processor.eos_id()
        if self._eod < 0:
            raise ValueError(f"--tokenizer-model {tokenizer_model}: the model has no "
                             f"end-of-sentence piece to use as eod (trained with eos_id=-1)")

    @property
    def vocab_size(self) -> int:
        return self._processor.GetPieceSize()

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        return self._processor.EncodeAsIds(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._processor.DecodeIds([int(i) for i in ids])


class NullTokenizer(Tokenizer):
    """Text is space-separated integer ids; for tests and synthetic data."""

    def __init__(self, vocab_size: int):
        if vocab_size is None or vocab_size < 1:
            raise ValueError(f"--vocab-size must be a positive integer for NullTokenizer, "
                             f"got {vocab_size}")
        self._ids_without_eod = int(vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._ids_without_eod + 1

    @property
    def eod(self) -> int:
        return self._ids_without_eod

    def tokenize(self, text: str) -> list[int]:
        ids = [int(word) for word in text.split()]
        out_of_range = [i for i in ids if not 0 <= i < self._ids_without_eod]
        if out_of_range:
            raise ValueError(f"NullTokenizer: ids {out_of_range[:5]} are outside "
                             f"[0, --vocab-size={self._ids_without_eod})")
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


TOKENIZER_FLAGS = {
    "GPT2BPETokenizer": ("vocab_file", "merge_file"),
    "SentencePieceTokenizer": ("tokenizer_model",),
    "GPTSentencePieceTokenizer": ("tokenizer_model",),
    "NullTokenizer": ("vocab_size",),
}
"""The flags (argparse dests) each ``--tokenizer-type`` reads its vocabulary from."""

TOKENIZER_TYPES = tuple(TOKENIZER_FLAGS)


def check_tokenizer_flags(tokenizer_type: str, values: Mapping[str, object]) -> None:
    """Raises ValueError naming the flags `tokenizer_type` needs that `values`
    (argparse dest -> value) leaves unset. Shared by `build_tokenizer` and the
    argument validation of `pretrain_gpt.py`."""
    if tokenizer_type not in TOKENIZER_FLAGS:
        raise ValueError(f"--tokenizer-type {tokenizer_type!r} is not supported; choose one of "
                         f"{', '.join(TOKENIZER_TYPES)}")
    missing = ["--" + dest.replace("_", "-") for dest in TOKENIZER_FLAGS[tokenizer_type]
               if values.get(dest) is None]
    if missing:
        raise ValueError(f"--tokenizer-type {tokenizer_type} needs {' and '.join(missing)}")


def build_tokenizer(tokenizer_type: str, vocab_file: Optional[str] = None,
                    merge_file: Optional[str] = None, tokenizer_model: Optional[str] = None,
                    vocab_size: Optional[int] = None) -> Tokenizer:
    """The tokenizer named by ``--tokenizer-type``, checking the flags it needs."""
    check_tokenizer_flags(tokenizer_type, {"vocab_file": vocab_file, "merge_file": merge_file,
                                           "tokenizer_model": tokenizer_model,
                                           "vocab_size": vocab_size})
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    return SentencePieceTokenizer(tokenizer_model)


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int = 128,
                      tensor_model_parallel_size: int = 1) -> int:
    """Megatron's embedding size: `vocab_size` rounded up to a multiple of
    ``--make-vocab-size-divisible-by`` x ``--tensor-model-parallel-size``."""
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple
