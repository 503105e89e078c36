"""SR bit identity on a GPU: the compiled Triton kernel against the torch reference.

Spec (docs/DESIGN.md "Stochastic rounding: the contract", point 1; issue 12): for
every strategy row, 2^20 + 3 elements at logical offsets 0, 7 and 2^32 + 3,
three steps: the Triton kernel on CUDA, the torch reference on CUDA and the
CPU backend write the same bits (NaN payloads aside); so does the one-launch
shard step with a gradient scale. Needs CUDA (skipped otherwise: the
interpreter runs the same kernels in the other test files, but not the CUDA
compiler's arithmetic, which `test_precision_ptx.py` checks without a GPU).
"""
from __future__ import annotations

import pytest
import torch

from megatron_sr.precision.adamw import adamw_shard_step
from megatron_sr.precision.strategies import get_strategy
from precision_helpers import same_bits
from test_precision_adamw import HYPER, STRATEGY_VARIANTS, clone, make_state, run_steps
from test_precision_shard_step import SEGMENTS, SHARD_NUMEL, segment_keys

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

NUMEL = (1 << 20) + 3


@pytest.mark.parametrize("name, state_dtype", STRATEGY_VARIANTS)
@pytest.mark.parametrize("offset", [0, 7, (1 << 32) + 3])
def test_triton_on_cuda_equals_torch_on_cuda_and_cpu(name, state_dtype, offset):
    strategy = get_strategy(name, state_dtype)
    cpu = make_state(strategy, NUMEL, seed=offset % 11)
    cpu["param"][:3] = torch.tensor([float("nan"), float("inf"), 0.0]).to(strategy.param_dtype)
    torch_cuda = {key: t.cuda() for key, t in cpu.items()}
    triton_cuda = clone(torch_cuda)
    run_steps(strategy, cpu, 3, offset=offset, backend=None)  # the CPU default: native, else compiled
    run_steps(strategy, torch_cuda, 3, offset=offset, backend="eager")
    run_steps(strategy, triton_cuda, 3, offset=offset, backend="triton")
    for key in cpu:
        assert same_bits(triton_cuda[key].cpu(), cpu[key]), f"triton vs cpu: {key}"
        assert same_bits(torch_cuda[key].cpu(), cpu[key]), f"torch cuda vs cpu: {key}"


@pytest.mark.parametrize("name, state_dtype", STRATEGY_VARIANTS)
def test_shard_step_with_a_gradient_scale_on_cuda_equals_cpu(name, state_dtype):
    strategy = get_strategy(name, state_dtype)
    cpu = make_state(strategy, SHARD_NUMEL, seed=3)
    cuda = {key: t.cuda() for key, t in cpu.items()}
    for step in (1, 2, 3):
        for state, backend, device in ((cpu, "eager", "cpu"), (cuda, "triton", "cuda")):
            adamw_shard_step(strategy, **state, segments=SEGMENTS, sr_keys=segment_keys(step), **HYPER, step=step,
                             grad_scale=torch.tensor(0.75, device=device), backend=backend)
    for key in cpu:
        assert same_bits(cuda[key].cpu(), cpu[key]), key
