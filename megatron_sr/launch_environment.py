"""What a rank takes from its launcher's environment before it joins the job.

- `cuda_device_index`: the GPU this rank drives. LOCAL_RANK is the rank's
  index on its node; a launcher that binds one GPU per task
  (`CUDA_VISIBLE_DEVICES` with one device, `srun --gpus-per-task=1`) shows
  each rank only device 0, so the index is LOCAL_RANK modulo the visible
  device count.
- `nccl_error_handling`: torch's own NCCL failure machinery, set before the
  NCCL process groups exist (ProcessGroupNCCL reads the variables when it is
  constructed), each only where the environment does not already set it:

  TORCH_NCCL_ASYNC_ERROR_HANDLING=1   a failed or timed-out collective aborts
                                      its communicator and ends the process
                                      (the launcher then ends the job), not a
                                      hang until the scheduler's time limit
  TORCH_FR_BUFFER_SIZE=2000           the flight recorder: the last 2000
                                      collectives of every process group
                                      (rank, group, sequence number, sizes,
                                      state, Python stack)
  TORCH_NCCL_DUMP_ON_TIMEOUT=1        the watchdog writes that record when a
                                      collective times out or fails
  TORCH_FR_DUMP_TEMP_FILE=DIR/rank_   where: one file per rank, rank_<R>;
                                      DIR = <--save>/nccl_flight_recorder, else
                                      <--tensorboard-dir>/..., else torch's
                                      default (/tmp/nccl_trace_rank_<R>)
  TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC    --distributed-timeout-minutes x 60: a
                                      watchdog that is itself stuck (a hung
                                      CUDA or NCCL call) is killed no later
                                      than a collective would time out

  The older spellings of the flight-recorder variables
  (TORCH_NCCL_TRACE_BUFFER_SIZE, TORCH_NCCL_DEBUG_INFO_TEMP_FILE) count as set.
  examples/launch_common.sh and examples/slurm/pretrain_gpt.sbatch export the
  same defaults; docs/RELIABILITY.md says what a user then sees.
"""
from __future__ import annotations

import os
from typing import MutableMapping, Optional

FLIGHT_RECORDER_DIR = "nccl_flight_recorder"
FLIGHT_RECORDER_ENTRIES = 2000
# Each variable with the older names torch also reads for it.
_ALIASES = {"TORCH_FR_BUFFER_SIZE": ("TORCH_NCCL_TRACE_BUFFER_SIZE",),
            "TORCH_FR_DUMP_TEMP_FILE": ("TORCH_NCCL_DEBUG_INFO_TEMP_FILE",)}


def cuda_device_index(environ: MutableMapping[str, str], device_count: int) -> int:
    """The CUDA device of this rank: $LOCAL_RANK (default 0) modulo
    `device_count`, the devices this process sees (>= 1). ValueError naming
    LOCAL_RANK when it is not a non-negative integer."""
    text = environ.get("LOCAL_RANK", "0")
    if not text.isdigit():
        raise ValueError(f"LOCAL_RANK={text!r} is not a non-negative integer "
                         f"(the launcher sets it: torchrun, or examples/slurm/rank_env.sh)")
    if device_count < 1:
        raise ValueError("no CUDA device is visible to this process (check CUDA_VISIBLE_DEVICES)")
    return int(text) % device_count


def flight_recorder_dir(save: Optional[str], tensorboard_dir: Optional[str]) -> Optional[str]:
    """The folder of the NCCL flight-recorder dumps: under --save, else under
    --tensorboard-dir, else None (torch's default place)."""
    base = save or tensorboard_dir
    return os.path.join(base, FLIGHT_RECORDER_DIR) if base else None


def nccl_error_handling(environ: MutableMapping[str, str], timeout_minutes: float,
                        dump_dir: Optional[str]) -> dict[str, str]:
    """Sets in `environ` the module doc's variables that it lacks and returns
    them (name -> value). `timeout_minutes`: --distributed-timeout-minutes;
    `dump_dir`: the flight recorder's folder (`flight_recorder_dir`; created
    here), or None to leave torch's default. Call on every rank before the
    NCCL process group is created."""
    wanted = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
              "TORCH_FR_BUFFER_SIZE": str(FLIGHT_RECORDER_ENTRIES),
              "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
              "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": str(max(1, round(timeout_minutes * 60)))}
    if dump_dir is not None:
        wanted["TORCH_FR_DUMP_TEMP_FILE"] = os.path.join(dump_dir, "rank_")
    added = {}
    for name, value in wanted.items():
        if any(n in environ for n in (name, *_ALIASES.get(name, ()))):
            continue
        environ[name] = value
        added[name] = value
    if "TORCH_FR_DUMP_TEMP_FILE" in added:
        os.makedirs(dump_dir, exist_ok=True)
    return added
