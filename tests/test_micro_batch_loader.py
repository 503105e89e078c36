"""`--num-workers`: a DataLoader over the GPT dataset that reads ahead without
changing what is read.

Spec (megatron_sr/data/micro_batches.py):
- micro-batch k of DP rank r is items [c + (k x dp + r) x micro, + micro) of
  the dataset, wrapping around its end;
- the same micro-batches in the same order for 0, 1 and 2 workers, on a
  real .bin/.idx GPT dataset;
- a training job gives bit-identical losses with --num-workers 0 and 2, and
  resuming with workers continues the continuous run's losses bit for bit.
"""
from __future__ import annotations

import itertools
import shutil

import numpy as np
import pytest
import torch

from job_harness import VOCAB, losses, run_pretrain, tiny_gpt_argv

from megatron_sr import checkpointing
from megatron_sr.config import DataConfig
from megatron_sr.data.gpt_dataset import build_gpt_datasets
from megatron_sr.data.indexed_dataset import write_dataset
from megatron_sr.data.micro_batches import micro_batch_loader
from megatron_sr.data.tokenizers import build_tokenizer

SEQ = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("loader") / "corpus")
    rng = np.random.default_rng(0)
    write_dataset(prefix, [list(rng.integers(0, VOCAB, int(n))) for n in
                           rng.integers(5, 80, 120)])
    return prefix


@pytest.fixture(scope="module")
def train_dataset(corpus):
    config = DataConfig(data_path=[corpus], split="90,10,0", seq_length=SEQ)
    tokenizer = build_tokenizer("NullTokenizer", vocab_size=VOCAB)
    train, _, _ = build_gpt_datasets(config, tokenizer, (200, 10, 0), seed=3)
    return train


def _first(loader, count):
    return [batch.clone() for batch in itertools.islice(loader, count)]


@pytest.mark.parametrize("consumed,dp_rank,dp_size", [(0, 0, 1), (-20, 1, 2), (37, 2, 3)])
def test_micro_batch_k_is_megatrons_slice_of_the_stream(train_dataset, consumed, dp_rank,
                                                        dp_size):
    """consumed < 0: that many samples before the end, so the stream wraps around."""
    micro, count = 3, 12
    size = len(train_dataset)
    consumed = consumed % size
    batches = _first(micro_batch_loader(train_dataset, consumed, micro, dp_rank, dp_size), count)
    for k, batch in enumerate(batches):
        first = consumed + (k * dp_size + dp_rank) * micro
        expected = torch.stack([train_dataset[(first + i) % size]["tokens"]
                                for i in range(micro)])
        assert batch.dtype == torch.int64 and batch.shape == (micro, SEQ + 1)
        assert torch.equal(batch, expected)


@pytest.mark.parametrize("workers", [1, 2])
def test_any_worker_count_reads_the_same_batches_in_the_same_order(train_dataset, workers):
    reference = _first(micro_batch_loader(train_dataset, 10, 2, 1, 2), 25)
    loaded = _first(micro_batch_loader(train_dataset, 10, 2, 1, 2, num_workers=workers), 25)
    assert len(loaded) == len(reference)
    for a, b in zip(loaded, reference):
        assert torch.equal(a, b)


def test_negative_worker_count_names_the_flag(train_dataset):
    with pytest.raises(ValueError, match="--num-workers"):
        micro_batch_loader(train_dataset, 0, 1, 0, 1, num_workers=-1)


def _argv(corpus, tmp, workers, **flags):
    return tiny_gpt_argv(train_iters=4, global_batch_size=4, mock_data=False, data_path=corpus,
                         data_cache_path=str(tmp / "cache"), num_workers=workers, **flags)


@pytest.mark.slow
def test_training_with_workers_gives_the_same_losses_and_resumes_exactly(corpus, tmp_path):
    no_workers = run_pretrain(1, _argv(corpus, tmp_path, 0))
    with_workers = run_pretrain(1, _argv(corpus, tmp_path, 2, save=str(tmp_path / "ckpt"),
                                         save_interval=2))
    assert losses(with_workers) == losses(no_workers)
    resume_dir = tmp_path / "resume"
    name = checkpointing.iteration_dir_name(2)
    shutil.copytree(tmp_path / "ckpt" / name, resume_dir / name)
    (resume_dir / checkpointing.TRACKER_FILENAME).write_text("2\n")
    resumed = run_pretrain(1, _argv(corpus, tmp_path, 2, load=str(resume_dir)))
    assert losses(resumed) == losses(no_workers)[2:]


@pytest.mark.gpu
def test_batches_come_in_pinned_memory_for_a_cuda_device(train_dataset):
    loader = micro_batch_loader(train_dataset, 0, 2, 0, 1, num_workers=1, pin_memory=True)
    batch = next(loader)
    assert batch.is_pinned()
    assert torch.equal(batch.to("cuda", non_blocking=True).cpu(),
                       next(micro_batch_loader(train_dataset, 0, 2, 0, 1)))
