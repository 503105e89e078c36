"""Megatron-LM's checkpoint flags, end to end with the real job (tiny GPT, Gloo).

Spec:
- --no-save-optim / --no-save-rng: the checkpoint (both formats) holds no
  optimizer state and scheduler / no RNG states, says so ("omitted"), and is
  complete: its manifest verifies and the conversion tools read it. A resume
  from it without --no-load-optim / --no-load-rng stops with an error naming
  what is missing and the flags to add; with them it loads the weights and
  continues at the saved iteration; --finetune starts from its weights.
- --exit-on-missing-checkpoint: --load without a checkpoint stops the job
  with an error instead of training from scratch.
- --ckpt-step N loads iteration N, not the tracker's; an N --load does not
  hold is an error listing the iterations it holds.
- --use-checkpoint-args fills the model sizes the command line leaves out and
  replaces its other architecture flags with the checkpoint's, naming them
  in a [flags] line; --use-mp-args-from-checkpoint-args takes the TP/PP sizes
  too (a legacy TP=2 checkpoint then resumes without --tensor-model-parallel-size).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from job_harness import checkpoint_files, run_pretrain, tiny_gpt_argv
from megatron_sr import checkpointing
from megatron_sr.checkpointing import torch_dist
from megatron_sr.checkpointing.conversion import load_full_checkpoint
from megatron_sr.config import parse_args


def _job(fmt: str, **flags) -> list[str]:
    return tiny_gpt_argv(ckpt_format=fmt, **{"train_iters": 2, "global_batch_size": 4, **flags})


def _saved_model(save: str, iteration: int) -> dict[str, np.ndarray]:
    checkpoint = load_full_checkpoint(os.path.join(save, checkpointing.iteration_dir_name(
        iteration)))
    return {name: t.float().numpy() for name, t in checkpoint.model.items()}


@pytest.fixture(scope="module", params=["torch", "torch_dist"])
def lean_checkpoint(request, tmp_path_factory):
    """A DP=2 run (distributed optimizer) saved at iteration 2 with --no-save-optim
    --no-save-rng: (format, --save directory)."""
    save = str(tmp_path_factory.mktemp("lean") / "save")
    run_pretrain(2, _job(request.param, save=save, save_interval=2, no_save_optim=True,
                         no_save_rng=True, use_distributed_optimizer=True))
    return request.param, save


def test_a_checkpoint_without_optimizer_and_rng_is_complete(lean_checkpoint):
    fmt, save = lean_checkpoint
    directory = os.path.join(save, "iter_0000002")
    assert checkpointing.read_tracker(save) == 2
    assert checkpointing.read_manifest(directory)["format"] == fmt
    if fmt == "torch":
        state = checkpoint_files(save, 2)["mp_rank_00"]
        assert state["omitted"] == ["optimizer", "rng"]
        assert not {"optimizer", "lr_scheduler", "rng_state"} & set(state)
    else:
        common, tensors, rng = torch_dist.read_full(directory,
                                                    checkpointing.read_manifest(directory))
        assert common["omitted"] == ["optimizer", "rng"]
        assert "optimizer" not in common and "lr_scheduler" not in common and not rng
        assert tensors and all(key.startswith("model/") for key in tensors)
    full = load_full_checkpoint(save)
    assert full.optimizer is None and full.iteration == 2 and full.model


@pytest.mark.parametrize("flags, missing", [
    ({}, "no optimizer state and no RNG states"),
    ({"no_load_optim": True}, "no RNG states"),
    ({"no_load_rng": True}, "no optimizer state"),
])
def test_resuming_needs_the_matching_no_load_flags(lean_checkpoint, flags, missing):
    fmt, save = lean_checkpoint
    (result,) = run_pretrain(1, _job(fmt, load=save, train_iters=3, **flags), expect_error=True)
    assert "CheckpointError" in result["error"] and missing in result["error"]
    for flag in ("--no-load-optim", "--no-load-rng"):
        assert (flag in result["error"]) == (flag.replace("load", "save") in result["error"])
    assert "--finetune" in result["error"] and result["reports"] == []


def test_resume_with_no_load_optim_and_rng_continues_from_the_weights(lean_checkpoint):
    fmt, save = lean_checkpoint
    (result,) = run_pretrain(1, _job(fmt, load=save, train_iters=3, no_load_optim=True,
                                     no_load_rng=True))
    assert f"loaded iteration 2 from {save}" in result["stdout"]
    assert result["last_iteration"] == 3 and len(result["reports"]) == 1
    saved = _saved_model(save, 2)
    for name, value in result["loaded_params"].items():
        np.testing.assert_array_equal(value, saved[name].reshape(value.shape), name)


def test_finetune_from_a_checkpoint_without_optimizer(lean_checkpoint):
    fmt, save = lean_checkpoint
    (result,) = run_pretrain(1, _job(fmt, load=save, finetune=True))
    assert "--finetune: loaded weights of iteration 2" in result["stdout"]
    assert result["last_iteration"] == 2 and len(result["reports"]) == 2


def test_exit_on_missing_checkpoint_stops_instead_of_training_from_scratch(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (result,) = run_pretrain(1, _job("torch", load=str(empty), exit_on_missing_checkpoint=True),
                             expect_error=True)
    assert f"--load {empty} holds no checkpoint" in result["error"]
    assert "--exit-on-missing-checkpoint" in result["error"] and result["reports"] == []
    with pytest.raises(ValueError, match="--exit-on-missing-checkpoint needs --load"):
        parse_args(_job("torch", exit_on_missing_checkpoint=True), 1)


def test_ckpt_step_loads_that_iteration(tmp_path):
    save = str(tmp_path / "save")
    run_pretrain(1, _job("torch_dist", save=save, save_interval=1, train_iters=3))
    assert checkpointing.read_tracker(save) == 3
    (result,) = run_pretrain(1, _job("torch_dist", load=save, ckpt_step=2, train_iters=3))
    assert f"loaded iteration 2 from {os.path.join(save, 'iter_0000002')}" in result["stdout"]
    assert result["last_iteration"] == 3 and len(result["reports"]) == 1
    saved = _saved_model(save, 2)
    later = _saved_model(save, 3)
    for name, value in result["loaded_params"].items():
        np.testing.assert_array_equal(value, saved[name].reshape(value.shape), name)
    assert any(not np.array_equal(saved[name], later[name]) for name in saved)
    (result,) = run_pretrain(1, _job("torch_dist", load=save, ckpt_step=5, train_iters=6),
                             expect_error=True)
    assert "--ckpt-step 5" in result["error"] and "its iterations: 1, 2, 3" in result["error"]
    with pytest.raises(ValueError, match="--ckpt-step needs --load"):
        parse_args(_job("torch", ckpt_step=2), 1)
    job = parse_args(_without_sizes(load=save, ckpt_step=2, use_checkpoint_args=True), 1)
    assert (job.model.num_layers, job.model.hidden_size) == (2, 32)
    assert f"from {os.path.join(save, 'iter_0000002')}: --num-layers 2" in job.notices[-1]


# The architecture of the checkpoint --use-checkpoint-args reads; the command
# line of the later runs gives none of these sizes, or other values.
ARCHITECTURE = dict(num_layers=3, hidden_size=48, num_attention_heads=4, seq_length=16,
                    normalization="RMSNorm", swiglu=True, ffn_hidden_size=96,
                    disable_bias_linear=True, group_query_attention=True, num_query_groups=2,
                    position_embedding_type="rope", untie_embeddings_and_output_weights=True)


@pytest.fixture(scope="module")
def tp2_checkpoint(tmp_path_factory):
    """A legacy checkpoint of ARCHITECTURE at TP=2 (iteration 2 of 3): its --save directory."""
    save = str(tmp_path_factory.mktemp("tp2") / "save")
    run_pretrain(2, _job("torch", save=save, train_iters=3, exit_interval=2,
                         tensor_model_parallel_size=2, **ARCHITECTURE))
    return save


def _without_sizes(**flags) -> list[str]:
    return _job("torch", **{"num_layers": None, "hidden_size": None,
                            "num_attention_heads": None, "seq_length": None, **flags})


def test_use_checkpoint_args_takes_the_architecture(tp2_checkpoint):
    job = parse_args(_without_sizes(load=tp2_checkpoint, use_checkpoint_args=True,
                                    normalization="LayerNorm", hidden_dropout=0.0), 2)
    model = job.model
    assert (model.num_layers, model.hidden_size, model.num_attention_heads, model.seq_length,
            model.ffn_hidden_size, model.num_query_groups) == (3, 48, 4, 16, 96, 2)
    assert model.normalization == "RMSNorm" and model.activation == "swiglu"
    assert not model.add_bias_linear and model.untie_embeddings_and_output_weights
    assert model.position_embedding_type == "rope" and model.hidden_dropout == 0.1
    assert job.parallel.tensor_model_parallel_size == 1  # not without the mp flag
    (line,) = [n for n in job.notices if n.startswith("[flags] --use-checkpoint-args")]
    for shown in ("--num-layers 3", "--hidden-size 48", "--swiglu", "--disable-bias-linear",
                  "--normalization RMSNorm (instead of --normalization LayerNorm)",
                  "--hidden-dropout 0.1 (instead of --hidden-dropout 0.0)",
                  "--num-query-groups 2"):
        assert shown in line, (shown, line)
    kept = parse_args(_without_sizes(load=tp2_checkpoint, use_checkpoint_args=True,
                                     seq_length=32, max_position_embeddings=32), 2)
    assert kept.model.seq_length == 32 and kept.model.num_layers == 3
    assert "kept the command line's --seq-length 32 (the checkpoint has 16)" in kept.notices[-1]


def test_use_checkpoint_args_needs_load_and_mp_args_need_it():
    with pytest.raises(ValueError, match="--use-checkpoint-args needs --load"):
        parse_args(_without_sizes(use_checkpoint_args=True), 1)
    with pytest.raises(ValueError, match="--use-mp-args-from-checkpoint-args needs "
                                         "--use-checkpoint-args"):
        parse_args(_job("torch", load="x", use_mp_args_from_checkpoint_args=True), 1)


def test_use_mp_args_resumes_a_tp2_checkpoint_from_its_own_description(tp2_checkpoint):
    argv = _without_sizes(load=tp2_checkpoint, train_iters=3, use_checkpoint_args=True,
                          use_mp_args_from_checkpoint_args=True)
    results = run_pretrain(2, argv)
    assert "--tensor-model-parallel-size 2 (instead of --tensor-model-parallel-size 1)" \
        in results[0]["stdout"]
    assert f"loaded iteration 2 from {tp2_checkpoint}" in results[0]["stdout"]
    assert results[0]["last_iteration"] == 3 and len(results[-1]["reports"]) == 1
    saved = _saved_model(tp2_checkpoint, 2)
    assert set(results[0]["loaded_params"]) == set(saved)
    (failed, _) = run_pretrain(2, argv[:-1], expect_error=True)  # TP 1: the layout differs
    assert "--tensor-model-parallel-size 2" in failed["error"]
