"""Loads are strict: a checkpoint's model must be this run's model.

The saved parameters are exactly the model's, with its shapes, and the
vocabulary is this run's up to the padding rows of the embedding. Anything
else is a `CheckpointError` naming the parameter and the flags that decide
it. Both formats and the tools that load weights (text generation) check
through these functions. A resume also needs what the checkpoint was saved
without (--no-save-optim, --no-save-rng) to be left out of the load
(`check_saved_parts`).
"""
from __future__ import annotations

import torch

from megatron_sr.checkpointing.manifest import CheckpointError
from megatron_sr.model import named_parameters_global


def check_vocabulary(job, description: dict, source: str) -> None:
    """CheckpointError unless the checkpoint's unpadded vocabulary (its "args")
    is this run's: only the padding rows of the embedding may differ between
    them. Checkpoints that do not record it (imported from Megatron-LM) pass."""
    saved = description.get("unpadded_vocab_size") if isinstance(description, dict) else None
    if saved is not None and saved != job.unpadded_vocab_size:
        raise CheckpointError(
            f"{source} was trained with a vocabulary of {saved} tokens, this run's tokenizer has "
            f"{job.unpadded_vocab_size} (check --tokenizer-type, --vocab-file, --vocab-size): "
            f"the embedding may differ only in its padding rows")


def load_model_state(model, saved: dict, source: str) -> None:
    """Copies `saved` (global name -> tensor) into this rank's parameters. The
    load is strict: CheckpointError naming the parameter when the model has a
    name `saved` lacks, `saved` has one the model lacks (e.g. a layer more), or
    a shape differs. Nothing is copied unless every name and shape match."""
    params = dict(named_parameters_global(model))
    for name, param in params.items():
        if name not in saved:
            raise CheckpointError(f"{source} has no parameter {name}: the checkpoint was "
                                  f"saved from a different model (e.g. --num-layers, "
                                  f"--swiglu, --disable-bias-linear or tied embeddings)")
        tensor = saved[name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(
                f"{source}: parameter {name} has shape {tuple(tensor.shape)} in the checkpoint "
                f"but {tuple(param.shape)} in this model (check --hidden-size, "
                f"--ffn-hidden-size, --num-attention-heads, the vocabulary and TP size)")
    extra = sorted(set(saved) - set(params))
    if extra:
        raise CheckpointError(extra_parameters_message(source, extra))
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])


def extra_parameters_message(source: str, extra: list[str]) -> str:
    """The error for a checkpoint holding parameters (`extra`, sorted) that
    this model lacks."""
    more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
    return (f"{source} holds parameter {extra[0]}{more}, which this model lacks: the checkpoint "
            f"was saved from a different model (e.g. a larger --num-layers, "
            f"--untie-embeddings-and-output-weights or biases); loads are strict")


def check_saved_parts(state: dict, source: str, *, load_optim: bool, load_rng: bool) -> None:
    """CheckpointError naming the flags to add when the load needs a part the
    checkpoint lacks. `state`: the legacy file's state or torch_dist's
    `common` entry; its "optimizer" is None or absent without optimizer state
    (--no-save-optim, or a conversion that dropped it) and its "omitted" lists
    the parts the saving run left out on purpose ("optimizer", "rng"). A
    checkpoint without RNG states that does not list "rng" there (one
    reshaped by tools/checkpoint_convert.py) loads without them."""
    omitted = state.get("omitted") or ()
    missing = []
    if load_optim and state.get("optimizer") is None:
        why = "saved with --no-save-optim" if "optimizer" in omitted else "a conversion dropped it"
        missing.append(("optimizer state", why, "--no-load-optim"))
    if load_rng and "rng" in omitted:
        missing.append(("RNG states", "saved with --no-save-rng", "--no-load-rng"))
    if missing:
        raise CheckpointError(
            f"{source} holds no {' and no '.join(what for what, _, _ in missing)} "
            f"({'; '.join(why for _, why, _ in missing)}): resume from it with "
            f"{' '.join(flag for _, _, flag in missing)}, or start a new run from its weights "
            f"with --finetune")
