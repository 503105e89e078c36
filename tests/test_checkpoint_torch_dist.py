"""`--ckpt-format torch_dist`: sharded checkpoints on torch.distributed.checkpoint.

Spec (issue 14):
- A rank's DP shard of the optimizer state is a flat range of a parameter's
  TP slice; it is stored as rectangles of the global tensor that tile the
  range exactly (`flat_range_blocks`), and DCP reads them back into any other
  cut, casting to the destination dtype.
- Same-layout resume is bit-exact: losses, weights, optimizer state,
  scheduler and RNG states (TP2 x DP2, distributed optimizer, dropout on,
  and TP2 x PP2), also when the checkpoint was written with --async-save.
- Resharding on load: resuming an fp32 run at DP 1 -> 2 -> 4 and at
  TP 2 -> 1 continues within 1e-3 of the uninterrupted run's losses.
- A kill -9 of a rank during an async save leaves the previous checkpoint
  the one the tracker names, and resuming from it ends bit-identical to an
  uninterrupted run.
- A bit flip in a shard file fails the load with a CheckpointError naming it.
- Precision conversion: a bf16-mixed checkpoint loads into bf16-sr (the
  weights; the master copy is dropped) and a bf16-sr one into bf16-mixed (the
  master copy derived from the weights).
- Two jobs in one process (pretrain() called twice, as a notebook or a user
  script may) both save asynchronously: the second does not reuse the first
  one's process group.
- --finetune loads the weights only: the master copy restarts from them and
  training counts from iteration 1 again.
"""
from __future__ import annotations

import math
import os
import shutil

import numpy as np
import pytest
import torch

from job_harness import (assert_states_equal, copy_checkpoint, losses, run_pretrain,
                         tiny_gpt_argv)
from megatron_sr import checkpointing
from megatron_sr.checkpointing import torch_dist
from megatron_sr.checkpointing.global_blocks import (GlobalBlocks, LoadPlanner, SavePlanner,
                                                     flat_range_blocks)


def full_state(save: str, iteration: int) -> dict:
    """Everything a torch_dist checkpoint holds, as full tensors and plain data."""
    directory = os.path.join(save, checkpointing.iteration_dir_name(iteration))
    common, tensors, rng = torch_dist.read_full(directory, checkpointing.read_manifest(directory))
    return {"common": common, "tensors": tensors, "rng": rng}


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4)])
def test_flat_ranges_are_tiled_exactly_by_contiguous_rectangles(shape):
    numel = math.prod(shape)
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    for start in range(numel):
        for end in range(start + 1, numel + 1):
            position = start
            blocks = flat_range_blocks(start, end, shape)
            assert len(blocks) <= 2 * len(shape) - 1
            for offsets, sizes in blocks:
                assert all(o + s <= d for o, s, d in zip(offsets, sizes, shape))
                # contiguous: a range in one dim, full extent in every later dim
                assert all(s == d for s, d in zip(sizes[1:], shape[1:])
                           if sizes[0] > 1) or len(shape) == 1
                assert sum(o * st for o, st in zip(offsets, strides)) == position
                position += math.prod(sizes)
            assert position == end


def test_shards_saved_in_one_cut_load_in_another_with_a_cast(tmp_path):
    full = torch.randn(4, 6)
    flat = full.flatten()
    blocks = []
    for start, end in [(0, 7), (7, 17), (17, 24)]:  # a DP-sharding of the flat tensor
        for offsets, sizes in flat_range_blocks(start, end, (4, 6)):
            first = offsets[0] * 6 + offsets[1]
            blocks.append((offsets, flat[first:first + math.prod(sizes)].view(sizes)))
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": GlobalBlocks((4, 6), torch.float32, blocks), "common": {"step": 3}},
             checkpoint_id=str(tmp_path), planner=SavePlanner(), no_dist=True)
    out = torch.zeros(4, 6, dtype=torch.bfloat16)  # a TP-like cut along dim 1
    state = {"w": GlobalBlocks((4, 6), torch.bfloat16, [((0, 0), out[:, :3]),
                                                        ((0, 3), out[:, 3:])]), "common": None}
    dcp.load(state, checkpoint_id=str(tmp_path), planner=LoadPlanner(), no_dist=True)
    assert torch.equal(out, full.to(torch.bfloat16)) and state["common"] == {"step": 3}


