"""Checkpoints of the real job: exact resume, DP resharding, crash safety, corruption.

Spec (issue 5, docs/DESIGN.md "Stochastic rounding: the contract", point 3):
- Resume is exact: loading the iteration-N checkpoint of a 2N-iteration run
  and training N more iterations gives that run's last N losses and its final
  state (parameters, optimizer state, RNG states, scheduler, consumed
  samples), bit for bit, for bf16-sr with TP, PP and DP > 1
  (TP2 x PP2, and TP2 x DP2 with the distributed optimizer and overlapped
  communication; dropout on in the first, so the dropout RNG streams must
  resume too).
- The same for the strategies with extra optimizer state: the fp32 master
  copy (bf16-mixed) and the Kahan compensation (bf16-kahan), at DP = 2.
- A checkpoint saved at DP = 2 loads at DP = 1: the same parameters and
  optimizer state, and training continues where the DP = 2 run did.
- The legacy save gathers the optimizer state over DP to the writing rank
  only: the other DP ranks send their shards and receive none.
- A process killed while it writes a checkpoint leaves the previous one
  loadable and the tracker pointing at it; the job resumes from it.
- A truncated or bit-flipped checkpoint file fails the load with a
  CheckpointError naming the file and what is wrong.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from bitwise import assert_same_bits
from job_harness import (as_numpy, assert_states_equal, checkpoint_files, copy_checkpoint, losses,
                         run_pretrain, tiny_gpt_argv)
from megatron_sr import checkpointing

N = 3  # iterations before the save; the runs train 2N
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dropout stays on in the first layout (its RNG streams must resume) and is off
# in the second, whose DP = 1 reload is compared with it loss for loss.
LAYOUTS = {
    "tp2 pp2": dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                    global_batch_size=4),
    "tp2 dp2 dist-opt": dict(tensor_model_parallel_size=2, use_distributed_optimizer=True,
                             overlap_grad_reduce=True, overlap_param_gather=True,
                             global_batch_size=8, hidden_dropout=0.0, attention_dropout=0.0),
}


def _job(layout: str, save: str, **flags) -> list[str]:
    return tiny_gpt_argv(precision="bf16-sr", train_iters=2 * N, lr=1e-2,
                         lr_decay_style="cosine", lr_warmup_iters=2, save=save,
                         **LAYOUTS[layout], **flags)


_RESUME_RUNS: dict = {}


def _resume_runs(layout: str, tmp_path_factory) -> dict:
    """The continuous run (2N iterations, saving at N and 2N) and the run
    resumed from its iteration-N checkpoint; once per layout."""
    if layout not in _RESUME_RUNS:
        root = tmp_path_factory.mktemp(layout.replace(" ", "_"))
        continuous_dir = str(root / "continuous")
        continuous = run_pretrain(4, _job(layout, continuous_dir, save_interval=N))
        resumed_dir = copy_checkpoint(continuous_dir, N, str(root / "resumed"))
        resumed = run_pretrain(4, _job(layout, resumed_dir, load=resumed_dir))
        _RESUME_RUNS[layout] = {"continuous": continuous, "continuous_dir": continuous_dir,
                                "resumed": resumed, "resumed_dir": resumed_dir, "root": root}
    return _RESUME_RUNS[layout]


@pytest.fixture(scope="module", params=list(LAYOUTS))
def resumed(request, tmp_path_factory):
    return _resume_runs(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def resumed_dp2(tmp_path_factory):
    return _resume_runs("tp2 dp2 dist-opt", tmp_path_factory)


@pytest.mark.slow
def test_resume_gives_the_same_losses_bit_for_bit(resumed):
    continuous, after_resume = losses(resumed["continuous"]), losses(resumed["resumed"])
    assert len(continuous) == 2 * N and len(after_resume) == N
    assert after_resume == continuous[N:]
    assert f"loaded iteration {N}" in resumed["resumed"][0]["stdout"]


@pytest.mark.slow
def test_resume_gives_the_same_final_state_bit_for_bit(resumed):
    final = checkpoint_files(resumed["continuous_dir"], 2 * N)
    assert_states_equal(checkpoint_files(resumed["resumed_dir"], 2 * N), final)
    # The state did change between the two checkpoints, so equality is not vacuous.
    middle = checkpoint_files(resumed["continuous_dir"], N)
    for rank_dir, state in final.items():
        assert state["optimizer"]["step"] == 2 * N
        changed = [name for name, p in state["model"].items()
                   if not np.array_equal(p.float().numpy(),
                                         middle[rank_dir]["model"][name].float().numpy())]
        assert len(changed) == len(state["model"])


@pytest.mark.slow
def test_checkpoint_saved_at_dp2_resumes_at_dp1(resumed_dp2):
    resumed = resumed_dp2
    load_dir = copy_checkpoint(resumed["continuous_dir"], N,
                                str(resumed["root"] / "dp1"))
    # 2 ranks = TP2 x DP1, the same global batch in 4 micro-batches per rank.
    dp1 = run_pretrain(2, _job("tp2 dp2 dist-opt", None, load=load_dir))
    saved = checkpoint_files(load_dir, N)
    for tp_rank, result in enumerate(dp1):
        state = saved[checkpointing.rank_dir_name(tp_rank, 0, 1)]
        assert result["loaded_params"].keys() == state["model"].keys()
        for name, value in result["loaded_params"].items():
            assert_same_bits(value, state["model"][name].float().numpy(), name)
        assert_states_equal(result["loaded_optimizer"], as_numpy(state["optimizer"]))
    dp2_losses = losses(resumed["resumed"])
    # Same parameters and samples: the first loss differs only by the order of the mean.
    assert losses(dp1)[0] == pytest.approx(dp2_losses[0], rel=1e-6)
    # Then the bf16 gradient sums round in another order (4 micro-batches on one
    # rank vs 2 per rank and the DP mean); the runs stay close.
    np.testing.assert_allclose(losses(dp1), dp2_losses, rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-kahan"])
def test_resume_is_exact_with_master_and_kahan_state(precision, tmp_path):
    def job(save, **flags):
        return tiny_gpt_argv(precision=precision, train_iters=4, lr=1e-2, global_batch_size=4,
                             use_distributed_optimizer=True, save=save, **flags)

    continuous = run_pretrain(2, job(str(tmp_path / "continuous"), save_interval=2))
    load = copy_checkpoint(str(tmp_path / "continuous"), 2, str(tmp_path / "resumed"))
    resumed = run_pretrain(2, job(load, load=load))
    assert losses(resumed) == losses(continuous)[2:]
    final = checkpoint_files(str(tmp_path / "continuous"), 4)
    extra = "master" if precision == "bf16-mixed" else "kahan"
    assert all(extra in state for state in final["mp_rank_00"]["optimizer"]["params"].values())
    assert_states_equal(checkpoint_files(load, 4), final)


# ----- crashes and corruption ----------------------------------------------------------------

_DYING_SAVE = textwrap.dedent("""
    # pretrain_gpt.py whose rank 0 (the writer with DP = 2) is SIGKILLed
    # halfway through writing its state file of iteration {crash_iteration}.
    import os, signal
    from megatron_sr import training
    from megatron_sr.checkpointing import legacy

    write_state_file = legacy._write_state_file

    def dying_write(path, state):
        if os.environ["RANK"] == "0" and "iter_{crash_iteration:07d}" in path:
            with open(path + ".partial", "wb") as f:
                f.write(b"half of a state file")
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return write_state_file(path, state)

    legacy._write_state_file = dying_write
    training.main()
