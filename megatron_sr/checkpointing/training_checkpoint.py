"""The training job's checkpoint: what it saves and restores, in either format.

`save_training_checkpoint` and `load_training_checkpoint` are what the
training loop calls; they dispatch on the format (--ckpt-format on save, the
manifest's "format" on load) to `legacy` or `torch_dist`. A checkpoint holds
the model, the optimizer state with its step counters, the LR scheduler, the
iteration, the consumed samples, the run's description (`job_description`)
and the RNG states of every rank; --no-save-optim leaves out the optimizer
state and the scheduler, --no-save-rng the RNG states, and "omitted" lists
what was left out. On load, --no-load-optim, --no-load-rng and --finetune
decide what is restored besides the weights (a part the checkpoint was saved
without must be left out: `strict_load.check_saved_parts`); --ckpt-step picks
the iteration instead of the tracker, and --exit-on-missing-checkpoint stops
the job when --load holds none.
"""
from __future__ import annotations

import os
import re
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
from megatron_sr.checkpointing.strict_load import (check_saved_parts, check_vocabulary,
                                                   load_model_state)
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


def omitted_parts(training) -> list[str]:
    """The parts --no-save-optim and --no-save-rng leave out of a checkpoint:
    "optimizer" (with the LR scheduler), "rng"."""
    return [part for part, left_out in (("optimizer", training.no_save_optim),
                                        ("rng", training.no_save_rng)) if left_out]


