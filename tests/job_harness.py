"""Shared pieces of the training-job tests: a tiny GPT's command line, the real
job (`megatron_sr.training.pretrain`) run inside `run_ranks` workers with every
step's report recorded, and readers for what the job wrote.

The worker functions run on every rank of a `run_ranks` group (Gloo on the
CPU); `pretrain` joins the group the worker already initialized.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil

import numpy as np

from megatron_sr import checkpointing
from multiprocess import run_ranks

SEED = 1234
VOCAB = 60  # NullTokenizer ids; +1 EOD, padded to 64 by --make-vocab-size-divisible-by 16


def tiny_gpt_argv(**flags) -> list[str]:
    """Megatron-style flags of a tiny GPT job on mock data; keyword flags use
    underscores (`train_iters=4`), True adds a bare flag, None/False drops one.
    Checkpoints default to the legacy per-rank files (`ckpt_format="torch"`),
    which `checkpoint_files` reads; pass ckpt_format="torch_dist" for DCP."""
    values = dict(ckpt_format="torch", num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                  micro_batch_size=2, lr=1e-3, mock_data=True, tokenizer_type="NullTokenizer",
                  vocab_size=VOCAB, make_vocab_size_divisible_by=16, log_interval=1,
                  eval_interval=1000, eval_iters=0, seed=SEED, lr_decay_style="constant")
    values.update(flags)
    argv = []
    for name, value in values.items():
        if value is None or value is False:
            continue
        argv.append("--" + name.replace("_", "-"))
        if value is not True:
            argv += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return argv


def pretrain_worker(rank: int, world_size: int, argv: list[str], expect_error: bool = False,
                    providers: str | None = None):
    """Runs `pretrain(argv=argv)` on this rank, with the providers of the script
    at path `providers` (e.g. pretrain_gpt.py; None: the library's defaults). Returns {"last_iteration", "reports":
    [StepReport as dict per step], "stdout", "loaded_params": {name: fp32 array}
    and "loaded_optimizer": the optimizer's state_dict (`as_numpy`) right after
    --load (None without), "error": the exception's message when `expect_error`
    and the job raised}."""
    import importlib.util

    from megatron_sr import training
    from megatron_sr.model import named_parameters_global
    from megatron_sr.training import loop

    reports, loaded = [], {}
    train_step, load = loop.train_step, checkpointing.load_training_checkpoint

    def recording_train_step(*args, **kwargs):
        # Every step's DP-mean loss (the loop itself reduces losses only at log steps).
        report = train_step(*args, **dict(kwargs, reduce_loss=True))
        reports.append(dataclasses.asdict(report))
        return report

    def recording_load(job, model, optimizer, scheduler):
        progress = load(job, model, optimizer, scheduler)
        if job.training.load:
            loaded["params"] = {name: p.detach().float().numpy().copy()
                                for name, p in named_parameters_global(model)}
            loaded["optimizer"] = as_numpy(optimizer.state_dict())
        return progress

    loop.train_step = recording_train_step
    checkpointing.load_training_checkpoint = recording_load
    stdout, error, last = io.StringIO(), None, None
    try:
        with contextlib.redirect_stdout(stdout):
            if providers is None:
                last = training.pretrain(argv=argv)
            else:
                spec = importlib.util.spec_from_file_location("providers", providers)
                script = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(script)
                last = training.pretrain(script.train_valid_test_datasets_provider,
                                         script.model_provider, script.forward_step, argv=argv)
    except Exception as exc:  # noqa: BLE001 - handed to the test to check
        if not expect_error:
            raise
        error = f"{type(exc).__name__}: {exc}"
    finally:
        loop.train_step, checkpointing.load_training_checkpoint = train_step, load
    return {"last_iteration": last, "reports": reports, "stdout": stdout.getvalue(),
            "loaded_params": loaded.get("params"), "loaded_optimizer": loaded.get("optimizer"),
            "error": error}


def as_numpy(tree):
    """A state tree with every tensor as an fp32 numpy array (exact for bf16):
    torch tensors returned from a worker live in shared memory that dies with it."""
    import torch

    if isinstance(tree, dict):
        return {k: as_numpy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [as_numpy(v) for v in tree]
    if isinstance(tree, torch.Tensor):
        return tree.detach().float().numpy().copy()
    return tree


def run_pretrain(world_size: int, argv: list[str], expect_error: bool = False,
                 env: dict[str, str] | None = None, timeout: float = 240,
                 providers: str | None = None) -> list[dict]:
    """`pretrain_worker` on `world_size` Gloo ranks; its results by rank."""
    return run_ranks(pretrain_worker, world_size, argv, expect_error, providers, timeout=timeout,
                     env={"WORLD_SIZE": str(world_size), **(env or {})})


def losses(results: list[dict]) -> list[float]:
    """The per-step training losses (from the rank that holds them, the last)."""
    return [r["loss"] for r in results[-1]["reports"]]


def copy_checkpoint(save_dir: str, iteration: int, to: str) -> str:
    """A --load directory `to` holding only `iteration` of `save_dir`, with a
    tracker naming it; returns `to`."""
    name = checkpointing.iteration_dir_name(iteration)
    shutil.copytree(os.path.join(save_dir, name), os.path.join(to, name))
    with open(os.path.join(to, checkpointing.TRACKER_FILENAME), "w") as f:
        f.write(f"{iteration}\n")
    return to


def checkpoint_files(save_dir: str, iteration: int) -> dict[str, dict]:
    """{rank directory (mp_rank_TT[_PPP]): state} of one saved iteration, each
    verified against the manifest."""
    directory = os.path.join(save_dir, checkpointing.iteration_dir_name(iteration))
    manifest = checkpointing.read_manifest(directory)
    tp, pp = manifest["tensor_model_parallel_size"], manifest["pipeline_model_parallel_size"]
    return {checkpointing.rank_dir_name(t, p, pp):
            checkpointing.load_state_file(directory, t, p, tp, pp)
            for t in range(tp) for p in range(pp)}


def assert_states_equal(a, b, path: str = "") -> None:
    """Bit-for-bit equality of two checkpoint state trees (tensors, numbers, bytes)."""
    import torch

    from bitwise import as_bits, assert_same_bits

    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys differ: {sorted(set(a) ^ set(b))}"
        for key in a:
            assert_states_equal(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: lengths {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_states_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{tuple(a.shape)} " \
                                                          f"!= {b.dtype}{tuple(b.shape)}"
        assert torch.equal(as_bits(a), as_bits(b)), \
            f"{path}: tensors differ (max abs diff " \
            f"{(a.double() - b.double()).abs().max().item():.3g})"
    elif isinstance(a, np.ndarray):
        assert_same_bits(a, b, path)
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
