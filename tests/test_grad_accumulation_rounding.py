"""Stochastically rounded gradient accumulation (`--grad-accumulation-rounding stochastic`).

Spec (issue 28, docs/DESIGN.md "Stochastic rounding: the contract"):
- The SR add `acc <- SR(float(acc) + float(g))` of bf16 tensors writes the
  same bits on the torch reference, the C kernel and the Triton kernel, for
  any offset, special values included; rounding an fp32 sum computed
  elsewhere (the fused wgrad GEMM) gives the add's bits.
- It is unbiased: E[SR add] is the exact sum, rounding up with probability
  the fractional distance; many adds below half an ulp, which round to
  nearest loses, accumulate to the exact sum on average.
- The gradient buffer's hook and the fused wgrad GEMM round every add with
  `grad_accumulation_key(seed, step, micro-batch, name, TP rank)`, the step
  following the optimizer's step count; the first hook add into the zeroed
  buffer is exact.
- The flag needs a bf16 gradient buffer; an fp32 one is refused naming it.
- A run with several micro-batches per step resumes bit for bit.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from job_harness import (assert_states_equal, checkpoint_files, copy_checkpoint, losses,
                         run_pretrain, tiny_gpt_argv)
from megatron_sr.config import parse_args
from megatron_sr.config import OptimizerConfig
from megatron_sr.optimizer.distributed_optimizer import DistributedOptimizer
from megatron_sr.optimizer.param_buffer import ParamAndGradBuffer, ParamInfo
from megatron_sr.precision import grad_accumulation, native
from megatron_sr.precision.grad_accumulation import stochastic_add_, stochastic_round_into_
from megatron_sr.precision.rounding import stochastic_round
from megatron_sr.precision.strategies import get_strategy
from megatron_sr.random import grad_accumulation_key, sr_key
from megatron_sr.tensor_parallel.grad_accumulation_fusion import linear_with_grad_accumulation
from precision_helpers import DEVICE, TRITON_AVAILABLE, same_bits

KEY = grad_accumulation_key(1234, 7, 3, "decoder.layers.0.mlp.linear_fc1.weight")


def _operands(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A running sum and an addend of mixed magnitudes, with special values."""
    generator = torch.Generator().manual_seed(seed)
    acc = (torch.randn(n, generator=generator) * 10.0 ** torch.randint(-6, 3, (n,), generator=generator)).bfloat16()
    addend = (torch.randn(n, generator=generator) * 1e-3).bfloat16()
    specials = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 3.38e38, 1e-40, -1e-39])
    acc[:8] = specials.bfloat16()
    addend[:8] = torch.tensor([1.0, 1.0, 1.0, -0.0, 0.0, 3.38e38, 1e-40, 2e-39]).bfloat16()
    return acc, addend


def _backends() -> list[str]:
    chosen = ["eager"]
    if native.available():
        chosen.append("native")
    if TRITON_AVAILABLE:
        chosen.append("triton")
    return chosen


@pytest.mark.parametrize("offset", [0, 1, 1027, (1 << 32) - 3])
def test_every_backend_writes_the_reference_bits(offset):
    assert native.available(), "the C kernel must build here (a C compiler is in the image)"
    acc, addend = _operands(3001, offset % 89)
    reference = acc.clone()
    stochastic_add_(reference, addend, KEY, offset, backend="eager")
    expected = stochastic_round(acc.float() + addend.float(), KEY, offset)
    assert same_bits(reference, expected)
    for backend in _backends():
        out = acc.clone().to(DEVICE if backend == "triton" else "cpu")
        stochastic_add_(out, addend.to(out.device), KEY, offset, backend=backend)
        assert same_bits(out.cpu(), reference), backend
        rounded = acc.clone().to(out.device)
        stochastic_round_into_(rounded, (acc.float() + addend.float()).to(out.device), KEY, offset,
                               backend=backend)
        assert same_bits(rounded.cpu(), reference), backend


def test_native_threads_do_not_change_the_bits():
    acc, addend = _operands(1 << 18, 3)
    one, many = acc.clone(), acc.clone()
    native.stochastic_add_(one, addend, KEY, 5, threads=1)
    native.stochastic_add_(many, addend, KEY, 5, threads=2)
    assert same_bits(one, many)


@pytest.mark.parametrize("low16", [1, 0x4000, 0x8000, 0xC000, 0xFF00])
def test_rounding_up_has_the_probability_of_the_fractional_distance(low16):
    """a + g with a = 1 + 2^-7 (a bf16 value) and g = low16 * 2^-23 (bf16
    too): the fp32 sum is exact, and its low 16 bits are `low16`."""
    n = 200_000
    down = torch.tensor([0x3F810000], dtype=torch.int32).view(torch.float32)
    exact = torch.tensor([0x3F810000 | low16], dtype=torch.int32).view(torch.float32)
    addend = torch.tensor([low16 * 2.0 ** -23]).bfloat16()
    assert addend.float().item() == low16 * 2.0 ** -23 and (down + addend.float()).item() == exact.item()
    out = stochastic_add_(down.bfloat16().expand(n).contiguous(), addend.expand(n).contiguous(), KEY).float()
    up = torch.tensor([0x3F820000], dtype=torch.int32).view(torch.float32)
    assert ((out == down) | (out == up)).all()
    p = low16 / 65536
    bound = 5 * math.sqrt(p * (1 - p) / n) + 1 / n
    assert abs((out == up).double().mean().item() - p) <= bound
    assert abs(out.double().mean().item() - exact.item()) <= (up - down).item() * bound


