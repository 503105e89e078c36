"""Philox4x32-10 counter-based random bits and fp32 -> bf16 rounding, in torch.

This is the torch reference of the stochastic-rounding (SR) contract of
docs/DESIGN.md; `megatron_sr.precision.kernels` is its Triton twin and the two
agree to the bit (NaN payloads aside). Everything here runs on any device and traces under
`torch.compile`.

Random bits. `philox4x32(counter, philox_round_keys(key))` equals Triton's
`tl.randint4x(key, counter)`: the 63-bit key is split into two 32-bit words,
the 64-bit counter into (low, high) words, the two remaining counter words
are zero. It returns four 32-bit words (held in int64 tensors) per counter.

Which bits an element draws. Element `i` of a logical (unsharded) tensor
uses the Philox call with counter `i // 2`; the even element takes the low
16 bits of a word, the odd element the high 16 bits. The four words are four
streams, one per stored tensor of the AdamW step (`STREAM_PARAM`,
`STREAM_EXP_AVG`, `STREAM_EXP_AVG_SQ`, `STREAM_KAHAN`; the Kahan writes
round to nearest today, so that stream is reserved). Any shard of the
tensor computes the same bits for its elements, given its offset.

Rounding rules (`sr_round_bits`, fp32 -> bf16):
- SR adds a uniform 16-bit integer to the fp32 bit pattern and clears the
  low 16 bits, so x rounds away from zero with probability exactly
  (low 16 bits of x) / 2^16 and E[SR(x)] = x.
- bf16-representable values (including +-0, +-Inf and subnormals whose low
  16 bits are zero) never change; the sign is always kept.
- NaN stays NaN (the quiet bit is set, so a payload living only in the
  low 16 bits does not turn into Inf); NaN payload bits are not part of the
  contract (torch's and Triton's casts may quieten them differently).
- A finite |x| above bf16's largest finite value (3.3895e38) rounds to +-Inf
  with the probability the rule gives, Inf being the next value up.
- Subnormals follow the same rule: bf16 has fp32's exponent range, and the
  bit patterns of subnormals are ordered like those of normal numbers.
"""
from __future__ import annotations

import torch

PHILOX_ROUNDS = 10
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_MASK32 = 0xFFFFFFFF

STREAM_PARAM = 0
STREAM_EXP_AVG = 1
STREAM_EXP_AVG_SQ = 2
STREAM_KAHAN = 3

MAX_KEY = (1 << 63) - 1

# 0xFFFF0000 and the quiet-NaN bit, as int32 values.
_CLEAR_LOW16 = -65536
_QUIET_NAN_BIT = 0x00400000


def philox_round_keys(key: int) -> list[tuple[int, int]]:
    """The (k0, k1) key words of each of the ten Philox rounds for a 63-bit
    `key`, as Python ints below 2^32."""
    if not 0 <= key <= MAX_KEY:
        raise ValueError(f"Philox key {key} must be in [0, 2^63)")
    k0, k1 = key & _MASK32, key >> 32
    keys = []
    for _ in range(PHILOX_ROUNDS):
        keys.append((k0, k1))
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return keys


def philox_key_tensor(key: int, device=None) -> torch.Tensor:
    """`philox_round_keys(key)` flattened into an int64 tensor of 20 values,
    the form `philox4x32` takes inside compiled code (a tensor, so that a new
    key every step does not recompile)."""
    flat = [word for pair in philox_round_keys(key) for word in pair]
    return torch.tensor(flat, dtype=torch.int64, device=device)


