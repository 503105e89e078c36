"""--calculate-per-token-loss with --eod-mask-loss: the step's loss (and its
gradient) is the average over every loss token of the global batch, however
the batch is cut into micro-batches and data-parallel ranks. Two ranks x 2
micro-batches of 2 samples must give what one rank computes on the 8 samples
as one micro-batch; the mean of per-micro-batch means (without the flag)
differs, since the micro-batches hold different numbers of eod tokens."""
import numpy as np
import torch

from job_harness import VOCAB, tiny_gpt_argv
from multiprocess import run_ranks

from megatron_sr.config import parse_args

SAMPLES, SEQ = 8, 16


def _global_batch() -> torch.Tensor:
    """[8, seq + 1] tokens; sample i has an eod (id VOCAB) at every (i + 2)-th position."""
    tokens = torch.randint(0, VOCAB, (SAMPLES, SEQ + 1), generator=torch.Generator().manual_seed(3))
    for i in range(SAMPLES):
        tokens[i, ::i + 2] = VOCAB
    return tokens


def _step(rank, world_size, micro, per_token):
    from megatron_sr import parallel_state, training

    argv = tiny_gpt_argv(precision="fp32", micro_batch_size=micro, global_batch_size=SAMPLES,
                         train_iters=10, eod_mask_loss=True, hidden_dropout=0.0,
                         attention_dropout=0.0, calculate_per_token_loss=per_token)
    job = parse_args(argv, world_size).with_vocab_size(VOCAB + 1)
    device = training.initialize_distributed(job)
    try:
        model, optimizer, _ = training.setup_model_and_optimizer(job)
        dp, dp_rank = job.data_parallel_size, parallel_state.get_data_parallel_rank()
        rows = _global_batch()
        mine = [rows[(j * dp + dp_rank) * micro:(j * dp + dp_rank + 1) * micro]
                for j in range(job.num_microbatches)]
        forward_step = training.make_forward_step(optimizer.strategy, device,
                                                  per_token_loss=per_token)
        stream = training.MicroBatchStream(iter(mine), training.DocumentSettings(
            eod=VOCAB, eod_mask_loss=True))
        report = training.train_step(job, model, optimizer, [stream], 0.0, forward_step)
        return report.loss, report.grad_norm
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def test_per_token_loss_is_independent_of_the_batch_split():
    reference = run_ranks(_step, 1, SAMPLES, True)[0]
    split = run_ranks(_step, 2, 2, True)
    mean_of_means = run_ranks(_step, 2, 2, False)
    for loss, grad_norm in split:
        np.testing.assert_allclose([loss, grad_norm], reference, rtol=1e-5)
    assert abs(mean_of_means[0][0] - reference[0]) > 1e-4
