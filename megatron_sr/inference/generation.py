"""Autoregressive generation from a GPT on one pipeline stage (PP=1), any TP size.

Every rank of the TP group calls `generate` with the same arguments (it is a
collective: the model's TP layers communicate, and each step all-gathers the
last position's vocab-parallel logits). All TP ranks then hold identical fp32
logits, sample on the CPU from a generator seeded with `seed`, and so return
identical tokens.

Prompts of different lengths share one batch without padding: decoding starts
at the shortest prompt's length and, at every position, a row still inside
its prompt keeps its prompt token instead of the sampled one (every row draws
at every step, so a row's draws do not depend on where the others end).
With `use_cache` each step feeds only the new tokens and attends over a
`KVCache` (linear in length); without it each step reruns the whole prefix,
the reference the cached path is tested against.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_sr.inference.sampling import check_sampling, sample_next_tokens
from megatron_sr.model import GPTModel, KVCache
from megatron_sr.tensor_parallel import gather_from_tensor_model_parallel_region


def _whole_model(model_chunks: Sequence[GPTModel]) -> GPTModel:
    if len(model_chunks) != 1 or not (model_chunks[0].pre_process
                                      and model_chunks[0].post_process):
        raise ValueError("generate needs the whole model on one pipeline stage "
                         "(--pipeline-model-parallel-size 1, no virtual stages); merge the "
                         "pipeline stages of the checkpoint first")
    if model_chunks[0].sequence_parallel:
        raise ValueError("generate needs a model built without --sequence-parallel")
    return model_chunks[0]


@torch.no_grad()
def generate(model_chunks: Sequence[GPTModel], prompt_tokens: Sequence[Sequence[int]],
             max_new_tokens: int, *, greedy: bool = False, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 1234, eod: Optional[int] = None,
             use_cache: bool = True, vocab_size: Optional[int] = None) -> list[list[int]]:
    """Each prompt followed by up to `max_new_tokens` generated token ids.

    `prompt_tokens`: one non-empty list of token ids per sequence. A row stops
    after generating `eod` (which is included in its output). `vocab_size`:
    the tokenizer's size; padded vocabulary ids at or above it are never
    chosen. Sampling parameters as in `sample_next_tokens`. The model runs in
    eval mode (restored afterwards) on its parameters' device.
    """
    model = _whole_model(model_chunks)
    if not prompt_tokens or any(len(prompt) == 0 for prompt in prompt_tokens):
        raise ValueError("generate: every prompt needs at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if not greedy:  # before any forward pass, not at the first draw
        check_sampling(temperature, top_k, top_p, vocab_size)
    lengths = torch.tensor([len(prompt) for prompt in prompt_tokens])
    total = int(lengths.max()) + max_new_tokens
    max_positions = model.config.max_position_embeddings
    if model.config.position_embedding_type == "learned_absolute" and total > max_positions:
        raise ValueError(f"generate: longest prompt ({int(lengths.max())}) + max_new_tokens "
                         f"({max_new_tokens}) exceeds the model's learned positions "
                         f"(--max-position-embeddings {max_positions})")

    tokens = torch.zeros(len(prompt_tokens), total, dtype=torch.int64)
    for row, prompt in enumerate(prompt_tokens):
        tokens[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.int64)
    row_ends = lengths + max_new_tokens  # shortened when a row emits eod
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    kv_cache = KVCache(total) if use_cache else None
    was_training = model.training
    model.eval()
    try:
        fed = 0  # tokens already in the cache
        for position in range(int(lengths.min()), total):
            if bool((position >= row_ends).all()):
                break
            if kv_cache is not None:
                logits = model(tokens[:, fed:position].to(device), kv_cache=kv_cache)
                fed = position
            else:
                logits = model(tokens[:, :position].to(device))
            last = gather_from_tensor_model_parallel_region(logits[:, -1].contiguous())
            last = last.float().cpu()  # [b, V], identical on every TP rank
            if vocab_size is not None:
                last[:, vocab_size:] = float("-inf")
            sampled = sample_next_tokens(last, generator, greedy=greedy, temperature=temperature,
                                         top_k=top_k, top_p=top_p)
            generating = position >= lengths
            tokens[:, position] = torch.where(generating, sampled, tokens[:, position])
            if eod is not None:
                stops = generating & (sampled == eod) & (position < row_ends)
                row_ends = torch.where(stops, torch.full_like(row_ends, position + 1), row_ends)
    finally:
        model.train(was_training)
    return [tokens[row, :int(end)].tolist() for row, end in enumerate(row_ends)]
