"""Invalid flag combinations end the job with exit code 1 and one line,
`error: ...`, naming the flags at fault, before any process group forms,
with no traceback and nothing written.

The table is tests/test_arguments.py's INVALID (every combination checked
there against `parse_args`); here every row goes through the entry point
`pretrain_gpt.py` uses (`training.main`), plus the reliability flags' own
rows, the bad values a user types (BAD_VALUES: NaN and infinite floats,
out-of-range integers, unusable folders, absurd sizes), and two rows run
under a real torchrun."""
import os
import sys
import warnings

import pytest

from fault_harness import assert_error_line, run_job, tiny_gpt_argv
from megatron_sr import training
from test_arguments import INVALID, argv as base_argv

# Rows of the reliability flags: (extra flags, dropped flags, world size, names in the message).
RELIABILITY_INVALID = [
    (("--distributed-timeout-minutes", "0"), (), 1, ["--distributed-timeout-minutes"]),
    (("--distributed-timeout-minutes", "-0.5"), (), 1, ["--distributed-timeout-minutes"]),
    (("--max-skipped-iterations", "0"), (), 1, ["--max-skipped-iterations"]),
    (("--exit-interval", "0"), (), 1, ["--exit-interval"]),
    (("--exit-duration-in-mins", "0"), (), 1, ["--exit-duration-in-mins"]),
    (("--save", "/tmp/x", "--save-interval", "0"), (), 1, ["--save-interval"]),
]
# Values a user types by mistake, each of which ran silently, hung or ended in a
# traceback before it was refused: (extra flags, dropped flags, world size, needles).
BAD_VALUES = [
    *[((f"{flag}={value}",), (), 1, [flag, "finite", value])
      for flag, value in [("--lr", "nan"), ("--lr", "inf"), ("--min-lr", "nan"),
                          ("--lr-warmup-init", "nan"), ("--weight-decay", "inf"),
                          ("--init-method-std", "inf"), ("--adam-eps", "inf"),
                          ("--adam-beta1", "nan"), ("--adam-beta2", "nan"), ("--clip-grad", "nan"),
                          ("--hidden-dropout", "nan"), ("--attention-dropout", "nan"),
                          ("--norm-epsilon", "nan"), ("--rotary-base", "inf"),
                          ("--rotary-percent", "nan"), ("--lr-warmup-fraction", "nan"),
                          ("--decoupled-lr", "inf"), ("--exit-duration-in-mins", "nan"),
                          ("--distributed-timeout-minutes", "inf"), ("--lr", "-inf")]],
    (("--seed", str(2**40)), (), 1, ["--seed", "<= 4294967295", str(2**40)]),
    (("--seed", "-1"), (), 1, ["--seed", ">= 0"]),
    (("--vocab-size", str(10**12)), (), 1, ["--vocab-size", str(10**12)]),
    (("--split", "nan"), (), 1, ["--split 'nan'", "finite"]),
    (("--split", "inf,1,1"), (), 1, ["--split 'inf,1,1'"]),
    (("--data-path", "nan", "corpus"), ("--mock-data",), 1, ["--data-path nan corpus", "finite"]),
    (("--data-path", "inf", "corpus"), ("--mock-data",), 1, ["--data-path inf corpus"]),
    (("--data-path", "1e308", "a", "1e308", "b"), ("--mock-data",), 1,
     ["--data-path 1e308 a 1e308 b", "finite sum"]),
    (("--global-batch-size", "4000000000"), (), 1, ["--global-batch-size 4000000000",
                                                     "micro-batches per step"]),
    (("--data-cache-path", "/dev/null/cache"), (), 1, ["--data-cache-path /dev/null/cache"]),
    (("--tensorboard-dir", "/dev/null/tb"), (), 1, ["--tensorboard-dir /dev/null/tb"]),
    (("--wandb-save-dir", "/dev/null/w"), (), 1, ["--wandb-save-dir /dev/null/w"]),
]
TABLE = INVALID + RELIABILITY_INVALID + BAD_VALUES


@pytest.mark.parametrize("extra, drop, world_size, flags", TABLE,
                         ids=[" ".join(c[0] + tuple("-" + d for d in c[1])) for c in TABLE])
def test_invalid_flags_exit_1_with_one_error_line(extra, drop, world_size, flags, monkeypatch,
                                                  capsys, tmp_path):
    monkeypatch.chdir(tmp_path)  # a relative path a check forgot would land here
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *base_argv(*extra, drop=drop)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SystemExit) as exit_info:
            training.main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for flag in flags:
        assert flag in err, f"{flag} not named in: {err}"
    assert os.listdir(tmp_path) == []


def test_the_table_is_large_enough():
    assert len(TABLE) >= 15 and len(BAD_VALUES) >= 30


@pytest.mark.slow
@pytest.mark.parametrize("nproc, flags, needles", [
    (3, dict(tensor_model_parallel_size=2), ["--tensor-model-parallel-size"]),
    (1, dict(load="/nonexistent/megatron_sr_ckpt"), ["--load /nonexistent/megatron_sr_ckpt",
                                                     "no such directory"]),
], ids=["tp-does-not-divide-world", "load-dir-missing"])
def test_invalid_setup_under_torchrun_fails_fast(tmp_path, nproc, flags, needles):
    run = run_job(nproc, tiny_gpt_argv(train_iters=2, **flags), str(tmp_path / "log"), timeout=90)
    assert_error_line(run, *needles)
    assert run.returncode == 1, str(run)
