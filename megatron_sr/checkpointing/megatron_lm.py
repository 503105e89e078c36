"""Megatron-LM checkpoints (megatron-core GPT models): import and export.

Two formats, both imported (`import_megatron_lm` tells them apart):

- torch_dist, Megatron-LM's default (`megatron_torch_dist`): global tensors,
  layers stacked, Transformer Engine's names for the fused norms;
- legacy `--ckpt-format torch` (checkpoint version 3.0):

    latest_checkpointed_iteration.txt
    iter_0000100/mp_rank_TT[_PPP]/model_optim_rng.pt
        {"args": argparse.Namespace, "checkpoint_version": 3.0, "iteration": int,
         "model": the GPTModel's state dict of this TP/PP rank, ...}

  with layers numbered per pipeline stage (`decoder.layers.0` is the stage's
  first layer) and the last stage's copy of a tied embedding named
  `output_layer.weight`; names are the local spec's or Transformer Engine's.

Both use megatron-core's parameter names, which are ours up to the norms
Transformer Engine fuses (`local_name`). The fused QKV rows are grouped per
query group as (q, k, v), as ours (with GQA too); SwiGLU's fc1 is [gate; up]
per TP rank, as ours. Pickles are read through `megatron_pickle` (an
allowlist, no foreign code runs). The model comes from the args: GQA,
--kv-channels, partial and interleaved rotary, RoPE scaling, qk-layernorm,
layernorm-1p, SwiGLU and squared ReLU carry over; a flag our model lacks
(`_REFUSED_FLAGS`: MoE, MLA, ...) is refused by name, never loaded as another
model. A torch_dist checkpoint's optimizer state (fp32 main parameters,
Adam's moments, its step and learning-rate schedule) is imported too when it
is in model space or in the distributed optimizer's bucket layouts
(dp_reshardable, its default, and dp_zero_gather_scatter), as is the legacy
format's `distrib_optim.pt` (`import_megatron_lm_with_optimizer`, then
`megatron_lm_optimizer`), so the run resumes; the legacy format's other
optimizers travel as weights only (start with --finetune). Export writes
either format (torch_dist by default in tools/checkpoint_convert.py). Virtual pipeline
stages in the legacy format (`model0`, ...) and the pre-core
`language_model` layout are refused.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
from typing import Optional

import torch

from megatron_sr.config import ModelConfig
from megatron_sr.model.gpt_model import WORD_EMBEDDING_NAME
from megatron_sr.model.parallel_layout import chunk_layers
from megatron_sr.model.state_dict_layout import merge_state_dicts, split_state_dict

MEGATRON_CHECKPOINT_VERSION = 3.0
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _renumber(name: str, mapping: dict[int, int]) -> str:
    match = _LAYER.match(name)
    if match is None:
        return name
    return f"decoder.layers.{mapping[int(match.group(1))]}." + name[match.end():]


def _stage_layers(config: ModelConfig, pp: int, pp_rank: int) -> list[int]:
    return list(chunk_layers(config.num_layers, pp, None, pp_rank)[0])


def megatron_args(config: ModelConfig, description: dict, tp: int, pp: int,
                  iteration: int, consumed_train_samples: int,
                  ckpt_format: str = "torch") -> argparse.Namespace:
    """The `args` Namespace Megatron-LM stores and checks on load."""
    data = description.get("data", {})
    return argparse.Namespace(
        num_layers=config.num_layers, hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size, num_attention_heads=config.num_attention_heads,
        kv_channels=config.head_dim,
        group_query_attention=config.num_query_groups != config.num_attention_heads,
        num_query_groups=config.num_query_groups, seq_length=config.seq_length,
        max_position_embeddings=config.max_position_embeddings,
        position_embedding_type=config.position_embedding_type,
        add_position_embedding=config.position_embedding_type == "learned_absolute",
        rotary_base=config.rotary_base, rotary_percent=config.rotary_percent,
        rotary_interleaved=config.rotary_interleaved, use_rope_scaling=config.use_rope_scaling,
        rope_scaling_factor=config.rope_scaling_factor, qk_layernorm=config.qk_layernorm,
        apply_layernorm_1p=config.apply_layernorm_1p, normalization=config.normalization,
        norm_epsilon=config.layernorm_epsilon, swiglu=config.activation == "swiglu",
        squared_relu=config.activation == "squared_relu",
        add_bias_linear=config.add_bias_linear, add_qkv_bias=config.qkv_bias,
        untie_embeddings_and_output_weights=config.untie_embeddings_and_output_weights,
        hidden_dropout=config.hidden_dropout, attention_dropout=config.attention_dropout,
        init_method_std=config.init_method_std, padded_vocab_size=config.vocab_size,
        make_vocab_size_divisible_by=description.get("make_vocab_size_divisible_by", 1),
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=None,
        params_dtype=config.params_dtype, bf16=config.params_dtype == torch.bfloat16,
        fp16=False, tokenizer_type=data.get("tokenizer_type"), vocab_file=data.get("vocab_file"),
        merge_file=data.get("merge_file"), tokenizer_model=data.get("tokenizer_model"),
        vocab_size=data.get("vocab_size"), iteration=iteration,
        consumed_train_samples=consumed_train_samples, use_legacy_models=False,
        transformer_impl="local", ckpt_format=ckpt_format)


def export_megatron_lm(model: dict[str, torch.Tensor], config: ModelConfig, description: dict,
                       iteration: int, consumed_train_samples: int, save_dir: str, tp: int,
                       pp: int) -> str:
    """Writes the full state dict `model` as a Megatron-LM legacy checkpoint of
    `iteration` at TP `tp` x PP `pp` into `save_dir` (tracker included).
    Returns the iteration directory."""
    ranks = split_state_dict(model, config, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    args = megatron_args(config, description, tp, pp, iteration, consumed_train_samples)
    directory = os.path.join(save_dir, f"iter_{iteration:07d}")
    for (tp_rank, pp_rank), state in sorted(ranks.items()):
        mapping = {g: i for i, g in enumerate(_stage_layers(config, pp, pp_rank))}
        stage = {}
        for name, tensor in state.items():
            if name == WORD_EMBEDDING_NAME and pp_rank == pp - 1 and pp > 1:
                name = "output_layer.weight"  # the last stage's copy of the tied embedding
            stage[_renumber(name, mapping)] = tensor
        rank_dir = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
        os.makedirs(os.path.join(directory, rank_dir))
        torch.save({"args": args, "checkpoint_version": MEGATRON_CHECKPOINT_VERSION,
                    "iteration": iteration, "model": stage,
                    "num_floating_point_operations_so_far": 0},
                   os.path.join(directory, rank_dir, "model_optim_rng.pt"))
    with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(f"{iteration}\n")
    return directory


# Megatron-LM flags (args attribute, flag) whose model we cannot build: refused by name.
_REFUSED_FLAGS = (
    ("num_experts", "--num-experts (mixture of experts)"),
    ("multi_latent_attention", "--multi-latent-attention"),
    ("mtp_num_layers", "--mtp-num-layers (multi-token prediction)"),
    ("openai_gelu", "--openai-gelu (tanh GeLU)"),
    ("apply_residual_connection_post_layernorm",
     "--apply-residual-connection-post-layernorm"),
    ("window_size", "--window-size (sliding-window attention)"),
    ("rotary_seq_len_interpolation_factor", "--rotary-seq-len-interpolation-factor"),
    ("heterogeneous_layers_config_path", "--heterogeneous-layers-config-path"),
    ("qk_l2_norm", "--qk-l2-norm"),
    ("use_legacy_models", "--use-legacy-models (the pre-megatron-core model)"),
    ("experimental_attention_variant", "--experimental-attention-variant"),
    ("attention_output_gate", "--attention-output-gate"),
)


def export_megatron_lm_torch_dist(model: dict[str, torch.Tensor], config: ModelConfig,
                                  description: dict, iteration: int,
                                  consumed_train_samples: int, save_dir: str) -> str:
    """Writes the full state dict `model` as a Megatron-LM torch_dist
    checkpoint of `iteration` into `save_dir` (tracker included; any TP/PP
    loads it). Returns the iteration directory."""
    from megatron_sr.checkpointing import megatron_torch_dist

    args = megatron_args(config, description, 1, 1, iteration, consumed_train_samples,
                         ckpt_format="torch_dist")
    directory = os.path.join(save_dir, f"iter_{iteration:07d}")
    megatron_torch_dist.export(
        {te_name(name): tensor for name, tensor in model.items()}, config.num_layers,
        {"args": args, "checkpoint_version": MEGATRON_CHECKPOINT_VERSION, "iteration": iteration,
         "num_floating_point_operations_so_far": 0}, directory)
    with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(f"{iteration}\n")
    return directory


def _read(path: str) -> dict:
    from megatron_sr.checkpointing.megatron_pickle import read_megatron_pickle

    return read_megatron_pickle(path)


def _refuse(source: str, flag: str) -> ValueError:
    return ValueError(f"{source} was trained with {flag}, which megatron_sr's model does not "
                      f"have: refused (it would load as a different model)")


def model_config_from_megatron_args(args: argparse.Namespace, source: str = "the checkpoint"
                                    ) -> ModelConfig:
    """Our ModelConfig from a Megatron-LM checkpoint's args; ValueError naming
    `source` and the Megatron flag we cannot express."""
    for attribute, flag in _REFUSED_FLAGS:
        if getattr(args, attribute, None):
            raise _refuse(source, flag)
    if getattr(args, "softmax_type", "vanilla") not in (None, "vanilla"):
        raise _refuse(source, f"--softmax-type {args.softmax_type}")
    if getattr(args, "glu_linear_offset", 0.0):
        raise _refuse(source, "--glu-linear-offset")
    if getattr(args, "swiglu", False) and getattr(args, "squared_relu", False):
        raise _refuse(source, "--swiglu together with --squared-relu")
    position = getattr(args, "position_embedding_type", None)
    if position is None:  # before --position-embedding-type
        position = "rope" if getattr(args, "use_rotary_position_embeddings", False) \
            else "learned_absolute"
    if position == "learned_absolute" and getattr(args, "add_position_embedding", True) is False:
        position = "none"
    if position not in ("learned_absolute", "rope"):
        raise _refuse(source, f"--position-embedding-type {position}"
                      + (" (--no-position-embedding)" if position == "none" else ""))
    normalization = getattr(args, "normalization", "LayerNorm")
    if normalization not in ("LayerNorm", "RMSNorm"):
        raise _refuse(source, f"--normalization {normalization}")
    groups = args.num_query_groups if getattr(args, "group_query_attention", False) else None
    kv = getattr(args, "kv_channels", None)
    dtype = args.params_dtype if isinstance(getattr(args, "params_dtype", None), torch.dtype) \
        else (torch.bfloat16 if getattr(args, "bf16", False) else torch.float32)
    activation = "swiglu" if getattr(args, "swiglu", False) else \
        "squared_relu" if getattr(args, "squared_relu", False) else "gelu"
    return ModelConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads, vocab_size=args.padded_vocab_size,
        seq_length=args.seq_length, ffn_hidden_size=args.ffn_hidden_size,
        max_position_embeddings=args.max_position_embeddings,
        position_embedding_type=position,
        rotary_base=float(getattr(args, "rotary_base", 10000)),
        rotary_percent=float(getattr(args, "rotary_percent", 1.0)),
        rotary_interleaved=bool(getattr(args, "rotary_interleaved", False)),
        use_rope_scaling=bool(getattr(args, "use_rope_scaling", False)),
        rope_scaling_factor=float(getattr(args, "rope_scaling_factor", 8.0)),
        normalization=normalization,
        layernorm_epsilon=getattr(args, "norm_epsilon", 1e-5),
        apply_layernorm_1p=bool(getattr(args, "apply_layernorm_1p", False)),
        qk_layernorm=bool(getattr(args, "qk_layernorm", False)),
        num_query_groups=groups if groups != args.num_attention_heads else None,
        kv_channels=kv if kv and kv * args.num_attention_heads != args.hidden_size else None,
        activation=activation,
        add_bias_linear=getattr(args, "add_bias_linear", True),
        # Megatron-LM sets add_qkv_bias whenever every linear has a bias; ours marks the QKV-only case
        add_qkv_bias=bool(getattr(args, "add_qkv_bias", False))
        and not getattr(args, "add_bias_linear", True),
        untie_embeddings_and_output_weights=getattr(args, "untie_embeddings_and_output_weights",
                                                    False),
        hidden_dropout=getattr(args, "hidden_dropout", 0.1),
        attention_dropout=getattr(args, "attention_dropout", 0.1),
        init_method_std=getattr(args, "init_method_std", 0.02), params_dtype=dtype)


# Transformer Engine's names of the norms it fuses into the next linear layer.
_TE_NAMES = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
             "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
             "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
             "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias"}


def local_name(name: str) -> str:
    """The local-spec (our) name of a megatron-core parameter name, which may
    be Transformer Engine's (`..._extra_state` entries are not parameters)."""
    for te, local in _TE_NAMES.items():
        if name.endswith("." + te):
            return name[:-len(te)] + local
    return name


