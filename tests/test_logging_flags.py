"""Megatron-LM's logging and check flags, end to end through pretrain().

Spec (issue 33):
- --log-params-norm: at each log step the L2 norm of all parameters after the
  step, in the log line ("params norm") and as TensorBoard's "params-norm":
  the norm of the whole model as the checkpoint of that iteration holds it,
  although each rank measured only its ZeRO-1 shard.
- --log-num-zeros-in-grad: the number of zero elements of the step's reduced
  gradients ("num zeros", "num-zeros"): a direct count over the gradient shards
  of all DP ranks put together.
- --log-memory-to-tensorboard: memory scalars at each log step;
  --log-validation-ppl-to-tensorboard: "lm loss validation ppl" = exp(loss);
  without these flags none of their scalars is written.
- --log-progress: <--save>/progress.txt in Megatron-LM's format, a line when
  the job starts and after each save; a resumed job appends, and the
  cumulative throughput counts from the first job of the same world size.
- --no-check-for-nan-in-loss-and-grad: NaN/Inf steps are still skipped but
  no longer stop the job at --max-skipped-iterations.
- --wandb-entity reaches wandb.init.
"""
from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest

from job_harness import VOCAB, checkpoint_files, pretrain_worker, tiny_gpt_argv
from multiprocess import run_ranks

ITERS = 3


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def recording_worker(rank: int, world_size: int, argv: list[str]) -> dict:
    """`pretrain_worker`, recording at each optimizer step this rank's shard of
    the reduced gradients: {"grads": [{(parameter name, offset): fp32 array}]}."""
    from megatron_sr.optimizer.distributed_optimizer import DistributedOptimizer

    step, grads = DistributedOptimizer.step, []

    def recording_step(self, *args, **kwargs):
        buffer, finish = self.buffer, self.buffer.finish_grad_sync

        def finish_and_record():
            finish()
            grads.append({(buffer.infos[s.param_index].name, s.param_offset):
                          buffer.grad_buffer[s.buffer_start:s.buffer_end].float().numpy().copy()
                          for s in buffer.segments})

        buffer.finish_grad_sync = finish_and_record
        try:
            return step(self, *args, **kwargs)
        finally:
            del buffer.finish_grad_sync

    DistributedOptimizer.step = recording_step
    try:
        result = pretrain_worker(rank, world_size, argv)
    finally:
        DistributedOptimizer.step = step
    return dict(result, grads=grads)


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """DP = 2 with the distributed optimizer (ZeRO-1 shards) and untied
    embeddings (rows of tokens a step does not see get exactly zero gradients),
    every flag on, a checkpoint every iteration; then a resumed job."""
    root = tmp_path_factory.mktemp("flags")
    flags = dict(global_batch_size=8, use_distributed_optimizer=True,
                 untie_embeddings_and_output_weights=True, tensorboard_dir=str(root / "tb"),
                 save=str(root / "ckpt"), save_interval=1, eval_interval=2, eval_iters=1,
                 log_params_norm=True, log_num_zeros_in_grad=True,
                 log_memory_to_tensorboard=True, log_validation_ppl_to_tensorboard=True,
                 log_progress=True, lr_decay_iters=10)
    first = run_ranks(recording_worker, 2, tiny_gpt_argv(train_iters=ITERS, **flags),
                      env={"WORLD_SIZE": "2", "SLURM_JOB_ID": "4242"}, timeout=240)
    with open(root / "ckpt" / "progress.txt", encoding="utf-8") as f:
        first_progress = f.read()
    resumed = run_ranks(pretrain_worker, 2,
                        tiny_gpt_argv(train_iters=ITERS + 1, load=str(root / "ckpt"), **flags),
                        False, None, env={"WORLD_SIZE": "2"}, timeout=240)
    return {"root": root, "first": first, "resumed": resumed, "scalars": _scalars(root / "tb"),
            "first_progress": first_progress}


