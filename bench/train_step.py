"""Benchmark: a full training step (forward, backward, grad sync, AdamW) of one
GPT config under every precision strategy, measured side by side in one run.

Each strategy runs in its own fresh process group (one process per rank, so
peak RSS is per strategy); all of them are built and warmed up first, then
the timed iterations go round-robin in blocks (strategy A block 1, B block 1,
..., A block 2, ...), so a change of machine load hits every strategy alike.
Reported per strategy:

- tokens/s: global batch x seq / median time of the timed iterations, and
  the median time of the step and of its optimizer part (grad norm, AdamW,
  param all-gather);
  on CUDA also TFLOP/s per device (flops_per_token of the model) and MFU
  against --peak-tflops (default: the GPU's dense BF16 peak, when known);
- training state: bytes of params + grads + master + optimizer state from
  `memory_report` (max over ranks) and bytes per parameter;
- peak memory: peak RSS of the process (max over ranks) and peak RSS minus
  the RSS before the model was built (the Python/torch baseline, taken after
  one optimizer step on a scratch segment has compiled the CPU step), on
  CUDA torch.cuda.max_memory_allocated;
- ratios against bf16-mixed and amp, and with variants against the first entry.

A `--strategies` entry may add flags to its job with `+`: `bf16-sr+gradient-accumulation-fusion`
runs bf16-sr with `--gradient-accumulation-fusion`, so `--strategies
bf16-sr,bf16-sr+gradient-accumulation-fusion` is an A/B of that flag, side by side.

    .venv/bin/python bench/train_step.py [--strategies fp32,amp,bf16-mixed,bf16,bf16-sr,bf16-kahan]
        [--nproc N] [--device cpu|cuda] [--warmup 2] [--iters 8] [--block 2] [--markdown out.md]
        [-- MEGATRON FLAGS ...]

Megatron flags after `--` replace the default model (DEFAULT_MODEL_ARGS) when
they include --num-layers, else are added to it: e.g. `-- --num-layers 24 --hidden-size 1024 --num-attention-heads 16 --seq-length 2048
--micro-batch-size 4 --tensor-model-parallel-size 2`. With --nproc N the flags'
TP x PP must divide N; the rest is data parallel. Tokens are random ids
(no data files needed).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_MODEL_ARGS = ("--num-layers 6 --hidden-size 384 --num-attention-heads 6 --seq-length 128 "
                      "--max-position-embeddings 128 --micro-batch-size 2 --vocab-size 32000")
# Flags every benchmark job gets (the data and schedule do not matter for speed).
BENCH_JOB_ARGS = ("--mock-data --tokenizer-type NullTokenizer --train-iters 1000000 --lr 1e-4 "
                  "--min-lr 1e-5 --lr-decay-style cosine --weight-decay 0.1 --adam-beta2 0.95 "
                  "--clip-grad 1.0 --attention-dropout 0 --hidden-dropout 0")
ALL_STRATEGIES = "fp32,amp,bf16-mixed,bf16,bf16-sr,bf16-kahan"
# Dense BF16 tensor-core peak (TFLOP/s, no sparsity) by GPU name substring.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----- one rank of one strategy (a child process) --------------------------------------------

def _random_tokens(vocab_size: int, micro_batch: int, seq_length: int, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, vocab_size, (micro_batch, seq_length + 1), generator=generator)


def _compile_optimizer_step(strategy: str, device) -> None:
    """One AdamW step on a scratch segment big enough for the compiled CPU
    path, so that the compiler's memory is in the baseline RSS, not in the
    model's share of the peak."""
    import torch

    from megatron_sr.precision.adamw import COMPILE_MIN_NUMEL, adamw_step
    from megatron_sr.precision.strategies import get_strategy

    spec = get_strategy(strategy)
    n = COMPILE_MIN_NUMEL
    tensors = {name: torch.zeros(n, dtype=dtype, device=device)
               for name, dtype in (("param", spec.param_dtype), ("grad", spec.grad_dtype),
                                   ("exp_avg", spec.exp_avg_dtype),
                                   ("exp_avg_sq", spec.exp_avg_sq_dtype),
                                   ("master", spec.master_dtype), ("kahan", spec.kahan_dtype))
               if dtype is not None}
    adamw_step(spec, **tensors, lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
               step=1, sr_key=1)


