"""Replicas that must stay bitwise equal, checked
(--check-weight-hash-across-dp-replicas-interval N, every N iterations).

Every data-parallel rank holds a copy of its model-parallel rank's
parameters, and every tensor-parallel rank a copy of the parameters that TP
does not split (norms, biases of row-parallel layers, position embeddings).
Those copies stay equal only while every communicator delivers the same
sums to every member and no memory goes bad; nothing else in the step would
notice a copy that drifted. The check:

1. hashes each parameter of this rank on its device (`parameter_hashes`:
   two int64 sums of the raw bits, position-weighted, modulo a prime; any
   single changed bit changes both);
2. all-gathers the hashes over the data-parallel group, and those of the
   TP-replicated parameters over the tensor-parallel group: one all-gather
   per group (skipped for a group of one);
3. all-reduces over the world whether any rank found a difference (one
   scalar), so that every rank stops together; only then the ranks that
   found one exchange their reports.

Every rank of the world calls `check_replicas` at the same iteration.
A difference raises `ReplicaMismatch` on every rank, naming the parameter,
the group and which global ranks hold which copy.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_sr import fault_injection, parallel_state

_PRIME = 2_147_483_647  # 2**31 - 1
_CHUNK = 1 << 22  # elements hashed at a time: ~100 MB of int64 temporaries
_SHOWN = 4  # differences named in the error; the rest counted
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class ReplicaMismatch(RuntimeError):
    """Copies of a parameter that must be equal are not."""


def parameter_hashes(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Two hashes of each tensor's bits: int64 [len(params), 2] on the
    tensors' device (CPU for an empty list). Hash k of a tensor with bits
    b_i (its elements reinterpreted as unsigned integers, row-major) is
    sum_i (b_i mod p) * w_k(i) mod p, p = 2**31 - 1 (a prime), with weights
    w_0(i) = i mod (p - 1) + 1 and w_1(i) = (i * 40503 + 1) mod (p - 1) + 1,
    both in [1, p - 1]: a change of one element by 2**j changes both by
    2**j * w mod p, which is not 0. Exact integer arithmetic: the same bits give the same hash on any
    device and in any order."""
    if not params:
        return torch.zeros(0, 2, dtype=torch.int64)
    device = params[0].device
    out = torch.zeros(len(params), 2, dtype=torch.int64, device=device)
    for row, param in enumerate(params):
        flat = param.detach().reshape(-1)
        bits = flat.view(_BITS[flat.element_size()])
        for start in range(0, bits.numel(), _CHUNK):
            chunk = bits[start:start + _CHUNK].to(torch.int64)
            if flat.element_size() < 8:
                chunk = chunk & ((1 << (8 * flat.element_size())) - 1)
            chunk = chunk.remainder(_PRIME)  # < 2**31
            index = torch.arange(start, start + chunk.numel(), dtype=torch.int64, device=device)
            for k, weights in enumerate((index.remainder(_PRIME - 1) + 1,
                                         (index * 40503 + 1).remainder(_PRIME - 1) + 1)):
                # products < 2**62; a chunk's sum of residues < 2**53
                out[row, k] = (out[row, k] + (chunk * weights).remainder(_PRIME).sum()
                               ).remainder(_PRIME)
    return out


def _all_gather_hashes(hashes: torch.Tensor, group) -> list[torch.Tensor]:
    copies = [torch.empty_like(hashes) for _ in range(dist.get_world_size(group))]
    dist.all_gather(copies, hashes, group=group)
    return copies


def _differences(names: Sequence[str], copies: list[torch.Tensor], ranks: Sequence[int],
                 what: str) -> list[str]:
    """One line per parameter whose hashes differ among `copies` (one per
    rank of the group, global ranks `ranks`)."""
    lines = []
    rows = torch.stack(copies).cpu().tolist()  # [group, params, 2]
    for p, name in enumerate(names):
        holders: dict[tuple, list[int]] = {}
        for member, rank in enumerate(ranks):
            holders.setdefault(tuple(rows[member][p]), []).append(rank)
        if len(holders) > 1:
            sets = " and ".join(f"ranks {r}" for r in holders.values())
            lines.append(f"parameter {name} differs across its {what} replicas: {len(holders)} "
                         f"different copies, held by {sets}")
    return lines


def check_replicas(model: Sequence[torch.nn.Module], iteration: int,
                   flag: str = "--check-weight-hash-across-dp-replicas-interval") -> None:
    """The module doc's check of this rank's `model` chunks (parameters with
    `global_name` and `tensor_model_parallel`). Called by every rank of the
    world after step `iteration` (1-based), once the step's parameter
    all-gathers are done. ReplicaMismatch on every rank when any copy differs."""
    named = [(p.global_name, p) for chunk in model for p in chunk.parameters()]
    fault_injection.at("weight-hash", iteration, tensors=named)
    names = [name for name, _ in named]
    hashes = parameter_hashes([p for _, p in named])
    device = parallel_state.get_default_device()
    hashes = hashes.to(device)
    found: list[str] = []
    dp_group = parallel_state.get_data_parallel_group()
    if dist.get_world_size(dp_group) > 1:
        found += _differences(names, _all_gather_hashes(hashes, dp_group),
                              parallel_state.get_data_parallel_ranks(), "data-parallel")
    tp_group = parallel_state.get_tensor_model_parallel_group()
    replicated = [i for i, (_, p) in enumerate(named) if not p.tensor_model_parallel]
    if dist.get_world_size(tp_group) > 1 and replicated:
        index = torch.tensor(replicated, device=device)
        found += _differences([names[i] for i in replicated],
                              _all_gather_hashes(hashes.index_select(0, index), tp_group),
                              parallel_state.get_tensor_model_parallel_ranks(), "tensor-parallel")
    count = torch.tensor([float(len(found))], device=device)
    dist.all_reduce(count)
    if count.item() == 0:
        return
    reports: list[Optional[list[str]]] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, found)
    lines = sorted({line for report in reports for line in report or ()})
    shown = "; ".join(lines[:_SHOWN])
    more = f" (and {len(lines) - _SHOWN} more)" if len(lines) > _SHOWN else ""
    raise ReplicaMismatch(f"iteration {iteration}: {shown}{more}; found by {flag}: a "
                          f"communicator or a device corrupted a copy; resume from the last "
                          f"checkpoint, and if it recurs on the same ranks, exclude their nodes")
