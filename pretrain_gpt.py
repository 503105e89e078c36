"""Pretrain a GPT with megatron_sr.

    torchrun --nproc_per_node N pretrain_gpt.py --num-layers ... [Megatron-LM flags]

Every rank runs this file. As in Megatron-LM, it says what is trained and
`megatron_sr.training.pretrain` does the rest (precision, tensor/pipeline/data
parallelism, checkpoints, logging; `python pretrain_gpt.py --help` for the
flags). What is trained is the GPT recipe, `megatron_sr/recipes/gpt.py`: its
providers (model_provider, forward_step with get_batch and loss_func,
train_valid_test_datasets_provider) are the library's defaults, and
`pretrain`'s docstring gives their contracts. To change the model, the loss or
the data, pass your own providers: examples/pretrain_gpt_zloss.py keeps the
recipe's model and data and replaces the loss, with a flag of its own parsed
before `pretrain`. `job`, which the providers receive, is the run's typed
configuration (`megatron_sr.config.JobConfig`): what Megatron's providers read
from `get_args()`.
"""
from megatron_sr.recipes.gpt import forward_step, model_provider, train_valid_test_datasets_provider
from megatron_sr.training import exit_on_job_error, pretrain

if __name__ == "__main__":
    with exit_on_job_error():
        pretrain(train_valid_test_datasets_provider, model_provider, forward_step)