@pytest.mark.slow
def test_params_norm_is_the_saved_models_norm(logged):
    scalars, stdout = logged["scalars"], logged["first"][-1]["stdout"]
    logged_norms = [float(v) for v in re.findall(r"\| params norm: ([0-9.]+) \|", stdout)]
    assert len(logged_norms) == ITERS
    for iteration in range(1, ITERS + 1):
        model = checkpoint_files(str(logged["root"] / "ckpt"), iteration)["mp_rank_00"]["model"]
        expected = math.sqrt(sum(float((v.double() ** 2).sum()) for v in model.values()))
        (value,) = [v for step, v in scalars["params-norm"] if step == iteration]
        assert value == pytest.approx(expected, rel=1e-5)
        assert logged_norms[iteration - 1] == pytest.approx(expected, abs=1e-3)
    assert [s for s, _ in scalars["params-norm vs samples"]][:ITERS] == [8, 16, 24]


@pytest.mark.slow
def test_params_norm_counts_replicated_and_tied_parameters_once(tmp_path):
    """TP 2 x PP 2, bf16-mixed without the distributed optimizer: norm weights
    are held by both TP ranks and the tied word embedding by the first and the
    last stage; the logged norm is still the merged model's, of its fp32
    master copy."""
    from megatron_sr.checkpointing.conversion import load_full_checkpoint

    argv = tiny_gpt_argv(train_iters=2, global_batch_size=4, tensor_model_parallel_size=2,
                         pipeline_model_parallel_size=2, precision="bf16-mixed",
                         log_params_norm=True, tensorboard_dir=str(tmp_path / "tb"),
                         save=str(tmp_path / "ckpt"))
    run_ranks(pretrain_worker, 4, argv, env={"WORLD_SIZE": "4"}, timeout=240)
    master = load_full_checkpoint(str(tmp_path / "ckpt")).optimizer["params"]["master"]
    assert any(name.endswith("layernorm.weight") for name in master)
    expected = math.sqrt(sum(float((v.double() ** 2).sum()) for v in master.values()))
    assert _scalars(tmp_path / "tb")["params-norm"][-1] == (2, pytest.approx(expected, rel=1e-5))


@pytest.mark.slow
def test_num_zeros_is_a_direct_count_of_the_reduced_gradients(logged):
    ranks = logged["first"]
    counts = []
    for step in range(ITERS):
        pieces = {}
        for rank in ranks:  # each element lives in exactly one DP rank's shard
            for key, values in rank["grads"][step].items():
                assert key not in pieces
                pieces[key] = values
        counts.append(sum(int((values == 0).sum()) for values in pieces.values()))
    assert all(count > 0 for count in counts)  # unseen tokens' embedding rows
    assert [int(v) for _, v in logged["scalars"]["num-zeros"][:ITERS]] == counts
    line_counts = re.findall(r"\| grad norm: [0-9.]+ \| num zeros: ([0-9.]+) \| params norm",
                             ranks[-1]["stdout"])
    assert [float(c) for c in line_counts] == [float(c) for c in counts]


@pytest.mark.slow
def test_memory_and_validation_perplexity_scalars(logged):
    scalars = logged["scalars"]
    for tag in ("mem-allocated-bytes", "mem-max-allocated-bytes"):
        assert [step for step, _ in scalars[tag]] == list(range(1, ITERS + 2)), tag
        assert all(value > 1 << 20 for _, value in scalars[tag]), tag
    for (_, now), (_, peak) in zip(scalars["mem-allocated-bytes"],
                                   scalars["mem-max-allocated-bytes"]):
        assert now <= peak
    losses = dict(scalars["lm loss validation"])
    ppl = dict(scalars["lm loss validation ppl"])
    assert sorted(ppl) == sorted(losses) and 2 in ppl
    for step, value in ppl.items():
        assert value == pytest.approx(math.exp(losses[step]), rel=1e-5)


