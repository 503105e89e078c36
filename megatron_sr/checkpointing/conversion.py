"""Checkpoints as whole models: merge all ranks' files, reshape TP/PP, export.

The offline tools (`tools/checkpoint_convert.py`, `tools/text_generation.py`)
read a checkpoint written by any TP/PP layout into one `FullCheckpoint`: the
model config it was trained with, the full (unsharded) weights keyed by global
parameter name, and, when present, the full optimizer state per parameter.
From there `write_reshaped` writes it back at another layout (resumable:
optimizer state and scheduler travel along; RNG states, which belong to ranks
of the old layout, do not) and `megatron_sr.model.hf_conversion` exports it.
Everything runs in one process, on the CPU, without process groups.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_sr.checkpointing.description import plain_data
from megatron_sr.checkpointing.legacy import read_all_rank_states, write_checkpoint
from megatron_sr.checkpointing.manifest import (CheckpointError, read_manifest,
                                                resolve_checkpoint_dir)
from megatron_sr.config import ModelConfig
from megatron_sr.model.state_dict_layout import (global_parameter_names, merge_state_dicts,
                                                split_state_dict, tensor_parallel_split)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_config_from_description(description: dict, source: str = "the checkpoint"
                                  ) -> ModelConfig:
    """The ModelConfig stored in a checkpoint's "args" (see
    `checkpointing.description.job_description`); CheckpointError naming
    `source` when they do not describe one."""
    try:
        fields = dict(description["model"])
        fields["params_dtype"] = _DTYPES[fields["params_dtype"]]
        return ModelConfig(**fields)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: its args do not describe a model "
                              f"({type(exc).__name__}: {exc})") from None


@dataclass
class FullCheckpoint:
    """One checkpoint, merged over its ranks.

    model: global name -> full tensor. optimizer: None, or {"strategy", "step",
    "skipped_steps", "params": {kind: {global name -> full tensor}}}.
    """

    directory: str
    iteration: int
    description: dict
    config: ModelConfig
    model: dict[str, torch.Tensor]
    optimizer: Optional[dict]
    lr_scheduler: Optional[dict]
    consumed_train_samples: int


def _virtual_size(description: dict) -> Optional[int]:
    return description["parallel"].get("virtual_pipeline_model_parallel_size")


def load_full_checkpoint(path: str, *, with_optimizer: bool = True) -> FullCheckpoint:
    """Reads and merges every rank file of the checkpoint at `path` (a --save
    directory or an iter_XXXXXXX directory). CheckpointError on a missing,
    partial or corrupted checkpoint, naming the file. Without `with_optimizer`
    the result has none: a torch_dist checkpoint is then read without its
    optimizer entries; the legacy format's files hold both in one pickle and
    are read whole."""
    directory = resolve_checkpoint_dir(path)
    manifest = read_manifest(directory)
    if manifest.get("format") == "torch_dist":
        return _load_full_torch_dist(directory, manifest, with_optimizer)
    directory, manifest, states = read_all_rank_states(path)
    first = states[(0, 0)]
    description = first.get("args")
    config = model_config_from_description(description, directory)
    vp = _virtual_size(description)
    try:
        model = merge_state_dicts({k: s["model"] for k, s in states.items()}, config,
                                  virtual_pipeline_parallel_size=vp)
    except ValueError as exc:
        raise CheckpointError(f"{directory}: {exc}") from exc
    optimizer = None
    if with_optimizer and first.get("optimizer") is not None:
        kinds = sorted({kind for s in states.values()
                        for per_param in s["optimizer"]["params"].values() for kind in per_param})
        optimizer = {key: first["optimizer"][key] for key in ("strategy", "step", "skipped_steps")}
        optimizer["params"] = {
            kind: merge_state_dicts(
                {k: {name: per_param[kind] for name, per_param in s["optimizer"]["params"].items()}
                 for k, s in states.items()}, config, virtual_pipeline_parallel_size=vp)
            for kind in kinds}
    return FullCheckpoint(directory=directory, iteration=manifest["iteration"],
                          description=description, config=config, model=model,
                          optimizer=optimizer, lr_scheduler=first.get("lr_scheduler"),
                          consumed_train_samples=int(first.get("consumed_train_samples", 0)))


def _from_logical(tensor: torch.Tensor, name: str, config: ModelConfig) -> torch.Tensor:
    """A torch_dist tensor (stored as [stride, n / stride, ...] along a strided
    partition dim, see `checkpointing.global_blocks`) in its parameter's shape."""
    split = tensor_parallel_split(name, config)
    if split is None or split.partition_stride == 1:
        return tensor
    dim = split.partition_dim
    return tensor.reshape(*tensor.shape[:dim], -1, *tensor.shape[dim + 2:])


