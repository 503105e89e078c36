"""Process groups: the rank layout (TP fastest, then DP, then PP), the
embedding group, virtual pipeline stages, and errors that name the flags,
both from `initialize_model_parallel` and from `build_model` / the
interleaved schedule on a model that does not split over the layout."""
import pytest
import torch
import torch.distributed as dist

from gpt_harness import forward_step, make_batches, tiny_config
from multiprocess import run_ranks

from megatron_sr import parallel_state as ps
from megatron_sr.config import ParallelConfig
from megatron_sr.model import build_model
from megatron_sr.pipeline_parallel import get_forward_backward_func


def _error(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except (ValueError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _groups_and_errors(rank, world_size):
    out = {}
    ps.initialize_model_parallel(2, 2)
    out["layout"] = dict(
        tp=ps.get_tensor_model_parallel_ranks(), dp=ps.get_data_parallel_ranks(),
        pp=ps.get_pipeline_model_parallel_ranks(), embedding=ps.get_embedding_ranks(),
        sizes=(ps.get_tensor_model_parallel_world_size(), ps.get_data_parallel_world_size(),
               ps.get_pipeline_model_parallel_world_size()),
        ranks=(ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(),
               ps.get_pipeline_model_parallel_rank()),
        next_prev=(ps.get_pipeline_model_parallel_next_rank(),
                   ps.get_pipeline_model_parallel_prev_rank()))
    # Each group really connects its ranks: an all-reduce of the global rank sums its members.
    sums = {}
    for name, group in (("tp", ps.get_tensor_model_parallel_group()),
                        ("dp", ps.get_data_parallel_group()),
                        ("pp", ps.get_pipeline_model_parallel_group()),
                        ("embedding", ps.get_embedding_group())):
        value = torch.tensor([float(rank)])
        dist.all_reduce(value, group=group)
        sums[name] = value.item()
    out["layout"]["sums"] = sums
    out["double_init"] = _error(ps.initialize_model_parallel, 2, 2)
    ps.destroy_model_parallel()

    ps.initialize_model_parallel(1, 4, 2)
    stages = []
    for v in range(2):
        ps.set_virtual_pipeline_model_parallel_rank(v)
        stages.append((ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage(),
                       ps.is_pipeline_first_stage(ignore_virtual=True),
                       ps.is_pipeline_last_stage(ignore_virtual=True)))
    out["virtual"] = dict(pp_rank=ps.get_pipeline_model_parallel_rank(), stages=stages,
                          embedding=ps.get_embedding_ranks())
    ps.destroy_model_parallel()

    out["tp3"] = _error(ps.initialize_model_parallel, 3, 1)
    out["tp2_pp3"] = _error(ps.initialize_model_parallel, 2, 3)
    out["virtual_without_pp"] = _error(ps.initialize_model_parallel, 2, 1, 2)

    # Models that do not split over the layout fail in build_model, before any communication.
    ps.initialize_model_parallel(4, 2)
    tp4_pp2 = ParallelConfig(tensor_model_parallel_size=4, pipeline_model_parallel_size=2)
    out["heads"] = _error(build_model, tiny_config(num_attention_heads=2), tp4_pp2)
    tp2_pp2 = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    out["mismatch"] = _error(build_model, tiny_config(), tp2_pp2)
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(2, 2, 2)
    parallel = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                              virtual_pipeline_model_parallel_size=2)
    out["layers"] = _error(build_model, tiny_config(num_layers=6), parallel)
    config = tiny_config()
    chunks = build_model(config, parallel)
    out["microbatches"] = _error(
        get_forward_backward_func(), forward_step_func=forward_step,
        data_iterator=iter(make_batches(config, 3, 1)), model=chunks, num_microbatches=3,
        seq_length=config.seq_length, micro_batch_size=1)
    ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def results():
    return run_ranks(_groups_and_errors, 8)


def test_rank_layout_tp_fastest_then_dp_then_pp(results):
    tp, dp, pp = 2, 2, 2
    for rank, r in enumerate(results):
        layout = r["layout"]
        t, d, p = rank % tp, (rank // tp) % dp, rank // (tp * dp)
        assert layout["ranks"] == (t, d, p) and layout["sizes"] == (tp, dp, pp)
        assert layout["tp"] == [x + tp * (d + dp * p) for x in range(tp)]
        assert layout["dp"] == [t + tp * (x + dp * p) for x in range(dp)]
        assert layout["pp"] == [t + tp * (d + dp * x) for x in range(pp)]
        assert layout["embedding"] == [layout["pp"][0], layout["pp"][-1]]
        other = layout["pp"][1 - p]
        assert layout["next_prev"] == (other, other)
        assert layout["sums"] == {name: float(sum(layout[name]))
                                  for name in ("tp", "dp", "pp", "embedding")}


def test_virtual_stages_first_and_last(results):
    for rank, r in enumerate(results):
        v = r["virtual"]
        pp_rank = v["pp_rank"]
        # TP=1, PP=4 on 8 ranks: DP=2, rank = dp_rank + 2 * pp_rank
        first_rank, last_rank = pp_rank == 0, pp_rank == 3
        assert pp_rank == rank // 2
        assert v["embedding"] == ([rank % 2, rank % 2 + 6] if first_rank or last_rank else None)
        assert v["stages"] == [(first_rank, False, first_rank, last_rank),
                               (False, last_rank, first_rank, last_rank)]


@pytest.mark.parametrize("case, flags", [
    ("tp3", ["--tensor-model-parallel-size (3)", "world size (8)"]),
    ("tp2_pp3", ["--tensor-model-parallel-size (2)", "--pipeline-model-parallel-size (3)"]),
    ("virtual_without_pp", ["--pipeline-model-parallel-size > 1"]),
    ("heads", ["--num-attention-heads (2)", "--tensor-model-parallel-size (4)"]),
    ("layers", ["--num-layers (6)", "--pipeline-model-parallel-size (2)", "virtual stages (2)"]),
    ("microbatches", ["micro-batches per step (3", "--pipeline-model-parallel-size (2)"]),
    ("mismatch", ["parallel_state was initialized", "(4, 2, None)", "(2, 2, None)"]),
    ("double_init", ["destroy_model_parallel"]),
])
def test_bad_configuration_fails_naming_the_flags(results, case, flags):
    for r in results:
        assert r[case] is not None, f"{case} did not fail"
        for flag in flags:
            assert flag in r[case], r[case]


def test_getters_before_initialization_fail_clearly():
    with pytest.raises(RuntimeError, match="initialize_model_parallel"):
        ps.get_tensor_model_parallel_world_size()
    with pytest.raises(RuntimeError, match="init_process_group"):
        ps.initialize_model_parallel(1, 1)


def test_default_device_given_to_initialize_until_destroyed():
    """`initialize_model_parallel(device=...)` (the scale simulation's `meta`)
    is what `get_default_device` returns until `destroy_model_parallel`."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=3, world_size=8)
    try:
        before = ps.get_default_device()
        ps.initialize_model_parallel(2, 2, device="meta")
        assert ps.get_default_device() == torch.device("meta")
        ps.destroy_model_parallel()
        assert ps.get_default_device() == before
    finally:
        dist.destroy_process_group()
