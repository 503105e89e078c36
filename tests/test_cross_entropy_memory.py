"""The vocab-parallel cross entropy's memory: besides the caller's logits it
allocates one fp32 tensor of the logits' shape (shifted, exponentiated and
normalized in place into the saved softmax), and its loss and gradient are
those of the out-of-place formulation, to the bit. The values across TP ranks
are checked in tests/test_tensor_parallel.py."""
import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_sr import parallel_state
from megatron_sr.tensor_parallel import vocab_parallel_cross_entropy


@pytest.fixture
def single_rank():
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


class _FullSizeFp32Storages(TorchDispatchMode):
    """Records the distinct storages of fp32 op outputs with `numel` elements."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.storages = numel, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.dtype is torch.float32 \
                    and tensor.numel() == self.numel:
                self.storages.add(tensor.untyped_storage().data_ptr())
        return out


def _reference(logits, target):
    """The out-of-place formulation: logits.float() - max, exp, / sum."""
    logits32 = logits.float()
    shifted = logits32 - logits32.max(dim=-1, keepdim=True).values
    exp = shifted.exp()
    sum_exp = exp.sum(dim=-1)
    return sum_exp.log() - shifted.gather(-1, target.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_fp32_logits_sized_tensor_and_same_bits(single_rank, dtype):
    s, b, vocab = 16, 2, 512
    generator = torch.Generator().manual_seed(0)
    logits_data = (4 * torch.randn(s, b, vocab, generator=generator)).to(dtype)
    target = torch.randint(0, vocab, (s, b), generator=generator)
    grad_loss = torch.randn(s, b, generator=generator)

    logits = logits_data.clone().requires_grad_()
    with _FullSizeFp32Storages(logits.numel()) as forward_storages:
        loss = vocab_parallel_cross_entropy(logits, target)
    with _FullSizeFp32Storages(logits.numel()) as backward_storages:
        loss.backward(grad_loss)
    assert len(forward_storages.storages) == 1, "forward allocates more than one fp32 copy"
    assert backward_storages.storages <= forward_storages.storages

    reference_logits = logits_data.clone().requires_grad_()
    reference = _reference(reference_logits, target)
    reference.backward(grad_loss)
    assert torch.equal(loss, reference)
    assert logits.grad.dtype is dtype
    assert torch.allclose(logits.grad.float(), reference_logits.grad.float(), atol=1e-6, rtol=0)
    assert torch.equal(logits_data, logits.detach()), "the caller's logits were modified"
