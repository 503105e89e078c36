"""The whole GPT is the same function on every TP/PP layout.

One run of 4 Gloo ranks trains every layout two SGD steps on the same
batches and compares with the single-rank model (layout 1x1, which every rank
also computes): losses of both steps, the last step's gradient of
every parameter (by global name, TP slices gathered), the weights after the
steps, and that the tied embedding's two copies (first and last stage) stay
bit-identical.

fp32: within 1e-5 relative (only summation order differs: TP splits matmul
reductions, sequence parallelism reorders the norm-gradient sums).
bf16: each split rounds partial sums to bf16 at other points (row-parallel
partial products, TP all-reduces of bf16 activations, gradient sums), i.e.
different roundings of size 2^-8 relative compounded through 4 layers and
backward; losses agree within 1% and gradients within 5% relative norm.
"""
import numpy as np
import pytest
import torch

from gpt_harness import merge_ranks, relative_error, run_layout, tiny_config, with_dtype
from multiprocess import run_ranks

from megatron_sr.model import flops_per_token

GPT2_STYLE = tiny_config()  # learned positions, LayerNorm, GeLU, biases, tied embeddings
LLAMA_STYLE = tiny_config(position_embedding_type="rope", normalization="RMSNorm",
                          activation="swiglu", ffn_hidden_size=48, add_bias_linear=False,
                          untie_embeddings_and_output_weights=True)
# Grouped-query attention (4 heads, 2 key/value groups: TP 2 holds one group per rank)
# with every attention option a Llama-class model may use.
LLAMA_GQA = tiny_config(position_embedding_type="rope", normalization="RMSNorm",
                        activation="swiglu", ffn_hidden_size=48, add_bias_linear=False,
                        untie_embeddings_and_output_weights=True, num_query_groups=2,
                        kv_channels=16, rotary_percent=0.5, rotary_interleaved=True,
                        use_rope_scaling=True, rope_scaling_factor=4.0, qk_layernorm=True,
                        apply_layernorm_1p=True, recompute_granularity="full",
                        recompute_method="uniform", recompute_num_layers=2)
FP32_CASES = {
    ("gpt2", "tp2"): (GPT2_STYLE, dict(tp=2)),
    ("gpt2", "pp2"): (GPT2_STYLE, dict(pp=2)),
    ("gpt2", "tp2_pp2"): (GPT2_STYLE, dict(tp=2, pp=2)),
    ("gpt2", "pp2_vp2"): (GPT2_STYLE, dict(pp=2, vp=2)),
    ("gpt2", "tp2_sp"): (GPT2_STYLE, dict(tp=2, sp=True)),
    # finalize_model_grads on the optimizer's `main_grad` instead of `.grad`
    ("gpt2", "tp2_pp2_sp_main_grad"): (GPT2_STYLE, dict(tp=2, pp=2, sp=True, main_grad=True)),
    ("llama", "tp4_sp"): (LLAMA_STYLE, dict(tp=4, sp=True)),
    ("llama", "tp2_pp2_vp2_sp"): (LLAMA_STYLE, dict(tp=2, pp=2, vp=2, sp=True)),
    ("llama", "pp4"): (LLAMA_STYLE, dict(pp=4)),
    ("gqa", "tp2_sp"): (LLAMA_GQA, dict(tp=2, sp=True)),
    ("gqa", "tp2_pp2"): (LLAMA_GQA, dict(tp=2, pp=2)),
}
BF16_CASES = {("gpt2_bf16", "tp2_pp2"): dict(tp=2, pp=2), ("gpt2_bf16", "tp2_sp"): dict(tp=2, sp=True)}
REFERENCES = {"gpt2": GPT2_STYLE, "llama": LLAMA_STYLE, "gqa": LLAMA_GQA,
              "gpt2_bf16": with_dtype(GPT2_STYLE, torch.bfloat16)}


def _all_layouts(rank, world_size):
    out = {(family, "reference"): run_layout(config, steps=2)
           for family, config in REFERENCES.items()}
    for key, (config, layout) in FP32_CASES.items():
        out[key] = run_layout(config, steps=2, **layout)
    for key, layout in BF16_CASES.items():
        out[key] = run_layout(REFERENCES["gpt2_bf16"], steps=2, **layout)
    return out


@pytest.fixture(scope="module")
def layouts():
    per_rank = run_ranks(_all_layouts, 4)
    return {key: merge_ranks([r[key] for r in per_rank]) | {"per_rank": [r[key] for r in per_rank]}
            for key in per_rank[0]}


