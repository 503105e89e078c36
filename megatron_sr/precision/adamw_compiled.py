"""The "compiled" backend: the torch reference fused by `torch.compile`.

`adamw_torch.update_pairs` on the even-aligned body of a segment
(one Philox call per pair of elements), `adamw_torch.update_elements` on a
lone first or last element and on segments whose storage is not
pair-aligned; compiled with dynamic shapes, once per (form, write modes),
so new sizes do not recompile. Same bits as the eager backend.
"""
from __future__ import annotations

import torch

from megatron_sr.precision.adamw_torch import update_elements, update_pairs

_RECOMPILE_LIMIT = 64

_compiled_updates = {}


def _get_compiled_update(function, modes: tuple[int, int, int]):
    """`function` (`update_elements` or `update_pairs`) compiled for one
    combination of write modes (fixed per strategy, so a run compiles once
    per form; sizes are dynamic)."""
    cache_key = (function.__name__, modes)
    if cache_key not in _compiled_updates:
        def update(param, grad, exp_avg, exp_avg_sq, master, kahan, coefficients, round_keys, offset):
            function(param, grad, exp_avg, exp_avg_sq, master, kahan, coefficients, round_keys, offset, *modes)

        compiled = torch.compile(update, dynamic=True, fullgraph=True)

        def call(*args):
            # Every (form, modes) pair shares `update`'s code object, and so
            # dynamo's per-code-object recompile limit (default 8).
            with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
                compiled(*args)

        _compiled_updates[cache_key] = call
    return _compiled_updates[cache_key]


def _as_pair_words(tensor: torch.Tensor):
    """`tensor` (even length) viewed as int32 (bf16 pairs) or int64 (fp32
    pairs) words, or None when its start, or the size of its storage (which
    torch.compile checks), is not a multiple of the word size."""
    word_dtype = torch.int32 if tensor.element_size() == 2 else torch.int64
    if tensor.data_ptr() % word_dtype.itemsize or tensor.untyped_storage().nbytes() % word_dtype.itemsize:
        return None
    return tensor.view(word_dtype)


def run_compiled(flat, coefficients, round_keys, offset: int, modes) -> None:
    """The compiled torch path: pairs for the even-aligned body of the
    segment; a lone first element (odd offset) and last element, or a whole
    segment whose storage is not pair-aligned, go element by element."""
    numel = flat[0].numel()
    device = flat[0].device
    body_start = offset % 2
    body_end = body_start + (numel - body_start) // 2 * 2
    body = [t[body_start:body_end] if t is not None else None for t in flat]
    words = [_as_pair_words(t) if t is not None else None for t in body]
    if any(w is None and t is not None for w, t in zip(words, body)):
        offset_tensor = torch.tensor(offset, dtype=torch.int64, device=device)
        _get_compiled_update(update_elements, modes)(*flat, coefficients, round_keys, offset_tensor)
        return
    if body_end > body_start:
        pair_offset = torch.tensor((offset + body_start) // 2, dtype=torch.int64, device=device)
        _get_compiled_update(update_pairs, modes)(*words, coefficients, round_keys, pair_offset)
    for start, end in ((0, body_start), (body_end, numel)):
        if end > start:
            piece = [t[start:end] if t is not None else None for t in flat]
            offset_tensor = torch.tensor(offset + start, dtype=torch.int64, device=device)
            update_elements(*piece, coefficients, round_keys, offset_tensor, *modes)
