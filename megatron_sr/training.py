"""The training job: set-up, the train/eval loop, logging, exits.

`pretrain(train_valid_test_datasets_provider, model_provider, forward_step_func)`
is what `pretrain_gpt.py` runs on every rank under torchrun, in Megatron-LM's
shape: the three providers say what is trained (the model chunk, the loss, the
data) and `pretrain` does the rest (see `pretrain` for their contracts; None
takes the library's GPT default, which `pretrain_gpt.py` spells out):

    initialize_distributed   backend and device (CUDA+NCCL, else CPU+Gloo), process groups, seeds
    build_tokenizer          the vocabulary pads the model's embedding
    setup_model_and_optimizer  model chunks, param/grad buffers, distributed optimizer, LR schedule,
                             then --load
    build_data_iterators     train/valid samples for this data-parallel rank, from consumed samples
    train                    the loop: forward-backward over micro-batches (the pipeline schedule),
                             DP and model-parallel grad syncs, the optimizer step; logging, evaluation,
                             checkpoints, exits (--exit-interval, --exit-duration-in-mins, SIGTERM)

Batches: global batch = micro-batch x data-parallel size x micro-batches per
step. Step i of a run consumes samples [c, c + global batch) of the train
stream, c = consumed samples; micro-batch j of data-parallel rank r is the
slice [c + (j x dp + r) x micro, + micro), as Megatron's pretraining sampler
cuts it, so a resumed run sees exactly the samples a continuous run would.

Logging is done by the last rank (it holds the loss): Megatron's line format
on stdout and the same values as TensorBoard (and wandb) scalars; see
`megatron_sr.training_log`.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import math
import os
import signal
import socket
import sys
import time
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_sr import checkpointing, fault_injection, parallel_state
from megatron_sr.config import JobConfig, parse_args
from megatron_sr.config import TrainingConfig, global_batch_size_at
from megatron_sr.cpu_bf16 import cpu_bf16_summary
from megatron_sr.data.document_masks import document_inputs
from megatron_sr.data.gpt_dataset import build_gpt_datasets
from megatron_sr.data.micro_batches import micro_batch_loader
from megatron_sr.data.tokenizers import build_tokenizer
from megatron_sr.launch_environment import (cuda_device_index, flight_recorder_dir,
                                            nccl_error_handling)
from megatron_sr.model import build_model, flops_per_token, param_is_unique_in_model
from megatron_sr.optimizer.distributed_optimizer import DistributedOptimizer
from megatron_sr.optimizer.lr_schedules import LRScheduler, learning_rate_at
from megatron_sr.optimizer.param_buffer import ParamAndGradBuffer, ParamInfo
from megatron_sr.pipeline_parallel import get_forward_backward_func
from megatron_sr.precision.strategies import PrecisionStrategy, get_strategy, with_grad_buffer
from megatron_sr.random import model_parallel_seed
from megatron_sr.replica_check import ReplicaMismatch, check_replicas
from megatron_sr.tensor_parallel.grad_accumulation_fusion import fusion_notice
from megatron_sr.training_log import (MetricsWriter, PhaseTimers, StepProfiler, format_log_line,
                                      open_metrics_writer)

_GRAD_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many consecutive skipped steps)."""


class CommunicationError(RuntimeError):
    """A collective or point-to-point transfer timed out (a rank stalled past
    --distributed-timeout-minutes) or failed (a peer died); the message names
    the phase and the collective."""


def write_whole_lines() -> None:
    """Makes this process's stdout and stderr write each line in one write call,
    newline included. Ranks share their launcher's stdout; unbuffered (as
    PYTHONUNBUFFERED=1 makes it, common under Slurm and in containers) `print`
    writes a line and its newline separately, and another rank's line can land
    in between, mangling both. Streams without `reconfigure` are left alone."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True, write_through=False)


def print_rank_0(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def is_last_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1


def print_rank_last(message: str) -> None:
    if is_last_rank():
        print(message, flush=True)


# ----- set-up ------------------------------------------------------------------------------

def initialize_distributed(job: JobConfig) -> torch.device:
    """Joins the process group torchrun describes (or a 1-rank one), builds the
    model-parallel groups and seeds every stream. Returns the device. On NCCL:
    the GPU is LOCAL_RANK modulo the visible devices, and torch's NCCL error
    handling and flight recorder are switched on where the environment leaves
    them unset (`launch_environment`)."""
    parallel = job.parallel
    backend = parallel.distributed_backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(cuda_device_index(os.environ, torch.cuda.device_count()))
        nccl_error_handling(os.environ, parallel.distributed_timeout_minutes,
                            flight_recorder_dir(job.training.save, job.training.tensorboard_dir))
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=parallel.distributed_timeout_minutes)
        if "RANK" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:  # a plain `python pretrain_gpt.py`: one rank
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1, timeout=timeout)
    if dist.get_world_size() != job.world_size:
        raise ValueError(f"the job was configured for {job.world_size} ranks but "
                         f"{dist.get_world_size()} joined")
    parallel_state.initialize_model_parallel(
        parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
        parallel.virtual_pipeline_model_parallel_size,
        timeout=datetime.timedelta(minutes=parallel.distributed_timeout_minutes))
    model_parallel_seed(job.training.seed)
    return parallel_state.get_default_device()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def param_infos(params: Sequence[torch.nn.Parameter]) -> list[ParamInfo]:
    """What the optimizer needs of each parameter, read off the model's attributes:
    global name, TP sharding, weight decay (not for biases and norms, i.e.
    1-D tensors), counting in the grad norm, model-parallel grad sums."""
    return [ParamInfo(name=p.global_name,
                      sr_tp_rank=(parallel_state.get_tensor_model_parallel_rank()
                                  if p.tensor_model_parallel else None),
                      weight_decay=p.dim() > 1,
                      count_in_grad_norm=param_is_unique_in_model(p),
                      sequence_parallel_grad=bool(getattr(p, "sequence_parallel", False)),
                      tied_embedding=bool(getattr(p, "shared_embedding", False)))
            for p in params]


def grad_dtype(job: JobConfig, strategy: PrecisionStrategy) -> torch.dtype:
    """The grad buffer's dtype: --grad-reduce-dtype, else the strategy's."""
    if job.optimizer.grad_reduce_dtype is None:
        return strategy.grad_dtype
    return _GRAD_DTYPES[job.optimizer.grad_reduce_dtype]


def setup_model_and_optimizer(job: JobConfig, bucket_size: Optional[int] = None,
                              model_provider: Optional[Callable] = None):
    """(model chunks, optimizer, LR scheduler), with the param/grad buffers built.

    Every rank calls it after `initialize_distributed`, with `job` carrying the
    padded vocabulary size. `model_provider`: see `pretrain` (None: GPTModel)."""
    strategy = get_strategy(job.optimizer.precision, job.optimizer.optimizer_state_dtype)
    # --grad-reduce-dtype overrides the strategy's gradient dtype for the grad
    # buffer, the DP reduction and the AdamW step alike.
    strategy = with_grad_buffer(strategy, job.optimizer.grad_reduce_dtype,
                                job.optimizer.grad_accumulation_rounding)
    model = build_model(job.model, job.parallel, seed=job.training.seed,
                        model_provider=(None if model_provider is None
                                        else functools.partial(model_provider, job=job)))
    params = [p for chunk in model for p in chunk.parameters()]
    extra = {} if bucket_size is None else {"bucket_size": bucket_size}
    buffer = ParamAndGradBuffer(
        params, param_infos(params), strategy.param_dtype, strategy.grad_dtype,
        parallel_state.get_data_parallel_group(),
        distributed=job.parallel.use_distributed_optimizer,
        overlap_grad_reduce=job.parallel.overlap_grad_reduce,
        overlap_param_gather=job.parallel.overlap_param_gather,
        tensor_parallel_group=parallel_state.get_tensor_model_parallel_group(),
        embedding_group=(parallel_state.get_embedding_group()
                         if parallel_state.is_rank_in_embedding_group() else None),
        grad_rounding=strategy.grad_rounding, seed=job.training.seed, **extra)
    buffer.wait_before_forward(model)
    optimizer = DistributedOptimizer(buffer, strategy, job.optimizer, seed=job.training.seed)
    scheduler = LRScheduler(job.optimizer, job.training.train_iters)
    return model, optimizer, scheduler


def memory_report(optimizer: DistributedOptimizer) -> dict[str, int]:
    """This rank's training-state bytes: params, grads, master, optimizer, total."""
    sizes = optimizer.memory_bytes()
    sizes["total"] = sum(sizes.values())
    return sizes


