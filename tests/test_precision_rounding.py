"""The stochastic-rounding contract of docs/DESIGN.md: Philox bits, SR and RTN casts."""
import math

import pytest
import torch

from megatron_sr.precision import rounding
from megatron_sr.precision.rounding import round_nearest, stochastic_round
from megatron_sr.random import sr_key
from precision_helpers import DEVICE, TRITON_AVAILABLE, same_bits

needs_triton = pytest.mark.skipif(not TRITON_AVAILABLE, reason="needs CUDA or TRITON_INTERPRET=1")

SEEDS = [0, 1, 0x0123456789ABCDEF, (1 << 63) - 1, sr_key(1234, 7, "decoder.layers.0.mlp.linear_fc1.weight")]


def test_philox_known_answer():
    """Random123's Philox4x32-10 test vector: counter 0, key 0."""
    words = rounding.philox4x32(torch.zeros(1, dtype=torch.int64), rounding.philox_round_keys(0))
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_key_tensor_and_python_keys_agree():
    counters = torch.randint(0, 1 << 62, (257,), generator=torch.Generator().manual_seed(0))
    for seed in SEEDS:
        from_ints = rounding.philox4x32(counters, rounding.philox_round_keys(seed))
        from_tensor = rounding.philox4x32(counters, rounding.philox_key_tensor(seed))
        assert all(torch.equal(a, b) for a, b in zip(from_ints, from_tensor))


@needs_triton
@pytest.mark.parametrize("seed", SEEDS)
def test_philox_matches_triton_randint4x(seed):
    import triton
    import triton.language as tl

    @triton.jit
    def randint4x_kernel(counter_ptr, out_ptr, seed, n, BLOCK: tl.constexpr):
        position = tl.arange(0, BLOCK)
        mask = position < n
        words = tl.randint4x(seed, tl.load(counter_ptr + position, mask=mask))
        for stream in tl.static_range(4):
            tl.store(out_ptr + stream * n + position, words[stream].to(tl.int64), mask=mask)

    generator = torch.Generator().manual_seed(seed % 1000)
    counters = torch.cat([torch.tensor([0, 1, (1 << 32) - 1, 1 << 32, (1 << 32) + 5, (1 << 62) + 3]),
                          torch.randint(0, 1 << 40, (57,), generator=generator)])
    n = counters.numel()
    out = torch.zeros(4 * n, dtype=torch.int64, device=DEVICE)
    randint4x_kernel[(1,)](counters.to(DEVICE), out, seed, n, BLOCK=64)
    expected = torch.cat(rounding.philox4x32(counters, rounding.philox_round_keys(seed)))
    assert torch.equal(out.cpu() & 0xFFFFFFFF, expected)


@needs_triton
@pytest.mark.parametrize("offset", [0, 1, 1027, (1 << 32) - 3, (1 << 33) + 1])
def test_sr_cast_torch_matches_triton(offset):
    from megatron_sr.precision import kernels

    x = torch.randn(2051, generator=torch.Generator().manual_seed(offset % 97)) * 3
    x[:7] = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 3.4e38, 1e-40])
    x = x.to(DEVICE)
    out = torch.empty(x.numel(), dtype=torch.bfloat16, device=DEVICE)
    kernels.sr_cast(x, out, SEEDS[2], offset)
    assert same_bits(out, stochastic_round(x, SEEDS[2], offset))


def _bf16_neighbours(x):
    """The bf16 values just below and just above positive fp32 `x`."""
    down_bits = x.view(torch.int32) & -65536
    return down_bits.view(torch.float32), (down_bits + 65536).view(torch.float32)


def test_representable_values_never_change():
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    every_bf16 = bits.view(torch.bfloat16)
    every_bf16 = every_bf16[~torch.isnan(every_bf16)]
    for seed in SEEDS[:3]:
        assert same_bits(stochastic_round(every_bf16.float(), seed), every_bf16)
    assert same_bits(round_nearest(every_bf16.float()), every_bf16)


