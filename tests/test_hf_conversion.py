"""Reshaping the full state dict over TP/PP ranks, and Hugging Face export.

One run of 4 Gloo ranks builds each model (fp32, same seed) at TP=1 PP=1
(every rank: its parameters are the full state dict, and its logits the
reference) and at TP=2 x PP=2, with and without virtual stages, and returns
what each rank holds. The offline `split_state_dict` must produce exactly
those rank state dicts (so the name and split tables agree with the model),
`merge_state_dicts` must invert it bit-exactly, and the exported
transformers model must compute the same logits as ours (whose biases are
made random first: the model starts them at zero).
"""
import dataclasses
import json

import numpy as np
import pytest
import torch

from bitwise import assert_same_bits
from gpt_harness import SEED, tiny_config
from multiprocess import run_ranks

from megatron_sr import parallel_state
from megatron_sr.config import ParallelConfig
from megatron_sr.model import build_model, named_parameters_global
from megatron_sr.model.hf_conversion import (UnsupportedArchitectureError, hf_config_kwargs,
                                              save_hf_model)
from megatron_sr.model.state_dict_layout import (
    global_parameter_names,
    merge_state_dicts,
    split_state_dict,
    tensor_parallel_split,
)

LLAMA = dict(position_embedding_type="rope", normalization="RMSNorm", activation="swiglu",
             ffn_hidden_size=48, add_bias_linear=False, untie_embeddings_and_output_weights=True)
CONFIGS = {
    "gpt2": tiny_config(init_method_std=0.2),
    "gpt2_untied_no_bias": tiny_config(init_method_std=0.2, add_bias_linear=False,
                                       untie_embeddings_and_output_weights=True,
                                       layernorm_epsilon=1e-6),
    "llama": tiny_config(init_method_std=0.2, **LLAMA),
    "llama_tied_bias": tiny_config(init_method_std=0.2, rotary_base=500.0,
                                   **(LLAMA | dict(add_bias_linear=True,
                                                   untie_embeddings_and_output_weights=False))),
    # Llama-3 style: grouped-query attention (4 heads, 2 key/value groups), head dim 16 != h / heads,
    # RoPE with Llama-3 frequency scaling.
    "llama_gqa": tiny_config(init_method_std=0.2, num_query_groups=2, kv_channels=16,
                             rotary_base=500000.0, use_rope_scaling=True, **LLAMA),
    # Qwen2 style: biases on q, k, v only (--disable-bias-linear --add-qkv-bias), with GQA.
    "qwen2_gqa": tiny_config(init_method_std=0.2, num_query_groups=2, add_qkv_bias=True,
                             rotary_base=1000000.0, **LLAMA),
}
LAYOUTS = {"tp2_pp2": (2, 2, None), "tp2_pp2_vp2": (2, 2, 2)}
TOKENS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(11))


def _numpy_state(chunks):
    return {name: param.detach().numpy().copy() for name, param in named_parameters_global(chunks)}


def _randomize_biases(model):
    """Biases start at zero; random ones make the export show their order."""
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=generator))


def _build_all(rank, world_size):
    out = {}
    for key, config in CONFIGS.items():
        parallel_state.initialize_model_parallel(1)
        try:
            (model,) = build_model(config, ParallelConfig(), seed=SEED)
            out[key, "full"] = _numpy_state([model])  # as built: what the TP layouts hold
            model.eval()
            _randomize_biases(model)
            with torch.no_grad():
                out[key, "logits"] = model(TOKENS).numpy()
            out[key, "exported"] = _numpy_state([model])  # random biases, `logits`' weights
        finally:
            parallel_state.destroy_model_parallel()
        for layout, (tp, pp, vp) in LAYOUTS.items():
            parallel_state.initialize_model_parallel(tp, pp, vp)
            try:
                chunks = build_model(config, ParallelConfig(
                    tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                    virtual_pipeline_model_parallel_size=vp), seed=SEED)
                coordinates = (parallel_state.get_tensor_model_parallel_rank(),
                               parallel_state.get_pipeline_model_parallel_rank())
                out[key, layout] = (coordinates, _numpy_state(chunks))
                out[key, layout, "splits"] = {
                    name: (param.partition_dim, param.partition_stride)
                    if param.tensor_model_parallel else None
                    for name, param in named_parameters_global(chunks)}
            finally:
                parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def built():
    return run_ranks(_build_all, 4)


