"""Cross entropy over logits whose vocabulary dim is split across TP ranks.

`vocab_parallel_cross_entropy(logits, target)`: logits [..., V / tp] (any
dtype; computed in fp32; the gradient comes back in the logits' dtype),
target [...] int64 global token ids; returns the per-token loss [...] in
fp32, identical on every TP rank. Communication: three
fp32 all-reduces over the TP group in forward (max, target logit, sum of
exponentials), none in backward (which runs once: it reuses the saved
softmax in place). The full [..., V] logits never exist.

Memory: one fp32 [..., V / tp] tensor besides the caller's logits. The fp32
copy of the logits is shifted, exponentiated and normalized in place into the
softmax that is saved for backward, and backward writes the gradient into it
(then casts it to the logits' dtype); the values are those of the
out-of-place formulation, to the bit.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_sr import parallel_state


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target):
        group = parallel_state.get_tensor_model_parallel_group()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        ctx.logits_dtype = logits.dtype
        work = logits.to(torch.float32, copy=True)  # the one fp32 [..., V / tp] tensor
        per_rank = work.shape[-1]
        start = parallel_state.get_tensor_model_parallel_rank() * per_rank

        logits_max = work.max(dim=-1).values
        if tp > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = work.sub_(logits_max.unsqueeze(-1))

        outside = (target < start) | (target >= start + per_rank)
        local_target = (target - start).masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = target_logit.masked_fill(outside, 0.0)

        exp = shifted.exp_()
        sum_exp = exp.sum(dim=-1)
        if tp > 1:
            both = torch.stack([target_logit, sum_exp])
            dist.all_reduce(both, group=group)
            target_logit, sum_exp = both[0], both[1]
        loss = sum_exp.log() - target_logit

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, outside = ctx.saved_tensors
        grad = softmax  # d loss / d logits = softmax - one_hot(target), on my slice
        inside = (~outside).to(grad.dtype).unsqueeze(-1)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -inside)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return _VocabParallelCrossEntropy.apply(logits, target)
