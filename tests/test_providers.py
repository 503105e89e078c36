"""pretrain_gpt.py in Megatron-LM's shape: its providers (model_provider,
forward_step with its loss_func, train_valid_test_datasets_provider) go
through `megatron_sr.training.pretrain`, which keeps everything else.

Spec (issue 17):
- pretrain_gpt.py's providers train exactly what the library's defaults
  train (the code path of the plain `pretrain(argv=...)`): the same losses
  and grad norms, bit for bit, in bf16-sr under interleaved pipelining, whose
  middle chunks draw no data.
- A user script (examples/pretrain_gpt_zloss.py) that replaces forward_step
  and loss_func with a z-loss version trains at TP 2 x PP 2: the logged loss
  of the first step is the cross entropy plus the z-term, and the gradients
  the optimizer receives are those of that loss, both checked against a
  single-rank computation in plain torch (torch.logsumexp over the full
  logits) on the same weights and batch.
- A loss_func that returns something other than a scalar tensor fails with
  a message saying what it must return.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from job_harness import run_pretrain, tiny_gpt_argv
from multiprocess import run_ranks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN_GPT = os.path.join(REPO, "pretrain_gpt.py")
ZLOSS_SCRIPT = os.path.join(REPO, "examples", "pretrain_gpt_zloss.py")


def load_script(path: str):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_pretrain_gpt_providers_reproduce_the_library_defaults_bit_for_bit():
    argv = tiny_gpt_argv(num_layers=4, pipeline_model_parallel_size=2,
                         num_layers_per_virtual_pipeline_stage=1, train_iters=3,
                         global_batch_size=8, micro_batch_size=2)
    library = run_pretrain(2, argv)
    script = run_pretrain(2, argv, providers=PRETRAIN_GPT)
    for rank in range(2):
        a, b = library[rank]["reports"], script[rank]["reports"]
        assert len(a) == len(b) == 3
        assert [(r["loss"], r["grad_norm"]) for r in a] == [(r["loss"], r["grad_norm"]) for r in b]
    assert all(r["loss"] is not None for r in script[1]["reports"])


# ----- a custom loss through a user script ---------------------------------------------------

Z_WEIGHT = 0.01
ZLOSS_FLAGS = dict(precision="fp32", train_iters=1, global_batch_size=4, micro_batch_size=2,
                   hidden_dropout=0, attention_dropout=0)


def _full_grads(model):
    """{global name: full fp32 gradient (numpy)}, TP slices all-gathered."""
    import torch
    import torch.distributed as dist

    from megatron_sr import parallel_state
    from megatron_sr.model import named_parameters_global
    from megatron_sr.tensor_parallel import full_tensor_from_shards

    tp = parallel_state.get_tensor_model_parallel_world_size()
    grads = {}
    for name, param in named_parameters_global(model):
        local = getattr(param, "main_grad", param.grad).detach().float().contiguous()
        shards = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(shards, local, group=parallel_state.get_tensor_model_parallel_group())
        grads[name] = full_tensor_from_shards(shards, param).numpy().copy()
    return grads


def zloss_script_worker(rank: int, world_size: int, argv: list[str]):
    """Runs examples/pretrain_gpt_zloss.py's main(argv) on this rank; returns
    the logged losses and the first step's full gradients (as the optimizer gets them)."""
    import contextlib
    import io

    import torch

    from megatron_sr.optimizer.param_buffer import ParamAndGradBuffer

    script = load_script(ZLOSS_SCRIPT)
    finish, captured = ParamAndGradBuffer.finish_grad_sync, {}

    def capturing_finish(buffer):
        # After the DP reduction and the TP / embedding sums (DP = 1: the whole buffer).
        finish(buffer)
        if not captured:
            captured.update(_full_grads([torch.nn.ParameterList(buffer.params)]))

    ParamAndGradBuffer.finish_grad_sync = capturing_finish
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            script.main(argv)
    finally:
        ParamAndGradBuffer.finish_grad_sync = finish
    losses = [float(line.split("lm loss: ")[1].split()[0])
              for line in stdout.getvalue().splitlines() if "lm loss: " in line]
    return {"losses": losses, "grads": captured}


