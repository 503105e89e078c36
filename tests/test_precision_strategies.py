"""The strategy table of docs/DESIGN.md, as `megatron_sr.precision.strategies` holds it."""
import dataclasses

import pytest
import torch

from megatron_sr.precision.names import STRATEGY_NAMES
from megatron_sr.precision.strategies import STRATEGIES, get_strategy

F32, BF16 = torch.float32, torch.bfloat16


@pytest.mark.parametrize("name, param, grad, master, state, kahan, param_rounding, bytes_per_param", [
    ("fp32", F32, F32, None, F32, None, "nearest", 16),
    ("amp", F32, F32, None, F32, None, "nearest", 16),
    ("bf16-mixed", BF16, F32, F32, F32, None, "nearest", 18),
    ("bf16", BF16, BF16, None, BF16, None, "nearest", 8),
    ("bf16-sr", BF16, BF16, None, BF16, None, "stochastic", 8),
    ("bf16-kahan", BF16, BF16, None, BF16, BF16, "kahan", 10),
])
def test_table_matches_design(name, param, grad, master, state, kahan, param_rounding, bytes_per_param):
    strategy = get_strategy(name)
    assert (strategy.param_dtype, strategy.grad_dtype, strategy.master_dtype) == (param, grad, master)
    assert strategy.exp_avg_dtype == strategy.exp_avg_sq_dtype == state
    assert strategy.kahan_dtype == kahan
    assert strategy.param_rounding == param_rounding
    assert strategy.bytes_per_param == bytes_per_param


def test_only_amp_autocasts_and_the_default_is_listed():
    assert [name for name, s in STRATEGIES.items() if s.autocast] == ["amp"]
    assert get_strategy("bf16-sr").uses_random_bits and not get_strategy("bf16").uses_random_bits


def test_optimizer_state_dtype_for_pure_strategies():
    ablation = get_strategy("bf16-sr", "fp32")
    assert ablation.exp_avg_dtype == ablation.exp_avg_sq_dtype == F32
    assert ablation.bytes_per_param == 12
    assert get_strategy("bf16-sr", "bf16") == get_strategy("bf16-sr")
    assert STRATEGIES["bf16-sr"].exp_avg_dtype == BF16  # the table itself is untouched


@pytest.mark.parametrize("name", ["fp32", "amp", "bf16-mixed"])
def test_optimizer_state_dtype_rejected_for_mixed_strategies(name):
    with pytest.raises(ValueError, match="--optimizer-state-dtype"):
        get_strategy(name, "bf16")


def test_bad_names_name_the_flag():
    with pytest.raises(ValueError, match="--precision"):
        get_strategy("fp16")
    with pytest.raises(ValueError, match="--optimizer-state-dtype"):
        get_strategy("bf16-sr", "fp16")


def test_strategies_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_strategy("bf16-sr").param_dtype = F32


def test_torch_free_names_list_the_table_in_order():
    """tools/compare_runs.py orders and labels runs by `names.STRATEGY_NAMES`, without torch."""
    assert STRATEGY_NAMES == tuple(STRATEGIES)
