"""The training job end to end: every strategy trains, RTN stagnation shows in
the update-absorption rate, NaN gradients skip steps, and `pretrain_gpt.py`
under torchrun logs Megatron's line and TensorBoard scalars.

Spec (issue 5):
- Every --precision strategy trains the tiny GPT: on a learnable corpus
  (each token is followed by its successor) the loss falls well below its
  start within 40 steps; so does bf16-sr with --grad-reduce-dtype fp32.
- bf16 (round to nearest) absorbs a larger fraction of non-zero updates than
  bf16-sr at a small learning rate (the logged "update absorption").
- A NaN gradient (injected with $MEGATRON_SR_INJECT_NAN_GRAD_AT) skips that
  step on every rank, leaves the parameters as they were, is counted in the
  log, and training goes on; --max-skipped-iterations consecutive skips stop
  the job with a message naming the flag.
- `torchrun pretrain_gpt.py` on 4 ranks (TP2 x DP2, distributed optimizer with
  overlapped grad reduction and param gather) on
  a .bin/.idx corpus: exit 0, Megatron's log line every iteration, validation
  loss and perplexity, and the same values as TensorBoard scalars.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from bitwise import assert_same_bits
from job_harness import (VOCAB, checkpoint_files, losses, pretrain_worker, run_pretrain,
                         tiny_gpt_argv)
from megatron_sr.data.indexed_dataset import write_dataset
from megatron_sr.precision.strategies import STRATEGIES
from multiprocess import run_ranks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def counting_corpus(tmp_path_factory):
    """--data-path prefix of 240 documents counting up from a start id (mod VOCAB):
    the next token is the current one plus one, which a tiny GPT learns fast."""
    prefix = str(tmp_path_factory.mktemp("corpus") / "counting")
    write_dataset(prefix, [[(start + i) % VOCAB for i in range(64)]
                           for start in np.random.default_rng(0).integers(0, VOCAB, 240)])
    return prefix


def pretrain_each(rank: int, world_size: int, argvs: list[list[str]]) -> list[dict]:
    """`pretrain_worker` for each command line in turn (one-rank jobs); a job
    that raises reports its error and the next one still runs."""
    return [pretrain_worker(rank, world_size, argv, expect_error=True) for argv in argvs]


# ----- strategies ----------------------------------------------------------------------------

TRAIN_STEPS = 40


@pytest.fixture(scope="module")
def strategy_runs(counting_corpus, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    runs = {name: dict(precision=name) for name in STRATEGIES}
    runs["bf16-sr --grad-reduce-dtype fp32"] = dict(precision="bf16-sr", grad_reduce_dtype="fp32")
    argvs = [tiny_gpt_argv(train_iters=TRAIN_STEPS, lr=1e-2, lr_warmup_iters=5,
                           lr_decay_style="cosine", global_batch_size=8, micro_batch_size=8,
                           mock_data=False, data_path=counting_corpus, data_cache_path=cache,
                           log_interval=10, **flags)
             for flags in runs.values()]
    return dict(zip(runs, run_ranks(pretrain_each, 1, argvs, timeout=400)[0]))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [*STRATEGIES, "bf16-sr --grad-reduce-dtype fp32"])
def test_every_strategy_trains_the_tiny_gpt(strategy_runs, strategy):
    run = strategy_runs[strategy]
    assert run["error"] is None
    assert f"--precision {strategy.split()[0]}" in run["stdout"]
    loss = [r["loss"] for r in run["reports"]]
    assert len(loss) == TRAIN_STEPS and not any(r["skipped"] for r in run["reports"])
    # From ~log(64) = 4.2 (uniform over the padded vocabulary) towards 0: the
    # successor rule is learned, not just the unigram distribution (log 60 = 4.1).
    assert loss[0] > 3.5
    assert np.mean(loss[-5:]) < 1.5, loss


@pytest.fixture(scope="module")
def small_lr_runs():
    # lr 1e-5 is below half a bf16 ulp of most weights (init std 0.02: ulp ~ 1e-4),
    # so round-to-nearest drops most updates; SR applies them with probability ~ lr / ulp.
    argvs = [tiny_gpt_argv(precision=name, train_iters=4, lr=1e-5, global_batch_size=4,
                           hidden_dropout=0.0, attention_dropout=0.0)
             for name in ("bf16", "bf16-sr")]
    return dict(zip(("bf16", "bf16-sr"), run_ranks(pretrain_each, 1, argvs, timeout=200)[0]))


@pytest.mark.slow
def test_rtn_absorbs_more_updates_than_sr_at_a_small_learning_rate(small_lr_runs):
    assert all(run["error"] is None for run in small_lr_runs.values())
    absorption = {name: [r["update_absorption"] for r in run["reports"]]
                  for name, run in small_lr_runs.items()}
    # Adam moves every element by ~lr: RTN keeps the update only where half an ulp
    # is below it (|w| < 2.6e-3), SR applies it with probability lr / ulp elsewhere,
    # which makes a gap of a few percent of the elements (measured: 0.07-0.09).
    for rtn, sr in zip(absorption["bf16"], absorption["bf16-sr"]):
        assert 0.0 <= sr < rtn - 0.03 and rtn <= 1.0
    assert np.mean(absorption["bf16"]) > 0.75  # most updates are lost to RTN
    # The logged value is the measured one.
    line = re.search(r"iteration\s+4/\s+4 .*\| update absorption: ([0-9.]+) \|",
                     small_lr_runs["bf16"]["stdout"])
    assert float(line.group(1)) == pytest.approx(absorption["bf16"][-1], abs=1e-4)


# ----- NaN gradients -------------------------------------------------------------------------

NAN_ENV = "MEGATRON_SR_INJECT_NAN_GRAD_AT"


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
    """DP = 2 with the distributed optimizer and overlapped grad reduction;
    NaN gradients at iteration 3 on rank 1 only: rank 0 learns of them through
    the real reduction, so both skip together."""
    save = str(tmp_path_factory.mktemp("nan") / "checkpoints")
    argv = tiny_gpt_argv(train_iters=5, save=save, save_interval=1, global_batch_size=8,
                         use_distributed_optimizer=True, overlap_grad_reduce=True)
    return run_pretrain(2, argv, env={NAN_ENV: "3,rank=1"}), save


@pytest.mark.slow
def test_a_nan_gradient_skips_the_step_and_is_counted(nan_run):
    results, save = nan_run
    for rank in results:  # every rank agrees
        assert [r["skipped"] for r in rank["reports"]] == [False, False, True, False, False]
        assert math.isnan(rank["reports"][2]["grad_norm"])
    assert all(math.isfinite(x) for x in losses(results))
    skipped = re.findall(r"iteration\s+(\d)/\s+5 .*number of skipped iterations:\s+(\d+)",
                         results[-1]["stdout"])
    assert skipped == [("1", "0"), ("2", "0"), ("3", "1"), ("4", "1"), ("5", "1")]
    assert "iteration 3: grad norm is nan, step skipped" in results[0]["stdout"]
    # The skipped step changed nothing; the steps before and after did.
    states = {i: checkpoint_files(save, i)["mp_rank_00"] for i in (2, 3, 4)}
    for name, value in states[3]["model"].items():
        assert_same_bits(value, states[2]["model"][name], name)
    assert states[3]["optimizer"]["step"] == 2 and states[4]["optimizer"]["step"] == 3
    assert states[3]["optimizer"]["skipped_steps"] == 1
    changed = [name for name, value in states[4]["model"].items()
               if not np.array_equal(value.float().numpy(),
                                     states[3]["model"][name].float().numpy())]
    assert len(changed) == len(states[4]["model"])


@pytest.mark.slow
def test_consecutive_nan_steps_stop_the_job_with_a_clear_message():
    argv = tiny_gpt_argv(train_iters=8, global_batch_size=4, max_skipped_iterations=3)
    results = run_pretrain(2, argv, expect_error=True, env={NAN_ENV: "2,4,5,6,7"})
    for rank in results:
        assert [r["skipped"] for r in rank["reports"]] == [False, True, False, True, True, True]
        assert rank["error"].startswith("TrainingStopped: 3 consecutive iterations had NaN/Inf "
                                        "gradients (--max-skipped-iterations 3)")


# ----- pretrain_gpt.py end to end ------------------------------------------------------------

E2E_ITERS = 4

LOG_LINE = re.compile(  # Megatron's fields, then ours (tokens/s, update absorption)
    r"^ \[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}\] "
    r"iteration\s+(?P<iteration>\d+)/\s*(?P<iters>\d+) \| "
    r"consumed samples:\s+(?P<consumed>\d+) \| "
    r"elapsed time per iteration \(ms\): (?P<ms>[0-9.]+) \| "
    r"throughput per GPU \(TFLOP/s/GPU\): (?P<tflops>[0-9.]+) \| "
    r"learning rate: (?P<lr>[0-9.E+-]+) \| "
    r"global batch size:\s+(?P<gbs>\d+) \| "
    r"lm loss: (?P<loss>[0-9.E+-]+) \| "
    r"loss scale: 1\.0 \| "
    r"grad norm: (?P<grad_norm>[0-9.]+) \| "
    r"number of skipped iterations:\s+(?P<skipped>\d+) \| "
    r"number of nan iterations:\s+(?P<nan>\d+) \| "
    r"throughput \(tokens/s\): (?P<tokens>[0-9.]+) \| "
    r"update absorption: (?P<absorption>[0-9.]+) \|$", re.MULTILINE)


@pytest.fixture(scope="module")
def e2e(counting_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    argv = tiny_gpt_argv(train_iters=E2E_ITERS, global_batch_size=8, lr_warmup_iters=2,
                         lr_decay_style="cosine", tensor_model_parallel_size=2,
                         use_distributed_optimizer=True, overlap_grad_reduce=True,
                         overlap_param_gather=True, mock_data=False,
                         data_path=counting_corpus, data_cache_path=str(root / "cache"),
                         eval_interval=2, eval_iters=1, tensorboard_dir=str(root / "tb"),
                         log_validation_ppl_to_tensorboard=True,
                         save=str(root / "checkpoints"))
    job = subprocess.run([sys.executable, "-m", "torch.distributed.run",
                          "--standalone", "--nproc_per_node", "4",
                          "pretrain_gpt.py", *argv], cwd=REPO, capture_output=True, text=True,
                         timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(root / "tb"))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)]
               for tag in events.Tags()["scalars"]}
    return {"stdout": job.stdout, "scalars": scalars, "root": root}


@pytest.mark.slow
def test_pretrain_gpt_logs_megatrons_line_every_iteration(e2e):
    lines = [m.groupdict() for m in LOG_LINE.finditer(e2e["stdout"])]
    assert [int(m["iteration"]) for m in lines] == list(range(1, E2E_ITERS + 1))
    for i, m in enumerate(lines, start=1):
        assert int(m["iters"]) == E2E_ITERS and int(m["gbs"]) == 8
        assert int(m["consumed"]) == 8 * i
        assert float(m["ms"]) > 0 and float(m["tokens"]) > 0
        assert math.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
        assert int(m["skipped"]) == 0 and int(m["nan"]) == 0
    # Megatron's schedule: warmup over 2 iterations from 0, then cosine decay to 0.
    assert [float(m["lr"]) for m in lines] == pytest.approx([0.0, 5e-4, 1e-3, 5e-4])
    # At lr 0 no update is non-zero, so none is absorbed; then some are.
    assert float(lines[0]["absorption"]) == 0.0 and float(lines[-1]["absorption"]) > 0.0
    assert "[setup] world 4 = TP 2 x PP 1 x DP 2" in e2e["stdout"]
    assert re.search(r"\[memory\] training state per rank .* params: [0-9.]+ MiB \| grads: "
                     r"[0-9.]+ MiB \| master: [0-9.]+ MiB \| optimizer: [0-9.]+ MiB", e2e["stdout"])
    validations = re.findall(r"validation loss at iteration (\d+) \| lm loss value: ([0-9.E+-]+) "
                             r"\| lm loss PPL: ([0-9.E+-]+) \|", e2e["stdout"])
    assert [int(v[0]) for v in validations] == [2, 4]
    for _, loss, ppl in validations:
        assert float(ppl) == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert f"saved iteration {E2E_ITERS}" in e2e["stdout"]


@pytest.mark.slow
def test_pretrain_gpt_writes_the_logged_values_as_tensorboard_scalars(e2e):
    scalars = e2e["scalars"]
    lines = [m.groupdict() for m in LOG_LINE.finditer(e2e["stdout"])]
    steps = list(range(1, E2E_ITERS + 1))
    for tag, field in (("lm loss", "loss"), ("learning-rate", "lr"), ("grad-norm", "grad_norm"),
                       ("update-absorption", "absorption"),
                       ("throughput/tokens-per-s", "tokens")):
        assert [step for step, _ in scalars[tag]] == steps, tag
        logged = [float(m[field]) for m in lines]
        # The log line prints 4-7 significant digits of the same values.
        np.testing.assert_allclose([value for _, value in scalars[tag]], logged, rtol=1e-3,
                                   atol=1e-4, err_msg=tag)
    assert [step for step, _ in scalars["lm loss validation"]] == [2, 4]
    assert "lm loss validation ppl" in scalars