""")


@pytest.fixture(scope="module")
def crashed_save(tmp_path_factory):
    """A 2-rank torchrun job (DP = 2) saving every 2 iterations whose rank 0 dies
    in the middle of writing iteration 4's checkpoint."""
    root = tmp_path_factory.mktemp("crash")
    script = root / "dying_pretrain_gpt.py"
    script.write_text(_DYING_SAVE.format(crash_iteration=4))
    save = str(root / "checkpoints")
    argv = tiny_gpt_argv(train_iters=6, save=save, save_interval=2, global_batch_size=4)
    job = subprocess.run([sys.executable, "-m", "torch.distributed.run",
                          "--standalone", "--nproc_per_node", "2",
                          str(script), *argv], cwd=REPO, capture_output=True, text=True,
                         timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return {"job": job, "save": save, "argv": argv, "root": root}


@pytest.mark.slow
def test_a_crash_during_save_leaves_the_previous_checkpoint_loadable(crashed_save):
    job, save = crashed_save["job"], crashed_save["save"]
    assert job.returncode != 0, job.stdout + job.stderr
    assert "saved iteration 2" in job.stdout
    # The crash happened mid-write: rank 0's half-written file is in the temporary directory.
    partial = os.path.join(save, ".iter_0000004.tmp", "mp_rank_00", "model_optim_rng.pt.partial")
    assert os.path.isfile(partial), os.listdir(save)
    assert not os.path.exists(os.path.join(save, "iter_0000004"))
    assert checkpointing.read_tracker(save) == 2
    state = checkpoint_files(save, 2)["mp_rank_00"]  # verified against the manifest
    assert state["iteration"] == 2 and state["optimizer"]["step"] == 2


@pytest.mark.slow
def test_the_job_resumes_from_the_checkpoint_before_the_crash(crashed_save, tmp_path):
    # Loaded at DP = 1 (1 rank) to keep the test short; resharding is tested above.
    save = str(tmp_path / "checkpoints")
    shutil.copytree(crashed_save["save"], save)
    result = run_pretrain(1, tiny_gpt_argv(train_iters=6, exit_interval=4, load=save, save=save,
                                           global_batch_size=4))[0]
    assert "loaded iteration 2" in result["stdout"]
    assert len(result["reports"]) == 2 and all(np.isfinite(r["loss"]) for r in result["reports"])
    assert checkpointing.read_tracker(save) == 4
    checkpoint_files(save, 4)
    # The new save of iteration 4 replaced the crashed one's leftovers.
    assert not os.path.exists(os.path.join(save, ".iter_0000004.tmp"))
    assert os.path.exists(os.path.join(crashed_save["save"], ".iter_0000004.tmp"))


@pytest.fixture
def small_checkpoint(tmp_path):
    """A one-rank checkpoint written by `save_checkpoint` (no process group) and
    its state file's path."""
    save = str(tmp_path / "checkpoints")
    checkpointing.save_checkpoint(save, 2, {"weights": torch.arange(4096, dtype=torch.float32)},
                                  tp_rank=0, pp_rank=0, tp_size=1, pp_size=1)
    return save, os.path.join(save, "iter_0000002", "mp_rank_00", "model_optim_rng.pt")


def _load(save: str) -> dict:
    return checkpointing.load_state_file(os.path.join(save, "iter_0000002"), 0, 0, 1, 1)


def test_a_truncated_checkpoint_file_fails_the_load_clearly(small_checkpoint):
    save, path = small_checkpoint
    assert_same_bits(_load(save)["weights"], torch.arange(4096, dtype=torch.float32))
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(checkpointing.CheckpointError,
                       match=f"{path} is {size // 2} bytes, the manifest says {size}.*truncated"):
        _load(save)


def test_a_bit_flip_in_a_checkpoint_file_fails_the_load_clearly(small_checkpoint):
    save, path = small_checkpoint
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)  # inside the tensor data
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))
    with pytest.raises(checkpointing.CheckpointError, match=f"{path} fails its sha256 checksum"):
        _load(save)


