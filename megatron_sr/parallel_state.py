"""Process groups for tensor (TP), pipeline (PP) and data (DP) parallelism.

Rank layout (Megatron's default): TP varies fastest, then DP, then PP::

    global_rank = tp_rank + tp_size * (dp_rank + dp_size * pp_rank)

so the ranks of one TP group are adjacent (one node's fast links) and a PP
group strides across the whole world. With TP=2, PP=2 on 8 ranks (DP=2):
TP groups [0,1] [2,3] [4,5] [6,7]; DP groups [0,2] [1,3] [4,6] [5,7];
PP groups [0,4] [1,5] [2,6] [3,7]; embedding groups = first and last rank of
each PP group, here the PP groups themselves.

Contract:
- `initialize_model_parallel` is called once by EVERY rank, after
  `torch.distributed.init_process_group`, with the same arguments; it creates
  all groups (every rank takes part in every `new_group` call, as
  torch.distributed requires) and keeps the ones this rank belongs to.
- Getters raise RuntimeError before initialization (no silent size-1 default).
- Virtual pipeline stages (interleaved 1F1B): a rank holds
  `virtual_pipeline_model_parallel_size` model chunks; the schedule sets the
  current chunk with `set_virtual_pipeline_model_parallel_rank`, and
  `is_pipeline_first_stage()` / `is_pipeline_last_stage()` answer for that
  chunk (first = chunk 0 on PP rank 0, last = the last chunk on the last PP
  rank) unless called with `ignore_virtual=True`.
- The embedding group holds the first and last rank of each PP group (one
  rank when PP=1); the tied word-embedding / output weight's gradient is
  all-reduced over it (`ParamAndGradBuffer.finish_grad_sync`).
"""
from __future__ import annotations

import datetime
from typing import Optional

import torch
import torch.distributed as dist

_TP_GROUP = None
_PP_GROUP = None
_DP_GROUP = None
_MODEL_PARALLEL_GROUP = None  # TP x PP: one model replica
_EMBEDDING_GROUP = None

_TP_RANKS: Optional[list[int]] = None
_PP_RANKS: Optional[list[int]] = None
_DP_RANKS: Optional[list[int]] = None
_EMBEDDING_RANKS: Optional[list[int]] = None

_VIRTUAL_PP_SIZE: Optional[int] = None
_VIRTUAL_PP_RANK: Optional[int] = None

_DEVICE: Optional[torch.device] = None  # initialize_model_parallel's `device`


def initialize_model_parallel(tensor_model_parallel_size: int = 1,
                              pipeline_model_parallel_size: int = 1,
                              virtual_pipeline_model_parallel_size: Optional[int] = None,
                              timeout: Optional[datetime.timedelta] = None,
                              device: Optional[torch.device] = None) -> None:
    """Builds the TP, PP, DP, model-parallel and embedding groups.

    `timeout` bounds every collective of these groups (pass the world group's,
    i.e. --distributed-timeout-minutes: torch does not inherit it; None is
    torch's default of 30 minutes). `device`: what `get_default_device`
    returns until `destroy_model_parallel` (None: its rule; the scale
    simulation of tests/scale_simulation.py passes `meta`).

    The data-parallel size is world_size / (TP x PP). Raises ValueError naming
    the flag when the sizes do not divide the world, RuntimeError when
    torch.distributed is not initialized or groups already exist.
    """
    global _TP_GROUP, _PP_GROUP, _DP_GROUP, _MODEL_PARALLEL_GROUP, _EMBEDDING_GROUP
    global _TP_RANKS, _PP_RANKS, _DP_RANKS, _EMBEDDING_RANKS, _VIRTUAL_PP_SIZE, _VIRTUAL_PP_RANK
    global _DEVICE

    if not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel: call torch.distributed.init_process_group "
                           "first")
    if model_parallel_is_initialized():
        raise RuntimeError("initialize_model_parallel: groups already exist; "
                           "call destroy_model_parallel() first")
    tp, pp, vp = tensor_model_parallel_size, pipeline_model_parallel_size, \
        virtual_pipeline_model_parallel_size
    world = dist.get_world_size()
    if tp < 1 or pp < 1:
        raise ValueError(f"--tensor-model-parallel-size ({tp}) and --pipeline-model-parallel-size "
                         f"({pp}) must be >= 1")
    if world % (tp * pp) != 0:
        raise ValueError(f"world size ({world}) is not divisible by --tensor-model-parallel-size "
                         f"({tp}) x --pipeline-model-parallel-size ({pp})")
    if vp is not None and (vp < 1 or pp < 2):
        raise ValueError(f"virtual pipeline size ({vp}, from "
                         f"--num-layers-per-virtual-pipeline-stage) needs --pipeline-model-parallel-size > 1 (got {pp})")
    dp = world // (tp * pp)
    rank = dist.get_rank()

    def rank_of(t, d, p):
        return t + tp * (d + dp * p)

    # Every rank creates every group, in the same order.
    for p in range(pp):
        for d in range(dp):
            ranks = [rank_of(t, d, p) for t in range(tp)]
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                _TP_GROUP, _TP_RANKS = group, ranks
    for p in range(pp):
        for t in range(tp):
            ranks = [rank_of(t, d, p) for d in range(dp)]
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                _DP_GROUP, _DP_RANKS = group, ranks
    for d in range(dp):
        for t in range(tp):
            ranks = [rank_of(t, d, p) for p in range(pp)]
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                _PP_GROUP, _PP_RANKS = group, ranks
            embedding_ranks = [ranks[0], ranks[-1]] if pp > 1 else [ranks[0]]
            group = dist.new_group(embedding_ranks, timeout=timeout)
            if rank in embedding_ranks:
                _EMBEDDING_GROUP, _EMBEDDING_RANKS = group, embedding_ranks
    for d in range(dp):
        ranks = [rank_of(t, d, p) for p in range(pp) for t in range(tp)]
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            _MODEL_PARALLEL_GROUP = group

    _VIRTUAL_PP_SIZE = vp
    _VIRTUAL_PP_RANK = 0 if vp is not None else None
    _DEVICE = None if device is None else torch.device(device)


