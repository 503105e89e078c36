"""The fused AdamW step (`megatron_sr.precision.adamw.adamw_step`) on every
strategy and backend: accuracy, bit-identity, shard invariance, stagnation."""
import math

import pytest
import torch

from megatron_sr.precision.adamw import adamw_step
from megatron_sr.precision.rounding import round_nearest, stochastic_round
from megatron_sr.precision.strategies import get_strategy
from megatron_sr.random import sr_key
from precision_helpers import DEVICE, TRITON_AVAILABLE, same_bits

needs_triton = pytest.mark.skipif(not TRITON_AVAILABLE, reason="needs CUDA or TRITON_INTERPRET=1")

STRATEGY_VARIANTS = [("fp32", None), ("amp", None), ("bf16-mixed", None), ("bf16", None), ("bf16-sr", None),
                     ("bf16-sr", "fp32"), ("bf16-kahan", None), ("bf16-kahan", "fp32")]
HYPER = dict(lr=3e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def make_state(strategy, numel, seed=0, device="cpu"):
    """Random param, grad, m, v (and master / kahan) in the strategy's dtypes."""
    generator = torch.Generator().manual_seed(seed)

    def randn(scale):
        return torch.randn(numel, generator=generator) * scale

    weight = randn(1.0)
    state = dict(param=weight.to(strategy.param_dtype), grad=randn(1e-2).to(strategy.grad_dtype),
                 exp_avg=randn(1e-2).to(strategy.exp_avg_dtype),
                 exp_avg_sq=randn(1e-2).square().to(strategy.exp_avg_sq_dtype))
    if strategy.master_dtype is not None:
        state["master"] = weight.to(strategy.master_dtype)
    if strategy.kahan_dtype is not None:
        state["kahan"] = randn(1e-4).to(strategy.kahan_dtype)
    return {name: t.to(device) for name, t in state.items()}


def clone(state):
    return {name: t.clone() for name, t in state.items()}


def run_steps(strategy, state, steps, offset=0, backend="eager", first_step=1):
    for step in range(first_step, first_step + steps):
        adamw_step(strategy, **state, **HYPER, step=step, sr_key=sr_key(42, step, "w"), offset=offset,
                   backend=backend)


def reference_step(state, step):
    """AdamW in float64 from the stored values; returns (weight, m, v)."""
    g = state["grad"].double()
    m = HYPER["beta1"] * state["exp_avg"].double() + (1 - HYPER["beta1"]) * g
    v = HYPER["beta2"] * state["exp_avg_sq"].double() + (1 - HYPER["beta2"]) * g * g
    m_hat, v_hat = m / (1 - HYPER["beta1"] ** step), v / (1 - HYPER["beta2"] ** step)
    weight = state.get("master", state["param"]).double()
    weight = weight * (1 - HYPER["lr"] * HYPER["weight_decay"]) - HYPER["lr"] * m_hat / (v_hat.sqrt() + HYPER["eps"])
    return weight, m, v


def bf16_bracket(x64):
    """The bf16 values just below and just above each float64 value (by magnitude),
    after its rounding to fp32."""
    x = x64.float()
    down_bits = x.view(torch.int32) & -65536
    return down_bits.view(torch.float32), (down_bits + 65536).view(torch.float32)


@pytest.mark.parametrize("name", ["fp32", "amp", "bf16-mixed"])
def test_fp32_updates_match_float64_reference(name):
    strategy = get_strategy(name)
    state = make_state(strategy, 4099)
    expected_weight, expected_m, expected_v = reference_step(state, step=3)
    run_steps(strategy, state, 1, first_step=3)
    stored = state.get("master", state["param"])
    # Absolute tolerances: 1e-6 of the size of the terms that m and w sum (cancellation).
    torch.testing.assert_close(stored.double(), expected_weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(state["exp_avg"].double(), expected_m, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(state["exp_avg_sq"].double(), expected_v, rtol=1e-6, atol=1e-12)
    if name == "bf16-mixed":
        assert same_bits(state["param"], round_nearest(state["master"]))


@pytest.mark.parametrize("name", ["bf16", "bf16-sr", "bf16-kahan"])
def test_bf16_updates_round_the_float64_reference(name):
    """Every stored bf16 value is one of the two bf16 neighbours of the exact
    update; RTN picks the nearer one; Kahan keeps the residual."""
    strategy = get_strategy(name)
    state = make_state(strategy, 4099)
    exact_weight, exact_m, exact_v = reference_step(state, step=5)
    if name == "bf16-kahan":
        exact_weight = exact_weight + state["kahan"].double()
    run_steps(strategy, state, 1, first_step=5)
    rounded_to_nearest = {"bf16": ("param", "exp_avg", "exp_avg_sq"), "bf16-kahan": ("param",),
                          "bf16-sr": ()}[name]
    for key, exact in (("param", exact_weight), ("exp_avg", exact_m), ("exp_avg_sq", exact_v)):
        stored = state[key]
        down, up = bf16_bracket(exact.abs())
        assert ((stored.float().abs() == down) | (stored.float().abs() == up)).all(), key
        if key in rounded_to_nearest:  # the nearer neighbour (slack: the fp32 arithmetic)
            half_gap = (up - down).double() / 2 * (1 + 2.0 ** -10)
            assert ((stored.double() - exact).abs() <= half_gap).all(), key
    if name == "bf16-kahan":
        total = state["param"].double() + state["kahan"].double()
        assert (total - exact_weight).abs().le(exact_weight.abs() * 2.0 ** -15).all()


def test_bf16_sr_update_is_unbiased():
    """Many copies of one element: the mean of the SR-written parameter, m and v
    equals the exact update within a binomial bound."""
    strategy, n = get_strategy("bf16-sr"), 40_000
    state = {name: t[:1].expand(n).contiguous() for name, t in make_state(strategy, 1, seed=9).items()}
    exact = reference_step(state, step=2)
    run_steps(strategy, state, 1, first_step=2)
    for stored, exact_values in zip((state["param"], state["exp_avg"], state["exp_avg_sq"]), exact):
        down, up = bf16_bracket(exact_values[:1].abs())
        ulp = (up - down).item()
        mean_error = abs(stored.double().abs().mean().item() - exact_values[0].abs().item())
        assert mean_error <= 5 * ulp / (2 * math.sqrt(n)) + 1e-3 * ulp


@needs_triton
@pytest.mark.parametrize("name, state_dtype", STRATEGY_VARIANTS)
@pytest.mark.parametrize("offset", [0, 7, (1 << 32) + 3])
def test_torch_and_triton_paths_are_bit_identical(name, state_dtype, offset):
    strategy = get_strategy(name, state_dtype)
    torch_state = make_state(strategy, 2051, seed=offset % 13)
    triton_state = {k: t.to(DEVICE, copy=True) for k, t in torch_state.items()}
    run_steps(strategy, torch_state, 2, offset=offset, backend="eager")
    run_steps(strategy, triton_state, 2, offset=offset, backend="triton")
    for key in torch_state:
        assert same_bits(triton_state[key].cpu(), torch_state[key]), key


@pytest.mark.parametrize("backend", ["eager", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("name", ["bf16-sr", "bf16-kahan"])
def test_shards_with_offsets_equal_one_call(backend, name):
    strategy, base_offset = get_strategy(name), 1001
    whole = make_state(strategy, 3001, seed=4, device=DEVICE if backend == "triton" else "cpu")
    sharded = clone(whole)
    run_steps(strategy, whole, 2, offset=base_offset, backend=backend)
    bounds = [0, 1, 750, 751, 2048, 3001]
    for step in (1, 2):
        for start, end in zip(bounds, bounds[1:]):
            shard = {k: t[start:end] for k, t in sharded.items()}
            adamw_step(strategy, **shard, **HYPER, step=step, sr_key=sr_key(42, step, "w"),
                       offset=base_offset + start, backend=backend)
    for key in whole:
        assert same_bits(sharded[key], whole[key]), key


def in_buffer_at(state, start):
    """Copies of the state tensors placed at element `start` of larger
    buffers, as the distributed optimizer's segments are."""
    placed = {}
    for key, tensor in state.items():
        buffer = torch.zeros((start + tensor.numel() + 4) // 4 * 4, dtype=tensor.dtype)
        placed[key] = buffer[start:start + tensor.numel()]
        placed[key].copy_(tensor)
    return placed


def compiled_matches_eager(strategy, numel, offset, buffer_start, seed):
    eager = make_state(strategy, numel, seed=seed)
    eager["param"][:3] = torch.tensor([math.nan, math.inf, 0.0])
    compiled = in_buffer_at(eager, buffer_start)
    run_steps(strategy, eager, 2, offset=offset, backend="eager")
    run_steps(strategy, compiled, 2, offset=offset, backend="compiled")
    for key in eager:
        assert same_bits(compiled[key], eager[key]), key


@pytest.mark.slow  # the first torch.compile of a process costs ~20 CPU-s (inductor, a C++ build)
@pytest.mark.parametrize("offset, buffer_start", [
    (0, 0),  # all pairs
    ((1 << 32) + 1, 1),  # a lone first element, then aligned pairs
    (3, 0),  # pairs not aligned in storage: element by element
])
def test_compiled_path_is_bit_identical_to_eager(offset, buffer_start):
    compiled_matches_eager(get_strategy("bf16-sr"), 5003, offset, buffer_start, seed=2)


@pytest.mark.slow
@pytest.mark.parametrize("name, state_dtype", [v for v in STRATEGY_VARIANTS if v != ("bf16-sr", None)])
def test_compiled_path_is_bit_identical_to_eager_for_every_strategy(name, state_dtype):
    strategy = get_strategy(name, state_dtype)
    compiled_matches_eager(strategy, 1029, offset=5, buffer_start=1, seed=3)


def test_small_increments_stagnate_under_rtn_and_accumulate_under_sr():
    nearest = stochastic = torch.ones(1000, dtype=torch.bfloat16)
    for step in range(1000):
        nearest = round_nearest(nearest.float() + 1e-3)
        stochastic = stochastic_round(stochastic.float() + 1e-3, sr_key(0, step, "x"))
    assert (nearest == 1.0).all()
    assert abs(stochastic.float().mean().item() - 2.0) < 0.02
    assert (stochastic.float() - 2.0).abs().max().item() < 0.3


def test_bf16_second_moment_tracks_fp32_under_sr_and_freezes_under_rtn():
    """v = 1, g^2 = 2, beta2 = 0.999: each step adds 1e-3, a quarter of a bf16 ulp."""
    n, steps = 512, 1000
    finals = {}
    for name in ("fp32", "bf16", "bf16-sr"):
        strategy = get_strategy(name)
        state = dict(param=torch.zeros(n, dtype=strategy.param_dtype),
                     grad=torch.full((n,), math.sqrt(2.0)).to(strategy.grad_dtype),
                     exp_avg=torch.zeros(n, dtype=strategy.exp_avg_dtype),
                     exp_avg_sq=torch.ones(n, dtype=strategy.exp_avg_sq_dtype))
        for step in range(1, steps + 1):
            adamw_step(strategy, **state, lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                       step=step, sr_key=sr_key(0, step, "v"), backend="eager")
        finals[name] = state["exp_avg_sq"].double()
    grad_squared = float(torch.tensor(math.sqrt(2.0)).to(torch.bfloat16)) ** 2
    expected = grad_squared - (grad_squared - 1.0) * 0.999 ** steps
    assert finals["fp32"].sub(expected).abs().max() < 1e-3 * expected
    assert (finals["bf16"] == 1.0).all()
    assert abs(finals["bf16-sr"].mean().item() - finals["fp32"].mean().item()) < 0.01 * expected


def test_bad_inputs_name_the_tensor():
    strategy = get_strategy("bf16-sr")
    good = make_state(strategy, 10)

    def call(**changes):
        adamw_step(strategy, **{**good, **changes}, **HYPER, step=1, sr_key=1, backend="eager")

    with pytest.raises(TypeError, match="grad has dtype torch.float32"):
        call(grad=good["grad"].float())
    with pytest.raises(TypeError, match="exp_avg_sq has dtype"):
        call(exp_avg_sq=good["exp_avg_sq"].float())
    with pytest.raises(ValueError, match="exp_avg has shape"):
        call(exp_avg=good["exp_avg"][:9])
    with pytest.raises(ValueError, match="grad is on meta"):
        call(grad=torch.empty(10, dtype=torch.bfloat16, device="meta"))
    with pytest.raises(ValueError, match="kahan"):
        call(kahan=torch.zeros(10, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="param must be contiguous"):
        call(param=torch.zeros(20, dtype=torch.bfloat16)[::2])
    with pytest.raises(ValueError, match="master"):
        without_master = make_state(get_strategy("bf16-mixed"), 10)
        del without_master["master"]
        adamw_step("bf16-mixed", **without_master, **HYPER, step=1, sr_key=1)
    with pytest.raises(ValueError, match="offset"):
        adamw_step(strategy, **good, **HYPER, step=1, sr_key=1, offset=-1)
    with pytest.raises(ValueError, match="backend"):
        adamw_step(strategy, **good, **HYPER, step=1, sr_key=1, backend="cuda-graphs")
