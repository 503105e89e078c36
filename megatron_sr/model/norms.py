"""LayerNorm and RMSNorm over the last dim, replicated across TP ranks.

Both compute in fp32 whatever the activation dtype and return the input's
dtype. On CUDA tensors apex's fused kernels are used when apex is importable;
torch otherwise (same math). Under --sequence-parallel each rank normalizes
its own sequence shard, so the parameters carry `sequence_parallel=True` and
the optimizer's buffer (or `finalize_model_grads`) sums their gradients over TP.
"""
from __future__ import annotations

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
    def __init__(self, hidden_size: int, eps: float, *, sequence_parallel: bool, dtype, device=None):
        super().__init__()
        self.shape, self.eps = (hidden_size,), eps
        self.weight = _replicated(hidden_size, 1.0, sequence_parallel, dtype, device)
        self.bias = _replicated(hidden_size, 0.0, sequence_parallel, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and fused_layer_norm_affine is not None:
            return fused_layer_norm_affine(x, self.weight, self.bias, self.shape, self.eps)
        y = F.layer_norm(x.float(), self.shape, self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, *, sequence_parallel: bool, dtype, device=None):
        super().__init__()
        self.shape, self.eps = (hidden_size,), eps
        self.weight = _replicated(hidden_size, 1.0, sequence_parallel, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and fused_rms_norm_affine is not None:
            return fused_rms_norm_affine(x, self.weight, self.shape, self.eps)
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return y.to(x.dtype)


def build_norm(config, *, sequence_parallel: bool, device=None) -> nn.Module:
    """The norm `config.normalization` names (--normalization LayerNorm|RMSNorm)."""
    classes = {"LayerNorm": LayerNorm, "RMSNorm": RMSNorm}
    if config.normalization not in classes:
        raise ValueError(f"--normalization must be one of {sorted(classes)}, "
                         f"got {config.normalization!r}")
    return classes[config.normalization](config.hidden_size, config.layernorm_epsilon,
                                         sequence_parallel=sequence_parallel,
                                         dtype=config.params_dtype, device=device)
