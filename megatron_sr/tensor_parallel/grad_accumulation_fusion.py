"""Weight gradients accumulated straight into `main_grad` (Megatron's
`--gradient-accumulation-fusion`).

Without fusion every micro-batch's backward writes each weight's gradient into
a fresh `param.grad` (the wgrad GEMM's output in the param dtype), and the
grad buffer's post-accumulate hook adds it into `param.main_grad`
(`megatron_sr.optimizer.param_buffer`): per weight and micro-batch one more
weight-sized tensor written and read, and an extra kernel. With fusion the
wgrad GEMM adds its product into `main_grad` itself (C += g^T x, beta = 1).

Numerics, per micro-batch:
- BF16 grad buffer (bf16, bf16-sr, bf16-kahan): `main_grad + g^T x` rounded to
  BF16 once, where the hook path rounds twice (the product, then the sum). The
  first micro-batch of a step adds to zeros, so on the CPU (tested) one
  micro-batch per step gives the hook path's bits; a GPU's GEMM with beta = 1
  may sum in another order than the plain product (cuBLAS picks the kernel),
  so there the bits can differ in the last place.
- FP32 grad buffer with BF16 params (bf16-mixed, `--grad-reduce-dtype fp32`):
  the FP32 product is added without being rounded to BF16 first, so even one
  micro-batch differs from the hook path (it is more precise). On a GPU this
  takes apex's `fused_weight_gradient_mlp_cuda` (the Docker image has it);
  without it the BF16 product is added as the hook path does (no saving:
  `fusion_notice` says so at start-up).
- FP32 params (fp32): the same sum as the hook path, up to the GEMM's order.
- A buffer narrower than the products (fp32 with `--grad-reduce-dtype bf16`):
  the hook path's arithmetic, the product added into the buffer.
- `--grad-accumulation-rounding stochastic` (BF16 buffer): `main_grad + g^T x`
  summed in FP32 (on a GPU with apex's FP32-accumulating GEMM) and rounded
  stochastically once, every micro-batch (the first one too: the product
  itself is rounded), with the key the buffer gives the parameter's next add
  (`weight.grad_accumulation_key()`, `megatron_sr.optimizer.param_buffer`).

Autograd still needs a gradient for the weight, so that its AccumulateGrad node
runs and the buffer's hook counts the micro-batch (with `--overlap-grad-reduce`
a bucket launches once every parameter in it has been counted): backward
returns an uninitialized tensor of the weight's shape (no kernel touches it)
and sets `weight.grad_added_to_main_grad`, and the hook drops it instead of
adding it.

Only a layer's own weight is fused: the tied output layer takes the word
embedding's weight as an argument, and autograd sums that gradient with the
embedding lookup's before any hook sees it. Parameters without a `main_grad`
(no grad buffer: inference, a bare module) get their gradient in `.grad` as
usual. Not under `torch.autocast` (the amp strategy): the products there run in
autocast's dtype, which this function does not track.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_sr.cpu_bf16 import emulates_bf16_products, linear
from megatron_sr.precision.grad_accumulation import stochastic_round_into_

try:  # apex built with --cuda_ext (the Docker image): FP32 += BF16 x BF16 in one GEMM
    import fused_weight_gradient_mlp_cuda
except ImportError:
    fused_weight_gradient_mlp_cuda = None


def accumulate_weight_grad(main_grad: torch.Tensor, grad_output: torch.Tensor,
                           x: torch.Tensor, sr_key: Optional[int] = None) -> None:
    """main_grad [out, in] += g^T x, with g = grad_output [..., out] and x [..., in]
    (one dtype) flattened to rows; rounded once to main_grad's dtype when it is
    theirs or FP32 (on a GPU: with apex), else as the unfused hook would add
    (see the module docstring). With `sr_key` (a bf16 main_grad under
    `--grad-accumulation-rounding stochastic`) the FP32 sum is rounded
    stochastically with that key (`grad_accumulation.stochastic_round_into_`)."""
    g = grad_output.reshape(-1, grad_output.shape[-1])
    rows = x.reshape(-1, x.shape[-1])
    if sr_key is not None:
        total = main_grad.float()
        if total.is_cuda and fused_weight_gradient_mlp_cuda is not None and g.dtype != torch.float32:
            fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32(rows.contiguous(), g.contiguous(), total)
        else:
            total.addmm_(g.t().float(), rows.float())
        stochastic_round_into_(main_grad, total, sr_key)
    elif main_grad.dtype == g.dtype:
        if emulates_bf16_products(g, rows):
            main_grad.copy_(torch.addmm(main_grad.float(), g.t().float(), rows.float()))
        else:
            main_grad.addmm_(g.t(), rows)
    elif main_grad.dtype is torch.float32 and not main_grad.is_cuda:
        main_grad.addmm_(g.t().float(), rows.float())
    elif main_grad.dtype is torch.float32 and fused_weight_gradient_mlp_cuda is not None:
        fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32(rows.contiguous(), g.contiguous(),
                                                             main_grad)
    else:
        main_grad.add_(torch.mm(g.t(), rows))


def fusion_notice(param_dtype: torch.dtype, grad_dtype: torch.dtype,
                  device: torch.device) -> Optional[str]:
    """A start-up line when --gradient-accumulation-fusion cannot fuse the
    accumulation for these dtypes on `device` (None when it does)."""
    if grad_dtype is torch.float32 and param_dtype is not torch.float32 \
            and device.type == "cuda" and fused_weight_gradient_mlp_cuda is None:
        return ("[flags] --gradient-accumulation-fusion: apex's fused_weight_gradient_mlp_cuda "
                "is not importable, so the FP32 gradient buffer gets the BF16 product added as "
                "without the flag (same numbers and memory traffic; install apex to fuse)")
    if grad_dtype.itemsize < param_dtype.itemsize:
        return (f"[flags] --gradient-accumulation-fusion: the {param_dtype} products are added "
                f"into the {grad_dtype} gradient buffer as without the flag")
    return None


class _LinearWithGradAccumulation(torch.autograd.Function):
    """y = x W^T + b (`megatron_sr.cpu_bf16.linear`), W's gradient added into
    W.main_grad. Saves x and W; keeps the Parameter itself too, since under
    activation recomputation the saved W comes back as another tensor, without
    `main_grad`."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.parameter = weight
        ctx.has_bias = bias is not None
        return linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_x = fused_input_grad(grad_y, weight) if ctx.needs_input_grad[0] else None
        grad_weight, grad_bias = fused_weight_and_bias_grads(
            ctx.parameter, grad_y, x, ctx.needs_input_grad[1],
            ctx.has_bias and ctx.needs_input_grad[2])
        return grad_x, grad_weight, grad_bias


