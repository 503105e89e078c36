"""LayerNorm and RMSNorm over the last dim, replicated across TP ranks.

Both compute in fp32 whatever the activation dtype and return the input's
dtype. On CUDA tensors apex's fused kernels are used when apex is importable;
torch otherwise (same math, `_LayerNormFunction` / `_RMSNormFunction`).

Saved for backward (both paths): the input in its own dtype (2 bytes per
element for bf16) and fp32 per-row statistics (LayerNorm: mean and 1/std;
RMSNorm: 1/rms), as apex and Megatron keep them. The torch path does not
let autograd save its fp32 upcast (4 bytes per element, 8 for RMSNorm's
normalized product too): its backward upcasts the saved input again and
runs the same fp32 operations autograd ran through the upcast before, so
forward and backward values are bit-identical to autograd through
`x.float()` (tests/test_norms.py checks it). Under --sequence-parallel each rank normalizes
its own sequence shard, so the parameters carry `sequence_parallel=True` and
the optimizer's buffer (or `finalize_model_grads`) sums their gradients over TP.

--apply-layernorm-1p (Megatron's zero-centered gamma): the weight is stored
as gamma - 1, initialized to 0, and the norm multiplies by weight + 1, so
weight decay pulls gamma towards 1 instead of 0.

--qk-layernorm: a norm of the same kind over each head's head_dim features
of q and k (`build_norm(config, size=config.head_dim, ...)`). Each TP rank
normalizes only its own heads, so its gradient is partial: the builder of
those norms passes `partial_grad=True`, which marks the parameters for the
TP gradient sum (the `sequence_parallel` attribute) whatever the layout.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_sr.tensor_parallel import constant_init, set_parallel_attributes

try:  # optional: apex's fused CUDA kernels
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine, fused_rms_norm_affine
except ImportError:
    fused_layer_norm_affine = fused_rms_norm_affine = None


def _replicated(size: int, value: float, sequence_parallel: bool, dtype, device) -> nn.Parameter:
    param = nn.Parameter(torch.empty(size, dtype=dtype, device=device))
    set_parallel_attributes(param, tensor_model_parallel=False, sequence_parallel=sequence_parallel,
                            init_method=constant_init(value))
    return param


class LayerNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, *, sequence_parallel: bool, dtype, device=None,
                 one_plus: bool = False):
        super().__init__()
        self.shape, self.eps, self.one_plus = (hidden_size,), eps, one_plus
        self.weight = _replicated(hidden_size, 0.0 if one_plus else 1.0, sequence_parallel, dtype,
                                  device)
        self.bias = _replicated(hidden_size, 0.0, sequence_parallel, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + 1 if self.one_plus else self.weight
        if x.is_cuda and fused_layer_norm_affine is not None:
            return fused_layer_norm_affine(x, weight, self.bias, self.shape, self.eps)
        return _LayerNormFunction.apply(x, weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, *, sequence_parallel: bool, dtype, device=None,
                 one_plus: bool = False):
        super().__init__()
        self.shape, self.eps, self.one_plus = (hidden_size,), eps, one_plus
        self.weight = _replicated(hidden_size, 0.0 if one_plus else 1.0, sequence_parallel, dtype,
                                  device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + 1 if self.one_plus else self.weight
        if x.is_cuda and fused_rms_norm_affine is not None:
            return fused_rms_norm_affine(x, weight, self.shape, self.eps)
        return _RMSNormFunction.apply(x, weight, self.eps)


class _LayerNormFunction(torch.autograd.Function):
    """y = (x - mean) * rstd * weight + bias over the last dim, in fp32, returned in
    x's dtype. x [..., h] any float dtype; weight, bias [h]. Saves x (its own dtype),
    weight, bias and the fp32 mean and rstd [..., 1] (torch's `native_layer_norm`
    statistics); backward is `native_layer_norm_backward` on the fp32 upcast of x."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = torch.ops.aten.native_layer_norm(
            x.float(), [x.shape[-1]], weight.float(), bias.float(), eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_layer_norm_backward(
            grad_y.float(), x.float(), [x.shape[-1]], mean, rstd, weight.float(), bias.float(),
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]])
        return (None if grad_x is None else grad_x.to(x.dtype),
                None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None)


class _RMSNormFunction(torch.autograd.Function):
    """y = x * rstd * weight over the last dim with rstd = 1 / sqrt(mean(x^2) + eps),
    in fp32, returned in x's dtype. x [..., h] any float dtype; weight [h]. Saves x
    (its own dtype), weight and the fp32 rstd [..., 1]. Backward repeats, on the
    fp32 upcast of x, the operations autograd derives for the forward's expression
    (x32 * rsqrt(x32.pow(2).mean(-1) + eps) * w32), in the same order, so the
    gradients are bit-identical to autograd's."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (x32 * rstd * weight.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, rstd = ctx.saved_tensors
        x32, w32, grad = x.float(), weight.float(), grad_y.float()
        normalized = x32 * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normalized).sum_to_size(w32.shape).to(weight.dtype)
        if not ctx.needs_input_grad[0]:
            return None, grad_weight, None
        grad_normalized = grad * w32
        grad_rstd = (grad_normalized * x32).sum_to_size(rstd.shape)
        grad_mean_square = -0.5 * grad_rstd * rstd.pow(3)  # d rsqrt(u) / du = -u^-3/2 / 2
        grad_square = grad_mean_square.expand(x32.shape) / x32.shape[-1]
        grad_x = grad_normalized * rstd + grad_square * (2.0 * x32)
        return grad_x.to(x.dtype), grad_weight, None


def build_norm(config, *, sequence_parallel: bool, device=None, size: Optional[int] = None,
               partial_grad: bool = False) -> nn.Module:
    """The norm `config.normalization` names (--normalization LayerNorm|RMSNorm)
    over `size` features (default hidden_size). `partial_grad`: each TP rank
    sees only part of the inputs (qk-layernorm), so the gradient is summed
    over TP like a sequence-parallel norm's."""
    classes = {"LayerNorm": LayerNorm, "RMSNorm": RMSNorm}
    if config.normalization not in classes:
        raise ValueError(f"--normalization must be one of {sorted(classes)}, "
                         f"got {config.normalization!r}")
    return classes[config.normalization](config.hidden_size if size is None else size,
                                         config.layernorm_epsilon,
                                         sequence_parallel=sequence_parallel or partial_grad,
                                         dtype=config.params_dtype, device=device,
                                         one_plus=config.apply_layernorm_1p)
