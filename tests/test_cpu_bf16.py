"""BF16 products on CPUs without native BF16: FP32 GEMMs of the exact upcasts,
rounded once, with BF16 gradients; the native path is untouched."""
import pytest
import torch
import torch.nn.functional as F

from megatron_sr import cpu_bf16


@pytest.fixture
def gemm_mode(monkeypatch):
    def set_mode(mode):
        monkeypatch.setenv("MEGATRON_SR_CPU_BF16_GEMM", mode)
        cpu_bf16.cpu_has_native_bf16.cache_clear()
    yield set_mode
    cpu_bf16.cpu_has_native_bf16.cache_clear()


def _inputs(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).bfloat16().requires_grad_() for s in shapes]


def test_linear_fp32_path_is_one_rounding_of_the_exact_product(gemm_mode):
    gemm_mode("fp32")
    x, w, b = _inputs((6, 5, 48), (40, 48), (40,))
    y = cpu_bf16.linear(x, w, b)
    assert y.dtype is torch.bfloat16 and y.shape == (6, 5, 40)
    # Reference in fp64: the exact product of the bf16 values, rounded to bf16 once.
    exact = (x.double() @ w.double().T + b.double()).to(torch.bfloat16)
    mismatch = (y.view(torch.int16) != exact.view(torch.int16)).float().mean().item()
    assert mismatch < 0.01  # only where the fp32 accumulation rounds across a bf16 tie
    (y.float() ** 2).sum().backward()
    assert x.grad.dtype is torch.bfloat16 and w.grad.dtype is torch.bfloat16
    dy = (2 * y.float()).to(torch.bfloat16).double()
    exact_dw = (dy.reshape(-1, 40).T @ x.double().reshape(-1, 48)).to(torch.bfloat16)
    assert torch.allclose(w.grad.float(), exact_dw.float(), rtol=2 ** -7, atol=1e-6)


def test_linear_fp32_path_agrees_with_torch_bf16_gemm(gemm_mode):
    x, w = _inputs((32, 64), (16, 64), seed=1)
    gemm_mode("fp32")
    upcast = cpu_bf16.linear(x, w)
    native = F.linear(x, w)
    assert torch.allclose(upcast.float(), native.float(), rtol=2 ** -7, atol=1e-2)


def test_native_mode_calls_torch_unchanged(gemm_mode):
    gemm_mode("native")
    x, w = _inputs((8, 32), (4, 32), seed=2)
    assert torch.equal(cpu_bf16.linear(x, w).view(torch.int16), F.linear(x, w).view(torch.int16))
    fp32 = torch.randn(8, 32)
    assert cpu_bf16.linear(fp32, w.float()).dtype is torch.float32


def test_attention_fp32_path_matches_fp32_attention_rounded_once(gemm_mode):
    gemm_mode("fp32")
    q, k, v = _inputs((2, 3, 16, 8), (2, 3, 16, 8), (2, 3, 16, 8), seed=3)
    y = cpu_bf16.scaled_dot_product_attention(q, k, v, is_causal=True)
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert y.dtype is torch.bfloat16
    assert torch.equal(y.view(torch.int16), reference.to(torch.bfloat16).view(torch.int16))
    y.float().sum().backward()
    assert q.grad.dtype is torch.bfloat16 and torch.isfinite(q.grad.float()).all()


def test_bad_override_names_the_variable(gemm_mode):
    with pytest.raises(ValueError, match="MEGATRON_SR_CPU_BF16_GEMM"):
        gemm_mode("fast")
        cpu_bf16.cpu_has_native_bf16()


def test_setup_summary_names_the_capability(gemm_mode):
    gemm_mode("fp32")
    line = cpu_bf16.cpu_bf16_summary()
    assert torch.backends.cpu.get_cpu_capability() in line
    assert "no faster than fp32" in line
    gemm_mode("native")
    assert "native BF16" in cpu_bf16.cpu_bf16_summary()


def _saved_bytes(fn, *inputs):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn(*inputs)
    unique = {(t.data_ptr(), t.dtype, tuple(t.shape)): t for t in saved}
    return out, sum(t.numel() * t.element_size() for t in unique.values())