def te_name(name: str) -> str:
    """Transformer Engine's name of our parameter `name` (torch_dist's keys)."""
    for te, local in _TE_NAMES.items():
        if name.endswith("." + local):
            return name[:-len(local)] + te
    return name


def _check_names(source: str, state: dict, config: ModelConfig) -> dict[str, torch.Tensor]:
    """`state` (local names) restricted to the parameters of `config`'s model;
    a tied model's stored output layer is dropped. ValueError naming `source`
    and the parameters that differ (a feature the args do not declare)."""
    from megatron_sr.model.state_dict_layout import check_parameter_names, global_parameter_names

    names = global_parameter_names(config)
    if not config.untie_embeddings_and_output_weights:
        state = {k: v for k, v in state.items() if k != "output_layer.weight"}
    check_parameter_names(f"{source}'s weights", state, names)
    return {name: state[name] for name in names}


def _resolve(path: str) -> str:
    from megatron_sr.checkpointing import read_tracker_value

    tracker = os.path.join(path, "latest_checkpointed_iteration.txt")
    if os.path.isfile(tracker):
        value = read_tracker_value(tracker, allow_release=True)
        return os.path.join(path, "release" if value == "release" else f"iter_{value:07d}")
    return path


def import_megatron_lm(path: str) -> tuple[argparse.Namespace, ModelConfig, int,
                                           dict[str, torch.Tensor]]:
    """Reads a Megatron-LM checkpoint, torch_dist or legacy (a --save
    directory or an iter_XXXXXXX directory): (args, ModelConfig, iteration,
    full state dict in our names). ValueError naming the file, the flag or
    the layout we cannot load; CheckpointError on a tracker that holds neither
    an iteration number nor "release"."""
    from megatron_sr.checkpointing import megatron_torch_dist

    path = _resolve(path)
    if megatron_torch_dist.is_torch_dist_directory(path):
        return _import_torch_dist(path)
    return _import_legacy(path)[:4]


