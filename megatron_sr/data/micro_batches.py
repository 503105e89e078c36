"""This data-parallel rank's micro-batches, read by a torch DataLoader.

Which samples: from `consumed_samples` on, the global stream is cut into
steps of global-batch samples as Megatron's pretraining sampler cuts it:
micro-batch k of data-parallel rank r is items
[c + (k x dp + r) x micro, + micro) of the dataset (modulo its length: the
stream wraps around, so validation can run past its samples). A resumed run
passes its consumed samples and sees exactly what a continuous run would.

How: item k of `MicroBatchDataset` is micro-batch k, a pure function of k,
and the loader's sampler counts k = 0, 1, 2, ... So `--num-workers` only
changes who reads (worker k mod W reads item k; the DataLoader hands them
back in k order): the same micro-batches in the same order for any worker
count. With workers the reads (index lookups, .bin page-ins, the stack)
run ahead of the training loop (`prefetch_factor` micro-batches per
worker); on CUDA the batches come back in pinned memory, so the trainer's
`.to(device, non_blocking=True)` is a real asynchronous copy.
"""
from __future__ import annotations

import itertools
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

PREFETCH_FACTOR = 2


class MicroBatchDataset(Dataset):
    """Item k: int64 tensor [micro_batch_size, seq_length + 1], this DP
    rank's k-th micro-batch of `dataset` (whose item i is {"tokens": [seq + 1]})
    from `consumed_samples` on. Unbounded (no __len__)."""

    def __init__(self, dataset, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int):
        self.dataset = dataset
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size

    def __getitem__(self, k: int) -> torch.Tensor:
        first = self.consumed_samples + (k * self.data_parallel_size
                                         + self.data_parallel_rank) * self.micro_batch_size
        size = len(self.dataset)
        return torch.stack([self.dataset[(first + i) % size]["tokens"]
                            for i in range(self.micro_batch_size)])


class _Counting(Sampler):
    """0, 1, 2, ... without end."""

    def __iter__(self) -> Iterator[int]:
        return itertools.count()


def micro_batch_loader(dataset, consumed_samples: int, micro_batch_size: int,
                       data_parallel_rank: int, data_parallel_size: int, *, num_workers: int = 0,
                       pin_memory: bool = False) -> Iterator[torch.Tensor]:
    """An endless iterator over `MicroBatchDataset`'s items in order, read by
    `num_workers` worker processes (0: in this process) with `pin_memory`
    (for a CUDA device). Stopping early is fine: the workers end with the
    iterator."""
    if num_workers < 0:
        raise ValueError(f"--num-workers ({num_workers}) must be >= 0")
    loader = DataLoader(
        MicroBatchDataset(dataset, consumed_samples, micro_batch_size, data_parallel_rank,
                          data_parallel_size),
        batch_size=None, sampler=_Counting(), num_workers=num_workers, pin_memory=pin_memory,
        prefetch_factor=PREFETCH_FACTOR if num_workers else None,
        # The loader draws its workers' base seed from this generator: from the
        # default one it would shift the dropout stream, and a resumed run
        # (which builds its loader after restoring the RNG) would diverge.
        generator=torch.Generator().manual_seed(0))
    return iter(loader)
