"""The training job: set-up, the train/eval loop, logging, exits.

`pretrain(train_valid_test_datasets_provider, model_provider, forward_step_func)`
is what `pretrain_gpt.py` runs on every rank under torchrun, in Megatron-LM's
shape: the three providers say what is trained (the model chunk, the loss, the
data; `megatron_sr.recipes.gpt` is the GPT's) and `pretrain` does the rest (see
`pretrain` for their contracts):

    setup.initialize_distributed   backend and device (CUDA+NCCL, else CPU+Gloo), process
                                   groups, seeds
    setup.build_job_tokenizer      the vocabulary pads the model's embedding
    setup.setup_model_and_optimizer  model chunks, param/grad buffers, distributed optimizer,
                                   LR schedule; then --load (`checkpointing`)
    data.DataStreams               train/valid samples for this data-parallel rank, from
                                   consumed samples
    loop.train                     the loop: `train_step` (forward-backward over micro-batches
                                   through the pipeline schedule, DP and model-parallel grad
                                   syncs, the optimizer step), logging, evaluation
    policy.RunPolicy               when to save and stop (--save-interval, --exit-interval,
                                   --exit-duration-in-mins, SIGTERM, skipped steps)

Beside them: `forward_step` (the schedule's forward step around the user's),
`communication` (a stalled or dead rank named by phase and collective),
`errors` (the errors that end a job with a message), `console` (which rank
prints). Logging is done by the last rank (it holds the loss): Megatron's line
format on stdout and the same values as TensorBoard (and wandb) scalars; see
`megatron_sr.training_log`.
"""
from megatron_sr.recipes.gpt import get_batch
from megatron_sr.training.communication import communication_phase
from megatron_sr.training.console import write_whole_lines
from megatron_sr.training.data import (DataStreams, DocumentSettings, MicroBatchStream,
                                       train_valid_test_num_samples)
from megatron_sr.training.entry import main, pretrain
from megatron_sr.training.errors import CommunicationError, TrainingStopped, exit_on_job_error
from megatron_sr.training.forward_step import ForwardStep, make_forward_step
from megatron_sr.training.loop import (LossAccumulator, StepContext, StepReport, decoupled_lr_at,
                                       evaluate, train, train_step)
from megatron_sr.training.setup import initialize_distributed, setup_model_and_optimizer
from megatron_sr.training_log import memory_report, write_run_summary

__all__ = ["CommunicationError", "DataStreams", "DocumentSettings", "ForwardStep",
           "LossAccumulator", "MicroBatchStream", "StepContext", "StepReport", "TrainingStopped",
           "communication_phase", "decoupled_lr_at", "evaluate", "exit_on_job_error", "get_batch",
           "initialize_distributed", "main", "make_forward_step", "memory_report", "pretrain",
           "setup_model_and_optimizer", "train", "train_step", "train_valid_test_num_samples",
           "write_run_summary", "write_whole_lines"]
