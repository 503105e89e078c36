"""Tokenizers selected by Megatron-LM's ``--tokenizer-type`` names.

Every tokenizer offers the same small interface (`Tokenizer`):

- ``vocab_size``: number of token ids, eod included (ids are ``0 .. vocab_size-1``);
- ``eod``: the end-of-document id that `tools/preprocess_data.py --append-eod` adds;
- ``tokenize(text) -> list[int]`` and ``detokenize(ids) -> str``.

`build_tokenizer` maps the flag values to classes:

============================  =====================================================
``GPT2BPETokenizer``          byte-level BPE from ``--vocab-file`` (encoder.json or
                              vocab.json) and ``--merge-file`` (vocab.bpe or
                              merges.txt); eod is ``<|endoftext|>``. Runs on a
                              ``tiktoken`` (the default, backend="auto", when it
                              is installed), on the ``tokenizers`` library, or on
                              a regex BPE with a per-word merge cache; all give
                              the same ids. tiktoken measured fastest
                              (docs/DATA.md).
``HuggingFaceTokenizer``      a Hugging Face ``tokenizer.json`` (``--tokenizer-model``:
                              the file, or a local folder holding it), through
                              ``tokenizers``; its post-processor runs (a Llama
                              tokenizer adds BOS), as Megatron's does; eod is the
                              eos token of the folder's tokenizer_config.json, else
                              the first of <|endoftext|>, <|end_of_text|>, </s>,
                              <eos> in the vocabulary.
``TikTokenizer``              ``tiktoken`` BPE ranks from a local ``--tokenizer-model``
                              (Megatron's JSON list of {rank, token_bytes,
                              token_str}, or a .tiktoken file of "base64 rank"
                              lines; nothing is downloaded), pre-tokenized by
                              ``--tiktoken-pattern``; ids below
                              ``--tiktoken-num-special-tokens`` are Megatron's
                              special tokens (<unk>, <s>, </s>, ...), eod is </s>.
``SentencePieceTokenizer``,   a SentencePiece model from ``--tokenizer-model``; eod
``GPTSentencePieceTokenizer`` is the model's end-of-sentence piece (``</s>``), as in
                              Megatron's GPT SentencePiece tokenizer.
``Llama2Tokenizer``           a SentencePiece model (Llama 2's ``tokenizer.model``)
                              from ``--tokenizer-model`` with Megatron-LM's Llama-2
                              conventions: each text starts with the model's bos
                              (``<s>``), eod is its eos (``</s>``).
``Llama3Tokenizer``           Llama 3's tiktoken BPE file (``tokenizer.model``:
                              "base64-token rank" lines) from ``--tokenizer-model``
                              with Llama 3's pattern and 256 special tokens after
                              the N ranks; each text starts with
                              ``<|begin_of_text|>`` (N), eod is ``<|end_of_text|>``
                              (N+1), as in Megatron-LM's Llama3Tokenizer.
``NullTokenizer``             text is space-separated ids below ``--vocab-size``; eod
                              is ``--vocab-size`` itself, so ``vocab_size`` is one more.
============================  =====================================================

Nothing here imports torch: the preprocessing workers load this module alone.
"""
from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
from abc import ABC, abstractmethod
from functools import lru_cache
from typing import Iterator, Mapping, Optional, Sequence


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
GPT2_BACKENDS = ("auto", "tiktoken", "tokenizers", "regex")
_GPT2_PRETOKENIZE_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
                             r"""|\s+(?!\S)|\s+""")


