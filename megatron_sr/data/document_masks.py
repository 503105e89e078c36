"""Document-aware inputs of a packed sample: Megatron's --eod-mask-loss,
--reset-position-ids and --reset-attention-mask.

A sample of the GPT dataset concatenates documents, each ended by the eod
token. From the input tokens [b, s] (int64) and the eod id, `document_inputs`
derives, as Megatron's `get_ltor_masks_and_position_ids` does (an eod token
belongs to the document it ends):

- loss_mask [b, s] float32: 0 where the input token is eod (the model would be
  asked to predict the next document's first token from nothing), else 1;
- position_ids [b, s] int64: positions restart at 0 after every eod;
- attention_mask: a `DocumentMask`, the mask Megatron builds as [b, 1, s, s]
  bool (True = may attend: causal and within the query's document), held as
  document ids [b, s] (O(b s), never s x s); attention runs document by
  document (`megatron_sr.model.transformer.SelfAttention.core_attention`).

Each is None when its flag is off. Pure tensor functions; every rank that
holds a model chunk computes the same values from the same tokens.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class DocumentMask:
    """Causal attention within documents: query i may attend key j iff
    j <= i and both belong to the same document of their sample.

    document_ids: [b, s] int64, non-decreasing along each row, one id per
    document (on the tokens' device). `segments()` gives each row's
    documents as [start, end) position ranges; it reads the device once (one
    host sync per micro-batch, cached for every layer and for recomputation).
    `dense()` builds the equivalent [b, 1, s, s] bool mask (b s^2 bytes; for
    tests and for code that needs Megatron's tensor)."""

    def __init__(self, document_ids: torch.Tensor):
        if document_ids.dim() != 2:
            raise ValueError(f"DocumentMask takes document ids [b, s], got shape "
                             f"{tuple(document_ids.shape)}")
        self.document_ids = document_ids
        self._segments: Optional[list[list[tuple[int, int]]]] = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The shape of the dense mask: (b, 1, s, s)."""
        b, s = self.document_ids.shape
        return b, 1, s, s

    def segments(self) -> list[list[tuple[int, int]]]:
        """Per row of the batch, its documents' [start, end) ranges, in order,
        covering 0..s."""
        if self._segments is None:
            b, s = self.document_ids.shape
            changes = (self.document_ids[:, 1:] != self.document_ids[:, :-1]).nonzero().tolist()
            starts: list[list[int]] = [[0] for _ in range(b)]
            for row, column in changes:
                starts[row].append(column + 1)
            self._segments = [list(zip(row, row[1:] + [s])) for row in starts]
        return self._segments

    def dense(self) -> torch.Tensor:
        """The mask as [b, 1, s, s] bool, True = may attend."""
        ids = self.document_ids
        s = ids.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool, device=ids.device).tril()
        return ((ids[:, :, None] == ids[:, None, :]) & causal)[:, None]


class DocumentInputs(NamedTuple):
    loss_mask: Optional[torch.Tensor]
    position_ids: Optional[torch.Tensor]
    attention_mask: Optional[DocumentMask]


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
            attention_mask = DocumentMask(after_eod.long().cumsum(dim=1))
    return DocumentInputs(loss_mask, position_ids, attention_mask)


def masked_mean(per_token_loss: torch.Tensor, loss_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of the fp32 per-token losses [b, s] over the positions `loss_mask`
    keeps (all without a mask); 0 when it keeps none."""
    losses = per_token_loss.float()
    if loss_mask is None:
        return losses.mean()
    return (losses * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)