def _load_full_torch_dist(directory: str, manifest: dict, with_optimizer: bool
                          ) -> FullCheckpoint:
    from megatron_sr.checkpointing import torch_dist

    common, tensors, _ = torch_dist.read_full(directory, manifest, optimizer=with_optimizer)
    description = common.get("args")
    config = model_config_from_description(description, directory)
    names = global_parameter_names(config)
    try:
        model = {name: _from_logical(tensors[f"model/{name}"], name, config) for name in names}
    except KeyError as exc:
        raise CheckpointError(f"{directory}: no tensor {exc} for the model its args "
                              "describe") from exc
    kinds = sorted({key.split("/")[1] for key in tensors if key.startswith("optimizer/")})
    optimizer = None
    if kinds:
        optimizer = dict(common["optimizer"])
        optimizer["params"] = {kind: {name: _from_logical(tensors[f"optimizer/{kind}/{name}"],
                                                          name, config) for name in names}
                               for kind in kinds}
    return FullCheckpoint(directory=directory, iteration=manifest["iteration"],
                          description=description, config=config, model=model,
                          optimizer=optimizer, lr_scheduler=common.get("lr_scheduler"),
                          consumed_train_samples=int(common.get("consumed_train_samples", 0)))


def write_reshaped(checkpoint: FullCheckpoint, save_dir: str, tensor_parallel_size: int,
                   pipeline_parallel_size: int,
                   virtual_pipeline_parallel_size: Optional[int] = None) -> str:
    """Writes `checkpoint` under `save_dir` at the given layout (same iteration,
    tracker included); a run with those sizes resumes from it with --load.
    Returns the iteration directory."""
    layout = dict(tensor_parallel_size=tensor_parallel_size,
                  pipeline_parallel_size=pipeline_parallel_size,
                  virtual_pipeline_parallel_size=virtual_pipeline_parallel_size)
    model_ranks = split_state_dict(checkpoint.model, checkpoint.config, **layout)
    optimizer_ranks = None
    if checkpoint.optimizer is not None:
        per_kind = {kind: split_state_dict(states, checkpoint.config, **layout)
                    for kind, states in checkpoint.optimizer["params"].items()}
        optimizer_ranks = {
            key: {**{k: v for k, v in checkpoint.optimizer.items() if k != "params"},
                  "params": {name: {kind: per_kind[kind][key][name] for kind in per_kind}
                             for name in model_ranks[key]}}
            for key in model_ranks}
    description = dict(checkpoint.description)
    description["parallel"] = dict(
        description["parallel"], tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_parallel_size)
    rank_states = {
        key: {"checkpoint_version": 1, "iteration": checkpoint.iteration,
              "consumed_train_samples": checkpoint.consumed_train_samples,
              "args": description, "model": model_ranks[key],
              "optimizer": None if optimizer_ranks is None else optimizer_ranks[key],
              "lr_scheduler": checkpoint.lr_scheduler}
        for key in model_ranks}
    return write_checkpoint(save_dir, checkpoint.iteration, rank_states, tensor_parallel_size,
                            pipeline_parallel_size)


_EXPORT_NAMES = {"vocab_file": "vocab.json", "merge_file": "merges.txt",
                 "tokenizer_model": "tokenizer.model"}