@pytest.mark.gpu
def test_cuda_memory_scalars_are_the_allocators():
    import torch

    from megatron_sr.training_log import memory_scalars

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    device = torch.device("cuda")
    held = torch.empty(64 << 20, dtype=torch.uint8, device=device)
    scalars = memory_scalars(device)
    assert set(scalars) == {"mem-reserved-bytes", "mem-allocated-bytes",
                            "mem-max-allocated-bytes", "mem-allocated-count"}
    assert scalars["mem-allocated-bytes"] >= held.numel()
    assert scalars["mem-max-allocated-bytes"] >= scalars["mem-allocated-bytes"]
    assert scalars["mem-reserved-bytes"] >= scalars["mem-allocated-bytes"]
    assert scalars["mem-allocated-count"] >= 1


PROGRESS_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\tJob ID: (?P<job>\d*)\t# GPUs: 2\t"
    r"(?:Starting job|Saved checkpoint\tIteration: (?P<iteration>\d+)\t"
    r"Job throughput: (?P<job_tflops>[0-9.]+) TFLOP/s/GPU\t"
    r"Cumulative throughput: (?P<cumulative>[0-9.]+) TFLOP/s/GPU\t"
    r"Floating-point operations: (?P<flops>[0-9.e+]+)\t"
    r"Tokens \(in billions\): (?P<tokens>[0-9.]+))$")


@pytest.mark.slow
def test_progress_file_has_megatrons_lines(logged):
    from megatron_sr.config import parse_args
    from megatron_sr.model import flops_per_token

    first = logged["first_progress"].splitlines()
    lines = (logged["root"] / "ckpt" / "progress.txt").read_text().splitlines()
    assert lines[:len(first)] == first  # appended to, never rewritten
    matches = [PROGRESS_LINE.match(line) for line in lines]
    assert all(matches), lines
    events = [(m["job"], m["iteration"]) for m in matches]
    assert events == [("4242", None), ("4242", "1"), ("4242", "2"), ("4242", "3"),
                      ("", None), ("", "4")]
    job = parse_args(tiny_gpt_argv(train_iters=ITERS, global_batch_size=8),
                     2).with_vocab_size(VOCAB + 1)
    per_sample = flops_per_token(job.model) * job.model.seq_length
    for m in matches[1:4] + matches[5:]:
        assert float(m["flops"]) == pytest.approx(8 * int(m["iteration"]) * per_sample,
                                                  rel=1e-2)
        assert float(m["tokens"]) == 0.0 and float(m["job_tflops"]) >= 0.0


def test_cumulative_start_restarts_at_a_change_of_world_size(tmp_path):
    from megatron_sr.training.progress import cumulative_start

    def line(when, gpus, text):
        return f"2026-12-07 {when}\tJob ID: 1\t# GPUs: {gpus}\t{text}\n"

    def saved(flops):
        return (f"Saved checkpoint\tIteration: 1\tJob throughput: 1.0 TFLOP/s/GPU\t"
                f"Cumulative throughput: 1.0 TFLOP/s/GPU\tFloating-point operations: {flops}\t"
                f"Tokens (in billions): 0.00")

    path = tmp_path / "progress.txt"
    path.write_text(line("10:00:00", 8, "Starting job") + line("10:30:00", 8, saved("1.00e+20"))
                    + line("11:00:00", 16, "Starting job") + line("11:30:00", 16, saved("3.00e+20"))
                    + line("12:00:00", 16, "Starting job"))
    start, operations = cumulative_start(str(path), 16)
    assert (start.hour, start.minute, operations) == (11, 0, 1e20)
    assert cumulative_start(str(path), 8) is None  # the 16-GPU jobs came after
    path.write_text(path.read_text() + "not a progress line\n")
    with pytest.raises(ValueError, match=r"progress.txt line 6 is not a progress line"):
        cumulative_start(str(path), 16)


