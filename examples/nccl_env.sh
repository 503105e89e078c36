# torch's own NCCL failure handling, exported for the ranks (sourced by examples/launch_common.sh
# and examples/slurm/pretrain_gpt.sbatch, not run). pretrain_gpt.py sets the same defaults
# where they are unset (megatron_sr/launch_environment.py), and also
# TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC from --distributed-timeout-minutes; docs/RELIABILITY.md
# ("On NCCL") says what a failure then looks like.
#
# export_nccl_error_handling DUMP_DIR: each variable below only where it is unset:
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1  a failed or timed-out collective aborts its communicator
#                                      and ends the rank (the launcher then ends the job)
#                                      instead of the job hanging until its time limit
#   TORCH_FR_BUFFER_SIZE=2000          the flight recorder: the last 2000 collectives of every
#                                      process group (older name TORCH_NCCL_TRACE_BUFFER_SIZE)
#   TORCH_NCCL_DUMP_ON_TIMEOUT=1       the watchdog writes that record on a timeout or an error
#   TORCH_FR_DUMP_TEMP_FILE            DUMP_DIR/rank_: one file per rank, rank_<R> (older name
#                                      TORCH_NCCL_DEBUG_INFO_TEMP_FILE); DUMP_DIR is created
export_nccl_error_handling() {
  local dump_dir="$1"
  export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
  export TORCH_NCCL_DUMP_ON_TIMEOUT="${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}"
  if [ -z "${TORCH_NCCL_TRACE_BUFFER_SIZE:-}" ]; then
    export TORCH_FR_BUFFER_SIZE="${TORCH_FR_BUFFER_SIZE:-2000}"
  fi
  if [ -z "${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-}" ] && [ -z "${TORCH_FR_DUMP_TEMP_FILE:-}" ]; then
    mkdir -p "$dump_dir"
    export TORCH_FR_DUMP_TEMP_FILE="$dump_dir/rank_"
  fi
}
