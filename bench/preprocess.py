"""Tokenization throughput of tools/preprocess_data.py: MB/s at 1 and N workers,
for each GPT2BPETokenizer backend.

    python bench/preprocess.py [--input corpus.jsonl] [--workers 1 2] [--repeats 2]
                               [--backends tiktoken tokenizers regex]

Runs the preprocessing engine on the same input once per (backend, worker
count) (interleaved, best of ``--repeats``), checks that every run wrote
identical files, and prints MB/s, the ratio to 1 worker of the same backend,
the ratio to the regex backend at the same worker count, and the CPU seconds
each run used (its own and its workers'). Default input: the sample corpus
(GPT-2 BPE, --append-eod). Targets: >= 1.7x at 2 workers on 2 free cores;
a library backend >= 5x the regex one per worker. The load average
printed first says whether the cores were free, and the CPU seconds separate
parallel overhead (worker start-up, per-worker merge caches) from contention.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import resource
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sr.data import sample_files  # noqa: E402
from megatron_sr.data.preprocessing import TokenizerSpec, preprocess  # noqa: E402


def digest(prefix: str) -> str:
    sha = hashlib.sha256()
    for suffix in (".bin", ".idx"):
        with open(prefix + suffix, "rb") as f:
            sha.update(f.read())
    return sha.hexdigest()


def cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (the pool's workers)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", default=None, help="JSONL (default: the sample corpus)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs each")
    parser.add_argument("--backends", nargs="+", default=["tiktoken", "tokenizers", "regex"],
                        choices=("tiktoken", "tokenizers", "regex"),
                        help="GPT2BPETokenizer backends")
    args = parser.parse_args(argv)
    source = args.input or sample_files.sample_corpus()
    counts = sorted(set(args.workers) | {1})
    runs = [(backend, workers) for backend in args.backends for workers in counts]
    best_seconds = {run: float("inf") for run in runs}
    best_cpu_seconds = {run: float("inf") for run in runs}
    load_before = os.getloadavg()[0]
    digests = set()
    megabytes = 0.0
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeats):
            for backend, workers in runs:
                spec = TokenizerSpec("GPT2BPETokenizer", *sample_files.gpt2_bpe_files(),
                                     gpt2_backend=backend)
                prefix = os.path.join(folder, f"{backend}_w{workers}")
                cpu_before = cpu_seconds()
                stats = preprocess([source], prefix, spec, append_eod=True, workers=workers,
                                   log=None)
                run = (backend, workers)
                best_seconds[run] = min(best_seconds[run], stats.seconds)
                best_cpu_seconds[run] = min(best_cpu_seconds[run], cpu_seconds() - cpu_before)
                megabytes = stats.input_bytes / 1e6
                digests.add(digest(f"{prefix}_text_document"))
    print(f"input {source}: {megabytes:.2f} MB, GPT2BPETokenizer, best of {args.repeats}, "
          f"{os.cpu_count()} CPUs, load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after")
    for backend, workers in runs:
        rate = megabytes / best_seconds[backend, workers]
        speedup = best_seconds[backend, 1] / best_seconds[backend, workers]
        versus = ""
        if "regex" in args.backends:
            versus = f"   x{best_seconds['regex', workers] / best_seconds[backend, workers]:.2f} " \
                     f"vs regex"
        print(f"{backend:>10} workers={workers}: {rate:6.2f} MB/s   x{speedup:.2f} vs 1 worker"
              f"{versus}   {best_cpu_seconds[backend, workers]:.2f} CPU s")
    print(f"outputs identical across backends and worker counts: {len(digests) == 1}")
    return 0 if len(digests) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
