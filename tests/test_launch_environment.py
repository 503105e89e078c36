"""What a rank takes from its launcher's environment
(megatron_sr.launch_environment): its GPU when the launcher shows it one
device, and torch's NCCL error handling and flight recorder, set only where
the environment leaves them unset."""
import os

import pytest

from megatron_sr.launch_environment import (cuda_device_index, flight_recorder_dir,
                                            nccl_error_handling)


@pytest.mark.parametrize("local_rank, devices, index", [
    ("0", 8, 0), ("5", 8, 5), ("5", 1, 0), ("7", 1, 0), ("3", 2, 1), (None, 8, 0)])
def test_local_rank_wraps_around_the_visible_devices(local_rank, devices, index):
    env = {} if local_rank is None else {"LOCAL_RANK": local_rank}
    assert cuda_device_index(env, devices) == index


@pytest.mark.parametrize("env, devices, message", [
    ({"LOCAL_RANK": "-1"}, 8, "LOCAL_RANK='-1'"), ({"LOCAL_RANK": "x"}, 8, "LOCAL_RANK='x'"),
    ({"LOCAL_RANK": "0"}, 0, "CUDA_VISIBLE_DEVICES")])
def test_bad_local_rank_or_no_device_is_named(env, devices, message):
    with pytest.raises(ValueError, match=message):
        cuda_device_index(env, devices)


def test_unset_variables_get_the_defaults_and_the_dump_folder_exists(tmp_path):
    env = {}
    dump = flight_recorder_dir(str(tmp_path / "ckpt"), None)
    added = nccl_error_handling(env, 2.5, dump)
    assert env == added == {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "TORCH_FR_BUFFER_SIZE": "2000",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1", "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "150",
        "TORCH_FR_DUMP_TEMP_FILE": str(tmp_path / "ckpt" / "nccl_flight_recorder" / "rank_")}
    assert os.path.isdir(dump)


def test_what_the_user_set_is_kept_old_spellings_included(tmp_path):
    env = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "TORCH_NCCL_TRACE_BUFFER_SIZE": "0",
           "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "/scratch/fr_"}
    before = dict(env)
    added = nccl_error_handling(env, 10, str(tmp_path / "unused"))
    assert added == {"TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
                     "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "600"}
    assert env == {**before, **added}
    assert not os.path.exists(tmp_path / "unused")


def test_the_dump_folder_follows_save_then_tensorboard():
    assert flight_recorder_dir("/s", "/t") == "/s/nccl_flight_recorder"
    assert flight_recorder_dir(None, "/t") == "/t/nccl_flight_recorder"
    assert flight_recorder_dir(None, None) is None
    assert nccl_error_handling({}, 1, None).keys() == {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_DUMP_ON_TIMEOUT",
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"}
