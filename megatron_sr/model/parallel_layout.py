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

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron_sr import parallel_state
from megatron_sr.config import ModelConfig, ParallelConfig, validate_parallel_layout
from megatron_sr.model.gpt_model import GPTModel
from megatron_sr.random import init_key
from megatron_sr.tensor_parallel import shard_element_index


def build_model(model_config: ModelConfig, parallel_config: ParallelConfig, *, seed: int = 1234,
                device=None, model_provider: Optional[Callable[..., nn.Module]] = None
                ) -> list[GPTModel]:
    """This rank's model chunks (one per virtual stage, else one), initialized.

    Every rank calls it after `parallel_state.initialize_model_parallel` with
    sizes matching `parallel_config`. Raises ValueError naming the flags when
    the model does not split over the layout. Weights: this rank draws only
    its own slice of each parameter, on `device` (`initialize_parameters`), and
    every layout holds the same model. `device`: default
    `parallel_state.get_default_device()` (CUDA under NCCL, else CPU).
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

    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    chunks = []
    for placement in chunk_placements(model_config, parallel_config, pp_rank):
        parallel_state.set_virtual_pipeline_model_parallel_rank(placement.virtual_rank)
        if model_provider is None:
            chunk = GPTModel(model_config, pre_process=placement.pre_process,
                             post_process=placement.post_process,
                             layer_offset=placement.layer_offset, num_layers=placement.num_layers,
                             sequence_parallel=parallel_config.sequence_parallel, device=device)
        else:
            chunk = model_provider(placement.pre_process, placement.post_process,
                                   layers=placement.layers, device=device)
        initialize_parameters(chunk, seed)
        chunks.append(chunk)
    parallel_state.set_virtual_pipeline_model_parallel_rank(0)
    return chunks


@dataclass(frozen=True)
class ChunkPlacement:
    """Model chunk `virtual_rank` of pipeline rank `pipeline_rank`: which layers it holds
    and whether it holds the embedding (pre_process) or the output layer (post_process)."""

    pipeline_rank: int
    virtual_rank: int
    layer_offset: int
    num_layers: int
    pre_process: bool
    post_process: bool

    @property
    def layers(self) -> range:
        """Its global layer numbers."""
        return range(self.layer_offset, self.layer_offset + self.num_layers)


def chunk_placements(model: ModelConfig, parallel: ParallelConfig, pipeline_rank: int
                     ) -> list[ChunkPlacement]:
    """The chunks `build_model` builds on `pipeline_rank`, in order (Megatron's
    interleaving: chunk v of rank p holds model chunk v * PP + p; the first
    chunk of the model holds the embedding, the last one the output layer)."""
    pp = parallel.pipeline_model_parallel_size
    layers = chunk_layers(model.num_layers, pp, parallel.virtual_pipeline_model_parallel_size,
                          pipeline_rank)
    return [ChunkPlacement(pipeline_rank, v, chunk.start, len(chunk),
                           pre_process=v == 0 and pipeline_rank == 0,
                           post_process=v == len(layers) - 1 and pipeline_rank == pp - 1)
            for v, chunk in enumerate(layers)]


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


INIT_CHUNK_ELEMENTS = {"cpu": 1 << 16, "cuda": 1 << 20}
"""Elements drawn at a time, per device type. Initialization's temporaries
(an int64 index, int64 Philox words, float64 Box-Muller terms) peak at about
INIT_BYTES_PER_ELEMENT per element of a chunk: ~8 MB on the CPU (a
cache-sized chunk) and ~130 MB on a GPU (few kernel launches: ~300 per chunk)."""

INIT_BYTES_PER_ELEMENT = 125
"""Peak temporary bytes per drawn element (measured on the CPU: the index and
fp32 output, 12, plus 113 of Philox and Box-Muller temporaries)."""


@torch.no_grad()
def initialize_parameters(model_chunk: nn.Module, seed: int) -> None:
    """Fills every parameter of `model_chunk` in place, on its own device, with
    its TP slice of the logical tensor: each element is drawn by its
    `init_method` from Philox key `init_key(seed, global_name)` and counter =
    its index in the unsharded tensor. So the values do not depend on the
    TP/PP layout, no rank materializes a full weight, and the temporaries
    are bounded by INIT_CHUNK_ELEMENTS (drawn in fp32/fp64, stored in the
    parameter's dtype). Parameters on the meta device are left as they are.
    No communication."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    for name, param in named_parameters_global([model_chunk]):
        if param.is_meta:  # shapes only (planning, `estimate`): nothing to draw
            continue
        key = init_key(seed, name)
        row_numel = max(1, param[0].numel()) if param.shape[0] else 1
        chunk = INIT_CHUNK_ELEMENTS.get(param.device.type, INIT_CHUNK_ELEMENTS["cuda"])
        rows_per_chunk = max(1, chunk // row_numel)
        for start in range(0, param.shape[0], rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            index = shard_element_index(param, tp_rank, tp, rows)
            values = torch.empty(index.shape, dtype=torch.float32, device=param.device)
            param.init_method(values, index, key)
            param[rows].copy_(values)


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
    """The gradient syncs other than data parallelism, after the last backward
    of a step, for gradients outside the optimizer's buffer (the buffer does
    the same sums itself, after the DP reduction and on its shard only:
    `ParamAndGradBuffer.finish_grad_sync`).

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