def _import_torch_dist(path: str, optimizer: bool = False):
    from megatron_sr.checkpointing import megatron_torch_dist

    common, tensors = megatron_torch_dist.read(path, optimizer=optimizer)
    args = common.get("args")
    if not isinstance(args, argparse.Namespace):
        raise ValueError(f"{os.path.join(path, 'common.pt')} holds no Megatron-LM args "
                         f"(a Namespace under 'args'): not written by Megatron-LM's training")
    if getattr(args, "padded_vocab_size", None) is None and \
            "embedding.word_embeddings.weight" in tensors:
        args.padded_vocab_size = tensors["embedding.word_embeddings.weight"].shape[0]
    config = model_config_from_megatron_args(args, path)
    prefix = megatron_torch_dist.OPTIMIZER_STATE
    state = {local_name(k): v for k, v in tensors.items()
             if not k.endswith("_extra_state") and not k.startswith("optimizer.")}
    iteration = int(common.get("iteration", getattr(args, "iteration", 0)) or 0)
    model = _check_names(path, state, config)
    if not optimizer:
        return args, config, iteration, model
    from megatron_sr.checkpointing import megatron_lm_optimizer

    megatron_lm_optimizer.check_model_space(path, common)
    layout = megatron_lm_optimizer.sharding_type(common)
    if layout == megatron_lm_optimizer.BUCKET_SPACE:
        saved = megatron_lm_optimizer.bucket_states(
            path, args, config, model, megatron_lm_optimizer.bucket_groups(path, tensors))
    elif layout == megatron_lm_optimizer.GATHERED:
        saved = megatron_lm_optimizer.bucket_states(
            path, args, config, model, megatron_lm_optimizer.dp_zero_groups(
                path, megatron_lm_optimizer.gathered_states(common)), coalesced=True)
    else:
        saved = {}
        for key, tensor in tensors.items():
            if key.startswith(prefix):
                kind, name = key[len(prefix):].split(".", 1)
                saved.setdefault(kind, {})[name] = tensor
    kinds: dict[str, dict[str, torch.Tensor]] = {}
    for kind, named in saved.items():
        for name, tensor in named.items():
            if local_name(name) in model:
                kinds.setdefault(kind, {})[local_name(name)] = tensor
    return args, config, iteration, model, common, kinds