def test_special_values():
    nan_with_low_payload = torch.tensor([0x7F800001, -0x007FFFFF], dtype=torch.int32).view(torch.float32)
    specials = torch.cat([torch.tensor([math.nan, -math.nan, math.inf, -math.inf, 0.0, -0.0]),
                          nan_with_low_payload]).repeat(50)
    for seed in SEEDS[:3]:
        out = stochastic_round(specials, seed, offset=11).float()
        assert torch.isnan(out[0::8]).all() and torch.isnan(out[1::8]).all()
        assert torch.isnan(out[6::8]).all() and torch.isnan(out[7::8]).all()
        assert (out[2::8] == math.inf).all() and (out[3::8] == -math.inf).all()
        assert (out[4::8] == 0).all() and not torch.signbit(out[4::8]).any()
        assert (out[5::8] == 0).all() and torch.signbit(out[5::8]).all()


def test_results_are_a_neighbour_with_the_sign_kept():
    """Normal, subnormal and tiny values round to one of their two bf16 neighbours."""
    generator = torch.Generator().manual_seed(3)
    magnitudes = torch.cat([torch.randn(4000, generator=generator),
                            torch.randn(2000, generator=generator) * 1e-39,  # fp32 subnormals
                            torch.randn(2000, generator=generator) * 1e-44])
    x = magnitudes * torch.where(torch.rand(8000, generator=generator) < 0.5, -1.0, 1.0)
    out = stochastic_round(x, SEEDS[1]).float()
    down, up = _bf16_neighbours(x.abs())
    assert ((out.abs() == down) | (out.abs() == up)).all()
    assert (torch.signbit(out) == torch.signbit(x)).all()


def test_beyond_bf16_max_rounds_to_max_or_inf():
    x = torch.full((4000,), 3.3960e38)  # between bf16's largest finite value and fp32's
    out = stochastic_round(x, SEEDS[1]).float()
    largest = torch.finfo(torch.bfloat16).max
    assert ((out == largest) | (out == math.inf)).all()
    assert 0 < (out == math.inf).sum() < 4000


@pytest.mark.parametrize("low16", [1, 0x1000, 0x8000, 0xC000, 0xFFFF])
def test_probability_of_rounding_up_is_the_low_bits(low16):
    n = 200_000
    x_bits = torch.tensor([0x3F812345 & -65536 | low16], dtype=torch.int32)
    x = x_bits.view(torch.float32).expand(n).contiguous()
    out = stochastic_round(x, SEEDS[3], offset=12345).float()
    down, up = _bf16_neighbours(x[:1])
    rounded_up = (out == up).double().mean().item()
    p = low16 / 65536
    bound = 5 * math.sqrt(p * (1 - p) / n) + 1 / n
    assert abs(rounded_up - p) <= bound
    assert ((out == up) | (out == down)).all()
    mean_bound = (up - down).item() * bound
    assert abs(out.double().mean().item() - x[0].item()) <= mean_bound


def test_mean_is_unbiased_on_random_data():
    x = torch.randn(256, generator=torch.Generator().manual_seed(5)).repeat(2000)
    out = torch.stack([stochastic_round(x[i::256], SEEDS[4], offset=i) for i in range(4)]).float()
    spread = (x.abs() * 2.0 ** -7)[:1000].max().item()
    error = (out.double().mean(dim=1) - x[0:4].double()).abs()
    assert (error < 5 * spread / math.sqrt(2000)).all()


def test_same_key_and_offset_give_same_bits_other_keys_differ():
    x = torch.randn(10_001, generator=torch.Generator().manual_seed(6))
    first = stochastic_round(x, sr_key(1, 10, "w"), offset=5)
    assert same_bits(first, stochastic_round(x, sr_key(1, 10, "w"), offset=5))
    for other in (sr_key(1, 11, "w"), sr_key(2, 10, "w"), sr_key(1, 10, "v")):
        differing = (first.view(torch.int16) != stochastic_round(x, other, offset=5).view(torch.int16))
        assert differing.float().mean() > 0.2