def _format_memory_report(job: JobConfig, reports: list[dict[str, int]]) -> str:
    strategy = job.optimizer.precision
    worst = max(reports, key=lambda r: r["total"])
    mib = 1 << 20
    fields = " | ".join(f"{k}: {worst[k] / mib:.2f} MiB" for k in
                        ("params", "grads", "master", "optimizer", "total"))
    return (f"[memory] training state per rank (max over {len(reports)} ranks), "
            f"--precision {strategy}: {fields}")


# ----- data -------------------------------------------------------------------------------

def gpt_datasets_provider(train_val_test_num_samples: Sequence[int], *, job: JobConfig,
                          tokenizer) -> tuple:
    """The default train_valid_test_datasets_provider: Megatron GPT datasets of
    --data-path (or --mock-data), see `megatron_sr.data.gpt_dataset`."""
    return build_gpt_datasets(job.data, tokenizer, train_val_test_num_samples, job.training.seed)


def train_valid_test_num_samples(job: JobConfig) -> tuple[int, int, int]:
    """Samples the train and valid splits must provide for the whole run
    (Megatron's counts); the loop never reads the test split, so it asks none."""
    training = job.training
    global_batch = training.global_batch_size
    train = training.train_iters * global_batch
    evaluations = training.train_iters // training.eval_interval + 1
    valid = evaluations * training.eval_iters * global_batch
    return train, valid, 0


class DataStreams:
    """Per-chunk micro-batch iterators for training and validation.

    Chunks that take tokens (first stage) or labels (last stage) each get their
    own iterator over the same stream (`micro_batch_loader`: --num-workers
    reader processes, pinned memory on CUDA; wrapped in a `MicroBatchStream`
    carrying the run's `DocumentSettings`); other chunks get None, unless
    document positions or masks are reset (--reset-position-ids,
    --reset-attention-mask), which every chunk needs. The datasets come from
    `datasets_provider` (see `pretrain`; None: `gpt_datasets_provider`)."""

    def __init__(self, job: JobConfig, tokenizer, model: Sequence[torch.nn.Module],
                 datasets_provider: Optional[Callable] = None):
        self.job = job
        self.model = model
        datasets_provider = datasets_provider or gpt_datasets_provider
        self.train, self.valid, _ = datasets_provider(train_valid_test_num_samples(job),
                                                      job=job, tokenizer=tokenizer)
        data = job.data
        self.documents = DocumentSettings(tokenizer.eod, data.eod_mask_loss,
                                          data.reset_position_ids, data.reset_attention_mask)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()

    def _iterators(self, dataset, consumed: int):
        if dataset is None:
            return [None] * len(self.model)
        return [MicroBatchStream(
                    micro_batch_loader(dataset, consumed, self.job.training.micro_batch_size,
                                       self.dp_rank, self.dp_size,
                                       num_workers=self.job.data.num_workers,
                                       pin_memory=parallel_state.get_default_device().type
                                       == "cuda"), self.documents)
                if chunk.pre_process or chunk.post_process or self.documents.every_chunk
                else None for chunk in self.model]

    def train_iterators(self, consumed_samples: int):
        return self._iterators(self.train, consumed_samples)

    def valid_iterators(self, consumed_samples: int = 0):
        return self._iterators(self.valid, consumed_samples)


# ----- one step ---------------------------------------------------------------------------

class _NaNGradient(torch.autograd.Function):
    """Identity in the forward; NaN gradient in the backward (fault injection)."""

    @staticmethod
    def forward(ctx, loss):
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


@dataclasses.dataclass(frozen=True)
class DocumentSettings:
    """The run's document-aware flags and the tokenizer's eod id."""

    eod: int
    eod_mask_loss: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False

    @property
    def every_chunk(self) -> bool:
        """Positions and attention masks of documents matter to every chunk."""
        return self.reset_position_ids or self.reset_attention_mask


