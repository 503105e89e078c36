"""Tokenizes JSONL documents into Megatron ``.bin``/``.idx`` datasets.

Flags follow Megatron-LM's ``tools/preprocess_data.py``. For each key of
``--json-keys`` it writes ``{--output-prefix}_{key}_document.bin/.idx``,
one sequence per non-empty document, byte-identical for any ``--workers``.
See `megatron_sr.data.preprocessing` for the full contract (invalid lines,
empty documents, atomic outputs).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type GPT2BPETokenizer --vocab-file encoder.json --merge-file vocab.bpe \\
        --append-eod --workers 2

Exit status: 0 on success, 1 on invalid input or a bad flag (one line
naming the file and line, or the flag); 130 on SIGINT and 143 on SIGTERM,
after removing this run's temporary files (no output is written then).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sr.data.preprocessing import (  # noqa: E402
    InvalidInputError, TokenizerSpec, output_prefix_for_key, preprocess)
from megatron_sr.data.tokenizers import TOKENIZER_TYPES  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, nargs="+",
                       help="JSONL file(s) or glob(s), one document per line; .gz accepted")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="keys to extract; one output dataset per key")
    group.add_argument("--skip-invalid", action="store_true",
                       help="count and skip malformed lines instead of failing")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    group.add_argument("--vocab-file", default=None, help="GPT-2 encoder.json / vocab.json")
    group.add_argument("--merge-file", default=None, help="GPT-2 vocab.bpe / merges.txt")
    group.add_argument("--tokenizer-model", default=None,
                       help="SentencePiece model file (the SentencePiece types, Llama2Tokenizer); "
                            "HuggingFaceTokenizer: tokenizer.json or a local folder holding it; "
                            "TikTokenizer, Llama3Tokenizer: a local tiktoken BPE ranks file")
    group.add_argument("--tiktoken-pattern", choices=("v1", "v2"), default="v2",
                       help="TikTokenizer pre-tokenization regex")
    group.add_argument("--tiktoken-num-special-tokens", type=int, default=1000,
                       help="TikTokenizer: ids reserved for special tokens")
    group.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer vocabulary size")
    group.add_argument("--append-eod", action="store_true",
                       help="append the end-of-document token to every document")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True,
                       help="writes {prefix}_{key}_document.bin/.idx")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenization processes")
    group.add_argument("--log-interval", type=int, default=1000,
                       help="print a progress line every this many documents")
    return parser.parse_args(argv)


class Terminated(Exception):
    """SIGTERM arrived: unwinds `preprocess`, which removes its temporary files."""


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    args = parse_args(argv)
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def _run(args: argparse.Namespace) -> int:
    spec = TokenizerSpec(args.tokenizer_type, args.vocab_file, args.merge_file,
                         args.tokenizer_model, args.vocab_size, args.tiktoken_pattern,
                         args.tiktoken_num_special_tokens)
    try:
        stats = preprocess(args.input, args.output_prefix, spec, json_keys=args.json_keys,
                           append_eod=args.append_eod, workers=args.workers,
                           skip_invalid=args.skip_invalid, log_interval=args.log_interval,
                           log=sys.stderr)
    except (InvalidInputError, ValueError, FileNotFoundError) as e:
        print(f"preprocess_data.py: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # an input that cannot be read
        print(f"preprocess_data.py: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminated) as e:
        name = "SIGINT" if isinstance(e, KeyboardInterrupt) else "SIGTERM"
        print(f"preprocess_data.py: stopped by {name}; its temporary files are removed and "
              f"nothing was written", file=sys.stderr)
        return 128 + (signal.SIGINT if name == "SIGINT" else signal.SIGTERM)
    megabytes = stats.input_bytes / 1e6
    print(f"read {megabytes:.2f} MB in {stats.seconds:.1f} s "
          f"({megabytes / max(stats.seconds, 1e-9):.2f} MB/s); "
          f"skipped {stats.invalid_lines} invalid lines", file=sys.stderr)
    for key in args.json_keys:
        print(f"wrote {output_prefix_for_key(args.output_prefix, key)}.bin/.idx: "
              f"{stats.documents[key]} documents, {stats.tokens[key]} tokens; "
              f"skipped {stats.empty_documents[key]} empty documents", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
