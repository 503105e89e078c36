"""The schedule's forward step: the user's `forward_step_func` (see
`pretrain`) under autocast for amp, its loss checked to be a scalar, scaled for
--calculate-per-token-loss, and poisoned for the NaN-gradient fault injection."""
from __future__ import annotations

import functools
from contextlib import nullcontext
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_sr import parallel_state
from megatron_sr.precision.strategies import PrecisionStrategy
from megatron_sr.recipes import gpt
from megatron_sr.training.data import MicroBatchStream


class _NaNGradient(torch.autograd.Function):
    """Identity in the forward; NaN gradient in the backward (fault injection)."""

    @staticmethod
    def forward(ctx, loss):
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def _scalar_loss(loss_func, output_tensor) -> torch.Tensor:
    """`loss_func(output_tensor)`; TypeError unless it is a scalar tensor."""
    loss = loss_func(output_tensor)
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
        shape = f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""
        raise TypeError(
            f"the loss function returned by forward_step must return the micro-batch's loss "
            f"as a scalar tensor, got a {type(loss).__name__}{shape}; a Megatron-style "
            f"(loss, num_tokens, {{'lm loss': ...}}) tuple is not supported: return the mean "
            f"loss, which is also what the log line reports")
    return loss


class ForwardStep:
    """The schedule's forward_step_func built by `make_forward_step`.

    --calculate-per-token-loss (`per_token_loss`) with --eod-mask-loss:
    micro-batches hold different numbers of loss tokens, so the step's loss
    is the sum of the token losses over all micro-batches and data-parallel
    ranks divided by their count, not a mean of means. `prepare_step`
    (train_step calls it before the schedule) reads the step's micro-batches
    of the loss chunks ahead, counts each one's loss tokens n_j and
    all-reduces their sum N over the DP group (last-stage ranks; one small
    all-reduce, no host sync); the loss function's micro-batch mean is then
    scaled by n_j x M x DP / N, which the schedule's 1/M and the DP mean turn
    into exactly the per-token average. Without `prepare_step` (evaluation)
    the loss is the micro-batch's mean.
    """

    def __init__(self, strategy: PrecisionStrategy, device: torch.device, nan_gradients: bool,
                 forward_step_func: Callable, per_token_loss: bool):
        self.device, self.nan_gradients = device, nan_gradients
        self.forward_step_func, self.per_token_loss = forward_step_func, per_token_loss
        self.autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16)
                         if strategy.autocast else nullcontext())
        self.token_scales: list[torch.Tensor] = []  # per prefetched micro-batch, in order

    def prepare_step(self, iterators: list, model, num_microbatches: int) -> list:
        """The iterators for this step's schedule (see the class docstring)."""
        self.token_scales = []
        if not self.per_token_loss:
            return iterators
        iterators, counts = list(iterators), []
        for i, chunk in enumerate(model):
            documents = getattr(iterators[i], "documents", None)
            if chunk.post_process and documents is not None and documents.eod_mask_loss:
                batches = [next(iterators[i]) for _ in range(num_microbatches)]
                counts += [(b[:, :-1] != documents.eod).sum() for b in batches]
                iterators[i] = MicroBatchStream(iter(batches), documents)
        if counts:
            local = torch.stack(counts).to(torch.float32)  # on the host, as the batches are
            if self.device.type == "cuda":  # a pageable copy would wait for the stream
                local = local.pin_memory().to(self.device, non_blocking=True)
            total = local.sum()
            dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
            dp = parallel_state.get_data_parallel_world_size()
            self.token_scales = list(local * (num_microbatches * dp) / total.clamp(min=1.0))
        return iterators

    def _loss(self, loss_func, output_tensor):
        loss = _scalar_loss(loss_func, output_tensor)
        if self.token_scales:
            loss = loss * self.token_scales.pop(0)
        return _NaNGradient.apply(loss) if self.nan_gradients else loss

    def __call__(self, data_iterator, chunk):
        with self.autocast:
            output, loss_func = self.forward_step_func(data_iterator, chunk)
        return output, functools.partial(self._loss, loss_func)


def make_forward_step(strategy: PrecisionStrategy, device: torch.device,
                      nan_gradients: bool = False, forward_step_func: Optional[Callable] = None,
                      per_token_loss: bool = False) -> ForwardStep:
    """The schedule's forward_step_func: `forward_step_func` (see `pretrain`;
    None: the GPT recipe's `forward_step`) under torch.autocast for amp, its
    loss function checked to return a scalar. `nan_gradients` (fault
    injection): the loss keeps its value but its backward yields NaN gradients
    for every parameter. `per_token_loss` (--calculate-per-token-loss): see
    `ForwardStep`."""
    return ForwardStep(strategy, device, nan_gradients, forward_step_func or gpt.forward_step,
                       per_token_loss)