# ----- the real job ---------------------------------------------------------------------------

N = 2  # iterations before the resume


def _tp2_dp2(save: str, **flags) -> list[str]:
    return tiny_gpt_argv(ckpt_format="torch_dist", precision="bf16-sr", train_iters=2 * N,
                         lr=1e-2, tensor_model_parallel_size=2, use_distributed_optimizer=True,
                         overlap_grad_reduce=True, global_batch_size=8, save=save, **flags)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """An async-saving run of 2N iterations (checkpoints at N and 2N) and a
    synchronous run resumed from its iteration-N checkpoint."""
    root = tmp_path_factory.mktemp("torch_dist")
    continuous_dir = str(root / "continuous")
    continuous = run_pretrain(4, _tp2_dp2(continuous_dir, save_interval=N, async_save=True))
    resumed_dir = copy_checkpoint(continuous_dir, N, str(root / "resumed"))
    resumed = run_pretrain(4, _tp2_dp2(resumed_dir, load=resumed_dir))
    return {"continuous": continuous, "continuous_dir": continuous_dir, "resumed": resumed,
            "resumed_dir": resumed_dir}


@pytest.mark.slow
def test_same_layout_resume_is_bit_exact(resumed):
    assert losses(resumed["resumed"]) == losses(resumed["continuous"])[N:]
    assert "(async)" in resumed["continuous"][0]["stdout"]
    final = full_state(resumed["continuous_dir"], 2 * N)
    again = full_state(resumed["resumed_dir"], 2 * N)
    assert_states_equal(again, final)
    assert len(final["rng"]) == 4 and final["common"]["optimizer"]["step"] == 2 * N
    middle = full_state(resumed["continuous_dir"], N)
    assert all(not torch.equal(t, middle["tensors"][k]) for k, t in final["tensors"].items()
               if k.startswith("model/"))


