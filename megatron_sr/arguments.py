"""Megatron-LM-style command line: parse -> validate -> typed configs.

Flag names are Megatron-LM's wherever Megatron has the flag, so a Megatron
launch script runs here with at most its unsupported flags removed. There is
no global args object: the result is a `JobConfig` that callers pass on.

The flow in `pretrain_gpt.py`:

    job = parse_args(argv, world_size)          # validated; job.model.vocab_size == 0
    tokenizer = build_tokenizer(job.data.tokenizer_type, job.data.vocab_file, ...)
    job = job.with_vocab_size(tokenizer.vocab_size)
                                                # now padded to a multiple of
                                                # --make-vocab-size-divisible-by x TP
    model = build_model(job.model, job.parallel, ...)

Tools that take the same flags plus their own (`tools/estimate.py`) reuse the
parser and the validation, so they give the same message for the same mistake:

    args = build_parser(extra_args_provider=add_estimate_args).parse_args(argv)
    job = job_config_from_args(args, world_size=args.world_size)

Errors: argparse itself rejects unknown flags, bad choices and bad numbers
(SystemExit with usage, as every argparse program); `job_config_from_args`
raises ValueError naming the flag(s) at fault for everything else.

Decisions where Megatron-LM leaves room:
- Required: --num-layers, --hidden-size, --num-attention-heads, --seq-length,
  --lr (no silent default learning rate), one of --train-iters/--train-samples,
  one of --data-path/--mock-data, and the files of --tokenizer-type.
- `--precision` (default bf16-sr) picks the strategy of
  `megatron_sr.precision.strategies`; its `param_dtype` is
  `ModelConfig.params_dtype`. `--bf16` means `--precision bf16-mixed`; `--fp16`
  is rejected.
- `--swiglu` without `--ffn-hidden-size`: 4 x hidden x 2/3 rounded down to a
  multiple of 64 (Megatron's rule: the parameter count of a 4h GELU MLP);
  a hidden size below 48 must give --ffn-hidden-size.
- `--sequence-parallel` with TP=1 is ignored with a warning, as in Megatron.
- `--train-samples N` trains N // global batch iterations; under
  `--step-batch-size-schedule`, steps until N samples are consumed (the
  last step may pass N, as Megatron counts).
- `--step-batch-size-schedule` with `--global-batch-size`: accepted when the
  latter is the schedule's largest batch size (Megatron's GPT-3 script gives
  both; Megatron itself refuses the pair).
- `--lr-*-samples` (with `--train-samples`) are converted to iterations, the
  nearest when not a multiple of the global batch size (with a notice): the
  schedule counts iterations.
- `--finetune` needs `--load` and implies `--no-load-optim --no-load-rng`.
"""
from __future__ import annotations

import argparse
import decimal
import math
import os
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Optional

from megatron_sr.config import (DataConfig, ModelConfig, OptimizerConfig, ParallelConfig,
                                TrainingConfig, global_batch_size_at, validate_parallel_layout)
from megatron_sr.data.gpt_dataset import memory_bytes, parse_data_path, parse_split
from megatron_sr.data.tokenizers import (MAX_VOCAB_SIZE, TOKENIZER_TYPES, check_tokenizer_flags,
                                         padded_vocab_size)
from megatron_sr.optimizer.lr_schedules import DECAY_STYLES, WSD_DECAY_STYLES, LRSchedule
from megatron_sr.precision.strategies import (DEFAULT_STRATEGY, GRAD_ROUNDINGS, STRATEGIES,
                                              PrecisionStrategy, get_strategy, with_grad_buffer)

EXIT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")  # --exit-signal