class MicroBatchStream:
    """An iterator over micro-batch rows that carries the run's
    `DocumentSettings` (`documents`), which `get_batch` reads; `DataStreams`
    makes them. A plain iterator stands for a stream without document flags."""

    def __init__(self, batches: Iterator[torch.Tensor], documents: Optional[DocumentSettings]):
        self.batches, self.documents = batches, documents

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        return next(self.batches)


def get_batch(data_iterator, model) -> tuple:
    """(tokens, labels, loss_mask, attention_mask, position_ids) of the next
    micro-batch for the chunk `model`, on this rank's device, in Megatron's
    order: tokens and labels int64 [b, s] (the stream's rows [b, s + 1]
    shifted by one); loss_mask fp32 [b, s] of the tokens that count, None when
    all do (--eod-mask-loss); attention_mask a `DocumentMask` (Megatron's
    [b, 1, s, s] mask as document ids [b, s]), None for causal
    (--reset-attention-mask); position_ids [b, s],
    None for 0..s-1 (--reset-position-ids); see `megatron_sr.data.document_masks`.
    A chunk without an iterator (neither embedding nor loss, and no document
    flags) draws nothing and gets five Nones."""
    documents = getattr(data_iterator, "documents", None)
    every_chunk = documents is not None and documents.every_chunk
    if data_iterator is None or not (model.pre_process or model.post_process or every_chunk):
        return None, None, None, None, None
    batch = next(data_iterator).to(parallel_state.get_default_device(), non_blocking=True)
    tokens, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    if documents is None or not (documents.eod_mask_loss or every_chunk):
        return tokens, labels, None, None, None
    inputs = document_inputs(tokens, documents.eod, eod_mask_loss=documents.eod_mask_loss,
                             reset_position_ids=documents.reset_position_ids,
                             reset_attention_mask=documents.reset_attention_mask)
    return tokens, labels, inputs.loss_mask, inputs.attention_mask, inputs.position_ids


def gpt_loss_func(loss_mask: Optional[torch.Tensor], output_tensor: torch.Tensor) -> torch.Tensor:
    """The micro-batch's mean loss (fp32 scalar) over the tokens `loss_mask` keeps
    (all of them when None), from the per-token losses [b, s] of the last stage."""
    losses = output_tensor.float()
    if loss_mask is None:
        return losses.mean()
    return torch.sum(losses * loss_mask) / loss_mask.sum().clamp(min=1.0)


def gpt_forward_step(data_iterator, model):
    """The default forward_step_func (see `pretrain`): next micro-batch ->
    chunk forward -> (per-token losses on the last stage, else hidden states;
    the loss function of this micro-batch)."""
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator, model)
    output_tensor = model(tokens, position_ids, labels=labels if model.post_process else None,
                          attention_mask=attention_mask)
    return output_tensor, functools.partial(gpt_loss_func, loss_mask)


def _scalar_loss(loss_func, nan_gradients: bool, output_tensor):
    loss = loss_func(output_tensor)
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
        shape = f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""
        raise TypeError(
            f"the loss function returned by forward_step must return the micro-batch's loss "
            f"as a scalar tensor, got a {type(loss).__name__}{shape}; a Megatron-style "
            f"(loss, num_tokens, {{'lm loss': ...}}) tuple is not supported: return the mean "
            f"loss, which is also what the log line reports")
    return _NaNGradient.apply(loss) if nan_gradients else loss


class ForwardStep:
    """The schedule's forward_step_func built by `make_forward_step`.

    --calculate-per-token-loss (`per_token_loss`) with --eod-mask-loss:
    micro-batches hold different numbers of loss tokens, so the step's loss
    is the sum of the token losses over all micro-batches and data-parallel
    ranks divided by their count, not a mean of means. `prepare_step`
    (train_step calls it before the schedule) reads the step's micro-batches
    of the loss chunks ahead, counts each one's loss tokens n_j and
    all-reduces their sum N over the DP group (last-stage ranks; one small
    all-reduce, no host sync); the loss function's micro-batch mean is then
    scaled by n_j x M x DP / N, which the schedule's 1/M and the DP mean turn
    into exactly the per-token average. Without `prepare_step` (evaluation)
    the loss is the micro-batch's mean.
    """

    def __init__(self, strategy: PrecisionStrategy, device: torch.device, nan_gradients: bool,
                 forward_step_func: Callable, per_token_loss: bool):
        self.device, self.nan_gradients = device, nan_gradients
        self.forward_step_func, self.per_token_loss = forward_step_func, per_token_loss
        self.autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16)
                         if strategy.autocast else nullcontext())
        self.token_scales: list[torch.Tensor] = []  # per prefetched micro-batch, in order

    def prepare_step(self, iterators: list, model, num_microbatches: int) -> list:
        """The iterators for this step's schedule (see the class docstring)."""
        self.token_scales = []
        if not self.per_token_loss:
            return iterators
        iterators, counts = list(iterators), []
        for i, chunk in enumerate(model):
            documents = getattr(iterators[i], "documents", None)
            if chunk.post_process and documents is not None and documents.eod_mask_loss:
                batches = [next(iterators[i]) for _ in range(num_microbatches)]
                counts += [(b[:, :-1] != documents.eod).sum() for b in batches]
                iterators[i] = MicroBatchStream(iter(batches), documents)
        if counts:
            local = torch.stack(counts).to(torch.float32)  # on the host, as the batches are
            if self.device.type == "cuda":  # a pageable copy would wait for the stream
                local = local.pin_memory().to(self.device, non_blocking=True)
            total = local.sum()
            dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
            dp = parallel_state.get_data_parallel_world_size()
            self.token_scales = list(local * (num_microbatches * dp) / total.clamp(min=1.0))
        return iterators

    def _loss(self, loss_func, output_tensor):
        loss = _scalar_loss(loss_func, False, output_tensor)
        if self.token_scales:
            loss = loss * self.token_scales.pop(0)
        return _NaNGradient.apply(loss) if self.nan_gradients else loss

    def __call__(self, data_iterator, chunk):
        with self.autocast:
            output, loss_func = self.forward_step_func(data_iterator, chunk)
        return output, functools.partial(self._loss, loss_func)


