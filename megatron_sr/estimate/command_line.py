"""From a `pretrain_gpt.py` command line to estimates and the report
`tools/estimate.py` prints: the estimator's own flags, the jobs they describe
(validated by the same code as training), and one call for the tool."""
from __future__ import annotations

import argparse
import copy
from typing import Optional

from megatron_sr.config import JobConfig, build_parser, job_config_from_args
from megatron_sr.data.tokenizers import build_tokenizer
from megatron_sr.estimate.job import JobEstimate, estimate_job
from megatron_sr.estimate.report import format_comparison, format_estimate
from megatron_sr.optimizer.param_buffer import DEFAULT_BUCKET_SIZE
from megatron_sr.precision.strategies import STRATEGIES

GPT2_VOCAB_SIZE = 50257
"""The tokenizer vocabulary assumed when the command names no readable tokenizer files."""


def add_estimate_args(parser: argparse.ArgumentParser) -> None:
    """The estimator's own flags, added to `pretrain_gpt.py`'s parser."""
    group = parser.add_argument_group("estimate")
    sizes = group.add_mutually_exclusive_group()
    sizes.add_argument("--world-size", type=int,
                       help="Ranks of the job (what torchrun would start).")
    sizes.add_argument("--data-parallel-size", type=int,
                       help="Data-parallel size; world size = TP x PP x this (default 1).")
    group.add_argument("--compare", nargs="*", choices=tuple(STRATEGIES), metavar="PRECISION",
                       help="Estimate these --precision strategies (default: all) side by side.")
    group.add_argument("--markdown", action="store_true",
                       help="Print the --compare table as Markdown.")
    group.add_argument("--bucket-size", type=int, default=DEFAULT_BUCKET_SIZE,
                       help="Elements per gradient-buffer bucket.")


def _tokenizer_vocab_size(args: argparse.Namespace) -> tuple[int, bool]:
    """(the tokenizer's vocabulary size, whether it was read from the command's tokenizer);
    without readable tokenizer files: --vocab-size, else GPT-2's 50257."""
    try:
        tokenizer = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file,
                                    args.tokenizer_model, args.vocab_size)
    except (ValueError, OSError):
        return (args.vocab_size or GPT2_VOCAB_SIZE), False
    return tokenizer.vocab_size, True


def jobs_from_args(args: argparse.Namespace) -> list[JobConfig]:
    """Validated jobs (vocabulary padded) for parsed `pretrain_gpt.py` + estimator flags:
    one, or with --compare one per strategy it names (all when it names none).
    Validation is `job_config_from_args`'s, so a bad layout raises the same
    ValueError as `pretrain_gpt.py`. Flags a training run needs but an estimate
    does not get placeholders: --lr, --train-iters, --mock-data."""
    args = copy.copy(args)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if args.world_size is None:
        dp = 1 if args.data_parallel_size is None else args.data_parallel_size
        if dp < 1:
            raise ValueError(f"--data-parallel-size must be >= 1, got {dp}")
        args.world_size = tp * pp * dp
    if args.world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {args.world_size}")
    if args.lr is None:
        args.lr = 1e-4
    if args.train_iters is None and args.train_samples is None:
        args.train_iters = 1
    if not args.data_path:
        args.mock_data = True
    vocab_size, from_tokenizer = _tokenizer_vocab_size(args)
    if not from_tokenizer:
        args.tokenizer_type, args.vocab_size = "NullTokenizer", vocab_size
    variants = [args]
    if args.compare is not None:
        variants = []
        for name in args.compare or STRATEGIES:
            strategy = STRATEGIES[name]
            variant = copy.copy(args)
            variant.precision, variant.bf16 = name, False
            if not strategy.is_pure_bf16:
                variant.optimizer_state_dtype = None
            variants.append(variant)
    return [job_config_from_args(variant, variant.world_size).with_vocab_size(vocab_size)
            for variant in variants]


def estimate_from_argv(argv: Optional[list[str]]) -> tuple[argparse.Namespace, list[JobEstimate]]:
    """Parses a `pretrain_gpt.py` command line (+ estimator flags) and estimates it."""
    args = build_parser(extra_args_provider=add_estimate_args).parse_args(argv)
    return args, [estimate_job(job, args.bucket_size) for job in jobs_from_args(args)]


def report_from_argv(argv: Optional[list[str]]) -> str:
    """What `tools/estimate.py` prints for `argv`: the per-stage report, or with
    --compare the strategies side by side. Raises ValueError on a bad layout."""
    args, estimates = estimate_from_argv(argv)
    if args.compare is not None:
        return format_comparison(estimates, markdown=args.markdown)
    return format_estimate(estimates[0])