def reference_worker(rank: int, world_size: int, argv: list[str]):
    """The first step on one rank in plain torch: the same initial weights
    (initialization does not depend on the layout) and batch; returns
    {"ce" | "zloss": (loss, {name: grad})}."""
    import torch

    from megatron_sr import parallel_state
    from megatron_sr.config import parse_args
    from megatron_sr.data.tokenizers import build_tokenizer
    from megatron_sr.model import build_model, named_parameters_global
    from megatron_sr.random import model_parallel_seed
    from megatron_sr.recipes.gpt import train_valid_test_datasets_provider as gpt_datasets_provider
    from megatron_sr.training import train_valid_test_num_samples

    job = parse_args(argv, 1)
    tokenizer = build_tokenizer(job.data.tokenizer_type, vocab_size=job.data.vocab_size)
    job = job.with_vocab_size(tokenizer.vocab_size)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_seed(job.training.seed)
    train, _, _ = gpt_datasets_provider(train_valid_test_num_samples(job), job=job,
                                        tokenizer=tokenizer)
    micro = job.training.micro_batch_size
    batches = [torch.stack([train[i]["tokens"] for i in range(j * micro, (j + 1) * micro)])
               for j in range(job.num_microbatches)]
    results = {}
    for name, weight in (("ce", 0.0), ("zloss", Z_WEIGHT)):
        (chunk,) = build_model(job.model, job.parallel, seed=job.training.seed)
        total = 0.0
        for batch in batches:
            logits = chunk(batch[:, :-1]).float()  # [b, s, V]
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            loss = ce + weight * torch.logsumexp(logits, dim=-1).square().mean()
            (loss / len(batches)).backward()
            total += loss.item() / len(batches)
        results[name] = (total, {n: p.grad.numpy().copy()
                                 for n, p in named_parameters_global([chunk])})
    parallel_state.destroy_model_parallel()
    return results


@pytest.mark.slow
def test_a_zloss_user_script_shows_in_the_logged_loss_and_in_the_gradients():
    layout = dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    argv = tiny_gpt_argv(**ZLOSS_FLAGS, **layout)
    ranks = run_ranks(zloss_script_worker, 4, ["--z-loss-weight", str(Z_WEIGHT), *argv],
                      env={"WORLD_SIZE": "4"}, timeout=240)
    (reference,) = run_ranks(reference_worker, 1, tiny_gpt_argv(**ZLOSS_FLAGS), timeout=240)
    (ce_loss, ce_grads), (z_loss, z_grads) = reference["ce"], reference["zloss"]
    logged = ranks[-1]["losses"]
    assert len(logged) == 1
    # The z-term is visible (mean lse^2 ~ log(64)^2 at initialization) and the logged
    # loss is the reference's to fp32 rounding.
    assert z_loss - ce_loss > 0.5 * Z_WEIGHT * np.log(64) ** 2
    assert logged[0] == pytest.approx(z_loss, rel=1e-5)
    grads = {}
    for rank in ranks:  # each pipeline stage reports its own parameters
        grads.update(rank["grads"])
    assert grads.keys() == z_grads.keys()
    for name in grads:
        np.testing.assert_allclose(grads[name], z_grads[name], rtol=1e-4, atol=1e-6,
                                   err_msg=name)
    # ... and the z-term's gradient is far above that tolerance.
    differs = max(np.abs(z_grads[n] - ce_grads[n]).max() for n in grads)
    assert differs > 1e-3


def bad_loss_worker(rank: int, world_size: int, argv: list[str]):
    from functools import partial

    from megatron_sr import training

    script = load_script(PRETRAIN_GPT)

    def forward_step(data_iterator, model):
        output, loss_func = script.forward_step(data_iterator, model)
        return output, lambda out: (loss_func(out), {"lm loss": loss_func(out)})

    try:
        training.pretrain(script.train_valid_test_datasets_provider, script.model_provider,
                          partial(forward_step), argv=argv)
    except TypeError as exc:
        return str(exc)
    return None


def test_a_loss_func_returning_a_tuple_is_rejected_with_a_message():
    (message,) = run_ranks(bad_loss_worker, 1, tiny_gpt_argv(train_iters=1),
                           env={"WORLD_SIZE": "1"}, timeout=120)
    assert message is not None and "scalar tensor" in message and "tuple" in message, message
