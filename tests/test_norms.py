"""LayerNorm and RMSNorm (`megatron_sr.model.norms`) on the torch path (no apex).

Specification:
- a bf16 input keeps at most 2.5 bytes per input element for backward (the bf16
  input itself plus fp32 per-row statistics), not an fp32 upcast;
- forward values and the input, weight and bias gradients are bit-identical to
  autograd through the fp32 upcast (`x.float()`, the formulation the norms had
  before), for bf16 and fp32, contiguous and strided (qk-layernorm's per-head
  views of the qkv output) inputs, with and without --apply-layernorm-1p.
"""
import pytest
import torch
import torch.nn.functional as F

from megatron_sr.model.norms import LayerNorm, RMSNorm

EPS = 1e-5


def _reference(kind, x, weight, bias):
    """Autograd through the fp32 upcast: what the norms computed before."""
    x32 = x.float()
    if kind is LayerNorm:
        y = F.layer_norm(x32, (x.shape[-1],), weight.float(), bias.float(), EPS)
    else:
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS) * weight.float()
    return y.to(x.dtype)


def _build(kind, h, dtype, one_plus=False):
    norm = kind(h, EPS, sequence_parallel=False, dtype=dtype, one_plus=one_plus)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in norm.parameters():
            param.copy_(0.2 * torch.randn(param.shape, generator=generator) + (0.0 if one_plus
                                                                               else 1.0))
    return norm


def _saved_bytes(function, *inputs):
    """Bytes of the distinct storages autograd saves during `function(*inputs)`,
    parameters and inputs' storages excluded only when they are parameters."""
    storages = {}

    def pack(tensor):
        if not isinstance(tensor, torch.nn.Parameter):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = function(*inputs)
    return sum(storages.values()), output


@pytest.mark.parametrize("kind", [LayerNorm, RMSNorm])
def test_bf16_norm_saves_the_bf16_input_and_row_statistics(kind):
    s, b, h = 64, 2, 256
    norm = _build(kind, h, torch.bfloat16)
    x = torch.randn(s, b, h, dtype=torch.bfloat16, requires_grad=True)
    nbytes, y = _saved_bytes(norm, x)
    per_element = nbytes / x.numel()
    assert per_element <= 2.5, f"{kind.__name__} saves {per_element} bytes per bf16 input element"
    assert y.dtype is torch.bfloat16


@pytest.mark.parametrize("kind", [LayerNorm, RMSNorm])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("one_plus", [False, True])
def test_norm_bits_equal_autograd_through_the_fp32_upcast(kind, dtype, strided, one_plus):
    generator = torch.Generator().manual_seed(7)
    h = 32
    if strided:  # a per-head view of a fused projection, as qk-layernorm normalizes k
        fused = (3 * torch.randn(24, 2, 3, 2, h, generator=generator) + 0.5).to(dtype)
        x_data = fused[:, :, :, 1]
        assert not x_data.is_contiguous()
    else:
        x_data = (3 * torch.randn(24, 2, h, generator=generator) + 0.5).to(dtype)
    grad_y = torch.randn(x_data.shape, generator=generator).to(dtype)
    norm = _build(kind, h, dtype, one_plus)

    x = x_data.detach().requires_grad_()
    y = norm(x)
    y.backward(grad_y)
    got = [y, x.grad] + [p.grad for p in norm.parameters()]

    for param in norm.parameters():
        param.grad = None
    x = x_data.detach().requires_grad_()
    weight = norm.weight + 1 if one_plus else norm.weight
    expected_y = _reference(kind, x, weight, getattr(norm, "bias", None))
    expected_y.backward(grad_y)
    expected = [expected_y, x.grad] + [p.grad for p in norm.parameters()]

    for name, a, e in zip(["y", "grad x", "grad weight", "grad bias"], got, expected):
        assert a.dtype == e.dtype and torch.equal(a, e), f"{kind.__name__} {name} differs"
