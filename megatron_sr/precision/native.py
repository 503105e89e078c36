"""The native CPU backend: `native_kernel.c`, compiled on first use and loaded with ctypes.

`adamw_step` here is the "native" backend of `megatron_sr.precision.adamw`,
`stochastic_round` the native twin of `rounding.stochastic_round` (for
callers that want it; `rounding` itself stays pure torch) and `stochastic_add_`
the native backend of `grad_accumulation.stochastic_add_`: the same
Philox4x32-10 words, the same fp32 arithmetic in the same order, the same
bits (NaN payloads aside) as the torch and Triton paths. `adamw_shard_step`
updates a whole bucket shard (its `SegmentTable`) in one C call, its
elements split over the threads.

Philox runs in uint32 lanes on one of three code paths (`PHILOX_PATHS`),
the fastest the CPU has, chosen at the first call: "avx512" and "avx2"
intrinsics (x86), or the "portable" C loop that the compiler auto-vectorizes
as it can (every CPU). All write the same bits; `use_philox` forces one
(process-wide, for tests and benchmarks).

Build. The system C compiler (``$CC``, else ``cc``) compiles the source with
`FLAGS` into ``<cache>/kernels/native_kernel-<hash>.so``, where ``<cache>`` is
``$MEGATRON_SR_CACHE`` / ``<repo>/.cache`` / ``~/.cache/megatron_sr``
(`megatron_sr.cache.cache_root`) and the hash covers the source,
the compiler command and its version, the flags and the CPU (``-march=native``
code must not run on another machine's CPU). The library is written under a
temporary name and renamed into place, so concurrent ranks are safe and a
built library is reused. No compiler, or a failed build or load: `load()`
returns None after one warning, and `adamw` falls back to its torch backends.

FLAGS keep the arithmetic IEEE: ``-ffp-contract=off`` (no FMA contraction),
no ``-ffast-math`` (no reassociation, NaN-aware compares);
``-fno-math-errno`` only lets ``sqrtf`` compile to the (correctly rounded)
vector instruction.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import threading
import warnings
from typing import Optional

import torch

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native_kernel.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-std=c11", "-fPIC", "-shared",
         "-pthread")
CC_ENV = "CC"
ABI_VERSION = 4
PHILOX_PATHS = ("portable", "avx2", "avx512")  # the C enum PHILOX_*, in order
_BUILD_TIMEOUT_S = 300

_lock = threading.Lock()
_UNLOADED = object()
_library = _UNLOADED


def _cpu_fingerprint() -> str:
    """What `-march=native` depends on: the CPU model and feature flags."""
    fields = [platform.machine()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                name = line.split(":", 1)[0].strip()
                if name in ("model name", "flags", "Features", "CPU part") and line not in fields:
                    fields.append(line)
                if len(fields) > 4:
                    break
    except OSError:
        fields.append(platform.processor())
    return "".join(fields)


def _compiler() -> list[str]:
    return shlex.split(os.environ.get(CC_ENV) or "cc")


def library_path(cache_dir: Optional[str] = None) -> str:
    """Where the library of this source, compiler, flags and CPU lives
    (runs `$CC --version`; raises OSError/SubprocessError without a compiler)."""
    compiler = _compiler()
    version = subprocess.run(compiler + ["--version"], capture_output=True, text=True, check=True,
                             timeout=60).stdout
    digest = hashlib.sha256()
    with open(SOURCE, "rb") as source:
        digest.update(source.read())
    for part in (shlex.join(compiler), version, " ".join(FLAGS), _cpu_fingerprint()):
        digest.update(b"\0" + part.encode())
    if cache_dir is None:
        from megatron_sr.cache import cache_root

        cache_dir = cache_root()
    return os.path.join(cache_dir, "kernels", f"native_kernel-{digest.hexdigest()[:20]}.so")


def _build(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=os.path.dirname(path))
    os.close(handle)
    try:
        result = subprocess.run(_compiler() + list(FLAGS) + ["-o", temporary, SOURCE], capture_output=True,
                                text=True, timeout=_BUILD_TIMEOUT_S)
        if result.returncode != 0:
            raise RuntimeError(f"{shlex.join(_compiler())} exited with {result.returncode}: "
                               f"{result.stderr.strip()[-2000:]}")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _open(path: str) -> ctypes.CDLL:
    library = ctypes.CDLL(path)
    if library.megatron_sr_native_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path}: ABI version mismatch")
    c_void_p, c_int, c_int64, c_uint64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_uint64
    library.megatron_sr_adamw_step.argtypes = [c_void_p] * 7 + [c_uint64, c_uint64, c_int64] + [c_int] * 4
    library.megatron_sr_adamw_step.restype = c_int
    library.megatron_sr_adamw_shard_step.argtypes = [c_void_p] * 10 + [ctypes.c_int64] + [c_int] * 4
    library.megatron_sr_adamw_shard_step.restype = c_int
    library.megatron_sr_philox_paths.restype = c_int
    library.megatron_sr_philox_path.restype = c_int
    library.megatron_sr_set_philox_path.argtypes = [c_int]
    library.megatron_sr_set_philox_path.restype = c_int
    library.megatron_sr_adamw_supported.argtypes = [c_int] * 3
    library.megatron_sr_adamw_supported.restype = c_int
    library.megatron_sr_sr_cast.argtypes = [c_void_p, c_void_p, c_uint64, c_uint64, c_int64, c_int]
    library.megatron_sr_sr_cast.restype = None
    library.megatron_sr_sr_add.argtypes = [c_void_p, c_void_p, c_uint64, c_uint64, c_int64, c_int]
    library.megatron_sr_sr_add.restype = None
    return library


def load(cache_dir: Optional[str] = None) -> Optional[ctypes.CDLL]:
    """The loaded library (built first if needed), or None after one
    warning when it cannot be built or loaded. The outcome is kept for the
    life of the process."""
    global _library
    if _library is not _UNLOADED:
        return _library
    with _lock:
        if _library is _UNLOADED:
            try:
                path = library_path(cache_dir)
                if not os.path.isfile(path):
                    _build(path)
                _library = _open(path)
            except Exception as error:  # noqa: BLE001 - any failure means: use the torch backends
                warnings.warn(f"megatron_sr: native CPU kernels unavailable ({type(error).__name__}: {error}); "
                              f"falling back to the torch backends", RuntimeWarning, stacklevel=3)
                _library = None
    return _library


def available() -> bool:
    """True when the native library is (or can be) built and loaded."""
    return load() is not None


def supports(param_write: int, exp_avg_write: int, exp_avg_sq_write: int, has_master: bool,
             grad_dtype: torch.dtype) -> bool:
    """True when the native kernel covers these write modes (every strategy
    of the table does; m and v must share a mode) and this gradient dtype: the
    kernel reads bf16 gradients exactly when the parameter is bf16 without a
    master copy (the table's rows; `--grad-reduce-dtype` can differ)."""
    library = load()
    grad_is_bf16 = param_write != 0 and not has_master  # 0: fp32 param, written exactly
    return (library is not None and exp_avg_write == exp_avg_sq_write
            and grad_dtype == (torch.bfloat16 if grad_is_bf16 else torch.float32)
            and bool(library.megatron_sr_adamw_supported(param_write, exp_avg_write, int(has_master))))


def _loaded() -> ctypes.CDLL:
    library = load()
    if library is None:
        raise RuntimeError("native kernels unavailable")
    return library


def philox_paths() -> list[str]:
    """The Philox code paths this CPU can run (names of `PHILOX_PATHS`)."""
    mask = _loaded().megatron_sr_philox_paths()
    return [name for bit, name in enumerate(PHILOX_PATHS) if mask >> bit & 1]


def philox_path() -> str:
    """The Philox code path the kernels use now."""
    return PHILOX_PATHS[_loaded().megatron_sr_philox_path()]


def use_philox(path: Optional[str]) -> str:
    """Run Philox on `path` (a name of `PHILOX_PATHS`; None: the fastest
    this CPU has) from the next call on, for the whole process; not while
    another thread is in a native call. Returns the path now used; raises
    ValueError for a path this CPU cannot run."""
    library = _loaded()
    if path is not None and path not in PHILOX_PATHS:
        raise ValueError(f"native.use_philox: {path!r} is not one of {PHILOX_PATHS}")
    chosen = library.megatron_sr_set_philox_path(-1 if path is None else PHILOX_PATHS.index(path))
    if chosen < 0:
        raise ValueError(f"native.use_philox: this CPU cannot run the {path!r} path (it has {philox_paths()})")
    return PHILOX_PATHS[chosen]


def _pointer(tensor: Optional[torch.Tensor]) -> Optional[int]:
    return None if tensor is None else tensor.data_ptr()


def adamw_step(param, grad, exp_avg, exp_avg_sq, master, kahan, coefficients: torch.Tensor, sr_key: int,
               offset: int, *, param_write: int, exp_avg_write: int, exp_avg_sq_write: int,
               threads: Optional[int] = None) -> None:
    """The fused step on contiguous 1-D CPU tensors already validated by
    `adamw.adamw_shard_step` (`coefficients`: the ten fp32 scalars of
    `adamw_torch.adamw_coefficients`, the last the gradient's factor). Runs on
    `threads` threads (default torch.get_num_threads()) for large segments."""
    library = load()
    if library is None:
        raise RuntimeError("native kernels unavailable")
    if exp_avg_write != exp_avg_sq_write:
        raise ValueError(f"native adamw_step: exp_avg and exp_avg_sq must share a write mode, got "
                         f"{exp_avg_write} and {exp_avg_sq_write}")
    coefficients = coefficients.to(torch.float32).contiguous()
    if coefficients.numel() != 10:
        raise ValueError(f"native adamw_step: 10 coefficients expected, got {coefficients.numel()}")
    status = library.megatron_sr_adamw_step(
        _pointer(param), _pointer(grad), _pointer(exp_avg), _pointer(exp_avg_sq), _pointer(master),
        _pointer(kahan), coefficients.data_ptr(), sr_key, offset, param.numel(), param_write, exp_avg_write,
        int(master is not None), threads or torch.get_num_threads())
    if status != 0:
        raise ValueError(f"native adamw_step: unsupported write modes "
                         f"({param_write}, {exp_avg_write}, {exp_avg_sq_write})")


def adamw_shard_step(param, grad, exp_avg, exp_avg_sq, master, kahan, segments, sr_keys,
                     coefficients_decay: torch.Tensor, coefficients_no_decay: torch.Tensor, *, param_write: int,
                     exp_avg_write: int, exp_avg_sq_write: int, threads: Optional[int] = None) -> None:
    """The fused step on every segment of `segments` (an
    `adamw.SegmentTable`) of the 1-D CPU shard tensors, in one C call, as
    validated by `adamw.adamw_shard_step`; `sr_keys` one host int per
    segment; `coefficients_decay` / `_no_decay`: the ten fp32 scalars of
    `adamw_torch.adamw_coefficients` for the segments with and without weight
    decay. The segments' elements are split evenly over `threads` threads
    (default torch.get_num_threads())."""
    library = _loaded()
    if exp_avg_write != exp_avg_sq_write:
        raise ValueError(f"native adamw_shard_step: exp_avg and exp_avg_sq must share a write mode, got "
                         f"{exp_avg_write} and {exp_avg_sq_write}")
    coefficients = [c.to(torch.float32).contiguous() for c in (coefficients_decay, coefficients_no_decay)]
    if any(c.numel() != 10 for c in coefficients):
        raise ValueError("native adamw_shard_step: 10 coefficients expected")
    table = segments.native_table()
    keys = torch.tensor(list(sr_keys), dtype=torch.int64)  # validated: [0, 2^63)
    status = library.megatron_sr_adamw_shard_step(
        _pointer(param), _pointer(grad), _pointer(exp_avg), _pointer(exp_avg_sq), _pointer(master),
        _pointer(kahan), coefficients[0].data_ptr(), coefficients[1].data_ptr(), table.data_ptr(),
        keys.data_ptr(), len(segments), param_write, exp_avg_write, int(master is not None),
        threads or torch.get_num_threads())
    if status != 0:
        raise ValueError(f"native adamw_shard_step: unsupported write modes "
                         f"({param_write}, {exp_avg_write}, {exp_avg_sq_write})")


def stochastic_round(x: torch.Tensor, seed: int, offset: int = 0, threads: Optional[int] = None) -> torch.Tensor:
    """`rounding.stochastic_round` for CPU tensors, bit for bit (NaN
    payloads aside), in native code."""
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise TypeError(f"native stochastic_round: x must be a float32 CPU tensor, got {x.dtype} on {x.device}")
    if offset < 0:
        raise ValueError(f"native stochastic_round: offset must be >= 0, got {offset}")
    if not 0 <= seed < 1 << 63:
        raise ValueError(f"native stochastic_round: seed {seed} must be in [0, 2^63)")
    library = load()
    if library is None:
        raise RuntimeError("native kernels unavailable")
    source = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    library.megatron_sr_sr_cast(source.data_ptr(), out.data_ptr(), seed, offset, source.numel(),
                                threads or torch.get_num_threads())
    return out


def stochastic_add_(accumulator: torch.Tensor, addend: torch.Tensor, seed: int, offset: int = 0,
                    threads: Optional[int] = None) -> None:
    """`accumulator <- SR(float(accumulator) + float(addend))` in place, for
    contiguous bf16 CPU tensors of one shape already validated by
    `grad_accumulation.stochastic_add_`: its torch reference, bit for bit
    (NaN payloads aside)."""
    _loaded().megatron_sr_sr_add(accumulator.data_ptr(), addend.data_ptr(), seed, offset, accumulator.numel(),
                                 threads or torch.get_num_threads())
