"""GPT-2's byte-level BPE (``GPT2BPETokenizer``) on tiktoken, tokenizers or a regex BPE."""
from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from typing import Mapping, Sequence

from megatron_sr.data.tokenizers.base import Tokenizer, read_tokenizer_file


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


def _read_json_vocab(vocab_file: str) -> dict[str, int]:
    """encoder.json / vocab.json: a JSON object whose ids are exactly 0 .. N-1, each once."""
    try:
        vocab = json.loads(read_tokenizer_file("--vocab-file", vocab_file))
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
    for line_number, line in enumerate(read_tokenizer_file("--merge-file", merge_file).split("\n"),
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
