"""Scale simulation: one rank of a large job, at full size, on the CPU, without a GPU.

The real model and its param/grad buffers are built on the `meta` device
(shapes and dtypes, no memory, no values) for one rank of a big layout, with
torch's `fake` process group standing in for the other ranks (every
collective returns at once; outputs are uninitialized, which on `meta` is all
there is). A forward and backward of the rank's model chunk then runs the real
code paths in about a second and shows, at the job's real sizes:

- `SavedTensorCensus`: every tensor autograd saves for backward, attributed to
  the transformer layer (or "embedding" / "output") whose forward saved it,
  with its storage's bytes and dtype (de-duplicated by storage; parameters
  and the param buffer they are views of excluded);
- `CollectiveCensus`: every collective issued through torch.distributed
  (the c10d operators under the Python API), in issue order, with its
  operator, its group's global ranks and the bytes of its tensors. It is a
  `TorchDispatchMode`, so it sees collectives wherever they are called from
  (layers, buffers, the optimizer) and can count ops and bytes per group for
  any layout the fake group can take (1,024 ranks included).

The first `meta` operation of a process imports torch's reference kernels
(`torch._refs`, several seconds); the simulation itself takes about a second
per rank.

Which code path runs on `meta` tensors: the GPU's. The CPU-BF16 emulation of
`megatron_sr.cpu_bf16` (FP32 products of BF16 inputs, with FP32 copies saved:
a test-bench path) is for CPU tensors only; `simulated_rank` also sets
MEGATRON_SR_CPU_BF16_GEMM=native so that no CPU tensor of the run takes it
either. Attention on `meta` is torch's SDPA, whose meta kernel dispatches like
CPU's: with --attention-dropout 0 it is the flash kernel (q, k, v, the output
and an fp32 log-sum-exp saved), as on a GPU.

Usage (see tests/test_scale_simulation.py):

    job = job_config(SEVEN_B_ARGV)
    with simulated_rank(job, rank=5, world_size=64) as rank:
        with SavedTensorCensus(rank.model) as saved, CollectiveCensus() as collectives:
            rank.forward_backward()
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_sr import parallel_state
from megatron_sr.config import JobConfig, build_parser
from megatron_sr.estimate import add_estimate_args, jobs_from_args
from megatron_sr.model import build_model
from megatron_sr.optimizer.param_buffer import ParamAndGradBuffer
from megatron_sr.precision.strategies import get_strategy
from megatron_sr.training import grad_dtype, param_infos

_LLAMA = ("--normalization RMSNorm --position-embedding-type rope --swiglu "
          "--disable-bias-linear --untie-embeddings-and-output-weights "
          "--attention-dropout 0 --hidden-dropout 0 --micro-batch-size 1 "
          "--precision bf16-sr --use-distributed-optimizer --overlap-grad-reduce "
          "--sequence-parallel --recompute-granularity selective").split()

SEVEN_B_ARGV = ("--num-layers 32 --hidden-size 4096 --ffn-hidden-size 11008 "
                "--num-attention-heads 32 --seq-length 4096 --max-position-embeddings 4096 "
                "--vocab-size 32000 --global-batch-size 1024 "
                "--tensor-model-parallel-size 8 --world-size 64").split() + _LLAMA
"""examples/llama2_7b.sh's model at TP 8 x DP 8 (64 ranks), sequence parallel."""

SEVENTY_B_ARGV = ("--num-layers 80 --hidden-size 8192 --ffn-hidden-size 28672 "
                  "--num-attention-heads 64 --group-query-attention --num-query-groups 8 "
                  "--seq-length 4096 --max-position-embeddings 4096 --vocab-size 32000 "
                  "--global-batch-size 1024 --tensor-model-parallel-size 8 "
                  "--pipeline-model-parallel-size 8 --world-size 512").split() + _LLAMA
"""A Llama-2-70B-shaped model (docs/SCALING.md's 70B class, with its 8 key/value
groups) at TP 8 x PP 8 x DP 8 (512 ranks)."""


