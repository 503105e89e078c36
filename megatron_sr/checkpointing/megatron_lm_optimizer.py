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

Megatron-LM's default layout of the distributed optimizer, `dp_reshardable`,
stores megatron-core's flat buckets instead, one global tensor per bucket
and kind (`optimizer.distributed.dp_group_idx_0.gbuf_idx_0.dtype_<...>.
bucket_idx_<b>.<kind>`, kinds param / exp_avg / exp_avg_sq, length: the
bucket's unpadded size), without parameter names. `bucket_states` maps them
back to parameters with megatron-core's layout rule (0.16,
`_ParamAndGradBuffer`): the parameters of the model, in `named_parameters`
order (`parameter_order`), enter the buffer in REVERSE order; each starts
at the next multiple of 64 elements; a bucket ends after the parameter that
fills it (the saved bucket sizes tell where). The bucket tensors are the
same whatever the data-parallel size (each rank saved its slice of them).
The result is checked against the saved model: every main parameter cast to
the weight's dtype must equal the weight, otherwise the layout is refused.
Supported at tensor and pipeline parallel size 1 (one data-parallel group,
one buffer); the older `dp_zero_gather_scatter` and other layouts are
refused by name, with the flag that saves model space.

Adam's step count comes from the param groups in `common.pt` (under
dp_reshardable from the distributed optimizer's own state dict, which
`megatron_torch_dist.read` puts there); the learning-rate scheduler from
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
import math
import re
from typing import Optional

import torch

from megatron_sr.config import ModelConfig, OptimizerConfig
from megatron_sr.precision.rounding import stochastic_round
from megatron_sr.precision.strategies import PrecisionStrategy
from megatron_sr.random import import_rounding_key

_MAIN_KINDS = ("param", "fp32_param")
_MODEL_SPACE = ("fully_reshardable", "fully_sharded_model_space")
BUCKET_SPACE = "dp_reshardable"
_BUCKET_KEY = re.compile(r"optimizer\.distributed\.dp_group_idx_(\d+)\.gbuf_idx_(\d+)\."
                         r"dtype_(.+)\.bucket_idx_(\d+)\.(\w+)")
_PARAM_ALIGNMENT = 64  # elements: megatron-core pads each parameter's start to it
# One layer's parameters in megatron-core's `named_parameters` order, under the names its
# torch_dist checkpoint holds (the fused norms under Transformer Engine's names, with the
# local spec's names beside them), for the local spec and for Transformer Engine's (whose
# LayerNormColumnParallelLinear holds the norm after linear_proj).
_NORM_QKV = ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight",
             "self_attention.linear_qkv.layer_norm_bias", "input_layernorm.bias")
_PROJ = ("self_attention.linear_proj.weight", "self_attention.linear_proj.bias")
_QKV_AND_MLP = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
                "self_attention.q_layernorm.weight", "self_attention.q_layernorm.bias",
                "self_attention.k_layernorm.weight", "self_attention.k_layernorm.bias",
                "mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight",
                "mlp.linear_fc1.layer_norm_bias", "pre_mlp_layernorm.bias",
                "mlp.linear_fc1.weight", "mlp.linear_fc1.bias",
                "mlp.linear_fc2.weight", "mlp.linear_fc2.bias")
_LAYER_ORDER = {"local": _NORM_QKV + _PROJ + _QKV_AND_MLP,
                "transformer_engine": _PROJ + _NORM_QKV + _QKV_AND_MLP}
_OUTER_ORDER = ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight",
                None, "decoder.final_layernorm.weight", "decoder.final_layernorm.bias",
                "output_layer.weight", "output_layer.bias")
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


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
    """ValueError naming `source` when its distributed optimizer state is
    neither in model space nor `dp_reshardable` (see the module docstring)."""
    kind = sharding_type(common)
    if kind is not None and kind not in _MODEL_SPACE + (BUCKET_SPACE,):
        raise ValueError(
            f"{source}: its distributed optimizer state is saved as {kind!r}, which cannot be "
            f"imported (model space and {BUCKET_SPACE!r} can): save it from Megatron-LM with "
            f"--dist-ckpt-optim-fully-reshardable (model space), or convert without the "
            f"optimizer state (--no-optimizer) and start with --finetune")


