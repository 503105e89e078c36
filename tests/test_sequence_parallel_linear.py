"""The sequence-parallel column-parallel linear (`ColumnParallelLinear` with
sequence_parallel=True, i.e. `tensor_parallel.layers._SequenceParallelLinear`).

Specification:
- it keeps only this rank's [s / tp, b, in] input shard for backward (not the
  all-gathered [s, b, in]);
- its output and gradients are bit-identical to an all-gather followed by the
  plain linear (`gather_from_sequence_parallel_region` then
  `cpu_bf16.linear`, or the gradient-accumulation-fused linear), on 2 Gloo
  ranks, for bf16 and fp32, with the CPU's BF16 emulation and without, with
  and without bias, fused into `main_grad` or not, and under bf16 autocast.
"""
import os

import pytest
import torch

from megatron_sr import parallel_state
from megatron_sr.cpu_bf16 import cpu_has_native_bf16, linear
from megatron_sr.tensor_parallel import ColumnParallelLinear, normal_init
from megatron_sr.tensor_parallel.grad_accumulation_fusion import linear_with_grad_accumulation
from megatron_sr.tensor_parallel.mappings import gather_from_sequence_parallel_region
from multiprocess import run_ranks
from scale_simulation import fake_world

S, B, IN, OUT = 16, 2, 24, 32


def _layer(bias, dtype, fused=False):
    return ColumnParallelLinear(IN, OUT, bias=bias, init_method=normal_init(0.5),
                                params_dtype=dtype, sequence_parallel=True,
                                gradient_accumulation_fusion=fused)


def test_keeps_only_the_sequence_shard():
    tp = 4
    with fake_world(rank=1, world_size=tp):
        parallel_state.initialize_model_parallel(tp, 1)
        try:
            layer = _layer(True, torch.bfloat16)
            x = torch.randn(S // tp, B, IN, dtype=torch.bfloat16, requires_grad=True)
            saved = []

            def pack(tensor):
                if not isinstance(tensor, torch.nn.Parameter):
                    saved.append(tensor.untyped_storage().nbytes())
                return tensor

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                y = layer(x)
        finally:
            parallel_state.destroy_model_parallel()
    assert y.shape == (S, B, OUT // tp)
    assert saved == [x.untyped_storage().nbytes()]


def _cases():
    for gemm in ("native", "fp32"):
        for dtype in (torch.bfloat16, torch.float32):
            for bias in (False, True):
                for fused in (False, True):
                    yield gemm, dtype, bias, fused, False
        yield gemm, torch.float32, True, False, True  # amp: fp32 params under bf16 autocast


def _run(layer, x_data, grad_y, sequence_parallel, fused, autocast):
    """(y, input grad, weight grad, bias grad) of one forward and backward."""
    layer.zero_grad(set_to_none=True)
    if fused:
        layer.weight.main_grad = torch.zeros_like(layer.weight)
        layer.weight.grad_added_to_main_grad = False
    x = x_data.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if sequence_parallel:
            y = layer(x)
        else:  # the reference: all-gather, then the plain (or fused) linear
            total = gather_from_sequence_parallel_region(x, grad_is_partial=True)
            y = (linear_with_grad_accumulation if fused else linear)(total, layer.weight,
                                                                     layer.bias)
    y.backward(grad_y)
    weight_grad = layer.weight.main_grad.clone() if fused else layer.weight.grad
    bias_grad = None if layer.bias is None else layer.bias.grad
    if fused:
        del layer.weight.main_grad
    return y.detach(), x.grad, weight_grad, bias_grad


def _compare_on_ranks(rank, world_size):
    parallel_state.initialize_model_parallel(world_size, 1)
    mismatches = []
    try:
        for gemm, dtype, bias, fused, autocast in _cases():
            os.environ["MEGATRON_SR_CPU_BF16_GEMM"] = gemm
            cpu_has_native_bf16.cache_clear()
            generator = torch.Generator().manual_seed(11 + rank)
            layer = _layer(bias, dtype, fused)
            with torch.no_grad():
                for param in layer.parameters():
                    param.copy_(torch.randn(param.shape, generator=generator))
            x = torch.randn(S // world_size, B, IN, generator=generator).to(dtype)
            out_dtype = torch.bfloat16 if autocast else dtype
            grad_y = torch.randn(S, B, OUT // world_size, generator=generator).to(out_dtype)
            got = _run(layer, x, grad_y, True, fused, autocast)
            expected = _run(layer, x, grad_y, False, fused, autocast)
            for name, a, e in zip(("y", "grad x", "grad weight", "grad bias"), got, expected):
                if (a is None) != (e is None) or (a is not None and not (
                        a.dtype == e.dtype and torch.equal(a, e))):
                    mismatches.append(f"{gemm} {dtype} bias={bias} fused={fused} "
                                      f"autocast={autocast}: {name}")
    finally:
        parallel_state.destroy_model_parallel()
    return mismatches


def test_bits_equal_all_gather_then_linear():
    results = run_ranks(_compare_on_ranks, 2)
    assert results == [[], []]
