"""Multi-node launches on one machine: the job that two nodes run is the job
that one node runs.

Spec (issue 17):
- Two torchrun agents (`--nnodes 2`, two ranks each, c10d rendezvous on
  localhost) train TP 2 x DP 2 to the same logged losses and the same
  checkpoint, bit for bit, as one agent with four ranks.
- examples/slurm/pretrain_gpt.sbatch, run with stand-ins for srun, scontrol
  and squeue (two "nodes" of two tasks, srun starting every rank): the ranks
  join through env://; SIGUSR1 to the ranks (Slurm's `--signal` before the
  time limit) makes them save and exit 0; the script requeues the job; the
  requeued run resumes from the checkpoint and finishes without requeueing;
  losses and final checkpoint equal the uninterrupted single-node run's.
  The exit duration comes from the time left that squeue reports.
"""
from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time

import pytest

from job_harness import assert_states_equal, checkpoint_files, tiny_gpt_argv
from multiprocess import free_port

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(REPO, "pretrain_gpt.py")
SBATCH = os.path.join(REPO, "examples", "slurm", "pretrain_gpt.sbatch")
TRAIN_ITERS = 30


def job_argv(save: str, **flags) -> list[str]:
    """TP 2 x DP 2 on 4 ranks, distributed optimizer, a checkpoint at the end."""
    return tiny_gpt_argv(tensor_model_parallel_size=2, use_distributed_optimizer=True,
                         global_batch_size=8, train_iters=TRAIN_ITERS, save=save, load=save,
                         save_interval=1000, **flags)


def environment(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "TRITON_INTERPRET")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), **extra)
    return env


def start(command: list[str], log: str, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)


def finish(processes: list[subprocess.Popen], logs: list[str], timeout: float) -> list[str]:
    """Waits for every process (killing all on a timeout); returns their outputs,
    asserting that each exited 0."""
    deadline = time.monotonic() + timeout
    try:
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    outputs = [open(log, errors="replace").read() for log in logs]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, f"exit {process.returncode}:\n{output[-6000:]}"
    return outputs


