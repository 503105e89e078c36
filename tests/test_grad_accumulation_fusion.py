"""Gradient-accumulation fusion (--gradient-accumulation-fusion): the wgrad GEMM
adds into main_grad with one rounding to its dtype; a job with one micro-batch
per step gives the bits of the hook path, one with several still launches every
bucket's reduction from backward and trains to the same losses within BF16 noise.

Spec: megatron_sr/tensor_parallel/grad_accumulation_fusion.py (module docstring).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from job_harness import run_pretrain, tiny_gpt_argv
from megatron_sr import cpu_bf16
from megatron_sr.tensor_parallel import grad_accumulation_fusion
from megatron_sr.tensor_parallel.grad_accumulation_fusion import (
    accumulate_weight_grad,
    fusion_notice,
    linear_with_grad_accumulation,
)

OUT, IN, ROWS = 48, 64, 120


@pytest.fixture(params=["fp32", "native"])
def gemm_mode(request, monkeypatch):
    """Both CPU paths: FP32 GEMMs of BF16 values (AVX2) and torch's BF16 GEMM
    (what AVX512-BF16 CPUs and GPUs run)."""
    monkeypatch.setenv("MEGATRON_SR_CPU_BF16_GEMM", request.param)
    cpu_bf16.cpu_has_native_bf16.cache_clear()
    yield request.param
    cpu_bf16.cpu_has_native_bf16.cache_clear()


def _integer_operands(main_dtype):
    """Small-integer g [2, ROWS/2, OUT] and x [2, ROWS/2, IN] and a main_grad in
    quarters: every product and sum is exact in FP32, so the exact result is
    known, and its 12-15 significant bits do not fit BF16's 8."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randint(-8, 9, (2, ROWS // 2, OUT), generator=gen).to(torch.bfloat16)
    x = torch.randint(-8, 9, (2, ROWS // 2, IN), generator=gen).to(torch.bfloat16)
    main = (torch.randint(-4000, 4000, (OUT, IN), generator=gen) / 4).to(main_dtype)
    exact = main.float() + g.reshape(-1, OUT).float().t() @ x.reshape(-1, IN).float()
    return g, x, main, exact


def _hook_path(main, g, x):
    """Unfused: the BF16 wgrad product, then main_grad.add_ (the buffer's hook)."""
    product = cpu_bf16.linear(g.reshape(-1, OUT).t(), x.reshape(-1, IN).t())
    return main.clone().add_(product)


def test_bf16_main_grad_gets_the_exact_sum_rounded_once(gemm_mode):
    g, x, main, exact = _integer_operands(torch.bfloat16)
    fused = main.clone()
    accumulate_weight_grad(fused, g, x)
    assert torch.equal(fused.view(torch.int16), exact.to(torch.bfloat16).view(torch.int16))
    twice = _hook_path(main, g, x)  # the product rounded, then the sum
    assert not torch.equal(twice.view(torch.int16), fused.view(torch.int16))


def test_fp32_main_grad_adds_the_product_unrounded(gemm_mode):
    g, x, main, exact = _integer_operands(torch.float32)
    fused = main.clone()
    accumulate_weight_grad(fused, g, x)
    assert torch.equal(fused, exact)
    assert not torch.equal(_hook_path(main, g, x), exact)  # there the product was BF16


def test_fp32_params_accumulate_as_the_hook_path_does():
    gen = torch.Generator().manual_seed(1)
    g, x = torch.randn(ROWS, OUT, generator=gen), torch.randn(ROWS, IN, generator=gen)
    main = torch.randn(OUT, IN, generator=gen)
    fused = main.clone()
    accumulate_weight_grad(fused, g, x)
    torch.testing.assert_close(fused, main + g.t() @ x, rtol=1e-6, atol=1e-5)


def test_a_buffer_narrower_than_the_products_adds_as_the_hook_does():
    """fp32 params with --grad-reduce-dtype bf16: the FP32 product added into BF16."""
    gen = torch.Generator().manual_seed(3)
    g, x = torch.randn(ROWS, OUT, generator=gen), torch.randn(ROWS, IN, generator=gen)
    main = torch.randn(OUT, IN, generator=gen).bfloat16()
    fused = main.clone()
    accumulate_weight_grad(fused, g, x)
    assert torch.equal(fused, main.clone().add_(g.t() @ x))


def test_start_up_names_the_dtypes_it_cannot_fuse(monkeypatch):
    bf16, fp32 = torch.bfloat16, torch.float32
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert fusion_notice(bf16, bf16, cuda) is None and fusion_notice(bf16, fp32, cpu) is None
    assert fusion_notice(fp32, fp32, cuda) is None
    assert "gradient buffer as without the flag" in fusion_notice(fp32, bf16, cpu)
    monkeypatch.setattr(grad_accumulation_fusion, "fused_weight_gradient_mlp_cuda", None)
    assert "apex's fused_weight_gradient_mlp_cuda is not importable" in \
        fusion_notice(bf16, fp32, cuda)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("main_dtype", [torch.bfloat16, torch.float32])
def test_cuda_accumulation_is_the_exact_sum_rounded_once(main_dtype):
    """On the GPU (cuBLAS; apex for an FP32 buffer): the integer operands' exact
    sum rounded once to the buffer's dtype, as on the CPU. Without apex an FP32
    buffer gets the hook path's numbers (the BF16 product added)."""
    g, x, main, exact = (t.cuda() for t in _integer_operands(main_dtype))
    fused = main.clone()
    accumulate_weight_grad(fused, g, x)
    apex = grad_accumulation_fusion.fused_weight_gradient_mlp_cuda is not None
    if main_dtype is torch.float32 and not apex:
        expected = main.clone().add_(g.reshape(-1, OUT).t() @ x.reshape(-1, IN))
    else:
        expected = exact.to(main_dtype)
    assert torch.equal(fused, expected)


def test_backward_fills_main_grad_and_flags_the_dummy_grad(gemm_mode):
    """Through autograd: x's and the bias's gradients are the plain linear's, the
    weight's lands in main_grad, and AccumulateGrad still runs (the buffer's
    hook counts on it) with a dummy flagged as already added."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, IN, generator=gen).bfloat16()
    weight = torch.nn.Parameter(torch.randn(OUT, IN, generator=gen).bfloat16())
    bias = torch.nn.Parameter(torch.randn(OUT, generator=gen).bfloat16())
    grad_y = torch.randn(3, 5, OUT, generator=gen).bfloat16()
    reference_x = x.clone().requires_grad_()
    cpu_bf16.linear(reference_x, weight, bias).backward(grad_y)
    reference = {"weight": weight.grad.clone(), "bias": bias.grad.clone()}
    weight.grad = bias.grad = None

    weight.main_grad = torch.zeros_like(weight)
    weight.grad_added_to_main_grad = False
    seen = []
    weight.register_post_accumulate_grad_hook(
        lambda p: seen.append(p.grad_added_to_main_grad))
    fused_x = x.clone().requires_grad_()
    y = linear_with_grad_accumulation(fused_x, weight, bias)
    assert torch.equal(y, cpu_bf16.linear(x, weight, bias))
    y.backward(grad_y)
    assert seen == [True]
    assert torch.equal(fused_x.grad, reference_x.grad)
    assert torch.equal(bias.grad, reference["bias"])
    # One micro-batch onto zeros: the same single rounding as the plain product.
    assert torch.equal(weight.main_grad, reference["weight"])


def test_a_weight_without_main_grad_gets_a_plain_grad():
    weight = torch.nn.Parameter(torch.ones(OUT, IN))
    linear_with_grad_accumulation(torch.ones(2, IN), weight).sum().backward()
    assert torch.equal(weight.grad, torch.full((OUT, IN), 2.0))


def _job(micro_batches: int, data_parallel: int = 2, **flags) -> list[str]:
    return tiny_gpt_argv(micro_batch_size=2, global_batch_size=2 * data_parallel * micro_batches,
                         train_iters=4, lr=1e-2, hidden_dropout=0.0, attention_dropout=0.0,
                         use_distributed_optimizer=True, overlap_grad_reduce=True, **flags)


def test_the_job_prints_the_notice_from_the_buffer_it_built():
    """fp32 params with --grad-reduce-dtype bf16: the start-up line names the
    built buffers' dtypes, and the job trains."""
    [result] = run_pretrain(1, _job(1, data_parallel=1, precision="fp32", grad_reduce_dtype="bf16",
                                    gradient_accumulation_fusion=True))
    assert ("[flags] --gradient-accumulation-fusion: the torch.float32 products are added into "
            "the torch.bfloat16 gradient buffer as without the flag") in result["stdout"]
    assert len(result["reports"]) == 4


LAYOUTS = {  # 2 ranks each; tied, the output layer takes the embedding's weight unfused
    "dp2_untied": dict(untie_embeddings_and_output_weights=True),  # the output layer fused too
    # Under full recomputation the saved weight comes back without main_grad.
    "tp2_sp_recompute": dict(data_parallel=1, tensor_model_parallel_size=2,
                             sequence_parallel=True, recompute_granularity="full"),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_micro_batch_per_step_trains_bit_identically(layout):
    """bf16-sr: with one micro-batch per step the fused job's losses and grad norms
    are the hook path's, bit for bit (the first product lands on zeros)."""
    plain = run_pretrain(2, _job(1, **LAYOUTS[layout]))
    fused = run_pretrain(2, _job(1, gradient_accumulation_fusion=True, **LAYOUTS[layout]))
    for a, b in zip(plain, fused):
        assert [r["loss"] for r in a["reports"]] == [r["loss"] for r in b["reports"]]
        assert [r["grad_norm"] for r in a["reports"]] == [r["grad_norm"] for r in b["reports"]]


@pytest.mark.slow
def test_several_micro_batches_differ_only_by_bf16_rounding():
    """Four micro-batches per step: the sums round differently (once instead of
    twice per micro-batch), so the jobs part in the low bits and no more."""
    plain = run_pretrain(2, _job(4))
    fused = run_pretrain(2, _job(4, gradient_accumulation_fusion=True))
    plain_losses = np.array([r["loss"] for r in plain[-1]["reports"]])
    fused_losses = np.array([r["loss"] for r in fused[-1]["reports"]])
    assert plain_losses[0] == fused_losses[0]  # same weights, same first forward
    assert not np.array_equal(plain_losses, fused_losses)
    np.testing.assert_allclose(fused_losses, plain_losses, rtol=1e-2)