def tokenizer_export_files(description: dict) -> list[tuple[str, str]]:
    """(resolved source path, file name in the export) of the files the
    checkpoint's --tokenizer-type reads, and only those: GPT2BPETokenizer its
    --vocab-file and --merge-file, the SentencePiece types their
    --tokenizer-model, HuggingFaceTokenizer its tokenizer.json (--tokenizer-model
    or the tokenizer.json in that folder), NullTokenizer, TikTokenizer and
    Llama3Tokenizer none.
    Empty when a file the type needs is not named or does not exist (the
    export then carries no tokenizer).

    The checkpoint's metadata is not trusted: each path is resolved (symlinks
    followed), must be a regular file, and must build the tokenizer with the
    checkpoint's vocabulary size; otherwise ValueError naming the file. So a
    crafted checkpoint cannot make the export copy an arbitrary file.
    """
    from megatron_sr.data.tokenizers import TOKENIZER_FLAGS, build_tokenizer

    data = description["data"]
    kind = data["tokenizer_type"]
    if kind not in TOKENIZER_FLAGS:
        raise ValueError(f"checkpoint names an unknown --tokenizer-type {kind!r}")
    if kind in ("TikTokenizer", "Llama3Tokenizer"):  # tiktoken ranks: no transformers file
        return []
    export_names = (dict(_EXPORT_NAMES, tokenizer_model="tokenizer.json")
                    if kind == "HuggingFaceTokenizer" else _EXPORT_NAMES)
    sources = {}
    for flag in TOKENIZER_FLAGS[kind]:
        if flag not in export_names:
            continue
        path = data.get(flag)
        if kind == "HuggingFaceTokenizer" and path and os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")  # --tokenizer-model may name the folder
        if not path or not os.path.exists(path):
            return []
        resolved = os.path.realpath(path)
        if not os.path.isfile(resolved):
            raise ValueError(f"the checkpoint's --{flag.replace('_', '-')} {data[flag]} is not "
                             f"a regular file ({resolved})")
        sources[flag] = resolved
    if not sources:
        return []
    try:
        tokenizer = build_tokenizer(kind, **sources)
    except Exception as exc:  # any parse failure of a file that is not this tokenizer's
        raise ValueError(f"the checkpoint's tokenizer files {sorted(sources.values())} do not "
                         f"build its --tokenizer-type {kind}: {exc}") from exc
    expected = description.get("unpadded_vocab_size")
    if expected is not None and tokenizer.vocab_size != expected:
        raise ValueError(f"the checkpoint's tokenizer files {sorted(sources.values())} give a "
                         f"vocabulary of {tokenizer.vocab_size}, the checkpoint was trained with "
                         f"{expected}")
    return [(path, export_names[flag]) for flag, path in sources.items()]


def export_hugging_face(checkpoint: FullCheckpoint, output_dir: str,
                        dtype: Optional[torch.dtype] = None) -> str:
    """Writes a transformers model directory (config.json, model.safetensors)
    and the tokenizer files `tokenizer_export_files` accepts. Returns the
    architecture family ("gpt2" or "llama")."""
    from megatron_sr.data.tokenizers import build_tokenizer
    from megatron_sr.model.hf_conversion import save_hf_model

    data = checkpoint.description["data"]
    extra = {}
    tokenizer_files = tokenizer_export_files(checkpoint.description)
    if tokenizer_files or data["tokenizer_type"] == "NullTokenizer":
        flag_of = {name: flag for flag, name in _EXPORT_NAMES.items()}
        flag_of["tokenizer.json"] = "tokenizer_model"  # HuggingFaceTokenizer
        tokenizer = build_tokenizer(
            data["tokenizer_type"], vocab_size=data.get("vocab_size"),
            **{flag_of[name]: source for source, name in tokenizer_files})
        extra = {"bos_token_id": tokenizer.eod, "eos_token_id": tokenizer.eod}
    family = save_hf_model(checkpoint.model, checkpoint.config, output_dir, dtype=dtype,
                           extra_config=extra)
    for source, name in tokenizer_files:
        shutil.copyfile(source, os.path.join(output_dir, name))
    return family


