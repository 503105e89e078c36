"""--decoupled-lr / --decoupled-min-lr: the word embedding and the output
layer follow the schedule's shape between their own peak and floor; every
other parameter keeps --lr."""
import numpy as np
import pytest
import torch

from job_harness import VOCAB, tiny_gpt_argv
from multiprocess import run_ranks

from megatron_sr.config import parse_args
from megatron_sr.optimizer.distributed_optimizer import DECOUPLED_LR_PARAMETERS
from megatron_sr.optimizer.lr_schedules import learning_rate_at


def _argv(**flags):
    return tiny_gpt_argv(precision="fp32", lr=1e-3, min_lr=1e-4, lr_decay_style="cosine",
                         lr_warmup_iters=2, train_iters=10, untie_embeddings_and_output_weights=True,
                         **flags)


def test_decoupled_schedule_has_the_same_shape():
    from megatron_sr.training import decoupled_lr_at

    job = parse_args(_argv(decoupled_lr=5e-3, decoupled_min_lr=5e-4), world_size=1)
    for step in range(10):
        assert decoupled_lr_at(job, step) == pytest.approx(
            5 * learning_rate_at(step, job.optimizer, 10))
    assert decoupled_lr_at(parse_args(_argv(), world_size=1), 3) is None
    with pytest.raises(ValueError, match="--decoupled-min-lr needs --decoupled-lr"):
        parse_args(_argv(decoupled_min_lr=1e-4), world_size=1)


def _one_step(rank, world_size):
    from megatron_sr import parallel_state, training
    from megatron_sr.model import named_parameters_global

    job = parse_args(_argv(decoupled_lr=1e-2), world_size).with_vocab_size(VOCAB + 1)
    device = training.initialize_distributed(job)
    try:
        model, optimizer, _ = training.setup_model_and_optimizer(job)
        before = {n: p.detach().clone() for n, p in named_parameters_global(model)}
        batches = list(torch.randint(0, VOCAB, (job.num_microbatches, 2, 17),
                                     generator=torch.Generator().manual_seed(0)))
        forward_step = training.make_forward_step(optimizer.strategy, device)
        training.train_step(job, model, optimizer, [iter(batches)], 0.0, forward_step,
                            decoupled_lr=1e-2)
        return {n: float((p.detach() - before[n]).abs().max())
                for n, p in named_parameters_global(model)}
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def test_only_embedding_and_output_layer_move_at_lr_zero():
    (moved,) = run_ranks(_one_step, 1)
    assert set(DECOUPLED_LR_PARAMETERS) <= set(moved)
    for name, change in moved.items():
        if name in DECOUPLED_LR_PARAMETERS:
            assert change > 1e-3, name
        else:
            assert change == 0.0, name
    assert np.isfinite(list(moved.values())).all()