def _torch(state):
    return {name: torch.from_numpy(array) for name, array in state.items()}


def _assert_bit_equal(a, b):
    assert list(a) == list(b)
    for name in a:
        assert_same_bits(a[name], b[name], name)


@pytest.mark.parametrize("key", CONFIGS)
def test_names_and_splits_match_the_built_model(built, key):
    config = CONFIGS[key]
    assert list(built[0][key, "full"]) == global_parameter_names(config)
    for rank in built:
        for layout in LAYOUTS:
            for name, split in rank[key, layout, "splits"].items():
                expected = tensor_parallel_split(name, config)
                assert split == (None if expected is None
                                 else (expected.partition_dim, expected.partition_stride)), name


@pytest.mark.parametrize("key", CONFIGS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_split_gives_what_each_rank_holds_and_merge_inverts_it(built, key, layout):
    config = CONFIGS[key]
    tp, pp, vp = LAYOUTS[layout]
    full = _torch(built[0][key, "full"])
    split = split_state_dict(full, config, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                             virtual_pipeline_parallel_size=vp)
    held = {coordinates: _torch(state) for coordinates, state in (r[key, layout] for r in built)}
    assert set(split) == set(held)
    for coordinates in held:
        _assert_bit_equal(split[coordinates], held[coordinates])
    _assert_bit_equal(merge_state_dicts(held, config, virtual_pipeline_parallel_size=vp), full)


@pytest.mark.parametrize("key", CONFIGS)
def test_reshape_round_trips_bit_exactly_in_bf16(built, key):
    config = CONFIGS[key]
    full = {name: tensor.to(torch.bfloat16)
            for name, tensor in _torch(built[0][key, "full"]).items()}
    tp2_pp2 = split_state_dict(full, config, tensor_parallel_size=2, pipeline_parallel_size=2)
    tp_max = min(4, config.num_query_groups)  # TP splits the key/value groups
    tp4 = split_state_dict(merge_state_dicts(tp2_pp2, config), config,
                           tensor_parallel_size=tp_max, pipeline_parallel_size=1)
    pp4 = split_state_dict(merge_state_dicts(tp4, config), config,
                           tensor_parallel_size=1, pipeline_parallel_size=4)
    _assert_bit_equal(merge_state_dicts(pp4, config), full)
    for state in tp4.values():  # each shard owns its storage: saving it saves no more
        for tensor in state.values():
            assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


def test_reshape_errors_name_the_problem(built):
    config = CONFIGS["gpt2"]
    full = _torch(built[0]["gpt2", "full"])
    ranks = split_state_dict(full, config, tensor_parallel_size=2, pipeline_parallel_size=2)
    with pytest.raises(ValueError, match=r"--tensor-model-parallel-size \(3\)"):
        split_state_dict(full, config, tensor_parallel_size=3, pipeline_parallel_size=1)
    with pytest.raises(ValueError, match=r"missing \['decoder.final_layernorm.bias'\]"):
        split_state_dict({k: v for k, v in full.items() if k != "decoder.final_layernorm.bias"},
                         config, tensor_parallel_size=1, pipeline_parallel_size=1)
    del ranks[(1, 0)]
    with pytest.raises(ValueError, match=r"no state dict for \(tp_rank, pp_rank\) \[\(1, 0\)\]"):
        merge_state_dicts(ranks, config)
    ranks = split_state_dict(full, config, tensor_parallel_size=2, pipeline_parallel_size=2)
    del ranks[(0, 1)]["decoder.layers.3.mlp.linear_fc2.weight"]
    with pytest.raises(ValueError, match=r"\(tp_rank, pp_rank\) = \(0, 1\).*linear_fc2"):
        merge_state_dicts(ranks, config)


@pytest.mark.parametrize("key", CONFIGS)
def test_hf_export_computes_our_logits(built, key, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = CONFIGS[key]
    family = save_hf_model(_torch(built[0][key, "exported"]), config, tmp_path)
    assert family == key.split("_")[0]
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "model.safetensors"}
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    model.eval()
    with torch.no_grad():
        theirs = model(TOKENS).logits.numpy()
    np.testing.assert_allclose(theirs, built[0][key, "logits"], rtol=0, atol=1e-5)


def test_hf_export_in_bf16_with_tokenizer_ids(built, tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    full = _torch(built[0]["llama", "full"])
    save_hf_model(full, CONFIGS["llama"], tmp_path, dtype=torch.bfloat16,
                  extra_config={"eos_token_id": 3})
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert (hf_config["dtype"], hf_config["eos_token_id"], hf_config["bos_token_id"]) == (
        "bfloat16", 3, None)
    weights = safetensors.load_file(tmp_path / "model.safetensors")
    assert_same_bits(weights["model.layers.0.mlp.down_proj.weight"],
                     full["decoder.layers.0.mlp.linear_fc2.weight"].to(torch.bfloat16))


@pytest.mark.parametrize("overrides, flag", [
    (dict(position_embedding_type="rope"), "--position-embedding-type"),
    (dict(normalization="RMSNorm"), "--normalization"),
    (dict(LLAMA, activation="gelu"), "--swiglu"),
    (dict(LLAMA, qk_layernorm=True), "--qk-layernorm"),
    (dict(LLAMA, rotary_percent=0.5), "--rotary-percent"),
    (dict(num_query_groups=2), "--group-query-attention"),
])
def test_unsupported_architecture_names_the_flag(overrides, flag):
    config = dataclasses.replace(CONFIGS["gpt2"], **overrides)
    with pytest.raises(UnsupportedArchitectureError, match=flag):
        hf_config_kwargs(config)


# ----- import: Hugging Face -> ours ------------------------------------------------------------

_ARCHITECTURE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                        "ffn_hidden_size", "max_position_embeddings", "position_embedding_type",
                        "rotary_base", "normalization", "layernorm_epsilon", "activation",
                        "add_bias_linear", "add_qkv_bias", "untie_embeddings_and_output_weights")


@pytest.mark.parametrize("key", CONFIGS)
def test_hf_import_round_trips_bit_exactly(built, key, tmp_path):
    """ours -> HF -> ours gives the same tensors, and HF -> ours -> HF the same
    HF tensors as the model directory holds (fp32, vocabulary not padded)."""
    safetensors = pytest.importorskip("safetensors.torch")
    from megatron_sr.model.hf_conversion import load_hf_model, to_hf_state_dict

    config = CONFIGS[key]
    full = _torch(built[0][key, "exported"])
    save_hf_model(full, config, tmp_path)
    family, imported_config, imported, hf_vocab = load_hf_model(
        tmp_path, params_dtype=torch.float32, make_vocab_size_divisible_by=1)
    assert family == key.split("_")[0] and hf_vocab == config.vocab_size
    # GPT-2 always has linear biases: a model without them exports (and imports) zeros.
    gains_biases = family == "gpt2" and not config.add_bias_linear
    for field in _ARCHITECTURE_FIELDS:
        expected = True if field == "add_bias_linear" and gains_biases else getattr(config, field)
        assert getattr(imported_config, field) == expected, field
    zero_biases = {name for name in imported if name not in full}
    assert all(name.endswith(".bias") and not imported[name].any() for name in zero_biases)
    assert bool(zero_biases) == gains_biases
    _assert_bit_equal({name: t for name, t in imported.items() if name in full}, full)
    hf_files = safetensors.load_file(tmp_path / "model.safetensors")
    _, again = to_hf_state_dict(imported, imported_config)
    assert set(again) == set(hf_files)
    for name, tensor in hf_files.items():
        assert torch.equal(again[name], tensor), name


def test_hf_import_pads_the_vocabulary_and_refuses_what_it_cannot_express(built, tmp_path):
    pytest.importorskip("transformers")
    from megatron_sr.model.hf_conversion import load_hf_model

    config = CONFIGS["llama"]
    full = _torch(built[0]["llama", "full"])
    save_hf_model(full, config, tmp_path)
    _, padded_config, padded, _ = load_hf_model(tmp_path, make_vocab_size_divisible_by=48)
    assert padded_config.vocab_size == 96 and padded_config.params_dtype == torch.bfloat16
    embedding = padded["embedding.word_embeddings.weight"]
    assert embedding.shape[0] == 96 and not embedding[64:].any()
    assert torch.equal(embedding[:64], full["embedding.word_embeddings.weight"].bfloat16())
    hf_config = json.loads((tmp_path / "config.json").read_text())
    hf_config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    with pytest.raises(UnsupportedArchitectureError, match="rope_type 'yarn'"):
        load_hf_model(tmp_path)


@pytest.mark.slow
def test_continued_pretraining_starts_from_imported_hf_weights(built, tmp_path, capsys):
    """tools/checkpoint_convert.py --from-hf writes a checkpoint the job loads
    with --finetune: the job's parameters are the HF model's."""
    import os
    import sys

    from job_harness import run_pretrain, tiny_gpt_argv

    pytest.importorskip("transformers")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
    import checkpoint_convert

    from megatron_sr.checkpointing.conversion import load_full_checkpoint

    full = _torch(built[0]["llama", "full"])
    save_hf_model(full, CONFIGS["llama"], tmp_path / "hf")
    out = str(tmp_path / "imported")
    assert checkpoint_convert.main(["--load", str(tmp_path / "hf"), "--save", out, "--from-hf",
                                    "--make-vocab-size-divisible-by", "16",
                                    "--params-dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    assert "--swiglu --disable-bias-linear --untie-embeddings-and-output-weights" in printed
    _assert_bit_equal(load_full_checkpoint(out).model, full)
    argv = tiny_gpt_argv(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=8,
                         vocab_size=63, position_embedding_type="rope", normalization="RMSNorm",
                         swiglu=True, ffn_hidden_size=48, disable_bias_linear=True,
                         untie_embeddings_and_output_weights=True, precision="fp32",
                         hidden_dropout=0.0, attention_dropout=0.0, train_iters=1,
                         global_batch_size=2, load=out, finetune=True)
    result = run_pretrain(1, argv)[0]
    for name, value in result["loaded_params"].items():
        np.testing.assert_array_equal(value, full[name].numpy(), name)
    assert np.isfinite(result["reports"][0]["loss"])


def test_hf_import_takes_the_directorys_tokenizer_or_says_it_has_none(built, tmp_path, capsys):
    """vocab.json + merges.txt, tokenizer.model or tokenizer.json become the
    checkpoint's tokenizer; with none a notice names the directory (the
    checkpoint gets a NullTokenizer); half a GPT-2 pair is refused by name."""
    pytest.importorskip("transformers")
    from megatron_sr.checkpointing.conversion import import_hugging_face
    from megatron_sr.checkpointing import CheckpointError

    save_hf_model(_torch(built[0]["llama", "full"]), CONFIGS["llama"], tmp_path)
    bare = import_hugging_face(str(tmp_path), make_vocab_size_divisible_by=1)
    assert bare.description["data"]["tokenizer_type"] == "NullTokenizer"
    assert f"{tmp_path} holds no tokenizer files" in capsys.readouterr().out
    (tmp_path / "tokenizer.json").write_text("{}")
    with_json = import_hugging_face(str(tmp_path), make_vocab_size_divisible_by=1)
    assert with_json.description["data"]["tokenizer_type"] == "HuggingFaceTokenizer"
    assert with_json.description["data"]["tokenizer_model"].endswith("tokenizer.json")
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(CheckpointError, match="has vocab.json but no merges.txt"):
        import_hugging_face(str(tmp_path), make_vocab_size_divisible_by=1)


def test_qwen2_import_refuses_sliding_window_attention(built, tmp_path):
    pytest.importorskip("transformers")
    from megatron_sr.model.hf_conversion import load_hf_model

    save_hf_model(_torch(built[0]["qwen2_gqa", "exported"]), CONFIGS["qwen2_gqa"], tmp_path)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert hf_config["model_type"] == "qwen2"
    hf_config.update(use_sliding_window=True, sliding_window=4)
    hf_config["layer_types"][-1] = "sliding_attention"
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    with pytest.raises(UnsupportedArchitectureError, match="sliding-window"):
        load_hf_model(tmp_path)
