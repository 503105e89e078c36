"""The AdamW step as the distributed optimizer runs it: one call per bucket shard.

Spec (docs/DESIGN.md "Distributed optimizer", issue 12):
- `adamw_shard_step` over a table of segments writes, on every backend, the
  bits of one `adamw_step` per segment (no gradient scale), and a gradient
  scale of 1 changes nothing; the backends agree with a scale too.
- A non-finite `grad_scale` writes nothing: a step with a NaN/Inf grad norm
  leaves params, m, v, master and kahan bit-identical, and the optimizer's
  step count unchanged.
- A `DistributedOptimizer.step` of a GPT with the ~400M model's 292
  parameters launches one Triton kernel per bucket, not one per parameter,
  and reads the device once (the grad norm, after every launch is queued).
"""
from __future__ import annotations

import math
import sys

import pytest
import torch

from megatron_sr.config import OptimizerConfig
from megatron_sr.optimizer.distributed_optimizer import DistributedOptimizer
from megatron_sr.optimizer.param_buffer import ParamAndGradBuffer, ParamInfo
from megatron_sr.precision import native
from megatron_sr.precision.adamw import SegmentTable, adamw_shard_step, adamw_step
from megatron_sr.precision.strategies import get_strategy
from megatron_sr.random import sr_key
from precision_helpers import DEVICE, TRITON_AVAILABLE, same_bits
from test_precision_adamw import HYPER, STRATEGY_VARIANTS, clone, make_state

needs_triton = pytest.mark.skipif(not TRITON_AVAILABLE, reason="needs CUDA or TRITON_INTERPRET=1")
CPU_BACKENDS = ["eager", pytest.param("native", marks=pytest.mark.skipif(
    not native.available(), reason="needs a C compiler")), pytest.param("triton", marks=needs_triton)]

# Segments of a shard of 3000 elements: odd and even offsets, gaps, an empty and a one-element
# segment, decay on and off, a parameter's tail (large offset).
SEGMENTS = SegmentTable(starts=[0, 5, 700, 701, 702, 2000], lengths=[5, 690, 0, 1, 1200, 999],
                        offsets=[3, 0, 10, (1 << 32) + 1, 64, 7],
                        weight_decay=[True, False, True, False, True, True])
SHARD_NUMEL = 3000


def backend_device(backend: str) -> str:
    """Where a backend's tensors live: Triton on CUDA when there is a GPU (else
    the interpreter on the CPU), the others on the CPU."""
    return DEVICE if backend == "triton" else "cpu"


def on(device: str, state: dict) -> dict:
    """A copy of `state` on `device` (a copy also on the same device: never aliased)."""
    return {name: t.to(device, copy=True) for name, t in state.items()}


def segment_keys(step: int) -> list[int]:
    return [sr_key(42, step, f"p{k}") for k in range(len(SEGMENTS))]


def one_call_per_segment(strategy, state, step: int) -> None:
    for k, (start, length, offset, decays) in enumerate(zip(SEGMENTS.starts, SEGMENTS.lengths,
                                                            SEGMENTS.offsets, SEGMENTS.weight_decay)):
        piece = {name: t[start:start + length] for name, t in state.items()}
        adamw_step(strategy, **piece, **{**HYPER, "weight_decay": HYPER["weight_decay"] if decays else 0.0},
                   step=step, sr_key=segment_keys(step)[k], offset=offset, backend="eager")


