"""Choosing the next token from full-vocabulary logits.

`sample_next_tokens(logits [b, V], generator, ...)` -> token ids [b] int64.
A pure function of its inputs: given the same logits and generator state it
returns the same tokens, so every TP rank that holds the same gathered logits
and a generator seeded alike picks the same tokens without communicating.
Sampling runs in fp32 on the logits' device (generation passes CPU tensors
and a CPU generator, so CPU and GPU runs draw alike).
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def check_sampling(temperature: float, top_k: int, top_p: float,
                   vocab_size: Optional[int] = None) -> None:
    """ValueError naming the flag (--temperature, --top-k, --top-p) whose value
    cannot be sampled with: NaN and infinities included."""
    if not 0.0 < temperature < math.inf:
        raise ValueError(f"--temperature must be a finite number > 0 (use --greedy for argmax), "
                         f"got {temperature}")
    if top_k < 0 or (vocab_size is not None and top_k > vocab_size):
        raise ValueError(f"--top-k must be in [0, vocabulary size {vocab_size}], got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")


def sample_next_tokens(logits: torch.Tensor, generator: torch.Generator, *, greedy: bool,
                       temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
                       ) -> torch.Tensor:
    """greedy: the argmax (lowest id among ties). Otherwise one draw per row
    from softmax(logits / temperature) restricted to the `top_k` largest
    logits (0: all) and then to the smallest set of most likely tokens whose
    probability reaches `top_p` (1.0: all; the most likely token always stays)."""
    if greedy:
        return logits.argmax(dim=-1)
    check_sampling(temperature, top_k, top_p, logits.shape[-1])
    logits = logits.float() / temperature
    if top_k > 0:
        kth_largest = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
