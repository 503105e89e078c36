"""pretrain_gpt.py with a z-loss: a user's customization, outside the library.

    torchrun --nproc_per_node 4 examples/pretrain_gpt_zloss.py --z-loss-weight 1e-4 \
        [the flags of pretrain_gpt.py]

The loss of a micro-batch is the mean cross entropy plus
`z_loss_weight * mean(logsumexp(logits)^2)` over its tokens (PaLM's auxiliary
z-loss: it keeps the softmax normalizer log Z near 0, which steadies the
logits in low precision). The model and the data are the GPT recipe's
(`megatron_sr.recipes.gpt`, as pretrain_gpt.py trains); only
`forward_step` and `loss_func` change: the chunk is asked for its logits (no
labels), and the loss is computed here from this tensor-parallel rank's slice
of the vocabulary [b, s, V / tp], with the normalizer summed over the TP group
(the full [b, s, V] logits never exist). The log line's `lm loss` is this
loss, z-term included; its gradient is what the optimizer steps on.
"""
import argparse
import os
import sys
from functools import partial

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_sr import parallel_state  # noqa: E402
from megatron_sr.recipes.gpt import (get_batch, model_provider,  # noqa: E402
                                     train_valid_test_datasets_provider)
from megatron_sr.tensor_parallel import (reduce_from_tensor_model_parallel_region,  # noqa: E402
                                         vocab_parallel_cross_entropy)
from megatron_sr.training import exit_on_job_error, pretrain  # noqa: E402


def vocab_parallel_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """log sum_v exp(logits[..., v]) over the whole vocabulary, from this TP
    rank's slice [..., V / tp] (any dtype) -> fp32 [...], the same on every TP
    rank. Two all-reduces over the TP group (max, then the sum of exponentials,
    whose backward hands each rank the gradient of its own slice)."""
    logits = logits.float()
    top = logits.max(dim=-1).values.detach()
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX,
                        group=parallel_state.get_tensor_model_parallel_group())
    sum_exp = torch.exp(logits - top.unsqueeze(-1)).sum(dim=-1)
    return top + torch.log(reduce_from_tensor_model_parallel_region(sum_exp))


def loss_func(labels, loss_mask, z_loss_weight, output_tensor):
    """Cross entropy + z_loss_weight * logsumexp^2, averaged over the tokens
    that count (all when `loss_mask` is None); `output_tensor`: logits [b, s, V / tp]."""
    per_token = (vocab_parallel_cross_entropy(output_tensor, labels)
                 + z_loss_weight * vocab_parallel_logsumexp(output_tensor).square())
    if loss_mask is None:
        return per_token.mean()
    return torch.sum(per_token * loss_mask) / loss_mask.sum()


def forward_step(data_iterator, model, z_loss_weight: float):
    """Logits on the last stage (hidden states elsewhere) and their loss function."""
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator, model)
    output_tensor = model(tokens, position_ids, attention_mask=attention_mask)
    return output_tensor, partial(loss_func, labels, loss_mask, z_loss_weight)


def main(argv=None) -> int:
    """Takes --z-loss-weight off the command line; pretrain parses the rest."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--z-loss-weight", type=float, default=1e-4,
                        help="Weight of the mean squared log-normalizer added to the loss.")
    own, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    return pretrain(train_valid_test_datasets_provider, model_provider,
                    partial(forward_step, z_loss_weight=own.z_loss_weight), argv=rest)


if __name__ == "__main__":
    with exit_on_job_error():
        main()
