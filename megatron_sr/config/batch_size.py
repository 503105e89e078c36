"""The global batch size of every step: --global-batch-size, its Megatron ramp
(--rampup-batch-size), the token-keyed --step-batch-size-schedule, and the run
length in iterations they give for --train-samples.

The `derive_*` functions read parsed flags (an argparse Namespace of
`megatron_sr.config.arguments.build_parser`) and raise ValueError naming the
flags at fault; `global_batch_size_at` is what the training loop asks each step.
"""
from __future__ import annotations

import argparse
import decimal
from typing import Optional

from megatron_sr.config.training import TrainingConfig


def global_batch_size_at(training: TrainingConfig, consumed_samples: int) -> int:
    """The global batch size of the step that starts after `consumed_samples`
    samples: --global-batch-size, or under --rampup-batch-size START INCREMENT
    SAMPLES Megatron's ramp: START + INCREMENT x (consumed_samples //
    (SAMPLES / number of increments)), at most --global-batch-size; under
    --step-batch-size-schedule the batch size of the last entry whose first
    sample is <= `consumed_samples`."""
    if training.step_batch_size_schedule is not None:
        size = training.step_batch_size_schedule[0][1]
        for first_sample, batch_size in training.step_batch_size_schedule:
            if first_sample > consumed_samples:
                break
            size = batch_size
        return size
    if training.rampup_batch_size is None:
        return training.global_batch_size
    start, increment, samples = training.rampup_batch_size
    increments = (training.global_batch_size - start) // increment
    if increments == 0 or consumed_samples > samples:
        return training.global_batch_size
    per_increment = samples / increments
    return min(training.global_batch_size, start + increment * int(consumed_samples / per_increment))


def derive_global_batch_size(args: argparse.Namespace, data_parallel_size: int,
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


def derive_rampup_batch_size(args: argparse.Namespace, global_batch_size: int,
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


def derive_step_batch_size_schedule(args: argparse.Namespace, data_parallel_size: int
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


def derive_train_iters(args: argparse.Namespace, global_batch_size: int,
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


MAX_MICROBATCHES_PER_STEP = 1_000_000
"""Far above any real run (Megatron-LM recipes at 1,024 GPUs take tens to
thousands); more is a mistyped --global-batch-size, which would otherwise sit
building sample indices or looping over micro-batches with no error."""


def check_micro_batches_per_step(global_batch_size: int, micro_batch_size: int,
                                  data_parallel_size: int) -> None:
    per_step = global_batch_size // (micro_batch_size * data_parallel_size)
    if per_step > MAX_MICROBATCHES_PER_STEP:
        raise ValueError(f"--global-batch-size {global_batch_size} means {per_step} micro-batches "
                         f"per step on each of the {data_parallel_size} data-parallel ranks "
                         f"(--micro-batch-size {micro_batch_size}), more than "
                         f"{MAX_MICROBATCHES_PER_STEP:,}: a typo?")
