"""A rank's random number generator states, as a checkpoint stores them.

Dropout masks and any other host-side randomness continue exactly after a
resume: each rank saves the states of Python's `random`, numpy, torch (CPU
and CUDA) and the TP-rank RNG tracker (`megatron_sr.random`) and loads its
own back. A data-parallel rank the checkpoint has no state for (a resume at
a larger DP size) gets fresh streams of its own. (SR's bits need none of
this: they are keyed by the optimizer step, see docs/DESIGN.md.)
"""
from __future__ import annotations

import hashlib
import random

import numpy as np
import torch

from megatron_sr.random import get_rng_tracker, model_parallel_seed


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.cpu().numpy().tobytes()


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def rng_state() -> dict:
    """This rank's RNG states (python, numpy, torch CPU/CUDA, the TP tracker) as
    plain Python values (bytes for generator states): they travel through
    `all_gather_object` and load with `weights_only=True`."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"random": random.getstate(),
             "numpy": [kind, keys.astype(np.uint32).tobytes(), position, has_gauss,
                       cached_gaussian],
             "torch": _tensor_bytes(torch.get_rng_state()),
             "tracker": {name: _tensor_bytes(t) for name, t in
                         get_rng_tracker().get_states().items()}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = _tensor_bytes(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict) -> None:
    """Restores what `rng_state` returned."""
    version, internal, gauss_next = state["random"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, np.frombuffer(keys, dtype=np.uint32), position, has_gauss,
                         cached_gaussian))
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_bytes_tensor(state["cuda"]))
    get_rng_tracker().set_states({name: _bytes_tensor(b) for name, b in state["tracker"].items()})


def seed_new_data_parallel_rank(seed: int, dp_rank: int, iteration: int) -> None:
    """Seeds the RNG streams of a data-parallel rank the checkpoint has no state
    for (resuming at a larger DP size) from (seed, DP rank, iteration): its
    dropout masks are its own, not a copy of DP rank 0's stream. The TP and PP
    offsets of `model_parallel_seed` still apply, so the streams shared by the
    TP ranks of one position stay shared."""
    digest = hashlib.sha256(f"resume|{seed}|{dp_rank}|{iteration}".encode()).digest()
    model_parallel_seed(int.from_bytes(digest[:4], "little") % (2 ** 31 - 10 ** 6))