def make_forward_step(strategy: PrecisionStrategy, device: torch.device,
                      nan_gradients: bool = False, forward_step_func: Optional[Callable] = None,
                      per_token_loss: bool = False) -> ForwardStep:
    """The schedule's forward_step_func: `forward_step_func` (see `pretrain`;
    None: `gpt_forward_step`) under torch.autocast for amp, its loss function
    checked to return a scalar. `nan_gradients` (fault injection): the loss keeps
    its value but its backward yields NaN gradients for every parameter.
    `per_token_loss` (--calculate-per-token-loss): see `ForwardStep`."""
    return ForwardStep(strategy, device, nan_gradients, forward_step_func or gpt_forward_step,
                       per_token_loss)


@dataclasses.dataclass
class StepReport:
    loss: Optional[float]  # mean over micro-batches and DP ranks; last stage only
    grad_norm: float
    skipped: bool
    update_absorption: Optional[float]
    exit_flags: tuple[bool, ...] = ()  # train_step's `exit_flags`, OR-ed over all ranks


class LossAccumulator:
    """The training losses of the steps since the last log line, kept on the
    device so that no step waits for a loss. Last stage only: elsewhere nothing
    is added and the means are None.

    - `add(local_mean)`: an applied step's mean over its micro-batches on this
      rank (an fp32 device scalar).
    - `start_reduction(step_loss)`: on a step whose loss is read (a log step),
      before its optimizer step: one async all-reduce over the DP group of
      [sum of the losses added so far, this step's loss]. Queued ahead of the
      step's parameter all-gathers (NCCL runs a communicator's collectives in
      order), so reading it never waits for them and the next forward still
      overlaps them.
    - `finish_reduction(applied)`: after the optimizer step (and after `add`
      of an applied step): waits, reads both (one host sync), returns this
      step's DP-mean loss and keeps the interval's mean for the log line.
    - `mean_over_data_parallel()`: at the log line: the mean over the
      interval's applied steps and the DP ranks, from that reduction when it
      covers every added loss, else by one all-reduce and host sync here;
      None when no step was added. Starts the next interval.
    """

    def __init__(self):
        self.values: list[torch.Tensor] = []
        self._pending: Optional[tuple] = None  # (work, [sum, step loss], losses covered)
        self._reduced: Optional[tuple[float, int]] = None  # (interval mean, losses covered)

    def add(self, local_mean: torch.Tensor) -> None:
        self.values.append(local_mean)

    def start_reduction(self, step_loss: torch.Tensor) -> None:
        added = torch.stack(self.values).sum() if self.values else torch.zeros_like(step_loss)
        sums = torch.stack([added, step_loss.float()])
        work = dist.all_reduce(sums, group=parallel_state.get_data_parallel_group(),
                               async_op=True)
        self._pending = (work, sums, len(self.values))

    def finish_reduction(self, applied: bool) -> float:
        (work, sums, covered), self._pending = self._pending, None
        work.wait()
        interval_sum, step_loss = (sums / parallel_state.get_data_parallel_world_size()).tolist()
        if applied:
            interval_sum, covered = interval_sum + step_loss, covered + 1
        self._reduced = (interval_sum / covered, covered) if covered else None
        return step_loss

    def mean_over_data_parallel(self) -> Optional[float]:
        values, self.values = self.values, []
        reduced, self._reduced = self._reduced, None
        if not values:
            return None
        if reduced is not None and reduced[1] == len(values):
            return reduced[0]
        return _average_over_dp(values, values[0].device)


def _local_mean(values: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """This rank's mean micro-batch loss, an fp32 device scalar (None without losses)."""
    return torch.stack([v.float() for v in values]).mean() if values else None


def _average_over_dp(values: list[torch.Tensor], device) -> Optional[float]:
    """Mean of this rank's micro-batch losses, averaged over the DP group;
    None on ranks without the last stage (which pass an empty list)."""
    if not values:
        return None
    local = torch.stack([v.float() for v in values]).mean().to(device)
    dist.all_reduce(local, group=parallel_state.get_data_parallel_group())
    return local.item() / parallel_state.get_data_parallel_world_size()


# Innermost function on the failing stack -> the collective it runs: refines
# a phase that spans several collectives (the optimizer step, a checkpoint save).
_COLLECTIVE_OF_FUNCTION = {
    "communicate": "pipeline p2p send/recv",
    "_sum_model_parallel_grads": "model-parallel grad all-reduce",
    "_launch_grad_reduce": "data-parallel grad reduce-scatter",
    "finish_grad_sync": "data-parallel grad reduce-scatter",
    "_grad_norm": "grad-norm all-reduce",
    "gather_params": "parameter all-gather",
    "wait_param_gather": "parameter all-gather",
    "_full_bucket": "optimizer-state all-gather",
    "_all_gather_objects": "all-gather of the ranks' write results",
    "save_training_checkpoint": "all-gather of the RNG states",
    "_average_over_dp": "loss all-reduce",
    "start_reduction": "loss all-reduce",
    "finish_reduction": "loss all-reduce",
    "_all_gather_hashes": "weight-hash all-gather",
}
# Gloo's messages do not always name Gloo: a stalled peer's recv timeout can
# surface as "Application timeout caused pair closure".
_COMMUNICATION_FAILURE_MARKERS = ("gloo", "nccl", "timed out", "timeout", "connection closed",
                                  "connection reset", "broken pipe", "pair closure")


def _is_communication_failure(exc: BaseException) -> bool:
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in _COMMUNICATION_FAILURE_MARKERS)


