"""The GPT recipe: Megatron-LM's providers for `megatron_sr.training.pretrain`
(see its docstring for their contracts). pretrain_gpt.py passes them, and
`pretrain` takes them where a provider is None; a script that changes the
model, the loss or the data passes its own (examples/pretrain_gpt_zloss.py
replaces `forward_step` and `loss_func`, keeping the others).

    model_provider       one GPTModel chunk: embedding on the first stage, output layer
                         and per-token loss on the last
    get_batch            the next micro-batch of a chunk's stream, on the device, with the
                         document flags' masks and positions
    forward_step         get_batch -> the chunk's forward -> (output, loss_func)
    loss_func            the micro-batch's mean loss over the tokens that count
    train_valid_test_datasets_provider   Megatron GPT datasets of --data-path (or --mock-data)

`job` is the run's typed configuration (`megatron_sr.config.JobConfig`):
what Megatron's providers read from `get_args()`.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

from megatron_sr import parallel_state
from megatron_sr.data.document_masks import document_inputs
from megatron_sr.data.gpt_dataset import build_gpt_datasets
from megatron_sr.model import GPTModel


def model_provider(pre_process: bool = True, post_process: bool = True, *, job, layers,
                   device) -> GPTModel:
    """One chunk of the GPT: the global layers `layers`, the embedding on the
    first stage (`pre_process`), the output layer and the loss on the last."""
    return GPTModel(job.model, pre_process=pre_process, post_process=post_process,
                    layer_offset=layers.start, num_layers=len(layers),
                    sequence_parallel=job.parallel.sequence_parallel, device=device)


def get_batch(data_iterator, model) -> tuple:
    """(tokens, labels, loss_mask, attention_mask, position_ids) of the next
    micro-batch for the chunk `model`, on this rank's device, in Megatron's
    order: tokens and labels int64 [b, s] (the stream's rows [b, s + 1]
    shifted by one); loss_mask fp32 [b, s] of the tokens that count, None when
    all do (--eod-mask-loss); attention_mask a `DocumentMask` (Megatron's
    [b, 1, s, s] mask as document ids [b, s]), None for causal
    (--reset-attention-mask); position_ids [b, s],
    None for 0..s-1 (--reset-position-ids); see `megatron_sr.data.document_masks`.
    The document flags come from the stream's `documents`
    (`megatron_sr.training.data.DocumentSettings`; a plain iterator has none).
    A chunk without an iterator (neither embedding nor loss, and no document
    flags) draws nothing and gets five Nones."""
    documents = getattr(data_iterator, "documents", None)
    every_chunk = documents is not None and documents.every_chunk
    if data_iterator is None or not (model.pre_process or model.post_process or every_chunk):
        return None, None, None, None, None
    batch = next(data_iterator).to(parallel_state.get_default_device(), non_blocking=True)
    tokens, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    if documents is None or not (documents.eod_mask_loss or every_chunk):
        return tokens, labels, None, None, None
    inputs = document_inputs(tokens, documents.eod, eod_mask_loss=documents.eod_mask_loss,
                             reset_position_ids=documents.reset_position_ids,
                             reset_attention_mask=documents.reset_attention_mask)
    return tokens, labels, inputs.loss_mask, inputs.attention_mask, inputs.position_ids


def loss_func(loss_mask: Optional[torch.Tensor], output_tensor: torch.Tensor) -> torch.Tensor:
    """The micro-batch's mean loss (fp32 scalar) over the tokens `loss_mask` keeps
    (all of them when None), from the per-token losses [b, s] of the last stage."""
    losses = output_tensor.float()
    if loss_mask is None:
        return losses.mean()
    return torch.sum(losses * loss_mask) / loss_mask.sum().clamp(min=1.0)


def forward_step(data_iterator, model):
    """One micro-batch through the chunk `model`: (per-token losses [b, s] on
    the last stage, else hidden states; the loss function of this micro-batch)."""
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator, model)
    output_tensor = model(tokens, position_ids, labels=labels if model.post_process else None,
                          attention_mask=attention_mask)
    return output_tensor, functools.partial(loss_func, loss_mask)


def train_valid_test_datasets_provider(train_val_test_num_samples: Sequence[int], *, job,
                                       tokenizer) -> tuple:
    """Megatron GPT datasets of --data-path and --split, of --train-data-path,
    --valid-data-path and --test-data-path, or of --mock-data, see
    `megatron_sr.data.gpt_dataset`."""
    return build_gpt_datasets(job.data, tokenizer, train_val_test_num_samples, job.training.seed)