@dataclass(frozen=True)
class JobConfig:
    """One training job's configuration: what `parse_args` returns, already
    validated, and what `pretrain_gpt.py` and `tools/estimate.py` hand to the
    parts they build.

    The vocabulary is known only once the tokenizer is built, so `model.vocab_size`
    is 0 (unknown) until `with_vocab_size(tokenizer.vocab_size)` returns the job
    with the padded size filled in; build the model only from that job.
    `training.global_batch_size` and `training.train_iters` are always set.
    """

    model: ModelConfig
    parallel: ParallelConfig
    optimizer: OptimizerConfig
    data: DataConfig
    training: TrainingConfig
    world_size: int
    make_vocab_size_divisible_by: int = 128
    unpadded_vocab_size: Optional[int] = None  # the tokenizer's, once known
    # One line per accepted Megatron flag that changes nothing here, saying what
    # happens instead; `pretrain` prints them on rank 0.
    notices: tuple[str, ...] = ()

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.parallel.tensor_model_parallel_size
                                   * self.parallel.pipeline_model_parallel_size)

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per data-parallel rank per optimizer step."""
        return self.training.global_batch_size // (self.training.micro_batch_size
                                                   * self.data_parallel_size)

    def with_vocab_size(self, vocab_size: int) -> "JobConfig":
        """A copy whose `model.vocab_size` is the tokenizer's `vocab_size` padded to a
        multiple of --make-vocab-size-divisible-by x --tensor-model-parallel-size."""
        if vocab_size < 1:
            raise ValueError(f"tokenizer vocabulary size must be >= 1, got {vocab_size}")
        padded = padded_vocab_size(vocab_size, self.make_vocab_size_divisible_by,
                                   self.parallel.tensor_model_parallel_size)
        table_bytes = (padded // self.parallel.tensor_model_parallel_size * self.model.hidden_size
                       * self.model.params_dtype.itemsize)
        if table_bytes > memory_bytes():
            raise ValueError(f"the tokenizer's {vocab_size} ids (--tokenizer-type, --vocab-size) "
                             f"need an embedding of {table_bytes / 2**30:.0f} GiB per "
                             f"tensor-parallel rank, more than this machine's memory "
                             f"({memory_bytes() / 2**30:.0f} GiB)")
        return replace(self, model=replace(self.model, vocab_size=padded),
                       unpadded_vocab_size=vocab_size)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _add_network_size_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("network size")
    group.add_argument("--num-layers", type=int, help="Number of transformer layers (required).")
    group.add_argument("--hidden-size", type=int, help="Transformer hidden size (required).")
    group.add_argument("--ffn-hidden-size", type=int,
                       help="MLP hidden size. Default 4 x hidden size; with --swiglu, "
                            "4 x hidden size x 2/3 rounded down to a multiple of 64.")
    group.add_argument("--num-attention-heads", type=int, help="Attention heads (required).")
    group.add_argument("--max-position-embeddings", type=int,
                       help="Learned position table size. Default --seq-length.")
    group.add_argument("--position-embedding-type", choices=("learned_absolute", "rope"),
                       default=ModelConfig.position_embedding_type)
    group.add_argument("--rotary-base", type=float, default=ModelConfig.rotary_base,
                       help="Base of the rotary frequencies (rope only).")
    group.add_argument("--rotary-percent", type=float, default=ModelConfig.rotary_percent,
                       help="Fraction of each head's features RoPE rotates, in (0, 1].")
    group.add_argument("--rotary-interleaved", action="store_true",
                       help="RoPE rotates (even, odd) feature pairs instead of the two halves.")
    group.add_argument("--use-rope-scaling", action="store_true",
                       help="Llama-3.x RoPE frequency scaling (original context 8192).")
    group.add_argument("--rope-scaling-factor", type=float,
                       default=ModelConfig.rope_scaling_factor,
                       help="Factor of --use-rope-scaling.")
    group.add_argument("--group-query-attention", action="store_true",
                       help="Grouped-query attention: --num-query-groups key/value heads.")
    group.add_argument("--num-query-groups", type=int,
                       help="Key/value heads with --group-query-attention (1: multi-query).")
    group.add_argument("--kv-channels", type=int,
                       help="Head dimension. Default --hidden-size / --num-attention-heads.")
    group.add_argument("--qk-layernorm", action="store_true",
                       help="Normalize each head's queries and keys (--normalization's kind).")
    group.add_argument("--apply-layernorm-1p", action="store_true",
                       help="Norm weights are stored as gamma - 1 (initialized to 0).")
    group.add_argument("--normalization", choices=("LayerNorm", "RMSNorm"),
                       default=ModelConfig.normalization)
    group.add_argument("--norm-epsilon", "--layernorm-epsilon", dest="norm_epsilon", type=float,
                       default=ModelConfig.layernorm_epsilon, help="Epsilon of the norms.")
    group.add_argument("--swiglu", action="store_true", help="SwiGLU MLP instead of GELU.")
    group.add_argument("--disable-bias-linear", action="store_true",
                       help="No biases in the linear layers.")
    group.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                       help="Separate input embedding and output layer weights.")
    group.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                       help="Pad the vocabulary to a multiple of this x "
                            "--tensor-model-parallel-size.")


def _add_regularization_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("regularization")
    group.add_argument("--attention-dropout", type=float, default=ModelConfig.attention_dropout)
    group.add_argument("--hidden-dropout", type=float, default=ModelConfig.hidden_dropout)
    group.add_argument("--weight-decay", type=float, default=OptimizerConfig.weight_decay,
                       help="AdamW decoupled weight decay (not applied to biases and norms).")
    group.add_argument("--clip-grad", type=float, default=OptimizerConfig.clip_grad,
                       help="Global gradient-norm clip; 0 disables.")
    group.add_argument("--adam-beta1", type=float, default=OptimizerConfig.adam_beta1)
    group.add_argument("--adam-beta2", type=float, default=OptimizerConfig.adam_beta2)
    group.add_argument("--adam-eps", type=float, default=OptimizerConfig.adam_eps)


def _add_training_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--micro-batch-size", type=int, default=TrainingConfig.micro_batch_size,
                       help="Samples per forward/backward on one data-parallel rank.")
    group.add_argument("--global-batch-size", type=int,
                       help="Samples per optimizer step over all ranks; a multiple of "
                            "--micro-batch-size x data-parallel size (the default).")
    group.add_argument("--train-iters", type=int,
                       help="Optimizer steps to train (this or --train-samples).")
    group.add_argument("--train-samples", type=int,
                       help="Samples to train on (this or --train-iters).")
    group.add_argument("--exit-interval", type=int,
                       help="Save (with --save) and exit when the iteration is a multiple of this.")
    group.add_argument("--exit-duration-in-mins", type=float,
                       help="Save (with --save) and exit after this many minutes since "
                            "the job started (set-up included).")
    group.add_argument("--exit-signal-handler", action="store_true",
                       help="Accepted for Megatron-LM scripts: here the handler is always on "
                            "(SIGTERM and --exit-signal save with --save and exit after the "
                            "current step).")
    group.add_argument("--exit-signal", choices=EXIT_SIGNALS, default=TrainingConfig.exit_signal,
                       help="A signal that, like SIGTERM, makes every rank save (with --save) "
                            "and exit after the current step, e.g. SIGUSR1 sent by Slurm's "
                            "`#SBATCH --signal=USR1@900` ahead of the time limit.")
    group.add_argument("--check-weight-hash-across-dp-replicas-interval", type=int,
                       help="Every this many iterations, hash every parameter on every rank "
                            "and stop with an error naming the parameter and the ranks when "
                            "the copies held by data-parallel replicas, or by tensor-parallel "
                            "ranks of a parameter TP does not split, differ (default: never).")
    group.add_argument("--recompute-granularity", choices=("full", "selective"),
                       help="Activation recomputation: whole layers, or the attention core.")
    group.add_argument("--recompute-activations", action="store_true",
                       help="Same as --recompute-granularity selective.")
    group.add_argument("--recompute-method", choices=("uniform", "block"),
                       help="With --recompute-granularity full: checkpoint groups of "
                            "--recompute-num-layers layers (uniform, default) or only the first "
                            "--recompute-num-layers layers of each pipeline chunk (block).")
    group.add_argument("--recompute-num-layers", type=int,
                       help="Layers per group (uniform) or recomputed layers per chunk (block); "
                            "default 1.")
    group.add_argument("--rampup-batch-size", nargs=3, type=int,
                       metavar=("START", "INCREMENT", "SAMPLES"),
                       help="Grow the global batch size from START by INCREMENT up to "
                            "--global-batch-size, in equal steps over the first SAMPLES samples.")
    group.add_argument("--step-batch-size-schedule", nargs="+", metavar="TOKENS:BATCH",
                       help="Global batch size by tokens trained: 'TOKENS:BATCH TOKENS:BATCH ...' "
                            "(one word or several, space- or comma-separated: a launch script's "
                            "unquoted array splits it; counts may end in K, M, B or T for 1e3 to "
                            "1e12), the first at 0 tokens, thresholds increasing; a step uses the "
                            "batch size of the last threshold reached (tokens / --seq-length "
                            "samples consumed). --global-batch-size may be omitted; given, it must "
                            "be the largest batch size of the schedule. Excludes "
                            "--rampup-batch-size.")
    group.add_argument("--calculate-per-token-loss", action="store_true",
                       help="Average the loss over the step's loss tokens (all micro-batches and "
                            "data-parallel ranks together) instead of averaging per-micro-batch "
                            "means; they differ only when --eod-mask-loss masks tokens (then the "
                            "step's micro-batches are read ahead to count them).")
    fusion = group.add_mutually_exclusive_group()
    fusion.add_argument("--gradient-accumulation-fusion", action="store_true",
                        help="The linear layers' wgrad GEMMs add into the gradient buffer "
                             "directly (one BF16 rounding per micro-batch instead of two; with "
                             "an FP32 buffer the product is not rounded to BF16: on a GPU this "
                             "needs apex), saving a weight-sized write and read per weight and "
                             "micro-batch. Off by default (Megatron-LM's default is on): it "
                             "changes the bits of bf16-mixed runs and of runs with several "
                             "micro-batches per step. Not with amp.")
    fusion.add_argument("--no-gradient-accumulation-fusion", action="store_true",
                        help="Megatron's flag: the default here.")
    group.add_argument("--max-skipped-iterations", type=int,
                       default=TrainingConfig.max_skipped_iterations,
                       help="Stop after this many consecutive steps skipped for NaN/Inf gradients.")


def _add_initialization_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("initialization")
    group.add_argument("--seed", type=int, default=TrainingConfig.seed,
                       help="Seed of weight init, dropout, data order and the SR bits.")
    group.add_argument("--init-method-std", type=float, default=ModelConfig.init_method_std,
                       help="Standard deviation of the normal weight init.")


def _add_learning_rate_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("learning rate")
    group.add_argument("--lr", type=float, help="Peak learning rate (required).")
    group.add_argument("--min-lr", type=float, default=OptimizerConfig.min_lr,
                       help="The decay ends here; floor of every style except constant.")
    group.add_argument("--lr-decay-style", choices=DECAY_STYLES,
                       default=OptimizerConfig.lr_decay_style)
    group.add_argument("--lr-decay-iters", type=int,
                       help="Iterations from 0 to the end of the decay. Default: the run's length.")
    group.add_argument("--lr-decay-samples", type=int,
                       help="--lr-decay-iters in samples (with --train-samples).")
    group.add_argument("--lr-warmup-iters", type=int, default=OptimizerConfig.lr_warmup_iters,
                       help="Linear warmup iterations.")
    group.add_argument("--lr-warmup-samples", type=int,
                       help="--lr-warmup-iters in samples (with --train-samples).")
    group.add_argument("--lr-warmup-fraction", type=float,
                       help="Warmup as a fraction of the decay iterations, in [0, 1).")
    group.add_argument("--decoupled-lr", type=float,
                       help="Peak learning rate of the input embedding and output layer.")
    group.add_argument("--decoupled-min-lr", type=float,
                       help="--min-lr of the input embedding and output layer.")
    group.add_argument("--lr-warmup-init", type=float, default=OptimizerConfig.lr_warmup_init,
                       help="Learning rate at iteration 0 of the warmup.")
    group.add_argument("--lr-wsd-decay-iters", type=int,
                       help="WSD: length of the final decay, which ends at --lr-decay-iters.")
    group.add_argument("--lr-wsd-decay-samples", type=int,
                       help="--lr-wsd-decay-iters in samples (with --train-samples).")
    group.add_argument("--lr-wsd-decay-style", choices=WSD_DECAY_STYLES,
                       default=OptimizerConfig.lr_wsd_decay_style)
    group.add_argument("--override-opt-param-scheduler", "--override-opt_param-scheduler",
                       dest="override_opt_param_scheduler", action="store_true",
                       help="On resume, keep this run's schedule flags over the checkpoint's.")
    group.add_argument("--use-checkpoint-opt-param-scheduler",
                       "--use-checkpoint-opt_param-scheduler",
                       dest="use_checkpoint_opt_param_scheduler", action="store_true",
                       help="On resume, continue the checkpoint's schedule, ignoring these flags.")


def _add_checkpointing_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("checkpointing")
    group.add_argument("--save", help="Directory to save checkpoints to.")
    group.add_argument("--load", help="Directory to resume from (its latest checkpoint).")
    group.add_argument("--save-interval", type=int, help="Save every this many iterations.")
    group.add_argument("--no-load-optim", action="store_true",
                       help="Do not load the optimizer state from --load.")
    group.add_argument("--no-load-rng", action="store_true",
                       help="Do not load the RNG states (python, numpy, torch, dropout) from "
                            "--load; the SR bits follow the optimizer step, restored with the "
                            "optimizer state.")
    group.add_argument("--finetune", action="store_true",
                       help="Load only the model from --load and start at iteration 0 "
                            "(implies --no-load-optim --no-load-rng).")
    group.add_argument("--ckpt-format", choices=("torch_dist", "torch"), default="torch_dist",
                       help="torch_dist: torch.distributed.checkpoint, every rank writes what it "
                            "owns, loads at any TP/PP/DP layout; torch: one file per TP/PP "
                            "rank (Megatron's legacy layout), loads at the same TP/PP. --load "
                            "reads either.")
    group.add_argument("--async-save", action="store_true",
                       help="With --ckpt-format torch_dist: write checkpoints in the "
                            "background; the next save and the end of training wait for it.")
    group.add_argument("--override-existing-checkpoints", action="store_true",
                       help="Allow --save to name a directory holding checkpoints of another "
                            "run (one that is not also --load): its tracker and its iterations "
                            "of the same numbers get replaced.")


def _add_mixed_precision_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("mixed precision")
    group.add_argument("--precision", choices=tuple(STRATEGIES),
                       help=f"Precision strategy (default {DEFAULT_STRATEGY}); see docs/DESIGN.md.")
    group.add_argument("--bf16", action="store_true",
                       help="Megatron's flag: same as --precision bf16-mixed.")
    group.add_argument("--fp16", action="store_true",
                       help="Refused with the reason: megatron_sr trains in bf16 "
                            "(--bf16, --precision).")
    group.add_argument("--optimizer-state-dtype", choices=("bf16", "fp32"),
                       help="Adam m and v dtype for the pure-bf16 strategies (default bf16).")
    group.add_argument("--grad-reduce-dtype", choices=("bf16", "fp32"),
                       help="Gradient buffer and reduction dtype (default: the strategy's).")
    group.add_argument("--grad-accumulation-rounding", choices=GRAD_ROUNDINGS,
                       default=OptimizerConfig.grad_accumulation_rounding,
                       help="How each micro-batch's gradient is rounded when added into a bf16 "
                            "gradient buffer: nearest, or stochastic (unbiased; needs the bf16 buffer).")
    group.add_argument("--grad-reduce-in-bf16", action="store_true",
                       help="Megatron's flag: same as --grad-reduce-dtype bf16.")
    group.add_argument("--accumulate-allreduce-grads-in-fp32", action="store_true",
                       help="Megatron's flag: same as --grad-reduce-dtype fp32.")


def _add_distributed_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("distributed")
    group.add_argument("--tensor-model-parallel-size", type=int,
                       default=ParallelConfig.tensor_model_parallel_size)
    group.add_argument("--pipeline-model-parallel-size", type=int,
                       default=ParallelConfig.pipeline_model_parallel_size)
    group.add_argument("--num-layers-per-virtual-pipeline-stage", type=int,
                       help="Interleaved 1F1B: layers per model chunk; virtual stages = "
                            "num layers / pipeline size / this.")
    group.add_argument("--sequence-parallel", action="store_true",
                       help="Split norms and dropout along the sequence over the TP ranks.")
    group.add_argument("--context-parallel-size", type=int, default=1,
                       help="Only 1: context parallelism is not implemented.")
    group.add_argument("--use-distributed-optimizer", action="store_true",
                       help="Shard optimizer state over data-parallel ranks (ZeRO-1).")
    group.add_argument("--overlap-grad-reduce", action="store_true")
    group.add_argument("--overlap-param-gather", action="store_true",
                       help="Needs --use-distributed-optimizer.")
    group.add_argument("--distributed-backend", choices=("nccl", "gloo"),
                       help="Default: nccl with CUDA, gloo without.")
    group.add_argument("--distributed-timeout-minutes", type=float,
                       default=ParallelConfig.distributed_timeout_minutes,
                       help="A collective that waits longer fails the job.")


def _add_validation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("validation")
    group.add_argument("--eval-interval", type=int, default=TrainingConfig.eval_interval,
                       help="Evaluate every this many iterations.")
    group.add_argument("--eval-iters", type=int, default=TrainingConfig.eval_iters,
                       help="Batches per evaluation; 0 disables evaluation.")


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data-path", nargs="*",
                       help="Dataset prefixes (PATH for PATH.bin/.idx), each optionally "
                            "preceded by its blending weight: W1 P1 W2 P2 ...")
    group.add_argument("--split", default=DataConfig.split,
                       help="Train,valid,test proportions, e.g. 969,30,1.")
    group.add_argument("--data-cache-path", help="Where to keep the sample index files.")
    group.add_argument("--mock-data", action="store_true",
                       help="Synthetic data instead of --data-path.")
    group.add_argument("--seq-length", type=int, help="Tokens per sample (required).")
    group.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=DataConfig.tokenizer_type)
    group.add_argument("--vocab-file", help="GPT2BPETokenizer vocabulary (JSON).")
    group.add_argument("--merge-file", help="GPT2BPETokenizer merges.")
    group.add_argument("--tokenizer-model",
                       help="SentencePiece model file; HuggingFaceTokenizer: a tokenizer.json or "
                            "a local folder holding one; TikTokenizer: a tiktoken BPE ranks file.")
    group.add_argument("--tiktoken-pattern", choices=("v1", "v2"), default=DataConfig.tiktoken_pattern,
                       help="TikTokenizer pre-tokenization regex: v1 (GPT-4's cl100k) or v2 "
                            "(with the Llama-3 / o200k number and word rules).")
    group.add_argument("--tiktoken-num-special-tokens", type=int,
                       default=DataConfig.tiktoken_num_special_tokens,
                       help="TikTokenizer: ids reserved for special tokens below the BPE ids.")
    group.add_argument("--vocab-size", type=int,
                       help="NullTokenizer: number of token ids (other tokenizers: ignored).")
    group.add_argument("--eod-mask-loss", action="store_true",
                       help="No loss at positions whose input token is eod (predicting the "
                            "next document's first token).")
    group.add_argument("--reset-position-ids", action="store_true",
                       help="Positions restart at 0 after every eod token.")
    group.add_argument("--reset-attention-mask", action="store_true",
                       help="Tokens attend only within their document (after the last eod).")
    group.add_argument("--num-workers", type=int, default=DataConfig.num_workers,
                       help="Data loader worker processes per rank (0: read on the training "
                       "thread); the samples and their order do not depend on it.")


def _add_logging_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("logging")
    group.add_argument("--log-interval", type=int, default=TrainingConfig.log_interval,
                       help="Print the log line every this many iterations.")
    group.add_argument("--tensorboard-dir", help="Write TensorBoard scalars here.")
    group.add_argument("--log-timers-to-tensorboard", action="store_true",
                       help="Also write the per-phase step times (forward-backward; optimizer, "
                            "which includes the gradient syncs) as TensorBoard scalars.")
    group.add_argument("--wandb-project", help="Log the TensorBoard scalars to this Weights & "
                                               "Biases project too (needs `wandb`).")
    group.add_argument("--wandb-exp-name", help="Weights & Biases run name.")
    group.add_argument("--wandb-save-dir", help="Weights & Biases local folder "
                                                "(default: <--save>/wandb).")
    group.add_argument("--profile", action="store_true",
                       help="Record steps --profile-step-start .. --profile-step-end with the "
                            "torch profiler; the trace goes to --tensorboard-dir.")
    group.add_argument("--profile-step-start", type=int, default=10,
                       help="First profiled iteration.")
    group.add_argument("--profile-step-end", type=int, default=12,
                       help="Profiling stops before this iteration.")
    group.add_argument("--profile-ranks", type=int, nargs="+", default=[0],
                       help="Global ranks that profile.")


# Megatron flags that pick an implementation detail with no counterpart here:
# dest -> what happens instead (printed once when the flag is given).
_IGNORED_FLAGS = {
    "attention_backend": "attention is torch's scaled_dot_product_attention, which picks its "
                         "own kernel (flash / memory-efficient / math)",
    "use_mcore_models": "megatron_sr has one GPT implementation (megatron-core's layout)",
    "cross_entropy_loss_fusion": "the vocab-parallel cross entropy is always the fused one",
    "manual_gc": "Python's garbage collector runs as usual",
    "empty_unused_memory_level": "the CUDA caching allocator is left alone",
    "no_create_attention_mask_in_dataloader": "the data loader never builds attention masks; "
                                              "the model builds document masks itself",
    "no_mmap_bin_files": ".bin files are always memory-mapped",
    "log_throughput": "the log line always shows the throughput",
}
_FP8_FLAGS = ("fp8_format", "fp8_amax_history_len", "fp8_amax_compute_algo", "fp8_param_gather",
              "fp8_recipe", "fp8_margin")


def _add_megatron_compat_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("accepted for Megatron-LM launch scripts")
    group.add_argument("--attention-backend",
                       choices=("auto", "flash", "fused", "unfused", "local"), help="Ignored.")
    for flag in ("--use-mcore-models", "--cross-entropy-loss-fusion", "--manual-gc",
                 "--no-create-attention-mask-in-dataloader", "--no-mmap-bin-files",
                 "--log-throughput"):
        group.add_argument(flag, action="store_true", help="Ignored.")
    group.add_argument("--empty-unused-memory-level", type=int, choices=(0, 1, 2),
                       help="Ignored.")
    fp8 = "Rejected: megatron_sr has no FP8 path."
    group.add_argument("--fp8-format", choices=("e4m3", "hybrid"), help=fp8)
    group.add_argument("--fp8-amax-history-len", type=int, help=fp8)
    group.add_argument("--fp8-amax-compute-algo", choices=("most_recent", "max"), help=fp8)
    group.add_argument("--fp8-param-gather", action="store_true", help=fp8)
    group.add_argument("--fp8-recipe", help=fp8)
    group.add_argument("--fp8-margin", type=int, help=fp8)


def build_parser(extra_args_provider: Optional[Callable[[argparse.ArgumentParser], None]] = None
                 ) -> argparse.ArgumentParser:
    """The parser of every megatron_sr flag; `extra_args_provider(parser)` adds a
    tool's own flags. Abbreviated flags are not accepted (--lr is not --lr-decay-style)."""
    parser = argparse.ArgumentParser(description="megatron_sr: GPT pretraining in pure BF16 with "
                                                 "stochastic rounding", allow_abbrev=False)
    for add in (_add_network_size_args, _add_regularization_args, _add_training_args,
                _add_initialization_args, _add_learning_rate_args, _add_checkpointing_args,
                _add_mixed_precision_args, _add_distributed_args, _add_validation_args,
                _add_data_args, _add_logging_args, _add_megatron_compat_args):
        add(parser)
    if extra_args_provider is not None:
        extra_args_provider(parser)
    return parser


