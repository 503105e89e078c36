"""The entry point: `pretrain` (what pretrain_gpt.py runs on every rank) and
`main` (the default GPT with errors as messages)."""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, Optional, Sequence

import torch.distributed as dist

from megatron_sr import checkpointing, fault_injection, parallel_state
from megatron_sr.config import parse_args
from megatron_sr.training.console import print_rank_0, write_whole_lines
from megatron_sr.training.data import DataStreams
from megatron_sr.training.errors import exit_on_job_error
from megatron_sr.training.forward_step import make_forward_step
from megatron_sr.training.loop import consumed_after, open_job_metrics, run_evaluation, train
from megatron_sr.training.policy import SignalFlag
from megatron_sr.training.progress import STARTING_JOB, append_progress
from megatron_sr.training.setup import (build_job_tokenizer, initialize_distributed,
                                        print_setup, print_training_state,
                                        setup_model_and_optimizer)


def pretrain(train_valid_test_datasets_provider: Optional[Callable] = None,
             model_provider: Optional[Callable] = None,
             forward_step_func: Optional[Callable] = None, *,
             argv: Optional[Sequence[str]] = None) -> int:
    """Parses Megatron-style flags (`argv`; None: sys.argv[1:]) and trains what
    the providers describe, then evaluates (validation unless just done, test);
    with --skip-train only evaluates the loaded model. Returns the last
    iteration. Called on every rank (torchrun sets RANK/WORLD_SIZE; one rank
    without it). Megatron-LM's providers, with the job's typed config passed as
    keyword arguments where Megatron reads its global args (None: the GPT
    recipe's, `megatron_sr.recipes.gpt`):

    - `train_valid_test_datasets_provider(train_val_test_num_samples, *, job,
      tokenizer) -> (train, valid, test)`: map-style datasets whose item i is
      {"tokens": int64 tensor [seq_length + 1]}; valid None skips evaluation,
      test (None: none) is evaluated once after training. Called once on every
      rank; the counts are what the run consumes (train: --train-iters x global
      batch, 0 with --skip-train; `train_valid_test_num_samples`).
    - `model_provider(pre_process, post_process, *, job, layers, device) ->
      model chunk`: the global layers `layers` of the model, with the embedding
      when `pre_process` and the output layer and loss when `post_process`,
      built on `device`; called once per chunk on every rank. The chunk keeps
      GPTModel's interface: `pre_process`/`post_process`, `set_input_tensor`,
      [s, b, h] hidden states between stages, and parameters made by
      megatron_sr's layers (`build_model` initializes them from `global_name`
      and `init_method`). Default: `GPTModel(job.model, ...)`.
    - `forward_step_func(data_iterator, model) -> (output_tensor, loss_func)`:
      one micro-batch through the chunk `model`, drawn from `data_iterator`
      (int64 CPU rows [micro_batch_size, seq_length + 1]; None on chunks that
      neither embed nor compute the loss: `get_batch` handles both). On the
      last stage `loss_func(output_tensor)` returns the micro-batch's loss, a
      scalar tensor: the schedule backpropagates its mean over micro-batches
      and the log line reports it averaged over data-parallel ranks. It runs
      under torch.autocast for --precision amp.
    """
    job_start_time = time.time()
    write_whole_lines()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    job = parse_args(list(argv) if argv is not None else None, world_size)
    # From here to the end, SIGTERM and --exit-signal set a flag the loop reads after
    # its first step: a signal during set-up (Slurm's time-limit signal while a large
    # checkpoint loads) is not lost, and it does not kill the rank.
    exit_flag = SignalFlag(job.training.exit_signal)
    try:
        device = initialize_distributed(job)
    except BaseException:
        exit_flag.restore()
        raise
    try:
        fault_injection.at("setup")
        if job.training.log_progress and job.training.save and dist.get_rank() == 0:
            append_progress(job.training.save, job.world_size, STARTING_JOB)
        tokenizer = build_job_tokenizer(job)
        job = job.with_vocab_size(tokenizer.vocab_size)
        print_setup(job, device)
        model, optimizer, scheduler = setup_model_and_optimizer(job,
                                                                model_provider=model_provider)
        print_training_state(job, optimizer, device)
        iteration, consumed = checkpointing.load_training_checkpoint(job, model, optimizer,
                                                                     scheduler)
        data = DataStreams(job, tokenizer, model, train_valid_test_datasets_provider)
        metrics = open_job_metrics(job)  # one TensorBoard writer / wandb run for the whole job
        try:
            if job.training.skip_train:
                print_rank_0(f"[skip-train] no training: evaluating the model of iteration "
                             f"{iteration}")
                last, stopped_early, valid_done = iteration, False, False
            else:
                last, stopped_early = train(job, model, optimizer, scheduler, data, iteration,
                                            consumed, forward_step_func, metrics,
                                            exit_flag=exit_flag, job_start_time=job_start_time)
                checkpointing.finish_pending_save()
                valid_done = job.training.eval_interval \
                    and last % job.training.eval_interval == 0
            if not stopped_early:
                _final_evaluations(job, model, data, make_forward_step(
                    optimizer.strategy, device, forward_step_func=forward_step_func), last,
                    metrics, consumed_after(job, consumed, last - iteration), valid_done)
        finally:
            metrics.close()
        return last
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
        exit_flag.restore()


def _final_evaluations(job, model, data: DataStreams, forward_step, iteration: int, metrics,
                       consumed_samples: int, valid_done: bool) -> None:
    """After training (every rank): the validation split unless `valid_done`
    (evaluated at this iteration already), then the test split, each when it
    exists and --eval-iters > 0. --skip-train writes no scalars (as Megatron)."""
    if not job.training.eval_iters:
        return
    written = None if job.training.skip_train else metrics
    if not valid_done and data.valid is not None:
        run_evaluation(job, model, data, forward_step, iteration, written, consumed_samples)
    if data.test is not None:
        run_evaluation(job, model, data, forward_step, iteration, written, consumed_samples,
                       split="test")


def main() -> None:
    """`pretrain` of the default GPT on sys.argv's flags, errors as messages."""
    with exit_on_job_error():
        pretrain(argv=sys.argv[1:])
