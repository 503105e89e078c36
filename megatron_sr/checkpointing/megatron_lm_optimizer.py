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
and kind (`optimizer.distributed.dp_group_idx_<r>.gbuf_idx_0.dtype_<...>.
bucket_idx_<b>.<kind>`, kinds param / exp_avg / exp_avg_sq, length: the
bucket's unpadded size), without parameter names, one set per model-parallel
rank r = tp_rank + TP * pp_rank (its stage's TP shards). `bucket_states`
maps them back to parameters with megatron-core's layout rule (0.16,
`_ParamAndGradBuffer`): the stage's parameters, in `named_parameters` order
(`parameter_order`), enter the buffer in REVERSE order; each starts at the
next multiple of 64 elements; a bucket ends after the parameter that fills
it (the saved bucket sizes tell where). The bucket tensors are the same
whatever the data-parallel size (each rank saved its slice of them).
The gathered layouts hold the same buckets, gathered on data-parallel rank 0
and coalesced without their end padding (`get_parameter_state_dp_zero`):
torch_dist's `dp_zero_gather_scatter` (an object per model-parallel rank,
`...dp_group_idx_<r>.param_state`) and the legacy format's
`mp_rank_*/distrib_optim.pt`; there the bucket sizes are not saved, and
each parameter is placed where its main values round to its weight
(`coalesced_offsets`). The TP shards are joined with our own layout
(`state_dict_layout`), and every main parameter cast to the weight's dtype
must equal the weight, otherwise the layout is refused. Virtual and uneven
pipeline stages and other layouts are refused by name, with the flag that
saves model space.

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
from megatron_sr.model.gpt_model import WORD_EMBEDDING_NAME
from megatron_sr.model.parameter_specs import model_parameters
from megatron_sr.model.state_dict_layout import merge_state_dicts, split_state_dict
from megatron_sr.tensor_parallel import shard_full_tensor
from megatron_sr.precision.rounding import stochastic_round
from megatron_sr.precision.strategies import PrecisionStrategy
from megatron_sr.random import import_rounding_key

_MAIN_KINDS = ("param", "fp32_param")
_MODEL_SPACE = ("fully_reshardable", "fully_sharded_model_space")
BUCKET_SPACE = "dp_reshardable"
GATHERED = "dp_zero_gather_scatter"  # also the legacy format's distrib_optim.pt
_PARAM_STATE_KEY = re.compile(r"optimizer\.distributed\.dp_group_idx_(\d+)\.param_state/shard_.*")
_BUCKET_KEY = re.compile(r"optimizer\.distributed\.dp_group_idx_(\d+)\.gbuf_idx_(\d+)\."
                         r"dtype_(.+)\.bucket_idx_(\d+)\.(\w+)")
