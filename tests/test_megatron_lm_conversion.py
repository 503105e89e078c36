"""Megatron-LM legacy checkpoints: export and import (issue 14).

Spec:
- ours -> Megatron-LM -> ours gives the same tensors and model config, at
  TP=2 x PP=2, GPT-2 style (tied, biases) and Llama style (untied, SwiGLU).
- The files are Megatron-LM's: `iter_XXXXXXX/mp_rank_TT_PPP/model_optim_rng.pt`
  with `args` an argparse.Namespace, checkpoint_version 3.0, layers numbered
  per pipeline stage, the last stage's copy of a tied embedding named
  `output_layer.weight`; the tracker names the iteration.
- tools/checkpoint_convert.py --to-megatron / --from-megatron do the same on
  disk.
- megatron-core's own GPTModel (pip megatron-core, local spec, on the CPU)
  loads an exported checkpoint strictly and computes our logits (1e-4).
"""
from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch

from megatron_sr.checkpointing.conversion import FullCheckpoint, load_full_checkpoint
from megatron_sr.checkpointing import megatron_lm
from megatron_sr.config import ModelConfig
from megatron_sr.model.state_dict_layout import global_parameter_names, split_state_dict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
import checkpoint_convert  # noqa: E402

CONFIGS = {
    "gpt2": ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=64,
                        seq_length=8, params_dtype=torch.float32),
    "llama": ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=64,
                         seq_length=8, ffn_hidden_size=48, position_embedding_type="rope",
                         normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
                         untie_embeddings_and_output_weights=True, params_dtype=torch.bfloat16),
    "qwen": ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=64,
                        seq_length=8, ffn_hidden_size=48, position_embedding_type="rope",
                        normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
                        add_qkv_bias=True, untie_embeddings_and_output_weights=True,
                        params_dtype=torch.float32),
}


def random_full_state(config: ModelConfig) -> dict[str, torch.Tensor]:
    """A full state dict of `config` with random values (shapes from a TP=1
    split of zeros of the right sizes)."""
    generator = torch.Generator().manual_seed(3)
    h, f, v = config.hidden_size, config.ffn_hidden_size, config.vocab_size
    fc1 = 2 * f if config.activation == "swiglu" else f
    shapes = {"word_embeddings.weight": (v, h), "position_embeddings.weight":
              (config.max_position_embeddings, h), "layernorm.weight": (h,),
              "layernorm.bias": (h,), "linear_qkv.weight": (3 * h, h), "linear_qkv.bias": (3 * h,),
              "linear_proj.weight": (h, h), "linear_proj.bias": (h,),
              "linear_fc1.weight": (fc1, h), "linear_fc1.bias": (fc1,),
              "linear_fc2.weight": (h, f), "linear_fc2.bias": (h,), "output_layer.weight": (v, h)}
    state = {}
    for name in global_parameter_names(config):
        shape = next(s for suffix, s in shapes.items() if name.endswith(suffix))
        state[name] = torch.randn(shape, generator=generator).to(config.params_dtype)
    return state


def _checkpoint(config: ModelConfig) -> FullCheckpoint:
    import dataclasses

    from megatron_sr.checkpointing.description import plain_data as _plain

    description = {"model": _plain(dataclasses.asdict(config)),
                   "parallel": {"tensor_model_parallel_size": 1,
                                             "pipeline_model_parallel_size": 1},
                   "data": {"tokenizer_type": "NullTokenizer", "vocab_size": 63}}
    return FullCheckpoint(directory="", iteration=7, description=description, config=config,
                          model=random_full_state(config), optimizer=None, lr_scheduler=None,
                          consumed_train_samples=56)


@pytest.mark.parametrize("key", CONFIGS)
def test_ours_to_megatron_to_ours_is_bit_exact(key, tmp_path):
    config = CONFIGS[key]
    full = random_full_state(config)
    save = str(tmp_path / "megatron")
    os.makedirs(save)
    megatron_lm.export_megatron_lm(full, config, {"data": {"tokenizer_type": "NullTokenizer"}},
                                   7, 56, save, tp=2, pp=2)
    args, imported_config, iteration, imported = megatron_lm.import_megatron_lm(save)
    assert iteration == 7 and isinstance(args, argparse.Namespace)
    assert imported_config == config
    assert list(imported) == list(full)
    for name, tensor in full.items():
        assert imported[name].dtype == tensor.dtype and torch.equal(imported[name], tensor), name


def test_the_files_are_megatron_lms(tmp_path):
    config = CONFIGS["gpt2"]
    full = random_full_state(config)
    save = str(tmp_path / "megatron")
    os.makedirs(save)
    megatron_lm.export_megatron_lm(full, config, {}, 7, 56, save, tp=2, pp=2)
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == "7\n"
    assert sorted(os.listdir(os.path.join(save, "iter_0000007"))) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    last = torch.load(os.path.join(save, "iter_0000007", "mp_rank_01_001", "model_optim_rng.pt"),
                      weights_only=False)
    assert last["checkpoint_version"] == 3.0 and last["iteration"] == 7
    assert isinstance(last["args"], argparse.Namespace)
    assert (last["args"].tensor_model_parallel_size, last["args"].pipeline_model_parallel_size,
            last["args"].padded_vocab_size) == (2, 2, 64)
    layers = {name.split(".")[2] for name in last["model"] if name.startswith("decoder.layers.")}
    assert layers == {"0", "1"}  # global layers 2 and 3, numbered per stage
    expected = split_state_dict(full, config, tensor_parallel_size=2,
                                pipeline_parallel_size=2)[(1, 1)]
    assert torch.equal(last["model"]["decoder.layers.0.mlp.linear_fc1.weight"],
                       expected["decoder.layers.2.mlp.linear_fc1.weight"])
    assert torch.equal(last["model"]["output_layer.weight"],
                       expected["embedding.word_embeddings.weight"])


