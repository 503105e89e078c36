"""Sharded initialization: every rank draws only its own slice, and the model
is the same whatever the layout (docs/DESIGN.md "Initialization").

Spec:
- an element's initial value depends only on (seed, parameter name, its index
  in the unsharded tensor): drawing any part of a tensor equals the matching
  part of drawing it whole, to the bit, whatever the chunking;
- the index map of a TP shard (strided SwiGLU fc1 included) is the slicing
  rule of `shard_full_tensor`, without building the full tensor;
- the draws are N(0, 1) (moments and tails);
- TP 1, 2, 4 and PP 2 / 4 (with virtual stages) hold bit-identical weights
  after gathering, in fp32 and bf16, GPT-2 and Llama-style;
- building never creates a tensor larger than the rank's largest local
  parameter (no full weight, bounded temporaries);
- a 7B model builds on the meta device without allocating its weights.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gpt_harness import SEED, full_named_tensors, tiny_config
from multiprocess import run_ranks

from megatron_sr.random import init_key, philox_normal
from megatron_sr.tensor_parallel import shard_element_index, shard_full_tensor

LLAMA = dict(position_embedding_type="rope", normalization="RMSNorm", activation="swiglu",
             ffn_hidden_size=48, add_bias_linear=False, untie_embeddings_and_output_weights=True)


def test_any_part_of_a_tensor_draws_the_same_bits_as_the_whole():
    key = init_key(7, "decoder.layers.0.mlp.linear_fc1.weight")
    whole = philox_normal(torch.arange(100_003), key)
    for start, stop in [(0, 1), (5, 12), (64, 1000), (99_000, 100_003), (1, 100_002)]:
        part = philox_normal(torch.arange(start, stop), key)
        assert torch.equal(part, whole[start:stop])
    strided = torch.arange(3, 100_003, 17)
    assert torch.equal(philox_normal(strided, key), whole[3::17])
    assert not torch.equal(philox_normal(torch.arange(100), init_key(7, "other")), whole[:100])
    assert not torch.equal(philox_normal(torch.arange(100), init_key(8, "decoder.layers.0.mlp."
                                                                        "linear_fc1.weight")),
                           whole[:100])


def test_draws_are_standard_normal():
    z = philox_normal(torch.arange(1 << 20), init_key(0, "w")).numpy()
    n = z.size
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.std() - 1) < 5 / math.sqrt(2 * n)
    assert abs(np.mean(z ** 3)) < 5 * math.sqrt(15 / n)
    assert abs(np.mean(z ** 4) - 3) < 5 * math.sqrt(96 / n)
    tail = np.mean(np.abs(z) > 3)  # 0.0027
    assert 0.0022 < tail < 0.0032
    assert np.all(np.isfinite(z))


@pytest.mark.parametrize("shape,dim,stride", [((12, 5), 0, 1), ((12, 5), 0, 2), ((3, 16), 1, 1),
                                              ((6, 4, 8), 2, 2), ((10,), 0, 1)])
@pytest.mark.parametrize("tp", [1, 2])
def test_shard_element_index_is_the_slicing_rule(shape, dim, stride, tp):
    full = torch.arange(math.prod(shape)).view(shape)
    for tp_rank in range(tp):
        local_shape = list(shape)
        local_shape[dim] //= tp
        param = SimpleNamespace(shape=torch.Size(local_shape), tensor_model_parallel=True,
                                partition_dim=dim, partition_stride=stride, device="cpu")
        expected = shard_full_tensor(full, param, tp_rank, tp)
        assert torch.equal(shard_element_index(param, tp_rank, tp), expected)
        rows = slice(1, 3)
        assert torch.equal(shard_element_index(param, tp_rank, tp, rows), expected[rows])


def _build_and_gather(rank, world_size, layouts):
    from megatron_sr import parallel_state
    from megatron_sr.config import ParallelConfig
    from megatron_sr.model import build_model

    out = {}
    for name, (config, tp, pp, vp) in layouts.items():
        parallel_state.initialize_model_parallel(tp, pp, vp)
        try:
            chunks = build_model(config, ParallelConfig(tensor_model_parallel_size=tp,
                                                        pipeline_model_parallel_size=pp,
                                                        virtual_pipeline_model_parallel_size=vp),
                                 seed=SEED)
            out[name] = full_named_tensors(chunks, "weight")
        finally:
            parallel_state.destroy_model_parallel()
    return out


def _layouts(config):
    return {"tp1": (config, 1, 1, None), "tp2": (config, 2, 1, None),
            "tp4": (config, 4, 1, None), "tp2 pp2": (config, 2, 2, None),
            "pp4": (config, 1, 4, None), "pp2 vp2": (config, 1, 2, 2)}


@pytest.fixture(scope="module")
def gathered():
    cases = {}
    for family, config in {"gpt2": tiny_config(), "llama": tiny_config(**LLAMA),
                           "gpt2 bf16": tiny_config(params_dtype=torch.bfloat16)}.items():
        cases.update({(family, layout): spec for layout, spec in _layouts(config).items()})
    per_rank = run_ranks(_build_and_gather, 4, cases, timeout=300)
    merged = {}
    for key in cases:
        merged[key] = {}
        for result in per_rank:
            merged[key].update(result[key])
    return merged


@pytest.mark.slow  # one 4-rank job building 18 layouts, ~40 s
@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt2 bf16"])
@pytest.mark.parametrize("layout", ["tp2", "tp4", "tp2 pp2", "pp4", "pp2 vp2"])
def test_every_layout_holds_the_same_weights_bit_for_bit(gathered, family, layout):
    reference, other = gathered[(family, "tp1")], gathered[(family, layout)]
    assert reference.keys() == other.keys()
    for name in reference:
        np.testing.assert_array_equal(other[name], reference[name], err_msg=name)


@pytest.mark.slow
def test_weights_are_the_documented_draws(gathered):
    weights = gathered[("gpt2", "tp1")]
    name = "decoder.layers.2.self_attention.linear_qkv.weight"
    expected = (philox_normal(torch.arange(weights[name].size), init_key(SEED, name)) * 0.02).float()
    np.testing.assert_array_equal(weights[name].reshape(-1), expected.numpy())
    assert np.all(weights["decoder.final_layernorm.weight"] == 1.0)
    assert np.all(weights["decoder.layers.0.mlp.linear_fc1.bias"] == 0.0)
    residual = weights["decoder.layers.0.mlp.linear_fc2.weight"]
    assert residual.std() == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.1)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any torch op creates inside the block."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def _largest_tensor_while_building(rank, world_size, chunk_elements):
    from megatron_sr import parallel_state
    from megatron_sr.config import ParallelConfig
    from megatron_sr.model import build_model, parallel_layout

    parallel_layout.INIT_CHUNK_ELEMENTS["cpu"] = chunk_elements
    # Shapes where every full TP-split weight (the smallest: 64 x 64) is larger than
    # any tensor a rank legitimately holds (the largest: its 3 x 64 x 64 / 4 QKV shard),
    # so that building one full weight anywhere shows.
    config = tiny_config(vocab_size=64, num_layers=2, hidden_size=64, ffn_hidden_size=64)
    parallel_state.initialize_model_parallel(4, 1)
    try:
        with _LargestTensor() as mode:
            chunks = build_model(config, ParallelConfig(tensor_model_parallel_size=4), seed=SEED)
        params = [p for chunk in chunks for p in chunk.parameters()]
        return {"largest_created": mode.largest,
                "largest_param": max(p.numel() for p in params),
                "smallest_full_split": min(p.numel() * 4 for p in params
                                           if p.tensor_model_parallel and p.dim() == 2)}
    finally:
        parallel_state.destroy_model_parallel()


def test_building_never_creates_a_full_weight_or_unbounded_temporaries():
    chunk = 64
    for result in run_ranks(_largest_tensor_while_building, 4, chunk):
        # The test can tell them apart: no full split weight fits under the bound below.
        assert result["smallest_full_split"] > max(result["largest_param"], 2 * chunk)
        # Parameters themselves, and per-chunk draws of at most one row more than `chunk`.
        assert result["largest_created"] <= max(result["largest_param"], 2 * chunk)


def _build_7b_on_meta(rank, world_size):
    import resource

    from megatron_sr import parallel_state
    from megatron_sr.config import ModelConfig, ParallelConfig
    from megatron_sr.model import build_model

    config = ModelConfig(num_layers=32, hidden_size=4096, num_attention_heads=32,
                         vocab_size=32000, seq_length=4096, ffn_hidden_size=11008,
                         position_embedding_type="rope", normalization="RMSNorm",
                         activation="swiglu", add_bias_linear=False,
                         untie_embeddings_and_output_weights=True)
    parallel_state.initialize_model_parallel(1, 1)
    try:
        build_model(tiny_config(), ParallelConfig(), seed=SEED, device="meta")  # imports
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        chunks = build_model(config, ParallelConfig(), seed=SEED, device="meta")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"numel": sum(p.numel() for c in chunks for p in c.parameters()),
                "all_meta": all(p.is_meta for c in chunks for p in c.parameters()),
                "rss_growth": after - before}
    finally:
        parallel_state.destroy_model_parallel()


def test_a_7b_model_builds_on_meta_without_allocating_it():
    (result,) = run_ranks(_build_7b_on_meta, 1)
    assert result["numel"] > 6.7e9 and result["all_meta"]
    assert result["rss_growth"] < 64 * 2 ** 20  # vs 13.5 GB of bf16 weights


@pytest.mark.gpu
def test_a_gpu_draws_the_cpus_bits():
    index = torch.arange(3, 1_000_003, 7)
    key = init_key(SEED, "decoder.layers.1.mlp.linear_fc2.weight")
    on_gpu = philox_normal(index.cuda(), key).cpu()
    assert torch.equal(on_gpu, philox_normal(index, key))
