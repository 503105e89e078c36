"""Activations and their gradients between adjacent pipeline stages.

Shapes and dtype are fixed for a run and known to both sides (the schedule
passes them: [s or s / tp with sequence parallelism, micro_batch_size, h] in
the params dtype), so no shape handshake precedes a transfer. `communicate`
posts all sends and receives of one step together and waits for all of them,
so a pair of stages exchanging in both directions cannot deadlock.

Peers are the previous and next rank of this rank's PP group, wrapping
around (last -> first carries activations between virtual chunks). Forward
activations travel with tag 0, gradients with tag 1; the ops are posted in
the order send-next, recv-prev, send-prev, recv-next, so that with two stages
(where prev == next) a backend that matches messages by order (NCCL) pairs
them the same way as one that matches by tag (Gloo). Received tensors
require grad (the receiving stage backpropagates into them).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_sr import parallel_state

ACTIVATION_TAG = 0
GRADIENT_TAG = 1


def communicate(*, send_next: Optional[torch.Tensor] = None, send_prev: Optional[torch.Tensor] = None,
                recv_prev: bool = False, recv_next: bool = False,
                shape: Sequence[int], dtype: torch.dtype, device=None
                ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """One exchange: forward activation to the next stage (`send_next`), gradient
    to the previous (`send_prev`); returns (tensor from prev, tensor from next)."""
    group = parallel_state.get_pipeline_model_parallel_group()
    next_rank = parallel_state.get_pipeline_model_parallel_next_rank()
    prev_rank = parallel_state.get_pipeline_model_parallel_prev_rank()
    device = parallel_state.get_default_device() if device is None else device
    for sent in (send_next, send_prev):
        if sent is not None and (tuple(sent.shape) != tuple(shape) or sent.dtype != dtype):
            raise ValueError(
                f"pipeline stage sends a {tuple(sent.shape)} {sent.dtype} tensor where the schedule "
                f"expects {tuple(shape)} {dtype} ([--seq-length (/ TP with --sequence-parallel), "
                f"--micro-batch-size, --hidden-size] in the params dtype)")
    from_prev = from_next = None
    ops = []
    if send_next is not None:
        ops.append(dist.P2POp(dist.isend, send_next.contiguous(), next_rank, group, ACTIVATION_TAG))
    if recv_prev:
        from_prev = torch.empty(shape, dtype=dtype, device=device)
        ops.append(dist.P2POp(dist.irecv, from_prev, prev_rank, group, ACTIVATION_TAG))
    if send_prev is not None:
        ops.append(dist.P2POp(dist.isend, send_prev.contiguous(), prev_rank, group, GRADIENT_TAG))
    if recv_next:
        from_next = torch.empty(shape, dtype=dtype, device=device)
        ops.append(dist.P2POp(dist.irecv, from_next, next_rank, group, GRADIENT_TAG))
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    for received in (from_prev, from_next):
        if received is not None:
            received.requires_grad_()
    return from_prev, from_next


# Stage-aware wrappers for the non-interleaved schedules: the first stage
# receives no activation, the last sends none.

def recv_forward(shape, dtype) -> Optional[torch.Tensor]:
    if parallel_state.is_pipeline_first_stage():
        return None
    return communicate(recv_prev=True, shape=shape, dtype=dtype)[0]


def send_forward(output: torch.Tensor, shape, dtype) -> None:
    if not parallel_state.is_pipeline_last_stage():
        communicate(send_next=output, shape=shape, dtype=dtype)


def recv_backward(shape, dtype) -> Optional[torch.Tensor]:
    if parallel_state.is_pipeline_last_stage():
        return None
    return communicate(recv_next=True, shape=shape, dtype=dtype)[1]


def send_backward(input_grad: Optional[torch.Tensor], shape, dtype) -> None:
    if not parallel_state.is_pipeline_first_stage():
        communicate(send_prev=input_grad, shape=shape, dtype=dtype)


def send_forward_recv_backward(output: torch.Tensor, shape, dtype) -> Optional[torch.Tensor]:
    if parallel_state.is_pipeline_last_stage():
        return None
    return communicate(send_next=output, recv_next=True, shape=shape, dtype=dtype)[1]


def send_backward_recv_forward(input_grad: Optional[torch.Tensor], shape, dtype
                               ) -> Optional[torch.Tensor]:
    if parallel_state.is_pipeline_first_stage():
        return None
    return communicate(send_prev=input_grad, recv_prev=True, shape=shape, dtype=dtype)[0]