def fused_input_grad(grad_y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The input gradient grad_y W [..., in] of the fused linear's backward."""
    return linear(grad_y, weight.t())


def fused_weight_and_bias_grads(parameter: torch.nn.Parameter, grad_y: torch.Tensor,
                                x: torch.Tensor, weight: bool, bias: bool):
    """The fused linear's backward for its weight and bias: with `weight`, adds
    grad_y^T x into `parameter.main_grad` (`accumulate_weight_grad`, with the
    parameter's next accumulation key under stochastic accumulation rounding),
    marks `grad_added_to_main_grad` and returns an uninitialized placeholder of
    the weight's shape as its gradient (module docstring); with `bias`, the row
    sum of grad_y summed in FP32, in grad_y's dtype. Returns (weight placeholder
    or None, bias gradient or None)."""
    grad_weight = grad_bias = None
    if weight:
        next_key = getattr(parameter, "grad_accumulation_key", None)
        accumulate_weight_grad(parameter.main_grad, grad_y, x,
                               next_key() if next_key is not None else None)
        parameter.grad_added_to_main_grad = True
        grad_weight = torch.empty_like(parameter)
    if bias:
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0, dtype=torch.float32) \
            .to(grad_y.dtype)
    return grad_weight, grad_bias


def linear_with_grad_accumulation(x: torch.Tensor, weight: torch.Tensor,
                                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`megatron_sr.cpu_bf16.linear(x, weight, bias)` whose backward adds the
    weight's gradient into `weight.main_grad` (see the module docstring); plain
    `linear` when the weight has no `main_grad` or autocast is on."""
    if getattr(weight, "main_grad", None) is None or torch.is_autocast_enabled(x.device.type):
        return linear(x, weight, bias)
    return _LinearWithGradAccumulation.apply(x, weight, bias)
