"""Set-up of a training job on every rank: the process groups and seeds, the
tokenizer, the model chunks with their param/grad buffers, the distributed
optimizer and the LR schedule, and the set-up lines of the log."""
from __future__ import annotations

import datetime
import functools
import os
import socket
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_sr import parallel_state
from megatron_sr.config import JobConfig
from megatron_sr.cpu_bf16 import cpu_bf16_summary
from megatron_sr.data.tokenizers import build_tokenizer
from megatron_sr.launch_environment import (cuda_device_index, flight_recorder_dir,
                                            nccl_error_handling)
from megatron_sr.model import build_model
from megatron_sr.optimizer.distributed_optimizer import DistributedOptimizer
from megatron_sr.optimizer.lr_schedules import LRScheduler
from megatron_sr.optimizer.param_buffer import ParamAndGradBuffer, param_infos
from megatron_sr.precision.strategies import get_strategy, with_grad_buffer
from megatron_sr.random import model_parallel_seed
from megatron_sr.tensor_parallel.grad_accumulation_fusion import fusion_notice
from megatron_sr.training.console import print_rank_0
from megatron_sr.training_log import format_memory_report, memory_report


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


def build_job_tokenizer(job: JobConfig):
    """The tokenizer of the job's data flags (its vocabulary pads the embedding)."""
    data = job.data
    return build_tokenizer(data.tokenizer_type, vocab_file=data.vocab_file,
                           merge_file=data.merge_file, tokenizer_model=data.tokenizer_model,
                           vocab_size=data.vocab_size, tiktoken_pattern=data.tiktoken_pattern,
                           tiktoken_num_special_tokens=data.tiktoken_num_special_tokens)


def print_setup(job: JobConfig, device: torch.device) -> None:
    """Rank 0's set-up lines: the flags' notices, the layout, the precision,
    the vocabulary; on the CPU, how BF16 products are computed."""
    for notice in job.notices:
        print_rank_0(notice)
    print_rank_0(f"[setup] world {job.world_size} = TP {job.parallel.tensor_model_parallel_size}"
                 f" x PP {job.parallel.pipeline_model_parallel_size} x DP "
                 f"{job.data_parallel_size}; --precision {job.optimizer.precision}; device "
                 f"{device.type}; vocab {job.unpadded_vocab_size} padded to "
                 f"{job.model.vocab_size}; {job.num_microbatches} micro-batches per step")
    if device.type == "cpu":
        print_rank_0(f"[setup] {cpu_bf16_summary()}")


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


def print_training_state(job: JobConfig, optimizer: DistributedOptimizer,
                         device: torch.device) -> None:
    """The gradient-accumulation-fusion notice, then the largest training state
    of any rank (`memory_report`). All ranks call it: one all_gather_object."""
    buffer = optimizer.buffer
    notice = job.model.gradient_accumulation_fusion and fusion_notice(
        buffer.param_buffer.dtype, buffer.grad_buffer.dtype, device)
    if notice:
        print_rank_0(notice)
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, memory_report(optimizer))
    print_rank_0(format_memory_report(job.optimizer.precision, reports))