def test_fp32_paths_save_what_the_bf16_kernels_save(gemm_mode):
    """So that activation memory measured on an AVX2 CPU is the GPU's (tests/test_estimate.py)."""
    x, w = _inputs((64, 48), (32, 48), seed=4)
    q, k, v = _inputs((2, 2, 32, 16), (2, 2, 32, 16), (2, 2, 32, 16), seed=5)
    gemm_mode("native")
    _, native_linear = _saved_bytes(cpu_bf16.linear, x, w)
    _, native_attention = _saved_bytes(
        lambda *t: cpu_bf16.scaled_dot_product_attention(*t, is_causal=True), q, k, v)
    gemm_mode("fp32")
    _, fp32_linear = _saved_bytes(cpu_bf16.linear, x, w)
    _, fp32_attention = _saved_bytes(
        lambda *t: cpu_bf16.scaled_dot_product_attention(*t, is_causal=True), q, k, v)
    assert fp32_linear == native_linear
    assert fp32_attention == native_attention


def test_fp32_path_gradients_are_those_of_fp32_autograd_rounded_once(gemm_mode):
    gemm_mode("fp32")
    x, w, b = _inputs((4, 8, 32), (24, 32), (24,), seed=6)
    q, k, v = _inputs((2, 2, 16, 8), (2, 2, 16, 8), (2, 2, 16, 8), seed=7)
    reference = [t.detach().float().requires_grad_() for t in (x, w, b, q, k, v)]
    g = torch.Generator().manual_seed(8)
    dy = torch.randn(4, 8, 24, generator=g).bfloat16()
    do = torch.randn(2, 2, 16, 8, generator=g).bfloat16()
    cpu_bf16.linear(x, w, b).backward(dy)
    cpu_bf16.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do)
    F.linear(*reference[:3]).backward(dy.float())
    F.scaled_dot_product_attention(*reference[3:], is_causal=True).backward(do.float())
    for got, want in zip((x, w, b), reference[:3]):
        assert torch.equal(got.grad.view(torch.int16), want.grad.to(torch.bfloat16).view(torch.int16))
    for got, want in zip((q, k, v), reference[3:]):  # the rounded output enters the backward
        error = (got.grad.float() - want.grad).norm() / want.grad.norm()
        assert error < 2 ** -8


def test_autocast_takes_the_fp32_path_with_autocasts_casts(gemm_mode):
    """amp: fp32 inputs under torch.autocast(bfloat16) are cast to BF16 as autocast
    would, then computed as the BF16 inputs are (not on torch's emulated GEMM)."""
    gemm_mode("fp32")
    g = torch.Generator().manual_seed(9)
    x, w, b = (torch.randn(*s, generator=g).requires_grad_() for s in ((4, 8, 32), (24, 32), (24,)))
    q, k, v = (torch.randn(2, 2, 16, 8, generator=g).requires_grad_() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = cpu_bf16.linear(x, w, b)
        o = cpu_bf16.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert type(y.grad_fn).__name__ == "_LinearInFp32Backward"
    assert type(o.grad_fn).__name__ == "_FlashAttentionInFp32Backward"
    assert y.dtype is torch.bfloat16 and o.dtype is torch.bfloat16
    (y.float().sum() + o.float().sum()).backward()

    reference = [t.detach().to(torch.bfloat16).requires_grad_() for t in (x, w, b, q, k, v)]
    y_ref = cpu_bf16.linear(*reference[:3])
    o_ref = cpu_bf16.scaled_dot_product_attention(*reference[3:], is_causal=True)
    (y_ref.float().sum() + o_ref.float().sum()).backward()
    assert torch.equal(y.view(torch.int16), y_ref.view(torch.int16))
    assert torch.equal(o.view(torch.int16), o_ref.view(torch.int16))
    for got, want in zip((x, w, b, q, k, v), reference):
        assert got.grad.dtype is torch.float32  # autocast's casts carry the gradient to fp32
        assert torch.equal(got.grad, want.grad.float())


def test_autocast_on_a_native_bf16_cpu_is_torchs(gemm_mode):
    gemm_mode("native")
    x, w = torch.randn(8, 32), torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = cpu_bf16.linear(x, w)
        assert torch.equal(y.view(torch.int16), F.linear(x, w).view(torch.int16))
