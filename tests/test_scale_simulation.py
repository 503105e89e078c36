"""One rank of a 7B (TP 8 x DP 8, 64 ranks) and of a 70B-class (TP 8 x PP 8 x
DP 8, 512 ranks) job at full size on `meta` with the `fake` process group
(tests/scale_simulation.py): what the real code keeps for backward and which
collectives it issues, against `megatron_sr.estimate`.

Checked, for one micro-batch's forward and backward of the rank's chunk
(the GPU code path; see scale_simulation's docstring for why `meta` runs it):
- every transformer layer saves exactly `estimate.layer_saved_bytes` (tolerance
  0: the estimate counts every saved tensor), and the whole chunk exactly
  `estimate.chunk_activation_bytes(...).saved`;
- no saved tensor is fp32 except what is meant to be: the norms' per-row
  statistics ([..., 1]), the RoPE cos/sin tables and the cross entropy's
  softmax;
- the column-parallel linears keep the [s / tp, b, h] sequence shard, never
  the all-gathered [s, b, h] input;
- with --overlap-grad-reduce the data-parallel reduce-scatters are issued one
  per bucket, in bucket order (bucket 0, the last layers, first), each over
  the whole bucket;
- the TP group sees 6 all-gathers and 4 reduce-scatters per layer (with
  sequence parallelism), counted per group as a collective census does.
"""
import pytest
import torch

from megatron_sr import parallel_state
from megatron_sr.estimate import chunk_activation_bytes, chunk_placements, layer_saved_bytes
from megatron_sr.precision.strategies import get_strategy
from scale_simulation import (SEVEN_B_ARGV, SEVENTY_B_ARGV, CollectiveCensus, SavedTensorCensus,
                              job_config, simulated_rank)