@pytest.mark.parametrize("cuts", [[3], [1, 2, 1000], [4097, 4100, 9998]])
def test_shards_draw_the_bits_of_the_whole_tensor(cuts):
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(7))
    whole = stochastic_round(x, SEEDS[2], offset=1 << 32)
    bounds = [0, *cuts, x.numel()]
    shards = [stochastic_round(x[a:b], SEEDS[2], offset=(1 << 32) + a) for a, b in zip(bounds, bounds[1:])]
    assert same_bits(torch.cat(shards), whole)


def test_any_shape_and_bad_inputs():
    x = torch.randn(3, 5, 7)
    assert same_bits(stochastic_round(x, 9).reshape(-1), stochastic_round(x.reshape(-1), 9))
    with pytest.raises(TypeError, match="x must be float32"):
        stochastic_round(x.double(), 9)
    with pytest.raises(ValueError, match="offset"):
        stochastic_round(x, 9, offset=-1)
    with pytest.raises(ValueError, match="key"):
        stochastic_round(x, 1 << 63)


def _round_nearest_even_by_bits(x):
    """fp32 -> bf16 bits by integer arithmetic on the fp32 bits, independent of
    any float cast: keep the top 16 bits of the magnitude, add one when the
    dropped 16 bits exceed half, or equal half and the kept bits are odd (ties
    to even); a carry out of the mantissa bumps the exponent, up to Inf."""
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    sign, magnitude = bits & 0x80000000, bits & 0x7FFFFFFF
    kept, dropped = magnitude >> 16, magnitude & 0xFFFF
    round_up = (dropped > 0x8000) | ((dropped == 0x8000) & (kept & 1 == 1))
    rounded = ((sign >> 16) | (kept + round_up.to(torch.int64))).to(torch.int32)
    return rounded.to(torch.int16).view(torch.bfloat16)  # int32 -> int16 keeps the low 16 bits


def test_round_nearest_is_round_half_to_even_on_the_bits():
    generator = torch.Generator().manual_seed(8)
    bf16_patterns = torch.arange(0, 1 << 16, 97, dtype=torch.int64)  # upper halves, odd and even
    every_low16 = torch.cat([torch.tensor([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF]),
                             torch.randint(0, 1 << 16, (8,), generator=generator)])
    upper_lower = (bf16_patterns[:, None] << 16) | every_low16[None, :]
    ties = torch.tensor([0x3F808000, 0x3F818000, 0x00008000, 0x00018000, 0x7F7F8000,
                         0x7F7E8000, 0x80008000, 0xBF818000])  # even and odd kept bits, +/-
    boundaries = torch.tensor([0x7F7FFFFF, 0x7F7F7FFF, 0x7F800000, 0xFF800000, 0x7FC00000,
                               0x7F800001, 0xFFFFFFFF, 0x007FFFFF, 0x00000001, 0x80000001,
                               0x0000FFFF, 0x00017FFF, 0x00000000, 0x80000000])
    random_bits = torch.randint(0, 1 << 32, (20_000,), generator=generator)
    bits = torch.cat([upper_lower.reshape(-1), ties, boundaries, random_bits])
    x = (bits - ((bits >> 31) << 32)).to(torch.int32).view(torch.float32)
    x = torch.cat([x, torch.randn(10_000, generator=generator),
                   torch.randn(1000, generator=generator) * 1e-39])  # fp32 subnormals
    expected = _round_nearest_even_by_bits(x)
    is_nan = torch.isnan(x)
    out = round_nearest(x)
    assert same_bits(out[~is_nan], expected[~is_nan])
    assert torch.isnan(out[is_nan]).all() and is_nan.sum() > 0
    # The cases that tell round-half-to-even from other roundings, spelled out:
    # ties go to the even neighbour, just above a tie goes up, overflow gives Inf.
    spelled = torch.tensor([0x3F808000, 0x3F818000, 0x3F808001, 0x7F7FFFFF, 0x00008000],
                           dtype=torch.int64)
    spelled_x = spelled.to(torch.int32).view(torch.float32)
    assert round_nearest(spelled_x).view(torch.int16).tolist() == [0x3F80, 0x3F82, 0x3F81, 0x7F80, 0x0000]