@pytest.mark.slow
def test_without_the_flags_none_of_their_records_and_nan_steps_do_not_stop(tmp_path):
    """--no-check-for-nan-in-loss-and-grad: 3 NaN steps in a row with
    --max-skipped-iterations 2 are skipped and counted, and the job goes on."""
    argv = tiny_gpt_argv(train_iters=5, global_batch_size=4, max_skipped_iterations=2,
                         no_check_for_nan_in_loss_and_grad=True, eval_interval=2, eval_iters=1,
                         tensorboard_dir=str(tmp_path / "tb"), save=str(tmp_path / "ckpt"))
    (result,) = run_ranks(pretrain_worker, 1, argv, env={
        "WORLD_SIZE": "1", "MEGATRON_SR_INJECT_NAN_GRAD_AT": "2,3,4"}, timeout=240)
    assert [r["skipped"] for r in result["reports"]] == [False, True, True, True, False]
    assert result["last_iteration"] == 5
    assert re.search(r"iteration\s+5/\s+5 .*number of skipped iterations:\s+3 \|",
                     result["stdout"])
    scalars = _scalars(tmp_path / "tb")
    assert "lm loss validation" in scalars
    for tag in ("lm loss validation ppl", "params-norm", "num-zeros", "mem-allocated-bytes",
                "mem-max-allocated-bytes"):
        assert tag not in scalars, tag
    assert "params norm" not in result["stdout"] and "num zeros" not in result["stdout"]
    assert not os.path.exists(tmp_path / "ckpt" / "progress.txt")


def test_log_line_has_megatrons_num_zeros_and_params_norm_after_grad_norm():
    import datetime

    from megatron_sr.training_log import format_log_line

    line = format_log_line(iteration=1, train_iters=2, consumed_samples=8, elapsed_ms=1.0,
                           tflops_per_device=0.0, lr=1e-4, global_batch_size=8, loss=2.0,
                           grad_norm=0.8123, skipped=0, nan_iterations=0, tokens_per_s=1.0,
                           update_absorption=None, num_zeros_in_grad=1234,
                           params_norm=31.41592, now=datetime.datetime(2026, 12, 7))
    assert " grad norm: 0.812 | num zeros: 1234.0 | params norm: 31.416 |" \
           " number of skipped iterations:   0 |" in line


def test_wandb_entity_reaches_wandb_init(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from megatron_sr.config import TrainingConfig
    from megatron_sr.training_log import open_metrics_writer

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    training = TrainingConfig(wandb_project="megatron-sr-test", wandb_entity="sr-team",
                              wandb_save_dir=str(tmp_path))
    metrics = open_metrics_writer(training, True)
    try:
        assert (metrics.wandb_run.entity, metrics.wandb_run.project) == (
            "sr-team", "megatron-sr-test")
    finally:
        metrics.close()


def test_flags_parse_into_the_training_config():
    from megatron_sr.config import parse_args

    plain = parse_args(tiny_gpt_argv(train_iters=2), 1).training
    assert (plain.log_params_norm, plain.log_num_zeros_in_grad, plain.log_memory_to_tensorboard,
            plain.log_validation_ppl_to_tensorboard, plain.log_progress, plain.wandb_entity,
            plain.check_for_nan_in_loss_and_grad) == (False,) * 5 + (None, True)
    argv = tiny_gpt_argv(train_iters=2, log_params_norm=True, log_num_zeros_in_grad=True,
                         log_memory_to_tensorboard=True, log_validation_ppl_to_tensorboard=True,
                         log_progress=True, wandb_entity="team",
                         no_check_for_nan_in_loss_and_grad=True)
    given = parse_args(argv, 1).training
    assert (given.log_params_norm, given.log_num_zeros_in_grad, given.log_memory_to_tensorboard,
            given.log_validation_ppl_to_tensorboard, given.log_progress, given.wandb_entity,
            given.check_for_nan_in_loss_and_grad) == (True,) * 5 + ("team", False)
