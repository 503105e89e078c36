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

Whole training steps (`simulated_training`): the model and the
DistributedOptimizer come from the training job's `setup_model_and_optimizer`
on `meta` (`parallel_state`'s default device while the simulation is open),
and `SimulatedTraining.step` runs `train_step` as the training loop calls it:
the pipeline schedule's sends and receives (the fake group completes them at
once), every collective, the optimizer in the torch reference
(`_meta_code_paths`). The step's host read of a `meta` tensor reads zeros
(`MetaHostReads`). `census_step` records one rank's collectives of a step
between log lines and of a log step; tests/test_collective_census.py checks
them at 1,024 ranks against `megatron_sr.estimate`, and

    python tests/scale_simulation.py --census

prints the table docs/SCALING.md quotes.

The first `meta` operation of a process imports torch's reference kernels
(`torch._refs`, several seconds); the forward and backward of one
micro-batch take about a second per rank, a whole 70B-class step of 4
micro-batches on a rank of 20 layers about 5 s.

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
import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_sr import parallel_state
from megatron_sr.config import JobConfig, build_parser
from megatron_sr.estimate import (JobEstimate, StageEstimate, add_estimate_args, estimate_job,
                                  jobs_from_args)
from megatron_sr.model import build_model
from megatron_sr.optimizer.distributed_optimizer import DistributedOptimizer
from megatron_sr.optimizer.param_buffer import ParamAndGradBuffer
from megatron_sr.precision.strategies import get_strategy
from megatron_sr.optimizer.param_buffer import param_infos
from megatron_sr.precision.strategies import grad_dtype
from megatron_sr.training import (LossAccumulator, StepContext, make_forward_step,
                                  setup_model_and_optimizer, train_step)
from megatron_sr.training.policy import exit_conditions

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


def with_flags(argv: list[str], **overrides: str) -> list[str]:
    """A copy of `argv` whose flags `overrides` replace (or add):
    num_layers=\"2\" -> --num-layers 2."""
    argv = list(argv)
    for name, value in overrides.items():
        flag = "--" + name.replace("_", "-")
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


