"""Which backend runs the fused AdamW step.

Backends (bit-identical for the same inputs; NaN payloads aside):
- "native": C code (`megatron_sr.precision.native`, `native_kernel.c`) built
  with the system C compiler on first use and cached; the default for CPU
  tensors. Without a compiler (or when the build fails) it warns once and
  the CPU default becomes "compiled" / "eager" as below.
- "triton": the kernel of `megatron_sr.precision.kernels`, one launch per
  bucket shard; the default for CUDA tensors, usable on the CPU under
  TRITON_INTERPRET=1 (slow, for tests).
- "compiled": the torch reference fused by `torch.compile`
  (`megatron_sr.precision.adamw_compiled`); without "native", the default
  on the CPU for segments of at least COMPILE_MIN_NUMEL elements.
- "eager": the torch reference (`megatron_sr.precision.adamw_torch`)
  without compilation, in chunks.
The env var MEGATRON_SR_ADAMW_BACKEND forces one ("native" falls back like
the default when it cannot be built); MEGATRON_SR_COMPILE=0 turns the
torch CPU fallback from "compiled" into "eager".
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from megatron_sr.precision import native

BACKENDS = ("native", "triton", "compiled", "eager")
BACKEND_ENV = "MEGATRON_SR_ADAMW_BACKEND"
COMPILE_ENV = "MEGATRON_SR_COMPILE"
COMPILE_MIN_NUMEL = 1 << 16


def torch_cpu_backend(numel: int) -> str:
    """"compiled" for segments of at least COMPILE_MIN_NUMEL elements, "eager"
    for smaller ones (whose time is overhead) and when MEGATRON_SR_COMPILE=0."""
    if os.environ.get(COMPILE_ENV, "1") == "0" or numel < COMPILE_MIN_NUMEL:
        return "eager"
    return "compiled"


def resolve_backend(backend: Optional[str], device: torch.device, numel: int) -> str:
    """The backend a call runs on: `backend` if given, else the env var
    MEGATRON_SR_ADAMW_BACKEND, else "triton" for CUDA and "native" for CPU
    tensors. "native" that cannot be built (one warning) becomes the torch
    CPU backend of `torch_cpu_backend`."""
    chosen = backend or os.environ.get(BACKEND_ENV) or None
    if chosen is None:
        if device.type == "cuda":
            return "triton"
        if device.type == "cpu" and native.available():
            return "native"
        return torch_cpu_backend(numel)
    if chosen not in BACKENDS:
        raise ValueError(f"adamw_step: backend {chosen!r} (argument or ${BACKEND_ENV}) must be one of {BACKENDS}")
    if chosen == "native":
        if device.type != "cpu":
            raise ValueError(f"adamw_step: backend 'native' needs CPU tensors, got {device}")
        if not native.available():
            return torch_cpu_backend(numel)
    if chosen == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("adamw_step: backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 "
                         "set before triton is imported")
    return chosen
