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

Nothing here imports torch: the preprocessing workers load this package alone.

Modules: `base` (the interface, file reading, NullTokenizer), `gpt2_bpe`,
`sentencepiece_model` (with Llama2Tokenizer), `huggingface`, `tiktoken_bpe`
(TikTokenizer, Llama3Tokenizer); this file maps ``--tokenizer-type`` to them.
"""
from __future__ import annotations

from typing import Mapping, Optional

from megatron_sr.data.tokenizers.base import MAX_VOCAB_SIZE, NullTokenizer, Tokenizer
from megatron_sr.data.tokenizers.gpt2_bpe import GPT2BPETokenizer
from megatron_sr.data.tokenizers.huggingface import HuggingFaceTokenizer
from megatron_sr.data.tokenizers.sentencepiece_model import Llama2Tokenizer, SentencePieceTokenizer
from megatron_sr.data.tokenizers.tiktoken_bpe import Llama3Tokenizer, TikTokenizer
__all__ = ["GPT2BPETokenizer", "HuggingFaceTokenizer", "Llama2Tokenizer", "Llama3Tokenizer",
           "MAX_VOCAB_SIZE", "NullTokenizer", "SentencePieceTokenizer", "TOKENIZER_FLAGS",
           "TOKENIZER_TYPES", "TikTokenizer", "Tokenizer", "build_tokenizer",
           "check_tokenizer_flags", "padded_vocab_size"]


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