def parse_args(argv: Optional[list[str]], world_size: int) -> JobConfig:
    """Parses `argv` (None: sys.argv[1:]) for a job of `world_size` ranks into a
    validated JobConfig whose vocabulary is not known yet (see the module docstring)."""
    return job_config_from_args(build_parser().parse_args(argv), world_size)


def job_config_from_args(args: argparse.Namespace, world_size: int) -> JobConfig:
    """Validates parsed flags for `world_size` ranks and maps them to typed configs.

    Raises ValueError naming the flag(s) at fault. The model/layout checks are
    `config.validate_parallel_layout`'s; the schedule checks are
    `LRSchedule.from_config`'s; the precision checks are `get_strategy`'s.
    """
    notices = list(_megatron_compat(args))
    _check_required(args)
    _check_ranges(args)
    precision = _precision(args)
    strategy = get_strategy(precision, args.optimizer_state_dtype)

    model = ModelConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads, vocab_size=0, seq_length=args.seq_length,
        ffn_hidden_size=_ffn_hidden_size(args), max_position_embeddings=args.max_position_embeddings,
        position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
        normalization=args.normalization, layernorm_epsilon=args.norm_epsilon,
        activation="swiglu" if args.swiglu else "gelu", add_bias_linear=not args.disable_bias_linear,
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std, params_dtype=strategy.param_dtype,
        recompute_granularity=_recompute_granularity(args),
        recompute_method=args.recompute_method, recompute_num_layers=args.recompute_num_layers,
        num_query_groups=_num_query_groups(args), kv_channels=args.kv_channels,
        rotary_percent=args.rotary_percent, rotary_interleaved=args.rotary_interleaved,
        use_rope_scaling=args.use_rope_scaling, rope_scaling_factor=args.rope_scaling_factor,
        qk_layernorm=args.qk_layernorm, apply_layernorm_1p=args.apply_layernorm_1p,
        gradient_accumulation_fusion=_gradient_accumulation_fusion(args, strategy))
    if model.position_embedding_type == "learned_absolute" and \
            model.max_position_embeddings < model.seq_length:
        raise ValueError(f"--max-position-embeddings ({model.max_position_embeddings}) is smaller "
                         f"than --seq-length ({model.seq_length})")

    parallel = ParallelConfig(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=_virtual_pipeline_size(args),
        sequence_parallel=_sequence_parallel(args),
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_grad_reduce=args.overlap_grad_reduce, overlap_param_gather=args.overlap_param_gather,
        distributed_backend=args.distributed_backend,
        distributed_timeout_minutes=args.distributed_timeout_minutes)
    # First call: the layout, and the data-parallel size the batch checks need;
    # second: the micro-batch count interleaved pipelining needs.
    data_parallel_size = validate_parallel_layout(model, parallel, world_size)
    if parallel.tensor_model_parallel_size > 1 and parallel.pipeline_model_parallel_size > 1 \
            and not parallel.sequence_parallel:
        notices.append(
            f"[flags] tensor x pipeline parallel without --sequence-parallel: each of the "
            f"{parallel.tensor_model_parallel_size} TP ranks sends the whole activation to the "
            f"next stage; --sequence-parallel sends 1/{parallel.tensor_model_parallel_size} "
            f"each (and splits the norms' and dropouts' activations)")
    schedule = _step_batch_size_schedule(args, data_parallel_size)
    global_batch_size = _global_batch_size(args, data_parallel_size, schedule)
    _check_micro_batches_per_step(global_batch_size, args.micro_batch_size, data_parallel_size)
    num_microbatches = global_batch_size // (args.micro_batch_size * data_parallel_size)
    validate_parallel_layout(model, parallel, world_size, num_microbatches)

    rampup = _rampup_batch_size(args, global_batch_size, data_parallel_size)
    train_iters = _train_iters(args, global_batch_size, rampup, schedule)
    optimizer = OptimizerConfig(
        precision=precision, optimizer_state_dtype=args.optimizer_state_dtype,
        grad_reduce_dtype=_grad_reduce_dtype(args),
        grad_accumulation_rounding=args.grad_accumulation_rounding, lr=args.lr, min_lr=args.min_lr,
        weight_decay=args.weight_decay, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps, clip_grad=args.clip_grad, lr_decay_style=args.lr_decay_style,
        lr_decay_iters=_iters_or_samples(args, "lr_decay", global_batch_size, notices),
        lr_warmup_iters=_iters_or_samples(args, "lr_warmup", global_batch_size, notices) or 0,
        lr_warmup_fraction=args.lr_warmup_fraction,
        lr_wsd_decay_iters=_iters_or_samples(args, "lr_wsd_decay", global_batch_size, notices),
        lr_wsd_decay_style=args.lr_wsd_decay_style, lr_warmup_init=args.lr_warmup_init,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        decoupled_lr=args.decoupled_lr, decoupled_min_lr=args.decoupled_min_lr)
    LRSchedule.from_config(optimizer, train_iters)
    with_grad_buffer(strategy, optimizer.grad_reduce_dtype, optimizer.grad_accumulation_rounding)

    _check_data(args)
    data = DataConfig(
        data_path=list(args.data_path or []), split=args.split, data_cache_path=args.data_cache_path,
        mock_data=args.mock_data, tokenizer_type=args.tokenizer_type, vocab_file=args.vocab_file,
        merge_file=args.merge_file, tokenizer_model=args.tokenizer_model, vocab_size=args.vocab_size,
        seq_length=args.seq_length, num_workers=args.num_workers,
        tiktoken_pattern=args.tiktoken_pattern,
        tiktoken_num_special_tokens=args.tiktoken_num_special_tokens,
        eod_mask_loss=args.eod_mask_loss, reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask)

    _check_checkpointing(args)
    training = TrainingConfig(
        micro_batch_size=args.micro_batch_size, global_batch_size=global_batch_size,
        train_iters=train_iters, train_samples=args.train_samples,
        eval_interval=args.eval_interval, eval_iters=args.eval_iters,
        log_interval=args.log_interval, exit_interval=args.exit_interval,
        exit_duration_in_mins=args.exit_duration_in_mins, seed=args.seed, save=args.save,
        load=args.load, save_interval=args.save_interval,
        no_load_optim=args.no_load_optim or args.finetune,
        no_load_rng=args.no_load_rng or args.finetune, finetune=args.finetune,
        override_existing_checkpoints=args.override_existing_checkpoints,
        ckpt_format=args.ckpt_format, async_save=args.async_save,
        tensorboard_dir=args.tensorboard_dir, max_skipped_iterations=args.max_skipped_iterations,
        rampup_batch_size=rampup, step_batch_size_schedule=schedule,
        calculate_per_token_loss=args.calculate_per_token_loss,
        log_timers_to_tensorboard=args.log_timers_to_tensorboard,
        wandb_project=args.wandb_project, wandb_exp_name=args.wandb_exp_name,
        wandb_save_dir=args.wandb_save_dir, profile=args.profile,
        profile_step_start=args.profile_step_start, profile_step_end=args.profile_step_end,
        profile_ranks=tuple(args.profile_ranks), exit_signal=args.exit_signal,
        check_weight_hash_interval=args.check_weight_hash_across_dp_replicas_interval)

    return JobConfig(model=model, parallel=parallel, optimizer=optimizer, data=data,
                     training=training, world_size=world_size,
                     make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                     notices=tuple(notices))


