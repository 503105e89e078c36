"""The training job's checkpoint: what it saves and restores, in either format.

`save_training_checkpoint` and `load_training_checkpoint` are what the
training loop calls; they dispatch on the format (--ckpt-format on save, the
manifest's "format" on load) to `legacy` or `torch_dist`. A checkpoint holds
the model, the optimizer state with its step counters, the LR scheduler, the
iteration, the consumed samples, the run's description (`job_description`)
and the RNG states of every rank. On load, --no-load-optim, --no-load-rng
and --finetune decide what is restored besides the weights.
"""
from __future__ import annotations

import os
from typing import Optional

import torch.distributed as dist

from megatron_sr import parallel_state
from megatron_sr.checkpointing.description import job_description
from megatron_sr.checkpointing.directory_checks import check_save_directory
from megatron_sr.checkpointing.legacy import load_state_file, save_checkpoint
from megatron_sr.checkpointing.manifest import (CHECKPOINT_VERSION, MANIFEST_FILENAME,
                                                TRACKER_FILENAME, CheckpointError,
                                                is_iteration_directory, iteration_dir_name,
                                                read_manifest, read_tracker,
                                                refuse_megatron_lm_layout)
from megatron_sr.checkpointing.publish import (collective_on_rank0, log_recovery,
                                               prepare_temporary_directory, rank0,
                                               recover_interrupted_publish)
from megatron_sr.checkpointing.rng import rng_state, seed_new_data_parallel_rank, set_rng_state
from megatron_sr.checkpointing.strict_load import check_vocabulary, load_model_state
from megatron_sr.model import named_parameters_global

# `torch_dist` is imported where it is used: torch.distributed.checkpoint takes
# seconds to import, which runs that never touch the format do not pay.


def save_training_checkpoint(job, iteration: int, consumed_samples: int, model, optimizer,
                             scheduler) -> Optional[str]:
    """Saves model, optimizer, scheduler, progress and RNG states of `iteration`
    under --save; returns the published directory (None while an --async-save
    is in flight). Every rank calls it (the optimizer state and the RNG states
    are gathered over DP; the DP-rank-0 rank of each (TP, PP) position writes,
    and only it receives the other DP ranks' optimizer shards)."""
    if job.training.ckpt_format == "torch_dist":
        return _save_torch_dist(job, iteration, consumed_samples, model, optimizer, scheduler)
    return _save_legacy(job, iteration, consumed_samples, model, optimizer, scheduler)


def _save_legacy(job, iteration: int, consumed_samples: int, model, optimizer,
                 scheduler) -> str:
    """The torch format's save: one file per (TP, PP) position holding the
    gathered optimizer state and every DP rank's RNG states."""
    optimizer.buffer.wait_param_gather()
    optimizer_state = optimizer.state_dict(dst=0)  # gathered to the writer only
    dp_group = parallel_state.get_data_parallel_group()
    rng_states: list = [None] * parallel_state.get_data_parallel_world_size()
    dist.all_gather_object(rng_states, rng_state(), group=dp_group)
    state = None
    if parallel_state.get_data_parallel_rank() == 0:
        state = {"checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
                 "consumed_train_samples": consumed_samples, "args": job_description(job),
                 "model": {name: p.detach().clone().cpu()
                           for name, p in named_parameters_global(model)},
                 "optimizer": optimizer_state, "lr_scheduler": scheduler.state_dict(),
                 "rng_state": rng_states}
    return save_checkpoint(job.training.save, iteration, state,
                           tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                           pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
                           tp_size=parallel_state.get_tensor_model_parallel_world_size(),
                           pp_size=parallel_state.get_pipeline_model_parallel_world_size())


def _save_torch_dist(job, iteration: int, consumed_samples: int, model, optimizer,
                     scheduler) -> Optional[str]:
    """The torch_dist save (see `checkpointing.torch_dist`): waits for an async
    save in flight, prepares the temporary directory on rank 0, then writes."""
    from megatron_sr.checkpointing import torch_dist

    torch_dist.wait_for_pending_save()
    save_dir = job.training.save
    tmp_dir = collective_on_rank0(lambda: prepare_temporary_directory(save_dir, iteration))
    optimizer.buffer.wait_param_gather()
    common = {"checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
              "consumed_train_samples": consumed_samples, "args": job_description(job),
              "lr_scheduler": scheduler.state_dict(),
              "optimizer": {"strategy": optimizer.strategy.name, "step": optimizer.step_count,
                            "skipped_steps": optimizer.skipped_steps}}
    return torch_dist.save(job, iteration, common, model, optimizer, tmp_dir, rng_state())


def finish_pending_save() -> Optional[str]:
    """Waits for an async save in flight and publishes it (returns its directory,
    None when there was none). Every rank calls it before the job ends."""
    from megatron_sr.checkpointing import torch_dist

    return torch_dist.wait_for_pending_save()


