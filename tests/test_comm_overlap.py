"""Communication overlap, recorded on Gloo: the order of the data-parallel
collectives against the backward hooks and the forward.

Spec (docs/DESIGN.md "Distributed optimizer", overlap):
- with --overlap-grad-reduce every bucket's reduce-scatter is launched from a
  backward hook, before the step's backward ends, including the buckets that
  hold sequence-parallel norms (TP 2 + --sequence-parallel) and the tied word
  embedding (PP 2): their TP / embedding-group sums run afterwards, on the shard;
- with --overlap-param-gather the all-gathers are issued in forward order (the
  bucket of the first layers first), and the first module of the next forward
  waits for its own bucket only, while every other bucket is still pending;
- the optimizer step launches each bucket's all-gather right after that
  bucket's AdamW update, buckets in forward order (the updates of later
  buckets overlap it), except when it measures update absorption;
- the tied embedding has a bucket of its own, so its DP shards match on both
  stages and its two copies stay bit-identical (PP 2 x DP 2).
Every step is the real `training.train_step`; the recording wraps the
buffer's methods and calls through.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from job_harness import VOCAB, tiny_gpt_argv
from multiprocess import run_ranks

MICRO = 2
STEPS = 3
BUCKET = 2000  # elements: several buckets in the tiny GPT


def _record_steps(rank: int, world_size: int, argv: list[str]) -> dict:
    from megatron_sr import parallel_state, training
    from megatron_sr.config import parse_args
    from megatron_sr.model import named_parameters_global
    from megatron_sr.optimizer import param_buffer
    from megatron_sr.training import loop

    events: list[tuple] = []
    buffer_cls = param_buffer.ParamAndGradBuffer
    originals = {name: getattr(buffer_cls, name) for name in
                 ("_accumulate_grad", "_launch_grad_reduce", "wait_param_gather")}
    all_gather, get_schedule = param_buffer.all_gather_into, loop.get_forward_backward_func

    def accumulate_grad(self, param):
        events.append(("grad", self._bucket_of_param[id(param)], param.grad_added_to_main_grad))
        originals["_accumulate_grad"](self, param)

    def launch_grad_reduce(self, bucket, async_op):
        events.append(("reduce", bucket, async_op))
        originals["_launch_grad_reduce"](self, bucket, async_op)

    def wait_param_gather(self, param=None):
        buckets = (range(len(self._gather_handles)) if param is None
                   else [self._bucket_of_param[id(param)]])
        waited = [b for b in buckets if self._gather_handles[b] is not None]
        if waited:
            pending = sum(h is not None for h in self._gather_handles)
            events.append(("wait", waited, pending))
        originals["wait_param_gather"](self, param)

    def gather(output, input, **kwargs):
        events.append(("gather", output.storage_offset()))
        return all_gather(output, input, **kwargs)

    def schedule():
        run = get_schedule()

        def recorded(**kwargs):
            events.append(("forward-backward start",))
            losses = run(**kwargs)
            events.append(("backward end",))
            return losses
        return recorded

    buffer_cls._accumulate_grad = accumulate_grad
    buffer_cls._launch_grad_reduce = launch_grad_reduce
    buffer_cls.wait_param_gather = wait_param_gather
    param_buffer.all_gather_into = gather
    loop.get_forward_backward_func = schedule
    job = parse_args(argv, world_size).with_vocab_size(VOCAB + 1)
    device = training.initialize_distributed(job)
    try:
        model, optimizer, scheduler = training.setup_model_and_optimizer(job, BUCKET)
        buffer = optimizer.buffer
        forward_step = training.make_forward_step(optimizer.strategy, device)
        first_module_params = next(chunk for chunk in model).parameters()
        losses = []
        for step in range(STEPS):
            gen = torch.Generator().manual_seed(100 + step)
            batches = list(torch.randint(0, VOCAB, (job.num_microbatches, MICRO, 17),
                                         generator=gen))
            iterators = [iter(batches) if chunk.pre_process or chunk.post_process else None
                         for chunk in model]
            events.append(("step", step))
            report = training.train_step(job, model, optimizer, iterators, scheduler.get_lr(),
                                         forward_step)
            scheduler.step()
            losses.append(report.loss)
        buffer.wait_param_gather()
        named = dict(named_parameters_global(model))
        tied = [name for name, p in named.items() if p.shared_embedding]
        return {
            "events": events,
            "bucket_starts": [start for start, _ in buffer.layout.bucket_ranges],
            "num_buckets": len(buffer.layout.bucket_ranges),
            "first_param_bucket": buffer._bucket_of_param[id(next(first_module_params))],
            "sequence_parallel_buckets": sorted({buffer._bucket_of_param[id(p)]
                                                 for p in named.values() if p.sequence_parallel}),
            "tied_bucket_members": [len(buffer.layout.bucket_params[buffer._bucket_of_param[
                id(named[name])]]) for name in tied],
            "tied": {name: named[name].detach().float().numpy().copy() for name in tied},
            "losses": losses,
            "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
            "dp_rank": parallel_state.get_data_parallel_rank(),
            "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        }
    finally:
        for name, function in originals.items():
            setattr(buffer_cls, name, function)
        param_buffer.all_gather_into = all_gather
        loop.get_forward_backward_func = get_schedule
        parallel_state.destroy_model_parallel()


def _argv(**flags) -> list[str]:
    return tiny_gpt_argv(micro_batch_size=MICRO, global_batch_size=2 * MICRO * 2, lr=1e-2,
                         train_iters=100, use_distributed_optimizer=True,
                         overlap_grad_reduce=True, overlap_param_gather=True,
                         hidden_dropout=0.0, attention_dropout=0.0, **flags)


@pytest.fixture(scope="module")
def tp2_sp_dp2():
    return run_ranks(_record_steps, 4, _argv(tensor_model_parallel_size=2,
                                             sequence_parallel=True), timeout=300)


@pytest.fixture(scope="module")
def pp2_dp2():
    return run_ranks(_record_steps, 4, _argv(pipeline_model_parallel_size=2), timeout=300)


@pytest.fixture(scope="module")
def dp2_fused():
    return run_ranks(_record_steps, 2, _argv(gradient_accumulation_fusion=True,
                                             untie_embeddings_and_output_weights=True),
                     timeout=300)


def _steps(events: list[tuple]) -> list[list[tuple]]:
    """The events of each step, from its ("step", i) marker to the next."""
    steps = []
    for event in events:
        if event[0] == "step":
            steps.append([])
        elif steps:
            steps[-1].append(event)
    return steps


def _check_every_reduce_launched_from_backward(result: dict) -> None:
    for step in _steps(result["events"]):
        end = step.index(("backward end",))
        reduces = [e for e in step if e[0] == "reduce"]
        assert sorted(e[1] for e in reduces) == list(range(result["num_buckets"]))
        assert all(e[2] for e in reduces), "a bucket was reduced synchronously after backward"
        assert all(step.index(e) < end for e in reduces)
        # Each bucket is launched right after its last grad arrived, not batched at the end.
        first_reduce = step.index(reduces[0])
        assert any(e[0] == "grad" for e in step[first_reduce:end])


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2_sp_dp2", "pp2_dp2", "dp2_fused"])
def test_every_bucket_reduce_is_launched_before_backward_ends(layout, request):
    results = request.getfixturevalue(layout)
    for result in results:
        _check_every_reduce_launched_from_backward(result)
        fused = [e[2] for e in result["events"] if e[0] == "grad"]
        # --gradient-accumulation-fusion: the linear weights' grads (4 per layer and the
        # output layer's, of each micro-batch) arrive already added; the rest are added.
        expected = 0 if layout != "dp2_fused" else (4 * 2 + 1) * 2 * STEPS
        assert sum(fused) == expected
    if layout == "tp2_sp_dp2":  # the buckets that used to wait for the end of backward
        assert all(r["sequence_parallel_buckets"] for r in results)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2_sp_dp2", "pp2_dp2"])
def test_param_gathers_run_in_forward_order_and_the_first_layer_waits_for_its_own(layout,
                                                                                 request):
    for result in request.getfixturevalue(layout):
        n = result["num_buckets"]
        assert n >= 4
        starts = result["bucket_starts"]
        for step in _steps(result["events"])[:-1]:
            gathers = [starts.index(e[1]) for e in step if e[0] == "gather"]
            assert gathers == list(reversed(range(n)))  # the first layers' bucket first
        for step in _steps(result["events"])[1:]:
            forward_backward = step[step.index(("forward-backward start",)):
                                    step.index(("backward end",))]
            waits = [e for e in forward_backward if e[0] == "wait"]
            first_waited, pending = waits[0][1], waits[0][2]
            assert first_waited == [result["first_param_bucket"]] == [n - 1]
            assert pending == n  # every other bucket's all-gather still outstanding
            assert [e[1] for e in waits] == [[b] for b in reversed(range(n))]


@pytest.mark.slow
def test_tied_embedding_has_its_own_bucket_and_both_copies_stay_identical(pp2_dp2):
    by_position = {(r["pp_rank"], r["dp_rank"]): r for r in pp2_dp2}
    for dp in (0, 1):
        first, last = by_position[(0, dp)], by_position[(1, dp)]
        assert first["tied_bucket_members"] == last["tied_bucket_members"] == [1]
        (name,) = first["tied"]
        np.testing.assert_array_equal(first["tied"][name], last["tied"][name])
    losses = next(r["losses"] for r in pp2_dp2 if r["pp_rank"] == 1)
    assert all(np.isfinite(losses))


# ----- host synchronizations of the training loop ------------------------------------------

LOG_INTERVAL, ITERS = 3, 6


def _count_loss_reductions(rank: int, world_size: int, argv: list[str]) -> dict:
    """Runs the real job, recording in order: the loss all-reduces (the
    synchronous fallback and the ones started before an optimizer step, with
    the number of added losses they cover), the optimizer steps, the
    parameter all-gathers, every step's local loss as the loop hands it over,
    and the function that issued each all-reduce over the whole world."""
    import collections
    import contextlib
    import io
    import sys

    import torch.distributed as dist

    from megatron_sr import training
    from megatron_sr.optimizer import param_buffer
    from megatron_sr.optimizer.distributed_optimizer import DistributedOptimizer
    from megatron_sr.training import loop

    events, local_losses = [], []
    world_reductions = collections.Counter()
    originals = dict(average=loop._average_over_dp, add=training.LossAccumulator.add,
                     start=training.LossAccumulator.start_reduction, all_reduce=dist.all_reduce,
                     step=DistributedOptimizer.step, gather=param_buffer.all_gather_into)

    def counting_average(values, device):
        events.append(("synchronous loss all-reduce", len(values)))
        return originals["average"](values, device)

    def recording_start(self, step_loss):
        events.append(("loss all-reduce", len(self.values)))
        originals["start"](self, step_loss)

    def recording_add(self, local_mean):
        local_losses.append(local_mean.item())
        originals["add"](self, local_mean)

    def recording_all_reduce(tensor, *args, group=None, **kwargs):
        if group is None or group is dist.group.WORLD:
            world_reductions[sys._getframe(1).f_code.co_name] += 1
        return originals["all_reduce"](tensor, *args, group=group, **kwargs)

    def recording_step(self, *args, **kwargs):
        events.append(("optimizer step",))
        return originals["step"](self, *args, **kwargs)

    def recording_gather(*args, **kwargs):
        events.append(("gather",))
        return originals["gather"](*args, **kwargs)

    loop._average_over_dp = counting_average
    training.LossAccumulator.add = recording_add
    training.LossAccumulator.start_reduction = recording_start
    dist.all_reduce = recording_all_reduce
    DistributedOptimizer.step = recording_step
    param_buffer.all_gather_into = recording_gather
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            training.pretrain(argv=argv)
    finally:
        loop._average_over_dp, training.LossAccumulator.add = (originals["average"],
                                                                   originals["add"])
        training.LossAccumulator.start_reduction = originals["start"]
        dist.all_reduce, DistributedOptimizer.step = originals["all_reduce"], originals["step"]
        param_buffer.all_gather_into = originals["gather"]
    return {"events": events, "local_losses": local_losses,
            "world_reductions": dict(world_reductions), "stdout": stdout.getvalue()}


@pytest.mark.slow
def test_the_loss_is_reduced_and_read_only_at_log_steps_ahead_of_the_param_gathers():
    import re

    argv = tiny_gpt_argv(train_iters=ITERS, log_interval=LOG_INTERVAL, global_batch_size=8,
                         micro_batch_size=2, use_distributed_optimizer=True,
                         overlap_param_gather=True)
    results = run_ranks(_count_loss_reductions, 2, argv, timeout=300,
                        env={"WORLD_SIZE": "2"})
    for result in results:
        events = result["events"]
        steps = [i for i, e in enumerate(events) if e[0] == "optimizer step"]
        reductions = [e for e in events if "loss all-reduce" in e[0]]
        # One all-reduce per log line, started before the log step's optimizer step (so
        # ahead of its parameter all-gathers on the DP communicator), covering the
        # interval's earlier steps (the loop's accumulator holds one loss per step).
        assert reductions == [("loss all-reduce", LOG_INTERVAL - 1)] * (ITERS // LOG_INTERVAL)
        for log_step in range(LOG_INTERVAL, ITERS + 1, LOG_INTERVAL):
            assert events[steps[log_step - 1] - 1][0] == "loss all-reduce"
            assert events[steps[log_step - 1] + 1][0] == "gather"
        assert len(result["local_losses"]) == ITERS
        # Over the whole world, per step only the grad-norm all-reduce (which carries the
        # exit flags: no agreement of their own), and at log steps the update absorption's.
        assert result["world_reductions"] == {"_grad_norm": ITERS,
                                              "step": ITERS // LOG_INTERVAL}
    logged = [float(v) for v in re.findall(r"lm loss: ([0-9.E+-]+) \|", results[-1]["stdout"])]
    per_step = np.mean([r["local_losses"] for r in results], axis=0)  # the DP mean
    expected = [per_step[i:i + LOG_INTERVAL].mean() for i in range(0, ITERS, LOG_INTERVAL)]
    np.testing.assert_allclose(logged, expected, rtol=1e-5)


# ----- the optimizer step: each bucket's all-gather right after its update ------------------

def _record_update_and_gather_order(rank: int, world_size: int, measure: bool) -> list:
    """One DP-2 `DistributedOptimizer.step` of a GPT-shaped buffer of several
    buckets, recording in order each bucket's AdamW call and each all-gather,
    by bucket index (the real kernels and collectives run)."""
    from megatron_sr.optimizer import distributed_optimizer, param_buffer
    from test_precision_shard_step import fill_grads, make_optimizer

    optimizer = make_optimizer("bf16-sr", bucket_size=1500, layers=2)
    buffer = optimizer.buffer
    starts = [start for start, _ in buffer.layout.bucket_ranges]
    shard_starts = [buffer.shard_range(b)[0] for b in range(len(starts))]
    fill_grads(optimizer, seed=rank)
    events = []
    update, gather = distributed_optimizer.adamw_shard_step, param_buffer.all_gather_into

    def recording_update(strategy, params, *args, **kwargs):
        events.append(("update", shard_starts.index(params.storage_offset())))
        return update(strategy, params, *args, **kwargs)

    def recording_gather(output, input, **kwargs):
        events.append(("gather", starts.index(output.storage_offset())))
        return gather(output, input, **kwargs)

    distributed_optimizer.adamw_shard_step = recording_update
    param_buffer.all_gather_into = recording_gather
    try:
        optimizer.step(lr=1e-2, measure_update_absorption=measure)
    finally:
        distributed_optimizer.adamw_shard_step, param_buffer.all_gather_into = update, gather
    return events


@pytest.mark.parametrize("measure", [False, True])
def test_each_bucket_is_gathered_right_after_its_own_update(measure):
    for events in run_ranks(_record_update_and_gather_order, 2, measure, timeout=120):
        buckets = sorted({bucket for _, bucket in events})
        assert len(buckets) >= 3
        forward_order = list(reversed(buckets))  # the first layers' bucket first
        if measure:  # every update feeds the all-reduced counts, which go first
            expected = [("update", b) for b in forward_order] + [("gather", b) for b in forward_order]
        else:
            expected = [event for b in forward_order for event in (("update", b), ("gather", b))]
        assert events == expected