def _megatron_compat(args: argparse.Namespace) -> tuple[str, ...]:
    """Rejects what cannot run here (FP8, context parallelism) and returns one
    notice per accepted flag that changes nothing here."""
    _precision(args)  # --fp16 first: the reason a Megatron fp16 script cannot run here
    fp8 = [_flag(dest) for dest in _FP8_FLAGS if getattr(args, dest)]
    if fp8:
        raise ValueError(f"{', '.join(fp8)}: FP8 training is not supported: megatron_sr keeps "
                         f"the weights in BF16 and its stochastic rounding is defined for BF16 "
                         f"storage; drop the --fp8-* flags (the run is then BF16)")
    if args.context_parallel_size != 1:
        raise ValueError(f"--context-parallel-size {args.context_parallel_size}: context "
                         f"parallelism is not implemented; use 1 (split long sequences with "
                         f"--tensor-model-parallel-size and --sequence-parallel instead)")
    if args.decoupled_min_lr is not None and args.decoupled_lr is None:
        raise ValueError("--decoupled-min-lr needs --decoupled-lr")
    notices = []
    for dest, instead in _IGNORED_FLAGS.items():
        value = getattr(args, dest)
        if value not in (None, False):
            shown = "" if value is True else f" {value}"
            notices.append(f"[flags] {_flag(dest)}{shown} is accepted and ignored: {instead}")
    if args.vocab_size is not None and args.tokenizer_type != "NullTokenizer":
        notices.append(f"[flags] --vocab-size {args.vocab_size} is ignored with --tokenizer-type "
                       f"{args.tokenizer_type}: the vocabulary is the tokenizer's")
    args.split = args.split.strip("'\"")  # a quoted value inside a shell array keeps its quotes
    return tuple(notices)


