"""--use-checkpoint-args: the model's flags from the checkpoint --load names.

Megatron-LM's rule, applied to the parsed flags before they are validated:

- the sizes --num-layers, --hidden-size, --num-attention-heads, --seq-length,
  --ffn-hidden-size, --kv-channels and --max-position-embeddings come from
  the checkpoint where the command line leaves them out; one the command line
  gives is kept (and the strict load refuses a model that differs);
- the other architecture flags (position embedding and RoPE, norm,
  activation, biases, tied embeddings, grouped-query attention, dropout)
  replace the command line's;
- with --use-mp-args-from-checkpoint-args, the tensor, pipeline and virtual
  pipeline parallel sizes replace the command line's too.

The checkpoint is the one the load will restore (the tracker's iteration, or
--ckpt-step's); one --load does not hold leaves the flags as given. The
tokenizer stays the command line's (the load checks the vocabulary against
the checkpoint's). `apply_checkpoint_args` returns the [flags] line naming
every value it changed.

Every rank reads the description itself, before any process group exists
(no collective): the manifest is checked, the rank-0 file's "args" (torch)
or the `common` entry (torch_dist) is read with weights_only, and the
checksums are left to the load, which verifies every file before it
restores anything.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Optional

import torch

from megatron_sr.checkpointing.manifest import (STATE_FILENAME, CheckpointError, rank_dir_name,
                                                read_manifest)
from megatron_sr.checkpointing.training_checkpoint import load_target
from megatron_sr.config.derived import DerivationFlags
from megatron_sr.config.flags import FlagSpec, flag_fields
from megatron_sr.config.model import ModelConfig
from megatron_sr.config.parallel import ParallelConfig

# ModelConfig fields taken from the checkpoint where the command line leaves them out.
FILLED_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "seq_length",
                 "ffn_hidden_size", "kv_channels", "max_position_embeddings")
# ModelConfig fields whose checkpoint value replaces the command line's
# (grouped-query attention is derived from num_query_groups, see `_model_values`).
REPLACED_FIELDS = ("position_embedding_type", "rotary_base", "rotary_percent",
                   "rotary_interleaved", "use_rope_scaling", "rope_scaling_factor",
                   "normalization", "layernorm_epsilon", "qk_layernorm", "apply_layernorm_1p",
                   "activation", "add_bias_linear", "add_qkv_bias",
                   "untie_embeddings_and_output_weights",
                   "hidden_dropout", "attention_dropout")
_SPECS = {field.name: spec for cls in (ModelConfig, ParallelConfig, DerivationFlags)
          for field, spec in flag_fields(cls)}


def read_checkpoint_description(load: str, step: Optional[int]
                                ) -> tuple[Optional[str], Optional[dict]]:
    """(iteration directory, its description: `job_description`'s dict) of the
    checkpoint that --load (and --ckpt-step `step`) name; (None, None) when
    --load holds none. CheckpointError naming the file when the checkpoint is
    incomplete or carries no description. Reads in this process only."""
    _, directory = load_target(load, step)
    if directory is None:
        return None, None
    manifest = read_manifest(directory)
    if manifest["format"] == "torch_dist":
        from megatron_sr.checkpointing import torch_dist

        description = torch_dist.read_common_alone(directory, manifest).get("args")
    else:
        rank_dir = rank_dir_name(0, 0, manifest["pipeline_model_parallel_size"])
        path = os.path.join(directory, rank_dir, STATE_FILENAME)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise CheckpointError(f"{path} could not be read: {exc}") from exc
        description = state.get("args") if isinstance(state, dict) else None
    if not (isinstance(description, dict) and isinstance(description.get("model"), dict)
            and isinstance(description.get("parallel"), dict)):
        raise CheckpointError(f"{directory} holds no description of its model (\"args\"): "
                              f"--use-checkpoint-args cannot take the flags from it")
    return directory, description


def _model_values(model: dict) -> dict[str, Any]:
    """{flag dest: value} of the architecture that `model` (a description's
    "model") records, FILLED_FIELDS first; names it lacks are left out."""
    values = {name: model[name] for name in FILLED_FIELDS + REPLACED_FIELDS if name in model}
    if "num_query_groups" in model and "num_attention_heads" in model:
        grouped = model["num_query_groups"] != model["num_attention_heads"]
        values.update(group_query_attention=grouped,
                      num_query_groups=model["num_query_groups"] if grouped else None)
    return values


def _parallel_values(description: dict) -> dict[str, Any]:
    """{flag dest: value} of the TP, PP and virtual pipeline sizes the
    description records (the last as layers per virtual stage)."""
    parallel, layers = description["parallel"], description["model"].get("num_layers")
    values = {name: parallel[name] for name in ("tensor_model_parallel_size",
                                                "pipeline_model_parallel_size")
              if name in parallel}
    virtual = parallel.get("virtual_pipeline_model_parallel_size")
    if "pipeline_model_parallel_size" in parallel and layers is not None:
        values["num_layers_per_virtual_pipeline_stage"] = (
            None if virtual is None else layers // parallel["pipeline_model_parallel_size"]
            // virtual)
    return values


def _shown(spec: FlagSpec, value: Any) -> str:
    """`value` as the command line says it (`--swiglu`, `--num-layers 2`)."""
    switch = {"store_true": value is True, "store_false": value is False,
              "store_const": value == spec.const}.get(spec.action)
    if switch is None and isinstance(value, bool):
        switch = value
    if switch is None:
        return f"no {spec.name}" if value is None else f"{spec.name} {value}"
    return spec.name if switch else f"no {spec.name}"


def apply_checkpoint_args(args: argparse.Namespace) -> list[str]:
    """Sets the architecture flags of `args` (parsed, aliases resolved, not yet
    validated; `args.load` set) from the checkpoint --load names, as the module
    docstring says; with --use-mp-args-from-checkpoint-args the parallel sizes
    too. Returns the [flags] notice lines. ValueError naming --load's
    checkpoint file and what is wrong with it otherwise."""
    try:
        directory, description = read_checkpoint_description(args.load, args.ckpt_step)
    except CheckpointError as exc:
        raise ValueError(f"--use-checkpoint-args: {exc}") from exc
    if directory is None:
        return [f"[flags] --use-checkpoint-args: --load {args.load} holds no checkpoint; the "
                f"model's flags are the command line's"]
    values = _model_values(description["model"])
    if args.use_mp_args_from_checkpoint_args:
        values.update(_parallel_values(description))
    taken, kept = [], []
    for name, value in values.items():
        current, spec = getattr(args, name), _SPECS[name]
        if name in FILLED_FIELDS and current is not None:
            if current != value:
                kept.append(f"{_shown(spec, current)} (the checkpoint has {value})")
            continue
        if current != value:
            replaced = "" if current is None else f" (instead of {_shown(spec, current)})"
            taken.append(_shown(spec, value) + replaced)
        setattr(args, name, value)
    line = f"[flags] --use-checkpoint-args: from {directory}: "
    line += ", ".join(taken) if taken else "the command line already matches it"
    if kept:
        line += f"; kept the command line's {', '.join(kept)}"
    return [line]