def logged_losses(output: str) -> dict[int, str]:
    """{iteration: lm loss as printed} of a job's log."""
    return {int(m.group(1)): m.group(2) for m in
            re.finditer(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: (\S+)", output)}


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    """The reference: one torchrun agent, four ranks. (losses, checkpoint dir)."""
    folder = tmp_path_factory.mktemp("one_node")
    save, log = str(folder / "ckpt"), str(folder / "log")
    os.mkdir(save)
    process = start([sys.executable, "-m", "torch.distributed.run", "--standalone",
                     "--nproc_per_node=4", PRETRAIN, *job_argv(save)], log, environment())
    (output,) = finish([process], [log], timeout=300)
    losses = logged_losses(output)
    assert sorted(losses) == list(range(1, TRAIN_ITERS + 1)), output[-3000:]
    return losses, save


def assert_same_checkpoint(save_a: str, save_b: str) -> None:
    files_a, files_b = (checkpoint_files(save_a, TRAIN_ITERS),
                        checkpoint_files(save_b, TRAIN_ITERS))
    assert files_a.keys() == files_b.keys()
    for rank_dir in files_a:
        assert_states_equal(files_a[rank_dir], files_b[rank_dir], rank_dir)


def test_two_torchrun_agents_with_c10d_rendezvous_match_one_node(one_node, tmp_path):
    reference_losses, reference_save = one_node
    save = str(tmp_path / "ckpt")
    os.mkdir(save)
    endpoint = f"127.0.0.1:{free_port()}"
    logs = [str(tmp_path / f"node{node}.log") for node in range(2)]
    agents = [start([sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                     "--nproc_per_node=2", "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}",
                     "--rdzv_id=two-nodes", f"--rdzv_conf=is_host={int(node == 0)}",
                     PRETRAIN, *job_argv(save)], log, environment())
              for node, log in enumerate(logs)]
    outputs = finish(agents, logs, timeout=300)
    losses = {}
    for output in outputs:  # whichever agent got the last rank logged them
        losses.update(logged_losses(output))
    assert losses == reference_losses
    assert_same_checkpoint(save, reference_save)


# ----- the Slurm batch script ------------------------------------------------------------------

SHIMS = {
    # Starts $SLURM_NTASKS tasks of the command after srun's options, as srun does
    # (SLURM_PROCID, SLURM_LOCALID over $SLURM_JOB_NUM_NODES "nodes"), and records their pids.
    "srun": """#!/usr/bin/env bash
while [[ "$1" == -* ]]; do shift; done
per_node=$(( SLURM_NTASKS / SLURM_JOB_NUM_NODES ))
pids=()
for (( rank = 0; rank < SLURM_NTASKS; rank++ )); do
  SLURM_PROCID=$rank SLURM_LOCALID=$(( rank % per_node )) SLURM_NODEID=$(( rank / per_node )) \\
    "$@" &
  pids+=($!)
done
echo "${pids[@]}" > "$SHIM_DIR/task_pids"
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
""",
    "scontrol": """#!/usr/bin/env bash
case "$1" in
  show) echo localhost; echo otherhost ;;
  requeue) echo "$2" >> "$SHIM_DIR/requeued" ;;
esac
""",
    "squeue": """#!/usr/bin/env bash
echo 1-02:03:04
""",
}


def write_executable(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)


def model_script(path: str, save: str) -> str:
    """A model script in the style of examples/gpt_*.sh, DRY_RUN protocol only."""
    flags = " ".join(job_argv(save))
    write_executable(path, f"""#!/usr/bin/env bash
[ "$DRY_RUN" = 1 ] || exit 2
echo "WORLD_SIZE=$(( GPUS_PER_NODE * NNODES ))"
printf '%s\\n' {flags} $EXTRA_ARGS
""")
    return path


def test_the_slurm_script_resumes_after_the_time_limit_signal_and_requeues(one_node, tmp_path):
    reference_losses, reference_save = one_node
    shims = tmp_path / "shims"
    shims.mkdir()
    for name, text in SHIMS.items():
        write_executable(str(shims / name), text)
    save = str(tmp_path / "ckpt")
    script = model_script(str(tmp_path / "tiny_gpt.sh"), save)
    env = environment(PATH=f"{shims}{os.pathsep}{os.environ['PATH']}", SHIM_DIR=str(shims),
                      SLURM_JOB_ID="4242", SLURM_NTASKS="4", SLURM_JOB_NUM_NODES="2",
                      SLURM_JOB_NODELIST="node[1-2]", SLURM_CPUS_PER_TASK="1",
                      SLURM_SUBMIT_DIR=REPO,
                      PYTHON=sys.executable, MASTER_PORT=str(free_port()))

    # First run: SIGUSR1 to every rank mid-run, as `#SBATCH --signal=USR1@900` sends it.
    first_log = str(tmp_path / "first.log")
    job = start(["bash", SBATCH, script], first_log, env)
    deadline = time.monotonic() + 240
    while " iteration        3/" not in open(first_log, errors="replace").read():
        assert job.poll() is None and time.monotonic() < deadline, \
            open(first_log, errors="replace").read()[-6000:]
        time.sleep(0.1)
    for pid in open(shims / "task_pids").read().split():
        os.kill(int(pid), signal.SIGUSR1)
    (first,) = finish([job], [first_log], timeout=240)
    stopped = re.search(r"\[exit\] SIGUSR1 received at iteration (\d+)", first)
    assert stopped, first[-6000:]
    assert "--exit-signal SIGUSR1 --exit-duration-in-mins 1543" in first  # 1d 2h 3m - 20 min
    iteration = int(stopped.group(1))
    assert 3 <= iteration < TRAIN_ITERS
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read().strip() == \
        str(iteration)
    assert open(shims / "requeued").read().split() == ["4242"]

    # The requeued run resumes and finishes; nothing is requeued again.
    second_log = str(tmp_path / "second.log")
    env["MASTER_PORT"] = str(free_port())
    (second,) = finish([start(["bash", SBATCH, script], second_log, env)], [second_log],
                       timeout=300)
    assert open(shims / "requeued").read().split() == ["4242"]
    first_losses, second_losses = logged_losses(first), logged_losses(second)
    assert sorted(first_losses) == list(range(1, iteration + 1))
    assert sorted(second_losses) == list(range(iteration + 1, TRAIN_ITERS + 1))
    assert {**first_losses, **second_losses} == reference_losses
    assert_same_checkpoint(save, reference_save)



def _slurm_job_without_training(tmp_path, flags: list[str], **shims) -> tuple:
    """The batch script's inputs for a job whose ranks never train: SHIMS with
    `shims` replacing some, a model script printing `flags`, the environment of
    a 2-node, 4-task allocation. Returns (shim folder, model script, env)."""
    folder = tmp_path / "shims"
    folder.mkdir()
    for name, text in {**SHIMS, **shims}.items():
        write_executable(str(folder / name), text)
    script = tmp_path / "model.sh"
    write_executable(str(script), f"""#!/usr/bin/env bash
echo "WORLD_SIZE=$(( GPUS_PER_NODE * NNODES ))"
printf '%s\\n' {" ".join(flags)} $EXTRA_ARGS
""")
    env = environment(PATH=f"{folder}{os.pathsep}{os.environ['PATH']}", SHIM_DIR=str(folder),
                      SLURM_JOB_ID="4242", SLURM_NTASKS="4", SLURM_JOB_NUM_NODES="2",
                      SLURM_JOB_NODELIST="node[1-2]", SLURM_SUBMIT_DIR=REPO)
    return folder, str(script), env


def test_the_slurm_script_checks_data_before_srun_and_survives_a_failing_squeue(tmp_path):
    """Missing data or tokenizer files end the job before srun starts a rank
    (not 64 ranks failing after the queue wait); a failing squeue only drops
    --exit-duration-in-mins (the time-limit signal still comes)."""
    present = tmp_path / "present_text_document"
    for suffix in (".bin", ".idx"):
        (tmp_path / f"present_text_document{suffix}").write_bytes(b"")
    shims, script, env = _slurm_job_without_training(
        tmp_path, job_argv(str(tmp_path / "ckpt")) + [
            "--data-path", "0.7", str(present), "0.3", str(tmp_path / "missing_text_document"),
            "--vocab-file", str(tmp_path / "missing-vocab.json")],
        squeue="#!/usr/bin/env bash\nexit 1\n")
    run = subprocess.run(["bash", SBATCH, script], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 1, run.stderr
    assert "no time limit read from squeue" in run.stderr
    error = [line for line in run.stderr.splitlines() if line.startswith("error: not found")]
    assert error and f"--data-path {tmp_path}/missing_text_document (.bin/.idx)" in error[0]
    assert f"--vocab-file {tmp_path}/missing-vocab.json" in error[0]
    assert str(present) + " " not in error[0] and "0.7" not in error[0]
    assert not (shims / "task_pids").exists()  # srun never ran


def test_the_slurm_script_mounts_checkout_checkpoints_and_data_into_the_container(tmp_path):
    data, checkpoints = tmp_path / "data", tmp_path / "shared"
    data.mkdir()
    for suffix in (".bin", ".idx"):
        (data / f"corpus_text_document{suffix}").write_bytes(b"")
    shims, script, env = _slurm_job_without_training(
        tmp_path, job_argv(str(checkpoints / "ckpt")) + [
            "--data-path", str(data / "corpus_text_document")],
        srun='#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$SHIM_DIR/srun_args"\n')
    env["CONTAINER_IMAGE"] = "/shared/megatron_sr.sqsh"
    run = subprocess.run(["bash", SBATCH, script], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    srun_args = (shims / "srun_args").read_text().splitlines()
    assert "--container-image=/shared/megatron_sr.sqsh" in srun_args
    assert "--label" in srun_args and "--gpu-bind=none" in srun_args
    mounts = [a for a in srun_args if a.startswith("--container-mounts=")]
    assert mounts == ["--container-mounts=" + ",".join(
        f"{folder}:{folder}" for folder in (REPO, checkpoints, data))]


NCCL_VARIABLES = ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_FR_BUFFER_SIZE",
                  "TORCH_NCCL_DUMP_ON_TIMEOUT", "TORCH_FR_DUMP_TEMP_FILE",
                  "TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE")


def test_the_slurm_script_hands_the_ranks_nccl_error_handling_and_the_flight_recorder(tmp_path):
    checkpoints = tmp_path / "ckpt"
    shims, script, env = _slurm_job_without_training(
        tmp_path, job_argv(str(checkpoints)) + ["--mock-data"],
        srun='#!/usr/bin/env bash\nenv | grep ^TORCH_ | sort > "$SHIM_DIR/srun_env"\n')
    for name in NCCL_VARIABLES:
        env.pop(name, None)
    env["TORCH_NCCL_DUMP_ON_TIMEOUT"] = "0"  # what the user set is kept
    run = subprocess.run(["bash", SBATCH, script], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    seen = dict(line.split("=", 1) for line in (shims / "srun_env").read_text().splitlines())
    assert {k: v for k, v in seen.items() if k in NCCL_VARIABLES} == {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "TORCH_FR_BUFFER_SIZE": "2000",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "0",
        "TORCH_FR_DUMP_TEMP_FILE": f"{checkpoints}/nccl_flight_recorder/rank_"}
    assert (checkpoints / "nccl_flight_recorder").is_dir()

