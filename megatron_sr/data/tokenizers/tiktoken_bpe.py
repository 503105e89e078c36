"""tiktoken BPE ranks files: Megatron's ``TikTokenizer`` and ``Llama3Tokenizer``."""
from __future__ import annotations

import itertools
import json
import os
import re
from typing import Iterator, Mapping, Sequence

from megatron_sr.data.tokenizers.base import MAX_VOCAB_SIZE, Tokenizer, read_tokenizer_file


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
    content = read_tokenizer_file("--tokenizer-model", path, "rb")
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
