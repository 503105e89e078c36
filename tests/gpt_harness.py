"""Shared pieces of the model-parallel tests: a tiny GPT, deterministic
micro-batches, a forward step, and a runner that trains one layout and
returns its losses and full (TP-unsharded) gradients and weights by global name.

Every function runs inside a `run_ranks` worker (Gloo on the CPU).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.distributed as dist

from megatron_sr import parallel_state
from megatron_sr.config import ModelConfig, ParallelConfig
from megatron_sr.model import (
    build_model,
    finalize_model_grads,
    named_parameters_global,
    param_is_unique_in_model,
)
from megatron_sr.pipeline_parallel import get_forward_backward_func
from megatron_sr.random import model_parallel_seed
from megatron_sr.tensor_parallel import full_tensor_from_shards

SEED = 1234


def tiny_config(**overrides) -> ModelConfig:
    base = dict(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=64, seq_length=8,
                hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.float32)
    base.update(overrides)
    return ModelConfig(**base)


def make_batches(config: ModelConfig, num_microbatches: int, micro_batch_size: int, seed: int = 0):
    """[(tokens [b, s], labels [b, s])] * M, the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, config.vocab_size, (num_microbatches, micro_batch_size,
                                                config.seq_length + 1), generator=gen)
    return [(sample[:, :-1].contiguous(), sample[:, 1:].contiguous()) for sample in data]


def mean_loss(per_token_loss: torch.Tensor) -> torch.Tensor:
    return per_token_loss.mean()


def forward_step(data_iterator, model):
    tokens = labels = None
    if model.pre_process or model.post_process:
        tokens, labels = next(data_iterator)
    return model(tokens, labels=labels), mean_loss


def full_named_tensors(model_chunks, what: str) -> dict[str, torch.Tensor]:
    """{global_name: full fp32 numpy array} of this rank's parameters ('grad' or
    'weight'), TP slices all-gathered. Collective over the TP group. (numpy:
    torch tensors returned from a worker travel through shared memory that
    dies with the worker.)"""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group()
    out = {}
    for name, param in named_parameters_global(model_chunks):
        local = (param.grad if what == "grad" else param.data).detach().float().contiguous()
        shards = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(shards, local, group=group)
        out[name] = full_tensor_from_shards(shards, param).numpy()
    return out


def run_layout(config: ModelConfig, *, tp=1, pp=1, vp=None, sp=False, num_microbatches=4,
               micro_batch_size=2, steps=1, lr=0.1, forward_only=False, main_grad=False):
    """Trains `steps` SGD steps of one layout on the same batches; returns
    {'losses': [[M losses] per step] (last stage, else []), 'grads': last step's
    full grads, 'weights': full weights after the steps, 'pp_rank': ...}.
    `main_grad`: move the gradients to `param.main_grad` (as the optimizer's
    grad buffer does) before `finalize_model_grads`."""
    parallel_state.initialize_model_parallel(tp, pp, vp)
    try:
        model_parallel_seed(SEED)
        chunks = build_model(config, ParallelConfig(tensor_model_parallel_size=tp,
                                                    pipeline_model_parallel_size=pp,
                                                    virtual_pipeline_model_parallel_size=vp,
                                                    sequence_parallel=sp), seed=SEED)
        schedule = get_forward_backward_func()
        batches = make_batches(config, num_microbatches, micro_batch_size)
        all_losses, grads = [], {}
        for _ in range(steps):
            for chunk in chunks:
                chunk.zero_grad(set_to_none=True)
            losses = schedule(forward_step_func=forward_step,
                              data_iterator=[iter(batches) for _ in chunks], model=chunks,
                              num_microbatches=num_microbatches, seq_length=config.seq_length,
                              micro_batch_size=micro_batch_size, forward_only=forward_only)
            all_losses.append([loss.item() for loss in losses])
            if forward_only:
                continue
            if main_grad:
                for _, param in named_parameters_global(chunks):
                    param.main_grad, param.grad = param.grad, None
            finalize_model_grads(chunks)
            if main_grad:
                for _, param in named_parameters_global(chunks):
                    param.grad = param.main_grad
            grads = full_named_tensors(chunks, "grad")
            with torch.no_grad():
                for _, param in named_parameters_global(chunks):
                    param.add_(param.grad, alpha=-lr)
        return {"losses": all_losses, "grads": grads,
                "weights": full_named_tensors(chunks, "weight"),
                "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
                "dp_rank": parallel_state.get_data_parallel_rank(),
                "unique_numel": sum(p.numel() for _, p in named_parameters_global(chunks)
                                    if param_is_unique_in_model(p)),
                "tied_copies": {name: p.detach().float().numpy().copy()
                                for name, p in named_parameters_global(chunks)
                                if getattr(p, "shared_embedding", False)}}
    finally:
        parallel_state.destroy_model_parallel()


def merge_ranks(results: list[dict]) -> dict:
    """One layout's view over all ranks: last-stage losses, and grads/weights
    merged over pipeline stages."""
    merged = {"losses": next(r["losses"] for r in results if any(r["losses"])), "grads": {},
              "weights": {}}
    for r in results:
        merged["grads"].update(r["grads"])
        merged["weights"].update(r["weights"])
    return merged


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def with_dtype(config: ModelConfig, dtype) -> ModelConfig:
    return replace(config, params_dtype=dtype)
