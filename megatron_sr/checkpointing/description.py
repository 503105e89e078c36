"""What a checkpoint records about the run that wrote it (its "args").

`job_description` is the run's configuration as plain data: the tools (text
generation, conversion) rebuild the model and tokenizer from it, and a load
checks the vocabulary against it (`strict_load.check_vocabulary`). Imported
checkpoints (Hugging Face, Megatron-LM) get a description of the same shape.
"""
from __future__ import annotations

import dataclasses

import torch


def plain_data(value):
    """A dataclass/dict/list tree with torch dtypes turned into strings, so the
    checkpoint loads with `weights_only=True`."""
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, dict):
        return {k: plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value]
    return value


def job_description(job) -> dict:
    """The run's configuration as plain data: what tools (text generation,
    conversion) need to rebuild the model and tokenizer from a checkpoint."""
    return plain_data({"model": dataclasses.asdict(job.model),
                       "parallel": dataclasses.asdict(job.parallel),
                       "optimizer": dataclasses.asdict(job.optimizer),
                       "data": dataclasses.asdict(job.data),
                       "unpadded_vocab_size": job.unpadded_vocab_size})
