"""Where megatron_sr keeps files it builds or fetches once and reuses: compiled
kernels (`precision.native`), the GPT-2 BPE files and the sample corpus
(`data.sample_files`).

`cache_root()`: ``$MEGATRON_SR_CACHE`` if set, else ``<repo>/.cache/`` when
running from a checkout, else ``~/.cache/megatron_sr``. It depends on nothing
else in megatron_sr, so the lowest layers (the precision seam) can use it.
"""
from __future__ import annotations

import os

CACHE_ENV = "MEGATRON_SR_CACHE"


def cache_root() -> str:
    """The cache folder (absolute; not created here)."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return os.path.abspath(configured)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(repo, "pyproject.toml")) and os.path.isdir(
            os.path.join(repo, "megatron_sr")):
        return os.path.join(repo, ".cache")
    return os.path.join(os.path.expanduser("~"), ".cache", "megatron_sr")
