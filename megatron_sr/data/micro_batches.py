"""This data-parallel rank's micro-batches, read by a torch DataLoader.

Which samples: from `consumed_samples` on, the global stream is cut into
steps of global-batch samples as Megatron's pretraining sampler cuts it:
micro-batch k of data-parallel rank r is items
[c + (k x dp + r) x micro, + micro) of the dataset (modulo its length: the
stream wraps around, so validation can run past its samples). A resumed run
passes its consumed samples and sees exactly what a continuous run would.

Which item a stream position p reads (`--dataloader-type`, `sample_order`):
- single (Megatron's pretraining sampler): item p mod n of the n items;
- cyclic: pass e = p // n over the dataset reads its items in a permutation
  seeded by (seed, e), a fresh one every pass. Megatron's random sampler
  seeds the permutation with the pass number alone; here --seed is part of
  the key, so runs with different seeds see different orders. Positions, not
  a sampler's state, decide the item: a resumed run continues the pass it
  stopped in.

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

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

PREFETCH_FACTOR = 2
DATALOADER_TYPES = ("single", "cyclic")  # --dataloader-type


class SingleOrder:
    """--dataloader-type single: position p reads item p mod `size`."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, position: int) -> int:
        return position % self.size


class CyclicOrder:
    """--dataloader-type cyclic: position p reads item permutation_e[p mod
    `size`] of pass e = p // `size`, permutation_e = numpy's RandomState
    seeded by [`seed`, e] (the legacy generator, whose streams numpy keeps
    fixed across versions). Keeps the last pass's permutation (int64[size])."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self._pass, self._permutation = None, None

    def __call__(self, position: int) -> int:
        epoch = position // self.size
        if epoch != self._pass:
            rng = np.random.RandomState([self.seed, epoch])
            self._pass, self._permutation = epoch, rng.permutation(self.size)
        return int(self._permutation[position % self.size])


def sample_order(dataloader_type: str, size: int, seed: int):
    """Position -> item of a dataset of `size` items under `dataloader_type`
    (module doc); ValueError naming --dataloader-type for another value."""
    if size < 1:
        raise ValueError(f"a dataset of {size} items has no sample to read")
    if dataloader_type == "single":
        return SingleOrder(size)
    if dataloader_type == "cyclic":
        return CyclicOrder(size, seed)
    raise ValueError(f"--dataloader-type {dataloader_type!r}: expected one of "
                     f"{', '.join(DATALOADER_TYPES)}")


class MicroBatchDataset(Dataset):
    """Item k: int64 tensor [micro_batch_size, seq_length + 1], this DP
    rank's k-th micro-batch of `dataset` (whose item i is {"tokens": [seq + 1]})
    from `consumed_samples` on, its stream positions mapped to items by
    `sample_order` of `dataloader_type` and `seed`. Unbounded (no __len__)."""

    def __init__(self, dataset, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int,
                 dataloader_type: str = "single", seed: int = 0):
        self.dataset = dataset
        self.order = sample_order(dataloader_type, len(dataset), seed)
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size

    def __getitem__(self, k: int) -> torch.Tensor:
        first = self.consumed_samples + (k * self.data_parallel_size
                                         + self.data_parallel_rank) * self.micro_batch_size
        return torch.stack([self.dataset[self.order(first + i)]["tokens"]
                            for i in range(self.micro_batch_size)])


class _Counting(Sampler):
    """0, 1, 2, ... without end."""

    def __iter__(self) -> Iterator[int]:
        return itertools.count()


def micro_batch_loader(dataset, consumed_samples: int, micro_batch_size: int,
                       data_parallel_rank: int, data_parallel_size: int, *, num_workers: int = 0,
                       pin_memory: bool = False, dataloader_type: str = "single",
                       seed: int = 0) -> Iterator[torch.Tensor]:
    """An endless iterator over `MicroBatchDataset`'s items in order, read by
    `num_workers` worker processes (0: in this process) with `pin_memory`
    (for a CUDA device); `dataloader_type` and `seed` pick the sample order
    (module doc). Stopping early is fine: the workers end with the iterator."""
    if num_workers < 0:
        raise ValueError(f"--num-workers ({num_workers}) must be >= 0")
    loader = DataLoader(
        MicroBatchDataset(dataset, consumed_samples, micro_batch_size, data_parallel_rank,
                          data_parallel_size, dataloader_type, seed),
        batch_size=None, sampler=_Counting(), num_workers=num_workers, pin_memory=pin_memory,
        prefetch_factor=PREFETCH_FACTOR if num_workers else None,
        # The loader draws its workers' base seed from this generator: from the
        # default one it would shift the dropout stream, and a resumed run
        # (which builds its loader after restoring the RNG) would diverge.
        generator=torch.Generator().manual_seed(0))
    return iter(loader)
