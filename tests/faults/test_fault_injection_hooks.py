"""The test hooks themselves and the phase naming of communication failures
(in-process, no ranks): a hook fires only where, when and on the rank it
names; a backend error becomes a CommunicationError naming the phase and
the collective; other errors pass through untouched."""
import errno

import pytest

from megatron_sr import fault_injection
from megatron_sr.config import parse_args
from megatron_sr.training import communication as training, loop
from megatron_sr.fault_injection import Fault, parse_fault


def test_parse_fault():
    assert parse_fault("kill@train-step,iteration=5,rank=1") == Fault("kill", "train-step", 5, 1)
    assert parse_fault("enospc@checkpoint-write") == Fault("enospc", "checkpoint-write")


@pytest.mark.parametrize("text", ["kill", "explode@train-step", "kill@nowhere",
                                  "kill@train-step,iteration=x", "kill@train-step,when=3"])
def test_malformed_fault_names_the_variable(text):
    with pytest.raises(ValueError, match="MEGATRON_SR_FAULT"):
        parse_fault(text)


def test_unset_hook_does_nothing():
    assert fault_injection._FAULT is None  # the suite never sets it in the test process
    fault_injection.at("checkpoint-write", 4)


def test_hook_fires_once_at_its_point_iteration_and_rank(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    fault = parse_fault("enospc@checkpoint-write,iteration=4,rank=1")
    fault_injection._fire(fault, "train-step", 4)  # other point
    fault_injection._fire(fault, "checkpoint-write", 2)  # other iteration
    monkeypatch.setenv("RANK", "0")
    fault_injection._fire(fault, "checkpoint-write", 4)  # other rank
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(OSError) as err:
        fault_injection._fire(fault, "checkpoint-write", 4)
    assert err.value.errno == errno.ENOSPC
    fault_injection._fire(fault, "checkpoint-write", 4)  # at most once


def test_nan_gradient_iterations_for_every_rank_or_one(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv(fault_injection.NAN_GRAD_ENV, "3, 4")
    assert fault_injection.nan_grad_iterations() == {3, 4}
    monkeypatch.setenv(fault_injection.NAN_GRAD_ENV, "3,4,rank=1")
    assert fault_injection.nan_grad_iterations() == {3, 4}
    monkeypatch.setenv("RANK", "0")
    assert fault_injection.nan_grad_iterations() == frozenset()
    monkeypatch.setenv(fault_injection.NAN_GRAD_ENV, "3,rank=x")
    with pytest.raises(ValueError, match="MEGATRON_SR_INJECT_NAN_GRAD_AT"):
        fault_injection.nan_grad_iterations()


JOB = parse_args(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                  "--seq-length", "16", "--lr", "1e-3", "--train-iters", "4", "--mock-data",
                  "--tokenizer-type", "NullTokenizer", "--vocab-size", "60",
                  "--distributed-timeout-minutes", "0.1"], 1)


def _grad_norm():  # named like the optimizer's function that runs the all-reduce
    raise RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 6000ms "
                       "for recv operation to complete")


def test_backend_timeout_names_phase_collective_iteration_and_timeout():
    with pytest.raises(training.CommunicationError) as err:
        with training.communication_phase(JOB, "optimizer step", 7):
            _grad_norm()
    message = str(err.value)
    assert message.startswith("rank 0: optimizer step (grad-norm all-reduce) at iteration 7 "
                              "timed out after --distributed-timeout-minutes 0.1"), message


def _launch_grad_reduce():  # named like the buffer's function that starts the reduce-scatter
    raise RuntimeError("Application timeout caused pair closure")


def test_gloo_timeout_without_gloo_in_its_message_is_reported():
    """Gloo raised this bare message from a reduce-scatter whose peer stalled (seen in CI)."""
    with pytest.raises(training.CommunicationError) as err:
        with training.communication_phase(JOB, "optimizer step", 3):
            _launch_grad_reduce()
    assert str(err.value).startswith(
        "rank 0: optimizer step (data-parallel grad reduce-scatter) at iteration 3 "
        "timed out after --distributed-timeout-minutes 0.1"), str(err.value)


def test_dead_peer_is_reported_as_such():
    with pytest.raises(training.CommunicationError, match="a peer rank died"):
        with training.communication_phase(JOB, "checkpoint save", 4):
            raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer")


@pytest.mark.parametrize("error", [RuntimeError("shape mismatch in matmul"), ValueError("x"),
                                   OSError(errno.ENOSPC, "full")])
def test_other_errors_pass_through(error):
    with pytest.raises(type(error)) as err:
        with training.communication_phase(JOB, "forward-backward", 1):
            raise error
    assert err.value is error


def test_reliability_doc_names_existing_tests():
    """Every `test_fault_*.py::test_*` that docs/RELIABILITY.md cites exists."""
    import os
    import re

    here = os.path.dirname(os.path.abspath(__file__))
    doc = open(os.path.join(here, "..", "..", "docs", "RELIABILITY.md"), encoding="utf-8").read()
    cited = re.findall(r"(test_\w+\.py)::(test_\w+)", doc)
    assert len(cited) >= 8
    for filename, test in cited:
        path = os.path.join(here, filename)
        if not os.path.exists(path):
            path = os.path.join(here, "..", filename)
        assert os.path.exists(path), filename
        source = open(path, encoding="utf-8").read()
        assert f"def {test}(" in source or f"{test} =" in source, f"{filename}::{test}"


def test_collective_names_follow_the_code():
    """The functions `communication_phase` reads off a failing stack still exist."""
    import inspect

    from megatron_sr import replica_check
    from megatron_sr.checkpointing import publish, training_checkpoint
    from megatron_sr.optimizer import distributed_optimizer, param_buffer
    from megatron_sr.model import parallel_layout
    from megatron_sr.pipeline_parallel import p2p_communication

    sources = "".join(inspect.getsource(m) for m in (training, loop, distributed_optimizer,
                                                     param_buffer, parallel_layout,
                                                     p2p_communication, replica_check,
                                                     publish, training_checkpoint))
    for function in training._COLLECTIVE_OF_FUNCTION:
        assert f"def {function}(" in sources, function
