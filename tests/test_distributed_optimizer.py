"""The distributed optimizer is the single-rank optimizer, sharded.

Spec (issue 5, docs/DESIGN.md "Stochastic rounding: the contract", point 2):
- bf16-sr at DP = 1, 2 and 4, every DP rank fed the same micro-batches, so
  the reduced gradients are identical: the parameters after several steps are
  bit-identical, with the distributed optimizer (small buckets, so parameters
  straddle shard and bucket boundaries; overlapped grad reduction and param
  gather) and with the all-reduce path. The SR bits do not depend on the DP
  size or on the shard a parameter element lands in.
  How the gradients are made identical: these runs take the FP32-GEMM path for
  BF16 products (`MEGATRON_SR_CPU_BF16_GEMM=fp32`, the default on CPUs
  without native BF16). A CPU's native BF16 GEMMs (AVX512-BF16, AMX) pick
  their blocking inside oneDNN and need not give a DP=1 process the bits a
  DP=2 process gets for the same product, so on such a CPU "same batches"
  would not mean "same gradients" and the comparison would test the GEMM
  library, not the optimizer. The premise is checked before the parameters:
  equal losses, and bit-equal reduced gradients at every step (the DP ranks'
  shards put together equal the DP=1 gradient).
- Each DP rank fed its own micro-batches (Megatron's slicing of one global
  batch): fp32 matches DP = 1 to rounding, bf16-sr is close.
- TP-replicated parameters (norm weights, row-parallel biases) stay
  bit-identical on every TP rank after many bf16-sr steps, with and without
  --sequence-parallel, without any extra synchronization.

Each world size runs once (module-scoped fixtures) and trains every
configuration in sequence in the same ranks; the tests compare the results.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bitwise import as_bits, assert_same_bits
from job_harness import VOCAB, tiny_gpt_argv
from multiprocess import run_ranks

STEPS = 4
MICRO = 2
pytestmark = pytest.mark.slow  # three multi-rank jobs, ~20 s together
SMALL_BUCKET = 1000  # elements: a few small params per bucket, big ones split over DP shards
NO_DROPOUT = dict(hidden_dropout=0.0, attention_dropout=0.0)


def _argv(precision: str, global_batch: int, **flags) -> list[str]:
    # lr 1e-2 moves most elements by more than half a bf16 ulp, so a wrong SR bit
    # or a wrong gradient shows in the parameters.
    return tiny_gpt_argv(precision=precision, micro_batch_size=MICRO,
                         global_batch_size=global_batch, lr=1e-2, train_iters=100, **flags)


def _step_batches(step: int, count: int) -> list[torch.Tensor]:
    """`count` micro-batches [MICRO, seq + 1] of step `step`, the same on every rank."""
    gen = torch.Generator().manual_seed(1000 + step)
    return list(torch.randint(0, VOCAB, (count, MICRO, 17), generator=gen))


def _train_config(world_size: int, argv: list[str], steps: int, data: str,
                  bucket_size: int | None, bf16_gemm: str | None = None) -> dict:
    """One configuration's run on this rank. `bf16_gemm`: force the CPU path of
    BF16 products ('fp32' or 'native', as MEGATRON_SR_CPU_BF16_GEMM) for this
    run only; None keeps the machine's default."""
    import os

    from megatron_sr import cpu_bf16

    saved = os.environ.get("MEGATRON_SR_CPU_BF16_GEMM")
    if bf16_gemm is not None:
        os.environ["MEGATRON_SR_CPU_BF16_GEMM"] = bf16_gemm
    cpu_bf16.cpu_has_native_bf16.cache_clear()
    try:
        return _train(world_size, argv, steps, data, bucket_size)
    finally:
        if saved is None:
            os.environ.pop("MEGATRON_SR_CPU_BF16_GEMM", None)
        else:
            os.environ["MEGATRON_SR_CPU_BF16_GEMM"] = saved
        cpu_bf16.cpu_has_native_bf16.cache_clear()