def variant_args(entry: str) -> list[str]:
    """The flags of a --strategies entry: `STRATEGY[+FLAG...]` -> --precision STRATEGY --FLAG..."""
    strategy, *flags = entry.split("+")
    return ["--precision", strategy] + ["--" + flag for flag in flags]


def _worker(strategy: str, megatron_args: list[str], rank: int, world_size: int, port: int,
            threads: int, connection) -> None:
    """Builds the job of `strategy` (a --strategies entry), warms up, then answers
    the parent's ("run", n) with n iteration times and "finish" with its peak memory."""
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
        import torch

        torch.set_num_threads(threads)
        from megatron_sr import parallel_state
        from megatron_sr.config import parse_args
        from megatron_sr.model import flops_per_token
        from megatron_sr.training import (initialize_distributed, make_forward_step, memory_report,
                                          setup_model_and_optimizer, train_step)

        job = parse_args(megatron_args + variant_args(strategy), world_size)
        job = job.with_vocab_size(job.data.vocab_size)
        device = initialize_distributed(job)
        cuda = device.type == "cuda"
        _compile_optimizer_step(job.optimizer.precision, device)
        baseline_rss = _rss_bytes()
        model, optimizer, _ = setup_model_and_optimizer(job)
        seed = 1000 + parallel_state.get_data_parallel_rank()
        iterators = [_random_tokens(job.unpadded_vocab_size, job.training.micro_batch_size,
                                    job.model.seq_length, seed)
                     if chunk.pre_process or chunk.post_process else None for chunk in model]
        forward_step = make_forward_step(optimizer.strategy, device)
        report = memory_report(optimizer)
        params = optimizer.buffer.param_buffer.numel()

        optimizer_times = []
        step_optimizer = optimizer.step

        def timed_optimizer_step(*args, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = step_optimizer(*args, **kwargs)
            if cuda:
                torch.cuda.synchronize()
            optimizer_times.append(time.perf_counter() - start)
            return result

        optimizer.step = timed_optimizer_step

        def one_iteration() -> tuple[float, float]:
            """(seconds of the whole step, of which in the optimizer step)."""
            start = time.perf_counter()
            train_step(job, model, optimizer, iterators, 1e-4, forward_step)
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - start, optimizer_times[-1]

        connection.send(("ready", dict(state_bytes=report["total"], memory=report,
                                       params_local=params, baseline_rss=baseline_rss,
                                       flops_per_token=flops_per_token(job.model),
                                       tokens_per_step=job.training.global_batch_size
                                       * job.model.seq_length,
                                       device_name=torch.cuda.get_device_name(device)
                                       if cuda else "cpu")))
        while True:
            command, count = connection.recv()
            if command == "run":
                torch.distributed.barrier()
                connection.send(("times", [one_iteration() for _ in range(count)]))
            elif command == "finish":
                peak_cuda = torch.cuda.max_memory_allocated(device) if cuda else None
                connection.send(("peak", dict(peak_rss=_peak_rss_bytes(), peak_cuda=peak_cuda)))
                break
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()
    except BaseException:
        connection.send(("error", traceback.format_exc()))


class StrategyGroup:
    """The `world_size` processes that run one strategy, and their pipes."""

    def __init__(self, context, strategy: str, megatron_args: list[str], world_size: int,
                 threads: int):
        self.strategy = strategy
        port = _free_port()
        self.connections, self.processes = [], []
        for rank in range(world_size):
            parent_end, child_end = context.Pipe()
            process = context.Process(target=_worker, daemon=True,
                                      args=(strategy, megatron_args, rank, world_size, port,
                                            threads, child_end))
            process.start()
            self.connections.append(parent_end)
            self.processes.append(process)

    def receive(self, expected: str, timeout: float) -> list:
        answers = []
        for rank, connection in enumerate(self.connections):
            if not connection.poll(timeout):
                raise TimeoutError(f"{self.strategy} rank {rank}: no answer in {timeout:.0f} s")
            kind, value = connection.recv()
            if kind == "error":
                raise RuntimeError(f"{self.strategy} rank {rank} failed:\n{value}")
            assert kind == expected, (kind, expected)
            answers.append(value)
        return answers

    def send(self, command: str, count: int = 0) -> None:
        for connection in self.connections:
            connection.send((command, count))

    def close(self) -> None:
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()


# ----- the parent: schedule, collect, tabulate ----------------------------------------------

def measure(strategies: list[str], megatron_args: list[str], nproc: int, threads: int,
            warmup: int, iters: int, block: int, timeout: float) -> dict[str, dict]:
    """Per strategy: info of rank 0 plus `times` (timed iterations, rank 0) and
    the max over ranks of state bytes and peak memory."""
    context = mp.get_context("spawn")
    results = {}
    groups = []
    try:
        # Build one group at a time (set-up and compilation do not overlap), warm it up,
        # then leave it waiting on its pipe (no CPU) while the others are built.
        for strategy in strategies:
            group = StrategyGroup(context, strategy, megatron_args, nproc, threads)
            groups.append(group)
            infos = group.receive("ready", timeout)
            info = dict(infos[0])
            info["state_bytes"] = max(i["state_bytes"] for i in infos)
            info["baseline_rss"] = max(i["baseline_rss"] for i in infos)
            results[strategy] = info
            if warmup:
                group.send("run", warmup)
                group.receive("times", timeout)
            print(f"[bench] {strategy}: built and warmed up", file=sys.stderr, flush=True)
        for info in results.values():
            info["times"], info["optimizer_times"] = [], []
        remaining = iters
        while remaining > 0:  # round-robin blocks
            count = min(block, remaining)
            for group in groups:
                group.send("run", count)
                pairs = group.receive("times", timeout)[0]
                results[group.strategy]["times"] += [step for step, _ in pairs]
                results[group.strategy]["optimizer_times"] += [opt for _, opt in pairs]
            remaining -= count
        for group in groups:
            group.send("finish")
            peaks = group.receive("peak", timeout)
            info = results[group.strategy]
            info["peak_rss"] = max(p["peak_rss"] for p in peaks)
            cuda_peaks = [p["peak_cuda"] for p in peaks if p["peak_cuda"] is not None]
            info["peak_cuda"] = max(cuda_peaks) if cuda_peaks else None
    finally:
        for group in groups:
            group.close()
    return results


def _ratio(value, reference) -> str:
    return "-" if value is None or not reference else f"{value / reference:.2f}"


def table(results: dict[str, dict], nproc: int, peak_tflops) -> str:
    mib = 1 << 20
    for info in results.values():
        info["tokens_per_s"] = info["tokens_per_step"] / statistics.median(info["times"])
        info["optimizer_ms"] = 1e3 * statistics.median(info["optimizer_times"])
        info["step_ms"] = 1e3 * statistics.median(info["times"])
        info["tflops"] = info["flops_per_token"] * info["tokens_per_s"] / nproc / 1e12
        info["peak_above_baseline"] = info["peak_rss"] - info["baseline_rss"]
        info["bytes_per_param"] = info["state_bytes"] / info["params_local"]
        info["peak"] = info["peak_cuda"] if info["peak_cuda"] is not None else info["peak_rss"]
    cuda = any(info["peak_cuda"] is not None for info in results.values())
    mixed, amp = results.get("bf16-mixed"), results.get("amp")
    first = next(iter(results.values()))
    variants = any("+" in name for name in results)

    def ref(reference, key):
        return reference[key] if reference else None

    head = ["strategy", "tokens/s"] + (["vs first"] if variants else []) + [
        "vs bf16-mixed", "vs amp", "step ms", "optimizer ms", "state MiB", "B/param",
        "state vs bf16-mixed"]
    if cuda:
        head += ["TFLOP/s/dev", "MFU", "peak CUDA MiB", "peak vs amp"]
    else:
        head += ["peak RSS MiB", "peak - baseline MiB", "peak vs amp", "(peak-base) vs amp"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for name, info in results.items():
        row = [name, f"{info['tokens_per_s']:.0f}"] + (
            [_ratio(info["tokens_per_s"], first["tokens_per_s"])] if variants else []) + [
               _ratio(info["tokens_per_s"], ref(mixed, "tokens_per_s")),
               _ratio(info["tokens_per_s"], ref(amp, "tokens_per_s")),
               f"{info['step_ms']:.0f}", f"{info['optimizer_ms']:.0f}",
               f"{info['state_bytes'] / mib:.1f}", f"{info['bytes_per_param']:.2f}",
               _ratio(info["state_bytes"], ref(mixed, "state_bytes"))]
        if cuda:
            mfu = "-" if not peak_tflops else f"{100 * info['tflops'] / peak_tflops:.1f}%"
            row += [f"{info['tflops']:.1f}", mfu, f"{info['peak'] / mib:.0f}",
                    _ratio(info["peak"], ref(amp, "peak"))]
        else:
            row += [f"{info['peak_rss'] / mib:.0f}", f"{info['peak_above_baseline'] / mib:.0f}",
                    _ratio(info["peak_rss"], ref(amp, "peak_rss")),
                    _ratio(info["peak_above_baseline"], ref(amp, "peak_above_baseline"))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    megatron_args = []
    if "--" in argv:
        cut = argv.index("--")
        argv, megatron_args = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", default=ALL_STRATEGIES,
                        help="comma-separated --precision values, each optionally with +FLAG...")
    parser.add_argument("--nproc", type=int, default=1, help="ranks per strategy (TP x PP x DP)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads per rank (default: CPU cores / nproc)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per strategy")
    parser.add_argument("--iters", type=int, default=8, help="timed iterations per strategy")
    parser.add_argument("--block", type=int, default=2, help="iterations per round-robin block")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="per-device peak for MFU (default: dense BF16 peak of known GPUs)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds any one answer may take")
    parser.add_argument("--markdown", help="also write the table (and the command) to this file")
    args = parser.parse_args(argv)

    import torch

    from megatron_sr.config import parse_args
    from megatron_sr.precision.strategies import STRATEGIES

    strategies = args.strategies.split(",")
    unknown = [s for s in strategies if s.split("+")[0] not in STRATEGIES]
    if unknown:
        parser.error(f"--strategies: unknown {unknown}; choose from {sorted(STRATEGIES)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    if device == "cpu":
        # initialize_distributed picks NCCL whenever CUDA is present; force Gloo.
        megatron_args = megatron_args + ["--distributed-backend", "gloo"]
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    model_args = megatron_args if any(a.startswith("--num-layers") for a in megatron_args) \
        else DEFAULT_MODEL_ARGS.split() + megatron_args
    full_args = BENCH_JOB_ARGS.split() + model_args
    for strategy in strategies:  # fail here, with the flag named, not in every child
        parse_args(full_args + variant_args(strategy), args.nproc)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.nproc)
    peak_tflops = args.peak_tflops
    if peak_tflops is None and device == "cuda":
        name = torch.cuda.get_device_name(0)
        peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    from megatron_sr.precision.adamw import resolve_backend

    adamw_backends = {n: resolve_backend(None, torch.device(device), n) for n in (256, 1 << 20)}
    command = "python bench/train_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"[bench] device={device} nproc={args.nproc} threads/rank={threads} "
          f"warmup={args.warmup} iters={args.iters} block={args.block} "
          f"AdamW backend: {adamw_backends[256]} (256-element segments), "
          f"{adamw_backends[1 << 20]} (1M) [MEGATRON_SR_ADAMW_BACKEND="
          f"{os.environ.get('MEGATRON_SR_ADAMW_BACKEND', '')}]\n"
          f"[bench] model: {' '.join(model_args)}", flush=True)
    results = measure(strategies, full_args, args.nproc, threads, args.warmup, args.iters,
                      args.block, args.timeout)
    text = table(results, args.nproc, peak_tflops)
    print(text, end="")
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(f"`{command} -- {' '.join(model_args)}` on {device} "
                         f"({results[strategies[0]]['device_name']}), {args.nproc} rank(s), "
                         f"{threads} thread(s)/rank, AdamW backend {adamw_backends[1 << 20]} "
                         f"(small segments: {adamw_backends[256]}):\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