def test_the_converter_round_trips_through_megatron_lm(tmp_path):
    checkpoint = _checkpoint(CONFIGS["llama"])
    ours = str(tmp_path / "ours")
    from megatron_sr.checkpointing.conversion import write_reshaped
    os.makedirs(ours)
    write_reshaped(checkpoint, ours, 1, 1)
    exported, back = tmp_path / "megatron", tmp_path / "back"
    assert checkpoint_convert.main(["--load", ours, "--save", str(exported), "--to-megatron",
                                    "--target-tensor-parallel-size", "2",
                                    "--target-pipeline-parallel-size", "2"]) == 0
    assert checkpoint_convert.main(["--load", str(exported), "--save", str(back),
                                    "--from-megatron", "--target-tensor-parallel-size",
                                    "1"]) == 0
    again = load_full_checkpoint(str(back))
    assert again.iteration == 7 and again.consumed_train_samples == 56
    for name, tensor in checkpoint.model.items():
        assert torch.equal(again.model[name], tensor), name


# ----- megatron-core's own GPTModel reads the exported checkpoint ------------------------------

TOKENS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(5))


def _logits_ours_and_megatron_core(rank, world_size, key, save_dir):
    """Builds our model and megatron-core's GPTModel (local spec, CPU) from the
    same exported checkpoint; returns both logits [b, s, v] on TOKENS."""
    import contextlib

    import torch.nn.functional as F
    from megatron.core import parallel_state as mcore_parallel_state
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_sr import parallel_state
    from megatron_sr.checkpointing import load_model_state
    from megatron_sr.config import ParallelConfig
    from megatron_sr.model import build_model

    config = CONFIGS[key].__class__(**{**CONFIGS[key].__dict__, "params_dtype": torch.float32,
                                       "hidden_dropout": 0.0, "attention_dropout": 0.0})
    _, _, _, full = megatron_lm.import_megatron_lm(save_dir)
    parallel_state.initialize_model_parallel(1)
    try:
        (ours,) = build_model(config, ParallelConfig(), seed=1)
        load_model_state([ours], {k: v.float() for k, v in full.items()}, save_dir)
        ours.eval()
        with torch.no_grad():
            our_logits = ours(TOKENS).float()
    finally:
        parallel_state.destroy_model_parallel()

    torch.cuda.current_device = lambda: "cpu"  # megatron-core allocates on "the" device
    mcore_parallel_state.initialize_model_parallel(1, 1)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.fork = lambda *args, **kwargs: contextlib.nullcontext()
    swiglu = config.activation == "swiglu"
    transformer_config = TransformerConfig(
        num_layers=config.num_layers, hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads, ffn_hidden_size=config.ffn_hidden_size,
        use_cpu_initialization=True, params_dtype=torch.float32,
        add_bias_linear=config.add_bias_linear, add_qkv_bias=config.qkv_bias,
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else F.gelu, normalization=config.normalization,
        layernorm_epsilon=config.layernorm_epsilon, hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False)
    model = GPTModel(transformer_config, get_gpt_layer_local_spec(normalization=config.normalization),
                     vocab_size=config.vocab_size, max_sequence_length=config.seq_length,
                     position_embedding_type=config.position_embedding_type,
                     share_embeddings_and_output_weights=not
                     config.untie_embeddings_and_output_weights,
                     rotary_base=int(config.rotary_base))
    saved = torch.load(os.path.join(save_dir, "iter_0000007", "mp_rank_00",
                                    "model_optim_rng.pt"), weights_only=False)
    result = model.load_state_dict({k: v.float() for k, v in saved["model"].items()},
                                   strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    assert not missing and not result.unexpected_keys, (missing, result.unexpected_keys)
    model.eval()
    causal = torch.triu(torch.ones(1, 1, 8, 8, dtype=torch.bool), diagonal=1)
    with torch.no_grad():
        theirs = model(TOKENS, torch.arange(8).unsqueeze(0).expand(2, 8), causal)
    mcore_parallel_state.destroy_model_parallel()
    return our_logits.numpy(), theirs.float().numpy()


@pytest.mark.slow
@pytest.mark.parametrize("key", CONFIGS)
def test_megatron_core_gpt_model_gives_our_logits(key, tmp_path):
    pytest.importorskip("megatron.core")
    import numpy as np

    from multiprocess import run_ranks

    config = CONFIGS[key]
    save = str(tmp_path / "megatron")
    os.makedirs(save)
    full = {name: tensor * 0.5 for name, tensor in random_full_state(config).items()}
    megatron_lm.export_megatron_lm(full, config, {}, 7, 0, save, tp=1, pp=1)
    ours, theirs = run_ranks(_logits_ours_and_megatron_core, 1, key, save)[0]
    assert ours.shape == theirs.shape == (2, 8, 64)
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-4)
