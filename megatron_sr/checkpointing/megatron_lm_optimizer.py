"""A Megatron-LM torch_dist checkpoint's optimizer state, imported to resume.

What megatron-core's `dist_checkpointing.save` leaves of the optimizer (read
by `megatron_torch_dist.read(..., optimizer=True)`), in model space, one
global tensor per parameter and kind, keyed `optimizer.state.<kind>.<model
key>`:

- the distributed optimizer saved `fully_reshardable` (Megatron-LM's
  `--dist-ckpt-optim-fully-reshardable`) or `fully_sharded_model_space`:
  kinds `param` / `fp32_param` (the fp32 main parameter), `exp_avg`,
  `exp_avg_sq`;
- the mixed-precision optimizer without `--use-distributed-optimizer`
  (Float16OptimizerWithFloat16Params): `fp32_param`, `exp_avg`, `exp_avg_sq`;
  the fp32 optimizer has no main copy (the weight is its own).

Megatron-LM's default layout of the distributed optimizer, `dp_reshardable`
(and the older `dp_zero_gather_scatter`), stores the optimizer's flat
buckets instead, whose order is megatron-core's internal layout: refused by
name, with the flag that saves model space. Adam's step count comes from
the param groups in `common.pt`; the learning-rate scheduler from
`opt_param_scheduler`, which Megatron-LM counts in samples (our scheduler
counts steps: divided by --global-batch-size).

What our strategy (`precision.strategies`, `--precision` of the resumed run)
stores, from the fp32 main parameter w, m and v:

    parameter  bf16: SR(w) with `random.import_rounding_key(seed, iteration,
               name)` when the strategy rounds its parameter stochastically
               (bf16-sr), round-to-nearest(w) otherwise; fp32: w
    master     w (bf16-mixed)
    kahan      round-to-nearest(w - parameter) (bf16-kahan)
    exp_avg, exp_avg_sq   m and v cast (round to nearest) to the strategy's dtypes
"""
from __future__ import annotations

import argparse
from typing import Optional

import torch

from megatron_sr.config import ModelConfig, OptimizerConfig
from megatron_sr.precision.rounding import stochastic_round
from megatron_sr.precision.strategies import PrecisionStrategy
from megatron_sr.random import import_rounding_key

_MAIN_KINDS = ("param", "fp32_param")
_MODEL_SPACE = ("fully_reshardable", "fully_sharded_model_space")


def sharding_type(common: dict) -> Optional[str]:
    """The distributed optimizer's `param_state_sharding_type` in `common`
    (None for the other optimizers)."""
    optimizer = common.get("optimizer")
    if not isinstance(optimizer, dict):
        return None
    found = optimizer.get("param_state_sharding_type")
    for value in optimizer.values():  # a chained optimizer's parts
        if found is None and isinstance(value, dict):
            found = value.get("param_state_sharding_type")
    return found


def check_model_space(source: str, common: dict) -> None:
    """ValueError naming `source` when its distributed optimizer state is not
    in model space (see the module docstring)."""
    kind = sharding_type(common)
    if kind is not None and kind not in _MODEL_SPACE:
        raise ValueError(
            f"{source}: its distributed optimizer state is saved as {kind!r} (megatron-core's "
            f"internal bucket layout), which cannot be imported: save it from Megatron-LM with "
            f"--dist-ckpt-optim-fully-reshardable (model space), or convert without the "
            f"optimizer state (--no-optimizer) and start with --finetune")


def adam_step(common: dict, iteration: int) -> int:
    """Adam's step count: the largest `step` of the param groups (or the
    `common_step` megatron-core keeps of torch's per-parameter steps) in
    `common`'s optimizer entry; `iteration` where none is stored."""
    steps = []

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "param_groups" and isinstance(value, list):
                    steps.extend(float(g["step"]) for g in value
                                 if isinstance(g, dict) and g.get("step") is not None)
                elif key == "common_step":  # torch's Adam under megatron-core's sharding
                    steps.append(float(value))
                else:
                    walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)

    walk(common.get("optimizer"))
    return int(max(steps)) if steps else iteration


def lr_scheduler_state(source: str, args: argparse.Namespace, common: dict,
                       iteration: int) -> dict:
    """Our `LRScheduler.state_dict()` of Megatron-LM's `opt_param_scheduler`
    (sample counts divided by args.global_batch_size). ValueError naming
    `source` when it is missing."""
    saved = common.get("opt_param_scheduler")
    batch = getattr(args, "global_batch_size", None)
    if not isinstance(saved, dict) or not batch:
        raise ValueError(f"{source} holds no opt_param_scheduler state (or its args no "
                         f"global_batch_size): the learning-rate schedule cannot resume; "
                         f"convert with --no-optimizer and start with --finetune")
    style = saved["lr_decay_style"]
    return {"iteration": iteration, "max_lr": float(saved["max_lr"]),
            "min_lr": float(saved["min_lr"]),
            "warmup_init_lr": float(getattr(args, "lr_warmup_init", 0.0) or 0.0),
            "warmup_iters": saved["lr_warmup_steps"] / batch,
            "decay_iters": int(saved["lr_decay_steps"] // batch), "decay_style": style,
            "wsd_decay_iters": (int(getattr(args, "lr_wsd_decay_iters", 0) or 0)
                                if style == "WSD" else None),
            # Unused outside WSD: then our flag's default, which the resumed run compares.
            "wsd_decay_style": (getattr(args, "lr_wsd_decay_style", None) or "exponential")
            if style == "WSD" else OptimizerConfig().lr_wsd_decay_style}


def parameter_states(source: str, model: dict[str, torch.Tensor],
                     kinds: dict[str, dict[str, torch.Tensor]], strategy: PrecisionStrategy,
                     seed: int, iteration: int) -> tuple[dict, dict]:
    """(our model weights, our optimizer "params" {kind: {name: tensor}}) from
    Megatron's weights `model` and its optimizer tensors `kinds` ({Megatron
    kind: {our global name: tensor}}), as `strategy` stores them (module
    docstring). ValueError naming `source` and the parameter without state."""
    weights: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, torch.Tensor]] = {"exp_avg": {}, "exp_avg_sq": {}}
    if strategy.master_dtype is not None:
        state["master"] = {}
    if strategy.kahan_dtype is not None:
        state["kahan"] = {}
    for name, weight in model.items():
        main = next((kinds[k][name] for k in _MAIN_KINDS if name in kinds.get(k, {})), None)
        main = (weight if main is None else main).float()
        for kind in ("exp_avg", "exp_avg_sq"):
            if name not in kinds.get(kind, {}):
                raise ValueError(f"{source}: no optimizer {kind} for parameter {name}")
        if strategy.param_dtype == torch.float32:
            param = main.clone()
        elif strategy.param_rounding == "stochastic":
            param = stochastic_round(main, import_rounding_key(seed, iteration, name))
        else:
            param = main.to(strategy.param_dtype)
        weights[name] = param
        state["exp_avg"][name] = kinds["exp_avg"][name].to(strategy.exp_avg_dtype)
        state["exp_avg_sq"][name] = kinds["exp_avg_sq"][name].to(strategy.exp_avg_sq_dtype)
        if "master" in state:
            state["master"][name] = main.to(strategy.master_dtype)
        if "kahan" in state:
            state["kahan"][name] = (main - param.float()).to(strategy.kahan_dtype)
    return weights, state


def with_param_dtype(config: ModelConfig, strategy: PrecisionStrategy) -> ModelConfig:
    """`config` with the parameter dtype `strategy` trains in."""
    return ModelConfig(**{**config.__dict__, "params_dtype": strategy.param_dtype})
