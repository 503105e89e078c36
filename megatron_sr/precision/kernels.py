"""Triton kernels: the SR cast, the SR add and the fused AdamW step of every strategy.

The Triton twins of `megatron_sr.precision.rounding` and of the torch
reference `megatron_sr.precision.adamw_torch`; for the same inputs they
write the same bits. Callers go through `rounding`/`adamw`, which validate
inputs; the launchers here assume contiguous 1-D tensors on one device.

IEEE arithmetic. Every launch passes `IEEE_OPTIONS`: no multiply-add
contraction into FMA (Triton contracts `a*b + c` by default, which rounds
once where the torch and C code round twice) and no flush-to-zero of
subnormals in libdevice; division and square root are `div_rn`/`sqrt_rn`.
`tests/test_precision_ptx.py` compiles every kernel here to PTX for sm_90
with these options and fails on any `fma.*.f32` or `.ftz` instruction.

Random bits. Element `i` of the logical tensor (i = offset + position in the
segment) draws from the Philox call with counter `i // 2`: the even element
the low, the odd element the high 16 bits of each word; word 0 rounds the
parameter, 1 exp_avg, 2 exp_avg_sq. A block covers BLOCK elements aligned
to pairs of the logical tensor, so each Philox call runs once and serves
both elements of its pair.

Segment table. One launch of `_adamw_kernel` updates every segment of a
bucket shard: `table` (int64, [segments + 1, TABLE_COLUMNS], on the tensors'
device) gives per segment its first element in the shard tensors (START),
its length (LENGTH), the logical index of that element in its parameter
(OFFSET), the first program id of its blocks (FIRST_BLOCK; the extra last
row holds the total) and whether weight decay applies (DECAYS); `sr_keys`
(int64, [segments]) the Philox key of each segment at this step. Each
program finds its segment by binary search over FIRST_BLOCK.
"""
from __future__ import annotations

import triton
import triton.language as tl

# The oldest Triton these kernels run on, setup.py's floor (tests/test_version_floors.py
# keeps the two equal): from 3.4 tl.randint4x with an int64 counter runs the contract's
# 32-bit Philox (before, a 64-bit one: other SR bits); from 3.6 `enable_reflect_ftz`, an
# option of every launch (IEEE_OPTIONS), exists: 3.4 and 3.5 raise KeyError at the first
# launch ("Keyword argument ... unrecognised") and always let libdevice flush subnormals.
TRITON_FLOOR = (3, 6)
_TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
if _TRITON_VERSION < TRITON_FLOOR:
    raise ImportError(f"megatron_sr's Triton kernels need triton>=3.6 (setup.py), found {triton.__version__}: "
                      f"3.4 and 3.5 lack the enable_reflect_ftz launch option, older ones draw other SR bits; "
                      f"install triton>=3.6,<3.10 (torch>=2.10 on CUDA pins one) or set "
                      f"MEGATRON_SR_ADAMW_BACKEND=eager")

BLOCK_SIZE = 1024

# Compile options of every launch (see the module docstring).
IEEE_OPTIONS = dict(enable_fp_fusion=False, enable_reflect_ftz=False)

# Columns of the segment table.
START, LENGTH, OFFSET, FIRST_BLOCK, DECAYS = range(5)
TABLE_COLUMNS = 5

# The *_WRITE constexprs are the write-mode codes of megatron_sr.precision.adamw_torch:
# 0 exact (fp32 tensor), 1 bf16 round to nearest even, 2 bf16 stochastic,
# 3 (param only) bf16 round to nearest with the residual kept in the kahan buffer.
_WRITE_STOCHASTIC = 2