def _check_required(args: argparse.Namespace) -> None:
    missing = [_flag(dest) for dest in ("num_layers", "hidden_size", "num_attention_heads",
                                        "seq_length", "lr") if getattr(args, dest) is None]
    if missing:
        raise ValueError(f"missing required flag(s): {', '.join(missing)}")
    if (args.train_iters is None) == (args.train_samples is None):
        raise ValueError("give exactly one of --train-iters and --train-samples")


# (dest, smallest allowed value) of the integer flags; None values are unset optionals.
_INT_MINIMUMS = (
    ("num_layers", 1), ("hidden_size", 1), ("num_attention_heads", 1), ("seq_length", 1),
    ("ffn_hidden_size", 1), ("max_position_embeddings", 1), ("make_vocab_size_divisible_by", 1),
    ("micro_batch_size", 1), ("global_batch_size", 1), ("train_iters", 1), ("train_samples", 1),
    ("exit_interval", 1), ("max_skipped_iterations", 1), ("num_layers_per_virtual_pipeline_stage", 1),
    ("eval_interval", 1), ("eval_iters", 0), ("vocab_size", 1), ("num_workers", 0),
    ("log_interval", 1), ("save_interval", 1), ("lr_decay_samples", 1), ("lr_warmup_samples", 0),
    ("lr_wsd_decay_samples", 1), ("num_query_groups", 1), ("kv_channels", 1),
    ("recompute_num_layers", 1), ("seed", 0), ("check_weight_hash_across_dp_replicas_interval", 1),
)
# (dest, largest allowed value) of the integer flags bounded above.
_INT_MAXIMUMS = (("seed", 2**32 - 1), ("vocab_size", MAX_VOCAB_SIZE - 1))
# Every float flag with the interval it must lie in, as (dest, "[" or "(", low, high, "]" or
# ")"); NaN and +-inf are refused for all (a NaN learning rate would train NaN weights).
_FLOAT_RANGES = tuple(
    [(dest, "[", 0.0, 1.0, ")") for dest in ("attention_dropout", "hidden_dropout", "adam_beta1",
                                             "adam_beta2", "lr_warmup_fraction")]
    + [(dest, "(", 0.0, math.inf, ")") for dest in (
        "adam_eps", "norm_epsilon", "init_method_std", "rotary_base", "rope_scaling_factor",
        "distributed_timeout_minutes", "exit_duration_in_mins")]
    + [(dest, "[", 0.0, math.inf, ")") for dest in (
        "weight_decay", "clip_grad", "lr", "min_lr", "lr_warmup_init", "decoupled_lr",
        "decoupled_min_lr")]
    + [("rotary_percent", "(", 0.0, 1.0, "]")])
