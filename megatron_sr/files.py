"""File helpers that depend on nothing else in megatron_sr and not on torch,
so tools and example drivers can import them without loading the framework."""
from __future__ import annotations

import hashlib


def sha256_file(path: str) -> str:
    """Hex sha256 of the file at `path`, read in 4 MiB blocks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
