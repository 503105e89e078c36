"""What the ranks print: which rank prints, and whole lines."""
from __future__ import annotations

import sys

import torch.distributed as dist


def write_whole_lines() -> None:
    """Makes this process's stdout and stderr write each line in one write call,
    newline included. Ranks share their launcher's stdout; unbuffered (as
    PYTHONUNBUFFERED=1 makes it, common under Slurm and in containers) `print`
    writes a line and its newline separately, and another rank's line can land
    in between, mangling both. Streams without `reconfigure` are left alone."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True, write_through=False)


def print_rank_0(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def is_last_rank() -> bool:
    """The logging rank: it holds the loss (last pipeline stage)."""
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1


def print_rank_last(message: str) -> None:
    if is_last_rank():
        print(message, flush=True)