def import_megatron_lm_with_optimizer(path: str):
    """Like `import_megatron_lm`, plus the optimizer state: (args, ModelConfig,
    iteration, weights, common state, {Megatron kind: {our global name:
    tensor}}), kinds empty when the checkpoint holds no optimizer state we
    read: torch_dist's model-space tensors or the distributed optimizer's
    buckets (dp_reshardable, dp_zero_gather_scatter), the legacy format's
    `distrib_optim.pt` files. ValueError as `import_megatron_lm`, and when the
    distributed optimizer's state is in another layout (`check_model_space`)
    or its buckets do not hold the saved weights
    (`megatron_lm_optimizer.bucket_states`)."""
    from megatron_sr.checkpointing import megatron_torch_dist

    path = _resolve(path)
    if not megatron_torch_dist.is_torch_dist_directory(path):
        return _import_legacy_with_optimizer(path)
    return _import_torch_dist(path, optimizer=True)


def _import_legacy_with_optimizer(path: str):
    """The legacy format's import plus, when every rank directory holds the
    distributed optimizer's `distrib_optim.pt` (megatron-core's gathered
    dp_zero layout), its state; kinds empty otherwise (weights only)."""
    from megatron_sr.checkpointing import megatron_lm_optimizer

    args, config, iteration, model, common = _import_legacy(path)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    files = {tp_rank + tp * pp_rank: os.path.join(path, _legacy_rank_dir(tp_rank, pp_rank, pp))
             for tp_rank in range(tp) for pp_rank in range(pp)}
    optimizer_files = {g: os.path.join(d, "distrib_optim.pt") for g, d in files.items()}
    if not all(os.path.isfile(f) for f in optimizer_files.values()):
        return args, config, iteration, model, {}, {}
    groups = megatron_lm_optimizer.dp_zero_groups(
        path, {g: _read(f) for g, f in optimizer_files.items()})
    saved = megatron_lm_optimizer.bucket_states(path, args, config, model, groups,
                                                coalesced=True)
    return args, config, iteration, model, common, saved