# Folders a run creates and writes; checked before anything starts.
_OUTPUT_FOLDERS = ("data_cache_path", "tensorboard_dir", "wandb_save_dir")


def _check_ranges(args: argparse.Namespace) -> None:
    for dest, low in _INT_MINIMUMS:
        value = getattr(args, dest)
        if value is not None and value < low:
            raise ValueError(f"{_flag(dest)} must be >= {low}, got {value}")
    for dest, high in _INT_MAXIMUMS:
        value = getattr(args, dest)
        if value is not None and value > high:
            raise ValueError(f"{_flag(dest)} must be <= {high}, got {value}")
    for dest, left, low, high, right in _FLOAT_RANGES:
        value = getattr(args, dest)
        if value is not None and not (math.isfinite(value)
                                      and (low <= value if left == "[" else low < value)
                                      and (value <= high if right == "]" else value < high)):
            raise ValueError(f"{_flag(dest)} must be a finite number in {left}{low:g}, "
                             f"{high:g}{right}, got {value}")
    for dest in _OUTPUT_FOLDERS:
        path = getattr(args, dest)
        existing = path
        while existing is not None and not os.path.exists(existing):
            existing = os.path.dirname(existing.rstrip(os.sep)) or "."
        if existing is not None and not (os.path.isdir(existing)
                                         and os.access(existing, os.W_OK | os.X_OK)):
            why = "not a folder" if not os.path.isdir(existing) else "not writable"
            raise ValueError(f"{_flag(dest)} {path}: cannot create or write it ({existing} is "
                             f"{why})")