class GPT2BPETokenizer(Tokenizer):
    """Byte-level BPE with GPT-2's files.

    `backend`: "tiktoken" (OpenAI's Rust BPE, built from GPT-2's vocabulary
    with GPT-2's pre-tokenization pattern and no special tokens),
    "tokenizers" (the Hugging Face library: a BPE model with GPT-2's
    byte-level pre-tokenizer), "regex" (the pure-Python BPE below, merges of
    each pre-token cached), or "auto": tiktoken when it is installed, else
    regex. In every backend "<|endoftext|>" inside a text is plain text,
    exactly as in GPT-2's own encoder. bench/preprocess.py measures them per
    worker (docs/DATA.md): tiktoken fastest, then the cached regex, then
    tokenizers. All give identical ids (a test checks on the sample corpus):
    the files are checked on load so that they must (`_read_json_vocab`,
    `_read_merges`).
    """

    END_OF_TEXT = "<|endoftext|>"

    def __init__(self, vocab_file: str, merge_file: str, backend: str = "auto"):
        import regex

        if backend not in GPT2_BACKENDS:
            raise ValueError(f"GPT2BPETokenizer backend must be one of {', '.join(GPT2_BACKENDS)}, "
                             f"got {backend!r}")
        self._encoder = _read_json_vocab(vocab_file)
        self._decoder = {i: piece for piece, i in self._encoder.items()}
        if self.END_OF_TEXT not in self._encoder:
            raise ValueError(f"--vocab-file {vocab_file}: has no {self.END_OF_TEXT!r} entry, "
                             f"so it is not a GPT-2 vocabulary")
        self._eod = self._encoder[self.END_OF_TEXT]
        self._byte_encoder = _byte_to_printable()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        unknown = next((c for c in self._byte_decoder if c not in self._encoder), None) or next(
            (p for p in self._encoder if p != self.END_OF_TEXT
             and any(c not in self._byte_decoder for c in p)), None)
        if unknown is not None:
            raise ValueError(f"--vocab-file {vocab_file}: {unknown!r}: a GPT-2 vocabulary holds "
                             f"each of the 256 byte characters and pieces made of them only")
        self._merge_rank = _read_merges(merge_file, self._encoder)
        self._pretokenizer = regex.compile(_GPT2_PRETOKENIZE_PATTERN)
        self._merge_cache: dict[str, list[int]] = {}
        if backend == "auto":
            backend = "tiktoken" if importlib.util.find_spec("tiktoken") else "regex"
        self._fast = self._build_fast() if backend == "tokenizers" else None
        self._tiktoken = self._build_tiktoken() if backend == "tiktoken" else None
        self.backend = backend

    def _build_tiktoken(self):
        import tiktoken

        ranks = {bytes(self._byte_decoder[c] for c in piece): i
                 for piece, i in self._encoder.items() if piece != self.END_OF_TEXT}
        return tiktoken.Encoding("megatron_sr_gpt2", pat_str=_GPT2_PRETOKENIZE_PATTERN,
                                 mergeable_ranks=ranks, special_tokens={})

    def _build_fast(self):
        from tokenizers import Tokenizer as FastTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        merges = sorted(self._merge_rank, key=self._merge_rank.get)
        fast = FastTokenizer(models.BPE(vocab=dict(self._encoder), merges=merges))
        fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        fast.decoder = decoders.ByteLevel()
        return fast

    @property
    def vocab_size(self) -> int:
        return len(self._encoder)

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        if self._tiktoken is not None:
            return self._tiktoken.encode_ordinary(text)
        if self._fast is not None:
            return self._fast.encode(text, add_special_tokens=False).ids
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


def _read_text_file(flag: str, path: str, mode: str = "r"):
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


def _read_json_vocab(vocab_file: str) -> dict[str, int]:
    """encoder.json / vocab.json: a JSON object whose ids are exactly 0 .. N-1, each once."""
    try:
        vocab = json.loads(_read_text_file("--vocab-file", vocab_file))
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"--vocab-file {vocab_file}: not a JSON piece->id map ({e})") from None
    if not isinstance(vocab, dict):
        raise ValueError(f"--vocab-file {vocab_file}: expected a JSON object mapping pieces to ids")
    bad = next(((piece, i) for piece, i in vocab.items()
                if type(i) is not int or not 0 <= i < len(vocab)), None)
    if bad is None and len(set(vocab.values())) != len(vocab):
        seen: dict[int, str] = {}
        bad = next((piece, i) for piece, i in vocab.items() if seen.setdefault(i, piece) != piece)
    if bad is not None:
        raise ValueError(f"--vocab-file {vocab_file}: entry {bad[0]!r}: {bad[1]!r}: the ids of "
                         f"its {len(vocab)} entries must be the integers 0..{len(vocab) - 1}, "
                         f"each once")
    return vocab


