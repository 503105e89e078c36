"""Trains a SentencePiece model for ``--tokenizer-type SentencePieceTokenizer``.

    python tools/train_tokenizer.py --input corpus.jsonl --vocab-size 8000 \\
        --model-type bpe --output-prefix data/spm8k

Inputs are JSONL (``.jsonl``/``.json``, the ``--json-keys`` values of each
line; ``.gz`` too) or plain text (every other file); each non-empty line of
text is one training sentence. Writes ``{--output-prefix}.model`` and
``.vocab`` (one ``piece<TAB>score`` per line), atomically. The model is
lossless (identity normalization, whitespace kept, byte fallback for unseen
characters) and has ``</s>`` as eod. With the default ``--num-threads 1``
the same inputs and ``--seed`` give a byte-identical model.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import sys
import tempfile
from typing import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sr.data.preprocessing import expand_inputs  # noqa: E402


def _is_jsonl(path: str) -> bool:
    name = path[:-3] if path.endswith(".gz") else path
    return name.endswith((".jsonl", ".json"))


def training_sentences(paths: list[str], json_keys: list[str]) -> Iterator[str]:
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not _is_jsonl(path):
                    texts = [line]
                elif not line.strip():
                    continue
                else:
                    try:
                        record = json.loads(line)
                        texts = [record[k] for k in json_keys]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise ValueError(f"{path}:{line_number}: not a JSON object with keys "
                                         f"{json_keys} ({e})") from None
                for text in texts:
                    for sentence in str(text).split("\n"):
                        if sentence.strip():
                            yield sentence


def train(paths: list[str], output_prefix: str, vocab_size: int, model_type: str,
          json_keys: list[str], character_coverage: float, input_sentence_size: int,
          seed: int, num_threads: int) -> str:
    import sentencepiece

    model_bytes = io.BytesIO()  # in memory: no temporary path ends up inside the model
    sentencepiece.set_random_generator_seed(seed)  # sentence sampling and shuffling
    sentencepiece.SentencePieceTrainer.Train(
        sentence_iterator=training_sentences(paths, json_keys), model_writer=model_bytes,
        vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
        input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, byte_fallback=True,
        split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=num_threads,
        minloglevel=2)
    processor = sentencepiece.SentencePieceProcessor(model_proto=model_bytes.getvalue())
    vocab_lines = "".join(f"{processor.IdToPiece(i)}\t{processor.GetScore(i):g}\n"
                          for i in range(processor.GetPieceSize()))
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    _write_atomically(output_prefix + ".vocab", vocab_lines.encode("utf-8"))
    _write_atomically(output_prefix + ".model", model_bytes.getvalue())  # what users load, last
    return output_prefix + ".model"


def _write_atomically(path: str, content: bytes) -> None:
    fd, staging = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-",
                                   dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="files or globs (JSONL or text)")
    parser.add_argument("--json-keys", nargs="+", default=["text"])
    parser.add_argument("--output-prefix", required=True, help="writes {prefix}.model/.vocab")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--character-coverage", type=float, default=1.0)
    parser.add_argument("--input-sentence-size", type=int, default=2_000_000,
                        help="sample at most this many sentences")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--num-threads", type=int, default=1,
                        help="trainer threads; only 1 gives a bit-identical model on every run")
    args = parser.parse_args(argv)
    if args.vocab_size < 260:
        print(f"train_tokenizer.py: error: --vocab-size {args.vocab_size} must be >= 260 "
              f"(256 byte pieces plus the special pieces)", file=sys.stderr)
        return 1
    try:
        model = train(expand_inputs(args.input), args.output_prefix, args.vocab_size,
                      args.model_type, args.json_keys, args.character_coverage,
                      args.input_sentence_size, args.seed, args.num_threads)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"train_tokenizer.py: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {model} and {args.output_prefix}.vocab", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
