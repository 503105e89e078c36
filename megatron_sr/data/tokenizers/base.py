"""The interface every tokenizer offers, the reading of tokenizer files, and
NullTokenizer (space-separated ids)."""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Sequence


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
        """Text of `ids`; ``detokenize(tokenize(t)) == t`` for the lossless tokenizers
        (Llama3Tokenizer and HuggingFaceTokenizer write a bos they add as its text)."""


def read_tokenizer_file(flag: str, path: str, mode: str = "r"):
    """The contents of the tokenizer file `path` given by `flag` (str for mode "r",
    bytes for "rb"); ValueError naming both when it is missing, a folder,
    unreadable, or (text) not UTF-8."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a directory, not a file")
    try:
        with open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            return f.read()
    except FileNotFoundError:
        raise ValueError(f"{flag} {path}: no such file") from None
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {path}: not a UTF-8 text file (byte {e.start})") from None


MAX_VOCAB_SIZE = 2**31 - 1  # ids of every tokenizer fit int32, the widest .bin dtype written


class NullTokenizer(Tokenizer):
    """Text is space-separated integer ids; for tests and synthetic data."""

    def __init__(self, vocab_size: int):
        if vocab_size is None or not 1 <= vocab_size < MAX_VOCAB_SIZE:
            raise ValueError(f"--vocab-size must be an integer in [1, {MAX_VOCAB_SIZE}) for "
                             f"NullTokenizer (ids are stored as int32), got {vocab_size}")
        self._ids_without_eod = int(vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._ids_without_eod + 1

    @property
    def eod(self) -> int:
        return self._ids_without_eod

    def tokenize(self, text: str) -> list[int]:
        words = text.split()
        not_integer = next((w for w in words if not w.lstrip("-").isdecimal()), None)
        if not_integer is not None:
            raise ValueError(f"NullTokenizer: {not_integer[:40]!r} is not an integer id (the text "
                             f"must be space-separated ids below --vocab-size)")
        ids = [int(word) for word in words]
        out_of_range = [i for i in ids if not 0 <= i < self._ids_without_eod]
        if out_of_range:
            raise ValueError(f"NullTokenizer: ids {out_of_range[:5]} are outside "
                             f"[0, --vocab-size={self._ids_without_eod})")
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)
