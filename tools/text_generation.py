"""Generate text from a megatron_sr checkpoint.

    python tools/text_generation.py --load CKPT --prompt "In the beginning" \
        --max-new-tokens 32 --greedy
    torchrun --nproc_per_node 2 tools/text_generation.py --load CKPT --prompt ...   # TP=2

The model and tokenizer flags are read from the checkpoint, whatever TP/PP
layout it was saved with, and the model is run with tensor parallelism over
the ranks of this launch (one rank without torchrun), on the GPU when there
is one. No optimizer state is read: from a torch_dist checkpoint (the
default format) each rank reads only its own blocks of the weights; a
legacy one is merged in each process. Sampling: --greedy, or --temperature,
--top-k, --top-p with --seed (the same tokens on every rank); a KV cache keeps
generation linear in length (--no-kv-cache recomputes the prefix, for checks).
Prints each prompt followed by its continuation.
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_sr import parallel_state  # noqa: E402
from megatron_sr.checkpointing import (CheckpointError, load_model_state,  # noqa: E402
                                       read_manifest, resolve_checkpoint_dir, torch_dist)
from megatron_sr.checkpointing.conversion import (load_full_checkpoint,  # noqa: E402
                                                  model_config_from_description)
from megatron_sr.config import ParallelConfig  # noqa: E402
from megatron_sr.data.tokenizers import build_tokenizer  # noqa: E402
from megatron_sr.inference import generate  # noqa: E402
from megatron_sr.launch_environment import cuda_device_index  # noqa: E402
from megatron_sr.model import build_model  # noqa: E402
from megatron_sr.model.state_dict_layout import split_state_dict  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", required=True, help="checkpoint (--save dir or iter_ dir)")
    parser.add_argument("--prompt", action="append", required=True,
                        help="prompt text; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--greedy", action="store_true", help="argmax decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")
    parser.add_argument("--top-p", type=float, default=1.0, help="1.0: no nucleus filter")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--no-kv-cache", action="store_true",
                        help="recompute the whole prefix at every step")
    parser.add_argument("--vocab-file", help="override the checkpoint's tokenizer files")
    parser.add_argument("--merge-file")
    parser.add_argument("--tokenizer-model")
    return parser


def _init_process_group() -> None:
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(cuda_device_index(os.environ, torch.cuda.device_count()))
    if "RANK" in os.environ:
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def _load_model(path: str):
    """The checkpoint's model at TP = the world size on this rank, reading no
    optimizer state: a torch_dist checkpoint through a DCP partial load of this
    rank's blocks of the weights (`torch_dist.load_model`); a legacy one (one
    pickle per rank, weights and optimizer together) merged whole and split.
    Returns (model chunks, the checkpoint's description). Every rank calls it."""
    directory = resolve_checkpoint_dir(path)
    manifest = read_manifest(directory)
    if manifest.get("format") == torch_dist.FORMAT:
        _init_process_group()
        parallel_state.initialize_model_parallel(dist.get_world_size(), 1)
        checkpoint_reader, common = torch_dist.open_for_model(directory, manifest)
        description = common.get("args")
        config = model_config_from_description(description, directory)
        model = build_model(config,
                            ParallelConfig(tensor_model_parallel_size=dist.get_world_size()))
        torch_dist.load_model(checkpoint_reader, directory, model)
        return model, description
    checkpoint = load_full_checkpoint(path, with_optimizer=False)
    _init_process_group()
    tp = dist.get_world_size()
    parallel_state.initialize_model_parallel(tp, 1)
    model = build_model(checkpoint.config, ParallelConfig(tensor_model_parallel_size=tp))
    shards = split_state_dict(checkpoint.model, checkpoint.config, tensor_parallel_size=tp,
                              pipeline_parallel_size=1)
    load_model_state(model, shards[(parallel_state.get_tensor_model_parallel_rank(), 0)],
                     checkpoint.directory)
    return model, checkpoint.description


def run(args) -> list[str]:
    """Generates on every rank; returns the texts (prompt + continuation)."""
    try:
        model, description = _load_model(args.load)
        return _generate(args, model, description)
    finally:
        parallel_state.destroy_model_parallel()


def _generate(args, model, description: dict) -> list[str]:
    data = description["data"]
    tokenizer = build_tokenizer(data["tokenizer_type"],
                                vocab_file=args.vocab_file or data.get("vocab_file"),
                                merge_file=args.merge_file or data.get("merge_file"),
                                tokenizer_model=args.tokenizer_model or data.get("tokenizer_model"),
                                vocab_size=data.get("vocab_size"),
                                tiktoken_pattern=data.get("tiktoken_pattern", "v2"),
                                tiktoken_num_special_tokens=data.get(
                                    "tiktoken_num_special_tokens", 1000))
    for chunk in model:
        chunk.eval()
    prompts = [tokenizer.tokenize(text) for text in args.prompt]
    if any(not p for p in prompts):
        raise ValueError("--prompt must not be empty")
    outputs = generate(model, prompts, args.max_new_tokens, greedy=args.greedy,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       seed=args.seed, eod=tokenizer.eod, use_cache=not args.no_kv_cache,
                       vocab_size=tokenizer.vocab_size)
    return [tokenizer.detokenize(tokens) for tokens in outputs]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    rank = 0
    try:
        texts = run(args)
        rank = dist.get_rank()
    except (CheckpointError, ValueError, OSError) as exc:  # OSError: a file that cannot be read
        print(f"text_generation.py: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank != 0:
        return 0
    for text in texts:
        print(text)
        print("-" * 40)
    return 0


if __name__ == "__main__":
    sys.exit(main())