def job_config(argv: list[str], **overrides: str) -> JobConfig:
    """The validated JobConfig `pretrain_gpt.py` (and tools/estimate.py) make of
    `argv`; `overrides` replace flags: num_layers=\"2\" -> --num-layers 2."""
    argv = list(argv)
    for name, value in overrides.items():
        flag = "--" + name.replace("_", "-")
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    args = build_parser(extra_args_provider=add_estimate_args).parse_args(argv)
    (job,) = jobs_from_args(args)
    return job


@dataclass
class SimulatedRank:
    """One rank's model chunks and buffer, on `meta`."""

    job: JobConfig
    model: list
    buffer: ParamAndGradBuffer

    def forward_backward(self) -> None:
        """One micro-batch's forward and backward of every chunk of this rank
        (a non-first chunk gets a [s / tp, b, h] input, as the pipeline sends
        it; a non-last chunk's output gets a gradient of its shape), then the
        buffer's grad sync as the step ends it."""
        self.buffer.prepare_grad_sync(num_microbatches=1)
        model_config, b = self.job.model, self.job.training.micro_batch_size
        s = model_config.seq_length
        meta = torch.device("meta")
        for chunk in self.model:
            tokens = torch.zeros(b, s, dtype=torch.long, device=meta)
            if not chunk.pre_process:
                tp = parallel_state.get_tensor_model_parallel_world_size()
                local = s // tp if self.job.parallel.sequence_parallel else s
                chunk.set_input_tensor(torch.empty(local, b, model_config.hidden_size,
                                                   dtype=self.buffer.param_buffer.dtype,
                                                   device=meta, requires_grad=True))
            output = chunk(tokens, labels=tokens if chunk.post_process else None)
            output.backward(torch.empty_like(output))
        self.buffer.finish_grad_sync()