def parameter_order(source: str, names: list[str], transformer_impl: str) -> list[str]:
    """`names` (megatron-core keys of a GPTModel's parameters, per layer
    `decoder.layers.<i>.`) in the order of its `named_parameters()` under
    `transformer_impl` ("local" or "transformer_engine"). ValueError naming
    `source` for an implementation or a parameter outside that order."""
    if transformer_impl not in _LAYER_ORDER:
        raise ValueError(f"{source}: --transformer-impl {transformer_impl!r} has no known "
                         f"parameter order; the distributed optimizer's buckets cannot be read")

    def rank(name: str) -> tuple:
        layer = _LAYER.fullmatch(name)
        if layer is not None and layer.group(2) in _LAYER_ORDER[transformer_impl]:
            return (2, int(layer.group(1)), _LAYER_ORDER[transformer_impl].index(layer.group(2)))
        if layer is None and name in _OUTER_ORDER:
            return (_OUTER_ORDER.index(name),)
        raise ValueError(f"{source}: parameter {name} has no known place in megatron-core's "
                         f"parameter order; the distributed optimizer's buckets cannot be read")

    return sorted(names, key=rank)


def bucket_offsets(numels: list[int], bucket_numels: list[int]) -> Optional[list[tuple]]:
    """Where megatron-core's distributed optimizer keeps each parameter: for
    `numels` (element counts in the buffer's order, i.e. the model's
    parameters reversed) and `bucket_numels` (each bucket's unpadded size, as
    saved), [(bucket, start within the bucket)] per parameter; None when they
    do not fit that rule (module docstring) exactly."""
    offsets, bucket, start = [], 0, 0
    for numel in numels:
        start = math.ceil(start / _PARAM_ALIGNMENT) * _PARAM_ALIGNMENT
        if bucket >= len(bucket_numels) or start + numel > bucket_numels[bucket]:
            return None
        offsets.append((bucket, start))
        start += numel
        padded = math.ceil(start / _PARAM_ALIGNMENT) * _PARAM_ALIGNMENT
        if bucket_numels[bucket] in (start, padded):  # this parameter closes the bucket
            bucket, start = bucket + 1, 0
    return offsets if bucket == len(bucket_numels) else None


def bucket_states(source: str, args: argparse.Namespace,
                  tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{kind: {megatron-core key: tensor of the parameter's shape}} (kinds
    param, exp_avg, exp_avg_sq) from the dp_reshardable bucket tensors in
    `tensors` (`megatron_torch_dist.read(..., optimizer=True)`: the model's
    weights under megatron-core keys beside them). ValueError naming
    `source` when the checkpoint is not TP = PP = 1 with one buffer, or its
    buckets do not match the model's parameters."""
    buckets: dict[str, dict[int, torch.Tensor]] = {}
    groups = set()
    for key, tensor in tensors.items():
        match = _BUCKET_KEY.fullmatch(key)
        if match is not None:
            groups.add(match.group(1, 2, 3))
            buckets.setdefault(match.group(5), {})[int(match.group(4))] = tensor
    tp_pp = (getattr(args, "tensor_model_parallel_size", 1) or 1,
             getattr(args, "pipeline_model_parallel_size", 1) or 1)
    if len(groups) != 1 or tp_pp != (1, 1):
        raise ValueError(f"{source}: its distributed optimizer state is saved as 'dp_reshardable' "
                         f"with tensor/pipeline parallel sizes {tp_pp} and {len(groups)} "
                         f"bucket buffers; only TP = PP = 1 with one buffer can be imported: "
                         f"save it from Megatron-LM with --dist-ckpt-optim-fully-reshardable "
                         f"(model space), or convert with --no-optimizer and start with --finetune")
    weights = {key: tensor for key, tensor in tensors.items()
               if not key.startswith("optimizer.") and not key.endswith("_extra_state")}
    order = parameter_order(source, list(weights),
                            getattr(args, "transformer_impl", None) or "transformer_engine")
    sizes = [t.numel() for _, t in sorted(buckets.get("param", {}).items())]
    offsets = bucket_offsets([weights[name].numel() for name in reversed(order)], sizes)
    if offsets is None or set(buckets) != {"param", "exp_avg", "exp_avg_sq"}:
        raise ValueError(f"{source}: the distributed optimizer's buckets (kinds "
                         f"{sorted(buckets)}, sizes {sizes}) do not hold the model's parameters "
                         f"in megatron-core's layout; convert with --no-optimizer and start with "
                         f"--finetune")
    states: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in buckets}
    for name, (bucket, start) in zip(reversed(order), offsets):
        weight = weights[name]
        for kind, flat in buckets.items():
            states[kind][name] = flat[bucket][start:start + weight.numel()].view(
                weight.shape).clone()
        if not torch.equal(states["param"][name].to(weight.dtype), weight):
            raise ValueError(f"{source}: the distributed optimizer's main parameter for {name} "
                             f"is not the saved weight: its bucket layout is not megatron-core's "
                             f"as read here; convert with --no-optimizer and start with --finetune")
    return states


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
