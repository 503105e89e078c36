"""Measure: peak memory of building (and initializing) ONE rank of a large GPT.

Starts `--tp x --pp` CPU ranks joined by Gloo (the layout is checked like a
real job's), then only `--rank` builds its model chunks: `build_model` does
not communicate, so the other ranks just take part in the process-group
set-up and exit, and the measured process holds exactly what one rank of the
real job would. Prints this rank's parameter bytes, its peak RSS minus the
RSS before the build, and the build time.

    .venv/bin/python bench/init_memory.py            # 7B Llama-style, TP 8, rank 0
    .venv/bin/python bench/init_memory.py --tp 8 --pp 1 --rank 3 --num-layers 32 ...

The default model is Llama-2-7B's shape: 32 layers, hidden 4096, 32 heads,
SwiGLU 11008, RMSNorm, RoPE, untied 32000-token vocabulary, bf16 params.
"""
from __future__ import annotations

import argparse
import os
import resource
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(rank: int, args: argparse.Namespace, port: int) -> None:
    from megatron_sr import parallel_state
    from megatron_sr.config import ModelConfig, ParallelConfig
    from megatron_sr.model import build_model

    torch.set_num_threads(args.threads)
    world = args.tp * args.pp
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    parallel_state.initialize_model_parallel(args.tp, args.pp)
    if rank == args.rank:
        config = ModelConfig(
            num_layers=args.num_layers, hidden_size=args.hidden_size,
            num_attention_heads=args.num_attention_heads, vocab_size=args.vocab_size,
            seq_length=4096, ffn_hidden_size=args.ffn_hidden_size,
            position_embedding_type="rope", normalization="RMSNorm", activation="swiglu",
            add_bias_linear=False, untie_embeddings_and_output_weights=True,
            params_dtype=torch.bfloat16)
        before = _rss_bytes()
        start = time.perf_counter()
        model = build_model(config, ParallelConfig(tensor_model_parallel_size=args.tp,
                                                   pipeline_model_parallel_size=args.pp),
                            device="cpu")
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        params = sum(p.numel() * p.element_size() for chunk in model for p in chunk.parameters())
        gib = 1 << 30
        print(f"rank {rank} of TP {args.tp} x PP {args.pp}: parameters {params / gib:.3f} GiB; "
              f"peak RSS {peak / gib:.3f} GiB, of which the build added "
              f"{(peak - before) / gib:.3f} GiB ({(peak - before) / params:.3f} x the parameter "
              f"bytes); RSS before the build {before / gib:.3f} GiB; build {seconds:.0f} s "
              f"on {args.threads} thread(s)", flush=True)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--rank", type=int, default=0, help="the rank that builds its model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--num-layers", type=int, default=32)
    parser.add_argument("--hidden-size", type=int, default=4096)
    parser.add_argument("--num-attention-heads", type=int, default=32)
    parser.add_argument("--ffn-hidden-size", type=int, default=11008)
    parser.add_argument("--vocab-size", type=int, default=32000)
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_worker, args=(args, port), nprocs=args.tp * args.pp,
                       start_method="forkserver")


if __name__ == "__main__":
    main()