def test_adds_below_half_an_ulp_accumulate_on_average():
    """64 adds of 2^-10 to 1.0 (ulp 2^-7): round to nearest stays at 1.0, SR
    averages 1.0625, the exact sum, over independent elements."""
    n, adds = 20_000, 64
    nearest = torch.ones(n, dtype=torch.bfloat16)
    stochastic = torch.ones(n, dtype=torch.bfloat16)
    addend = torch.full((n,), 2.0 ** -10, dtype=torch.bfloat16)
    for micro_batch in range(adds):
        nearest.add_(addend)
        stochastic_add_(stochastic, addend, grad_accumulation_key(1, 1, micro_batch, "w"))
    assert (nearest == 1.0).all()
    mean = stochastic.double().mean().item()
    # Each element's sum has a variance below adds * (ulp / 2)^2.
    assert abs(mean - 1.0625) < 5 * math.sqrt(adds) * 2.0 ** -8 / math.sqrt(n)


def test_keys_differ_per_micro_batch_step_and_from_the_optimizer_stream():
    keys = {grad_accumulation_key(1, step, micro_batch, "w") for step in (1, 2) for micro_batch in (0, 1, 2)}
    keys |= {grad_accumulation_key(1, 1, 0, "w", 0), grad_accumulation_key(1, 1, 0, "v"),
             grad_accumulation_key(2, 1, 0, "w"), sr_key(1, 1, "w")}
    assert len(keys) == 10
    with pytest.raises(ValueError, match="micro_batch"):
        grad_accumulation_key(1, 1, -1, "w")


def test_inputs_are_validated():
    acc = torch.zeros(4, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bf16 target"):
        stochastic_add_(acc.float(), acc, KEY)
    with pytest.raises(ValueError, match="must match"):
        stochastic_add_(acc, torch.zeros(5, dtype=torch.bfloat16), KEY)
    with pytest.raises(ValueError, match="2\\^63"):
        grad_accumulation.stochastic_round_into_(acc, acc.float(), -1)


# ----- the gradient buffer and the fused wgrad GEMM -------------------------------------------

NAMES = ("decoder.layers.0.mlp.linear_fc1.weight", "decoder.layers.0.mlp.linear_fc1.bias")


def _buffer(grad_rounding: str, seed: int = 42):
    generator = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter((torch.randn(24, 16, generator=generator) * 0.1).bfloat16())
    bias = torch.nn.Parameter(torch.zeros(24, dtype=torch.bfloat16))
    infos = [ParamInfo(NAMES[0], sr_tp_rank=1, weight_decay=True, count_in_grad_norm=True),
             ParamInfo(NAMES[1], sr_tp_rank=None, weight_decay=False, count_in_grad_norm=True)]
    buffer = ParamAndGradBuffer([weight, bias], infos, torch.bfloat16, torch.bfloat16,
                                data_parallel_group=None, distributed=True, grad_rounding=grad_rounding,
                                seed=seed)
    return weight, bias, buffer


def _micro_batches(count: int):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 16, generator=generator).bfloat16(), torch.randn(8, 24, generator=generator).bfloat16())
            for _ in range(count)]


def _backward(weight, bias, x, target, fused: bool):
    y = linear_with_grad_accumulation(x, weight, bias) if fused else torch.nn.functional.linear(x, weight, bias)
    (y.float() * target.float()).sum().backward()


def test_the_hook_rounds_every_add_after_the_first_with_its_key():
    weight, bias, buffer = _buffer("stochastic")
    buffer.accumulation_step = 5
    batches = _micro_batches(4)
    expected = {NAMES[0]: torch.zeros(24, 16, dtype=torch.bfloat16), NAMES[1]: torch.zeros(24, dtype=torch.bfloat16)}
    for micro_batch, (x, target) in enumerate(batches):
        _backward(weight, bias, x, target, fused=False)
        reference_weight, reference_bias = torch.nn.Parameter(weight.detach().clone()), \
            torch.nn.Parameter(bias.detach().clone())
        _backward(reference_weight, reference_bias, x, target, fused=False)
        for name, grad, tp_rank in ((NAMES[0], reference_weight.grad, 1), (NAMES[1], reference_bias.grad, None)):
            if micro_batch == 0:
                expected[name] = grad.clone()
            else:
                stochastic_add_(expected[name], grad, grad_accumulation_key(42, 5, micro_batch, name, tp_rank))
    assert same_bits(weight.main_grad, expected[NAMES[0]])
    assert same_bits(bias.main_grad, expected[NAMES[1]])
    # Round to nearest gives other bits: the test above is not vacuous.
    weight_rtn, bias_rtn, buffer_rtn = _buffer("nearest")
    for x, target in batches:
        _backward(weight_rtn, bias_rtn, x, target, fused=False)
    assert not same_bits(weight_rtn.main_grad, weight.main_grad)
    # zero_grad starts the count again: the next first add is exact.
    buffer.zero_grad()
    _backward(weight, bias, *batches[1], fused=False)
    assert same_bits(weight.main_grad, _single_grad(weight, batches[1]))


