"""--check-weight-hash-across-dp-replicas-interval on a real 4-rank job
(TP=2 x DP=2): one bit flipped in one rank's copy of a parameter that both
TP and DP replicate stops every rank with an error naming the parameter and
the ranks whose copies differ; without the flip the check passes."""
import re

import pytest

from fault_harness import assert_error_line, fault_env, job_argv, run_job, tracker

pytestmark = pytest.mark.slow


def test_a_flipped_bit_on_one_rank_is_named_with_the_ranks_that_differ(tmp_path):
    save = str(tmp_path / "ckpt")
    run = run_job(4, job_argv(save=save, check_weight_hash_across_dp_replicas_interval=2),
                  str(tmp_path / "log"), fault_env("bitflip@weight-hash,iteration=4,rank=1"))
    injected = re.search(r"\[fault-injection\] bitflip at weight-hash \(iteration 4, rank 1\): "
                         r"(\S+)", run.output)
    assert injected, str(run)
    name = injected.group(1)
    # Ranks: TP groups {0, 1}, {2, 3}; DP groups {0, 2}, {1, 3}. Rank 1's copy differs
    # from its TP peer's (rank 0) and from its DP peer's (rank 3).
    assert_error_line(run, "iteration 4: ",
                      f"parameter {name} differs across its data-parallel replicas: 2 different "
                      f"copies, held by ranks [1] and ranks [3]",
                      f"parameter {name} differs across its tensor-parallel replicas: 2 different "
                      f"copies, held by ranks [0] and ranks [1]",
                      "--check-weight-hash-across-dp-replicas-interval")
    errors = [line for line in run.output.splitlines() if "error: " in line]
    assert len(errors) == 4, errors  # every rank stops, none is left waiting in a collective
    assert run.returncode == 1, str(run)
    assert tracker(save) == 2  # the checkpoint before the corruption stays the last one


def test_equal_replicas_pass_the_check(tmp_path):
    run = run_job(4, job_argv(check_weight_hash_across_dp_replicas_interval=1),
                  str(tmp_path / "log"))
    assert run.returncode == 0, str(run)
    assert "error" not in run.output.lower(), str(run)
