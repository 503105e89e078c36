"""The collectives of whole training steps at 1,024 ranks: one rank per
pipeline stage of a 70B-class job at TP 8 x PP 4 x DP 32
(`scale_simulation.SEVENTY_B_1K_ARGV`), its model and DistributedOptimizer
built by the training job's `setup_model_and_optimizer` on `meta`, the
other 1,023 ranks stood in for by the `fake` process group; each runs
`train_step` as the training loop calls it, once between log lines and once
on a log step, while `CollectiveCensus` records every c10d collective
(tests/scale_simulation.py; docs/SCALING.md quotes the census).

Checked:
- the only world-wide collective of a step is the grad-norm all-reduce, 16
  bytes (the fp32 squared norm and the loop's 3 exit flags); a log step adds
  one more, the update-absorption counts (16 bytes; 32 with --log-params-norm
  and --log-num-zeros-in-grad, whose sums ride in it), and on the last stage
  the DP loss all-reduce (8 bytes); nothing else differs;
- no collective runs on a group other than this rank's TP, DP, PP and world
  groups (no model-parallel or embedding traffic with untied embeddings),
  and none on a host tensor (which a GPU job would need a Gloo group for);
- per group, the bytes a rank sends (ring algorithms, `ring_sent_bytes`)
  equal `megatron_sr.estimate`'s communication figures: data and pipeline
  parallel exactly; tensor parallel within 1e-4, the estimate's one
  approximation: it charges every rank the all-reduce of all its
  sequence-parallel gradients (norm weights, ~1 MiB of ~44 GiB), where the
  step sums only those inside the rank's DP shard (here none);
- the counts: per micro-batch and layer 6 all-gathers and 4 reduce-scatters
  on TP, one reduce-scatter and one all-gather per bucket on DP, one send and
  one receive per micro-batch and pipeline neighbour;
- docs/SCALING.md's census table holds these stages' rows as
  `python tests/scale_simulation.py --census` prints them.
"""
from pathlib import Path

import pytest

from megatron_sr.estimate import estimate_job
from scale_simulation import (SEVENTY_B_1K_ARGV, census_step, estimated_sent, format_census,
                              job_config, sent_by_group, stage_rank)

pytestmark = pytest.mark.slow  # three ranks' two steps at full size on meta: ~50 CPU-s

STAGES = (0, 1, 3)  # first (embedding), a middle one, last (output layer and loss)
GRAD_NORM_BYTES = 4 * (1 + 3)  # fp32: squared norm, then SIGTERM, --exit-signal, out of time


@pytest.fixture(scope="module")
def job():
    return job_config(SEVENTY_B_1K_ARGV)


@pytest.fixture(scope="module")
def censuses(job):
    assert job.world_size == 1024 and job.num_microbatches == 4
    return {stage: census_step(job, stage_rank(job, stage)) for stage in STAGES}


@pytest.fixture(scope="module")
def estimate(job):
    return estimate_job(job)


def _world(calls):
    return [(c.op, c.nbytes) for c in calls if len(c.group) == 1024]


@pytest.mark.parametrize("stage", STAGES)
def test_one_small_world_wide_reduction_per_step(censuses, stage):
    census = censuses[stage]
    assert census.groups["world"] == tuple(range(1024))
    assert _world(census.step) == [("allreduce_", GRAD_NORM_BYTES)]
    assert _world(census.log_step) == [("allreduce_", GRAD_NORM_BYTES), ("allreduce_", 16)]


@pytest.mark.parametrize("stage", STAGES)
def test_log_step_adds_only_its_small_reductions(censuses, stage):
    census = censuses[stage]
    plain = {(r.group, r.op): (r.count, r.nbytes) for r in census.rows()}
    log = {(r.group, r.op): (r.count, r.nbytes) for r in census.rows(log_step=True)}
    added = {key: (count - plain.get(key, (0, 0))[0], nbytes - plain.get(key, (0, 0))[1])
             for key, (count, nbytes) in log.items() if (count, nbytes) != plain.get(key)}
    expected = {("world", "allreduce_"): (1, 16)}  # update absorption: 2 fp64 counts
    if stage == 3:
        expected[("data", "allreduce_")] = (1, 8)  # the loss: interval sum and step loss, fp32
    assert added == expected


def test_params_norm_and_zero_count_ride_in_the_log_steps_reduction(censuses):
    """--log-params-norm and --log-num-zeros-in-grad add no collective: their
    two fp64 sums join the update-absorption all-reduce of a log step (16 ->
    32 bytes); the steps between log lines do not change."""
    flagged = job_config(SEVENTY_B_1K_ARGV + ["--log-params-norm", "--log-num-zeros-in-grad"])
    census = census_step(flagged, stage_rank(flagged, 3))
    plain = censuses[3]
    assert census.rows() == plain.rows()
    assert _world(census.log_step) == [("allreduce_", GRAD_NORM_BYTES), ("allreduce_", 32)]
    others = [row for row in census.rows(log_step=True) if row.group != "world"]
    assert others == [row for row in plain.rows(log_step=True) if row.group != "world"]


@pytest.mark.parametrize("stage", STAGES)
def test_collectives_stay_in_their_groups_on_the_device(censuses, stage):
    census = censuses[stage]
    groups = {row.group for row in census.rows(log_step=True)}
    assert groups <= {"tensor", "data", "pipeline", "world"}, groups
    assert {c.device for c in census.log_step} == {"meta"}


@pytest.mark.parametrize("stage", STAGES)
def test_bytes_per_group_equal_the_estimate(censuses, estimate, stage):
    sent = sent_by_group(censuses[stage].rows())
    expected = estimated_sent(estimate.stages[stage])
    assert sent["data"] == expected["data"]
    # The estimate's pipeline figure holds the tied embedding's all-reduce (none here: untied).
    assert sent["pipeline"] + sent.get("embedding", 0.0) == expected["pipeline"]
    assert sent["tensor"] <= expected["tensor"]
    assert sent["tensor"] == pytest.approx(expected["tensor"], rel=1e-4)


@pytest.mark.parametrize("stage", STAGES)
def test_collective_counts(censuses, job, stage):
    census = censuses[stage]
    counts = {(r.group, r.op): r.count for r in census.rows()}
    m, layers = job.num_microbatches, job.model.num_layers // 4
    first, last = stage == 0, stage == 3
    # First stage: the embedding's forward all-reduce and its backward all-gather (the
    # scatter to sequence shards); last stage: the output layer's input all-gathered in
    # forward and backward, its input gradient reduce-scattered, and the cross entropy's
    # two all-reduces (max; sum-exp and target logit together).
    assert counts[("tensor", "_allgather_base_")] == m * (6 * layers + first + 2 * last)
    assert counts[("tensor", "_reduce_scatter_base_")] == m * (4 * layers + last)
    assert counts.get(("tensor", "allreduce_"), 0) == m * (first + 2 * last)
    buckets = counts[("data", "_reduce_scatter_base_")]
    assert counts[("data", "_allgather_base_")] == buckets > 1
    neighbours = (not first) + (not last)
    assert counts[("pipeline", "send")] == counts[("pipeline", "recv_")] == m * neighbours


def test_scaling_doc_quotes_the_census(censuses, estimate):
    doc = (Path(__file__).resolve().parents[1] / "docs" / "SCALING.md").read_text()
    table = format_census([censuses[stage] for stage in STAGES], estimate)
    missing = [line for line in table.splitlines() if line not in doc]
    assert not missing, missing