@pytest.mark.slow
def test_a_bit_flip_in_a_shard_file_fails_the_load(resumed, tmp_path):
    load = str(tmp_path / "load")
    shutil.copytree(resumed["resumed_dir"], load)
    shard = os.path.join(load, checkpointing.iteration_dir_name(2 * N), "__1_0.distcp")
    with open(shard, "r+b") as f:
        f.seek(os.path.getsize(shard) // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x01]))
    result = run_pretrain(4, _tp2_dp2(load, load=load), expect_error=True)[0]
    assert result["error"].startswith("CheckpointError: ") and shard in result["error"]
    assert "sha256" in result["error"] and result["reports"] == []


def _fp32(save, **flags):
    return tiny_gpt_argv(ckpt_format="torch_dist", precision="fp32", train_iters=6, lr=1e-2,
                         global_batch_size=8, hidden_dropout=0.0, attention_dropout=0.0,
                         save=save, **flags)


@pytest.mark.slow
def test_resharding_on_load_continues_the_uninterrupted_run(tmp_path):
    reference = losses(run_pretrain(1, _fp32(None)))
    save = str(tmp_path / "dp")
    dist_opt = dict(use_distributed_optimizer=True)
    first = run_pretrain(1, _fp32(save, exit_interval=2, **dist_opt))
    second = run_pretrain(2, _fp32(save, load=save, exit_interval=4, **dist_opt))
    third = run_pretrain(4, _fp32(save, load=save, **dist_opt))
    chained = losses(first) + losses(second) + losses(third)
    assert "loaded iteration 4" in third[0]["stdout"]
    np.testing.assert_allclose(chained, reference, rtol=0, atol=1e-3)

    save = str(tmp_path / "tp")
    first = run_pretrain(2, _fp32(save, exit_interval=2, tensor_model_parallel_size=2))
    second = run_pretrain(1, _fp32(save, load=save, exit_interval=4))
    np.testing.assert_allclose(losses(first) + losses(second), reference[:4], rtol=0, atol=1e-3)


@pytest.mark.slow
def test_precision_conversion_on_load(tmp_path):
    def job(precision, save, **flags):
        return tiny_gpt_argv(ckpt_format="torch_dist", precision=precision, train_iters=3,
                             lr=1e-2, global_batch_size=4, save=save, **flags)

    mixed = str(tmp_path / "mixed")
    run_pretrain(1, job("bf16-mixed", mixed, exit_interval=2))
    saved = full_state(mixed, 2)["tensors"]
    assert "optimizer/master/decoder.final_layernorm.weight" in saved
    result = run_pretrain(1, job("bf16-sr", None, load=mixed))[0]
    for name, value in result["loaded_params"].items():
        np.testing.assert_array_equal(value, saved[f"model/{name}"].float().reshape(
            value.shape).numpy(), name)
    assert "master" not in next(iter(result["loaded_optimizer"]["params"].values()))

    pure = str(tmp_path / "pure")
    run_pretrain(1, job("bf16-sr", pure, exit_interval=2))
    result = run_pretrain(1, job("bf16-mixed", None, load=pure))[0]
    for name, kinds in result["loaded_optimizer"]["params"].items():
        np.testing.assert_array_equal(kinds["master"], result["loaded_params"][name], name)
    assert len(result["reports"]) == 1 and np.isfinite(result["reports"][0]["loss"])


def _two_jobs_in_one_process(rank, world_size, first_argv, second_argv):
    from job_harness import pretrain_worker

    return [pretrain_worker(rank, world_size, argv) for argv in (first_argv, second_argv)]


def test_second_job_in_a_process_saves_asynchronously(tmp_path):
    from multiprocess import run_ranks

    def job(save):
        return tiny_gpt_argv(ckpt_format="torch_dist", async_save=True, train_iters=2,
                             global_batch_size=4, save=save, save_interval=1)

    saves = [str(tmp_path / name) for name in ("first", "second")]
    (results,) = run_ranks(_two_jobs_in_one_process, 1, job(saves[0]), job(saves[1]))
    for save, result in zip(saves, results):
        assert result["last_iteration"] == 2
        assert checkpointing.read_tracker(save) == 2
        assert full_state(save, 2)["tensors"]


def test_finetune_loads_the_weights_and_starts_at_iteration_one(tmp_path):
    def job(save, **flags):
        return tiny_gpt_argv(ckpt_format="torch_dist", precision="bf16-mixed", train_iters=3,
                             lr=1e-2, global_batch_size=4, save=save, **flags)

    save = str(tmp_path / "pretrained")
    run_pretrain(1, job(save, exit_interval=2))
    saved = full_state(save, 2)["tensors"]
    result = run_pretrain(1, job(None, load=save, finetune=True))[0]
    assert "--finetune: loaded weights of iteration 2" in result["stdout"]
    assert result["last_iteration"] == 3 and len(result["reports"]) == 3
    for name, kinds in result["loaded_optimizer"]["params"].items():
        weights = saved[f"model/{name}"].float().reshape(kinds["master"].shape).numpy()
        np.testing.assert_array_equal(result["loaded_params"][name], weights, name)
        np.testing.assert_array_equal(kinds["master"], weights, name)
        assert not kinds["exp_avg"].any(), name


@pytest.mark.slow
def test_tp2_pp2_resume_is_bit_exact(tmp_path):
    """Pipeline stages (the last one holds a copy of the tied embedding, which
    only the first writes) and dropout on."""
    def job(save, **flags):
        return tiny_gpt_argv(ckpt_format="torch_dist", train_iters=2 * N, lr=1e-2,
                             pipeline_model_parallel_size=2, tensor_model_parallel_size=2,
                             global_batch_size=4, save=save, **flags)

    continuous_dir, resumed_dir = str(tmp_path / "continuous"), str(tmp_path / "resumed")
    continuous = run_pretrain(4, job(continuous_dir, save_interval=N))
    copy_checkpoint(continuous_dir, N, resumed_dir)
    resumed = run_pretrain(4, job(resumed_dir, load=resumed_dir))
    assert losses(resumed) == losses(continuous)[N:]
    assert_states_equal(full_state(resumed_dir, 2 * N), full_state(continuous_dir, 2 * N))
