"""Learning-rate schedules: linear warmup, then a decay to --min-lr.

The curve is Megatron-LM's (`OptimizerParamScheduler`), so a run here and a
Megatron run with the same flags log the same learning rates:

- `iteration` counts the optimizer steps already taken; the step with index
  `i` (0-based) uses `learning_rate_at(i, ...)`.
- warmup (`--lr-warmup-iters W`, or `--lr-warmup-fraction f` giving
  W = f x decay iterations, possibly fractional): for i <= W the rate rises
  linearly from --lr-warmup-init (default 0, so step 0 runs at 0) to --lr;
- then, up to --lr-decay-iters D (default: the training length):
    constant             --lr (no decay, no --min-lr floor)
    linear               from --lr at W to --min-lr at D
    cosine               half a cosine from --lr at W to --min-lr at D
    inverse-square-root  --lr x sqrt(max(W,1) / max(i,1)), floored at --min-lr
    WSD                  --lr until D - --lr-wsd-decay-iters, then to --min-lr at D
                         along --lr-wsd-decay-style (linear, cosine, exponential,
                         minus_sqrt)
- after D: --min-lr.

`learning_rate_at` is the pure core; `LRScheduler` keeps the iteration and
checkpoints it. Nothing here touches an optimizer: the training loop passes
`scheduler.get_lr()` to the AdamW step.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # megatron_sr.config imports DECAY_STYLES from here
    from megatron_sr.config import OptimizerConfig

DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")

# The flag that sets each field of LRSchedule, for error messages.
_FLAGS = {
    "max_lr": "--lr",
    "min_lr": "--min-lr",
    "warmup_init_lr": "--lr-warmup-init",
    "warmup_iters": "--lr-warmup-iters/--lr-warmup-fraction",
    "decay_iters": "--lr-decay-iters",
    "decay_style": "--lr-decay-style",
    "wsd_decay_iters": "--lr-wsd-decay-iters",
    "wsd_decay_style": "--lr-wsd-decay-style",
}


@dataclass(frozen=True)
class LRSchedule:
    """A fully resolved schedule: every default filled in, every value checked.

    `warmup_iters` is a float because --lr-warmup-fraction gives a fraction of
    `decay_iters`. `wsd_decay_iters` is None unless `decay_style` is "WSD".
    """

    max_lr: float
    min_lr: float
    warmup_init_lr: float
    warmup_iters: float
    decay_iters: int
    decay_style: str
    wsd_decay_iters: Optional[int]
    wsd_decay_style: str

    @classmethod
    def from_config(cls, config: OptimizerConfig, total_iters: int) -> "LRSchedule":
        """Resolves `config`'s schedule for a run of `total_iters` optimizer steps.

        Raises ValueError naming the flag at fault. `megatron_sr.config.arguments` calls
        this during validation, so a bad schedule fails before training starts.
        """
        if config.override_opt_param_scheduler and config.use_checkpoint_opt_param_scheduler:
            raise ValueError("--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler "
                             "are exclusive: give one")
        if config.lr_decay_style not in DECAY_STYLES:
            raise ValueError(f"--lr-decay-style {config.lr_decay_style!r}: choose one of "
                             f"{', '.join(DECAY_STYLES)}")
        if config.lr_wsd_decay_style not in WSD_DECAY_STYLES:
            raise ValueError(f"--lr-wsd-decay-style {config.lr_wsd_decay_style!r}: choose one of "
                             f"{', '.join(WSD_DECAY_STYLES)}")
        if not all(0 <= rate < math.inf for rate in (config.lr, config.min_lr,
                                                     config.lr_warmup_init)):
            raise ValueError(f"--lr ({config.lr}), --min-lr ({config.min_lr}) and --lr-warmup-init "
                             f"({config.lr_warmup_init}) must be finite and >= 0")
        if config.min_lr > config.lr:
            raise ValueError(f"--min-lr ({config.min_lr}) is greater than --lr ({config.lr})")
        if total_iters < 1:
            raise ValueError(f"the run must be at least one iteration long (--train-iters, or "
                             f"--train-samples / --global-batch-size), got {total_iters}")
        decay_iters = total_iters if config.lr_decay_iters is None else config.lr_decay_iters
        if decay_iters < 1:
            raise ValueError(f"--lr-decay-iters must be >= 1, got {decay_iters}")

        fraction = config.lr_warmup_fraction
        if fraction is not None:
            if config.lr_warmup_iters != 0:
                raise ValueError(f"--lr-warmup-fraction ({fraction}) and --lr-warmup-iters "
                                 f"({config.lr_warmup_iters}) are exclusive: give one")
            if not 0.0 <= fraction < 1.0:
                raise ValueError(f"--lr-warmup-fraction must be in [0, 1), got {fraction}")
            warmup_iters = fraction * decay_iters
        else:
            if config.lr_warmup_iters < 0:
                raise ValueError(f"--lr-warmup-iters must be >= 0, got {config.lr_warmup_iters}")
            warmup_iters = float(config.lr_warmup_iters)
        if warmup_iters >= decay_iters:
            raise ValueError(f"warmup ({warmup_iters:g} iterations from --lr-warmup-iters/"
                             f"--lr-warmup-fraction) must be shorter than the decay "
                             f"(--lr-decay-iters, default the training length: {decay_iters})")

        wsd_decay_iters = config.lr_wsd_decay_iters
        if config.lr_decay_style == "WSD":
            if wsd_decay_iters is None:
                raise ValueError("--lr-decay-style WSD needs --lr-wsd-decay-iters "
                                 "(the length of the final decay)")
            if not 1 <= wsd_decay_iters <= decay_iters - warmup_iters:
                raise ValueError(
                    f"--lr-wsd-decay-iters ({wsd_decay_iters}) must be in [1, --lr-decay-iters - "
                    f"warmup] = [1, {decay_iters - warmup_iters:g}]")
        elif wsd_decay_iters is not None:
            raise ValueError(f"--lr-wsd-decay-iters only applies to --lr-decay-style WSD, "
                             f"not {config.lr_decay_style}")

        return cls(max_lr=config.lr, min_lr=config.min_lr, warmup_init_lr=config.lr_warmup_init,
                   warmup_iters=warmup_iters, decay_iters=decay_iters,
                   decay_style=config.lr_decay_style, wsd_decay_iters=wsd_decay_iters,
                   wsd_decay_style=config.lr_wsd_decay_style)

    def lr_at(self, iteration: int) -> float:
        """The learning rate of the optimizer step with 0-based index `iteration`."""
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        if self.warmup_iters > 0 and iteration <= self.warmup_iters:
            rise = (self.max_lr - self.warmup_init_lr) * iteration / self.warmup_iters
            return self.warmup_init_lr + rise
        if self.decay_style == "constant":
            return self.max_lr
        if iteration > self.decay_iters:
            return self.min_lr
        if self.decay_style == "inverse-square-root":
            scale = math.sqrt(max(self.warmup_iters, 1.0) / max(iteration, 1))
            return max(self.min_lr, self.max_lr * scale)
        if self.decay_style == "WSD":
            coeff = self._wsd_coeff(iteration)
        else:
            ratio = (iteration - self.warmup_iters) / (self.decay_iters - self.warmup_iters)
            if self.decay_style == "linear":
                coeff = 1.0 - ratio
            else:  # cosine
                coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def _wsd_coeff(self, iteration: int) -> float:
        """1 during the stable phase, falling to 0 at `decay_iters` during the last
        `wsd_decay_iters` steps."""
        anneal_start = self.decay_iters - self.wsd_decay_iters
        if iteration <= anneal_start:
            return 1.0
        ratio = (iteration - anneal_start) / self.wsd_decay_iters
        if self.wsd_decay_style == "linear":
            return 1.0 - ratio
        if self.wsd_decay_style == "cosine":
            return 0.5 * (math.cos(math.pi * ratio) + 1.0)
        if self.wsd_decay_style == "exponential":
            return 2.0 * 0.5 ** ratio - 1.0
        return 1.0 - math.sqrt(ratio)  # minus_sqrt


def learning_rate_at(iteration: int, config: OptimizerConfig, total_iters: int) -> float:
    """The learning rate of step `iteration` (0-based) in a run of `total_iters`
    steps configured by `config`; see the module docstring for the curve."""
    return LRSchedule.from_config(config, total_iters).lr_at(iteration)


class LRScheduler:
    """The schedule plus the number of optimizer steps taken so far.

    Usage in the training loop: `lr = scheduler.get_lr()` for the step about to
    run, then `scheduler.step()` once the step is done (skipped steps included,
    as in Megatron). `state_dict()` goes into the checkpoint.
    """

    def __init__(self, config: OptimizerConfig, total_iters: int, iteration: int = 0):
        self.schedule = LRSchedule.from_config(config, total_iters)
        self.iteration = iteration
        self._override = config.override_opt_param_scheduler
        self._use_checkpoint = config.use_checkpoint_opt_param_scheduler

    def get_lr(self) -> float:
        """The learning rate of the step with index `self.iteration`."""
        return self.schedule.lr_at(self.iteration)

    def step(self, increment: int = 1) -> float:
        """Counts `increment` finished steps; returns the learning rate of the next one."""
        self.iteration += increment
        return self.get_lr()

    def state_dict(self) -> dict:
        """Plain Python values: the iteration and the resolved schedule."""
        return {"iteration": self.iteration, **asdict(self.schedule)}

    def load_state_dict(self, state: dict) -> None:
        """Resumes at the checkpoint's iteration.

        Which schedule continues: with --override-opt-param-scheduler the one
        from this run's flags, with --use-checkpoint-opt-param-scheduler the
        checkpoint's; with neither, the two must be equal, else ValueError naming
        the first flag that differs.
        """
        missing = [key for key in ("iteration", *_FLAGS) if key not in state]
        if missing:
            raise ValueError(f"the checkpoint's learning-rate scheduler state lacks {missing}")
        saved = LRSchedule(**{key: state[key] for key in _FLAGS})
        if self._use_checkpoint:
            self.schedule = saved
        elif not self._override:
            for key, flag in _FLAGS.items():
                here, there = getattr(self.schedule, key), getattr(saved, key)
                if here != there:
                    raise ValueError(
                        f"{flag} gives {key}={here!r} but the checkpoint was trained with {there!r}; "
                        f"pass --override-opt-param-scheduler to keep this run's schedule or "
                        f"--use-checkpoint-opt-param-scheduler to continue the checkpoint's")
        self.iteration = int(state["iteration"])
