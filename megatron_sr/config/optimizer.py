"""OptimizerConfig: AdamW, the precision strategy, the LR schedule and gradient
handling, each field with its flag."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_sr.config.flags import check_fields, flag
from megatron_sr.optimizer.lr_schedules import DECAY_STYLES, WSD_DECAY_STYLES
from megatron_sr.precision.strategies import DEFAULT_STRATEGY, GRAD_ROUNDINGS, STRATEGIES


@dataclass
class OptimizerConfig:
    """AdamW, the precision strategy, LR schedule and gradient handling.

    --precision and --grad-reduce-dtype also come from Megatron's switches
    (--bf16, --grad-reduce-in-bf16, ...: `megatron_sr.config.megatron_compat`);
    the --lr-*-iters fields also from --lr-*-samples (`megatron_sr.config.derived`).
    """

    precision: str = flag("--precision", group="mixed precision", default=DEFAULT_STRATEGY,
                          choices=tuple(STRATEGIES),
                          help=f"Precision strategy (default {DEFAULT_STRATEGY}); see "
                               f"docs/DESIGN.md.")
    optimizer_state_dtype: Optional[str] = flag(
        "--optimizer-state-dtype", group="mixed precision", default=None, choices=("bf16", "fp32"),
        help="Adam m and v dtype for the pure-bf16 strategies (default bf16).")
    grad_reduce_dtype: Optional[str] = flag(
        "--grad-reduce-dtype", group="mixed precision", default=None, choices=("bf16", "fp32"),
        help="Gradient buffer and reduction dtype (default: the strategy's).")
    grad_accumulation_rounding: str = flag(
        "--grad-accumulation-rounding", group="mixed precision", default="nearest",
        choices=GRAD_ROUNDINGS,
        help="How each micro-batch's gradient is rounded when added into a bf16 gradient "
             "buffer: nearest, or stochastic (unbiased; needs the bf16 buffer).")
    lr: float = flag("--lr", group="learning rate", default=1e-4, required=True,
                     interval="[0, inf)", help="Peak learning rate (required).")
    min_lr: float = flag("--min-lr", group="learning rate", default=0.0, interval="[0, inf)",
                         help="The decay ends here; floor of every style except constant.")
    weight_decay: float = flag(
        "--weight-decay", group="regularization", default=0.01, interval="[0, inf)",
        help="AdamW decoupled weight decay (not applied to biases and norms).")
    adam_beta1: float = flag("--adam-beta1", group="regularization", default=0.9,
                             interval="[0, 1)")
    adam_beta2: float = flag("--adam-beta2", group="regularization", default=0.999,
                             interval="[0, 1)")
    adam_eps: float = flag("--adam-eps", group="regularization", default=1e-8,
                           interval="(0, inf)")
    clip_grad: float = flag("--clip-grad", group="regularization", default=1.0,
                            interval="[0, inf)", help="Global gradient-norm clip; 0 disables.")
    lr_decay_style: str = flag("--lr-decay-style", group="learning rate", default="linear",
                               choices=DECAY_STYLES)
    lr_decay_iters: Optional[int] = flag(
        "--lr-decay-iters", group="learning rate", default=None,
        help="Iterations from 0 to the end of the decay. Default: the run's length.")
    lr_warmup_iters: int = flag("--lr-warmup-iters", group="learning rate", default=0,
                                help="Linear warmup iterations.")
    lr_warmup_fraction: Optional[float] = flag(
        "--lr-warmup-fraction", group="learning rate", default=None, interval="[0, 1)",
        help="Warmup as a fraction of the decay iterations, in [0, 1).")
    lr_wsd_decay_iters: Optional[int] = flag(
        "--lr-wsd-decay-iters", group="learning rate", default=None,
        help="WSD: length of the final decay, which ends at --lr-decay-iters.")
    lr_wsd_decay_style: str = flag("--lr-wsd-decay-style", group="learning rate",
                                   default="linear", choices=WSD_DECAY_STYLES)
    lr_warmup_init: float = flag("--lr-warmup-init", group="learning rate", default=0.0,
                                 interval="[0, inf)",
                                 help="Learning rate at iteration 0 of the warmup.")
    # On resume, a schedule that differs from the checkpoint's is an error unless one
    # side is chosen: the flags (override) or the checkpoint (use_checkpoint).
    override_opt_param_scheduler: bool = flag(
        "--override-opt-param-scheduler", group="learning rate", default=False,
        help="On resume, keep this run's schedule flags over the checkpoint's.")
    use_checkpoint_opt_param_scheduler: bool = flag(
        "--use-checkpoint-opt-param-scheduler", group="learning rate", default=False,
        help="On resume, continue the checkpoint's schedule, ignoring these flags.")
    # The word embedding and output layer follow the same schedule shape between
    # these (Megatron's --decoupled-lr / --decoupled-min-lr); None: lr / min_lr.
    decoupled_lr: Optional[float] = flag(
        "--decoupled-lr", group="learning rate", default=None, interval="[0, inf)",
        help="Peak learning rate of the input embedding and output layer.")
    decoupled_min_lr: Optional[float] = flag(
        "--decoupled-min-lr", group="learning rate", default=None, interval="[0, inf)",
        help="--min-lr of the input embedding and output layer.")

    def __post_init__(self):
        check_fields(self)