def _legacy_rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def _import_legacy(path: str):
    """(args, ModelConfig, iteration, merged weights, the first rank file's
    entries other than "model"); each rank file is read once."""
    rank_dirs = sorted(d for d in (os.listdir(path) if os.path.isdir(path) else [])
                       if d.startswith("mp_rank_"))
    if not rank_dirs:
        raise ValueError(f"{path} holds neither a Megatron-LM torch_dist checkpoint "
                         f"(metadata.json) nor legacy mp_rank_* directories")
    first_file = os.path.join(path, rank_dirs[0], "model_optim_rng.pt")
    first = _read(first_file)
    args = first["args"]
    if "model" not in first:
        raise ValueError(f"{path}: no 'model' entry (virtual pipeline stages 'model0', ... are "
                         f"not supported)")
    if any(k.startswith("language_model") for k in first["model"]):
        raise ValueError(f"{path}: the pre-megatron-core 'language_model' layout "
                         f"(--use-legacy-models) is not supported")
    for attribute in ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers"):
        if getattr(args, attribute, None):
            raise _refuse(path, f"--{attribute.replace('_', '-')} (an uneven legacy pipeline "
                                f"split; save it with --ckpt-format torch_dist)")
    config = model_config_from_megatron_args(args, path)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    ranks: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for tp_rank in range(tp):
        for pp_rank in range(pp):
            file = os.path.join(path, _legacy_rank_dir(tp_rank, pp_rank, pp),
                                "model_optim_rng.pt")
            if not os.path.isfile(file):
                raise ValueError(f"{file} is missing (TP={tp} x PP={pp} checkpoint)")
            state = (first if file == first_file else _read(file))["model"]
            mapping = dict(enumerate(_stage_layers(config, pp, pp_rank)))
            renamed = {}
            for name, tensor in state.items():
                if name.endswith("_extra_state"):
                    continue
                name = local_name(name)
                if name == "output_layer.weight" and not config.untie_embeddings_and_output_weights:
                    if pp == 1 or pp_rank != pp - 1:
                        continue
                    name = WORD_EMBEDDING_NAME
                renamed[_renumber(name, mapping)] = tensor
            ranks[(tp_rank, pp_rank)] = renamed
    common = {key: value for key, value in first.items() if key != "model"}
    return args, config, int(first["iteration"]), merge_state_dicts(ranks, config), common