def get_default_device() -> torch.device:
    """Where model parameters, activations and communication buffers live:
    the current CUDA device under NCCL, else the CPU (Gloo runs on the CPU even
    on a machine with GPUs; one code path for both); the `device` given to
    `initialize_model_parallel` instead, when it was given one."""
    if _DEVICE is not None:
        return _DEVICE
    backend = dist.get_backend() if dist.is_initialized() else None
    if torch.cuda.is_available() and backend != "gloo":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def model_parallel_is_initialized() -> bool:
    return _TP_GROUP is not None


def destroy_model_parallel() -> None:
    """Forgets all groups (the process group itself stays), so a test or a
    tool can re-initialize with another layout."""
    global _TP_GROUP, _PP_GROUP, _DP_GROUP, _MODEL_PARALLEL_GROUP, _EMBEDDING_GROUP
    global _TP_RANKS, _PP_RANKS, _DP_RANKS, _EMBEDDING_RANKS, _VIRTUAL_PP_SIZE, _VIRTUAL_PP_RANK
    global _DEVICE
    for group in {_TP_GROUP, _PP_GROUP, _DP_GROUP, _MODEL_PARALLEL_GROUP, _EMBEDDING_GROUP}:
        if group is not None:
            dist.destroy_process_group(group)
    _TP_GROUP = _PP_GROUP = _DP_GROUP = _MODEL_PARALLEL_GROUP = _EMBEDDING_GROUP = None
    _TP_RANKS = _PP_RANKS = _DP_RANKS = _EMBEDDING_RANKS = None
    _VIRTUAL_PP_SIZE = _VIRTUAL_PP_RANK = None
    _DEVICE = None


def _checked(value, what: str):
    if value is None and not model_parallel_is_initialized():
        raise RuntimeError(f"{what}: model-parallel groups are not initialized; call "
                           f"megatron_sr.parallel_state.initialize_model_parallel(...) first")
    return value


# --- groups -----------------------------------------------------------------

def get_tensor_model_parallel_group():
    return _checked(_TP_GROUP, "get_tensor_model_parallel_group")


def get_pipeline_model_parallel_group():
    return _checked(_PP_GROUP, "get_pipeline_model_parallel_group")


def get_data_parallel_group():
    return _checked(_DP_GROUP, "get_data_parallel_group")


def get_model_parallel_group():
    """TP x PP ranks of one model replica (e.g. for the global grad norm)."""
    return _checked(_MODEL_PARALLEL_GROUP, "get_model_parallel_group")


def get_embedding_group():
    """The first and last PP stage of this rank's pipeline; None on ranks
    outside it (intermediate stages)."""
    _checked(_TP_GROUP, "get_embedding_group")
    return _EMBEDDING_GROUP