@contextmanager
def communication_phase(job: JobConfig, phase: str, iteration: Optional[int] = None):
    """Re-raises a communication failure inside the block as CommunicationError
    naming `phase`, the collective (from the failing stack) and the iteration,
    so a stalled or dead rank ends the job with a message, not a hang or a
    backend trace. Other exceptions pass through unchanged."""
    try:
        yield
    except (CommunicationError, checkpointing.CheckpointError, TrainingStopped, ReplicaMismatch):
        raise
    except Exception as exc:
        if not _is_communication_failure(exc):
            raise
        collective = None
        frame = exc.__traceback__
        while frame is not None:
            collective = _COLLECTIVE_OF_FUNCTION.get(frame.tb_frame.f_code.co_name, collective)
            frame = frame.tb_next
        timeout = job.parallel.distributed_timeout_minutes
        timed_out = "timed out" in str(exc).lower() or "timeout" in str(exc).lower()
        cause = (f"timed out after --distributed-timeout-minutes {timeout:g}: a rank stalled"
                 if timed_out else "failed: a peer rank died or closed its connection")
        where = f"{phase} ({collective})" if collective else phase
        at_iteration = f" at iteration {iteration}" if iteration is not None else ""
        rank = dist.get_rank() if dist.is_initialized() else 0
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise CommunicationError(f"rank {rank}: {where}{at_iteration} {cause} "
                                 f"[{detail}]") from exc


def train_step(job: JobConfig, model, optimizer: DistributedOptimizer, iterators, lr: float,
               forward_step, measure_update_absorption: bool = False,
               iteration: Optional[int] = None,
               loss_accumulator: Optional[LossAccumulator] = None,
               reduce_loss: Optional[bool] = None,
               decoupled_lr: Optional[float] = None,
               timers: Optional[PhaseTimers] = None,
               num_microbatches: Optional[int] = None,
               exit_flags: Optional[Callable[[], Sequence[bool]]] = None) -> StepReport:
    """One optimizer step on every rank: forward-backward over the step's
    micro-batches (each bucket's DP reduction starts from the backward hooks
    with --overlap-grad-reduce), then the optimizer: the DP reduction's end,
    the model-parallel grad sums on the shard, AdamW.
    `iteration` (1-based, as logged) names the step in errors.
    Loss: an applied step adds this rank's micro-batch mean to
    `loss_accumulator` (on the device) when one is given. `reduce_loss`
    (default: when no accumulator is given; the loop passes its log steps)
    also averages it over DP into `StepReport.loss`: one all-reduce, issued
    before the optimizer step together with the accumulator's interval sum
    (`LossAccumulator.start_reduction`), and one host sync after it. A skipped
    step always reports its loss, so that a NaN loss is seen (all DP ranks
    skip together).
    `decoupled_lr` (--decoupled-lr) is the embedding and output layer's
    learning rate; `timers` (--log-timers-to-tensorboard) time the phases;
    `num_microbatches` per data-parallel rank (default the job's;
    --rampup-batch-size and --step-batch-size-schedule vary it).
    `exit_flags`: called on this rank after the forward-backward, its
    booleans ride in the optimizer's grad-norm all-reduce and come back OR-ed
    over all ranks in `StepReport.exit_flags` (no collective of their own)."""
    timers = timers or PhaseTimers(False, torch.device("cpu"))
    num_microbatches = num_microbatches or job.num_microbatches
    device = optimizer.buffer.param_buffer.device
    optimizer.buffer.zero_grad()
    optimizer.buffer.prepare_grad_sync(num_microbatches)
    for chunk in model:
        chunk.train()
    forward_backward = get_forward_backward_func()
    if isinstance(forward_step, ForwardStep):
        with communication_phase(job, "loss-token count all-reduce", iteration):
            iterators = forward_step.prepare_step(iterators, model, num_microbatches)
    with communication_phase(job, "forward-backward (pipeline p2p, tensor-parallel collectives)",
                             iteration), timers.phase("forward-backward"):
        losses = forward_backward(forward_step_func=forward_step, data_iterator=iterators,
                                  model=model, num_microbatches=num_microbatches,
                                  seq_length=job.model.seq_length,
                                  micro_batch_size=job.training.micro_batch_size)
    fault_injection.at("train-step", iteration)
    local_loss = _local_mean(losses)
    read_loss = (loss_accumulator is None if reduce_loss is None else reduce_loss) \
        and local_loss is not None
    accumulator = loss_accumulator if loss_accumulator is not None else LossAccumulator()
    if read_loss:
        with communication_phase(job, "loss averaging", iteration):
            accumulator.start_reduction(local_loss)
    with communication_phase(job, "optimizer step", iteration), timers.phase("optimizer"):
        result = optimizer.step(lr, measure_update_absorption=measure_update_absorption,
                                decoupled_lr=decoupled_lr,
                                host_flags=exit_flags() if exit_flags is not None else ())
    if loss_accumulator is not None and local_loss is not None and not result.skipped:
        loss_accumulator.add(local_loss)
    loss = None
    with communication_phase(job, "loss averaging", iteration):
        if read_loss:
            loss = accumulator.finish_reduction(applied=not result.skipped)
        elif result.skipped:
            loss = _average_over_dp(losses, device)
    return StepReport(loss=loss, grad_norm=result.grad_norm,
                      skipped=result.skipped, update_absorption=result.update_absorption,
                      exit_flags=result.host_flags)


@torch.no_grad()
def evaluate(job: JobConfig, model, iterators, forward_step) -> Optional[float]:
    """Mean validation loss over --eval-iters steps (last stage; None elsewhere)."""
    device = parallel_state.get_default_device()
    for chunk in model:
        chunk.eval()
    forward_backward = get_forward_backward_func()
    losses = []
    for _ in range(job.training.eval_iters):
        losses += forward_backward(forward_step_func=forward_step, data_iterator=iterators,
                                   model=model, num_microbatches=job.num_microbatches,
                                   seq_length=job.model.seq_length,
                                   micro_batch_size=job.training.micro_batch_size,
                                   forward_only=True)
    for chunk in model:
        chunk.train()
    return _average_over_dp(losses, device)


# ----- the loop ---------------------------------------------------------------------------

class _SigtermFlag:
    """Set by SIGTERM or --exit-signal (`received` names it); the loop checks it
    (OR-ed over all ranks in the step's grad-norm all-reduce, `exit_conditions`)
    after each step."""

    def __init__(self, exit_signal: str = "SIGTERM"):
        self.received: Optional[str] = None
        self._previous = {number: signal.signal(number, self._handle) for number in
                          {signal.SIGTERM, signal.Signals[exit_signal]}}

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def restore(self):
        for number, previous in self._previous.items():
            signal.signal(number, previous)


