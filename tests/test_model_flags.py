"""Megatron-LM's model flags of a Qwen-style launch script, end to end.

A tiny Qwen-style GPT (grouped-query attention, SwiGLU, RoPE, biases on the
query/key/value projection only) is given with the flags such scripts write:
`--disable-bias-linear --add-qkv-bias`, `--normalization rmsnorm` (lower
case), `--position-embedding-type rope --no-position-embedding`. It trains
4 fp32 steps at TP=2 on 2 Gloo ranks, saving every 2 steps. Checked:
- the job trains (finite, falling losses), and the checkpoint holds a
  `linear_qkv.bias` per layer, TP-merged to the full [(heads + 2 groups) x
  head_dim], learned away from its zero start, and no other bias, no
  learned position table, RMSNorm's weights only;
- resuming from step 2 gives steps 3 and 4 bit-identical to the run without
  the interruption, and the same final checkpoint;
- the flags that rebuild the checkpoint's model (what checkpoint_convert.py
  prints after an import) include --add-qkv-bias;
- tools/checkpoint_convert.py reshapes the checkpoint to TP=1 and a TP=1 job
  loads the same weights bit for bit.
The TP=2 equality of the model itself, against TP=1, is tests/test_gpt_model.py's
"qwen" case; the Hugging Face (Qwen2) export and import, tests/test_hf_conversion.py's.
"""
import contextlib
import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest

from bitwise import assert_same_bits
from job_harness import (assert_states_equal, checkpoint_files, copy_checkpoint, losses,
                         run_pretrain, tiny_gpt_argv)

ROOT = Path(__file__).resolve().parents[1]
HEADS, GROUPS, HIDDEN, LAYERS = 4, 2, 32, 2
QWEN_FLAGS = dict(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                  group_query_attention=True, num_query_groups=GROUPS, swiglu=True,
                  ffn_hidden_size=64, disable_bias_linear=True, add_qkv_bias=True,
                  normalization="rmsnorm", position_embedding_type="rope",
                  no_position_embedding=True, untie_embeddings_and_output_weights=True,
                  precision="fp32", hidden_dropout=0.0, attention_dropout=0.0,
                  global_batch_size=4, lr=1e-2)


def _argv(**flags):
    return tiny_gpt_argv(**{**QWEN_FLAGS, **flags})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    save = root / "continuous"
    continuous = run_pretrain(2, _argv(tensor_model_parallel_size=2, train_iters=4,
                                       save=save, save_interval=2))
    resume_dir = copy_checkpoint(str(save), 2, str(root / "resume"))
    resumed = run_pretrain(2, _argv(tensor_model_parallel_size=2, train_iters=4,
                                    load=resume_dir, save=resume_dir, save_interval=2))
    return {"root": root, "save": save, "continuous": continuous, "resumed": resumed,
            "resume_dir": resume_dir}


def test_qwen_style_job_trains_with_a_bias_on_qkv_only(trained):
    from megatron_sr.checkpointing.conversion import load_full_checkpoint, model_flags

    steps = losses(trained["continuous"])
    assert len(steps) == 4 and np.isfinite(steps).all() and steps[-1] < steps[0], steps
    checkpoint = load_full_checkpoint(str(trained["save"]))
    config = checkpoint.config
    assert (config.add_bias_linear, config.add_qkv_bias, config.normalization,
            config.position_embedding_type) == (False, True, "RMSNorm", "rope")
    assert "--normalization RMSNorm" in model_flags(config)
    assert "--disable-bias-linear --add-qkv-bias" in model_flags(config)
    qkv_bias = [f"decoder.layers.{i}.self_attention.linear_qkv.bias" for i in range(LAYERS)]
    assert sorted(name for name in checkpoint.model if name.endswith(".bias")) == qkv_bias
    assert not any("position_embeddings" in name for name in checkpoint.model)
    head_dim = HIDDEN // HEADS
    for name in qkv_bias:
        bias = checkpoint.model[name]
        assert tuple(bias.shape) == ((HEADS + 2 * GROUPS) * head_dim,), name
        # Both TP halves moved away from the zero start: each rank trained its slice.
        assert all(half.abs().max() > 0 for half in bias.chunk(2)), name


def test_resume_continues_bit_identically(trained):
    assert losses(trained["resumed"]) == losses(trained["continuous"])[2:]
    assert_states_equal(checkpoint_files(trained["resume_dir"], 4),
                        checkpoint_files(str(trained["save"]), 4))


def _checkpoint_convert(*args):
    spec = importlib.util.spec_from_file_location("checkpoint_convert",
                                                  ROOT / "tools" / "checkpoint_convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        returncode = module.main([str(arg) for arg in args])
    return returncode, stdout.getvalue()


def test_reshape_to_tp1_keeps_the_qkv_bias_and_a_tp1_job_loads_it(trained):
    from megatron_sr.checkpointing.conversion import load_full_checkpoint

    merged = trained["root"] / "tp1"
    returncode, _ = _checkpoint_convert(
        "--load", trained["save"], "--save", merged, "--target-tensor-parallel-size", "1",
        "--target-pipeline-parallel-size", "1")
    assert returncode == 0
    original = load_full_checkpoint(str(trained["save"])).model
    reshaped = load_full_checkpoint(str(merged)).model
    assert original.keys() == reshaped.keys()
    for name, tensor in original.items():
        assert_same_bits(tensor, reshaped[name], name)
    (tp1,) = run_pretrain(1, _argv(train_iters=5, load=merged,
                                   use_checkpoint_opt_param_scheduler=True))
    assert tp1["loaded_params"].keys() == original.keys()
    for name, value in tp1["loaded_params"].items():
        np.testing.assert_array_equal(value, original[name].float().numpy(), name)
    assert np.isfinite(losses([tp1])).all()