def _holds_megatron_args(directory: str) -> bool:
    """Whether `directory`'s first mp_rank_*/model_optim_rng.pt names
    argparse.Namespace (Megatron-LM's args; ours are a plain dict). Lists the
    pickle's globals without running it."""
    rank_dirs = sorted(d for d in os.listdir(directory) if d.startswith("mp_rank_"))
    path = os.path.join(directory, rank_dirs[0], "model_optim_rng.pt") if rank_dirs else ""
    if not os.path.isfile(path):
        return False
    from megatron_sr.checkpointing.megatron_pickle import named_globals

    try:
        return "argparse.Namespace" in named_globals(path)
    except ValueError:  # not a readable torch.save file: not Megatron-LM's
        return False


def megatron_lm_layout(directory: str) -> Optional[str]:
    """One line naming the command that converts `directory` when it is a
    Megatron-LM checkpoint (a --save directory or an iteration directory,
    torch_dist or legacy); None otherwise. Runs no pickle (an interrupted
    legacy save of ours, whose args are a dict, is not taken for one)."""
    from megatron_sr.checkpointing import megatron_torch_dist

    candidates = [directory]
    tracker = os.path.join(directory, "latest_checkpointed_iteration.txt")
    if os.path.isfile(tracker):
        with open(tracker, "rb") as f:
            value = f.read(64).decode("utf-8", "replace").strip()
        candidates.append(os.path.join(directory, "release" if value == "release"
                                       else f"iter_{int(value):07d}" if value.isdigit()
                                       else value))
    for candidate in candidates:
        if not os.path.isdir(candidate):
            continue
        if megatron_torch_dist.is_torch_dist_directory(candidate):
            kind = "torch_dist"
        elif _holds_megatron_args(candidate):
            kind = "legacy (--ckpt-format torch)"
        else:
            continue
        return (f"{directory} is a Megatron-LM {kind} checkpoint, not a megatron_sr one: "
                f"convert it with tools/checkpoint_convert.py --from-megatron --load "
                f"{directory} --save NEW_DIR, then --load NEW_DIR")
    return None


def description_from_megatron_args(args: argparse.Namespace, config: ModelConfig) -> dict:
    """Our checkpoint "args" (`checkpointing.job_description`'s shape) for an
    imported Megatron-LM checkpoint."""
    from megatron_sr.checkpointing.description import plain_data as _plain
    from megatron_sr.config import DataConfig, OptimizerConfig, ParallelConfig

    tokenizer_type = getattr(args, "tokenizer_type", None) or "NullTokenizer"
    data = DataConfig(tokenizer_type=tokenizer_type, vocab_file=getattr(args, "vocab_file", None),
                      merge_file=getattr(args, "merge_file", None),
                      tokenizer_model=getattr(args, "tokenizer_model", None),
                      vocab_size=getattr(args, "vocab_size", None), seq_length=config.seq_length)
    return _plain({"model": dataclasses.asdict(config),
                   "parallel": dataclasses.asdict(ParallelConfig(
                       tensor_model_parallel_size=args.tensor_model_parallel_size,
                       pipeline_model_parallel_size=args.pipeline_model_parallel_size)),
                   "optimizer": dataclasses.asdict(OptimizerConfig()),
                   "data": dataclasses.asdict(data), "unpadded_vocab_size": None,
                   "imported_from": {"megatron_lm": True}})


def consumed_samples(args: argparse.Namespace) -> int:
    return int(getattr(args, "consumed_train_samples", 0) or 0)