@contextlib.contextmanager
def fake_world(rank: int, world_size: int) -> Iterator[None]:
    """torch.distributed initialized as `rank` of `world_size` on the `fake`
    process group (no other process exists); destroyed on exit."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def simulated_rank(job: JobConfig, rank: int, world_size: int) -> Iterator[SimulatedRank]:
    """Rank `rank` of `job`'s layout over `world_size` ranks, model and param/grad buffer built on `meta`
    (the buffer's layout, buckets and hooks are the training job's), with
    MEGATRON_SR_CPU_BF16_GEMM=native while it is open (module docstring)."""
    parallel = job.parallel
    previous = os.environ.get("MEGATRON_SR_CPU_BF16_GEMM")
    os.environ["MEGATRON_SR_CPU_BF16_GEMM"] = "native"
    from megatron_sr.cpu_bf16 import cpu_has_native_bf16
    cpu_has_native_bf16.cache_clear()
    with fake_world(rank, world_size):
        parallel_state.initialize_model_parallel(
            parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
            parallel.virtual_pipeline_model_parallel_size)
        try:
            strategy = get_strategy(job.optimizer.precision, job.optimizer.optimizer_state_dtype)
            model = build_model(job.model, parallel, device=torch.device("meta"))
            params = [p for chunk in model for p in chunk.parameters()]
            buffer = ParamAndGradBuffer(
                params, param_infos(params), strategy.param_dtype, grad_dtype(job, strategy),
                parallel_state.get_data_parallel_group(),
                distributed=parallel.use_distributed_optimizer,
                overlap_grad_reduce=parallel.overlap_grad_reduce,
                tensor_parallel_group=parallel_state.get_tensor_model_parallel_group(),
                embedding_group=(parallel_state.get_embedding_group()
                                 if parallel_state.is_rank_in_embedding_group() else None))
            yield SimulatedRank(job, model, buffer)
        finally:
            parallel_state.destroy_model_parallel()
            if previous is None:
                os.environ.pop("MEGATRON_SR_CPU_BF16_GEMM", None)
            else:
                os.environ["MEGATRON_SR_CPU_BF16_GEMM"] = previous
            cpu_has_native_bf16.cache_clear()


@dataclass(frozen=True)
class SavedTensor:
    owner: str  # "layer N" (global layer number), "embedding", "output"
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int  # its storage's bytes (a view's whole storage)


class SavedTensorCensus:
    """Context manager: records every tensor autograd saves while it is open.

    Each storage counts once, for the first owner that saved it (q, k and v
    are views of one qkv output; a layer's output, saved by the next layer's
    norm, belongs to the layer that made it only if that one saved it too).
    The owner is the innermost `TransformerLayer` running forward (its global
    number), else "embedding" before the first layer ran and "output" after.
    Parameters and any view of the param buffer are not counted.
    `torch.utils.checkpoint`'s own saved inputs pass through the outer hooks
    too, so recomputation is counted as it keeps memory."""

    def __init__(self, model_chunks: list):
        self.saved: list[SavedTensor] = []
        self._storages: set[int] = set()
        self._excluded = {p.untyped_storage()._cdata for chunk in model_chunks
                          for p in chunk.parameters()}
        self._layers = [(chunk.layer_offset + index, layer) for chunk in model_chunks
                        for index, layer in enumerate(chunk.decoder.layers)]
        self._owner = "embedding"
        self._stack = contextlib.ExitStack()

    def _enter_layer(self, layer_number: int):
        def hook(_module, _args):
            self._owner = f"layer {layer_number}"
        return hook

    def _leave_layer(self, _module, _args, _output):
        self._owner = "output"

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self._excluded and key not in self._storages \
                and not isinstance(tensor, torch.nn.Parameter):
            self._storages.add(key)
            self.saved.append(SavedTensor(self._owner, tuple(tensor.shape), tensor.dtype,
                                          storage.nbytes()))
        return tensor

    def __enter__(self) -> "SavedTensorCensus":
        for number, layer in self._layers:
            self._stack.enter_context(_removable(layer.register_forward_pre_hook(
                self._enter_layer(number))))
            self._stack.enter_context(_removable(layer.register_forward_hook(self._leave_layer)))
        self._stack.enter_context(
            torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def bytes_by_owner(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for t in self.saved:
            totals[t.owner] = totals.get(t.owner, 0) + t.nbytes
        return totals


@contextlib.contextmanager
def _removable(handle):
    try:
        yield handle
    finally:
        handle.remove()


@dataclass(frozen=True)
class Collective:
    op: str  # the c10d operator, e.g. "_reduce_scatter_base_", "allreduce_"
    group: tuple[int, ...]  # global ranks of its process group
    nbytes: int  # bytes of its input tensors (an all-gather's shard, a reduce-scatter's whole)


@dataclass
class CollectiveCensus(TorchDispatchMode):
    """Context manager: every torch.distributed collective issued while it is
    open, in issue order (`calls`). Works at the c10d operator level, so it
    sees a collective whichever module issues it, synchronous or not."""

    calls: list[Collective] = field(default_factory=list)

    def __post_init__(self):
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            self.calls.append(_describe(func, args))
        return func(*args, **(kwargs or {}))

    def on_group(self, ranks) -> list[Collective]:
        ranks = tuple(ranks)
        return [c for c in self.calls if c.group == ranks]

    def totals_by_group(self) -> dict[tuple[int, ...], tuple[int, int]]:
        """{group's global ranks: (collectives issued, bytes)}."""
        totals: dict[tuple[int, ...], tuple[int, int]] = {}
        for call in self.calls:
            count, nbytes = totals.get(call.group, (0, 0))
            totals[call.group] = (count + 1, nbytes + call.nbytes)
        return totals


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def _describe(func, args) -> Collective:
    group: Optional[tuple[int, ...]] = None
    for arg in args:
        if isinstance(arg, torch.ScriptObject):
            try:
                process_group = dist.ProcessGroup.unbox(arg)
            except RuntimeError:  # a ReduceOp or options object, not the group
                continue
            group = tuple(dist.get_process_group_ranks(process_group))
    takes_output_first = func._opname.lstrip("_").startswith(("allgather", "reduce_scatter"))
    tensors = _tensors(args[1] if takes_output_first else args[0])
    return Collective(func._opname, group or (), sum(t.numel() * t.element_size() for t in tensors))
