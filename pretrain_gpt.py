"""Pretrain a GPT with megatron_sr.

    torchrun --nproc_per_node N pretrain_gpt.py --num-layers ... [Megatron-LM flags]

Every rank runs this file. As in Megatron-LM, it says what is trained and
`megatron_sr.training.pretrain` does the rest (precision, tensor/pipeline/data
parallelism, checkpoints, logging; `python pretrain_gpt.py --help` for the
flags). Change the model, the loss or the data here: the three providers
below are the library's defaults spelled out (the same bits), and
`pretrain`'s docstring gives their contracts. `job` is the run's typed
configuration (`megatron_sr.config.JobConfig`): what Megatron's providers
read from `get_args()`. Own flags: parse them before `pretrain` and hand it
the rest (examples/pretrain_gpt_zloss.py does, with a custom loss).
"""
from functools import partial

import torch

from megatron_sr.model import GPTModel
from megatron_sr.data.gpt_dataset import build_gpt_datasets
from megatron_sr.training import exit_on_job_error, get_batch, pretrain


def model_provider(pre_process=True, post_process=True, *, job, layers, device):
    """One chunk of the GPT: the global layers `layers`, the embedding on the
    first stage (`pre_process`), the output layer and the loss on the last."""
    return GPTModel(job.model, pre_process=pre_process, post_process=post_process,
                    layer_offset=layers.start, num_layers=len(layers),
                    sequence_parallel=job.parallel.sequence_parallel, device=device)


def loss_func(loss_mask, output_tensor):
    """Mean of the per-token losses [b, s] over the tokens that count (all when
    `loss_mask` is None): the micro-batch's loss, an fp32 scalar."""
    losses = output_tensor.float()
    if loss_mask is None:
        return losses.mean()
    return torch.sum(losses * loss_mask) / loss_mask.sum().clamp(min=1.0)


def forward_step(data_iterator, model):
    """One micro-batch through the chunk `model`: per-token losses on the last
    stage (hidden states elsewhere), and the function reducing them to the loss."""
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator, model)
    output_tensor = model(tokens, position_ids, labels=labels if model.post_process else None,
                          attention_mask=attention_mask)
    return output_tensor, partial(loss_func, loss_mask)


def train_valid_test_datasets_provider(train_val_test_num_samples, *, job, tokenizer):
    """Megatron GPT datasets of --data-path (or --mock-data) and --split."""
    return build_gpt_datasets(job.data, tokenizer, train_val_test_num_samples, job.training.seed)


if __name__ == "__main__":
    with exit_on_job_error():
        pretrain(train_valid_test_datasets_provider, model_provider, forward_step)
