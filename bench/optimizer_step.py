"""Benchmark: the fused AdamW step of every precision strategy against a
plain memory copy of the same number of bytes, measured side by side.

For each strategy, times one `megatron_sr.precision.adamw.adamw_shard_step`
over a bucket shard of `--numel` elements (default 2^24 on the CPU, 2^26 on
CUDA) cut into the parameter segments of GPT layers of hidden size
`--hidden` (12 per layer, from 1024 to 4*1024^2 elements at 1024: the
distributed optimizer's realistic case), with a gradient scale on the
device as the optimizer passes it, and `torch.Tensor.copy_` between two
uint8 buffers holding as many bytes as the step reads plus writes. It prints
a table: bytes moved per element, effective GB/s of each, the step's
fraction of copy bandwidth and, on CUDA, the kernels one step launches
(counted with the torch profiler). On CUDA the step runs the Triton kernel
(one launch per shard) and is timed with CUDA events; on the CPU the native
C kernel (or, without a C compiler, the compiled torch path), timed by the
wall clock; the table names the backend that ran. `--backend` takes one
backend or a comma-separated list (e.g. native,compiled): all of them and
the copy are then timed in turns in the same run, and a last column gives
each backend's speed relative to the last one of the list. `--native-variants`
replaces the native backend by variants of it, timed the same way: a Philox
code path of `megatron_sr.precision.native.PHILOX_PATHS` (forced for that
variant's calls), with "/segments" one native call per segment (how the
step ran before the native backend took a whole shard per call), e.g.
`--native-variants avx2,portable/segments` for the new path against the old.

    .venv/bin/python bench/optimizer_step.py [--numel N] [--hidden H] [--device cpu|cuda]
        [--backend native|compiled|eager|triton[,...]] [--strategies bf16-sr,fp32]
        [--native-variants PATH[/segments][,...]]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_sr.precision import native  # noqa: E402
from megatron_sr.precision.adamw import (SegmentTable, adamw_coefficients, adamw_shard_step,  # noqa: E402
                                         resolve_backend, write_modes)
from megatron_sr.precision.strategies import STRATEGIES, get_strategy  # noqa: E402


def make_state(strategy, numel: int, device: str) -> dict:
    """Random param, grad, m, v (and master, kahan) tensors for `strategy`."""
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(scale, dtype):
        return (torch.randn(numel, generator=generator, device=device) * scale).to(dtype)

    state = dict(param=randn(1.0, strategy.param_dtype), grad=randn(1e-3, strategy.grad_dtype),
                 exp_avg=randn(1e-3, strategy.exp_avg_dtype),
                 exp_avg_sq=randn(1e-3, torch.float32).square().to(strategy.exp_avg_sq_dtype))
    if strategy.master_dtype is not None:
        state["master"] = state["param"].to(strategy.master_dtype)
    if strategy.kahan_dtype is not None:
        state["kahan"] = torch.zeros(numel, dtype=strategy.kahan_dtype, device=device)
    return state


def bytes_per_element(state: dict) -> int:
    """Bytes the step moves per element: every tensor is read once and every
    tensor but the gradient written once."""
    return sum(t.element_size() * (1 if name == "grad" else 2) for name, t in state.items())


def layer_segments(numel: int, hidden: int) -> SegmentTable:
    """`numel` elements cut like the parameters of GPT layers of hidden size
    `hidden` (layer norms, QKV, projection, MLP; weights decayed, biases and
    norms not), each starting at a multiple of 64 elements as in the
    distributed optimizer's buffer; the last segment is cut short."""
    h = hidden
    layer = [(h, False), (h, False), (3 * h * h, True), (3 * h, False), (h * h, True), (h, False),
             (h, False), (h, False), (4 * h * h, True), (4 * h, False), (4 * h * h, True), (h, False)]
    starts, lengths, offsets, decays = [], [], [], []
    start = 0
    while start < numel:
        for size, decay in layer:
            if start >= numel:
                break
            length = min(size, numel - start)
            starts.append(start)
            lengths.append(length)
            offsets.append(0)
            decays.append(decay)
            start = -(-(start + length) // 64) * 64
    return SegmentTable(starts, lengths, offsets, decays)


def best_seconds(functions, device: str, repeats: int) -> list[float]:
    """Best-of-`repeats` time of each function, after one warm-up call each
    (CUDA events on CUDA, the wall clock on the CPU); the functions take
    turns, each repeat starting one further along, so that a machine shared
    with other jobs slows them alike."""
    def timed(fn):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    best = [float("inf")] * len(functions)
    for fn in functions:
        fn()
    for repeat in range(repeats):
        for turn in range(len(functions)):
            i = (turn + repeat) % len(functions)  # each repeat starts with the next one: no favoured position
            best[i] = min(best[i], timed(functions[i]))
    return best


def native_variant_step(variant: str, strategy, state: dict, segments: SegmentTable, keys, grad_scale, hyper):
    """A step function for `--native-variants` entry `variant` ("PATH" or
    "PATH/segments"): forces Philox path PATH, then runs the shard step in
    one native call, or (with "/segments") in one native call per segment as
    `adamw_shard_step` did before its one-call-per-shard entry point."""
    path, _, per_segment = variant.partition("/")
    if per_segment not in ("", "segments"):
        raise SystemExit(f"--native-variants: {variant!r}: expected PATH or PATH/segments")
    names = ("param", "grad", "exp_avg", "exp_avg_sq", "master", "kahan")
    modes = dict(zip(("param_write", "exp_avg_write", "exp_avg_sq_write"), write_modes(strategy)))

    def step():
        native.use_philox(path)
        if not per_segment:
            adamw_shard_step(strategy, **state, segments=segments, sr_keys=keys, **hyper, grad_scale=grad_scale,
                             backend="native")
            return
        scale = float(grad_scale)
        coefficients = {decays: adamw_coefficients(**{**hyper, "weight_decay": hyper["weight_decay"] * decays},
                                                   grad_scale=scale) for decays in (True, False)}
        for start, length, offset, decays, key in zip(segments.starts, segments.lengths, segments.offsets,
                                                      segments.weight_decay, keys):
            native.adamw_step(*(state[n][start:start + length] if n in state else None for n in names),
                              coefficients[decays], key, offset, **modes)
    return step


def cuda_kernels_per_call(fn) -> int:
    """Kernels one call of `fn` launches on CUDA (torch profiler; copies and memsets not counted)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for event in prof.events()
               if event.device_type == torch.autograd.DeviceType.CUDA
               and not event.name.lower().startswith(("memcpy", "memset")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=None, help="default: 2^26 on CUDA, 2^24 on the CPU")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size of the layers the shard is cut like")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default=None,
                        help="native, compiled, eager or triton, or a comma-separated list to compare "
                             "(default: per device)")
    parser.add_argument("--strategies", default="fp32,bf16-mixed,bf16,bf16-sr,bf16-sr+fp32-state,bf16-kahan",
                        help="comma-separated; NAME+fp32-state applies --optimizer-state-dtype fp32")
    parser.add_argument("--native-variants", default=None,
                        help="comma-separated PATH or PATH/segments (PATH: a Philox path of native.PHILOX_PATHS; "
                             "/segments: one native call per segment): time these in place of the native backend")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if args.numel is None:
        args.numel = 1 << (26 if args.device == "cuda" else 24)
    segments = layer_segments(args.numel, args.hidden)

    requested = args.backend.split(",") if args.backend else [None]
    # The backend each request runs on (a "native" without a compiler falls back, with a warning).
    backends = [resolve_backend(b, torch.device(args.device), args.numel) for b in requested]
    if args.native_variants:
        if "native" not in backends:
            parser.error("--native-variants: the native backend is not among the backends of this run")
        variants = [f"native[{v}]" for v in args.native_variants.split(",")]
        for variant in args.native_variants.split(","):
            if variant.partition("/")[0] not in native.philox_paths():
                parser.error(f"--native-variants: {variant!r}: this CPU runs the Philox paths "
                             f"{native.philox_paths()}")
        at = backends.index("native")
        backends[at:at + 1] = variants
    print(f"device={args.device} numel={args.numel} segments={len(segments)} (hidden {args.hidden}) "
          f"backend={','.join(backends)}"
          f"{'' if args.backend else ' (default)'} threads={torch.get_num_threads()} "
          f"{'philox=' + ','.join(native.philox_paths()) + ' ' if native.available() else ''}"
          f"load average={'/'.join(f'{x:.1f}' for x in os.getloadavg())}")
    compare = len(backends) > 1
    width = max(10, *(len(b) + 1 for b in backends))
    print(f"{'strategy':<22}{'backend':>{width}}{'bytes/elem':>11}{'step ms':>10}{'step GB/s':>11}{'copy GB/s':>11}"
          f"{'ratio':>8}{'launches':>10}" + (f"{'vs ' + backends[-1]:>{width + 4}}" if compare else ""))
    for label in args.strategies.split(","):
        name, _, state_flag = label.partition("+")
        if name not in STRATEGIES:
            parser.error(f"--strategies: unknown strategy {name!r}")
        strategy = get_strategy(name, "fp32" if state_flag == "fp32-state" else None)
        states = [make_state(strategy, args.numel, args.device) for _ in backends]
        moved = bytes_per_element(states[0]) * args.numel
        source = torch.empty(moved // 2, dtype=torch.uint8, device=args.device)
        target = torch.empty_like(source)

        keys = [12345 + k for k in range(len(segments))]
        grad_scale = torch.ones((), dtype=torch.float32, device=args.device)

        def step_function(state, backend):
            if backend.startswith("native["):
                return native_variant_step(backend[len("native["):-1], strategy, state, segments, keys,
                                           grad_scale, dict(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8,
                                                            weight_decay=0.1, step=10))

            def step():
                adamw_shard_step(strategy, **state, segments=segments, sr_keys=keys, lr=1e-4, beta1=0.9,
                                 beta2=0.999, eps=1e-8, weight_decay=0.1, step=10, grad_scale=grad_scale,
                                 backend=backend)
            return step

        steps = [step_function(state, backend) for state, backend in zip(states, backends)]
        *step_seconds, copy_s = best_seconds(steps + [lambda: target.copy_(source)], args.device, args.repeats)
        copy_gbs = moved / copy_s / 1e9
        for backend, step_s, step in zip(backends, step_seconds, steps):
            step_gbs = moved / step_s / 1e9
            launches = str(cuda_kernels_per_call(step)) if args.device == "cuda" else "-"
            print(f"{label:<22}{backend:>{width}}{moved // args.numel:>11}{step_s * 1e3:>10.2f}{step_gbs:>11.1f}"
                  f"{copy_gbs:>11.1f}{step_gbs / copy_gbs:>8.2f}{launches:>10}"
                  + (f"{step_seconds[-1] / step_s:>{width + 3}.2f}x" if compare else ""))


if __name__ == "__main__":
    main()
