"""Megatron-LM's data-source and loop flags: --train-data-path /
--valid-data-path / --test-data-path, --dataloader-type and --skip-train.

Spec:
- Separate splits: each split reads all documents of its own prefixes
  (weights as in --data-path), --split plays no part, and a split no flag
  names is not built; the validation loss of a job is computed on
  --valid-data-path's documents (the same loss as --data-path of that prefix
  whose whole --split is validation), the test split's after training.
- --dataloader-type single is the order the loader always had: item p mod n
  at stream position p. cyclic reads every pass over the dataset in a fresh
  permutation seeded by (--seed, pass): a training job's losses differ from
  single's, are the same again with the same seed, differ with another seed,
  and a job resumed from a checkpoint continues the continuous run's losses.
- --skip-train loads --load, evaluates the validation and test sets and
  exits: no step runs, the checkpoint directory is left byte for byte as it
  was, and the validation loss is the one the training run printed for that
  checkpoint's iteration.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import re

import numpy as np
import pytest

from job_harness import VOCAB, losses, pretrain_worker, run_pretrain, tiny_gpt_argv
from megatron_sr import checkpointing
from megatron_sr.config import DataConfig
from megatron_sr.data.gpt_dataset import build_gpt_datasets
from megatron_sr.data.indexed_dataset import write_dataset
from megatron_sr.data.micro_batches import micro_batch_loader, sample_order
from megatron_sr.data.tokenizers import build_tokenizer
from multiprocess import run_ranks

SEQ = 16
VALID_LINE = re.compile(r"validation loss at iteration (\d+)( on test set)? \| "
                        r"lm loss value: ([0-9.E+-]+) \|")


def _corpus(path, low: int, high: int, documents: int, seed: int) -> str:
    """A prefix of `documents` documents of 20-60 tokens drawn from [low, high)."""
    rng = np.random.default_rng(seed)
    write_dataset(str(path), [list(rng.integers(low, high, int(n)))
                              for n in rng.integers(20, 60, documents)])
    return str(path)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Three prefixes whose token ids do not overlap (so a sample tells its
    source), and a fourth, counting one (each token the previous plus one)."""
    root = tmp_path_factory.mktemp("data_flags")
    counting = str(root / "counting")
    write_dataset(counting, [[(start + i) % VOCAB for i in range(64)]
                             for start in np.random.default_rng(1).integers(0, VOCAB, 120)])
    return {"a": _corpus(root / "a", 0, 20, 80, 0), "b": _corpus(root / "b", 20, 40, 80, 1),
            "c": _corpus(root / "c", 40, 60, 80, 2), "counting": counting}


def _tokens(dataset) -> np.ndarray:
    return np.concatenate([dataset[i]["tokens"].numpy() for i in range(len(dataset))])


# ----- --train-data-path / --valid-data-path / --test-data-path ---------------------------------

def test_each_split_reads_all_documents_of_its_own_prefixes(corpora):
    tokenizer = build_tokenizer("NullTokenizer", vocab_size=VOCAB)
    config = DataConfig(train_data_path=["0.5", corpora["a"], "0.5", corpora["b"]],
                        valid_data_path=[corpora["c"]], seq_length=SEQ, split="1,0,0")
    train, valid, test = build_gpt_datasets(config, tokenizer, (400, 40, 40), seed=5)
    assert test is None  # no --test-data-path
    assert len(train) == 400 and len(valid) >= 40
    train_tokens, valid_tokens = _tokens(train), _tokens(valid)
    assert valid_tokens.min() >= 40  # only c's ids: --split 1,0,0 plays no part
    assert (train_tokens < 20).mean() == pytest.approx(0.5, abs=0.05)  # the 0.5 / 0.5 blend
    assert train_tokens.max() < 40
    # All of a's documents (no --split share) are read by the train blend's part of a.
    part_a = train.datasets[0]
    assert sorted(set(part_a.document_index.tolist())) == list(range(80))

    with pytest.raises(ValueError, match="--valid-data-path 0.5 x y: expected weight-prefix"):
        build_gpt_datasets(DataConfig(train_data_path=[corpora["a"]],
                                      valid_data_path=["0.5", "x", "y"], seq_length=SEQ),
                           tokenizer, (10, 10, 0), seed=5)


# ----- --dataloader-type -----------------------------------------------------------------------

def test_cyclic_order_is_a_fresh_seeded_permutation_every_pass():
    single, cyclic = sample_order("single", 10, 7), sample_order("cyclic", 10, 7)
    assert [single(p) for p in range(25)] == [p % 10 for p in range(25)]
    passes = [[cyclic(p) for p in range(e * 10, (e + 1) * 10)] for e in range(3)]
    assert all(sorted(order) == list(range(10)) for order in passes)
    assert passes[0] != passes[1] and passes[0] != list(range(10))
    again = sample_order("cyclic", 10, 7)
    assert [again(p) for p in range(30)] == sum(passes, [])  # reproducible by seed
    other = sample_order("cyclic", 10, 8)
    assert [other(p) for p in range(30)] != sum(passes, [])
    with pytest.raises(ValueError, match="--dataloader-type 'external'"):
        sample_order("external", 10, 7)