def _train(world_size: int, argv: list[str], steps: int, data: str,
           bucket_size: int | None) -> dict:
    from megatron_sr import parallel_state, training
    from megatron_sr.config import parse_args
    from megatron_sr.model import named_parameters_global

    job = parse_args(argv, world_size).with_vocab_size(VOCAB + 1)
    device = training.initialize_distributed(job)
    try:
        model, optimizer, scheduler = training.setup_model_and_optimizer(job, bucket_size)
        buffer = optimizer.buffer
        reduced_grads = _record_reduced_grads(buffer)
        initial = {name: p.detach().clone() for name, p in named_parameters_global(model)}
        forward_step = training.make_forward_step(optimizer.strategy, device)
        dp, dp_rank = buffer.dp_size, buffer.dp_rank
        m = job.num_microbatches
        losses, grad_norms = [], []
        for step in range(steps):
            if data == "same":  # every DP rank gets the step's m micro-batches
                mine = _step_batches(step, m)
            else:  # Megatron's slicing of the global batch: micro-batch j of rank r
                batches = _step_batches(step, m * dp)
                mine = [batches[j * dp + dp_rank] for j in range(m)]
            iterators = [iter(mine) if chunk.pre_process or chunk.post_process else None
                         for chunk in model]
            report = training.train_step(job, model, optimizer, iterators, scheduler.get_lr(),
                                         forward_step)
            assert not report.skipped
            scheduler.step()
            losses.append(report.loss)
            grad_norms.append(report.grad_norm)
        buffer.wait_param_gather()
        named = dict(named_parameters_global(model))
        return {
            "losses": losses,
            "grad_norms": grad_norms,
            "reduced_grads": reduced_grads,
            "params": {name: p.detach().float().numpy().copy() for name, p in named.items()},
            "initial": {name: p.float().numpy() for name, p in initial.items()},
            "replicated": sorted(name for name, p in named.items() if not p.tensor_model_parallel),
            "changed_fraction": float(sum((p.detach() != initial[name]).sum().item()
                                          for name, p in named.items())
                                      / sum(p.numel() for p in named.values())),
            "num_buckets": len(buffer.layout.bucket_ranges),
            "buffer_numel": buffer.layout.numel,
            "memory": optimizer.memory_bytes(),
            "straddling_segments": sum(1 for s in buffer.segments if s.param_offset > 0),
            "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        }
    finally:
        parallel_state.destroy_model_parallel()


def _record_reduced_grads(buffer) -> list[dict]:
    """Wraps `buffer.finish_grad_sync` (calling through): after each step's
    reduction, records the bits of this rank's shard of the reduced gradient,
    {parameter name: [(offset in the parameter, bits)]}, one dict per step."""
    steps: list[dict] = []
    finish = buffer.finish_grad_sync

    def finish_and_record() -> None:
        finish()
        shard: dict[str, list] = {}
        for s in buffer.segments:
            bits = as_bits(buffer.grad_buffer[s.buffer_start:s.buffer_end]).numpy().copy()
            shard.setdefault(buffer.infos[s.param_index].name, []).append((s.param_offset, bits))
        steps.append(shard)

    buffer.finish_grad_sync = finish_and_record
    return steps


def train_configs(rank: int, world_size: int, configs: dict) -> dict:
    """Trains every configuration {name: (argv, steps, data, bucket_size[, bf16_gemm])}
    in turn."""
    torch.set_num_threads(1)
    return {name: _train_config(world_size, *config) for name, config in configs.items()}


def _same(precision, dp, **flags):
    # The FP32-GEMM path on every CPU kind: identical batches give identical
    # gradients in every process (module docstring).
    return (_argv(precision, 2 * MICRO * dp, **NO_DROPOUT, **flags), STEPS, "same", SMALL_BUCKET,
            "fp32")


def _distinct(precision, **flags):
    return (_argv(precision, 4 * MICRO, **NO_DROPOUT, **flags), STEPS, "distinct", SMALL_BUCKET)


# Adam turns rounding noise in a gradient that is mathematically zero (the key
# bias: softmax ignores it) into lr-sized steps (m / sqrt(v) ~ +-1); an eps above
# that noise keeps the fp32 comparison about rounding.
FP32_EPS = dict(adam_eps=1e-6)


@pytest.fixture(scope="module")
def dp1():
    return run_ranks(train_configs, 1, {
        "bf16-sr same": _same("bf16-sr", 1),
        "bf16-sr distinct": _distinct("bf16-sr"),
        "fp32 distinct": _distinct("fp32", **FP32_EPS),
    }, timeout=300)[0]


@pytest.fixture(scope="module")
def dp2():
    return run_ranks(train_configs, 2, {
        "bf16-sr same dist-opt": _same("bf16-sr", 2, use_distributed_optimizer=True),
        "bf16-sr same all-reduce overlap": _same("bf16-sr", 2, overlap_grad_reduce=True),
        "bf16-sr distinct dist-opt": _distinct("bf16-sr", use_distributed_optimizer=True),
        "fp32 distinct dist-opt": _distinct("fp32", use_distributed_optimizer=True, **FP32_EPS),
    }, timeout=300)


@pytest.fixture(scope="module")
def world4():
    tp2dp2 = dict(tensor_model_parallel_size=2, use_distributed_optimizer=True,
                  global_batch_size=2 * MICRO, lr=1e-2)
    return run_ranks(train_configs, 4, {
        "bf16-sr same dist-opt overlap": _same("bf16-sr", 4, use_distributed_optimizer=True,
                                               overlap_grad_reduce=True,
                                               overlap_param_gather=True),
        "bf16-sr same all-reduce": _same("bf16-sr", 4),
        "bf16-sr distinct dist-opt": _distinct("bf16-sr", use_distributed_optimizer=True),
        "fp32 distinct all-reduce": _distinct("fp32", **FP32_EPS),
        "fp32 distinct dist-opt overlap": _distinct("fp32", use_distributed_optimizer=True,
                                                    overlap_grad_reduce=True,
                                                    overlap_param_gather=True, **FP32_EPS),
        "fp32 tp2 pp2": _distinct("fp32", tensor_model_parallel_size=2,
                                  pipeline_model_parallel_size=2, **FP32_EPS),
        # Dropout stays on: the replicated regions must draw the same masks on every TP rank.
        "tp2 dp2": (tiny_gpt_argv(train_iters=100, **tp2dp2), 15, "distinct", SMALL_BUCKET),
        "tp2 dp2 sp": (tiny_gpt_argv(train_iters=100, sequence_parallel=True, **tp2dp2), 15,
                       "distinct", SMALL_BUCKET),
    }, timeout=400)


def _reduced_grads(ranks: list[dict]) -> list[dict]:
    """Per step, {parameter name: bits of the whole reduced gradient}, put
    together from the shards of `ranks` (the ranks of one DP group)."""
    steps = []
    for step in range(len(ranks[0]["reduced_grads"])):
        pieces: dict[str, dict] = {}
        for rank in ranks:
            for name, segments in rank["reduced_grads"][step].items():
                pieces.setdefault(name, {}).update(segments)
        steps.append({name: np.concatenate([bits for _, bits in sorted(by_offset.items())])
                      for name, by_offset in pieces.items()})
    return steps


def _assert_same_run(ranks: list[dict], config: str, reference: dict) -> None:
    """Premise first (the same forward and the same reduced gradients at every
    step), then the optimizer's promise (the same parameter bits on every rank)."""
    expected = _reduced_grads([reference])
    for step, grads in enumerate(_reduced_grads([rank[config] for rank in ranks])):
        assert grads.keys() == expected[step].keys()
        for name in grads:
            assert_same_bits(grads[name], expected[step][name],
                             f"premise: reduced gradient of {name} at step {step + 1}")
    for rank in ranks:
        assert rank[config]["losses"] == reference["losses"], "premise: the losses differ"
        _assert_params_bit_identical(rank[config]["params"], reference["params"])


def _assert_params_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert_same_bits(a[name], b[name], name)


def _norm_of_difference(a: dict, b: dict) -> float:
    return float(np.sqrt(sum(np.square(a[n].astype(np.float64) - b[n]).sum() for n in a)))


def test_training_moves_most_parameters_so_the_comparisons_can_fail(dp1):
    # Rows of padded vocabulary ids and tokens that never occur keep their values.
    assert dp1["bf16-sr same"]["changed_fraction"] > 0.8
    assert dp1["fp32 distinct"]["changed_fraction"] > 0.8


def test_small_buckets_split_parameters_over_shards(dp2, world4):
    # The last DP rank's shard starts inside parameters (offset > 0).
    for result in (dp2[-1]["bf16-sr same dist-opt"], world4[-1]["bf16-sr same dist-opt overlap"]):
        assert result["num_buckets"] > 3
        assert result["straddling_segments"] > 0


def test_memory_per_rank_follows_the_strategy_table_and_dp_sharding(dp1, dp2, world4):
    # Bytes per element of the (padded) buffers: params + grads replicated,
    # Adam m and v (and the master copy) divided by the DP size with dist-opt only.
    def per_element(result, dp):
        numel = result["buffer_numel"]
        return {kind: result["memory"][kind] / numel * (dp if kind in ("master", "optimizer")
                                                        else 1)
                for kind in ("params", "grads", "master", "optimizer")}

    bf16_sr = {"params": 2, "grads": 2, "master": 0, "optimizer": 4}
    assert per_element(dp1["bf16-sr same"], 1) == bf16_sr
    assert per_element(dp2[0]["bf16-sr same dist-opt"], 2) == bf16_sr
    assert per_element(world4[0]["bf16-sr same dist-opt overlap"], 4) == bf16_sr
    assert per_element(dp1["fp32 distinct"], 1) == {"params": 4, "grads": 4, "master": 0,
                                                    "optimizer": 8}
    # Without the distributed optimizer every rank holds all of the state.
    assert per_element(world4[0]["bf16-sr same all-reduce"], 1) == bf16_sr


@pytest.mark.parametrize("config", ["bf16-sr same dist-opt", "bf16-sr same all-reduce overlap"])
def test_bf16_sr_dp2_equals_dp1_bit_for_bit_on_identical_grads(dp1, dp2, config):
    _assert_same_run(dp2, config, dp1["bf16-sr same"])


@pytest.mark.parametrize("config", ["bf16-sr same dist-opt overlap", "bf16-sr same all-reduce"])
def test_bf16_sr_dp4_equals_dp1_bit_for_bit_on_identical_grads(dp1, world4, config):
    _assert_same_run(world4, config, dp1["bf16-sr same"])


def test_fp32_dp2_and_dp4_match_dp1_to_rounding(dp1, dp2, world4):
    reference = dp1["fp32 distinct"]
    norm = _norm_of_difference(reference["params"], {n: 0 * p for n, p in
                                                      reference["params"].items()})
    for result in (dp2[0]["fp32 distinct dist-opt"], world4[0]["fp32 distinct all-reduce"],
                   world4[0]["fp32 distinct dist-opt overlap"]):
        # Only the order of the fp32 gradient sums differs (micro-batch accumulation
        # vs the DP reduction): ~1e-7 relative per step, 4 steps (measured: 3e-7).
        # The grad norm is the DP mean's: a reduction that summed (or skipped) would
        # scale it (Adam's updates hardly see a gradient's scale, the norm does).
        np.testing.assert_allclose(result["grad_norms"], reference["grad_norms"], rtol=1e-5)
        np.testing.assert_allclose(result["losses"], reference["losses"], rtol=1e-6)
        assert _norm_of_difference(result["params"], reference["params"]) < 1e-6 * norm


def test_fp32_tp2_pp2_matches_one_rank_and_counts_each_element_once_in_the_grad_norm(dp1, world4):
    # The same 4 micro-batches per step through 1F1B on 2 stages, TP-sharded
    # layers, the tied embedding split over the first and last stage.
    reference = dp1["fp32 distinct"]
    result = world4[-1]["fp32 tp2 pp2"]  # the last rank holds the loss
    # The grad norm counts TP-replicated params and the tied embedding once; the
    # default --clip-grad 1.0 clips the first step, so a wrong norm changes the updates.
    assert reference["grad_norms"][0] > 1.0
    np.testing.assert_allclose(result["grad_norms"], reference["grad_norms"], rtol=1e-5)
    np.testing.assert_allclose(result["losses"], reference["losses"], rtol=1e-6)
    assert all(rank["fp32 tp2 pp2"]["grad_norms"] == result["grad_norms"] for rank in world4)


def test_bf16_sr_dp2_and_dp4_are_close_to_dp1_on_distinct_batches(dp1, dp2, world4):
    reference = dp1["bf16-sr distinct"]
    update = _norm_of_difference(reference["params"], reference["initial"])
    for result in (dp2[0]["bf16-sr distinct dist-opt"], world4[0]["bf16-sr distinct dist-opt"]):
        # Same parameters at step 1: the losses differ only by the order of the mean.
        assert result["losses"][0] == pytest.approx(reference["losses"][0], rel=1e-6)
        # Then the bf16 gradient sums round differently (accumulation over 4
        # micro-batches vs over 1-2 and the DP mean; 8-bit mantissa), and Adam's first
        # step moves an element by +-lr whatever its gradient's size, so elements whose
        # tiny gradient flips sign end 2 lr apart. The runs stay within a few percent of
        # the distance training moved the parameters (measured: 4%; losses 1e-4).
        np.testing.assert_allclose(result["losses"], reference["losses"], rtol=1e-3)
        distance = _norm_of_difference(result["params"], reference["params"])
        assert distance < 0.1 * update, (distance, update)


@pytest.mark.parametrize("config", ["tp2 dp2", "tp2 dp2 sp"])
def test_tp_replicated_params_stay_bit_identical_across_tp_ranks(world4, config):
    # Ranks 0, 1 form one TP group and 2, 3 the other (TP varies fastest).
    for first, second in ((0, 1), (2, 3)):
        a, b = world4[first][config], world4[second][config]
        assert (a["tp_rank"], b["tp_rank"]) == (0, 1)
        names = a["replicated"]
        assert any("norm" in n for n in names) and any(n.endswith("linear_fc2.bias")
                                                        for n in names), names
        for name in names:
            assert_same_bits(a["params"][name], b["params"][name], name)
            # ... and trained: equal because updated alike, not because never updated.
            assert not np.array_equal(a["params"][name], a["initial"][name]), name
    assert world4[0][config]["changed_fraction"] > 0.8