@triton.jit
def _pair_block(offset, length, block, BLOCK: tl.constexpr):
    """Block `block` of a segment of `length` elements whose first element
    has logical index `offset`: the BLOCK positions in the segment (some
    outside [0, length), masked), the mask, and the BLOCK // 2 Philox
    counters of the pairs they form."""
    first_pair = (offset >> 1) + block * (BLOCK // 2)
    pairs = first_pair + tl.arange(0, BLOCK // 2)
    position = first_pair * 2 - offset + tl.arange(0, BLOCK)
    mask = (position >= 0) & (position < length)
    return position, mask, pairs


@triton.jit
def _element_draws(word):
    """The 16-bit draws of the BLOCK elements from the words of their BLOCK // 2
    pairs: low half for the even, high half for the odd element."""
    return tl.interleave(word & 0xFFFF, word >> 16)


@triton.jit
def _sr_to_bf16(x, random16):
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + random16) & 0xFFFF0000
    rounded = tl.where(x != x, bits | 0x00400000, rounded)
    return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _rtn_to_bf16(x):
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    rounded = tl.where(x != x, bits | 0x00400000, rounded)
    return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _write(ptr, value, mask, random16, MODE: tl.constexpr):
    if MODE == 0:
        tl.store(ptr, value, mask=mask)
    elif MODE == 1:
        tl.store(ptr, _rtn_to_bf16(value), mask=mask)
    else:
        tl.store(ptr, _sr_to_bf16(value, random16), mask=mask)


@triton.jit(do_not_specialize=["seed", "offset", "n"])
def _sr_cast_kernel(x_ptr, out_ptr, seed, offset, n, BLOCK: tl.constexpr):
    # Via uint64: an offset in [2^31, 2^32) arrives as u32, which the interpreter
    # widens wrongly when cast straight to int64.
    offset = offset.to(tl.uint64).to(tl.int64)
    position, mask, pairs = _pair_block(offset, n, tl.program_id(0).to(tl.int64), BLOCK)
    word0, _, _, _ = tl.randint4x(seed.to(tl.int64), pairs)
    x = tl.load(x_ptr + position, mask=mask)
    tl.store(out_ptr + position, _sr_to_bf16(x, _element_draws(word0)), mask=mask)


@triton.jit
def _bf16_to_fp32(x):
    """Exact widening by the bit pattern (the interpreter's cast flushes bf16 subnormals)."""
    return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["seed", "offset", "n"])
def _sr_add_kernel(acc_ptr, addend_ptr, seed, offset, n, BLOCK: tl.constexpr):
    offset = offset.to(tl.uint64).to(tl.int64)  # as in _sr_cast_kernel
    position, mask, pairs = _pair_block(offset, n, tl.program_id(0).to(tl.int64), BLOCK)
    word0, _, _, _ = tl.randint4x(seed.to(tl.int64), pairs)
    total = _bf16_to_fp32(tl.load(acc_ptr + position, mask=mask)) \
        + _bf16_to_fp32(tl.load(addend_ptr + position, mask=mask))
    tl.store(acc_ptr + position, _sr_to_bf16(total, _element_draws(word0)), mask=mask)


@triton.jit(do_not_specialize=["num_segments"])
def _adamw_kernel(
    param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, master_ptr, kahan_ptr,
    table_ptr, sr_keys_ptr, grad_scale_ptr,
    lr, beta1, one_minus_beta1, beta2, one_minus_beta2,
    inv_bias_correction1, inv_bias_correction2, eps, decay,
    num_segments,
    PARAM_WRITE: tl.constexpr, EXP_AVG_WRITE: tl.constexpr, EXP_AVG_SQ_WRITE: tl.constexpr,
    HAS_MASTER: tl.constexpr, NEEDS_RANDOM: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    COLUMNS: tl.constexpr, BLOCK: tl.constexpr,
):
    program = tl.program_id(0).to(tl.int64)
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr)
        # A non-finite scale (NaN/Inf grad norm) skips the step: nothing is written.
        active = tl.abs(grad_scale) <= 3.4028234663852886e38
    else:
        grad_scale = 1.0
        active = True
    if active:
        # The segment of this program: the last row with FIRST_BLOCK <= program.
        low = 0
        high = num_segments
        while high - low > 1:
            middle = (low + high) // 2
            right = tl.load(table_ptr + middle * COLUMNS + 3) <= program  # column FIRST_BLOCK
            low = tl.where(right, middle, low)
            high = tl.where(right, high, middle)
        row = table_ptr + low * COLUMNS  # columns START, LENGTH, OFFSET, FIRST_BLOCK, DECAYS
        start = tl.load(row + 0)
        length = tl.load(row + 1)
        offset = tl.load(row + 2)
        block = program - tl.load(row + 3)
        segment_decay = tl.where(tl.load(row + 4) != 0, decay, 1.0)
        position, mask, pairs = _pair_block(offset, length, block, BLOCK)
        position = start + position

        if NEEDS_RANDOM:
            word0, word1, word2, _ = tl.randint4x(tl.load(sr_keys_ptr + low), pairs)
            random_param = _element_draws(word0)
            random_exp_avg = _element_draws(word1)
            random_exp_avg_sq = _element_draws(word2)
        else:
            random_param = 0
            random_exp_avg = 0
            random_exp_avg_sq = 0

        grad = tl.load(grad_ptr + position, mask=mask).to(tl.float32) * grad_scale
        exp_avg = tl.load(exp_avg_ptr + position, mask=mask).to(tl.float32)
        exp_avg_sq = tl.load(exp_avg_sq_ptr + position, mask=mask).to(tl.float32)
        if HAS_MASTER:
            weight = tl.load(master_ptr + position, mask=mask)
        else:
            weight = tl.load(param_ptr + position, mask=mask).to(tl.float32)

        exp_avg = exp_avg * beta1 + grad * one_minus_beta1
        exp_avg_sq = exp_avg_sq * beta2 + (grad * grad) * one_minus_beta2
        denom = tl.sqrt_rn(exp_avg_sq * inv_bias_correction2) + eps
        update = tl.div_rn(exp_avg * inv_bias_correction1, denom)
        weight = weight * segment_decay - update * lr

        _write(exp_avg_ptr + position, exp_avg, mask, random_exp_avg, EXP_AVG_WRITE)
        _write(exp_avg_sq_ptr + position, exp_avg_sq, mask, random_exp_avg_sq, EXP_AVG_SQ_WRITE)
        if HAS_MASTER:
            tl.store(master_ptr + position, weight, mask=mask)
            tl.store(param_ptr + position, _rtn_to_bf16(weight), mask=mask)
        elif PARAM_WRITE == 3:
            target = weight + tl.load(kahan_ptr + position, mask=mask).to(tl.float32)
            param = _rtn_to_bf16(target)
            tl.store(param_ptr + position, param, mask=mask)
            tl.store(kahan_ptr + position, _rtn_to_bf16(target - param.to(tl.float32)), mask=mask)
        else:
            _write(param_ptr + position, weight, mask, random_param, PARAM_WRITE)