def _read_merges(merge_file: str, vocab: Mapping[str, int]) -> dict[tuple[str, str], int]:
    """GPT-2 merges: an optional "#version" line, then one merge per line, two
    space-separated pieces whose concatenation is a vocabulary entry, in the
    order of those entries' ids; every multi-character entry but `specials`
    is made by exactly one merge. GPT-2's own files are so, and it is what makes
    every backend give the same ids: tiktoken and the regex BPE rank merges by
    the id of the piece they make and by the line, respectively."""
    ranks: dict[tuple[str, str], int] = {}
    last_id, made = -1, set()
    for line_number, line in enumerate(_read_text_file("--merge-file", merge_file).split("\n"),
                                       start=1):
        if not line or (line_number == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        where = f"--merge-file {merge_file}:{line_number}"
        if len(pair) != 2 or not all(pair):
            raise ValueError(f"{where}: expected two space-separated pieces, got {line[:80]!r}")
        piece = pair[0] + pair[1]
        unknown = next((p for p in (pair[0], pair[1], piece) if p not in vocab), None)
        if unknown is not None:
            raise ValueError(f"{where}: merge {line[:80]!r}: {unknown!r} is not in the "
                             f"--vocab-file: the merges belong to another vocabulary")
        if vocab[piece] <= last_id or piece in made:
            raise ValueError(f"{where}: merge {line!r} makes id {vocab[piece]}, not above the "
                             f"previous merge's {last_id}: the merges must follow the "
                             f"vocabulary's id order (the tiktoken backend ranks merges by id)")
        last_id = vocab[piece]
        made.add(piece)
        ranks[(pair[0], pair[1])] = len(ranks)
    unmade = [p for p in vocab if len(p) > 1 and p not in made
              and p != GPT2BPETokenizer.END_OF_TEXT]
    if unmade:
        raise ValueError(f"--merge-file {merge_file}: no merge makes {len(unmade)} multi-character "
                         f"entries of the --vocab-file (e.g. {unmade[0]!r}): the merges belong "
                         f"to another vocabulary, or are incomplete")
    return ranks


class SentencePieceTokenizer(Tokenizer):
    """A trained SentencePiece model (see `tools/train_tokenizer.py`)."""

    def __init__(self, tokenizer_model: str):
        import sentencepiece

        _read_text_file("--tokenizer-model", tokenizer_model, "rb")  # missing, folder, unreadable
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


class Llama2Tokenizer(SentencePieceTokenizer):
    """Megatron-LM's Llama-2 conventions on a SentencePiece model (Meta's
    ``tokenizer.model``): each text starts with the model's bos piece (``<s>``),
    as Megatron-LM's Llama2Tokenizer tokenizes for text completion, and no eos
    follows; eod is the model's eos piece (``</s>``). `detokenize` drops bos and
    eos (SentencePiece decodes control pieces to nothing), so
    ``detokenize(tokenize(t)) == t`` wherever the model is lossless."""

    def __init__(self, tokenizer_model: str):
        super().__init__(tokenizer_model)
        self._bos = self._processor.bos_id()
        if self._bos < 0:
            raise ValueError(f"--tokenizer-model {tokenizer_model}: the model has no "
                             f"beginning-of-sentence piece, which Llama2Tokenizer puts before "
                             f"each text (trained with bos_id=-1; use SentencePieceTokenizer)")

    @property
    def bos(self) -> int:
        """Id put before every text."""
        return self._bos

    def tokenize(self, text: str) -> list[int]:
        return [self._bos] + super().tokenize(text)


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` through the `tokenizers` library (module docstring)."""

    EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")

    def __init__(self, tokenizer_model: str):
        from tokenizers import Tokenizer as FastTokenizer

        path = tokenizer_model
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise ValueError(f"--tokenizer-model {tokenizer_model}: no tokenizer.json there "
                                    f"(give the file or a local folder holding it)")
        try:
            self._tokenizer = FastTokenizer.from_file(path)
        except Exception as e:  # the library raises a bare Exception on bad files
            raise ValueError(f"--tokenizer-model {path}: not a Hugging Face tokenizer.json "
                             f"({e})") from None
        self._eod = self._find_eod(tokenizer_model, path)

    def _find_eod(self, tokenizer_model: str, path: str) -> int:
        config = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        names = list(self.EOD_CANDIDATES)
        if os.path.isfile(config):
            try:
                eos = json.loads(_read_text_file("--tokenizer-model", config)).get("eos_token")
            except (json.JSONDecodeError, RecursionError, AttributeError) as e:
                raise ValueError(f"--tokenizer-model {config}: not a JSON object ({e})") from None
            if isinstance(eos, dict):
                eos = eos.get("content")
            if eos:
                names.insert(0, eos)
        for name in names:
            token_id = self._tokenizer.token_to_id(name)
            if token_id is not None:
                return token_id
        raise ValueError(f"--tokenizer-model {tokenizer_model}: no end-of-document token: "
                         f"tokenizer_config.json names no eos_token in the vocabulary and none "
                         f"of {', '.join(self.EOD_CANDIDATES)} is in it")

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


# Megatron's TikTokenizer pre-tokenization patterns (--tiktoken-pattern).
TIKTOKEN_PATTERNS = {
    "v1": r"[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    "v2": (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
}
MAX_SPECIAL_TOKENS = 2**20  # Megatron reserves 1000
TIKTOKEN_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<mask>", "<pad>", "<cls>", "<sep>")


_RANKS_RULE = "each token once, with distinct integer ranks in [0, {})"


def _read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """BPE ranks (token bytes -> rank) from a local file in either tiktoken
    format: Megatron's JSON list of {rank, token_bytes, token_str}, or lines of
    "base64-token rank" (OpenAI's .tiktoken files, Llama 3's tokenizer.model).
    The file is parsed as data, nothing in it runs. Each token must appear once
    and the ranks be distinct integers in [0, MAX_VOCAB_SIZE); otherwise a
    ValueError naming the file and the line (or JSON entry) at fault."""
    import base64
    import binascii

    if not os.path.exists(path):
        raise ValueError(f"--tokenizer-model {path}: no such file (tiktoken BPE ranks are read "
                         f"from a local file; nothing is downloaded)")
    content = _read_text_file("--tokenizer-model", path, "rb")
    entries: list[tuple[str, bytes, object]] = []  # (where, token, rank)
    if content.lstrip()[:1] == b"[":
        try:
            listed = json.loads(content)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"--tokenizer-model {path}: not a tiktoken BPE ranks file (a JSON "
                             f"list of {{rank, token_bytes, token_str}}): {e}") from None
        for index, entry in enumerate(listed):
            where = f"--tokenizer-model {path}: JSON entry {index}"
            try:
                entries.append((where, base64.b64decode(entry["token_bytes"], validate=True),
                                entry["rank"]))
            except (binascii.Error, KeyError, TypeError, ValueError):
                raise ValueError(f"{where}: not a tiktoken BPE ranks file: expected {{rank, "
                                 f"token_bytes (base64), token_str}}, got {str(entry)[:80]}"
                                 ) from None
    else:
        for line_number, line in enumerate(content.split(b"\n"), start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"--tokenizer-model {path}:{line_number}"
            try:
                if len(fields) != 2:
                    raise ValueError(f"{len(fields)} fields")
                entries.append((where, base64.b64decode(fields[0], validate=True),
                                int(fields[1])))
            except ValueError:  # binascii.Error is one
                raise ValueError(f"{where}: not a tiktoken BPE ranks file: expected a "
                                 f"'base64-token rank' line, got {line[:80]!r}") from None
    if not entries:
        raise ValueError(f"--tokenizer-model {path}: holds no token (a tiktoken BPE ranks file "
                         f"gives {_RANKS_RULE.format(MAX_VOCAB_SIZE)})")
    ranks: dict[bytes, int] = {}
    used_ranks: set[int] = set()
    for where, token, rank in entries:
        fault = (f"rank {rank!r} is out of range" if type(rank) is not int
                 or not 0 <= rank < MAX_VOCAB_SIZE else
                 f"token {token!r} again" if token in ranks else
                 f"rank {rank} again" if rank in used_ranks else None)
        if fault is not None:
            raise ValueError(f"{where}: {fault}: the file must give "
                             f"{_RANKS_RULE.format(MAX_VOCAB_SIZE)}")
        ranks[token] = rank
        used_ranks.add(rank)
    return ranks


class _TiktokenEncoding(Tokenizer):
    """A ``tiktoken.Encoding`` of BPE `ranks` and `special_tokens` (name -> id):
    the text of a special token inside a document becomes its id (as in
    Megatron-LM); ``vocab_size`` is the largest id plus one."""

    def __init__(self, tokenizer_model: str, pattern: str, ranks: Mapping[bytes, int],
                 special_tokens: Mapping[str, int]):
        import tiktoken

        self._encoding = tiktoken.Encoding(
            name=os.path.basename(tokenizer_model), pat_str=pattern,
            mergeable_ranks=dict(ranks), special_tokens=dict(special_tokens))

    @property
    def vocab_size(self) -> int:
        return self._encoding.n_vocab

    def tokenize(self, text: str) -> list[int]:
        return self._encoding.encode(text, allowed_special="all")

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._encoding.decode([int(i) for i in ids])


class TikTokenizer(_TiktokenEncoding):
    """tiktoken BPE with Megatron's special-token layout (module docstring)."""

    def __init__(self, tokenizer_model: str, pattern: str = "v2", num_special_tokens: int = 1000):
        if pattern not in TIKTOKEN_PATTERNS:
            raise ValueError(f"--tiktoken-pattern must be v1 or v2, got {pattern!r}")
        if not len(TIKTOKEN_SPECIAL_TOKENS) <= num_special_tokens <= MAX_SPECIAL_TOKENS:
            raise ValueError(f"--tiktoken-num-special-tokens must be in "
                             f"[{len(TIKTOKEN_SPECIAL_TOKENS)}, {MAX_SPECIAL_TOKENS}] (each is a "
                             f"named token held in memory), got {num_special_tokens}")
        ranks = _read_tiktoken_ranks(tokenizer_model)
        shifted = {token: rank + num_special_tokens for token, rank in ranks.items()}
        specials = list(TIKTOKEN_SPECIAL_TOKENS) + [
            f"<SPECIAL_{i}>" for i in range(len(TIKTOKEN_SPECIAL_TOKENS), num_special_tokens)]
        super().__init__(tokenizer_model, TIKTOKEN_PATTERNS[pattern], shifted,
                         {t: i for i, t in enumerate(specials)})

    @property
    def eod(self) -> int:
        return TIKTOKEN_SPECIAL_TOKENS.index("</s>")


# Meta's Llama 3 tokenizer (github.com/meta-llama/llama3, llama/tokenizer.py), which
# Megatron-LM's Llama3Tokenizer wraps: its pre-tokenization pattern, and 256 special tokens
# numbered right after the N BPE ranks: the named ones at these offsets from N, every other
# offset <|reserved_special_token_K|> with K counting up from 0 (offset 255 is K = 250).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NUM_SPECIAL_TOKENS = 256
LLAMA3_NAMED_SPECIAL_TOKENS = {0: "<|begin_of_text|>", 1: "<|end_of_text|>",
                               6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "<|eot_id|>"}
# Meta's encoder cuts a text into pieces of 400,000 characters, cuts each run of more than
# 25,000 whitespace (str.isspace) or non-whitespace characters of a piece after every 25,000,
# and encodes the pieces one by one; cutting alike gives its ids on long documents too.
LLAMA3_PIECE_CHARS = 400_000
LLAMA3_RUN_CHARS = 25_000
# A run of more than LLAMA3_RUN_CHARS, matched from its first character only (the
# lookbehinds), so that finding them is linear in the text; re's \s is str.isspace.
_LLAMA3_LONG_RUN = re.compile(r"(?<!\s)\s{%d,}|(?<!\S)\S{%d,}"
                              % (LLAMA3_RUN_CHARS + 1, LLAMA3_RUN_CHARS + 1))


def _llama3_pieces(text: str) -> Iterator[str]:
    """The consecutive pieces of `text` that Meta's Llama 3 encoder encodes one by one."""
    for start in range(0, len(text), LLAMA3_PIECE_CHARS):
        piece = text[start:start + LLAMA3_PIECE_CHARS]
        cut = 0
        if len(piece) > LLAMA3_RUN_CHARS:
            for run in _LLAMA3_LONG_RUN.finditer(piece):
                for at in range(run.start() + LLAMA3_RUN_CHARS, run.end(), LLAMA3_RUN_CHARS):
                    yield piece[cut:at]
                    cut = at
        yield piece[cut:]


class Llama3Tokenizer(_TiktokenEncoding):
    """Megatron-LM's Llama3Tokenizer: Meta's Llama 3 tiktoken BPE file
    (``tokenizer.model``: "base64-token rank" lines, ranks 0..N-1), Llama 3's
    pre-tokenization pattern and its 256 special tokens at ids N..N+255
    (`LLAMA3_NAMED_SPECIAL_TOKENS`). Each text starts with bos
    ``<|begin_of_text|>`` (N) and no eos follows, as Megatron-LM tokenizes for
    text completion; eod is ``<|end_of_text|>`` (N+1); ``vocab_size`` is N + 256
    (128,256 for Llama 3's file). `detokenize` writes special tokens as their
    text, so ``detokenize(tokenize(t))`` is ``"<|begin_of_text|>" + t``."""

    def __init__(self, tokenizer_model: str):
        ranks = _read_tiktoken_ranks(tokenizer_model)
        largest = max(ranks.values())
        if largest != len(ranks) - 1:
            raise ValueError(f"--tokenizer-model {tokenizer_model}: the ranks of its {len(ranks)} "
                             f"tokens must be 0..{len(ranks) - 1}, as in Meta's file (Llama 3's "
                             f"special tokens take the ids after them), but one is {largest}")
        reserved = (f"<|reserved_special_token_{k}|>" for k in itertools.count())
        specials = {LLAMA3_NAMED_SPECIAL_TOKENS.get(offset) or next(reserved): len(ranks) + offset
                    for offset in range(LLAMA3_NUM_SPECIAL_TOKENS)}
        super().__init__(tokenizer_model, LLAMA3_PATTERN, ranks, specials)
        self._bos = specials["<|begin_of_text|>"]
        self._eod = specials["<|end_of_text|>"]

    @property
    def bos(self) -> int:
        """Id put before every text."""
        return self._bos

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        ids = [self._bos]
        for piece in _llama3_pieces(text):
            ids.extend(super().tokenize(piece))
        return ids


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


TOKENIZER_FLAGS = {
    "GPT2BPETokenizer": ("vocab_file", "merge_file"),
    "SentencePieceTokenizer": ("tokenizer_model",),
    "GPTSentencePieceTokenizer": ("tokenizer_model",),
    "NullTokenizer": ("vocab_size",),
    "HuggingFaceTokenizer": ("tokenizer_model",),
    "TikTokenizer": ("tokenizer_model",),
    "Llama2Tokenizer": ("tokenizer_model",),
    "Llama3Tokenizer": ("tokenizer_model",),
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
                    vocab_size: Optional[int] = None, tiktoken_pattern: str = "v2",
                    tiktoken_num_special_tokens: int = 1000,
                    gpt2_backend: str = "auto") -> Tokenizer:
    """The tokenizer named by ``--tokenizer-type``, checking the flags it needs.
    `gpt2_backend`: GPT2BPETokenizer's backend (auto, tiktoken, tokenizers, regex)."""
    check_tokenizer_flags(tokenizer_type, {"vocab_file": vocab_file, "merge_file": merge_file,
                                           "tokenizer_model": tokenizer_model,
                                           "vocab_size": vocab_size})
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file, gpt2_backend)
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type == "TikTokenizer":
        return TikTokenizer(tokenizer_model, tiktoken_pattern, tiktoken_num_special_tokens)
    if tokenizer_type == "Llama2Tokenizer":
        return Llama2Tokenizer(tokenizer_model)
    if tokenizer_type == "Llama3Tokenizer":
        return Llama3Tokenizer(tokenizer_model)
    return SentencePieceTokenizer(tokenizer_model)


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int = 128,
                      tensor_model_parallel_size: int = 1) -> int:
    """Megatron's embedding size: `vocab_size` rounded up to a multiple of
    ``--make-vocab-size-divisible-by`` x ``--tensor-model-parallel-size``."""
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple
