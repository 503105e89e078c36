"""The native CPU backend (`megatron_sr.precision.native`, `native_kernel.c`):
bit-identical to the eager torch path for every strategy and on every Philox
code path the CPU has, shard invariant, one call per shard split over
threads like one call per segment, and replaced by the torch backends, with
one warning, without a C compiler."""
import dataclasses
import math
import platform
import shutil
import warnings

import pytest
import torch

from megatron_sr.precision import adamw, native
from megatron_sr.precision.adamw import SegmentTable, adamw_step, resolve_backend
from megatron_sr.precision.rounding import stochastic_round
from megatron_sr.precision.strategies import get_strategy
from megatron_sr.random import sr_key
from precision_helpers import same_bits
from test_precision_adamw import HYPER, STRATEGY_VARIANTS, clone, in_buffer_at, make_state, run_steps

HAS_COMPILER = shutil.which("cc") is not None



@pytest.fixture
def native_kernel():
    """Skips without a C compiler; fails where one exists but the kernel is not
    built, since `backend="native"` would then run the torch path and a
    native-vs-torch comparison would compare torch with itself."""
    if not HAS_COMPILER:
        pytest.skip("needs a C compiler (cc): without one the native backend is the torch path")
    assert native.available(), "a C compiler exists but the native kernel did not build or load"


needs_native = pytest.mark.usefixtures("native_kernel")

SPECIALS = [math.nan, -math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-40, -1e-40, 1.5e-45, 3.3e38, -3.4e38]


def with_special_values(state):
    """Special values at the start of every tensor, at different positions
    in each, so that they meet each other and ordinary values."""
    for shift, tensor in enumerate(state.values()):
        values = torch.tensor(SPECIALS[shift:] + SPECIALS[:shift]).to(tensor.dtype)
        tensor[:len(values)] = values
    return state


def test_native_library_builds_where_a_compiler_exists():
    if not HAS_COMPILER:
        pytest.skip("no C compiler")
    assert native.available()
    assert resolve_backend(None, torch.device("cpu"), 10) == "native"


@needs_native
@pytest.mark.parametrize("name, state_dtype", STRATEGY_VARIANTS)
@pytest.mark.parametrize("numel, offset, buffer_start", [
    (2051, 0, 0),
    (1029, 7, 1),  # odd offset, odd start in storage
    (517, (1 << 32) + 3, 3),  # offset >= 2^32
    (3001, (1 << 33) - 3 * 256 - 20, 0),  # pair counters crossing 2^32 inside a vector of Philox lanes
])
def test_native_is_bit_identical_to_eager(name, state_dtype, numel, offset, buffer_start):
    strategy = get_strategy(name, state_dtype)
    eager = with_special_values(make_state(strategy, numel, seed=offset % 7))
    placed = in_buffer_at(eager, buffer_start)
    run_steps(strategy, eager, 2, offset=offset, backend="eager")
    run_steps(strategy, placed, 2, offset=offset, backend="native")
    for key in eager:
        assert same_bits(placed[key], eager[key]), key


@needs_native
@pytest.mark.parametrize("name, state_dtype", [("bf16-sr", None), ("bf16-kahan", None), ("bf16-mixed", None)])
def test_native_multithreaded_call_equals_single_threaded(name, state_dtype):
    """Above 2^16 elements per thread the native step splits the segment over
    threads (compared with one native thread, itself bit-identical to eager
    above: the eager path is too slow at this size on a loaded machine)."""
    strategy, numel, offset = get_strategy(name, state_dtype), (1 << 18) + 4099, (1 << 32) + 1
    single = make_state(strategy, numel, seed=5)
    threaded = clone(single)
    modes = dict(zip(("param_write", "exp_avg_write", "exp_avg_sq_write"), adamw.write_modes(strategy)))
    for state, threads in ((single, 1), (threaded, 3)):
        native.adamw_step(*(state.get(k) for k in ("param", "grad", "exp_avg", "exp_avg_sq", "master", "kahan")),
                          adamw.adamw_coefficients(**HYPER, step=1), sr_key(42, 1, "w"), offset, **modes,
                          threads=threads)
    for key in single:
        assert same_bits(threaded[key], single[key]), key


@pytest.fixture
def force_philox():
    """Yields `native.use_philox`; the fastest path is restored afterwards."""
    yield native.use_philox
    native.use_philox(None)


@needs_native
@pytest.mark.parametrize("path", native.PHILOX_PATHS)
def test_every_philox_path_of_this_cpu_is_bit_identical(force_philox, path):
    """Each Philox code path (AVX-512, AVX2 intrinsics, portable C), forced,
    writes the eager bits: pair counters crossing 2^32 inside a vector of
    lanes (pair 10 of the first or the fourth block of 256 elements), odd
    offsets, blocks ending inside a vector group (the portable tail)."""
    if path not in native.philox_paths():
        pytest.skip(f"this CPU cannot run the {path} path (it has {native.philox_paths()})")
    assert force_philox(path) == path == native.philox_path()
    for name, state_dtype in (("bf16-sr", None), ("bf16-sr", "fp32"), ("bf16-kahan", None)):
        strategy = get_strategy(name, state_dtype)
        for numel, offset in ((3001, (1 << 33) - 3 * 256 - 20), (45, (1 << 33) - 21), (1029, 7), (45, 1)):
            eager = with_special_values(make_state(strategy, numel, seed=2))
            placed = in_buffer_at(eager, 1)
            run_steps(strategy, eager, 2, offset=offset, backend="eager")
            run_steps(strategy, placed, 2, offset=offset, backend="native")
            for key in eager:
                assert same_bits(placed[key], eager[key]), (path, name, state_dtype, numel, key)
    x = torch.randn(4099, generator=torch.Generator().manual_seed(1)) * 1e3
    for offset in (0, 5, (1 << 33) - 255):
        assert same_bits(native.stochastic_round(x, 3, offset), stochastic_round(x, 3, offset)), (path, offset)


@needs_native
def test_unknown_or_unavailable_philox_path_is_refused(force_philox):
    with pytest.raises(ValueError, match="not one of"):
        force_philox("sse9")
    missing = [path for path in native.PHILOX_PATHS if path not in native.philox_paths()]
    if missing:
        with pytest.raises(ValueError, match="cannot run"):
            force_philox(missing[0])
    assert "portable" in native.philox_paths()


@needs_native
@pytest.mark.parametrize("name, state_dtype", [("bf16-sr", None), ("bf16-kahan", "fp32"), ("bf16-mixed", None)])
def test_one_native_call_per_shard_equals_one_call_per_segment(name, state_dtype):
    """One C call over a shard's segment table, its elements split over 3
    threads (boundaries inside segments), writes the bits of one
    single-threaded call per segment (each bit-identical to eager above);
    gaps between the segments are not touched."""
    strategy, step = get_strategy(name, state_dtype), 3
    lengths = [5, 70001, 0, 1, 130003, 64, 60000]
    starts, start = [], 0
    for length in lengths:
        starts.append(start)
        start += length + 3  # a gap of 3 untouched elements after each segment
    offsets = [3, 0, 10, (1 << 32) + 1, (1 << 32) - 7, 64, 7]
    decays = [True, False, True, False, True, True, False]
    table = SegmentTable(starts, lengths, offsets, decays)
    keys = [sr_key(42, step, f"p{k}") for k in range(len(lengths))]
    per_segment = make_state(strategy, start, seed=6)
    shard = clone(per_segment)
    modes = adamw.write_modes(strategy)
    mode_args = dict(zip(("param_write", "exp_avg_write", "exp_avg_sq_write"), modes))
    coefficients = {decays: adamw.adamw_coefficients(**{**HYPER, "weight_decay": HYPER["weight_decay"] * decays},
                                                     step=step) for decays in (True, False)}
    names = ("param", "grad", "exp_avg", "exp_avg_sq", "master", "kahan")
    for k in range(len(lengths)):
        piece = [per_segment[n][starts[k]:starts[k] + lengths[k]] if n in per_segment else None for n in names]
        native.adamw_step(*piece, coefficients[decays[k]], keys[k], offsets[k], **mode_args, threads=1)
    untouched = clone(shard)
    native.adamw_shard_step(*(shard.get(n) for n in names), table, keys, coefficients[True], coefficients[False],
                            **mode_args, threads=3)
    for key in shard:
        assert same_bits(shard[key], per_segment[key]), key
    gaps = torch.ones(start, dtype=torch.bool)
    for segment_start, length in zip(starts, lengths):
        gaps[segment_start:segment_start + length] = False
    for key in shard:
        assert same_bits(shard[key][gaps], untouched[key][gaps]), key


@needs_native
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 flag")
def test_build_without_avx512_code_generation_is_bit_identical(monkeypatch, tmp_path):
    """A build with `-mno-avx512f` (the element loop as AVX2-only machines
    compile it; Philox on the fastest path the CPU has) draws the same bits."""
    monkeypatch.setattr(native, "FLAGS", native.FLAGS + ("-mno-avx512f",))
    monkeypatch.setattr(native, "_library", native._UNLOADED)
    monkeypatch.setenv("MEGATRON_SR_CACHE", str(tmp_path))
    assert native.available()
    for name, state_dtype in (("bf16-sr", None), ("bf16-kahan", "fp32"), ("bf16-mixed", None)):
        strategy = get_strategy(name, state_dtype)
        eager = with_special_values(make_state(strategy, 3001, seed=1))
        placed = in_buffer_at(eager, 1)
        run_steps(strategy, eager, 2, offset=(1 << 33) - 255, backend="eager")
        run_steps(strategy, placed, 2, offset=(1 << 33) - 255, backend="native")
        for key in eager:
            assert same_bits(placed[key], eager[key]), (name, key)
    x = torch.randn(999)
    assert same_bits(native.stochastic_round(x, 3, 1), stochastic_round(x, 3, 1))


@needs_native
@pytest.mark.parametrize("name", ["bf16-sr", "bf16-kahan"])
def test_native_shards_with_offsets_equal_one_call(name):
    strategy, base_offset = get_strategy(name), (1 << 32) - 1001
    whole = make_state(strategy, 3001, seed=4)
    sharded = clone(whole)
    run_steps(strategy, whole, 2, offset=base_offset, backend="native")
    bounds = [0, 1, 750, 751, 2048, 3001]
    for step in (1, 2):
        for start, end in zip(bounds, bounds[1:]):
            shard = {k: t[start:end] for k, t in sharded.items()}
            adamw_step(strategy, **shard, **HYPER, step=step, sr_key=sr_key(42, step, "w"),
                       offset=base_offset + start, backend="native")
    for key in whole:
        assert same_bits(sharded[key], whole[key]), key


@needs_native
@pytest.mark.parametrize("offset", [0, 5, (1 << 32) + 7])
def test_native_sr_cast_is_bit_identical(offset):
    x = torch.randn(4099, generator=torch.Generator().manual_seed(1)) * 1e3
    x[:len(SPECIALS)] = torch.tensor(SPECIALS)
    assert same_bits(native.stochastic_round(x, 123, offset), stochastic_round(x, 123, offset))
    assert same_bits(native.stochastic_round(x, (1 << 63) - 1, offset), stochastic_round(x, (1 << 63) - 1, offset))
    big = torch.randn(3, 100001)  # split over threads
    assert same_bits(native.stochastic_round(big, 7, offset, threads=2),
                     native.stochastic_round(big, 7, offset, threads=1))


def test_without_a_compiler_the_torch_backends_run_after_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("MEGATRON_SR_CACHE", str(tmp_path))
    monkeypatch.delenv(adamw.COMPILE_ENV, raising=False)
    monkeypatch.delenv(adamw.BACKEND_ENV, raising=False)
    monkeypatch.setattr(native, "_library", native._UNLOADED)
    strategy = get_strategy("bf16-sr")
    state = make_state(strategy, 1001)
    expected = clone(state)
    run_steps(strategy, expected, 1, offset=3, backend="eager")
    with pytest.warns(RuntimeWarning, match="native CPU kernels unavailable"):
        assert resolve_backend(None, torch.device("cpu"), 1001) == "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: silent from now on
        assert resolve_backend(None, torch.device("cpu"), 1 << 20) == "compiled"
        assert resolve_backend("native", torch.device("cpu"), 1001) == "eager"
        monkeypatch.setenv(adamw.BACKEND_ENV, "native")
        run_steps(strategy, state, 1, offset=3, backend=None)
    for key in state:
        assert same_bits(state[key], expected[key]), key
    assert not list(tmp_path.glob("kernels/*.so"))


def test_failed_build_falls_back(monkeypatch, tmp_path):
    """A compiler that exists but fails (here: `false`) also means fallback."""
    monkeypatch.setenv("CC", "false")
    monkeypatch.setattr(native, "library_path", lambda cache_dir=None: str(tmp_path / "kernels" / "k.so"))
    monkeypatch.setattr(native, "_library", native._UNLOADED)
    with pytest.warns(RuntimeWarning, match="native CPU kernels unavailable"):
        assert not native.available()
    assert not list(tmp_path.glob("kernels/*"))  # no temporary file left behind


@needs_native
def test_native_rejects_non_cpu_tensors():
    with pytest.raises(ValueError, match="native"):
        resolve_backend("native", torch.device("meta"), 10)


@needs_native
def test_fp32_gradients_of_a_bf16_strategy_match_eager():
    """--grad-reduce-dtype fp32 with bf16-sr: the kernel reads bf16 gradients
    for that row, so the dispatch must not hand it fp32 ones."""
    strategy = dataclasses.replace(get_strategy("bf16-sr"), grad_dtype=torch.float32)
    generator = torch.Generator().manual_seed(3)
    param = torch.randn(1001, generator=generator).bfloat16()
    grad = torch.randn(1001, generator=generator) * 1e-2
    results = {}
    for backend in ("native", "eager"):
        tensors = [param.clone(), grad.clone(), torch.zeros(1001, dtype=torch.bfloat16),
                   torch.zeros(1001, dtype=torch.bfloat16)]
        adamw_step(strategy, *tensors, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                   weight_decay=0.1, step=1, sr_key=99, offset=5, backend=backend)
        results[backend] = tensors
    for native_tensor, eager_tensor in zip(results["native"], results["eager"]):
        assert same_bits(native_tensor, eager_tensor)
