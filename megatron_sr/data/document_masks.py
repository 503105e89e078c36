"""Document-aware inputs of a packed sample: Megatron's --eod-mask-loss,
--reset-position-ids and --reset-attention-mask.

A sample of the GPT dataset concatenates documents, each ended by the eod
token. From the input tokens [b, s] (int64) and the eod id, `document_inputs`
derives, as Megatron's `get_ltor_masks_and_position_ids` does (an eod token
belongs to the document it ends):

- loss_mask [b, s] float32: 0 where the input token is eod (the model would be
  asked to predict the next document's first token from nothing), else 1;
- position_ids [b, s] int64: positions restart at 0 after every eod;
- attention_mask [b, 1, s, s] bool, True = may attend: causal and within the
  query's document. b x s^2 bytes per micro-batch, built on the tokens' device.

Each is None when its flag is off. Pure tensor functions; every rank that
holds a model chunk computes the same values from the same tokens.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class DocumentInputs(NamedTuple):
    loss_mask: Optional[torch.Tensor]
    position_ids: Optional[torch.Tensor]
    attention_mask: Optional[torch.Tensor]


def document_inputs(tokens: torch.Tensor, eod: int, *, eod_mask_loss: bool,
                    reset_position_ids: bool, reset_attention_mask: bool) -> DocumentInputs:
    """The masks and positions of the module docstring for `tokens` [b, s]."""
    is_eod = tokens == eod
    loss_mask = (~is_eod).float() if eod_mask_loss else None
    position_ids = attention_mask = None
    if reset_position_ids or reset_attention_mask:
        b, s = tokens.shape
        after_eod = torch.zeros_like(is_eod)
        after_eod[:, 1:] = is_eod[:, :-1]  # token j starts a document when token j-1 is eod
        if reset_position_ids:
            index = torch.arange(s, device=tokens.device).expand(b, s)
            start = torch.where(after_eod, index, torch.zeros_like(index)).cummax(dim=1).values
            position_ids = index - start
        if reset_attention_mask:
            document = after_eod.long().cumsum(dim=1)  # [b, s]
            causal = torch.ones(s, s, dtype=torch.bool, device=tokens.device).tril()
            same = document[:, :, None] == document[:, None, :]
            attention_mask = (same & causal)[:, None]
    return DocumentInputs(loss_mask, position_ids, attention_mask)


def masked_mean(per_token_loss: torch.Tensor, loss_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of the fp32 per-token losses [b, s] over the positions `loss_mask`
    keeps (all without a mask); 0 when it keeps none."""
    losses = per_token_loss.float()
    if loss_mask is None:
        return losses.mean()
    return (losses * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)
