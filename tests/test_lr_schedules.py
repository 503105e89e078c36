"""The learning-rate schedules: exact values at the iterations where each
style's formula changes, the warmup variants, the --min-lr floor, and the
checkpoint round trip with its schedule-mismatch rules."""
import math

import pytest

from megatron_sr.config import OptimizerConfig
from megatron_sr.optimizer.lr_schedules import LRSchedule, LRScheduler, learning_rate_at

# lr 1.0 and min-lr 0.1 make every expected value min + coeff * 0.9.
LR, MIN_LR, TOTAL = 1.0, 0.1, 100


def config(**overrides) -> OptimizerConfig:
    return OptimizerConfig(**{"lr": LR, "min_lr": MIN_LR, "lr_warmup_iters": 10, **overrides})


def lr(iteration, total=TOTAL, **overrides):
    return learning_rate_at(iteration, config(**overrides), total)


def decayed(coeff):
    return MIN_LR + coeff * (LR - MIN_LR)


@pytest.mark.parametrize("style", ["constant", "linear", "cosine", "inverse-square-root"])
def test_warmup_is_linear_from_zero_to_lr(style):
    assert lr(0, lr_decay_style=style) == 0.0  # step 0 runs at lr 0, as in Megatron-LM
    assert lr(5, lr_decay_style=style) == pytest.approx(0.5, abs=1e-15)
    assert lr(10, lr_decay_style=style) == LR


def test_warmup_starts_at_lr_warmup_init():
    assert lr(0, lr_warmup_init=0.5) == 0.5
    assert lr(5, lr_warmup_init=0.5) == 0.75


def test_warmup_fraction_is_a_fraction_of_the_decay_iterations():
    by_fraction = config(lr_warmup_iters=0, lr_warmup_fraction=0.1)
    for i in (0, 3, 10, 11, 55, 100):
        assert learning_rate_at(i, by_fraction, TOTAL) == lr(i)
    assert LRSchedule.from_config(config(lr_warmup_iters=0, lr_warmup_fraction=0.1,
                                         lr_decay_iters=50), TOTAL).warmup_iters == 5.0


def test_no_warmup_starts_at_lr():
    assert lr(0, lr_warmup_iters=0) == LR


def test_constant_stays_at_lr_after_warmup_without_min_lr_floor():
    for i in (11, 50, 100, 1000):
        assert lr(i, lr_decay_style="constant") == LR


@pytest.mark.parametrize("iteration, coeff", [(10, 1.0), (55, 0.5), (82, 0.2), (100, 0.0)])
def test_linear(iteration, coeff):
    assert lr(iteration, lr_decay_style="linear") == pytest.approx(decayed(coeff), abs=1e-15)


@pytest.mark.parametrize("iteration, coeff",
                         [(10, 1.0), (40, 0.75), (55, 0.5), (70, 0.25), (100, 0.0)])
def test_cosine(iteration, coeff):
    assert lr(iteration, lr_decay_style="cosine") == pytest.approx(decayed(coeff), abs=1e-15)


@pytest.mark.parametrize("iteration, expected", [(11, math.sqrt(10 / 11)),
                                                  (40, 0.5), (250, 0.2), (1000, 0.1)])
def test_inverse_square_root(iteration, expected):
    # lr x sqrt(warmup / i), floored at min-lr: sqrt(10/40) = 0.5, sqrt(10/1000) = 0.1.
    got = lr(iteration, total=2000, lr_decay_style="inverse-square-root")
    assert got == pytest.approx(expected, abs=1e-15)
    assert lr(1990, total=2000, lr_decay_style="inverse-square-root") == MIN_LR


@pytest.mark.parametrize("wsd_style, iteration, coeff", [
    ("linear", 90, 0.5), ("linear", 95, 0.25),
    ("cosine", 90, 0.5), ("cosine", 85, 0.5 * (math.cos(math.pi / 4) + 1)),
    ("exponential", 90, 2 * 0.5 ** 0.5 - 1), ("exponential", 100, 0.0),
    ("minus_sqrt", 85, 0.5), ("minus_sqrt", 100, 0.0),
])
def test_wsd_decays_during_its_last_iterations(wsd_style, iteration, coeff):
    kw = dict(lr_decay_style="WSD", lr_wsd_decay_iters=20, lr_wsd_decay_style=wsd_style)
    for stable in (11, 50, 80):
        assert lr(stable, **kw) == LR
    assert lr(iteration, **kw) == pytest.approx(decayed(coeff), abs=1e-15)