def load_training_checkpoint(job, model, optimizer, scheduler) -> tuple[int, int]:
    """Restores the latest checkpoint under --load into model, optimizer,
    scheduler and RNG; returns (iteration, consumed samples), (0, 0) without
    --load or when it holds no checkpoint yet. Honors --no-load-optim,
    --no-load-rng and --finetune (weights only, iteration 0). Every rank calls it."""
    training = job.training
    check_save_directory(training)
    if not training.load:
        return 0, 0
    collective_on_rank0(lambda: log_recovery(recover_interrupted_publish(training.load)))
    iteration, directory = collective_on_rank0(lambda: _load_target(training.load))
    if iteration is None:
        if rank0():
            print(f"[checkpoint] no {TRACKER_FILENAME} in {training.load}: training from scratch",
                  flush=True)
        return 0, 0
    if read_manifest(directory)["format"] == "torch_dist":
        return _load_torch_dist(job, directory, iteration, model, optimizer, scheduler)
    return _load_legacy(job, directory, iteration, model, optimizer, scheduler)


def _load_target(load: str) -> tuple[Optional[int], Optional[str]]:
    """(iteration, iteration directory) that --load names: its tracker's
    iteration, or, when --load is an iteration directory itself, that
    iteration (as the offline tools read it); (None, None) for a directory
    without checkpoints. CheckpointError on anything else."""
    if not os.path.isdir(load):
        raise CheckpointError(f"--load {load}: no such directory")
    iteration = read_tracker(load)
    if iteration is not None:
        return iteration, os.path.join(load, iteration_dir_name(iteration))
    if not is_iteration_directory(load):
        refuse_megatron_lm_layout(load)  # e.g. Megatron-LM's release/ directory itself
        return None, None
    iteration = read_manifest(load)["iteration"]
    name = os.path.basename(os.path.normpath(load))
    if name != iteration_dir_name(iteration):
        raise CheckpointError(f"--load {load}: its {MANIFEST_FILENAME} is of iteration "
                              f"{iteration}, not of the iteration its name says")
    print(f"[checkpoint] --load {load} is an iteration directory: loading iteration "
          f"{iteration} (not the latest one its parent's tracker names)", flush=True)
    return iteration, load


def _load_legacy(job, directory: str, iteration: int, model, optimizer,
                 scheduler) -> tuple[int, int]:
    """The torch format's load: this rank's file, at the layout it was saved with."""
    training = job.training
    state = load_state_file(directory, parallel_state.get_tensor_model_parallel_rank(),
                            parallel_state.get_pipeline_model_parallel_rank(),
                            parallel_state.get_tensor_model_parallel_world_size(),
                            parallel_state.get_pipeline_model_parallel_world_size())
    check_vocabulary(job, state.get("args"), directory)
    load_model_state(model, state["model"], directory)
    if training.finetune:
        return _start_fine_tuning(optimizer, iteration, directory)
    if training.no_load_optim:
        optimizer.reset_master_from_params()
    else:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["lr_scheduler"])
    states = state.get("rng_state")
    if not training.no_load_rng and states is None and rank0():
        print(f"[checkpoint] {directory} carries no RNG states (it was reshaped by "
              f"tools/checkpoint_convert.py): dropout continues from --seed", flush=True)
    if not training.no_load_rng and states is not None:
        dp_rank = parallel_state.get_data_parallel_rank()
        if dp_rank < len(states):
            set_rng_state(states[dp_rank])
        else:
            seed_new_data_parallel_rank(training.seed, dp_rank, iteration)
    if rank0():
        print(f"[checkpoint] loaded iteration {iteration} from {directory}", flush=True)
    return iteration, int(state["consumed_train_samples"])


def _load_torch_dist(job, directory: str, iteration: int, model, optimizer,
                     scheduler) -> tuple[int, int]:
    """The torch_dist load: any TP, PP and DP layout (see `checkpointing.torch_dist`)."""
    from megatron_sr.checkpointing import torch_dist

    training = job.training
    load_optim = not (training.finetune or training.no_load_optim)
    common = torch_dist.load(job, directory, read_manifest(directory), model, optimizer,
                             load_optim=load_optim,
                             load_rng=not (training.finetune or training.no_load_rng))
    if training.finetune:
        return _start_fine_tuning(optimizer, iteration, directory)
    if load_optim:
        scheduler.load_state_dict(common["lr_scheduler"])
    else:
        optimizer.reset_master_from_params()
    if not training.no_load_rng and not common["rng_loaded"]:
        seed_new_data_parallel_rank(training.seed, parallel_state.get_data_parallel_rank(),
                                    iteration)
    if rank0():
        print(f"[checkpoint] loaded iteration {iteration} from {directory}", flush=True)
    return iteration, int(common["consumed_train_samples"])


def _start_fine_tuning(optimizer, iteration: int, directory: str) -> tuple[int, int]:
    """--finetune after the weights are loaded: the optimizer's master state restarts
    from them and training counts from iteration 0 (the caller skips the rest)."""
    optimizer.reset_master_from_params()
    if rank0():
        print(f"[checkpoint] --finetune: loaded weights of iteration {iteration} from "
              f"{directory}; optimizer, scheduler and iteration start fresh", flush=True)
    return 0, 0