def blocks_of(length: int, offset: int) -> int:
    """Programs a segment of `length` elements at logical index `offset` takes
    (blocks are aligned to pairs of the logical tensor)."""
    return triton.cdiv(length + offset % 2, BLOCK_SIZE) if length else 0


def sr_cast(x, out, seed: int, offset: int) -> None:
    """SR of contiguous fp32 `x` into bf16 `out` (same length), stream 0."""
    n = x.numel()
    if n:
        _sr_cast_kernel[(blocks_of(n, offset),)](x, out, seed, offset, n, BLOCK=BLOCK_SIZE, **IEEE_OPTIONS)


def sr_add(acc, addend, seed: int, offset: int) -> None:
    """acc <- SR(float(acc) + float(addend)) for contiguous bf16 `acc` and
    `addend` of one length, stream 0 (`grad_accumulation.stochastic_add_`)."""
    n = acc.numel()
    if n:
        _sr_add_kernel[(blocks_of(n, offset),)](acc, addend, seed, offset, n, BLOCK=BLOCK_SIZE, **IEEE_OPTIONS)


def adamw_step(param, grad, exp_avg, exp_avg_sq, master, kahan, coefficients, table, sr_keys, grad_scale,
               total_blocks: int, *, param_write: int, exp_avg_write: int, exp_avg_sq_write: int) -> None:
    """One launch of the fused AdamW kernel over every segment of `table`
    (see the module docstring; `total_blocks` = its last FIRST_BLOCK).
    `coefficients` holds, as Python floats already rounded to fp32: lr,
    beta1, 1-beta1, beta2, 1-beta2, 1/bias_correction1, 1/bias_correction2,
    eps, 1-lr*weight_decay. `grad_scale`: None or a 0-d fp32 tensor on the
    device (read there: no host sync), the factor of every gradient; when
    it is not finite the launch writes nothing. `master` / `kahan` may be
    None (then `param` stands in for the unused pointer)."""
    if total_blocks == 0:
        return
    needs_random = _WRITE_STOCHASTIC in (param_write, exp_avg_write, exp_avg_sq_write)
    _adamw_kernel[(total_blocks,)](
        param, grad, exp_avg, exp_avg_sq,
        param if master is None else master, param if kahan is None else kahan,
        table, sr_keys, table if grad_scale is None else grad_scale,
        *coefficients, table.shape[0] - 1,
        PARAM_WRITE=param_write, EXP_AVG_WRITE=exp_avg_write, EXP_AVG_SQ_WRITE=exp_avg_sq_write,
        HAS_MASTER=master is not None, NEEDS_RANDOM=needs_random, HAS_GRAD_SCALE=grad_scale is not None,
        COLUMNS=TABLE_COLUMNS, BLOCK=BLOCK_SIZE, **IEEE_OPTIONS,
    )