def shard_call(strategy, state, step: int, backend: str, grad_scale=None) -> None:
    adamw_shard_step(strategy, **state, segments=SEGMENTS, sr_keys=segment_keys(step), **HYPER, step=step,
                     grad_scale=grad_scale, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name, state_dtype", [("bf16-sr", None), ("bf16-kahan", "fp32"), ("bf16-mixed", None)])
def test_shard_step_equals_one_call_per_segment(backend, name, state_dtype):
    strategy = get_strategy(name, state_dtype)
    reference = make_state(strategy, SHARD_NUMEL, seed=5)
    device = backend_device(backend)
    shard = on(device, reference)
    for step in (1, 2):
        one_call_per_segment(strategy, reference, step)
        shard_call(strategy, shard, step, backend, grad_scale=torch.ones((), device=device) if step == 2 else None)
    for key in reference:
        assert same_bits(shard[key].cpu(), reference[key]), key


@pytest.mark.parametrize("name, state_dtype", STRATEGY_VARIANTS)
def test_backends_agree_on_a_gradient_scale(name, state_dtype):
    strategy = get_strategy(name, state_dtype)
    initial = make_state(strategy, SHARD_NUMEL, seed=6)
    unscaled = clone(initial)
    scale = torch.tensor(0.3712, dtype=torch.float32)
    results = {}
    for backend in ("eager", "native", "triton"):
        if (backend == "native" and not native.available()) or (backend == "triton" and not TRITON_AVAILABLE):
            continue
        results[backend] = on(backend_device(backend), initial)
        shard_call(strategy, results[backend], 3, backend, grad_scale=scale.to(backend_device(backend)))
        results[backend] = on("cpu", results[backend])
    shard_call(strategy, unscaled, 3, "eager")
    assert not same_bits(unscaled["exp_avg"], results["eager"]["exp_avg"])  # the scale is applied
    for backend, state in results.items():
        for key in state:
            assert same_bits(state[key], results["eager"][key]), (backend, key)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_grad_scale_writes_nothing(backend, bad):
    strategy = get_strategy("bf16-kahan")
    device = backend_device(backend)
    state = make_state(strategy, SHARD_NUMEL, seed=7, device=device)
    before = clone(state)
    shard_call(strategy, state, 1, backend, grad_scale=torch.tensor(bad, dtype=torch.float32, device=device))
    for key in state:
        assert same_bits(state[key].cpu(), before[key].cpu()), key


def test_segment_table_rejects_overlaps_and_short_tensors():
    with pytest.raises(ValueError, match="overlaps"):
        SegmentTable([0, 5], [10, 3], [0, 0], [True, True])
    strategy = get_strategy("bf16-sr")
    with pytest.raises(ValueError, match="at least 2999"):
        adamw_shard_step(strategy, **make_state(strategy, 2998), segments=SEGMENTS, sr_keys=segment_keys(1),
                         **HYPER, step=1)
    with pytest.raises(ValueError, match="sr_keys"):
        adamw_shard_step(strategy, **make_state(strategy, SHARD_NUMEL), segments=SEGMENTS, sr_keys=[1],
                         **HYPER, step=1)


# ----- the distributed optimizer's step ------------------------------------------------------

def gpt_400m_params(hidden: int = 8, layers: int = 24, vocab: int = 64):
    """The 292 parameters of the ~400M GPT of bench/gpu_check.sh (24 layers,
    RoPE, untied output layer) in model order, (name, shape, weight decay),
    at hidden size `hidden` instead of 1024."""
    shapes = [("embedding.word_embeddings.weight", (vocab, hidden), True)]
    for layer in range(layers):
        prefix = f"decoder.layers.{layer}."
        for name, shape, decay in (
                ("input_layernorm.weight", (hidden,), False), ("input_layernorm.bias", (hidden,), False),
                ("self_attention.linear_qkv.weight", (3 * hidden, hidden), True),
                ("self_attention.linear_qkv.bias", (3 * hidden,), False),
                ("self_attention.linear_proj.weight", (hidden, hidden), True),
                ("self_attention.linear_proj.bias", (hidden,), False),
                ("pre_mlp_layernorm.weight", (hidden,), False), ("pre_mlp_layernorm.bias", (hidden,), False),
                ("mlp.linear_fc1.weight", (4 * hidden, hidden), True), ("mlp.linear_fc1.bias", (4 * hidden,), False),
                ("mlp.linear_fc2.weight", (hidden, 4 * hidden), True), ("mlp.linear_fc2.bias", (hidden,), False)):
            shapes.append((prefix + name, shape, decay))
    shapes += [("decoder.final_layernorm.weight", (hidden,), False),
               ("decoder.final_layernorm.bias", (hidden,), False),
               ("output_layer.weight", (vocab, hidden), True)]
    assert len(shapes) == 12 * layers + 4  # 292 for the 24 layers of the ~400M GPT
    return shapes


def make_optimizer(strategy_name: str, bucket_size: int, clip_grad: float = 1.0, seed: int = 0,
                   layers: int = 24, device: str = "cpu"):
    strategy = get_strategy(strategy_name)
    generator = torch.Generator().manual_seed(seed)
    params, infos = [], []
    for name, shape, decay in gpt_400m_params(layers=layers):
        params.append(torch.nn.Parameter(
            (torch.randn(shape, generator=generator) * 0.02).to(device=device, dtype=strategy.param_dtype)))
        infos.append(ParamInfo(name=name, sr_tp_rank=None, weight_decay=decay, count_in_grad_norm=True))
    buffer = ParamAndGradBuffer(params, infos, strategy.param_dtype, strategy.grad_dtype,
                                data_parallel_group=None, distributed=True, bucket_size=bucket_size)
    config = OptimizerConfig(precision=strategy_name, lr=1e-2, weight_decay=0.1, clip_grad=clip_grad)
    return DistributedOptimizer(buffer, strategy, config, seed=1234)


def fill_grads(optimizer, seed: int, scale: float = 1e-2) -> None:
    generator = torch.Generator().manual_seed(seed)
    grads = optimizer.buffer.grad_buffer
    grads.copy_((torch.randn(grads.numel(), generator=generator) * scale).to(grads.dtype))


def snapshot(optimizer) -> dict:
    tensors = {"params": optimizer.buffer.param_buffer.cpu().clone()}
    for kind, shards in optimizer.state.items():
        tensors[kind] = torch.cat(shards).cpu()
    return tensors


class MockKernel:
    """Stands in for `kernels._adamw_kernel`: records the grid of each `kernel[grid](...)`
    launch and runs nothing (the kernel's results are tested above and below)."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return lambda *args, **kwargs: None


def count_host_reads(monkeypatch) -> list:
    """Makes every device-to-host read of a tensor made from megatron_sr's code
    (item, tolist, bool, float, int) append its caller to the returned list."""
    reads = []
    for method in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, method)

        def counted(self, *args, _original=original, _method=method):
            caller = sys._getframe(1)
            if caller.f_globals.get("__name__", "").startswith("megatron_sr"):
                reads.append(f"{_method} in {caller.f_code.co_name}")
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, method, counted)
    return reads


@needs_triton
def test_gpt_400m_step_launches_one_kernel_per_bucket_and_reads_the_device_once(monkeypatch):
    from megatron_sr.precision import kernels

    monkeypatch.setenv("MEGATRON_SR_ADAMW_BACKEND", "triton")
    optimizer = make_optimizer("bf16-sr", bucket_size=8000, device=DEVICE)
    num_buckets = len(optimizer.buffer.layout.bucket_ranges)
    assert len(optimizer.buffer.segments) >= 292 and 3 <= num_buckets <= 10
    fill_grads(optimizer, seed=1)
    kernel = MockKernel()
    monkeypatch.setattr(kernels, "_adamw_kernel", kernel)
    reads = count_host_reads(monkeypatch)
    result = optimizer.step(lr=1e-2)
    monkeypatch.undo()
    assert len(kernel.grids) == num_buckets
    # The grids cover every segment's blocks.
    assert sum(grid[0] for grid in kernel.grids) == sum(
        -(-(s.numel + s.param_offset % 2) // kernels.BLOCK_SIZE) for s in optimizer.buffer.segments)
    assert reads == ["tolist in step"]  # the norm and the exit flags, read together
    assert not result.skipped and math.isfinite(result.grad_norm)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["bf16-sr", "bf16-mixed", "bf16-kahan"])
def test_a_nan_step_leaves_params_state_and_step_count_unchanged(monkeypatch, backend, name):
    monkeypatch.setenv("MEGATRON_SR_ADAMW_BACKEND", backend)
    optimizer = make_optimizer(name, bucket_size=1500, layers=2, device=backend_device(backend))
    fill_grads(optimizer, seed=2)
    assert not optimizer.step(lr=1e-2).skipped
    before, step_count = snapshot(optimizer), optimizer.step_count
    fill_grads(optimizer, seed=3)
    segment = optimizer.buffer.segments[len(optimizer.buffer.segments) // 2]
    optimizer.buffer.grad_buffer[segment.buffer_start] = math.nan
    result = optimizer.step(lr=1e-2)
    assert result.skipped and math.isnan(result.grad_norm)
    assert optimizer.step_count == step_count and optimizer.skipped_steps == 1
    after = snapshot(optimizer)
    for key in before:
        assert same_bits(after[key], before[key]), key


def test_distributed_step_matches_eager_on_every_cpu_backend(monkeypatch):
    """The optimizer's shard calls write the same bits on every backend, with
    clipping active (the clip coefficient multiplies the gradients in fp32)."""
    results = {}
    for backend in ("eager", "native", "triton"):
        if (backend == "native" and not native.available()) or (backend == "triton" and not TRITON_AVAILABLE):
            continue
        monkeypatch.setenv("MEGATRON_SR_ADAMW_BACKEND", backend)
        optimizer = make_optimizer("bf16-sr", bucket_size=1500, clip_grad=0.05, layers=2,
                                   device=backend_device(backend))
        norms = []
        for step in range(2):
            fill_grads(optimizer, seed=10 + step)
            norms.append(optimizer.step(lr=1e-2).grad_norm)
        assert norms[0] > 0.05  # clipping is active
        results[backend] = (snapshot(optimizer), norms)
    reference, reference_norms = results.pop("eager")
    for backend, (state, norms) in results.items():
        assert norms == reference_norms
        for key in state:
            assert same_bits(state[key], reference[key]), (backend, key)
