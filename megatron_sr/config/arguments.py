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

The parser is generated from the config dataclasses' fields (each declares its
flag, help and range with `megatron_sr.config.flags.flag`) and completed by the
other Megatron-LM flags, as the table megatron_flags.csv decides them
(`megatron_sr.config.megatron_compat`: aliases, notices, refusals); values computed from
several flags are `megatron_sr.config.derived`'s and `megatron_sr.config.batch_size`'s.

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
- One data source: `--data-path` (divided by `--split`), the separate
  `--train-data-path` / `--valid-data-path` / `--test-data-path`, or
  `--mock-data`. `--split` other than its default beside the separate paths is
  an error (Megatron refuses split with per-split blends); so is a missing
  `--train-data-path` unless `--skip-train` (Megatron silently skips training).
- `--skip-train` implies `--no-load-optim` (with a notice), as in Megatron.
- `--use-checkpoint-args` sets the model's flags from the checkpoint at `--load`
  before anything is validated (`megatron_sr.checkpointing.checkpoint_args`), so
  the required size flags may be left out.
"""
from __future__ import annotations

import argparse
import copy
import os
from typing import Any, Callable, Optional

from megatron_sr.config.batch_size import (check_micro_batches_per_step, derive_global_batch_size,
                                           derive_rampup_batch_size,
                                           derive_step_batch_size_schedule, derive_train_iters)
from megatron_sr.config.data import DataConfig
from megatron_sr.config.derived import (DerivationFlags, check_gradient_accumulation_fusion,
                                        check_position_embedding, check_recompute,
                                        derive_activation,
                                        derive_ffn_hidden_size,
                                        derive_iters_or_samples, derive_num_query_groups,
                                        derive_sequence_parallel, derive_virtual_pipeline_size)
from megatron_sr.config.flags import add_flags, check_value, flag_fields
from megatron_sr.config.job import JobConfig
from megatron_sr.config.megatron_compat import (MegatronTable, add_megatron_flags,
                                                apply_megatron_flags)
from megatron_sr.config.model import ModelConfig
from megatron_sr.config.optimizer import OptimizerConfig
from megatron_sr.config.parallel import ParallelConfig, validate_parallel_layout
from megatron_sr.config.training import TrainingConfig
from megatron_sr.data.gpt_dataset import parse_data_path, parse_split
from megatron_sr.data.tokenizers import check_tokenizer_flags
from megatron_sr.optimizer.lr_schedules import LRSchedule
from megatron_sr.precision.strategies import get_strategy, with_grad_buffer

# The dataclasses whose fields are flags, in the order of `--help` within a section.
CONFIGS = (TrainingConfig, ModelConfig, ParallelConfig, OptimizerConfig, DataConfig, JobConfig,
           DerivationFlags)
_FLAG_FIELDS = [(field, spec) for cls in CONFIGS for field, spec in flag_fields(cls)]
# Our flags' dests (field names) and defaults (field defaults), by flag name.
FLAG_DESTS = {name: field.name for field, spec in _FLAG_FIELDS for name in spec.names}
FLAG_DEFAULTS = {name: field.default for field, spec in _FLAG_FIELDS for name in spec.names}
# (dest of the flag, smallest allowed value) of the integer flags bounded below.
_INT_MINIMUMS = tuple((spec.name[2:].replace("-", "_"), spec.minimum)
                      for _, spec in _FLAG_FIELDS if spec.minimum is not None)
# (dest of the flag, "[" or "(", low, high, "]" or ")") of every float flag.
_FLOAT_RANGES = tuple((spec.name[2:].replace("-", "_"), *spec.bounds)
                      for _, spec in _FLAG_FIELDS if spec.interval is not None)


def build_parser(extra_args_provider: Optional[Callable[[argparse.ArgumentParser], None]] = None,
                 megatron_flags: Optional[MegatronTable] = None) -> argparse.ArgumentParser:
    """The parser of every megatron_sr flag and of the Megatron-LM flags of the table
    `megatron_flags` (default: megatron_flags.csv); `extra_args_provider(parser)` adds a
    tool's own flags.
    Abbreviated flags are not accepted (--lr is not --lr-decay-style)."""
    parser = argparse.ArgumentParser(description="megatron_sr: GPT pretraining in pure BF16 with "
                                                 "stochastic rounding", allow_abbrev=False)
    groups, flags = add_flags(parser, CONFIGS)
    add_megatron_flags(groups, flags, megatron_flags)
    if extra_args_provider is not None:
        extra_args_provider(parser)
    return parser


def parse_args(argv: Optional[list[str]], world_size: int) -> JobConfig:
    """Parses `argv` (None: sys.argv[1:]) for a job of `world_size` ranks into a
    validated JobConfig whose vocabulary is not known yet (see the module docstring)."""
    return job_config_from_args(build_parser().parse_args(argv), world_size)


def _config(cls: type, args: argparse.Namespace, **derived: Any) -> Any:
    """`cls` from the values of its flag fields in `args`, `derived` replacing some."""
    values = {field.name: getattr(args, field.name) for field, _ in flag_fields(cls)}
    return cls(**{**values, **derived})


def job_config_from_args(args: argparse.Namespace, world_size: int,
                         megatron_flags: Optional[MegatronTable] = None) -> JobConfig:
    """Validates parsed flags for `world_size` ranks and maps them to typed configs
    (`megatron_flags`: the table the parser was built with, default megatron_flags.csv).

    Raises ValueError naming the flag(s) at fault. The model/layout checks are
    `validate_parallel_layout`'s; the schedule checks are `LRSchedule.from_config`'s;
    the precision checks are `get_strategy`'s. `args` is left unchanged.
    """
    args = copy.copy(args)
    notices = apply_megatron_flags(args, FLAG_DEFAULTS, FLAG_DESTS, megatron_flags)
    if args.use_checkpoint_args:
        if args.load is None:
            raise ValueError("--use-checkpoint-args needs --load (the checkpoint to take the "
                             "model's flags from)")
        # Imported here: the checkpointing package imports the model, which imports config.
        from megatron_sr.checkpointing.checkpoint_args import apply_checkpoint_args

        notices += apply_checkpoint_args(args)
    if args.decoupled_min_lr is not None and args.decoupled_lr is None:
        raise ValueError("--decoupled-min-lr needs --decoupled-lr")
    if args.vocab_size is not None and args.tokenizer_type != "NullTokenizer":
        notices.append(f"[flags] --vocab-size {args.vocab_size} is ignored with --tokenizer-type "
                       f"{args.tokenizer_type}: the vocabulary is the tokenizer's")
    _check_required(args)
    _check_flag_values(args)
    strategy = get_strategy(args.precision, args.optimizer_state_dtype)

    ffn_hidden_size = derive_ffn_hidden_size(args)
    check_recompute(args)
    check_position_embedding(args)
    model = _config(ModelConfig, args, vocab_size=0, ffn_hidden_size=ffn_hidden_size,
                    params_dtype=strategy.param_dtype,
                    num_query_groups=derive_num_query_groups(args),
                    activation=derive_activation(args),
                    gradient_accumulation_fusion=check_gradient_accumulation_fusion(args, strategy))
    if model.position_embedding_type == "learned_absolute" and \
            model.max_position_embeddings < model.seq_length:
        raise ValueError(f"--max-position-embeddings ({model.max_position_embeddings}) is smaller "
                         f"than --seq-length ({model.seq_length})")

    parallel = _config(ParallelConfig, args,
                       virtual_pipeline_model_parallel_size=derive_virtual_pipeline_size(args),
                       sequence_parallel=derive_sequence_parallel(args))
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
    schedule = derive_step_batch_size_schedule(args, data_parallel_size)
    global_batch_size = derive_global_batch_size(args, data_parallel_size, schedule)
    check_micro_batches_per_step(global_batch_size, args.micro_batch_size, data_parallel_size)
    num_microbatches = global_batch_size // (args.micro_batch_size * data_parallel_size)
    validate_parallel_layout(model, parallel, world_size, num_microbatches)

    rampup = derive_rampup_batch_size(args, global_batch_size, data_parallel_size)
    train_iters = derive_train_iters(args, global_batch_size, rampup, schedule)
    optimizer = _config(
        OptimizerConfig, args,
        lr_decay_iters=derive_iters_or_samples(args, "lr_decay", global_batch_size, notices),
        lr_warmup_iters=derive_iters_or_samples(args, "lr_warmup", global_batch_size, notices) or 0,
        lr_wsd_decay_iters=derive_iters_or_samples(args, "lr_wsd_decay", global_batch_size,
                                                   notices))
    LRSchedule.from_config(optimizer, train_iters)
    with_grad_buffer(strategy, optimizer.grad_reduce_dtype, optimizer.grad_accumulation_rounding)

    _check_data(args)
    data = _config(DataConfig, args, seq_length=args.seq_length,
                   **{name: list(getattr(args, name) or []) for name in _DATA_PATHS.values()})

    _check_checkpointing(args)
    if args.skip_train and not (args.no_load_optim or args.finetune):
        notices.append("[flags] --skip-train implies --no-load-optim: the optimizer state of "
                       "--load is not read")
    training = _config(TrainingConfig, args, global_batch_size=global_batch_size,
                       train_iters=train_iters,
                       no_load_optim=args.no_load_optim or args.finetune or args.skip_train,
                       no_load_rng=args.no_load_rng or args.finetune, rampup_batch_size=rampup,
                       step_batch_size_schedule=schedule)

    return JobConfig(model=model, parallel=parallel, optimizer=optimizer, data=data,
                     training=training, world_size=world_size,
                     make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                     notices=tuple(notices))


def _check_required(args: argparse.Namespace) -> None:
    missing = [spec.name for field, spec in _FLAG_FIELDS
               if spec.required and getattr(args, field.name) is None]
    if missing:
        raise ValueError(f"missing required flag(s): {', '.join(missing)}")
    if (args.train_iters is None) == (args.train_samples is None):
        raise ValueError("give exactly one of --train-iters and --train-samples")


def _check_flag_values(args: argparse.Namespace) -> None:
    """Every flag's range (the check the configs' `__post_init__` runs too, here
    before any value is derived from it), then the folders a run creates and
    writes, before anything starts."""
    for field, spec in _FLAG_FIELDS:
        check_value(spec, getattr(args, field.name))
    for field, spec in _FLAG_FIELDS:
        path = getattr(args, field.name) if spec.output_folder else None
        existing = path
        while existing is not None and not os.path.exists(existing):
            existing = os.path.dirname(existing.rstrip(os.sep)) or "."
        if existing is not None and not (os.path.isdir(existing)
                                         and os.access(existing, os.W_OK | os.X_OK)):
            why = "not a folder" if not os.path.isdir(existing) else "not writable"
            raise ValueError(f"{spec.name} {path}: cannot create or write it ({existing} is "
                             f"{why})")


# The flags that name datasets, and their dests.
_DATA_PATHS = {"--data-path": "data_path", "--train-data-path": "train_data_path",
               "--valid-data-path": "valid_data_path", "--test-data-path": "test_data_path"}


def _check_data(args: argparse.Namespace) -> None:
    per_split = [name for name in ("--train-data-path", "--valid-data-path", "--test-data-path")
                 if getattr(args, _DATA_PATHS[name])]
    sources = [name for name, given in (("--data-path", bool(args.data_path)),
                                        (", ".join(per_split), bool(per_split)),
                                        ("--mock-data", args.mock_data)) if given]
    if len(sources) != 1:
        raise ValueError(f"give exactly one data source: --data-path (divided by --split), "
                         f"--train-data-path with --valid-data-path / --test-data-path, or "
                         f"--mock-data" + (f"; got {' and '.join(sources)}" if sources else ""))
    for name, dest in _DATA_PATHS.items():
        if getattr(args, dest):
            parse_data_path(getattr(args, dest), name)
    parse_split(args.split)
    if per_split and args.split != FLAG_DEFAULTS["--split"]:
        raise ValueError(f"--split {args.split} divides --data-path; {', '.join(per_split)} "
                         f"name(s) each split's datasets: drop --split")
    if per_split and not args.train_data_path and not args.skip_train:
        raise ValueError(f"{', '.join(per_split)} without --train-data-path: give the training "
                         f"datasets with --train-data-path, or --skip-train to only evaluate")
    check_tokenizer_flags(args.tokenizer_type, vars(args))


def _check_checkpointing(args: argparse.Namespace) -> None:
    if args.save_interval is not None and args.save is None:
        raise ValueError("--save-interval needs --save (the directory to save to)")
    if args.finetune and args.load is None:
        raise ValueError("--finetune needs --load (the checkpoint to finetune from)")
    for name in ("--ckpt-step", "--exit-on-missing-checkpoint"):
        if getattr(args, name[2:].replace("-", "_")) not in (None, False) and args.load is None:
            raise ValueError(f"{name} needs --load (the directory to load from)")
    if args.use_mp_args_from_checkpoint_args and not args.use_checkpoint_args:
        raise ValueError("--use-mp-args-from-checkpoint-args needs --use-checkpoint-args")
    if args.async_save and args.ckpt_format != "torch_dist":
        raise ValueError("--async-save needs --ckpt-format torch_dist")