def _single_grad(weight, batch) -> torch.Tensor:
    copy = torch.nn.Parameter(weight.detach().clone())
    x, target = batch
    (torch.nn.functional.linear(x, copy).float() * target.float()).sum().backward()
    return copy.grad


def test_the_fused_wgrad_gemm_rounds_its_fp32_sum_with_the_same_keys():
    weight, bias, buffer = _buffer("stochastic")
    buffer.accumulation_step = 2
    expected = torch.zeros(24, 16, dtype=torch.bfloat16)
    for micro_batch, (x, target) in enumerate(_micro_batches(3)):
        _backward(weight, bias, x, target, fused=True)
        product = target.float().t() @ x.float()
        stochastic_round_into_(expected, expected.float() + product,
                               grad_accumulation_key(42, 2, micro_batch, NAMES[0], 1))
    assert same_bits(weight.main_grad, expected)


def test_the_accumulation_step_follows_the_optimizer_step():
    weight, bias, buffer = _buffer("stochastic")
    optimizer = DistributedOptimizer(buffer, get_strategy("bf16-sr"), OptimizerConfig(), seed=42)
    assert buffer.accumulation_step == 1
    buffer.grad_buffer.fill_(0.01)
    optimizer.step(lr=1e-3)
    assert buffer.accumulation_step == 2
    optimizer.step_count = 7  # as a checkpoint load sets it
    assert buffer.accumulation_step == 8


def test_the_buffer_refuses_stochastic_adds_into_fp32():
    weight = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="--grad-accumulation-rounding stochastic needs a bf16"):
        ParamAndGradBuffer([weight], [ParamInfo("w", None, True, True)], torch.bfloat16, torch.float32,
                           data_parallel_group=None, distributed=True, grad_rounding="stochastic")


# ----- the flag ------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, cause", [(["--precision", "bf16-mixed"], "--precision bf16-mixed"),
                                          (["--precision", "fp32"], "--precision fp32"),
                                          (["--grad-reduce-dtype", "fp32"], "--grad-reduce-dtype fp32")])
def test_the_flag_is_refused_with_an_fp32_gradient_buffer(flags, cause):
    with pytest.raises(ValueError, match=f"--grad-accumulation-rounding stochastic .*{cause}"):
        parse_args(tiny_gpt_argv(train_iters=2, grad_accumulation_rounding="stochastic") + flags, 1)


def test_the_flag_reaches_the_optimizer_config():
    job = parse_args(tiny_gpt_argv(train_iters=2, grad_accumulation_rounding="stochastic"), 1)
    assert job.optimizer.grad_accumulation_rounding == "stochastic"
    assert parse_args(tiny_gpt_argv(train_iters=2), 1).optimizer.grad_accumulation_rounding == "nearest"
    parse_args(tiny_gpt_argv(train_iters=2, precision="fp32", grad_reduce_dtype="bf16",
                             grad_accumulation_rounding="stochastic"), 1)


# ----- resume ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_run_with_several_micro_batches_resumes_bit_for_bit(tmp_path):
    """DP 2 with the distributed optimizer, 4 micro-batches per rank and step,
    the linear layers' adds fused into their wgrad GEMMs (the rest through the
    hook): 4 steps equal 2 steps, a save, a load and 2 more."""
    def job(save, rounding="stochastic", **flags):
        return tiny_gpt_argv(precision="bf16-sr", train_iters=4, lr=1e-2, global_batch_size=8, micro_batch_size=1,
                             use_distributed_optimizer=True, gradient_accumulation_fusion=True,
                             grad_accumulation_rounding=rounding, save=save, **flags)

    continuous = run_pretrain(2, job(str(tmp_path / "continuous"), save_interval=2))
    load = copy_checkpoint(str(tmp_path / "continuous"), 2, str(tmp_path / "resumed"))
    resumed = run_pretrain(2, job(load, load=load))
    assert losses(resumed) == losses(continuous)[2:]
    assert_states_equal(checkpoint_files(load, 4), checkpoint_files(str(tmp_path / "continuous"), 4))
    nearest = run_pretrain(2, job(None, rounding="nearest"))
    assert losses(nearest)[:1] == losses(continuous)[:1]  # the same first forward
    assert not np.array_equal(losses(nearest), losses(continuous))