def _hugging_face_tokenizer(hf_dir: str, hf_vocab: int, seq_length: int):
    """The DataConfig of the tokenizer files in `hf_dir`: vocab.json +
    merges.txt (GPT2BPETokenizer), else tokenizer.model (SentencePiece), else
    tokenizer.json (HuggingFaceTokenizer). With none of them the checkpoint
    gets a NullTokenizer of the model's vocabulary, and a notice says so
    (text generation then takes token ids). Half a GPT-2 pair is a
    CheckpointError naming the missing file."""
    from megatron_sr.config import DataConfig

    def path(name: str) -> Optional[str]:
        candidate = os.path.join(hf_dir, name)
        return os.path.realpath(candidate) if os.path.isfile(candidate) else None

    vocab, merges = path("vocab.json"), path("merges.txt")
    if vocab and merges:
        return DataConfig(tokenizer_type="GPT2BPETokenizer", vocab_file=vocab, merge_file=merges,
                          seq_length=seq_length)
    if path("tokenizer.model"):
        return DataConfig(tokenizer_type="SentencePieceTokenizer",
                          tokenizer_model=path("tokenizer.model"), seq_length=seq_length)
    if path("tokenizer.json"):
        return DataConfig(tokenizer_type="HuggingFaceTokenizer",
                          tokenizer_model=path("tokenizer.json"), seq_length=seq_length)
    if vocab or merges:
        missing = "merges.txt" if vocab else "vocab.json"
        raise CheckpointError(f"the Hugging Face model {hf_dir} has "
                              f"{'vocab.json' if vocab else 'merges.txt'} but no {missing}: "
                              f"a GPT-2 tokenizer needs both")
    print(f"[convert] notice: {hf_dir} holds no tokenizer files (vocab.json + merges.txt, "
          f"tokenizer.model or tokenizer.json): the checkpoint gets a NullTokenizer of "
          f"{hf_vocab - 1} ids; copy the tokenizer files into {hf_dir} to keep its tokenizer",
          flush=True)
    return DataConfig(tokenizer_type="NullTokenizer", vocab_size=hf_vocab - 1,
                      seq_length=seq_length)


