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
from dataclasses import replace

import numpy as np
import pytest
import torch

from bitwise import assert_same_bits
from gpt_harness import make_batches, merge_ranks, relative_error, run_layout, tiny_config, with_dtype
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
# Qwen2 style: biases on q, k, v only (--disable-bias-linear --add-qkv-bias), with GQA.
QWEN_STYLE = tiny_config(position_embedding_type="rope", normalization="RMSNorm",
                         activation="swiglu", ffn_hidden_size=48, add_bias_linear=False,
                         add_qkv_bias=True, num_query_groups=2,
                         untie_embeddings_and_output_weights=True)
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
    ("qwen", "tp2_sp"): (QWEN_STYLE, dict(tp=2, sp=True)),
}
BF16_CASES = {("gpt2_bf16", "tp2_pp2"): dict(tp=2, pp=2), ("gpt2_bf16", "tp2_sp"): dict(tp=2, sp=True)}
REFERENCES = {"gpt2": GPT2_STYLE, "llama": LLAMA_STYLE, "gqa": LLAMA_GQA, "qwen": QWEN_STYLE,
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
    qwen = layouts[("qwen", "reference")]
    biases = {name for name in qwen["grads"] if name.endswith(".bias")}
    assert biases == {f"decoder.layers.{i}.self_attention.linear_qkv.bias" for i in range(4)}
    assert all(np.abs(qwen["grads"][name]).max() > 0 for name in biases)  # they do learn
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
        assert_same_bits(per_rank[first]["tied_copies"][name], per_rank[last]["tied_copies"][name],
                         name)


@pytest.mark.parametrize("family, layout", list(FP32_CASES))
def test_unique_parameters_add_up_to_the_model(layouts, family, layout):
    one_replica = [r for r in layouts[(family, layout)]["per_rank"] if r["dp_rank"] == 0]
    total = sum(w.size for w in layouts[(family, "reference")]["weights"].values())
    assert sum(r["unique_numel"] for r in one_replica) == total


def _counted_flops_per_token(rank, world_size, configs):
    """For each config, PyTorch's FLOP counter over the real single-rank model:
    (forward, forward + backward) FLOPs per token of one micro-batch. Attention
    runs on the math backend, as plain matmuls that the counter sees (a fused
    kernel's backward also recomputes q k^T, which the convention leaves out).
    Full recomputation reruns the whole layer, as the convention counts it: by
    default torch's checkpoint stops early and skips the layer's last matmul
    (linear_fc2), whose output the backward does not need."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.checkpoint import set_checkpoint_early_stop
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_sr import parallel_state
    from megatron_sr.config import ParallelConfig
    from megatron_sr.model import build_model

    parallel_state.initialize_model_parallel(1, 1, None)
    try:
        out = []
        for config in configs:
            (model,) = build_model(config, ParallelConfig(), seed=1234)
            tokens, labels = make_batches(config, 1, 2)[0]
            counts = []
            for training in (False, True):
                with sdpa_kernel(SDPBackend.MATH), set_checkpoint_early_stop(False), \
                        FlopCounterMode(display=False) as counter:
                    loss = model(tokens, labels=labels).mean()
                    if training:
                        loss.backward()
                counts.append(counter.get_total_flops() / tokens.numel())
            out.append(tuple(counts))
        return out
    finally:
        parallel_state.destroy_model_parallel()


def test_flops_per_token_is_what_a_flop_counter_counts():
    """`flops_per_token` against torch.utils.flop_counter over the model's own
    forward and backward: GeLU and SwiGLU MLPs, tied and untied output layer,
    grouped-query attention with --kv-channels != h / heads, full
    recomputation (one more forward of the layers in the backward)."""
    configs = [tiny_config(recompute_granularity=None), LLAMA_STYLE,
               tiny_config(recompute_granularity="full"),
               replace(LLAMA_STYLE, recompute_granularity="full"),
               replace(LLAMA_GQA, recompute_granularity=None, recompute_method=None,
                       recompute_num_layers=None), LLAMA_GQA]
    counted = run_ranks(_counted_flops_per_token, 1, configs)[0]
    for config, (forward, training) in zip(configs, counted):
        assert flops_per_token(config, training=False) == forward, config
        assert flops_per_token(config) == training, config


def test_block_recompute_adds_the_forward_of_its_layers():
    h, v = 32, 64
    block = tiny_config(recompute_granularity="full", recompute_method="block",
                        recompute_num_layers=1)
    assert flops_per_token(block) == flops_per_token(tiny_config()) + (
        flops_per_token(tiny_config(num_layers=1), training=False) - 2 * h * v)
