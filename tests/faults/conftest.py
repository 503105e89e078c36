"""Fixtures shared by the fault-injection cases."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from fault_harness import TRAIN_ITERS, job_argv, run_job, tracker  # noqa: E402


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> str:
    """The save directory of the shared job (`job_argv`) run once without a
    fault: checkpoints at iterations 2, 4, 6. Faulty runs must end bit-identical to it."""
    root = tmp_path_factory.mktemp("reference")
    save = str(root / "ckpt")
    run = run_job(4, job_argv(save=save), str(root / "log"))
    assert run.returncode == 0, str(run)
    assert tracker(save) == TRAIN_ITERS
    return save
