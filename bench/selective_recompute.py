"""Benchmark: what --recompute-granularity selective saves and what it costs
when attention is a fused SDPA kernel, measured side by side in one run.

Selective recomputation reruns the core attention, softmax(q k^T) v, in
backward. It was made for attention that keeps s x s matrices; the fused
(flash) kernel keeps none: for backward it saves q, k, v (also the
checkpoint's inputs, kept either way), its output and one log-sum-exp per
query row. Recomputing frees the output (on a GPU it is also linear_proj's
input, so nothing is freed there; on the CPU the output is a separate copy)
and the log-sum-exp, and costs one more attention forward per layer.

For each model shape the script builds a stack of transformer layers at the
shape scaled down by --scale (hidden size and sequence length divided alike,
head dimension and micro-batch kept: the share of attention in the FLOPs,
s / 6h, and the share of the log-sum-exp in a layer's activations, ~ 1 /
head dimension, stay the full model's), and reports, with and without
selective recomputation:

- held: bytes of activations alive after the forward, i.e. kept for backward
  (torch.distributed._tools.mem_tracker.MemTracker, --dtype bf16, per layer);
- peak: peak bytes of activations, gradients and temporaries during forward
  and backward;
- time: median forward + backward time, the two variants alternating
  (fp32 on the CPU, where bf16 matmuls may be emulated);
- the same layer's bytes from `megatron_sr.estimate.layer_saved_bytes` for
  the GPU at full size (the log-sum-exp is all that selective removes there),
  and the FLOPs the recomputed attention forwards add to a training step at
  full size (2 * 2 * s * h per token and layer against the layer's training
  FLOPs, counted as `flops_per_token` counts them: s / (3 (6h + s))).

    .venv/bin/python bench/selective_recompute.py [--scale 8] [--layers 2] [--iters 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from megatron_sr import parallel_state
from megatron_sr.config import ModelConfig, ParallelConfig
from megatron_sr.estimate import layer_saved_bytes
from megatron_sr.model.transformer import RotaryEmbedding, TransformerBlock
from megatron_sr.precision.strategies import get_strategy

# The example scripts' shapes that turned selective recomputation on: (layers, hidden,
# heads, micro-batch, TP) of examples/gpt_2.7b.sh and examples/gpt_6.7b.sh, seq 2048.
SHAPES = {"gpt_2.7b": (32, 2560, 32, 2, 1), "gpt_6.7b": (32, 4096, 32, 1, 2)}
SEQ_LENGTH = 2048


def model_config(hidden: int, heads: int, seq: int, dtype: torch.dtype,
                 recompute: str | None) -> ModelConfig:
    return ModelConfig(num_layers=1, hidden_size=hidden, num_attention_heads=heads,
                       vocab_size=128, seq_length=seq, position_embedding_type="rope",
                       hidden_dropout=0.0, attention_dropout=0.0, params_dtype=dtype,
                       recompute_granularity=recompute)


def build(config: ModelConfig, layers: int, micro_batch: int):
    torch.manual_seed(0)
    block = TransformerBlock(config, layers, final_norm=False, sequence_parallel=False)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.02)
    rope = RotaryEmbedding(config.head_dim, config.rotary_base, None)(config.seq_length, None)
    x = torch.randn(config.seq_length, micro_batch, config.hidden_size,
                    dtype=config.params_dtype).requires_grad_()
    return block, rope, x


def memory(config: ModelConfig, layers: int, micro_batch: int) -> tuple[int, int]:
    """(activation bytes held after the forward, peak bytes during forward and backward)
    beyond the parameters and the input."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    block, rope, x = build(config, layers, micro_batch)
    tracker = MemTracker()
    tracker.track_external(block, x)
    with tracker:
        y = block(x, rope)
        held = tracker.get_tracker_snapshot("current")[x.device][_MemRefType.ACT]
        y.backward(torch.ones_like(y))
    peak = tracker.get_tracker_snapshot("peak")[x.device]
    return held, peak["Total"] - peak[_MemRefType.PARAM]


def times(configs: dict[str, ModelConfig], layers: int, micro_batch: int, iters: int
          ) -> dict[str, float]:
    """Median seconds of forward + backward per variant, the variants alternating."""
    built = {name: build(config, layers, micro_batch) for name, config in configs.items()}
    samples: dict[str, list[float]] = {name: [] for name in configs}
    for i in range(iters + 1):
        for name, (block, rope, x) in built.items():
            start = time.perf_counter()
            y = block(x, rope)
            y.backward(torch.ones_like(y))
            if i:  # the first round warms up
                samples[name].append(time.perf_counter() - start)
            block.zero_grad(set_to_none=True)
            x.grad = None
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    mib = 1 << 20
    print(f"scale 1/{args.scale} (hidden and sequence), {args.layers} layers, "
          f"{torch.get_num_threads()} threads")
    print("| model | scaled shape | held/layer none | held/layer selective | saved | "
          "peak none | peak selective | time none | time selective | cost | "
          "GPU full size: held/layer none -> selective | full size: extra FLOPs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (_, hidden, heads, micro_batch, tp) in SHAPES.items():
        h, s, a = hidden // args.scale, SEQ_LENGTH // args.scale, heads // args.scale
        held, peak = {}, {}
        for variant in (None, "selective"):
            held[variant], peak[variant] = memory(model_config(h, a, s, torch.bfloat16, variant),
                                                  args.layers, micro_batch)
        seconds = times({str(v): model_config(h, a, s, torch.float32, v)
                         for v in (None, "selective")}, args.layers, micro_batch, args.iters)
        full = {v: layer_saved_bytes(model_config(hidden, heads, SEQ_LENGTH, torch.bfloat16, v),
                                     ParallelConfig(tensor_model_parallel_size=tp),
                                     get_strategy("bf16-sr"), micro_batch)
                for v in (None, "selective")}
        per_layer = {v: held[v] / args.layers for v in held}
        print(f"| {name} | h {h}, s {s}, {a} heads, b {micro_batch} | "
              f"{per_layer[None] / mib:.2f} MiB | {per_layer['selective'] / mib:.2f} MiB | "
              f"{1 - held['selective'] / held[None]:.1%} | {peak[None] / mib:.1f} MiB | "
              f"{peak['selective'] / mib:.1f} MiB | {seconds['None'] * 1e3:.0f} ms | "
              f"{seconds['selective'] * 1e3:.0f} ms | "
              f"{seconds['selective'] / seconds['None'] - 1:+.1%} | "
              f"{full[None] / mib:.1f} -> {full['selective'] / mib:.1f} MiB "
              f"({1 - full['selective'] / full[None]:.2%} saved) | "
              f"+{SEQ_LENGTH / (3 * (6 * hidden + SEQ_LENGTH)):.1%} |")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
