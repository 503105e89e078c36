"""Seeds and random streams.

The stochastic-rounding key: every SR write draws its bits from Philox4x32-10
keyed by `sr_key(seed, iteration, param_name, tp_rank)` with the counter
derived from the element's index in the parameter's logical tensor (see
`megatron_sr.precision.rounding`). Because the key does not depend on data-
parallel rank or on how the optimizer shards a buffer, every DP size draws
the same bits. Parameters replicated across tensor-parallel ranks (norms,
row-parallel biases) pass `tp_rank=None` and draw the same bits on every TP
rank; TP-sharded ones pass their TP rank.
"""
from __future__ import annotations

import hashlib

_KEY_MASK = (1 << 63) - 1


def sr_key(seed: int, iteration: int, param_name: str, tp_rank: int | None = None) -> int:
    """Philox key for one parameter's SR writes at one optimizer step.

    Returns a non-negative int below 2**63 (it travels to Triton as int64).
    `param_name` must name the parameter in the unsplit model (the same on
    every pipeline layout), e.g. "decoder.layers.3.mlp.linear_fc1.weight".
    """
    if seed < 0 or iteration < 0:
        raise ValueError(f"sr_key: seed ({seed}) and iteration ({iteration}) must be >= 0")
    text = f"{seed}|{iteration}|{param_name}|{'replicated' if tp_rank is None else tp_rank}"
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _KEY_MASK
