"""How a GPT spreads over this rank: building its chunks, naming and
initializing their parameters, and the gradient syncs that are not data-parallel.

Pipeline layout: with PP stages and V virtual stages (chunks) per rank, the
L layers form PP * V chunks of L / (PP * V) consecutive layers; chunk v of
pipeline rank p holds chunk number v * PP + p (Megatron's interleaving), so
without interleaving stage p holds layers [p * L / PP, (p + 1) * L / PP).

Parameter identity: `param.global_name` is the name in the unsplit model,
the same for every TP/PP layout ("decoder.layers.5.mlp.linear_fc1.weight"
with the global layer number); the SR key and checkpoints are keyed by it.
Both copies of a tied word embedding are named "embedding.word_embeddings.weight"
(so they draw the same SR bits and stay equal); a rank never holds both.
`param_is_unique_in_model` says which copies count in model-wide sums.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron_sr import parallel_state
from megatron_sr.config import ModelConfig, ParallelConfig, validate_parallel_layout
from megatron_sr.model.gpt_model import GPTModel
from megatron_sr.random import init_generator
from megatron_sr.tensor_parallel import full_shape, shard_full_tensor


def build_model(model_config: ModelConfig, parallel_config: ParallelConfig, *, seed: int = 1234,
                device=None, model_provider: Optional[Callable[..., nn.Module]] = None
                ) -> list[GPTModel]:
    """This rank's model chunks (one per virtual stage, else one), initialized.

    Every rank calls it after `parallel_state.initialize_model_parallel` with
    sizes matching `parallel_config`. Raises ValueError naming the flags when
    the model does not split over the layout. Weights: each parameter's full
    tensor is drawn from `init_generator(seed, global_name)` and this rank
    keeps its TP slice, so every layout holds the same model. `device`:
    default `parallel_state.get_default_device()` (CUDA under NCCL, else CPU).
    `model_provider(pre_process, post_process, layers=range, device=...)`
    builds each chunk instead of `GPTModel(model_config, ...)` (see
    `training.pretrain` for what the chunk must provide).
    """
    if not dist.is_initialized():
        raise RuntimeError("build_model: call torch.distributed.init_process_group first")
    validate_parallel_layout(model_config, parallel_config, dist.get_world_size())
    state = (parallel_state.get_tensor_model_parallel_world_size(),
             parallel_state.get_pipeline_model_parallel_world_size(),
             parallel_state.get_virtual_pipeline_model_parallel_world_size())
    wanted = (parallel_config.tensor_model_parallel_size,
              parallel_config.pipeline_model_parallel_size,
              parallel_config.virtual_pipeline_model_parallel_size)
    if state != wanted:
        raise ValueError(f"build_model: parallel_state was initialized with (tensor, pipeline, "
                         f"virtual) sizes {state}, but the parallel config asks for {wanted}")
    device = parallel_state.get_default_device() if device is None else device

    pp, vp = state[1], state[2]
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    chunks = []
    for v, layers in enumerate(chunk_layers(model_config.num_layers, pp, vp, pp_rank)):
        parallel_state.set_virtual_pipeline_model_parallel_rank(v)
        pre_process = parallel_state.is_pipeline_first_stage()
        post_process = parallel_state.is_pipeline_last_stage()
        if model_provider is None:
            chunk = GPTModel(model_config, pre_process=pre_process, post_process=post_process,
                             layer_offset=layers.start, num_layers=len(layers),
                             sequence_parallel=parallel_config.sequence_parallel, device=device)
        else:
            chunk = model_provider(pre_process, post_process, layers=layers, device=device)
        initialize_parameters(chunk, seed)
        chunks.append(chunk)
    parallel_state.set_virtual_pipeline_model_parallel_rank(0)
    return chunks


def chunk_layers(num_layers: int, pipeline_size: int, virtual_size: Optional[int],
                 pipeline_rank: int) -> list[range]:
    """The global layer numbers of each chunk (virtual stage) of `pipeline_rank`."""
    vp = virtual_size or 1
    per_chunk = num_layers // (pipeline_size * vp)
    return [range((v * pipeline_size + pipeline_rank) * per_chunk,
                  (v * pipeline_size + pipeline_rank + 1) * per_chunk) for v in range(vp)]


def named_parameters_global(model_chunks: Iterable[nn.Module]) -> Iterator[tuple[str, nn.Parameter]]:
    """(global_name, parameter) for every parameter of this rank's chunks."""
    for chunk in model_chunks:
        for param in chunk.parameters():
            yield param.global_name, param


@torch.no_grad()
def initialize_parameters(model_chunk: nn.Module, seed: int) -> None:
    """Fills every parameter with its TP slice of the full tensor its
    `init_method` draws from `init_generator(seed, global_name)` (fp32, on the CPU)."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    for name, param in named_parameters_global([model_chunk]):
        full = torch.empty(full_shape(param, tp), dtype=torch.float32)
        param.init_method(full, init_generator(seed, name))
        param.copy_(shard_full_tensor(full, param, tp_rank, tp))


def param_is_unique_in_model(param: nn.Parameter) -> bool:
    """Whether this rank's copy of `param` counts in model-wide sums (grad
    norm, parameter count) over the TP x PP ranks of one replica: a
    TP-replicated parameter counts on TP rank 0 only, the last stage's copy of
    the tied word embedding not at all (the first stage holds the original)."""
    if not param.tensor_model_parallel and parallel_state.get_tensor_model_parallel_rank() != 0:
        return False
    return not (param.shared_embedding
                and not parallel_state.is_pipeline_first_stage(ignore_virtual=True))


def _grad_of(param: nn.Parameter) -> torch.Tensor:
    """The accumulated gradient: `main_grad` (the optimizer's buffer) when set, else `.grad`."""
    if hasattr(param, "main_grad"):
        return param.main_grad
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    return param.grad


def finalize_model_grads(model_chunks: list[nn.Module]) -> None:
    """The gradient syncs other than data parallelism, after the last backward of a step.

    Every rank calls it. In place on `main_grad` (if the attribute exists) or `.grad`:
    - TP > 1: gradients of `sequence_parallel` parameters (norms, row-parallel
      biases under --sequence-parallel) are summed over the TP group (one
      coalesced all-reduce);
    - PP > 1 with tied embeddings: the first stage's word-embedding gradient
      and the last stage's output-layer gradient are summed over the
      embedding group, so both copies take the same update.
    The data-parallel reduction is the optimizer's.
    """
    params = [p for chunk in model_chunks for p in chunk.parameters() if p.requires_grad]
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        grads = [_grad_of(p) for p in params if getattr(p, "sequence_parallel", False)]
        if grads:
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=parallel_state.get_tensor_model_parallel_group())
            for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                grad.copy_(synced)
    if (parallel_state.get_pipeline_model_parallel_world_size() > 1
            and parallel_state.is_rank_in_embedding_group()):
        shared = [p for p in params if getattr(p, "shared_embedding", False)]
        if len(shared) > 1:
            raise RuntimeError("finalize_model_grads: more than one tied embedding weight on a rank")
        if shared:
            dist.all_reduce(_grad_of(shared[0]), group=parallel_state.get_embedding_group())