CASES = {
    # name: (argv, world size, rank): 7B rank 5 = TP rank 5 of DP rank 0 (first and last
    # stage); 70B rank 285 = TP rank 5, DP rank 3, pipeline stage 4 (a middle stage).
    "7b": (SEVEN_B_ARGV, 64, 5),
    "70b": (SEVENTY_B_ARGV, 512, 285),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def simulation(request):
    argv, world_size, rank = CASES[request.param]
    job = job_config(argv)
    with simulated_rank(job, rank, world_size) as simulated:
        with SavedTensorCensus(simulated.model) as saved, CollectiveCensus() as collectives:
            simulated.forward_backward()
        dp_ranks = tuple(parallel_state.get_data_parallel_ranks())
        tp_ranks = tuple(parallel_state.get_tensor_model_parallel_ranks())
        pipeline_rank = parallel_state.get_pipeline_model_parallel_rank()
        bucket_bytes = [(end - start) * simulated.buffer.grad_buffer.element_size()
                        for start, end in simulated.buffer.layout.bucket_ranges]
    yield dict(job=job, saved=saved, collectives=collectives, dp_ranks=dp_ranks,
               tp_ranks=tp_ranks, pipeline_rank=pipeline_rank, bucket_bytes=bucket_bytes,
               model=simulated.model)


def _strategy(job):
    return get_strategy(job.optimizer.precision, job.optimizer.optimizer_state_dtype)


def test_each_layer_saves_what_the_estimate_says(simulation):
    job = simulation["job"]
    expected = layer_saved_bytes(job.model, job.parallel, _strategy(job),
                                 job.training.micro_batch_size)
    by_owner = simulation["saved"].bytes_by_owner()
    layers = {owner: nbytes for owner, nbytes in by_owner.items() if owner.startswith("layer")}
    assert len(layers) == sum(len(chunk.decoder.layers) for chunk in simulation["model"])
    # The chunk's first layer also owns the RoPE tables every layer shares.
    first = min(layers, key=lambda owner: int(owner.split()[1]))
    rope_tables = 2 * 4 * job.model.seq_length * job.model.rotary_dim
    assert layers.pop(first) == expected + rope_tables
    assert set(layers.values()) == {expected}, (expected, layers)


def test_chunk_saves_what_the_estimate_says(simulation):
    job = simulation["job"]
    (chunk,) = chunk_placements(job.model, job.parallel, simulation["pipeline_rank"])
    expected = chunk_activation_bytes(job.model, job.parallel, _strategy(job),
                                      job.training.micro_batch_size, chunk).saved
    measured = sum(simulation["saved"].bytes_by_owner().values())
    assert measured == expected


def test_no_saved_tensor_is_fp32_unless_meant(simulation):
    job = simulation["job"]
    s, vocab_slice = job.model.seq_length, job.model.vocab_size // 8
    rope_table = (s, 1, 1, job.model.rotary_dim)
    unexpected = [t for t in simulation["saved"].saved if t.dtype is torch.float32
                  and t.shape[-1] != 1  # norm statistics, per row
                  and t.shape != rope_table
                  and not (t.owner == "output" and t.shape[-1] == vocab_slice)]  # softmax
    assert not unexpected
    assert any(t.dtype is torch.bfloat16 for t in simulation["saved"].saved)


def test_column_parallel_linears_keep_the_sequence_shard(simulation):
    job = simulation["job"]
    s, h = job.model.seq_length, job.model.hidden_size
    full = s * job.training.micro_batch_size * h * 2  # bytes of a bf16 [s, b, h]
    full_inputs = [t for t in simulation["saved"].saved
                   if t.dtype is torch.bfloat16 and t.shape[-1] == h and t.nbytes >= full]
    assert not full_inputs, full_inputs[:3]


def test_grad_reduce_scatters_follow_bucket_order(simulation):
    calls = [c for c in simulation["collectives"].on_group(simulation["dp_ranks"])
             if c.op == "_reduce_scatter_base_"]
    assert [c.nbytes for c in calls] == simulation["bucket_bytes"]
    assert len(calls) > 1


def test_tensor_parallel_collectives_per_layer(simulation):
    """Per layer and micro-batch on the TP group: forward all-gathers before qkv
    and fc1 and reduce-scatters after proj and fc2; backward all-gathers qkv's
    and fc1's input shards again, reduce-scatters their input gradients and
    all-gathers proj's and fc2's output gradients: 6 all-gathers and 4
    reduce-scatters per layer, plus the embedding's and the output layer's."""
    layers = sum(len(chunk.decoder.layers) for chunk in simulation["model"])
    counts = {}
    for call in simulation["collectives"].on_group(simulation["tp_ranks"]):
        counts[call.op] = counts.get(call.op, 0) + 1
    chunk = simulation["model"][0]
    # First stage: the embedding output's scatter to sequence shards (backward: an
    # all-gather). Last stage: the output layer's input all-gathered in forward and
    # again in backward, its input gradient reduce-scattered.
    extra_gathers = (1 if chunk.pre_process else 0) + (2 if chunk.post_process else 0)
    extra_scatters = 1 if chunk.post_process else 0
    assert counts["_allgather_base_"] == 6 * layers + extra_gathers
    assert counts["_reduce_scatter_base_"] == 4 * layers + extra_scatters


@pytest.mark.parametrize("sequence_parallel", [True, False])
def test_full_recomputation_tensor_parallel_collectives(sequence_parallel):
    """Full recomputation repeats a layer's forward in backward only up to fc2's
    input, the last tensor backward needs (torch's non-reentrant checkpoint
    stops early): qkv's and fc1's all-gathers and proj's reduce-scatter again
    with sequence parallelism (8 all-gathers and 5 reduce-scatters per layer),
    proj's all-reduce again without (5 all-reduces), as `megatron_sr.estimate`
    counts them. Two 7B layers, TP 8, first and last stage."""
    argv = [a for a in SEVEN_B_ARGV if sequence_parallel or a != "--sequence-parallel"]
    job = job_config(argv, num_layers="2", recompute_granularity="full")
    with simulated_rank(job, 5, 64) as simulated:
        with CollectiveCensus() as collectives:
            simulated.forward_backward()
        tp_ranks = tuple(parallel_state.get_tensor_model_parallel_ranks())
    counts = {}
    for call in collectives.on_group(tp_ranks):
        counts[call.op] = counts.get(call.op, 0) + 1
    if sequence_parallel:
        # + the embedding's forward all-reduce and backward all-gather, the output layer's
        # 2 all-gathers and 1 reduce-scatter, the cross entropy's 2 all-reduces and the
        # sequence-parallel grads' all-reduce
        assert counts == {"_allgather_base_": 8 * 2 + 3, "_reduce_scatter_base_": 5 * 2 + 1,
                          "allreduce_": 4}
    else:
        # + the embedding's forward and the output layer's backward all-reduce, the cross
        # entropy's 2
        assert counts == {"allreduce_": 5 * 2 + 4}
