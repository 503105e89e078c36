"""Seeds and random streams.

The stochastic-rounding key: every SR write draws its bits from Philox4x32-10
keyed by `sr_key(seed, iteration, param_name, tp_rank)` with the counter
derived from the element's index in the parameter's logical tensor (see
`megatron_sr.precision.rounding`). Because the key does not depend on data-
parallel rank or on how the optimizer shards a buffer, every DP size draws
the same bits. Parameters replicated across tensor-parallel ranks (norms,
row-parallel biases) pass `tp_rank=None` and draw the same bits on every TP
rank; TP-sharded ones pass their TP rank.

The gradient-accumulation key: with `--grad-accumulation-rounding
stochastic` the add of one micro-batch's gradient into a bf16 gradient
buffer draws from `grad_accumulation_key(seed, step, micro_batch,
param_name, tp_rank)`, a stream of its own, counter as above.

The import key: `import_rounding_key(seed, iteration, param_name)` rounds a
Megatron-LM checkpoint's fp32 main parameters to bf16 when it is imported
with its optimizer state (a stream of its own, counter as above).

Also here: the initial-weight draws (`init_key`, `philox_normal`: the same
Philox, keyed by parameter name, counter = element index), per-rank seeding (`model_parallel_seed`) and the RNG
stream tracker that gives dropout inside tensor-parallel regions a different
mask on each TP rank (`get_rng_tracker`).
"""
from __future__ import annotations

import hashlib
import random
from contextlib import contextmanager

import numpy as np
import torch

from megatron_sr import parallel_state
from megatron_sr.precision.rounding import philox4x32, philox_round_keys

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


def grad_accumulation_key(seed: int, step: int, micro_batch: int, param_name: str,
                          tp_rank: int | None = None) -> int:
    """Philox key (below 2**63) of the stochastically rounded add of one
    micro-batch's gradient of one parameter into the gradient buffer.

    `step`: the optimizer step (1-based, `DistributedOptimizer.step_count`
    + 1) that will apply the gradient; `micro_batch`: the micro-batch's index
    in the step's global batch (`megatron_sr.data.micro_batches`: local
    micro-batch k of data-parallel rank r is k * dp + r), so no two ranks or
    micro-batches share bits; `param_name` and `tp_rank` as for `sr_key`.
    Its hashed text differs from every `sr_key`'s: a stream of its own.
    """
    if seed < 0 or step < 0 or micro_batch < 0:
        raise ValueError(f"grad_accumulation_key: seed ({seed}), step ({step}) and micro_batch "
                         f"({micro_batch}) must be >= 0")
    text = (f"grad-accumulation|{seed}|{step}|{micro_batch}|{param_name}|"
            f"{'replicated' if tp_rank is None else tp_rank}")
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _KEY_MASK


def import_rounding_key(seed: int, iteration: int, param_name: str) -> int:
    """Philox key (below 2**63) of the stochastic rounding of one imported
    fp32 main parameter to our bf16 parameter (a Megatron-LM checkpoint
    resumed under a stochastic-rounding strategy, see
    `checkpointing.megatron_lm_optimizer`). `iteration`: the checkpoint's;
    `param_name`: the global parameter name; counter = element index in the
    unsharded tensor, stream `STREAM_PARAM`. Its hashed text differs from
    every `sr_key`'s, so the import draws no bits a training step draws."""
    if seed < 0 or iteration < 0:
        raise ValueError(f"import_rounding_key: seed ({seed}) and iteration ({iteration}) "
                         f"must be >= 0")
    text = f"megatron-lm-import|{seed}|{iteration}|{param_name}"
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _KEY_MASK


# --- parameter initialization ----------------------------------------------------

def init_key(seed: int, param_name: str) -> int:
    """Philox key (below 2**63) of one parameter's initial values.

    Keyed by the global parameter name, so every TP/PP layout (and the tied
    copy of the word embedding on the last pipeline stage) draws the same
    values; the counter is the element's index in the unsharded tensor (see
    `philox_normal`), so each rank draws only its own shard.
    """
    if seed < 0:
        raise ValueError(f"--seed ({seed}) must be >= 0")
    text = f"init|{seed}|{param_name}"
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _KEY_MASK


_TWO_PI = 6.283185307179586
_LN2 = 0.6931471805599453
_SQRT_HALF = 0.7071067811865476
_LOG_TERMS = 13  # |s| < 0.172: the atanh series' remainder is below 1e-19
_COS_TERMS = 15  # |x| <= pi: the Taylor remainder is below 1e-15