def _aliased(args: argparse.Namespace, option: str, aliases: dict[str, str]) -> Optional[str]:
    """The value of --OPTION, given directly or through Megatron's boolean flags that
    stand for one of its values (`aliases`: flag -> the value it means); None when
    none is given. Two that disagree are a ValueError naming both."""
    direct = getattr(args, option.replace("-", "_"))
    given = [] if direct is None else [(f"--{option} {direct}", direct)]
    given += [(f"--{flag}", value) for flag, value in aliases.items()
              if getattr(args, flag.replace("-", "_"))]
    for flag, value in given[1:]:
        if value != given[0][1]:
            raise ValueError(f"{flag} means --{option} {value}, which conflicts with "
                             f"{given[0][0]}: give one")
    return given[0][1] if given else None


def _precision(args: argparse.Namespace) -> str:
    if args.fp16:
        raise ValueError("--fp16 is not supported: megatron_sr trains in bf16; use --precision "
                         "bf16-mixed (what Megatron's --bf16 does) or a pure one: bf16-sr, bf16, "
                         "bf16-kahan")
    return _aliased(args, "precision", {"bf16": "bf16-mixed"}) or DEFAULT_STRATEGY


def _grad_reduce_dtype(args: argparse.Namespace) -> Optional[str]:
    return _aliased(args, "grad-reduce-dtype", {"grad-reduce-in-bf16": "bf16",
                                                "accumulate-allreduce-grads-in-fp32": "fp32"})


def _gradient_accumulation_fusion(args: argparse.Namespace, strategy: PrecisionStrategy) -> bool:
    if args.gradient_accumulation_fusion and strategy.autocast:
        raise ValueError(f"--gradient-accumulation-fusion does not apply to --precision "
                         f"{strategy.name} (autocast computes the products in BF16 from FP32 "
                         f"weights): drop it, or use bf16-mixed")
    return args.gradient_accumulation_fusion


def _recompute_granularity(args: argparse.Namespace) -> Optional[str]:
    if (args.recompute_method or args.recompute_num_layers) and \
            args.recompute_granularity != "full":
        raise ValueError("--recompute-method and --recompute-num-layers apply to "
                         "--recompute-granularity full only")
    return _aliased(args, "recompute-granularity", {"recompute-activations": "selective"})


def _num_query_groups(args: argparse.Namespace) -> Optional[int]:
    if not args.group_query_attention:
        if args.num_query_groups is not None and args.num_query_groups != args.num_attention_heads:
            raise ValueError(f"--num-query-groups {args.num_query_groups} needs "
                             f"--group-query-attention")
        return None
    if args.num_query_groups is None:
        raise ValueError("--group-query-attention needs --num-query-groups")
    return args.num_query_groups


def _ffn_hidden_size(args: argparse.Namespace) -> int:
    if args.ffn_hidden_size is not None:
        return args.ffn_hidden_size
    if not args.swiglu:
        return 4 * args.hidden_size
    size = int(4 * args.hidden_size * 2 / 3 / 64) * 64
    if size == 0:
        raise ValueError(f"--swiglu with --hidden-size {args.hidden_size} (< 48) gives no default "
                         f"MLP size (4h x 2/3 rounded down to a multiple of 64): give "
                         f"--ffn-hidden-size")
    return size


def _virtual_pipeline_size(args: argparse.Namespace) -> Optional[int]:
    per_stage = args.num_layers_per_virtual_pipeline_stage
    if per_stage is None:
        return None
    pp = args.pipeline_model_parallel_size
    if args.num_layers % (pp * per_stage) != 0:
        raise ValueError(f"--num-layers ({args.num_layers}) is not divisible by "
                         f"--pipeline-model-parallel-size ({pp}) x "
                         f"--num-layers-per-virtual-pipeline-stage ({per_stage})")
    return args.num_layers // pp // per_stage


def _sequence_parallel(args: argparse.Namespace) -> bool:
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        warnings.warn("--sequence-parallel has no effect with --tensor-model-parallel-size 1; "
                      "ignored", stacklevel=3)
        return False
    return args.sequence_parallel


def _global_batch_size(args: argparse.Namespace, data_parallel_size: int,
                       schedule: Optional[tuple[tuple[int, int], ...]] = None) -> int:
    per_step = args.micro_batch_size * data_parallel_size
    if schedule is not None:  # every entry was checked against per_step
        largest = max(batch_size for _, batch_size in schedule)
        if args.global_batch_size not in (None, largest):
            raise ValueError(f"--global-batch-size ({args.global_batch_size}) with "
                             f"--step-batch-size-schedule must be the schedule's largest batch "
                             f"size ({largest}), or be left out")
        return largest
    if args.global_batch_size is None:
        return per_step
    if args.global_batch_size % per_step != 0:
        raise ValueError(
            f"--global-batch-size ({args.global_batch_size}) is not a multiple of "
            f"--micro-batch-size ({args.micro_batch_size}) x data-parallel size "
            f"({data_parallel_size} = world size / (--tensor-model-parallel-size x "
            f"--pipeline-model-parallel-size))")
    return args.global_batch_size


