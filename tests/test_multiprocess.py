import pytest
import torch
import torch.distributed as dist

from multiprocess import run_ranks


def _all_reduce_rank(rank, world_size):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank 1")
    return rank


def test_run_ranks_returns_per_rank_values():
    assert run_ranks(_all_reduce_rank, 3) == [3.0, 3.0, 3.0]


def test_run_ranks_reports_failing_rank():
    with pytest.raises(RuntimeError, match="(?s)rank 1 failed.*boom on rank 1"):
        run_ranks(_fail_on_rank_one, 2)
