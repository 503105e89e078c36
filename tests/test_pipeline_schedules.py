"""Pipeline schedules accumulate the same gradients as plain gradient
accumulation, and activation recomputation changes no gradient.

One run of 4 Gloo ranks: 1F1B with PP=4 (more micro-batches than stages,
and fewer), interleaved 1F1B with PP=4 x 2 virtual stages (M == PP: all
warm-up; M = 2 PP: a steady phase) and PP=2 x 2 (with data parallelism),
forward-only passes, all against no pipelining (fp32, within 1e-5 relative).
Recomputation (full, selective) is compared with none on TP=2 x PP=2 with
sequence parallelism and dropout on, so the RNG streams must be replayed exactly.
A stage releases each output it sent to the next stage (1F1B and interleaved,
PP=2): by its backward the output holds one element, and the losses and
gradients are bit-identical to those of keeping the outputs.
"""
import numpy as np
import pytest

from bitwise import assert_same_bits
from gpt_harness import merge_ranks, relative_error, run_layout, tiny_config
from multiprocess import run_ranks

CONFIGS = {"4_layers": tiny_config(),
           "8_layers_rope": tiny_config(num_layers=8, position_embedding_type="rope")}
SCHEDULES = {  # name: (config, layout, micro-batches)
    "1f1b_pp4_m6": ("4_layers", dict(pp=4), 6),
    "1f1b_pp4_m2": ("4_layers", dict(pp=4), 2),
    "interleaved_pp4_vp2_m4": ("8_layers_rope", dict(pp=4, vp=2), 4),
    "interleaved_pp4_vp2_m8": ("8_layers_rope", dict(pp=4, vp=2), 8),
    "interleaved_pp2_vp2_m6": ("4_layers", dict(pp=2, vp=2), 6),
}


def _schedules(rank, world_size):
    out = {}
    for name, (config, layout, m) in SCHEDULES.items():
        out[name] = run_layout(CONFIGS[config], num_microbatches=m, **layout)
        if ("reference", config, m) not in out:
            out[("reference", config, m)] = run_layout(CONFIGS[config], num_microbatches=m)
    for name, layout in (("forward_only_1f1b", dict(pp=4)),
                         ("forward_only_interleaved", dict(pp=2, vp=2))):
        out[name] = run_layout(CONFIGS["4_layers"], num_microbatches=6, forward_only=True, **layout)
    for granularity in (None, "full", "selective"):
        config = tiny_config(hidden_dropout=0.1, attention_dropout=0.1,
                             recompute_granularity=granularity)
        out[("recompute", granularity)] = run_layout(config, tp=2, pp=2, sp=True)
    return out


@pytest.fixture(scope="module")
def results():
    per_rank = run_ranks(_schedules, 4)
    return {key: merge_ranks([r[key] for r in per_rank]) for key in per_rank[0]}


def _reference(results, name):
    config, _, m = SCHEDULES[name]
    return results[("reference", config, m)]


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_pipelined_gradients_equal_gradient_accumulation(results, name):
    result, reference = results[name], _reference(results, name)
    np.testing.assert_allclose(result["losses"], reference["losses"], rtol=1e-5)
    assert set(result["grads"]) == set(reference["grads"])
    for param_name, grad in reference["grads"].items():
        assert relative_error(result["grads"][param_name], grad) <= 1e-5, param_name


@pytest.mark.parametrize("name", ["forward_only_1f1b", "forward_only_interleaved"])
def test_forward_only_returns_the_losses(results, name):
    reference = results[("reference", "4_layers", 6)]
    np.testing.assert_allclose(results[name]["losses"], reference["losses"], rtol=1e-5)
    assert results[name]["grads"] == {}


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_recomputation_changes_no_gradient(results, granularity):
    baseline, recomputed = results[("recompute", None)], results[("recompute", granularity)]
    assert_same_bits(np.array(recomputed["losses"]), np.array(baseline["losses"]), "losses")
    for name, grad in baseline["grads"].items():
        np.testing.assert_allclose(recomputed["grads"][name], grad, rtol=1e-6, atol=1e-7,
                                   err_msg=name)


# ----- outputs sent to the next stage are released ------------------------------------------

def _sent_output_bytes(rank, world_size):
    """PP 2 (1F1B, and interleaved with 2 chunks per rank) with and without
    releasing the sent outputs: for each, the bytes each backward's non-loss
    output still holds when its backward starts, and the run's results."""
    from megatron_sr.pipeline_parallel import schedules

    backward, release = schedules._backward_step, schedules._release_sent_output
    out = {}
    for name, layout in (("1f1b", dict(pp=2)), ("interleaved", dict(pp=2, vp=2))):
        for released in (True, False):
            held = []

            def recording_backward(input_tensor, output_tensor, output_grad):
                if output_tensor.dim() > 0:  # not a last stage's loss
                    held.append(output_tensor.untyped_storage().nbytes())
                return backward(input_tensor, output_tensor, output_grad)

            schedules._backward_step = recording_backward
            schedules._release_sent_output = release if released else (lambda output: None)
            try:
                result = run_layout(CONFIGS["8_layers_rope"], num_microbatches=4, **layout)
            finally:
                schedules._backward_step, schedules._release_sent_output = backward, release
            out[(name, released)] = (held, result)
    return out


@pytest.mark.slow
def test_outputs_sent_to_the_next_stage_are_released_and_gradients_stay_bit_identical():
    per_rank = run_ranks(_sent_output_bytes, 2)
    config = CONFIGS["8_layers_rope"]
    activation_bytes = config.seq_length * 2 * config.hidden_size * 4  # [s, b, h] fp32
    for name in ("1f1b", "interleaved"):
        held = [bytes_ for rank in per_rank for bytes_ in rank[(name, True)][0]]
        kept = [bytes_ for rank in per_rank for bytes_ in rank[(name, False)][0]]
        assert len(held) == len(kept) > 0
        assert all(b <= 8 for b in held), held  # one element left of each sent output
        assert all(b == activation_bytes for b in kept)  # what not releasing holds
        released = merge_ranks([rank[(name, True)][1] for rank in per_rank])
        reference = merge_ranks([rank[(name, False)][1] for rank in per_rank])
        assert_same_bits(np.array(released["losses"]), np.array(reference["losses"]), "losses")
        assert released["grads"].keys() == reference["grads"].keys()
        for param_name, grad in reference["grads"].items():
            assert_same_bits(released["grads"][param_name], grad, param_name)