def _open_metrics(job: JobConfig) -> MetricsWriter:
    """TensorBoard / wandb writer on the last rank (inactive elsewhere)."""
    return open_metrics_writer(job.training, is_last_rank(),
                               run_config=checkpointing.job_description(job))


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak memory so far: torch.cuda.max_memory_allocated on
    CUDA, else the peak resident set size (ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def write_run_summary(writer, job: JobConfig, optimizer: DistributedOptimizer) -> None:
    """TensorBoard records of what this run is, written once at start by the
    logging rank: text "run/config" (precision, LR schedule, sizes, layout) and
    scalars "memory/<kind>-bytes" of this rank's training state (memory_report),
    so that tools/compare_runs.py can label and tabulate runs from the event files."""
    opt, model, training = job.optimizer, job.model, job.training
    rows = {"precision": opt.precision, "lr": opt.lr, "min-lr": opt.min_lr,
            "lr-decay-style": opt.lr_decay_style, "lr-warmup-iters": opt.lr_warmup_iters,
            "weight-decay": opt.weight_decay, "train-iters": training.train_iters,
            "global-batch-size": training.global_batch_size,
            "micro-batch-size": training.micro_batch_size, "seed": training.seed,
            "grad-reduce-dtype": opt.grad_reduce_dtype or "strategy default",
            "grad-accumulation-rounding": opt.grad_accumulation_rounding,
            "seq-length": model.seq_length,
            "num-layers": model.num_layers, "hidden-size": model.hidden_size,
            "world-size": job.world_size,
            "tensor-model-parallel-size": job.parallel.tensor_model_parallel_size,
            "pipeline-model-parallel-size": job.parallel.pipeline_model_parallel_size}
    writer.add_text("run/config", "\n".join(f"{k}: {v}" for k, v in rows.items()), 0)
    for kind, size in memory_report(optimizer).items():
        writer.add_scalar(f"memory/{kind}-bytes", size, 0)


def decoupled_lr_at(job: JobConfig, iteration: int) -> Optional[float]:
    """--decoupled-lr's schedule at step `iteration` (0-based): this run's
    schedule shape from --decoupled-lr down to --decoupled-min-lr (default
    --min-lr); None without --decoupled-lr."""
    opt = job.optimizer
    if opt.decoupled_lr is None:
        return None
    decoupled = dataclasses.replace(
        opt, lr=opt.decoupled_lr,
        min_lr=opt.min_lr if opt.decoupled_min_lr is None else opt.decoupled_min_lr)
    return learning_rate_at(iteration, decoupled, job.training.train_iters)


def exit_conditions(received: Optional[str], training: TrainingConfig,
                    start_time: float) -> list[bool]:
    """This rank's exit flags, in the order the loop reads them back: SIGTERM
    received, another --exit-signal received, --exit-duration-in-mins passed
    since `start_time` (time.time()). `received`: the signal `_SigtermFlag`
    recorded, or None."""
    elapsed_min = (time.time() - start_time) / 60
    return [received == "SIGTERM", received not in (None, "SIGTERM"),
            bool(training.exit_duration_in_mins and elapsed_min > training.exit_duration_in_mins)]


def train(job: JobConfig, model, optimizer: DistributedOptimizer, scheduler: LRScheduler,
          data: DataStreams, start_iteration: int, consumed_samples: int,
          forward_step_func: Optional[Callable] = None,
          metrics: Optional[MetricsWriter] = None,
          exit_flag: Optional[_SigtermFlag] = None,
          job_start_time: Optional[float] = None) -> tuple[int, bool]:
    """Runs steps until --train-iters or an exit condition; returns (last
    iteration, whether an exit condition stopped it early). Saves with --save
    at --save-interval and on every exit. `forward_step_func`: see `pretrain`.
    `metrics`: the caller's writer (left open); None: one opened and closed here.
    `exit_flag`: the caller's signal flag, installed before set-up so that a
    signal then is not lost (left installed); None: one installed and restored
    here. `job_start_time` (time.time()): where --exit-duration-in-mins counts
    from, as Megatron-LM counts from the job's start; None: this call's start."""
    training = job.training
    device = parallel_state.get_default_device()
    strategy = optimizer.strategy
    forward_step = make_forward_step(strategy, device, forward_step_func=forward_step_func,
                                     per_token_loss=training.calculate_per_token_loss)
    nan_grad_iterations = fault_injection.nan_grad_iterations()
    nan_grad_step = make_forward_step(strategy, device, nan_gradients=True,
                                      forward_step_func=forward_step_func,
                                      per_token_loss=training.calculate_per_token_loss)
    own_metrics = metrics is None
    metrics = _open_metrics(job) if own_metrics else metrics
    if metrics.writer is not None:
        write_run_summary(metrics.writer, job, optimizer)
    timers = PhaseTimers(training.log_timers_to_tensorboard and is_last_rank(), device)
    profiler = StepProfiler(training, dist.get_rank(), device)
    own_flag = exit_flag is None
    sigterm = _SigtermFlag(training.exit_signal) if own_flag else exit_flag
    flops_per_sample = flops_per_token(job.model) * job.model.seq_length
    samples_per_microbatch_step = training.micro_batch_size * job.data_parallel_size
    start_time = time.time() if job_start_time is None else job_start_time
    iterators = data.train_iterators(consumed_samples)
    iteration = start_iteration
    consecutive_skips = 0
    nan_iterations = 0
    interval_time, interval_steps, interval_samples = 0.0, 0, 0
    losses = LossAccumulator()
    try:
        while iteration < training.train_iters:
            lr = scheduler.get_lr()
            log_now = (iteration + 1) % training.log_interval == 0
            batch_size = global_batch_size_at(training, consumed_samples)
            step_start = time.perf_counter()
            profiler.before_step(iteration + 1)
            report = train_step(job, model, optimizer, iterators, lr,
                                nan_grad_step if iteration + 1 in nan_grad_iterations
                                else forward_step, measure_update_absorption=log_now,
                                iteration=iteration + 1, loss_accumulator=losses,
                                reduce_loss=log_now,
                                decoupled_lr=decoupled_lr_at(job, scheduler.iteration),
                                timers=timers,
                                num_microbatches=batch_size // samples_per_microbatch_step,
                                exit_flags=lambda: exit_conditions(sigterm.received, training,
                                                                   start_time))
            profiler.after_step(iteration + 1)
            interval_time += time.perf_counter() - step_start
            interval_steps += 1
            interval_samples += batch_size
            iteration += 1
            consumed_samples += batch_size
            scheduler.step()
            if report.skipped:
                consecutive_skips += 1
                nan_iterations += int(report.loss is not None and not math.isfinite(report.loss))
                print_rank_0(f"[warning] iteration {iteration}: grad norm is {report.grad_norm}, "
                             f"step skipped ({consecutive_skips} in a row)")
                if consecutive_skips >= training.max_skipped_iterations:
                    raise TrainingStopped(
                        f"{consecutive_skips} consecutive iterations had NaN/Inf gradients "
                        f"(--max-skipped-iterations {training.max_skipped_iterations}); stopping "
                        f"instead of training on garbage. Resume from the last checkpoint with a "
                        f"lower --lr or a smaller --clip-grad.")
            else:
                consecutive_skips = 0
            if log_now:
                elapsed = interval_time / interval_steps
                with communication_phase(job, "loss averaging", iteration):
                    loss = losses.mean_over_data_parallel()
                tflops = (flops_per_sample * interval_samples / interval_time
                          / dist.get_world_size() / 1e12)
                tokens_per_s = interval_samples * job.model.seq_length / interval_time
                print_rank_last(format_log_line(
                    iteration=iteration, train_iters=training.train_iters,
                    consumed_samples=consumed_samples, elapsed_ms=elapsed * 1000,
                    tflops_per_device=tflops, lr=lr,
                    global_batch_size=batch_size, loss=loss,
                    grad_norm=report.grad_norm, skipped=optimizer.skipped_steps,
                    nan_iterations=nan_iterations, tokens_per_s=tokens_per_s,
                    update_absorption=report.update_absorption))
                scalars = {"learning-rate": lr, "batch-size": batch_size,
                           "loss-scale": 1.0, "world-size": job.world_size,
                           "grad-norm": report.grad_norm,
                           "throughput/tokens-per-s": tokens_per_s,
                           "throughput/tflops-per-device": tflops,
                           "skipped-iterations": optimizer.skipped_steps,
                           "nan-iterations": nan_iterations,
                           "consumed-samples": consumed_samples,
                           "memory/peak-bytes": peak_memory_bytes(device)}
                if loss is not None:
                    scalars["lm loss"] = loss
                if report.update_absorption is not None:
                    scalars["update-absorption"] = report.update_absorption
                if timers.enabled:
                    scalars["iteration-time"] = elapsed
                    scalars["throughput"] = tflops
                    scalars.update({f"{name}-time": seconds / interval_steps
                                    for name, seconds in timers.pop().items()})
                for name, value in scalars.items():
                    metrics.scalar(name, value, iteration, consumed_samples)
                interval_time, interval_steps, interval_samples = 0.0, 0, 0
            if training.eval_interval and iteration % training.eval_interval == 0 \
                    and data.valid is not None:
                run_evaluation(job, model, data, forward_step, iteration, metrics,
                               consumed_samples)
            if training.check_weight_hash_interval \
                    and iteration % training.check_weight_hash_interval == 0:
                optimizer.buffer.wait_param_gather()
                with communication_phase(job, "replica check", iteration):
                    check_replicas(model, iteration)
            if training.save and training.save_interval and iteration % training.save_interval == 0:
                save(job, iteration, consumed_samples, model, optimizer, scheduler)
            # Agreed in this step's grad-norm all-reduce (see exit_conditions).
            got_sigterm, got_exit_signal, out_of_time = report.exit_flags
            stop_signal = got_sigterm or got_exit_signal
            exit_interval = bool(training.exit_interval and iteration % training.exit_interval == 0)
            if stop_signal or out_of_time or exit_interval:
                reason = ("SIGTERM received" if got_sigterm else
                          f"{training.exit_signal} received" if got_exit_signal else
                          "--exit-duration-in-mins reached" if out_of_time else
                          "--exit-interval reached")
                if training.save and not (training.save_interval
                                          and iteration % training.save_interval == 0):
                    save(job, iteration, consumed_samples, model, optimizer, scheduler)
                print_rank_0(f"[exit] {reason} at iteration {iteration}")
                return iteration, True
        # Not when no step ran (resumed at --train-iters): re-saving would replace the
        # very checkpoint the tracker names, with a window where it does not exist.
        if training.save and iteration > start_iteration and not (
                training.save_interval and iteration % training.save_interval == 0):
            save(job, iteration, consumed_samples, model, optimizer, scheduler)
        return iteration, False
    finally:
        if own_flag:
            sigterm.restore()
        profiler.close()
        if own_metrics:
            metrics.close()


def run_evaluation(job: JobConfig, model, data: DataStreams, forward_step, iteration: int,
                   metrics: MetricsWriter, consumed_samples: Optional[int] = None
                   ) -> Optional[float]:
    """Evaluates on the validation split from its start; logs loss and perplexity."""
    with communication_phase(job, "evaluation", iteration):
        loss = evaluate(job, model, data.valid_iterators(), forward_step)
    if loss is not None and is_last_rank():
        ppl = math.exp(min(20.0, loss))
        line = f"validation loss at iteration {iteration} | lm loss value: {loss:.6E} | " \
               f"lm loss PPL: {ppl:.6E} |"
        print("-" * len(line) + "\n" + line + "\n" + "-" * len(line), flush=True)
        metrics.scalar("lm loss validation", loss, iteration, consumed_samples)
        metrics.scalar("lm loss validation ppl", ppl, iteration, consumed_samples)
    return loss


def _consumed_after(job: JobConfig, consumed_samples: int, steps: int) -> int:
    """Consumed samples after `steps` more steps (global batch sizes may ramp up)."""
    for _ in range(steps):
        consumed_samples += global_batch_size_at(job.training, consumed_samples)
    return consumed_samples


def save(job: JobConfig, iteration: int, consumed_samples: int, model, optimizer, scheduler):
    start = time.perf_counter()
    with communication_phase(job, "checkpoint save", iteration):
        path = checkpointing.save_training_checkpoint(job, iteration, consumed_samples, model,
                                                      optimizer, scheduler)
    done = f"saved iteration {iteration} to {path}" if path else \
        f"writing iteration {iteration} in the background (--async-save)"
    print_rank_0(f"[checkpoint] {done} ({time.perf_counter() - start:.2f} s)")


# ----- entry point --------------------------------------------------------------------------

def pretrain(train_valid_test_datasets_provider: Optional[Callable] = None,
             model_provider: Optional[Callable] = None,
             forward_step_func: Optional[Callable] = None, *,
             argv: Optional[Sequence[str]] = None) -> int:
    """Parses Megatron-style flags (`argv`; None: sys.argv[1:]) and trains what
    the providers describe; returns the last iteration. Called on every rank
    (torchrun sets RANK/WORLD_SIZE; one rank without it). Megatron-LM's
    providers, with the job's typed config passed as keyword arguments where
    Megatron reads its global args (None: the library's GPT default):

    - `train_valid_test_datasets_provider(train_val_test_num_samples, *, job,
      tokenizer) -> (train, valid, test)`: map-style datasets whose item i is
      {"tokens": int64 tensor [seq_length + 1]}; valid None skips evaluation,
      test is not read. Called once on every rank; the counts are what the run
      consumes (train: --train-iters x global batch). Default `gpt_datasets_provider`.
    - `model_provider(pre_process, post_process, *, job, layers, device) ->
      model chunk`: the global layers `layers` of the model, with the embedding
      when `pre_process` and the output layer and loss when `post_process`,
      built on `device`; called once per chunk on every rank. The chunk keeps
      GPTModel's interface: `pre_process`/`post_process`, `set_input_tensor`,
      [s, b, h] hidden states between stages, and parameters made by
      megatron_sr's layers (`build_model` initializes them from `global_name`
      and `init_method`). Default: `GPTModel(job.model, ...)`.
    - `forward_step_func(data_iterator, model) -> (output_tensor, loss_func)`:
      one micro-batch through the chunk `model`, drawn from `data_iterator`
      (int64 CPU rows [micro_batch_size, seq_length + 1]; None on chunks that
      neither embed nor compute the loss: `get_batch` handles both). On the
      last stage `loss_func(output_tensor)` returns the micro-batch's loss, a
      scalar tensor: the schedule backpropagates its mean over micro-batches
      and the log line reports it averaged over data-parallel ranks. It runs
      under torch.autocast for --precision amp. Default `gpt_forward_step`.
    """
    job_start_time = time.time()
    write_whole_lines()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    job = parse_args(list(argv) if argv is not None else None, world_size)
    # From here to the end, SIGTERM and --exit-signal set a flag the loop reads after
    # its first step: a signal during set-up (Slurm's time-limit signal while a large
    # checkpoint loads) is not lost, and it does not kill the rank.
    exit_flag = _SigtermFlag(job.training.exit_signal)
    try:
        device = initialize_distributed(job)
    except BaseException:
        exit_flag.restore()
        raise
    try:
        fault_injection.at("setup")
        for notice in job.notices:
            print_rank_0(notice)
        data = job.data
        tokenizer = build_tokenizer(data.tokenizer_type, vocab_file=data.vocab_file,
                                    merge_file=data.merge_file,
                                    tokenizer_model=data.tokenizer_model,
                                    vocab_size=data.vocab_size,
                                    tiktoken_pattern=data.tiktoken_pattern,
                                    tiktoken_num_special_tokens=data.tiktoken_num_special_tokens)
        job = job.with_vocab_size(tokenizer.vocab_size)
        print_rank_0(f"[setup] world {job.world_size} = TP {job.parallel.tensor_model_parallel_size}"
                     f" x PP {job.parallel.pipeline_model_parallel_size} x DP "
                     f"{job.data_parallel_size}; --precision {job.optimizer.precision}; device "
                     f"{device.type}; vocab {job.unpadded_vocab_size} padded to "
                     f"{job.model.vocab_size}; {job.num_microbatches} micro-batches per step")
        if device.type == "cpu":
            print_rank_0(f"[setup] {cpu_bf16_summary()}")
        model, optimizer, scheduler = setup_model_and_optimizer(job,
                                                                model_provider=model_provider)
        buffer = optimizer.buffer
        notice = job.model.gradient_accumulation_fusion and fusion_notice(
            buffer.param_buffer.dtype, buffer.grad_buffer.dtype, device)
        if notice:
            print_rank_0(notice)
        reports = [None] * dist.get_world_size()
        dist.all_gather_object(reports, memory_report(optimizer))
        print_rank_0(_format_memory_report(job, reports))
        iteration, consumed = checkpointing.load_training_checkpoint(job, model, optimizer,
                                                                     scheduler)
        data_streams = DataStreams(job, tokenizer, model, train_valid_test_datasets_provider)
        metrics = _open_metrics(job)  # one TensorBoard writer / wandb run for the whole job
        try:
            last, stopped_early = train(job, model, optimizer, scheduler, data_streams,
                                        iteration, consumed, forward_step_func, metrics,
                                        exit_flag=exit_flag, job_start_time=job_start_time)
            checkpointing.finish_pending_save()
            evaluated_last = job.training.eval_interval and last % job.training.eval_interval == 0
            if not (stopped_early or evaluated_last) and job.training.eval_iters \
                    and data_streams.valid is not None:
                run_evaluation(job, model, data_streams,
                               make_forward_step(optimizer.strategy, device,
                                                 forward_step_func=forward_step_func),
                               last, metrics, _consumed_after(job, consumed, last - iteration))
        finally:
            metrics.close()
        return last
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
        exit_flag.restore()


@contextmanager
def exit_on_job_error():
    """Errors a user fixes (bad flags, an unusable checkpoint, a training that
    cannot go on, a dead or stalled rank) end the process with one line
    `error: <message>` on stderr and exit status 1 instead of a traceback."""
    try:
        yield
    except (ValueError, checkpointing.CheckpointError, TrainingStopped,
            CommunicationError, ReplicaMismatch) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)


def main() -> None:
    """`pretrain` of the default GPT on sys.argv's flags, errors as messages."""
    with exit_on_job_error():
        pretrain(argv=sys.argv[1:])
