"""A Hugging Face ``tokenizer.json`` (``HuggingFaceTokenizer``)."""
from __future__ import annotations

import json
import os
from typing import Sequence

from megatron_sr.data.tokenizers.base import Tokenizer, read_tokenizer_file


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
                eos = json.loads(read_tokenizer_file("--tokenizer-model", config)).get("eos_token")
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