def _save_legacy(job, iteration: int, consumed_samples: int, model, optimizer,
                 scheduler) -> str:
    """The torch format's save: one file per (TP, PP) position holding the
    gathered optimizer state and every DP rank's RNG states (each unless
    --no-save-optim / --no-save-rng: then neither is gathered)."""
    training = job.training
    optimizer.buffer.wait_param_gather()
    optimizer_state = None
    if not training.no_save_optim:
        optimizer_state = optimizer.state_dict(dst=0)  # gathered to the writer only
    rng_states: Optional[list] = None
    if not training.no_save_rng:
        rng_states = [None] * parallel_state.get_data_parallel_world_size()
        dist.all_gather_object(rng_states, rng_state(),
                               group=parallel_state.get_data_parallel_group())
    state = None
    if parallel_state.get_data_parallel_rank() == 0:
        state = {"checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
                 "consumed_train_samples": consumed_samples, "args": job_description(job),
                 "omitted": omitted_parts(training),
                 "model": {name: p.detach().clone().cpu()
                           for name, p in named_parameters_global(model)}}
        if optimizer_state is not None:
            state.update(optimizer=optimizer_state, lr_scheduler=scheduler.state_dict())
        if rng_states is not None:
            state["rng_state"] = rng_states
    return save_checkpoint(training.save, iteration, state,
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
    training = job.training
    tmp_dir = collective_on_rank0(lambda: prepare_temporary_directory(training.save, iteration))
    optimizer.buffer.wait_param_gather()
    common = {"checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
              "consumed_train_samples": consumed_samples, "args": job_description(job),
              "omitted": omitted_parts(training)}
    if not training.no_save_optim:
        common.update(lr_scheduler=scheduler.state_dict(),
                      optimizer={"strategy": optimizer.strategy.name,
                                 "step": optimizer.step_count,
                                 "skipped_steps": optimizer.skipped_steps})
    return torch_dist.save(job, iteration, common, model, optimizer, tmp_dir,
                           None if training.no_save_rng else rng_state())


def finish_pending_save() -> Optional[str]:
    """Waits for an async save in flight and publishes it (returns its directory,
    None when there was none). Every rank calls it before the job ends."""
    from megatron_sr.checkpointing import torch_dist

    return torch_dist.wait_for_pending_save()


def load_training_checkpoint(job, model, optimizer, scheduler) -> tuple[int, int]:
    """Restores the checkpoint under --load (the latest, or --ckpt-step's) into
    model, optimizer, scheduler and RNG; returns (iteration, consumed samples),
    (0, 0) without --load or when it holds no checkpoint yet (CheckpointError
    instead with --exit-on-missing-checkpoint). Honors --no-load-optim,
    --no-load-rng and --finetune (weights only, iteration 0). Every rank calls it."""
    training = job.training
    check_save_directory(training)
    if not training.load:
        return 0, 0
    collective_on_rank0(lambda: log_recovery(recover_interrupted_publish(training.load)))
    iteration, directory = collective_on_rank0(
        lambda: load_target(training.load, training.ckpt_step))
    if iteration is None:
        if training.exit_on_missing_checkpoint:
            raise CheckpointError(f"--load {training.load} holds no checkpoint (no "
                                  f"{TRACKER_FILENAME}) and --exit-on-missing-checkpoint is set: "
                                  f"stopping instead of training from scratch")
        if rank0():
            print(f"[checkpoint] no {TRACKER_FILENAME} in {training.load}: training from scratch",
                  flush=True)
        return 0, 0
    if rank0() and directory == training.load:
        print(f"[checkpoint] --load {training.load} is an iteration directory: loading "
              f"iteration {iteration} (not the latest one its parent's tracker names)", flush=True)
    if read_manifest(directory)["format"] == "torch_dist":
        return _load_torch_dist(job, directory, iteration, model, optimizer, scheduler)
    return _load_legacy(job, directory, iteration, model, optimizer, scheduler)


def load_target(load: str, step: Optional[int] = None) -> tuple[Optional[int], Optional[str]]:
    """(iteration, iteration directory) that --load names: its tracker's
    iteration, or `step` (--ckpt-step) instead when given; when --load is an
    iteration directory itself, that iteration (as the offline tools read
    it). (None, None) for a directory without checkpoints (and no `step`).
    CheckpointError on anything else. Runs in the calling process, reads only."""
    if not os.path.isdir(load):
        raise CheckpointError(f"--load {load}: no such directory")
    if is_iteration_directory(load) and read_tracker(load) is None:
        iteration = read_manifest(load)["iteration"]
        name = os.path.basename(os.path.normpath(load))
        if name != iteration_dir_name(iteration):
            raise CheckpointError(f"--load {load}: its {MANIFEST_FILENAME} is of iteration "
                                  f"{iteration}, not of the iteration its name says")
        if step is not None and step != iteration:
            raise CheckpointError(f"--ckpt-step {step}: --load {load} is the iteration directory "
                                  f"of iteration {iteration}; give its parent as --load")
        return iteration, load
    if step is None:
        iteration = read_tracker(load)
        if iteration is None:
            refuse_megatron_lm_layout(load)  # e.g. Megatron-LM's release/ directory itself
            return None, None
        return iteration, os.path.join(load, iteration_dir_name(iteration))
    directory = os.path.join(load, iteration_dir_name(step))
    if not os.path.isdir(directory):
        saved = sorted(int(name[len("iter_"):]) for name in os.listdir(load)
                       if re.fullmatch(r"iter_[0-9]+", name))
        raise CheckpointError(f"--ckpt-step {step}: --load {load} holds no "
                              f"{iteration_dir_name(step)} (its iterations: "
                              f"{', '.join(map(str, saved)) or 'none'})")
    return step, directory


def _load_legacy(job, directory: str, iteration: int, model, optimizer,
                 scheduler) -> tuple[int, int]:
    """The torch format's load: this rank's file, at the layout it was saved with."""
    training = job.training
    state = load_state_file(directory, parallel_state.get_tensor_model_parallel_rank(),
                            parallel_state.get_pipeline_model_parallel_rank(),
                            parallel_state.get_tensor_model_parallel_world_size(),
                            parallel_state.get_pipeline_model_parallel_world_size())
    check_vocabulary(job, state.get("args"), directory)
    check_saved_parts(state, directory,
                      load_optim=not (training.finetune or training.no_load_optim),
                      load_rng=not (training.finetune or training.no_load_rng))
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