def _rampup_batch_size(args: argparse.Namespace, global_batch_size: int,
                       data_parallel_size: int) -> Optional[tuple[int, int, int]]:
    if args.rampup_batch_size is None:
        return None
    start, increment, samples = args.rampup_batch_size
    per_step = args.micro_batch_size * data_parallel_size
    if start < 1 or increment < 1 or samples < 0:
        raise ValueError(f"--rampup-batch-size {start} {increment} {samples}: give START >= 1, "
                         f"INCREMENT >= 1, SAMPLES >= 0")
    if start % per_step or increment % per_step:
        raise ValueError(f"--rampup-batch-size {start} {increment} {samples}: START and INCREMENT "
                         f"must be multiples of --micro-batch-size x data-parallel size "
                         f"({per_step})")
    pp = args.pipeline_model_parallel_size
    if args.num_layers_per_virtual_pipeline_stage is not None and (
            (start // per_step) % pp or (increment // per_step) % pp):
        raise ValueError(f"--rampup-batch-size {start} {increment} {samples}: interleaved "
                         f"pipelining needs every step's micro-batch count to be a multiple of "
                         f"--pipeline-model-parallel-size ({pp}); START and INCREMENT must be "
                         f"multiples of {per_step * pp}")
    if (global_batch_size - start) % increment or start > global_batch_size:
        raise ValueError(f"--rampup-batch-size {start} {increment} {samples}: --global-batch-size "
                         f"({global_batch_size}) must be START plus a multiple of INCREMENT")
    return start, increment, samples


_COUNT_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def _schedule_count(text: str, flag: str, entry: str) -> int:
    """A whole count of --step-batch-size-schedule: digits (a decimal point
    allowed) with an optional K/M/B/T suffix."""
    scale = _COUNT_SUFFIXES.get(text[-1:].upper(), 1)
    digits = text[:-1] if scale > 1 else text
    try:
        value = decimal.Decimal(digits) * scale
    except decimal.InvalidOperation:
        value = None
    if value is None or not value.is_finite() or value < 0 or value != value.to_integral_value():
        raise ValueError(f"{flag}: '{text}' in entry '{entry}' is not a whole count (digits with "
                         f"an optional K, M, B or T)")
    return int(value)


def _step_batch_size_schedule(args: argparse.Namespace, data_parallel_size: int
                              ) -> Optional[tuple[tuple[int, int], ...]]:
    """--step-batch-size-schedule as ((first sample, global batch size), ...):
    token thresholds divided by --seq-length (rounded down), each batch size a
    whole number of micro-batch steps over data parallelism."""
    if args.step_batch_size_schedule is None:
        return None
    text = " ".join(args.step_batch_size_schedule)
    flag = f"--step-batch-size-schedule '{text}'"
    if args.rampup_batch_size is not None:
        raise ValueError(f"{flag} and --rampup-batch-size are exclusive: give one")
    per_step = args.micro_batch_size * data_parallel_size
    pp = args.pipeline_model_parallel_size
    interleaved = args.num_layers_per_virtual_pipeline_stage is not None
    schedule: list[tuple[int, int]] = []
    for entry in text.replace(",", " ").split():
        tokens_text, colon, batch_text = entry.partition(":")
        if not colon or not tokens_text or not batch_text:
            raise ValueError(f"{flag}: entry '{entry}' is not TOKENS:BATCH")
        first_sample = _schedule_count(tokens_text, flag, entry) // args.seq_length
        batch_size = _schedule_count(batch_text, flag, entry)
        if batch_size < 1 or batch_size % per_step:
            raise ValueError(f"{flag}: batch size {batch_size} of entry '{entry}' is not a positive "
                             f"multiple of --micro-batch-size x data-parallel size ({per_step})")
        if interleaved and (batch_size // per_step) % pp:
            raise ValueError(f"{flag}: batch size {batch_size} of entry '{entry}': interleaved "
                             f"pipelining needs every step's micro-batch count to be a multiple "
                             f"of --pipeline-model-parallel-size ({pp}); use multiples of "
                             f"{per_step * pp}")
        if schedule and first_sample <= schedule[-1][0]:
            raise ValueError(f"{flag}: entry '{entry}' starts at sample {first_sample} (tokens / "
                             f"--seq-length {args.seq_length}), not after the previous entry's "
                             f"{schedule[-1][0]}: list the thresholds in increasing order")
        schedule.append((first_sample, batch_size))
    if not schedule or schedule[0][0] != 0:
        raise ValueError(f"{flag}: the first entry must be at 0 tokens (the batch size the run "
                         f"starts with)")
    return tuple(schedule)


def _train_iters(args: argparse.Namespace, global_batch_size: int,
                 rampup: Optional[tuple[int, int, int]] = None,
                 schedule: Optional[tuple[tuple[int, int], ...]] = None) -> int:
    if args.train_iters is not None:
        return args.train_iters
    if schedule is not None:  # Megatron's count: steps until --train-samples are consumed
        iterations = consumed = 0
        ends = [first_sample for first_sample, _ in schedule[1:]] + [args.train_samples]
        for (_, batch_size), end in zip(schedule, ends):
            end = min(end, args.train_samples)
            if consumed < end:  # consumed >= this entry's first sample here
                steps = -(-(end - consumed) // batch_size)
                iterations += steps
                consumed += steps * batch_size
        return iterations
    if rampup is not None:  # Megatron's count: the ramp's steps, then full batches
        training = TrainingConfig(global_batch_size=global_batch_size, rampup_batch_size=rampup)
        iterations = consumed = 0
        while consumed <= rampup[2] and consumed <= args.train_samples:
            consumed += global_batch_size_at(training, consumed)
            iterations += 1
        return iterations + (args.train_samples - consumed) // global_batch_size
    if args.train_samples < global_batch_size:
        raise ValueError(f"--train-samples ({args.train_samples}) is smaller than "
                         f"--global-batch-size ({global_batch_size}): not one iteration")
    return args.train_samples // global_batch_size


def _iters_or_samples(args: argparse.Namespace, name: str, global_batch_size: int,
                      notices: Optional[list[str]] = None) -> Optional[int]:
    """The value of --<name>-iters, or --<name>-samples converted to iterations
    (rounded to the nearest when not a multiple of the global batch size, with
    a notice: the schedule counts iterations)."""
    iters, samples = getattr(args, name + "_iters"), getattr(args, name + "_samples")
    iters_flag, samples_flag = _flag(name + "_iters"), _flag(name + "_samples")
    if samples is None:
        return iters
    if args.train_samples is None:
        raise ValueError(f"{samples_flag} needs --train-samples; with --train-iters use {iters_flag}")
    if iters:  # --lr-warmup-iters defaults to 0, the others to None
        raise ValueError(f"{iters_flag} and {samples_flag} are exclusive: give one")
    iterations = round(samples / global_batch_size)
    if samples % global_batch_size != 0 and notices is not None:
        notices.append(f"[flags] {samples_flag} {samples} is not a multiple of --global-batch-size "
                       f"{global_batch_size}: the schedule counts iterations and uses "
                       f"{iterations} ({iterations * global_batch_size} samples)")
    return iterations


def _check_data(args: argparse.Namespace) -> None:
    if args.mock_data == bool(args.data_path):
        raise ValueError("give exactly one of --data-path and --mock-data")
    if args.data_path:
        parse_data_path(args.data_path)
    parse_split(args.split)
    check_tokenizer_flags(args.tokenizer_type, vars(args))


MAX_MICROBATCHES_PER_STEP = 1_000_000
"""Far above any real run (Megatron-LM recipes at 1,024 GPUs take tens to
thousands); more is a mistyped --global-batch-size, which would otherwise sit
building sample indices or looping over micro-batches with no error."""


def _check_micro_batches_per_step(global_batch_size: int, micro_batch_size: int,
                                  data_parallel_size: int) -> None:
    per_step = global_batch_size // (micro_batch_size * data_parallel_size)
    if per_step > MAX_MICROBATCHES_PER_STEP:
        raise ValueError(f"--global-batch-size {global_batch_size} means {per_step} micro-batches "
                         f"per step on each of the {data_parallel_size} data-parallel ranks "
                         f"(--micro-batch-size {micro_batch_size}), more than "
                         f"{MAX_MICROBATCHES_PER_STEP:,}: a typo?")


def _check_checkpointing(args: argparse.Namespace) -> None:
    if args.save_interval is not None and args.save is None:
        raise ValueError("--save-interval needs --save (the directory to save to)")
    if args.finetune and args.load is None:
        raise ValueError("--finetune needs --load (the checkpoint to finetune from)")
    if args.async_save and args.ckpt_format != "torch_dist":
        raise ValueError("--async-save needs --ckpt-format torch_dist")