def job_config(argv: list[str], **overrides: str) -> JobConfig:
    """The validated JobConfig `pretrain_gpt.py` (and tools/estimate.py) make of
    `argv`, its flags replaced by `overrides` (`with_flags`)."""
    argv = with_flags(argv, **overrides)
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
    dist.init_process_group("cpu:fake,meta:fake", store=FakeStore(), rank=rank,
                            world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _meta_code_paths() -> Iterator[None]:
    """While open: MEGATRON_SR_CPU_BF16_GEMM=native (module docstring) and the
    optimizer's torch reference backend ("eager": the fused kernels cannot run
    on `meta`, and torch.compile of meta tensors is not what a GPU runs), in
    segment-sized chunks (`adamw_torch.EAGER_CHUNK` bounds a CPU's working
    memory; on `meta` there is none, and one chunk per segment keeps a
    70B shard's step to a second)."""
    from megatron_sr.cpu_bf16 import cpu_has_native_bf16
    from megatron_sr.precision import adamw_torch
    settings = {"MEGATRON_SR_CPU_BF16_GEMM": "native", "MEGATRON_SR_ADAMW_BACKEND": "eager"}
    previous = {name: os.environ.get(name) for name in settings}
    chunk = adamw_torch.EAGER_CHUNK
    os.environ.update(settings)
    adamw_torch.EAGER_CHUNK = 1 << 62
    cpu_has_native_bf16.cache_clear()
    try:
        yield
    finally:
        adamw_torch.EAGER_CHUNK = chunk
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        cpu_has_native_bf16.cache_clear()


@contextlib.contextmanager
def _model_parallel(job: JobConfig) -> Iterator[None]:
    parallel = job.parallel
    parallel_state.initialize_model_parallel(
        parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
        parallel.virtual_pipeline_model_parallel_size, device=torch.device("meta"))
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()


class MetaHostReads(TorchDispatchMode):
    """Context manager: a host read of a `meta` tensor (`.item()`, `.tolist()`,
    `float()`, a copy to the CPU) reads zeros instead of failing. So the step's
    host read of the grad norm and the exit flags sees a finite norm (0: the
    step is applied) and no exit flag, and the torch reference optimizer
    reads a gradient factor of 0 and its SR keys as zeros (values nobody
    looks at on `meta`). Other operators run as they are."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        source = args[0] if args else None
        if isinstance(source, torch.Tensor) and source.is_meta:
            if func is torch.ops.aten._local_scalar_dense.default:
                return False if source.dtype is torch.bool else 0
            device = kwargs.get("device")
            if func is torch.ops.aten._to_copy.default and device is not None \
                    and torch.device(device).type == "cpu":
                return torch.zeros(source.shape, dtype=kwargs.get("dtype") or source.dtype)
        return func(*args, **kwargs)


@dataclass
class SimulatedTraining:
    """One rank's model chunks and DistributedOptimizer from the training
    job's own `setup_model_and_optimizer`, on `meta`."""

    job: JobConfig
    model: list
    optimizer: DistributedOptimizer

    def step(self, log_step: bool = False) -> None:
        """One `train_step` as the training loop calls it (`training.train`):
        its loss accumulator, its exit flags; a log step (`log_step`) also
        reduces the loss, measures update absorption (and the params norm and
        zero gradients with --log-params-norm / --log-num-zeros-in-grad) and
        reads the interval's mean loss for the log line. Micro-batches are [b, s + 1] token rows on
        `meta`, as the loop's data stream yields them; host reads of `meta`
        tensors read zeros (`MetaHostReads`)."""
        job = self.job
        b, s = job.training.micro_batch_size, job.model.seq_length
        rows = itertools.repeat(torch.zeros(b, s + 1, dtype=torch.long, device="meta"))
        forward_step = make_forward_step(self.optimizer.strategy, torch.device("meta"))
        losses = LossAccumulator()
        start_time = time.time()
        with MetaHostReads():
            context = StepContext(
                loss_accumulator=losses, measure_update_absorption=log_step,
                measure_params_norm=log_step and job.training.log_params_norm,
                count_zeros_in_grad=log_step and job.training.log_num_zeros_in_grad,
                exit_flags=lambda: exit_conditions(None, job.training, start_time))
            train_step(job, self.model, self.optimizer, [rows] * len(self.model), 1e-4,
                       forward_step, reduce_loss=log_step, context=context)
            if log_step:
                losses.mean_over_data_parallel()

    @staticmethod
    def groups() -> dict[str, tuple[int, ...]]:
        """This rank's process groups by name: "tensor", "data", "pipeline",
        "embedding" (tied embeddings' first and last stage; absent on ranks
        outside it), "model" (TP x PP) and "world"."""
        tp = parallel_state.get_tensor_model_parallel_world_size()
        dp = parallel_state.get_data_parallel_world_size()
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        dp_rank = parallel_state.get_data_parallel_rank()
        groups = {"tensor": parallel_state.get_tensor_model_parallel_ranks(),
                  "data": parallel_state.get_data_parallel_ranks(),
                  "pipeline": parallel_state.get_pipeline_model_parallel_ranks(),
                  "model": [t + tp * (dp_rank + dp * p) for p in range(pp) for t in range(tp)],
                  "world": list(range(dist.get_world_size()))}
        if parallel_state.is_rank_in_embedding_group():
            groups["embedding"] = parallel_state.get_embedding_ranks()
        return {name: tuple(ranks) for name, ranks in groups.items()}


@contextlib.contextmanager
def simulated_training(job: JobConfig, rank: int, world_size: int
                       ) -> Iterator[SimulatedTraining]:
    """Rank `rank` of `job`'s layout over `world_size` ranks on the `fake` process
    group, its model and optimizer built by `setup_model_and_optimizer` on
    `meta` (`parallel_state`'s default device while it is open), with the
    code paths of `_meta_code_paths`."""
    with _meta_code_paths(), fake_world(rank, world_size), _model_parallel(job):
        model, optimizer, _ = setup_model_and_optimizer(job)
        yield SimulatedTraining(job, model, optimizer)


@contextlib.contextmanager
def simulated_rank(job: JobConfig, rank: int, world_size: int) -> Iterator[SimulatedRank]:
    """Rank `rank` of `job`'s layout over `world_size` ranks, model and param/grad buffer built on `meta`
    (the buffer's layout, buckets and hooks are the training job's), with
    the code paths of `_meta_code_paths` while it is open."""
    parallel = job.parallel
    with _meta_code_paths(), fake_world(rank, world_size), _model_parallel(job):
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
    device: str  # of its input tensors: "meta" in a simulation, "cpu" for a host tensor


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
    return Collective(func._opname, group or (), sum(t.numel() * t.element_size() for t in tensors),
                      tensors[0].device.type if tensors else "none")


# ----- the per-step collective census --------------------------------------------------------

SEVENTY_B_1K_ARGV = with_flags(SEVENTY_B_ARGV, pipeline_model_parallel_size="4",
                               world_size="1024", global_batch_size="128")
"""The 70B-class model of SEVENTY_B_ARGV at TP 8 x PP 4 x DP 32 (1,024 ranks),
a global batch of 128 sequences: 4 micro-batches per step and DP rank, as
many as stages, so that 1F1B reaches its steady state (a step's traffic per
micro-batch does not depend on how many there are)."""


def ring_sent_bytes(call: Collective) -> float:
    """Bytes this rank sends for `call` under the ring algorithms
    `megatron_sr.estimate` assumes, from the message bytes the census records
    (g ranks in the group): all-reduce of N sends 2(g-1)/g N; reduce-scatter of
    a whole N, (g-1)/g N; all-gather of a shard n, (g-1) n; send N; recv 0.
    Raises ValueError for an operator without a formula here."""
    g, n = len(call.group), call.nbytes
    op = call.op.strip("_")
    if op.startswith("allreduce"):
        return 2 * (g - 1) / g * n
    if op.startswith("reduce_scatter"):
        return (g - 1) / g * n
    if op.startswith("allgather"):
        return (g - 1) * n
    if op == "send":
        return float(n)
    if op == "recv":
        return 0.0
    raise ValueError(f"collective census: no ring formula for c10d operator {call.op!r} "
                     f"(group of {g} ranks, {n} bytes): add one to ring_sent_bytes")


@dataclass(frozen=True)
class CensusRow:
    group: str  # "tensor", "data", "pipeline", "embedding", "model", "world", else "ranks [...]"
    size: int  # ranks in the group
    op: str  # c10d operator
    count: int
    nbytes: int  # message bytes, as `Collective.nbytes`
    sent: float  # ring_sent_bytes summed


def census_rows(calls: list[Collective], groups: dict[str, tuple[int, ...]]) -> list[CensusRow]:
    """`calls` counted by (group, operator), groups named by `groups`
    (`SimulatedTraining.groups()`; a group none of them names is called by
    its ranks), in the order of `groups`, then of first issue."""
    names = {ranks: name for name, ranks in groups.items()}
    totals: dict[tuple[str, int, str], list] = {}
    for call in calls:
        name = names.get(call.group, f"ranks {list(call.group)}")
        row = totals.setdefault((name, len(call.group), call.op), [0, 0, 0.0])
        row[0] += 1
        row[1] += call.nbytes
        row[2] += ring_sent_bytes(call)
    order = {name: index for index, name in enumerate(groups)}
    keys = sorted(totals, key=lambda key: order.get(key[0], len(order)))
    return [CensusRow(name, size, op, *totals[(name, size, op)]) for name, size, op in keys]


def sent_by_group(rows: list[CensusRow]) -> dict[str, float]:
    """Ring bytes sent per group name."""
    sent: dict[str, float] = {}
    for row in rows:
        sent[row.group] = sent.get(row.group, 0.0) + row.sent
    return sent


def estimated_sent(stage: StageEstimate) -> dict[str, float]:
    """`megatron_sr.estimate`'s bytes sent per step by a rank of `stage`, by
    census group: "data" (reduce-scatter and all-gather,
    or all-reduce), "tensor", and "pipeline" with "embedding" (the estimate's
    pipeline figure holds the tied embedding's all-reduce)."""
    return {"data": (stage.sent_grad_reduce_scatter + stage.sent_param_all_gather
                     + stage.sent_grad_all_reduce),
            "tensor": stage.sent_tensor_parallel,
            "pipeline": stage.sent_pipeline}


@dataclass
class StepCensus:
    """The collectives of one rank's steps (`census_step`)."""

    rank: int
    pipeline_rank: int
    groups: dict[str, tuple[int, ...]]
    step: list[Collective]  # a step between log lines
    log_step: list[Collective]  # a step that writes the log line

    def rows(self, log_step: bool = False) -> list[CensusRow]:
        return census_rows(self.log_step if log_step else self.step, self.groups)


def census_step(job: JobConfig, rank: int) -> StepCensus:
    """Rank `rank` of `job` (all its world, on the `fake` process group): the
    collectives of a step between log lines, then of a log step, as
    `SimulatedTraining.step` runs them."""
    with simulated_training(job, rank, job.world_size) as training:
        with CollectiveCensus() as step:
            training.step()
        with CollectiveCensus() as log_step:
            training.step(log_step=True)
        return StepCensus(rank, parallel_state.get_pipeline_model_parallel_rank(),
                          training.groups(), step.calls, log_step.calls)


def stage_rank(job: JobConfig, pipeline_rank: int, tp_rank: int = 5, dp_rank: int = 3) -> int:
    """The global rank of (TP rank, DP rank, pipeline stage) (`parallel_state`'s layout)."""
    tp = job.parallel.tensor_model_parallel_size
    return tp_rank + tp * (dp_rank + job.data_parallel_size * pipeline_rank)


def _mib(nbytes: float) -> str:
    """MiB with two decimals; bytes below 10 KiB."""
    return f"{nbytes:.0f} B" if nbytes < 10 * 2 ** 10 else f"{nbytes / 2 ** 20:,.2f}"


def format_census(censuses: list[StepCensus], estimate: JobEstimate) -> str:
    """The census of one rank per stage as a Markdown table (docs/SCALING.md):
    per stage, group and operator the collectives of a step between log
    lines, their message and ring-sent MiB, and per group the estimate's
    sent MiB; then what a log step adds."""
    lines = ["| stage | group (ranks) | operator | count | message MiB | sent MiB | "
             "estimate sent MiB |", "|---|---|---|---|---|---|---|"]
    for census in censuses:
        estimated = estimated_sent(estimate.stages[census.pipeline_rank])
        shown = set()
        for row in census.rows():
            figure = ""
            if row.group in estimated and row.group not in shown:
                figure = _mib(estimated[row.group])
                shown.add(row.group)
            lines.append(f"| {census.pipeline_rank} | {row.group} ({row.size}) | `{row.op}` | "
                         f"{row.count} | {_mib(row.nbytes)} | {_mib(row.sent)} | {figure} |")
    lines += ["", "What a log step adds, in message bytes:", "",
              "| stage | group (ranks) | operator | count | message bytes |", "|---|---|---|---|---|"]
    for census in censuses:
        plain = {(r.group, r.op): r for r in census.rows()}
        for row in census.rows(log_step=True):
            before = plain.get((row.group, row.op))
            count = row.count - (before.count if before else 0)
            if count:
                nbytes = row.nbytes - (before.nbytes if before else 0)
                lines.append(f"| {census.pipeline_rank} | {row.group} ({row.size}) | "
                             f"`{row.op}` | {count} | {nbytes} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--census", action="store_true", required=True,
                        help="Print the per-step collective census of one rank per pipeline "
                             "stage of SEVENTY_B_1K_ARGV (TP rank 5, DP rank 3) as Markdown.")
    parser.parse_args(argv)
    job = job_config(SEVENTY_B_1K_ARGV)
    censuses = [census_step(job, stage_rank(job, stage))
                for stage in range(job.parallel.pipeline_model_parallel_size)]
    print(format_census(censuses, estimate_job(job)))


if __name__ == "__main__":
    main()