def philox4x32(counter: torch.Tensor, round_keys) -> tuple:
    """Philox4x32-10 of the 64-bit counters `counter` (int64, any shape,
    non-negative) under `round_keys` (from `philox_round_keys` or
    `philox_key_tensor`). Returns four int64 tensors of 32-bit words, equal
    to the four outputs of Triton's `tl.randint4x(key, counter)`.

    The 32-bit words live in int64 lanes. Between rounds only their low 32
    bits are meaningful (products and shifts leave junk above): multiplicands
    are masked before each 32x32->64 multiply, whose int64 result wraps
    modulo 2^64 with the unsigned product's bits, and the outputs at the end.
    """
    c0 = counter & _MASK32
    c1 = counter >> 32
    c2 = 0
    c3 = 0
    for r in range(PHILOX_ROUNDS):
        if isinstance(round_keys, torch.Tensor):
            k0, k1 = round_keys[2 * r], round_keys[2 * r + 1]
        else:
            k0, k1 = round_keys[r]
        product_b = (c2 & _MASK32) * _PHILOX_ROUND_B
        product_a = (c0 & _MASK32) * _PHILOX_ROUND_A
        c0, c1, c2, c3 = (product_b >> 32) ^ c1 ^ k0, product_b, (product_a >> 32) ^ c3 ^ k1, product_a
    return tuple(word & _MASK32 for word in (c0, c1, c2, c3))


def random_halfwords(element_index: torch.Tensor, round_keys) -> tuple:
    """The four 16-bit draws (int32 tensors in [0, 2^16)) of the elements at
    logical positions `element_index` (int64), one per stream."""
    words = philox4x32(element_index >> 1, round_keys)
    odd = (element_index & 1) == 1
    # A select rather than a shift by a per-element amount: it vectorizes.
    return tuple((torch.where(odd, word >> 16, word) & 0xFFFF).to(torch.int32) for word in words)


def sr_pattern(x: torch.Tensor, random16) -> torch.Tensor:
    """The bf16 result of stochastically rounding fp32 `x` with the 16-bit
    draws `random16`, as an int32 fp32 bit pattern whose low 16 bits are 0."""
    bits = x.view(torch.int32)
    rounded = (bits + random16) & _CLEAR_LOW16
    return torch.where(torch.isnan(x), bits | _QUIET_NAN_BIT, rounded)


def nearest_pattern(x: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest-even of fp32 `x` to bf16, as an int32 fp32 bit
    pattern whose low 16 bits are 0 (NaN quietened, like `sr_pattern`)."""
    bits = x.view(torch.int32)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) & _CLEAR_LOW16
    return torch.where(torch.isnan(x), bits | _QUIET_NAN_BIT, rounded)


def sr_round_bits(x: torch.Tensor, random16: torch.Tensor) -> torch.Tensor:
    """Stochastic rounding of fp32 `x` to bf16, using the 16-bit draws
    `random16` (integer tensor broadcastable to x, values in [0, 2^16))."""
    # The pattern is bf16-representable, so this cast is exact (and, unlike
    # an int32 -> int16 narrowing, vectorized by torch.compile).
    return sr_pattern(x, random16).view(torch.float32).to(torch.bfloat16)


def round_nearest(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 with round-to-nearest-even (NaN stays NaN)."""
    return x.to(torch.bfloat16)


def stochastic_round(x: torch.Tensor, seed: int, offset: int = 0) -> torch.Tensor:
    """fp32 tensor `x` (any shape, any device) rounded stochastically to a
    bf16 tensor of the same shape, drawing stream `STREAM_PARAM` of Philox
    key `seed` (0 <= seed < 2^63, e.g. from `megatron_sr.random.sr_key`).
    `offset` is the index of x's first element in its logical tensor (x is
    read in row-major order), so rounding a shard with its offset equals
    the matching slice of rounding the whole tensor."""
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round: x must be float32, got {x.dtype}")
    if offset < 0:
        raise ValueError(f"stochastic_round: offset must be >= 0, got {offset}")
    flat = x.reshape(-1)
    index = torch.arange(offset, offset + flat.numel(), dtype=torch.int64, device=x.device)
    random16 = random_halfwords(index, philox_round_keys(seed))[STREAM_PARAM]
    return sr_round_bits(flat, random16).view(x.shape)