_MODEL_SPACE_REMEDY = ("save it from Megatron-LM with --dist-ckpt-optim-fully-reshardable "
                       "(model space), or convert with --no-optimizer and start with --finetune")
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
    in none of the layouts this module reads (see the module docstring)."""
    kind = sharding_type(common)
    if kind is not None and kind not in _MODEL_SPACE + (BUCKET_SPACE, GATHERED):
        raise ValueError(
            f"{source}: its distributed optimizer state is saved as {kind!r}, which cannot be "
            f"imported (model space, {BUCKET_SPACE!r} and {GATHERED!r} can): "
            f"{_MODEL_SPACE_REMEDY}")


def gathered_states(common: dict) -> dict[int, object]:
    """{data-parallel group index: its gathered state} of a torch_dist
    dp_zero_gather_scatter checkpoint (the `param_state` objects that
    `megatron_torch_dist.read` puts into common["optimizer"]), for
    `dp_zero_groups`."""
    states = {}
    for key, value in (common.get("optimizer") or {}).items():
        match = _PARAM_STATE_KEY.fullmatch(str(key))
        if match is not None:  # megatron-core stores the list of the shard's objects: one
            states[int(match.group(1))] = value[0] if isinstance(value, list) and \
                len(value) == 1 else value
    return states


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


def bucket_groups(source: str, tensors: dict[str, torch.Tensor]
                    ) -> dict[int, dict[str, list[torch.Tensor]]]:
    """{data-parallel group index: {kind: [bucket tensor, in bucket order]}}
    of the dp_reshardable keys in `tensors` (`bucket_states`' input). ValueError naming `source` when a
    group holds more than one gradient buffer (virtual pipeline chunks, fp32
    parameters beside bf16 ones) or its buckets are not numbered 0..n-1."""
    found: dict[int, dict[str, dict[int, torch.Tensor]]] = {}
    buffers: dict[int, set] = {}
    for key, tensor in tensors.items():
        match = _BUCKET_KEY.fullmatch(key)
        if match is not None:
            group = int(match.group(1))
            buffers.setdefault(group, set()).add(match.group(2, 3))
            found.setdefault(group, {}).setdefault(match.group(5), {})[
                int(match.group(4))] = tensor
    groups = {}
    for group, kinds in found.items():
        if len(buffers[group]) != 1:
            raise ValueError(f"{source}: data-parallel group {group} of its distributed "
                             f"optimizer holds {len(buffers[group])} gradient buffers "
                             f"{sorted(buffers[group])}; only one (no virtual pipeline, one "
                             f"parameter dtype) can be imported: {_MODEL_SPACE_REMEDY}")
        groups[group] = {}
        for kind, numbered in kinds.items():
            if sorted(numbered) != list(range(len(numbered))):
                raise ValueError(f"{source}: the {kind} buckets of data-parallel group {group} "
                                 f"are numbered {sorted(numbered)}, not 0..{len(numbered) - 1}")
            groups[group][kind] = [numbered[b] for b in range(len(numbered))]
    return groups


def dp_zero_groups(source: str, states: dict[int, object]
                   ) -> dict[int, dict[str, list[torch.Tensor]]]:
    """`bucket_states`' input from megatron-core's gathered layout
    (`get_parameter_state_dp_zero`: {"buckets_coalesced": True, <gradient
    buffer index>: {<dtype>: {"param" | "exp_avg" | "exp_avg_sq": flat fp32
    tensor, "numel_unpadded": int}}}) of each data-parallel group: the
    buckets' unpadded contents one after the other, as one "bucket" whose
    inner boundaries `bucket_states` finds. ValueError naming `source` for
    any other structure or more than one buffer."""
    groups = {}
    for group, state in states.items():
        buffers = [v for k, v in state.items() if k != "buckets_coalesced"] \
            if isinstance(state, dict) else []
        if not isinstance(state, dict) or state.get("buckets_coalesced") is not True \
                or len(buffers) != 1 or not isinstance(buffers[0], dict) \
                or len(buffers[0]) != 1:
            raise ValueError(f"{source}: the gathered distributed optimizer state of "
                             f"data-parallel group {group} is not one coalesced gradient "
                             f"buffer of one dtype (megatron-core's dp_zero layout): "
                             f"{_MODEL_SPACE_REMEDY}")
        (flat,) = buffers[0].values()
        kinds = {"param", "exp_avg", "exp_avg_sq"}
        if not isinstance(flat, dict) or not kinds <= set(flat) or not all(
                isinstance(flat[k], torch.Tensor) and flat[k].dim() == 1 for k in kinds):
            raise ValueError(f"{source}: the gathered distributed optimizer state of "
                             f"data-parallel group {group} lacks flat {sorted(kinds)} tensors")
        groups[group] = {kind: [flat[kind]] for kind in kinds}
    return groups


def coalesced_offsets(numels: list[int], total: int, fits) -> Optional[list[tuple]]:
    """[(0, start)] per parameter of `numels` (the buffer's order) in the
    coalesced dp_zero tensor of `total` elements, where each bucket's padding
    at its end was cut: a parameter starts either at the next multiple of 64
    from its bucket's start, or, when the previous one closed its bucket,
    right after it. `fits(i, start)` tells whether parameter i's main values
    at `start` round to its saved weight; the first position that fits is
    taken. None when neither fits or the parameters do not end the tensor."""
    offsets, bucket_start, end = [], 0, 0
    for i, numel in enumerate(numels):
        aligned = bucket_start + math.ceil((end - bucket_start) / _PARAM_ALIGNMENT) * \
            _PARAM_ALIGNMENT
        start = next((at for at in dict.fromkeys((aligned, end))
                      if at + numel <= total and fits(i, at)), None)
        if start is None:
            return None
        if start != aligned:
            bucket_start = start
        offsets.append((0, start))
        end = start + numel
    return offsets if end == total else None


def _fits(flat_main: torch.Tensor, names: list[str], model: dict[str, torch.Tensor],
          splits: dict, tp_rank: int, tp: int):
    """`coalesced_offsets`' test: whether the main values in `flat_main` at a
    start round to TP rank `tp_rank`'s shard of parameter names[i] (`splits`:
    each parameter's TP split, None when replicated)."""
    def fits(i: int, start: int) -> bool:
        split = splits[names[i]]
        weight = model[names[i]] if split is None else \
            shard_full_tensor(model[names[i]], split, tp_rank, tp)
        main = flat_main[start:start + weight.numel()].view(weight.shape)
        return torch.equal(main.to(weight.dtype), weight)
    return fits


def bucket_states(source: str, args: argparse.Namespace, config: ModelConfig,
                  model: dict[str, torch.Tensor], groups: dict[int, dict[str, list]],
                  coalesced: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """{kind: {our name: global tensor of the parameter's shape}} (kinds
    param, exp_avg, exp_avg_sq) from the distributed optimizer's buckets
    `groups` (`bucket_groups`: dp_reshardable, laid out by `bucket_offsets`;
    or `dp_zero_groups` with `coalesced`: laid out by `coalesced_offsets`),
    for the model `config` (from `args`) whose global weights under our
    names are `model`.

    Megatron-LM's model-parallel rank r = tp_rank + TP * pp_rank saved its
    buffer as data-parallel group r: its parameters are this stage's TP
    shards (`state_dict_layout.split_state_dict`, with a tied embedding's
    last-stage copy as megatron-core's `output_layer.weight`), laid out by
    `bucket_offsets`; the shards are joined back with `merge_state_dicts`
    (replicated parameters from TP rank 0, a tied embedding from the first
    stage). Every main parameter is then checked against the saved weight.
    ValueError naming `source` for virtual or uneven pipeline stages, a
    missing group, or buckets that do not hold the model's parameters."""
    tp = getattr(args, "tensor_model_parallel_size", 1) or 1
    pp = getattr(args, "pipeline_model_parallel_size", 1) or 1
    for flag in ("virtual_pipeline_model_parallel_size", "num_layers_per_virtual_pipeline_stage",
                 "decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers"):
        if getattr(args, flag, None) is not None:
            raise ValueError(f"{source}: its distributed optimizer state is saved in bucket "
                             f"layout under --{flag.replace('_', '-')}, which cannot be read: "
                             f"{_MODEL_SPACE_REMEDY}")
    if sorted(groups) != list(range(tp * pp)):
        raise ValueError(f"{source}: its distributed optimizer state holds data-parallel groups "
                         f"{sorted(groups)}, not one per model-parallel rank of TP={tp} x "
                         f"PP={pp}: {_MODEL_SPACE_REMEDY}")
    kinds = ("param", "exp_avg", "exp_avg_sq")
    impl = getattr(args, "transformer_impl", None) or "transformer_engine"
    shapes = {name: torch.empty(weight.shape, device="meta") for name, weight in model.items()}
    shards = split_state_dict(shapes, config, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    splits = {spec.name: spec.split for spec in model_parameters(config)}
    per_rank: dict[str, dict[tuple[int, int], dict[str, torch.Tensor]]] = {k: {} for k in kinds}
    for group, buckets in sorted(groups.items()):
        tp_rank, pp_rank = group % tp, group // tp
        local = shards[(tp_rank, pp_rank)]
        # megatron-core's name for each of the stage's parameters (the tied embedding's
        # last-stage copy is its output layer's weight).
        megatron_names = {("output_layer.weight" if name == WORD_EMBEDDING_NAME and pp_rank > 0
                           else name): name for name in local}
        order = list(reversed(parameter_order(source, list(megatron_names), impl)))
        sizes = [t.numel() for t in buckets.get("param", [])]
        numels = [local[megatron_names[n]].numel() for n in order]
        if coalesced and "param" in buckets:
            offsets = coalesced_offsets(numels, sizes[0], _fits(
                buckets["param"][0], [megatron_names[n] for n in order], model, splits,
                tp_rank, tp))
        else:
            offsets = bucket_offsets(numels, sizes)
        if offsets is None or set(buckets) != set(kinds):
            raise ValueError(f"{source}: the distributed optimizer's buckets of model-parallel "
                             f"rank {group} (TP rank {tp_rank}, PP rank {pp_rank}; kinds "
                             f"{sorted(buckets)}, sizes {sizes}) do not hold the stage's "
                             f"parameters in megatron-core's layout; convert with --no-optimizer "
                             f"and start with --finetune")
        for kind in kinds:
            per_rank[kind][(tp_rank, pp_rank)] = {
                megatron_names[name]: buckets[kind][bucket][start:start + local[
                    megatron_names[name]].numel()].view(local[megatron_names[name]].shape)
                for name, (bucket, start) in zip(order, offsets)}
    states = {kind: merge_state_dicts(per_rank[kind], config) for kind in kinds}
    for name, weight in model.items():
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
    docstring). ValueError naming `source` and the parameter without state,
    or whose main parameter rounded to the weight's dtype is not the weight."""
    weights: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, torch.Tensor]] = {"exp_avg": {}, "exp_avg_sq": {}}
    if strategy.master_dtype is not None:
        state["master"] = {}
    if strategy.kahan_dtype is not None:
        state["kahan"] = {}
    for name, weight in model.items():
        main = next((kinds[k][name] for k in _MAIN_KINDS if name in kinds.get(k, {})), None)
        if main is not None and not torch.equal(main.to(weight.dtype), weight):
            raise ValueError(f"{source}: the optimizer's main parameter for {name} is not the "
                             f"saved weight (rounded to its dtype): the optimizer state does not "
                             f"belong to these weights; convert with --no-optimizer and start "
                             f"with --finetune")
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