def import_hugging_face(hf_dir: str, *, make_vocab_size_divisible_by: int = 128,
                        params_dtype: torch.dtype = torch.bfloat16) -> FullCheckpoint:
    """A transformers GPT-2, Llama or Qwen2 model directory as a FullCheckpoint of
    iteration 0 without optimizer state (start from it with --finetune). The
    vocabulary is padded to a multiple of `make_vocab_size_divisible_by`
    (pass the run's --make-vocab-size-divisible-by x TP size). The tokenizer is
    the directory's (`_hugging_face_tokenizer`).
    CheckpointError naming `hf_dir` when its files cannot be read or do not
    fit its config.json (a truncated safetensors file, shapes that differ)."""
    from megatron_sr.config import OptimizerConfig, ParallelConfig
    from megatron_sr.model.hf_conversion import load_hf_model

    from megatron_sr.model.hf_conversion import UnsupportedArchitectureError

    try:
        family, config, model, hf_vocab = load_hf_model(
            hf_dir, params_dtype=params_dtype,
            make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    except (UnsupportedArchitectureError, ImportError):
        raise
    except Exception as exc:  # noqa: BLE001 - a truncated safetensors file, a config that lies
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise CheckpointError(f"the Hugging Face model {hf_dir} could not be read: "
                              f"{type(exc).__name__}: {lines[0][:300] if lines else ''}") from exc
    data = _hugging_face_tokenizer(hf_dir, hf_vocab, config.seq_length)
    description = plain_data({"model": dataclasses.asdict(config),
                              "parallel": dataclasses.asdict(ParallelConfig()),
                              "optimizer": dataclasses.asdict(OptimizerConfig()),
                              "data": dataclasses.asdict(data), "unpadded_vocab_size": hf_vocab,
                              "imported_from": {"hugging_face": os.path.realpath(hf_dir),
                                                "family": family}})
    return FullCheckpoint(directory=hf_dir, iteration=0, description=description, config=config,
                          model=model, optimizer=None, lr_scheduler=None,
                          consumed_train_samples=0)


def import_megatron_lm(path: str, precision: Optional[str] = None) -> FullCheckpoint:
    """A Megatron-LM checkpoint (torch_dist or legacy, local or Transformer
    Engine names) as a FullCheckpoint of its iteration (see
    `checkpointing.megatron_lm`). With `precision` (a --precision strategy)
    and a torch_dist checkpoint holding model-space optimizer state, that
    state comes along as the strategy stores it, with Adam's step and the
    learning-rate schedule (`checkpointing.megatron_lm_optimizer`; the SR key's
    seed is the checkpoint's --seed): the result resumes under --precision
    `precision`. Otherwise weights only (optimizer None: start with
    --finetune)."""
    from megatron_sr.checkpointing import megatron_lm
    from megatron_sr.checkpointing import megatron_lm_optimizer as optim
    from megatron_sr.precision.strategies import get_strategy

    if precision is None:
        args, config, iteration, model = megatron_lm.import_megatron_lm(path)
        common, kinds = {}, {}
    else:
        args, config, iteration, model, common, kinds = \
            megatron_lm.import_megatron_lm_with_optimizer(path)
    description = megatron_lm.description_from_megatron_args(args, config)
    optimizer = lr_scheduler = None
    if kinds:
        strategy = get_strategy(precision)
        model, params = optim.parameter_states(path, model, kinds, strategy,
                                               int(getattr(args, "seed", 1234)), iteration)
        step = optim.adam_step(common, iteration)
        optimizer = {"strategy": strategy.name, "step": step,
                     "skipped_steps": max(iteration - step, 0), "params": params}
        lr_scheduler = optim.lr_scheduler_state(path, args, common, iteration)
        config = optim.with_param_dtype(config, strategy)
        description = megatron_lm.description_from_megatron_args(args, config)
        description["optimizer"]["precision"] = strategy.name
    return FullCheckpoint(directory=path, iteration=iteration, description=description,
                          config=config, model=model, optimizer=optimizer,
                          lr_scheduler=lr_scheduler,
                          consumed_train_samples=megatron_lm.consumed_samples(args))


def export_megatron_lm(checkpoint: FullCheckpoint, save_dir: str, tensor_parallel_size: int,
                       pipeline_parallel_size: int, ckpt_format: str = "torch_dist") -> str:
    """Writes `checkpoint`'s weights as a Megatron-LM checkpoint: torch_dist
    (global tensors: the sizes do not matter) or legacy "torch" at the sizes."""
    from megatron_sr.checkpointing import megatron_lm

    if ckpt_format == "torch_dist":
        return megatron_lm.export_megatron_lm_torch_dist(
            checkpoint.model, checkpoint.config, checkpoint.description, checkpoint.iteration,
            checkpoint.consumed_train_samples, save_dir)
    return megatron_lm.export_megatron_lm(
        checkpoint.model, checkpoint.config, checkpoint.description, checkpoint.iteration,
        checkpoint.consumed_train_samples, save_dir, tensor_parallel_size,
        pipeline_parallel_size)


def model_flags(config: ModelConfig) -> str:
    """The `pretrain_gpt.py` model flags that build `config`'s model (an
    imported checkpoint loads only into that model)."""
    flags = [f"--num-layers {config.num_layers}", f"--hidden-size {config.hidden_size}",
             f"--ffn-hidden-size {config.ffn_hidden_size}",
             f"--num-attention-heads {config.num_attention_heads}",
             f"--seq-length {config.seq_length}",
             f"--max-position-embeddings {config.max_position_embeddings}",
             f"--position-embedding-type {config.position_embedding_type}",
             f"--normalization {config.normalization}",
             f"--norm-epsilon {config.layernorm_epsilon}"]
    if config.position_embedding_type == "rope":
        flags.append(f"--rotary-base {config.rotary_base:g}")
        if config.rotary_percent != 1.0:
            flags.append(f"--rotary-percent {config.rotary_percent:g}")
        if config.rotary_interleaved:
            flags.append("--rotary-interleaved")
        if config.use_rope_scaling:
            flags.append(f"--use-rope-scaling --rope-scaling-factor {config.rope_scaling_factor:g}")
    if config.num_query_groups != config.num_attention_heads:
        flags.append(f"--group-query-attention --num-query-groups {config.num_query_groups}")
    if config.kv_channels is not None:
        flags.append(f"--kv-channels {config.kv_channels}")
    if config.qk_layernorm:
        flags.append("--qk-layernorm")
    if config.apply_layernorm_1p:
        flags.append("--apply-layernorm-1p")
    if config.activation == "swiglu":
        flags.append("--swiglu")
    if config.activation == "squared_relu":
        flags.append("--squared-relu")
    if not config.add_bias_linear:
        flags.append("--disable-bias-linear")
        if config.add_qkv_bias:
            flags.append("--add-qkv-bias")
    if config.untie_embeddings_and_output_weights:
        flags.append("--untie-embeddings-and-output-weights")
    return " ".join(flags)


def describe(checkpoint: FullCheckpoint) -> str:
    """One line: iteration, shape and layout of a checkpoint."""
    config = dataclasses.asdict(checkpoint.config)
    parallel = checkpoint.description["parallel"]
    return (f"iteration {checkpoint.iteration}: {config['num_layers']} layers, hidden "
            f"{config['hidden_size']}, {config['num_attention_heads']} heads, vocab "
            f"{config['vocab_size']}; saved with TP={parallel['tensor_model_parallel_size']} "
            f"PP={parallel['pipeline_model_parallel_size']}")