def test_cyclic_micro_batches_resume_and_do_not_depend_on_workers(corpora):
    tokenizer = build_tokenizer("NullTokenizer", vocab_size=VOCAB)
    train, _, _ = build_gpt_datasets(DataConfig(data_path=[corpora["a"]], split="1,0,0",
                                                seq_length=SEQ), tokenizer, (30, 0, 0), seed=5)
    size = len(train)

    def batches(consumed, count, workers=0, kind="cyclic"):
        loader = micro_batch_loader(train, consumed, 2, 0, 1, num_workers=workers,
                                    dataloader_type=kind, seed=3)
        return [b.numpy() for b in itertools.islice(loader, count)]

    continuous = batches(0, size)  # two passes over the dataset
    np.testing.assert_array_equal(batches(2 * 5, size - 5), continuous[5:])
    np.testing.assert_array_equal(batches(0, size, workers=2), continuous)
    single = batches(0, size, kind="single")
    assert not np.array_equal(np.stack(single), np.stack(continuous))
    first_pass = np.concatenate(continuous)[: size]
    assert sorted(map(bytes, first_pass)) == sorted(map(bytes, np.concatenate(single)[: size]))


@pytest.mark.slow
def test_a_job_with_cyclic_order_trains_on_other_batches_reproducibly(tmp_path):
    """Mock data: item i is seeded by its index, so the order shows in the losses."""
    save = str(tmp_path / "ckpt")
    runs = {"single": tiny_gpt_argv(train_iters=4, dataloader_type="single"),
            "cyclic": tiny_gpt_argv(train_iters=4, dataloader_type="cyclic", save=save,
                                    save_interval=2),
            "cyclic again": tiny_gpt_argv(train_iters=4, dataloader_type="cyclic"),
            "cyclic seed": tiny_gpt_argv(train_iters=4, dataloader_type="cyclic", seed=99),
            "cyclic resumed": tiny_gpt_argv(train_iters=4, dataloader_type="cyclic",
                                            load=save)}
    results = {}
    for name, argv in runs.items():
        if name == "cyclic resumed":  # resume from iteration 2 of the "cyclic" run
            with open(os.path.join(save, checkpointing.TRACKER_FILENAME), "w") as f:
                f.write("2\n")
        results[name] = losses(run_pretrain(1, argv))
    assert results["cyclic"] == results["cyclic again"]
    assert results["cyclic"][0] != results["single"][0]
    assert results["cyclic seed"][0] != results["cyclic"][0]
    assert results["cyclic resumed"] == results["cyclic"][2:]


# ----- end to end: separate splits and --skip-train --------------------------------------------

def _each(rank: int, world_size: int, argvs: list[list[str]]) -> list[dict]:
    return [pretrain_worker(rank, world_size, argv) for argv in argvs]


def _evaluations(stdout: str) -> dict[str, list[tuple[int, float]]]:
    found = {"valid": [], "test": []}
    for iteration, test, loss in VALID_LINE.findall(stdout):
        found["test" if test else "valid"].append((int(iteration), float(loss)))
    return found


def _digests(folder: str) -> dict[str, tuple[str, int]]:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = (hashlib.sha256(f.read()).hexdigest(),
                                                      os.stat(path).st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def jobs(corpora, tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs")
    save = str(root / "ckpt")
    common = dict(mock_data=False, global_batch_size=4, micro_batch_size=4, eval_iters=2,
                  data_cache_path=str(root / "cache"))
    per_split = dict(train_data_path=corpora["counting"], valid_data_path=corpora["b"],
                     test_data_path=corpora["c"])
    argvs = {
        "train": tiny_gpt_argv(train_iters=4, eval_interval=2, save=save, **per_split,
                               **common),
        # Evaluations of the untrained (seeded) model: the valid path's documents, or
        # the same prefix as the validation share of --data-path.
        "valid b": tiny_gpt_argv(train_iters=4, skip_train=True, valid_data_path=corpora["b"],
                                 **common),
        "split b": tiny_gpt_argv(train_iters=4, skip_train=True, data_path=corpora["b"],
                                 split="0,1,0", **common),
        "valid c": tiny_gpt_argv(train_iters=4, skip_train=True, valid_data_path=corpora["c"],
                                 **common),
    }
    results = {name: result for name, result in
               zip(argvs, run_ranks(_each, 1, list(argvs.values()), timeout=400)[0])}
    before = _digests(save)
    # --skip-train of iteration 4 (its optimizer state is not read); --save is not written.
    skip = tiny_gpt_argv(train_iters=4, eval_interval=2, skip_train=True, load=save, save=save,
                         **per_split, **common)
    results["skip"] = run_pretrain(1, skip)[0]
    return {"results": results, "before": before, "after": _digests(save)}


@pytest.mark.slow
def test_validation_reads_the_valid_path_and_test_runs_after_training(jobs):
    results = jobs["results"]
    train = _evaluations(results["train"]["stdout"])
    assert [i for i, _ in train["valid"]] == [2, 4] and [i for i, _ in train["test"]] == [4]
    assert len(results["train"]["reports"]) == 4
    b, split_b, c = (_evaluations(results[n]["stdout"])["valid"]
                     for n in ("valid b", "split b", "valid c"))
    assert b == split_b and len(b) == 1  # --valid-data-path b: b's documents
    assert c[0][1] != b[0][1]
    for name in ("valid b", "split b", "valid c"):
        assert _evaluations(results[name]["stdout"])["test"] == []  # no --test-data-path


@pytest.mark.slow
def test_skip_train_evaluates_the_checkpoint_and_leaves_it_untouched(jobs):
    results = jobs["results"]
    skip = results["skip"]
    assert skip["reports"] == [] and skip["last_iteration"] == 4
    assert "[skip-train] no training: evaluating the model of iteration 4" in skip["stdout"]
    assert "elapsed time per iteration" not in skip["stdout"]
    assert "--skip-train implies --no-load-optim" in skip["stdout"]
    assert skip["loaded_params"] is not None
    trained, evaluated = (_evaluations(results[n]["stdout"]) for n in ("train", "skip"))
    assert evaluated["valid"] == [trained["valid"][-1]]  # the loss of iteration 4, again
    assert evaluated["test"] == trained["test"]
    assert jobs["after"] == jobs["before"]
