"""The training and validation micro-batch streams of a rank.

Batches: global batch = micro-batch x data-parallel size x micro-batches per
step. Step i of a run consumes samples [c, c + global batch) of the train
stream, c = consumed samples; micro-batch j of data-parallel rank r is the
slice [c + (j x dp + r) x micro, + micro), as Megatron's pretraining sampler
cuts it (`megatron_sr.data.micro_batches`), so a resumed run sees exactly the
samples a continuous run would.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Optional, Sequence

import torch

from megatron_sr import parallel_state
from megatron_sr.config import JobConfig
from megatron_sr.data.micro_batches import micro_batch_loader
from megatron_sr.recipes import gpt


@dataclasses.dataclass(frozen=True)
class DocumentSettings:
    """The run's document-aware flags and the tokenizer's eod id."""

    eod: int
    eod_mask_loss: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False

    @property
    def every_chunk(self) -> bool:
        """Positions and attention masks of documents matter to every chunk."""
        return self.reset_position_ids or self.reset_attention_mask


class MicroBatchStream:
    """An iterator over micro-batch rows that carries the run's
    `DocumentSettings` (`documents`), which `get_batch` reads; `DataStreams`
    makes them. A plain iterator stands for a stream without document flags."""

    def __init__(self, batches: Iterator[torch.Tensor], documents: Optional[DocumentSettings]):
        self.batches, self.documents = batches, documents

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        return next(self.batches)


def train_valid_test_num_samples(job: JobConfig) -> tuple[int, int, int]:
    """Samples each split must provide for the whole run (Megatron's counts):
    train --train-iters steps (none with --skip-train), valid every
    evaluation's --eval-iters steps (one evaluation with --skip-train), test
    one evaluation's when --test-data-path names a test set (the test share of
    --split is not read)."""
    training = job.training
    global_batch = training.global_batch_size
    evaluation = training.eval_iters * global_batch
    if training.skip_train:
        return 0, evaluation, evaluation if job.data.test_data_path else 0
    train = training.train_iters * global_batch
    evaluations = training.train_iters // training.eval_interval + 1
    return train, evaluations * evaluation, evaluation if job.data.test_data_path else 0


class DataStreams:
    """Per-chunk micro-batch iterators for training, validation and test.

    Chunks that take tokens (first stage) or labels (last stage) each get their
    own iterator over the same stream (`micro_batch_loader`: --num-workers
    reader processes, pinned memory on CUDA, --dataloader-type's sample order
    seeded by --seed; wrapped in a `MicroBatchStream`
    carrying the run's `DocumentSettings`); other chunks get None, unless
    document positions or masks are reset (--reset-position-ids,
    --reset-attention-mask), which every chunk needs. The datasets come from
    `datasets_provider` (see `pretrain`; None: the GPT recipe's
    `train_valid_test_datasets_provider`), called once on every rank."""

    def __init__(self, job: JobConfig, tokenizer, model: Sequence[torch.nn.Module],
                 datasets_provider: Optional[Callable] = None):
        self.job = job
        self.model = model
        datasets_provider = datasets_provider or gpt.train_valid_test_datasets_provider
        self.train, self.valid, self.test = datasets_provider(
            train_valid_test_num_samples(job), job=job, tokenizer=tokenizer)
        data = job.data
        self.documents = DocumentSettings(tokenizer.eod, data.eod_mask_loss,
                                          data.reset_position_ids, data.reset_attention_mask)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()

    def _iterators(self, dataset, consumed: int):
        if dataset is None:
            return [None] * len(self.model)
        return [MicroBatchStream(
                    micro_batch_loader(dataset, consumed, self.job.training.micro_batch_size,
                                       self.dp_rank, self.dp_size,
                                       num_workers=self.job.data.num_workers,
                                       pin_memory=parallel_state.get_default_device().type
                                       == "cuda",
                                       dataloader_type=self.job.data.dataloader_type,
                                       seed=self.job.training.seed), self.documents)
                if chunk.pre_process or chunk.post_process or self.documents.every_chunk
                else None for chunk in self.model]

    def train_iterators(self, consumed_samples: int):
        return self._iterators(self.train, consumed_samples)

    def valid_iterators(self, consumed_samples: int = 0):
        return self._iterators(self.valid, consumed_samples)

    def test_iterators(self):
        return self._iterators(self.test, 0)