def is_rank_in_embedding_group() -> bool:
    _checked(_TP_GROUP, "is_rank_in_embedding_group")
    return _EMBEDDING_GROUP is not None


# --- global ranks of this rank's groups ---------------------------------------

def get_tensor_model_parallel_ranks() -> list[int]:
    return list(_checked(_TP_RANKS, "get_tensor_model_parallel_ranks"))


def get_pipeline_model_parallel_ranks() -> list[int]:
    return list(_checked(_PP_RANKS, "get_pipeline_model_parallel_ranks"))


def get_data_parallel_ranks() -> list[int]:
    return list(_checked(_DP_RANKS, "get_data_parallel_ranks"))


def get_embedding_ranks() -> Optional[list[int]]:
    _checked(_TP_GROUP, "get_embedding_ranks")
    return None if _EMBEDDING_RANKS is None else list(_EMBEDDING_RANKS)


# --- sizes and ranks -------------------------------------------------------------

def get_tensor_model_parallel_world_size() -> int:
    return len(_checked(_TP_RANKS, "get_tensor_model_parallel_world_size"))


def get_tensor_model_parallel_rank() -> int:
    return _checked(_TP_RANKS, "get_tensor_model_parallel_rank").index(dist.get_rank())


def get_pipeline_model_parallel_world_size() -> int:
    return len(_checked(_PP_RANKS, "get_pipeline_model_parallel_world_size"))


def get_pipeline_model_parallel_rank() -> int:
    return _checked(_PP_RANKS, "get_pipeline_model_parallel_rank").index(dist.get_rank())


def get_data_parallel_world_size() -> int:
    return len(_checked(_DP_RANKS, "get_data_parallel_world_size"))


def get_data_parallel_rank() -> int:
    return _checked(_DP_RANKS, "get_data_parallel_rank").index(dist.get_rank())


def get_pipeline_model_parallel_next_rank() -> int:
    """Global rank of the next stage; the last stage's next is the first
    (the wrap-around carries activations between virtual chunks)."""
    ranks = get_pipeline_model_parallel_ranks()
    return ranks[(ranks.index(dist.get_rank()) + 1) % len(ranks)]


def get_pipeline_model_parallel_prev_rank() -> int:
    ranks = get_pipeline_model_parallel_ranks()
    return ranks[(ranks.index(dist.get_rank()) - 1) % len(ranks)]


# --- virtual pipeline stages ---------------------------------------------------------

def get_virtual_pipeline_model_parallel_world_size() -> Optional[int]:
    """Number of model chunks per rank with interleaving, None without."""
    _checked(_TP_GROUP, "get_virtual_pipeline_model_parallel_world_size")
    return _VIRTUAL_PP_SIZE


def get_virtual_pipeline_model_parallel_rank() -> Optional[int]:
    _checked(_TP_GROUP, "get_virtual_pipeline_model_parallel_rank")
    return _VIRTUAL_PP_RANK


def set_virtual_pipeline_model_parallel_rank(rank: int) -> None:
    global _VIRTUAL_PP_RANK
    _checked(_TP_GROUP, "set_virtual_pipeline_model_parallel_rank")
    if _VIRTUAL_PP_SIZE is None:
        if rank != 0:
            raise ValueError(f"virtual pipeline rank {rank} without virtual pipeline stages")
        return
    if not 0 <= rank < _VIRTUAL_PP_SIZE:
        raise ValueError(f"virtual pipeline rank {rank} outside [0, {_VIRTUAL_PP_SIZE})")
    _VIRTUAL_PP_RANK = rank


def is_pipeline_first_stage(ignore_virtual: bool = False) -> bool:
    """True on PP rank 0 (and, unless ignore_virtual, for its chunk 0)."""
    if not ignore_virtual and _VIRTUAL_PP_SIZE is not None and _VIRTUAL_PP_RANK != 0:
        return False
    return get_pipeline_model_parallel_rank() == 0


def is_pipeline_last_stage(ignore_virtual: bool = False) -> bool:
    """True on the last PP rank (and, unless ignore_virtual, for its last chunk)."""
    if (not ignore_virtual and _VIRTUAL_PP_SIZE is not None
            and _VIRTUAL_PP_RANK != _VIRTUAL_PP_SIZE - 1):
        return False
    return get_pipeline_model_parallel_rank() == get_pipeline_model_parallel_world_size() - 1
