"""Generation: the KV cache, sampling, and TP-invariance of the tokens.

One run of 2 Gloo ranks builds each model family (fp32, same seed) at TP=1
(on both ranks, data-parallel) and at TP=2, and generates from prompts of
different lengths, greedy and sampled, with and without the KV cache. The
model is the same function at every TP size and the cached path computes the
same logits (to fp32 rounding) as rerunning the prefix, so the tokens match.
"""
import pytest
import torch

from gpt_harness import SEED, tiny_config
from multiprocess import run_ranks

from megatron_sr import parallel_state
from megatron_sr.config import ParallelConfig
from megatron_sr.inference import generate, sample_next_tokens
from megatron_sr.model import KVCache, build_model
from megatron_sr.tensor_parallel import gather_from_tensor_model_parallel_region

FAMILIES = {
    "gpt2": tiny_config(max_position_embeddings=32, init_method_std=0.2),
    "llama": tiny_config(position_embedding_type="rope", normalization="RMSNorm",
                         activation="swiglu", ffn_hidden_size=48, add_bias_linear=False,
                         untie_embeddings_and_output_weights=True, init_method_std=0.2),
}
PROMPTS = [[5, 17, 3, 40, 8], [9, 1, 33]]
NEW_TOKENS = 12
SAMPLING = dict(greedy=False, temperature=0.8, top_k=20, top_p=0.9, seed=7)


def _cached_vs_full_logits(model, tokens):
    """Max |difference| of the logits of feeding `tokens` at once and feeding
    them as a 3-token prefix then one token at a time into a KVCache."""
    full = gather_from_tensor_model_parallel_region(model(tokens))
    cache = KVCache(tokens.shape[1])
    pieces = [model(tokens[:, :3], kv_cache=cache)]
    pieces += [model(tokens[:, i:i + 1], kv_cache=cache) for i in range(3, tokens.shape[1])]
    incremental = gather_from_tensor_model_parallel_region(torch.cat(pieces, dim=1))
    return (full - incremental).abs().max().item()


def _generate_all(rank, world_size):
    out = {}
    for family, config in FAMILIES.items():
        for tp in (1, 2):
            parallel_state.initialize_model_parallel(tp)
            try:
                (model,) = build_model(config, ParallelConfig(tensor_model_parallel_size=tp),
                                       seed=SEED)
                model.eval()
                with torch.no_grad():
                    tokens = torch.randint(0, config.vocab_size, (2, 10),
                                           generator=torch.Generator().manual_seed(3))
                    out[family, tp, "logits_diff"] = _cached_vs_full_logits(model, tokens)
                for use_cache in (True, False):
                    out[family, tp, "greedy", use_cache] = generate(
                        [model], PROMPTS, NEW_TOKENS, greedy=True, use_cache=use_cache)
                    out[family, tp, "sampled", use_cache] = generate(
                        [model], PROMPTS, NEW_TOKENS, use_cache=use_cache, **SAMPLING)
                greedy = out[family, tp, "greedy", True]
                eod = greedy[0][len(PROMPTS[0]) + 2]
                out[family, tp, "eod", eod] = generate([model], PROMPTS, NEW_TOKENS, greedy=True,
                                                      eod=eod)
                out[family, tp, "vocab_limited"] = generate(
                    [model], PROMPTS, NEW_TOKENS, greedy=True, vocab_size=10)
                try:
                    generate([model], PROMPTS, 40, greedy=True)
                    out[family, tp, "too_long"] = None
                except ValueError as error:
                    out[family, tp, "too_long"] = str(error)
            finally:
                parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_generate_all, 2)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tp", [1, 2])
def test_kv_cache_logits_match_full_forward(ranks, family, tp):
    assert ranks[0][family, tp, "logits_diff"] < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_kv_cache_and_no_cache_give_the_same_tokens(ranks, family, mode):
    for tp in (1, 2):
        assert ranks[0][family, tp, mode, True] == ranks[0][family, tp, mode, False]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_tp1_and_tp2_generate_the_same_tokens_on_every_rank(ranks, family, mode):
    reference = ranks[0][family, 1, mode, True]
    for rank in ranks:
        assert rank[family, 2, mode, True] == reference
    assert [len(row) for row in reference] == [len(p) + NEW_TOKENS for p in PROMPTS]
    assert [row[:len(p)] for row, p in zip(reference, PROMPTS)] == PROMPTS
    generated = {token for row, p in zip(reference, PROMPTS) for token in row[len(p):]}
    assert len(generated) > 2  # the tiny model does not just repeat one token


@pytest.mark.parametrize("family", FAMILIES)
def test_a_row_stops_after_eod_and_padded_ids_are_never_chosen(ranks, family):
    (eod,) = [key[3] for key in ranks[0] if key[:3] == (family, 1, "eod")]
    greedy = ranks[0][family, 1, "greedy", True]
    stopped = ranks[0][family, 1, "eod", eod]
    for row, full, prompt in zip(stopped, greedy, PROMPTS):
        generated = full[len(prompt):]
        end = len(prompt) + generated.index(eod) + 1 if eod in generated else len(full)
        assert row == full[:end]
    limited = ranks[0][family, 1, "vocab_limited"]
    assert all(token < 10 for row, p in zip(limited, PROMPTS) for token in row[len(p):])


def test_too_long_a_generation_for_learned_positions_names_the_flag(ranks):
    assert "--max-position-embeddings 32" in ranks[0]["gpt2", 1, "too_long"]
    assert ranks[0]["llama", 1, "too_long"] is None  # RoPE has no position table


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0]]).repeat(2000, 1)
    draw = dict(temperature=1.0)
    gen = torch.Generator().manual_seed(0)
    assert sample_next_tokens(logits[:1], gen, greedy=True).tolist() == [1]
    top2 = sample_next_tokens(logits, gen, greedy=False, top_k=2, **draw)
    assert set(top2.tolist()) == {1, 2}
    # probabilities 0.64, 0.24, 0.09, ...: top_p 0.8 keeps the two tokens reaching 0.8
    nucleus = sample_next_tokens(logits, gen, greedy=False, top_p=0.8, **draw)
    assert set(nucleus.tolist()) == {1, 2}
    assert set(sample_next_tokens(logits, gen, greedy=False, top_p=0.1, **draw).tolist()) == {1}
    first = sample_next_tokens(logits, torch.Generator().manual_seed(5), greedy=False, **draw)
    again = sample_next_tokens(logits, torch.Generator().manual_seed(5), greedy=False, **draw)
    assert torch.equal(first, again) and len(set(first.tolist())) == 5
    for temperature in (0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="--temperature"):
            sample_next_tokens(logits, gen, greedy=False, temperature=temperature)
    for top_p in (0.0, float("nan")):
        with pytest.raises(ValueError, match="--top-p"):
            sample_next_tokens(logits, gen, greedy=False, top_p=top_p)