def _compare(result, reference, loss_rtol, tensor_rtol):
    assert set(result["grads"]) == set(reference["grads"])  # same global names
    np.testing.assert_allclose(result["losses"], reference["losses"], rtol=loss_rtol)
    for what in ("grads", "weights"):
        errors = {name: relative_error(result[what][name], reference[what][name])
                  for name in reference[what]}
        worst = max(errors, key=errors.get)
        assert errors[worst] <= tensor_rtol, f"{what} of {worst}: relative error {errors[worst]:.2e}"


@pytest.mark.parametrize("family, layout", list(FP32_CASES))
def test_fp32_layout_matches_single_rank(layouts, family, layout):
    _compare(layouts[(family, layout)], layouts[(family, "reference")], 1e-5, 1e-5)


@pytest.mark.parametrize("family, layout", list(BF16_CASES))
def test_bf16_layout_close_to_single_rank(layouts, family, layout):
    _compare(layouts[(family, layout)], layouts[(family, "reference")], 1e-2, 5e-2)


def test_global_names_are_layout_independent(layouts):
    names = set(layouts[("gpt2", "reference")]["grads"])
    assert "decoder.layers.3.mlp.linear_fc1.weight" in names
    assert {"embedding.word_embeddings.weight", "embedding.position_embeddings.weight",
            "decoder.final_layernorm.weight"} <= names
    assert "output_layer.weight" not in names  # tied
    llama = set(layouts[("llama", "reference")]["grads"])
    assert "output_layer.weight" in llama and "embedding.position_embeddings.weight" not in llama
    # Interleaved: pipeline rank 0 holds layers 0 and 2, rank 1 layers 1 and 3.
    per_rank = layouts[("llama", "tp2_pp2_vp2_sp")]["per_rank"]
    layers_of = [{int(n.split(".")[2]) for n in r["grads"] if n.startswith("decoder.layers.")}
                 for r in per_rank]
    assert [layers_of[r] for r in (0, 2)] == [{0, 2}, {1, 3}]


@pytest.mark.parametrize("layout", ["pp2", "tp2_pp2", "pp2_vp2"])
def test_tied_embedding_copies_stay_identical(layouts, layout):
    # With 4 ranks and PP=2, rank r (first stage) and rank r + 2 (last stage)
    # hold the same TP slice of the word embedding and its output-layer copy.
    per_rank = layouts[("gpt2", layout)]["per_rank"]
    for first in (0, 1):
        last = first + 2
        assert (per_rank[first]["pp_rank"], per_rank[last]["pp_rank"]) == (0, 1)
        name = "embedding.word_embeddings.weight"
        assert np.array_equal(per_rank[first]["tied_copies"][name],
                              per_rank[last]["tied_copies"][name])


@pytest.mark.parametrize("family, layout", list(FP32_CASES))
def test_unique_parameters_add_up_to_the_model(layouts, family, layout):
    one_replica = [r for r in layouts[(family, layout)]["per_rank"] if r["dp_rank"] == 0]
    total = sum(w.size for w in layouts[(family, "reference")]["weights"].values())
    assert sum(r["unique_numel"] for r in one_replica) == total


def test_flops_per_token_counts_the_matmuls():
    c = tiny_config(recompute_granularity=None)
    h, f, s, v, layers = 32, 128, 8, 64, 4
    forward = 2 * (layers * (4 * h * h + 2 * h * f + 2 * s * h) + h * v)
    assert flops_per_token(c, training=False) == forward
    assert flops_per_token(c) == 3 * forward
    full = tiny_config(recompute_granularity="full")
    assert flops_per_token(full) == 3 * forward + forward - 2 * h * v


def test_flops_per_token_with_grouped_query_attention():
    # 4 heads of 16 features, 2 key/value groups: qkv (4 + 2 x 2) x 16 = 128 rows, proj 64 -> 32.
    c = tiny_config(num_query_groups=2, kv_channels=16, activation="swiglu", ffn_hidden_size=48)
    h, f, s, v, layers, qkv, q = 32, 48, 8, 64, 4, 128, 64
    forward = 2 * (layers * (h * qkv + q * h + 3 * h * f + 2 * s * q) + h * v)
    assert flops_per_token(c, training=False) == forward
    block = tiny_config(recompute_granularity="full", recompute_method="block",
                        recompute_num_layers=1)
    assert flops_per_token(block) == flops_per_token(tiny_config()) + (
        flops_per_token(tiny_config(num_layers=1), training=False) - 2 * h * v)