def _log_unit(u: torch.Tensor) -> torch.Tensor:
    """ln(u) for float64 u in (0, 1], from exact bit operations and the
    correctly rounded +, -, *, / only (so every device and every vector or
    scalar code path gives the same bits): u = m * 2^e with m in
    [sqrt(1/2), sqrt(2)), ln(m) = 2 atanh(s), s = (m - 1) / (m + 1)."""
    mantissa, exponent = torch.frexp(u)  # mantissa in [0.5, 1)
    low = mantissa < _SQRT_HALF
    mantissa = torch.where(low, mantissa * 2.0, mantissa)
    exponent = exponent.to(torch.float64) - low.to(torch.float64)
    s = (mantissa - 1.0) / (mantissa + 1.0)
    s2 = s * s
    series = torch.full_like(s, 1.0 / (2 * _LOG_TERMS - 1))
    for k in range(_LOG_TERMS - 2, -1, -1):
        series = series * s2 + 1.0 / (2 * k + 1)
    return exponent * _LN2 + 2.0 * s * series


def _cos_turns(t: torch.Tensor) -> torch.Tensor:
    """cos(2 pi t) for float64 t in [0, 1), by a Taylor polynomial in
    x = 2 pi (t - 1/2), |x| <= pi (cos(2 pi t) = -cos(x)); +, -, * only."""
    x = (t - 0.5) * _TWO_PI
    x2 = x * x
    series = torch.ones_like(x)
    for k in range(_COS_TERMS - 1, 0, -1):
        series = 1.0 - series * x2 / float((2 * k - 1) * (2 * k))
    return -series


def philox_normal(element_index: torch.Tensor, key: int) -> torch.Tensor:
    """Standard normal variates (float64, the shape of `element_index`) of the
    elements at the given logical positions (int64) of one tensor, by
    Box-Muller on the first two words of Philox4x32-10 call `element_index`
    under `key` (`init_key`): z = sqrt(-2 ln u1) cos(2 pi u2), u1 in (0, 1],
    u2 in [0, 1). Element i's value depends only on (key, i): any shard of the
    tensor computes its own elements, on any device, to the same bits (no
    transcendental library function is called; sqrt is correctly rounded)."""
    words = philox4x32(element_index, philox_round_keys(key))
    u1 = (words[0].to(torch.float64) + 1.0) * 2.0 ** -32
    u2 = words[1].to(torch.float64) * 2.0 ** -32
    return torch.sqrt(-2.0 * _log_unit(u1)) * _cos_turns(u2)


# --- seeds and the tensor-parallel RNG tracker -------------------------------------

TENSOR_PARALLEL_RNG = "model-parallel-rng"
_TP_SEED_OFFSET = 2718


def _device_rng():
    """(get_state, set_state, manual_seed) of the generator dropout uses on the
    model's device (`parallel_state.get_default_device()`): CUDA's or the CPU's."""
    if parallel_state.get_default_device().type == "cuda":
        return torch.cuda.get_rng_state, torch.cuda.set_rng_state, torch.cuda.manual_seed
    return torch.get_rng_state, torch.set_rng_state, torch.manual_seed


class RNGStatesTracker:
    """Named RNG streams swapped in and out of the device's default generator.

    `fork(name)` runs a block with that stream's state and saves where it
    left off, leaving the default stream untouched. Dropout on activations
    that are replicated across TP ranks runs on the default stream (the same
    mask on every TP rank); dropout on TP-sharded activations (attention
    heads, sequence-parallel shards) runs inside `fork()` on a stream seeded
    per TP rank. `get_states`/`set_states` are for checkpoints and activation
    recomputation.
    """

    def __init__(self):
        self._states: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self._states = {}

    def add(self, name: str, seed: int) -> None:
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists")
        get_state, set_state, manual_seed = _device_rng()
        saved = get_state()
        manual_seed(seed)
        self._states[name] = get_state()
        set_state(saved)

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self._states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._states = {name: state.clone() for name, state in states.items()}

    @contextmanager
    def fork(self, name: str = TENSOR_PARALLEL_RNG):
        if name not in self._states:
            raise RuntimeError(f"RNG stream {name!r} does not exist; call "
                               f"megatron_sr.random.model_parallel_seed(seed) first")
        get_state, set_state, _ = _device_rng()
        saved = get_state()
        set_state(self._states[name])
        try:
            yield
        finally:
            self._states[name] = get_state()
            set_state(saved)


_RNG_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _RNG_TRACKER


def model_parallel_seed(seed: int) -> None:
    """Seeds this rank's streams; call on every rank after `initialize_model_parallel`.

    Default stream (python, numpy, torch CPU and device): seed + 100 * pp_rank,
    the same on every TP and DP rank of a stage. TP stream (tracker, `fork()`):
    seed + 2718 + 100 * pp_rank + tp_rank, different on every TP rank.
    Parameter initialization does not use these streams (see `init_key`).
    """
    if seed < 0:
        raise ValueError(f"--seed ({seed}) must be >= 0")
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)  # also seeds every CUDA device
    _RNG_TRACKER.reset()
    _RNG_TRACKER.add(TENSOR_PARALLEL_RNG,
                     stage_seed + _TP_SEED_OFFSET + parallel_state.get_tensor_model_parallel_rank())