@pytest.mark.parametrize("style", ["linear", "cosine", "inverse-square-root"])
def test_min_lr_after_the_decay(style):
    for i in (61, 100, 10_000):
        assert lr(i, lr_decay_style=style, lr_decay_iters=60) == MIN_LR


def test_wsd_min_lr_after_the_decay():
    assert lr(101, lr_decay_style="WSD", lr_wsd_decay_iters=20) == MIN_LR


def test_decay_iters_default_to_the_run_length():
    assert lr(55, total=100) == lr(55, total=1000, lr_decay_iters=100)


@pytest.mark.parametrize("overrides, flags", [
    (dict(lr_decay_style="WSD"), ["--lr-wsd-decay-iters"]),
    (dict(lr_decay_style="WSD", lr_wsd_decay_iters=91), ["--lr-wsd-decay-iters"]),
    (dict(lr_wsd_decay_iters=10), ["--lr-wsd-decay-iters", "--lr-decay-style"]),
    (dict(lr_warmup_fraction=0.1), ["--lr-warmup-fraction", "--lr-warmup-iters"]),
    (dict(lr_warmup_iters=0, lr_warmup_fraction=1.0), ["--lr-warmup-fraction"]),
    (dict(lr_warmup_iters=100), ["--lr-warmup-iters", "--lr-decay-iters"]),
    (dict(min_lr=2.0), ["--min-lr", "--lr"]),
    (dict(lr_decay_style="exp"), ["--lr-decay-style"]),
    (dict(override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=True),
     ["--override-opt-param-scheduler", "--use-checkpoint-opt-param-scheduler"]),
])
def test_bad_schedules_name_the_flags(overrides, flags):
    with pytest.raises(ValueError) as err:
        LRSchedule.from_config(config(**overrides), TOTAL)
    for flag in flags:
        assert flag in str(err.value)


def test_scheduler_steps_through_the_schedule():
    scheduler = LRScheduler(config(), TOTAL)
    assert scheduler.get_lr() == 0.0
    assert scheduler.step() == lr(1)
    assert scheduler.step(9) == LR
    assert scheduler.iteration == 10


def test_state_dict_round_trip_resumes_the_same_curve():
    first = LRScheduler(config(lr_decay_style="cosine"), TOTAL)
    first.step(37)
    resumed = LRScheduler(config(lr_decay_style="cosine"), TOTAL)
    resumed.load_state_dict(first.state_dict())
    assert resumed.iteration == 37
    for _ in range(80):
        assert resumed.step() == first.step()


def test_changed_schedule_on_resume_is_an_error_naming_the_flag():
    saved = LRScheduler(config(), TOTAL)
    saved.step(20)
    resumed = LRScheduler(config(lr=2.0), TOTAL)
    with pytest.raises(ValueError, match="--lr gives max_lr=2.0 but the checkpoint .* 1.0"):
        resumed.load_state_dict(saved.state_dict())


def test_override_keeps_the_flags_and_use_checkpoint_keeps_the_checkpoint():
    saved = LRScheduler(config(), TOTAL)
    saved.step(20)
    override = LRScheduler(config(lr=2.0, override_opt_param_scheduler=True), TOTAL)
    override.load_state_dict(saved.state_dict())
    assert override.iteration == 20 and override.get_lr() == lr(20, lr=2.0)
    use_ckpt = LRScheduler(config(lr=2.0, use_checkpoint_opt_param_scheduler=True), TOTAL)
    use_ckpt.load_state_dict(saved.state_dict())
    assert use_ckpt.iteration == 20 and use_ckpt.get_lr() == saved.get_lr()


def test_incomplete_state_is_an_error():
    state = LRScheduler(config(), TOTAL).state_dict()
    del state["decay_style"]
    with pytest.raises(ValueError, match="lacks.*decay_style"):
        LRScheduler(config(), TOTAL).load_state_dict(state)