@pytest.fixture
def intact_checkpoint(crashed_save, tmp_path):
    """A copy of the crashed job's intact iteration-2 checkpoint and its rank file's path."""
    load = copy_checkpoint(crashed_save["save"], 2, str(tmp_path / "load"))
    return load, os.path.join(load, "iter_0000002", "mp_rank_00", "model_optim_rng.pt")


@pytest.mark.slow
def test_the_job_stops_with_the_checkpoint_error_on_a_corrupted_file(intact_checkpoint):
    load, path = intact_checkpoint
    with open(path, "r+b") as f:
        f.truncate(100)
    result = run_pretrain(1, tiny_gpt_argv(train_iters=6, load=load, global_batch_size=4),
                          expect_error=True)[0]
    assert result["error"].startswith("CheckpointError: ")
    assert path in result["error"] and "truncated" in result["error"]
    assert result["reports"] == []


# ----- the legacy save gathers the optimizer state to its writer only ----------------------

def _bytes_received_during_saves(rank: int, world_size: int, argv: list[str]) -> int:
    """Runs the job, counting the bytes of tensors that DP collectives land on
    this rank (all-gathers, gathers) inside `save_training_checkpoint`."""
    import torch.distributed as dist

    from job_harness import pretrain_worker
    from megatron_sr.optimizer import distributed_optimizer

    received, saving = [0], [False]
    originals = dict(save=checkpointing.save_training_checkpoint,
                     into=distributed_optimizer.all_gather_into, gather=dist.gather,
                     all_gather=dist.all_gather, all_gather_into_tensor=dist.all_gather_into_tensor)

    def counted(name, output_bytes):
        def wrapper(*args, **kwargs):
            if saving[0]:
                received[0] += output_bytes(*args, **kwargs)
            return originals[name](*args, **kwargs)
        return wrapper

    def tensor_bytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors or [])

    def save(*args, **kwargs):
        saving[0] = True
        try:
            return originals["save"](*args, **kwargs)
        finally:
            saving[0] = False

    checkpointing.save_training_checkpoint = save
    distributed_optimizer.all_gather_into = counted("into", lambda out, *a, **k: tensor_bytes([out]))
    dist.all_gather_into_tensor = counted("all_gather_into_tensor",
                                          lambda out, *a, **k: tensor_bytes([out]))
    dist.gather = counted("gather", lambda t, gather_list=None, *a, **k: tensor_bytes(gather_list))
    dist.all_gather = counted("all_gather", lambda outs, *a, **k: tensor_bytes(outs))
    try:
        pretrain_worker(rank, world_size, argv)
    finally:
        checkpointing.save_training_checkpoint = originals["save"]
        distributed_optimizer.all_gather_into = originals["into"]
        dist.gather, dist.all_gather = originals["gather"], originals["all_gather"]
        dist.all_gather_into_tensor = originals["all_gather_into_tensor"]
    return received[0]


@pytest.mark.slow
def test_the_legacy_save_gathers_the_optimizer_state_to_the_writing_rank_only(tmp_path):
    from multiprocess import run_ranks

    save = str(tmp_path / "checkpoints")
    argv = tiny_gpt_argv(precision="bf16-mixed", train_iters=1, save_interval=1, save=save,
                         global_batch_size=4, use_distributed_optimizer=True)
    writer, other = run_ranks(_bytes_received_during_saves, 2, argv, timeout=240,
                              env={"WORLD_SIZE": "2"})
    (state,) = checkpoint_files(save, 1).values()
    optimizer_bytes = sum(t.numel() * t.element_size() for kinds in
                          state["optimizer"]["params"].values() for t in kinds.values())
    # The writer receives the other rank's half of m, v and the fp32 master copy.
    assert writer >= optimizer_bytes // 2
    assert other < optimizer_bytes // 20
