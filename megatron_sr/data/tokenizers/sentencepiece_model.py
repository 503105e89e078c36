"""SentencePiece models: ``SentencePieceTokenizer``, ``GPTSentencePieceTokenizer`` and
``Llama2Tokenizer``."""
from __future__ import annotations

from typing import Sequence

from megatron_sr.data.tokenizers.base import Tokenizer, read_tokenizer_file


class SentencePieceTokenizer(Tokenizer):
    """A trained SentencePiece model (see `tools/train_tokenizer.py`)."""

    def __init__(self, tokenizer_model: str):
        import sentencepiece

        read_tokenizer_file("--tokenizer-model", tokenizer_model, "rb")  # missing, folder, unreadable
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
