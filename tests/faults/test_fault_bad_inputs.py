"""Bad inputs are refused at startup with one clear message, before any
training: corrupted checkpoints (size and sha256 in the manifest), broken
datasets (truncated .bin, .idx of another dataset), a dataset made with
another tokenizer; and NaN/Inf gradients are skipped and counted until
--max-skipped-iterations in a row stop the job."""
import os
import re
import shutil

import numpy as np
import pytest

from fault_harness import (TRAIN_ITERS, assert_error_line, copy_checkpoint, job_argv, run_job,
                           tiny_gpt_argv)
from job_harness import VOCAB
from megatron_sr.data.gpt_dataset import build_gpt_datasets
from megatron_sr.data.indexed_dataset import IndexedDatasetError, write_dataset
from megatron_sr.data.tokenizers import NullTokenizer
from megatron_sr.config import DataConfig

def _trained(run) -> bool:
    return any(line.startswith(" iteration ") for line in run.output.splitlines())


STATE_FILE = os.path.join("iter_0000006", "mp_rank_01", "model_optim_rng.pt")


def _truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip_a_bit(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))


@pytest.mark.slow
@pytest.mark.parametrize("corrupt, message", [(_truncate, "is truncated or was modified"),
                                              (_flip_a_bit, "fails its sha256 checksum")],
                         ids=["truncated", "bit-flip"])
def test_corrupted_checkpoint_is_refused_at_load(reference, tmp_path, corrupt, message):
    load = str(tmp_path / "ckpt")
    copy_checkpoint(reference, TRAIN_ITERS, load)
    corrupt(os.path.join(load, STATE_FILE))
    # TP=2 on 2 ranks (DP=1) loads the TP=2 x DP=2 checkpoint; nothing to train after it.
    run = run_job(2, job_argv(load=load), str(tmp_path / "log"), timeout=120)
    assert_error_line(run, os.path.join(load, STATE_FILE), message)
    assert run.returncode == 1 and not _trained(run), str(run)


# ----- datasets ------------------------------------------------------------------------------

def _documents(high: int, count: int = 40, length: int = 30, seed: int = 0):
    rng = np.random.default_rng(seed)
    documents = [rng.integers(0, high, size=length) for _ in range(count)]
    documents[0][:2] = [high - 1, 0]  # the ids span exactly [0, high)
    return documents


def _write(prefix: str, high: int, **kwargs) -> str:
    write_dataset(prefix, _documents(high, **kwargs), dtype=np.uint16)
    return prefix


def _break_truncated_bin(tmp_path) -> str:
    prefix = _write(str(tmp_path / "corpus"), VOCAB)
    _truncate(prefix + ".bin")
    return prefix


def _break_mismatched_idx(tmp_path) -> str:
    prefix = _write(str(tmp_path / "corpus"), VOCAB)
    other = _write(str(tmp_path / "other"), VOCAB, count=41, length=29, seed=1)
    shutil.copyfile(other + ".idx", prefix + ".idx")
    return prefix


def _wrong_tokenizer(tmp_path) -> str:
    return _write(str(tmp_path / "corpus"), 50257)  # GPT-2 ids; the run's vocabulary has 61


@pytest.mark.slow
@pytest.mark.parametrize("make_dataset, needles", [
    (_break_truncated_bin, ["corpus.bin", "is truncated or belongs to another index"]),
    (_break_mismatched_idx, ["corpus.bin", "corpus.idx", "belongs to another index"]),
    (_wrong_tokenizer, ["corpus.bin", "token ids span [0, 50256]", "tokenizer has 61 ids",
                        "--tokenizer-type"]),
], ids=["truncated-bin", "mismatched-idx", "wrong-tokenizer"])
def test_broken_dataset_is_refused_at_startup(tmp_path, make_dataset, needles):
    prefix = make_dataset(tmp_path)
    argv = tiny_gpt_argv(mock_data=False, data_path=prefix, split="90,10,0", train_iters=2,
                         global_batch_size=2)
    run = run_job(1, argv, str(tmp_path / "log"), timeout=90)
    assert_error_line(run, *needles)
    assert run.returncode == 1 and not _trained(run), str(run)


@pytest.mark.parametrize("high, fits", [(VOCAB + 1, True), (VOCAB + 2, False)])
def test_vocabulary_check_bounds_the_largest_token_id(tmp_path, high, fits):
    """NullTokenizer(VOCAB) has VOCAB + 1 ids (EOD included): the id VOCAB
    fits, VOCAB + 1 does not (it would silently train a padding row)."""
    prefix = _write(str(tmp_path / "corpus"), high)
    config = DataConfig(data_path=[prefix], seq_length=16, split="100,0,0")
    build = lambda: build_gpt_datasets(config, NullTokenizer(VOCAB), [10, 0, 0], 1)  # noqa: E731
    if fits:
        build()
    else:
        with pytest.raises(IndexedDatasetError, match=f"span \\[0, {high - 1}\\]"):
            build()


# ----- NaN/Inf gradients ---------------------------------------------------------------------

@pytest.mark.slow
def test_nan_gradients_are_skipped_and_counted_then_stop_the_job(tmp_path):
    argv = job_argv(tensor_model_parallel_size=1, train_iters=8, max_skipped_iterations=3)
    run = run_job(2, argv, str(tmp_path / "log"),
                  {"MEGATRON_SR_INJECT_NAN_GRAD_AT": "2,4,5,6"}, timeout=120)
    lines = {int(line.split("/")[0].split()[-1]): line for line in run.output.splitlines()
             if re.match(r" \[[0-9 :.-]+\] iteration ", line)}
    assert "iteration 2: grad norm is nan, step skipped (1 in a row)" in run.output, str(run)
    assert "number of skipped iterations:   1" in lines[2] and "grad norm: nan" in lines[2]
    assert "number of skipped iterations:   1" in lines[3] and "grad norm: nan" not in lines[3]
    assert "iteration 5: grad norm is nan, step skipped (2 in a row)" in run.output
    assert "number of skipped iterations:   3" in lines[5]
    assert "iteration 6: grad norm is nan, step skipped (3 in a row)" in run.output
    assert_error_line(run, "3 consecutive iterations had NaN/Inf gradients",
                      "--max-skipped-iterations 3")
    assert run.returncode == 1 and max(lines) == 5, str(run)  # stopped in 6
