"""The replica hash of megatron_sr.replica_check: every single-bit change of
a parameter changes it, equal bits give equal hashes, whatever the dtype.
(The multi-rank check, with a bit flipped on one rank, is
tests/faults/test_fault_replica_mismatch.py.)"""
import pytest
import torch

from megatron_sr import replica_check
from megatron_sr.fault_injection import _flip_lowest_bit


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_every_single_bit_flip_changes_both_hashes(dtype):
    torch.manual_seed(0)
    param = torch.randn(5, 7).to(dtype)
    reference = replica_check.parameter_hashes([param])
    bits = param.view({2: torch.int16, 4: torch.int32}[param.element_size()]).reshape(-1)
    for element in range(bits.numel()):
        for bit in range(8 * param.element_size()):
            flipped = param.clone()
            flipped_bits = flipped.view(bits.dtype).reshape(-1)
            flipped_bits[element] ^= torch.tensor(1 << bit, dtype=torch.int64).to(bits.dtype) \
                if bit < 8 * param.element_size() - 1 else torch.iinfo(bits.dtype).min
            changed = replica_check.parameter_hashes([flipped])
            assert (changed != reference).all(), (element, bit)


def test_equal_bits_hash_equal_and_rows_follow_the_parameters():
    a, b = torch.randn(3, 4), torch.randn(11)
    hashes = replica_check.parameter_hashes([a, b])
    assert hashes.shape == (2, 2) and hashes.dtype == torch.int64
    assert torch.equal(hashes, replica_check.parameter_hashes([a.clone(), b.clone()]))
    assert torch.equal(hashes[1:], replica_check.parameter_hashes([b]))


def test_hash_is_the_same_in_chunks(monkeypatch):
    param = torch.randn(1000)
    whole = replica_check.parameter_hashes([param])
    monkeypatch.setattr(replica_check, "_CHUNK", 64)
    assert torch.equal(replica_check.parameter_hashes([param]), whole)


def test_fault_injection_flips_exactly_one_bit():
    param = torch.randn(4, dtype=torch.float32)
    before = param.clone()
    _flip_lowest_bit(param)
    diff = (param.view(torch.int32) ^ before.view(torch.int32))
    assert diff.tolist() == [1, 0, 0, 0]
