"""Concatenates Megatron ``.bin``/``.idx`` datasets into one.

    python tools/merge_datasets.py --input data/part1_text_document data/shards/ \\
        --output-prefix data/all_text_document

Each ``--input`` is a dataset prefix or a directory, which contributes every
prefix in it (every ``X.idx`` with an ``X.bin``), sorted by name. Sequences
and documents are appended in that order; all inputs must share one dtype.
The output is written under temporary names and renamed when complete.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sr.data.indexed_dataset import (  # noqa: E402
    IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError, exists)


def expand_prefixes(inputs: list[str]) -> list[str]:
    prefixes: list[str] = []
    for entry in inputs:
        if os.path.isdir(entry):
            found = sorted(os.path.join(entry, name[:-len(".idx")]) for name in os.listdir(entry)
                           if name.endswith(".idx") and exists(os.path.join(entry, name[:-4])))
            if not found:
                raise FileNotFoundError(f"--input {entry}: directory holds no .bin/.idx pair")
            prefixes.extend(found)
        elif exists(entry):
            prefixes.append(entry)
        else:
            raise FileNotFoundError(f"--input {entry}: neither a directory nor a prefix with "
                                    f"{entry}.bin and {entry}.idx")
    return prefixes


def merge(prefixes: list[str], output_prefix: str) -> IndexedDataset:
    if os.path.abspath(output_prefix) in {os.path.abspath(p) for p in prefixes}:
        raise ValueError(f"--output-prefix {output_prefix} is also an input")
    dtype = IndexedDataset(prefixes[0]).dtype
    with IndexedDatasetBuilder(output_prefix, dtype) as builder:
        for prefix in prefixes:
            builder.add_index(prefix)
    return IndexedDataset(output_prefix)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True,
                        help="dataset prefixes and/or directories of datasets")
    parser.add_argument("--output-prefix", required=True, help="writes {prefix}.bin/.idx")
    args = parser.parse_args(argv)
    try:
        merged = merge(expand_prefixes(args.input), args.output_prefix)
    except (IndexedDatasetError, ValueError, FileNotFoundError) as e:
        print(f"merge_datasets.py: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output_prefix}.bin/.idx: {len(merged)} sequences, "
          f"{len(merged.document_indices) - 1} documents, {merged.num_tokens} tokens",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
