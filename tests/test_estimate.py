"""The estimator (`megatron_sr.estimate`, `tools/estimate.py`) against the real thing.

One run of 4 Gloo ranks builds, for each case, what `pretrain_gpt.py` builds
from the same flags (`training.setup_model_and_optimizer`: the model, the
`ParamAndGradBuffer` over all the rank's chunks, the `DistributedOptimizer`)
and reads the job's memory report (`training.memory_report`).
Checked:
- the analytic parameter list (global names, elements, TP-sliced or not, in
  order) equals every rank's real one, for TP/PP/VP layouts, GELU/SwiGLU,
  tied/untied embeddings, with and without biases (or on qkv alone), LayerNorm/RMSNorm,
  learned/rotary positions;
- the estimated params/grads/master/optimizer bytes equal the memory report
  on every rank, for 10 cases covering every strategy, the distributed
  optimizer on and off, --grad-reduce-dtype, --optimizer-state-dtype and
  small buckets (so padding and bucket cuts matter);
- the estimated activation bytes kept for backward are within 15% of the
  measured ones (below) for 4 cases: plain, TP x PP with sequence
  parallelism, SwiGLU, RMSNorm, RoPE and selective recomputation, interleaved
  with full recomputation, and TP without sequence parallelism;
- the micro-batches in flight at the pipeline's peak equal those of the real
  1F1B and interleaved schedules (counted by wrapping their forward and
  backward steps), on every stage;
- bad layouts give `pretrain_gpt.py`'s messages, through the same code;
- the tables of docs/SCALING.md are what the tool prints now.

Measuring activation memory on the CPU: one micro-batch's forward of each
chunk of the rank runs inside `torch.autograd.graph.saved_tensors_hooks`
whose pack hook records the storage of every tensor autograd saves for
backward (including the inputs that `torch.utils.checkpoint` keeps under
recomputation, which pass through the outer hook). Storages are de-duplicated
by address (q, k and v are views of one qkv output) and the parameters'
storage is excluded; the sum of their sizes is what the forward leaves alive
for backward. The tensors stay referenced until counted, so no address is reused.
"""
import dataclasses
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_sr import parallel_state
from megatron_sr.config import build_parser, parse_args
from megatron_sr.estimate import (add_estimate_args, buffer_layout, chunk_placements, estimate_job,
                                  in_flight_chunk_counts, jobs_from_args, rank_parameters,
                                  report_from_argv)
from megatron_sr.config import ParallelConfig
from megatron_sr.model import build_model
from megatron_sr.pipeline_parallel import get_forward_backward_func, schedules
from megatron_sr.random import model_parallel_seed
from megatron_sr.training import memory_report, setup_model_and_optimizer
from gpt_harness import forward_step, make_batches, tiny_config
from multiprocess import run_ranks

WORLD_SIZE = 4
BUCKET_SIZE = 3000
REPO = Path(__file__).resolve().parents[1]

TINY = ("--num-layers 4 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
        "--vocab-size 100 --make-vocab-size-divisible-by 8 --attention-dropout 0 ")
STATE_CASES = {  # name: flags; every case runs on 4 ranks
    "tp2_pp2_gelu_tied_sr": "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 "
                            "--use-distributed-optimizer",
    "pp2_vp2_dp2_swiglu_untied_nobias_mixed": (
        "--num-layers 8 --pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 2 "
        "--swiglu --ffn-hidden-size 48 --untie-embeddings-and-output-weights --disable-bias-linear "
        "--normalization RMSNorm --position-embedding-type rope --precision bf16-mixed "
        "--use-distributed-optimizer --global-batch-size 4"),
    "tp2_dp2_sp_kahan": "--tensor-model-parallel-size 2 --sequence-parallel --precision bf16-kahan",
    "pp4_swiglu_amp": ("--pipeline-model-parallel-size 4 --swiglu --ffn-hidden-size 64 "
                       "--precision amp"),
    "dp4_untied_bf16_fp32_state": "--untie-embeddings-and-output-weights --precision bf16 "
                                  "--optimizer-state-dtype fp32 --use-distributed-optimizer",
    "tp2_pp2_vp2_mixed_fp32_reduce": (
        "--num-layers 8 --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 "
        "--num-layers-per-virtual-pipeline-stage 2 --bf16 --grad-reduce-dtype fp32 "
        "--global-batch-size 2"),
    "dp4_mixed_distributed": "--bf16 --use-distributed-optimizer",
    "tp4_fp32_nobias": "--tensor-model-parallel-size 4 --precision fp32 --disable-bias-linear",
    "tp2_dp2_gqa_kv_channels_qk_layernorm": (
        "--tensor-model-parallel-size 2 --group-query-attention --num-query-groups 2 "
        "--kv-channels 16 --qk-layernorm --swiglu --ffn-hidden-size 48 --normalization RMSNorm "
        "--position-embedding-type rope --use-distributed-optimizer"),
    # Qwen-style: a bias on linear_qkv alone, as its launch scripts spell the flags.
    "tp2_dp2_qwen_qkv_bias": (
        "--tensor-model-parallel-size 2 --group-query-attention --num-query-groups 2 --swiglu "
        "--ffn-hidden-size 48 --normalization rmsnorm --position-embedding-type rope "
        "--no-position-embedding --disable-bias-linear --add-qkv-bias"),
}
ACTIVATION_FLAGS = ("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 64 "
                    "--micro-batch-size 2 --vocab-size 250 --make-vocab-size-divisible-by 8 "
                    "--attention-dropout 0 --hidden-dropout 0.1 ")
ACTIVATION_CASES = {
    "dp4_gelu": "",
    "tp2_pp2_sp_swiglu_rmsnorm_rope_selective": (
        "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel "
        "--swiglu --ffn-hidden-size 128 --normalization RMSNorm --position-embedding-type rope "
        "--recompute-granularity selective"),
    "pp2_vp2_full_recompute": (
        "--num-layers 8 --pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 2 "
        "--recompute-granularity full --global-batch-size 8"),
    "tp2_no_sp_untied": "--tensor-model-parallel-size 2 --untie-embeddings-and-output-weights",
}


def _job(flags: str):
    args = build_parser(extra_args_provider=add_estimate_args).parse_args(
        (flags + f" --world-size {WORLD_SIZE}").split())
    (job,) = jobs_from_args(args)
    return job


def _saved_activation_bytes(chunks, job) -> int:
    """Bytes of the distinct non-parameter storages autograd saves during one
    micro-batch's forward of every chunk (see the module docstring)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    s, b, h = job.model.seq_length, job.training.micro_batch_size, job.model.hidden_size
    local_s = s // tp if job.parallel.sequence_parallel else s
    tokens = torch.randint(0, job.unpadded_vocab_size, (b, s),
                           generator=torch.Generator().manual_seed(0))
    parameter_storages = {p.untyped_storage().data_ptr() for c in chunks for p in c.parameters()}
    saved: dict[int, int] = {}
    alive = []

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    for virtual_rank, chunk in enumerate(chunks):
        parallel_state.set_virtual_pipeline_model_parallel_rank(virtual_rank)
        chunk.train()
        received = None
        if not chunk.pre_process:
            received = torch.randn(local_s, b, h).to(job.model.params_dtype).requires_grad_()
        chunk.set_input_tensor(received)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = chunk(tokens, labels=tokens if chunk.post_process else None)
            alive.append(output.mean() if chunk.post_process else output)
    parallel_state.set_virtual_pipeline_model_parallel_rank(0)
    return sum(saved.values())


SCHEDULE_CASES = {  # name: (pipeline size, virtual size, micro-batches); 4 ranks
    "1f1b_pp4_m6": (4, None, 6),
    "1f1b_pp4_m2": (4, None, 2),
    "interleaved_pp2_vp2_m4": (2, 2, 4),
    "interleaved_pp4_vp2_m8": (4, 2, 8),
    "interleaved_pp4_vp2_m4": (4, 2, 4),
}


def _peak_in_flight(pp, vp, num_microbatches):
    """Runs the real schedule of a tiny model and returns, per chunk, the micro-batches
    held (forward done, backward not) at the first moment the most are held."""
    parallel_state.initialize_model_parallel(1, pp, vp)
    try:
        model_parallel_seed(0)
        config = tiny_config(num_layers=8)
        chunks = build_model(config, ParallelConfig(pipeline_model_parallel_size=pp,
                                                    virtual_pipeline_model_parallel_size=vp))
        held, peak, chunk_of_output = [0] * len(chunks), [0] * len(chunks), {}
        run_forward, run_backward = schedules._forward_step, schedules._backward_step

        def counting_forward(forward_step_func, data_iterator, chunk, *args):
            output = run_forward(forward_step_func, data_iterator, chunk, *args)
            index = next(i for i, c in enumerate(chunks) if c is chunk)
            held[index] += 1
            chunk_of_output[id(output)] = index
            if sum(held) > sum(peak):
                peak[:] = held
            return output

        def counting_backward(input_tensor, output_tensor, output_grad):
            held[chunk_of_output.pop(id(output_tensor))] -= 1
            return run_backward(input_tensor, output_tensor, output_grad)

        schedules._forward_step, schedules._backward_step = counting_forward, counting_backward
        try:
            batches = make_batches(config, num_microbatches, 1)
            get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=[iter(batches) for _ in chunks],
                model=chunks, num_microbatches=num_microbatches, seq_length=config.seq_length,
                micro_batch_size=1)
        finally:
            schedules._forward_step, schedules._backward_step = run_forward, run_backward
        return parallel_state.get_pipeline_model_parallel_rank(), peak
    finally:
        parallel_state.destroy_model_parallel()


def _real_ranks(rank, world_size, state_jobs, activation_jobs):
    out = {("schedule", name): _peak_in_flight(*case) for name, case in SCHEDULE_CASES.items()}
    for kind, jobs in (("state", state_jobs), ("activation", activation_jobs)):
        for name, job in jobs.items():
            parallel = job.parallel
            parallel_state.initialize_model_parallel(
                parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                parallel.virtual_pipeline_model_parallel_size)
            try:
                model_parallel_seed(job.training.seed)
                result = {"pp_rank": parallel_state.get_pipeline_model_parallel_rank()}
                if kind == "state":
                    chunks, optimizer, _ = setup_model_and_optimizer(job, bucket_size=BUCKET_SIZE)
                    result["memory_report"] = memory_report(optimizer)
                    result["bucket_ranges"] = optimizer.buffer.layout.bucket_ranges
                    result["params"] = [(p.global_name, p.numel(), p.tensor_model_parallel)
                                        for chunk in chunks for p in chunk.parameters()]
                else:
                    chunks = build_model(job.model, parallel, seed=job.training.seed)
                    result["saved_activation_bytes"] = _saved_activation_bytes(chunks, job)
                out[(kind, name)] = result
            finally:
                parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def real():
    state_jobs = {name: _job(TINY + flags) for name, flags in STATE_CASES.items()}
    activation_jobs = {name: _job(ACTIVATION_FLAGS + flags)
                       for name, flags in ACTIVATION_CASES.items()}
    ranks = run_ranks(_real_ranks, WORLD_SIZE, state_jobs, activation_jobs, timeout=240)
    return state_jobs, activation_jobs, ranks


@pytest.mark.parametrize("name", STATE_CASES)
def test_parameter_list_matches_the_built_model(real, name):
    state_jobs, _, ranks = real
    job = state_jobs[name]
    for rank in ranks:
        measured = rank[("state", name)]
        expected = [(e.name, e.numel, e.tensor_parallel)
                    for e in rank_parameters(job.model, job.parallel, measured["pp_rank"])]
        assert measured["params"] == expected


@pytest.mark.parametrize("name", STATE_CASES)
def test_state_bytes_equal_the_optimizers_memory_report(real, name):
    state_jobs, _, ranks = real
    estimate = estimate_job(state_jobs[name], bucket_size=BUCKET_SIZE)
    for rank in ranks:
        measured = rank[("state", name)]
        stage = estimate.stages[measured["pp_rank"]]
        assert measured["memory_report"] == {"params": stage.params, "grads": stage.grads,
                                             "master": stage.master,
                                             "optimizer": stage.optimizer, "total": stage.state}


@pytest.mark.parametrize("name", STATE_CASES)
def test_bucket_layout_and_overlap_fractions_follow_the_real_buffer(real, name):
    state_jobs, _, ranks = real
    job = state_jobs[name]
    overlapped = dataclasses.replace(job, parallel=dataclasses.replace(
        job.parallel, overlap_grad_reduce=True,
        overlap_param_gather=job.parallel.use_distributed_optimizer))
    estimate = estimate_job(overlapped, bucket_size=BUCKET_SIZE)
    for rank in ranks:
        measured = rank[("state", name)]
        entries = rank_parameters(job.model, job.parallel, measured["pp_rank"])
        layout = buffer_layout(job.model, entries, job.data_parallel_size, BUCKET_SIZE)
        assert layout.bucket_ranges == measured["bucket_ranges"]
        last_start, last_end = measured["bucket_ranges"][-1]
        fraction = 1 - (last_end - last_start) / measured["bucket_ranges"][-1][1]
        stage = estimate.stages[measured["pp_rank"]]
        assert stage.grad_reduce_overlap == pytest.approx(
            fraction if job.data_parallel_size > 1 else 0.0)
        assert stage.param_gather_overlap == pytest.approx(
            fraction if job.data_parallel_size > 1 and job.parallel.use_distributed_optimizer
            else 0.0)
        assert stage.setup_peak >= 2 * stage.params  # model params + the buffer, before the move


@pytest.mark.parametrize("name", ACTIVATION_CASES)
def test_saved_activations_within_15_percent_of_measured(real, name):
    _, activation_jobs, ranks = real
    estimate = estimate_job(activation_jobs[name], device="cpu")
    for rank in ranks:
        measured = rank[("activation", name)]
        predicted = estimate.stages[measured["pp_rank"]].activations_saved_per_microbatch
        assert predicted == pytest.approx(measured["saved_activation_bytes"], rel=0.15), \
            f"pipeline rank {measured['pp_rank']}"


REQUIRED_FOR_TRAINING = ("--lr 1e-4 --train-iters 1 --mock-data --tokenizer-type NullTokenizer "
                         "--vocab-size 100").split()


@pytest.mark.parametrize("flags, world_size", [
    ("--num-attention-heads 6 --tensor-model-parallel-size 4", 4),
    ("--num-layers 6 --pipeline-model-parallel-size 4", 4),
    ("--tensor-model-parallel-size 4", 6),
    ("--num-layers 8 --pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 2 "
     "--global-batch-size 3", 2),
    ("--sequence-parallel --seq-length 18 --tensor-model-parallel-size 4", 4),
])
def test_bad_layouts_give_pretrain_gpts_messages(flags, world_size):
    argv = (TINY + flags).split()
    with pytest.raises(ValueError) as training:
        parse_args(argv + REQUIRED_FOR_TRAINING, world_size)
    args = build_parser(extra_args_provider=add_estimate_args).parse_args(
        argv + ["--world-size", str(world_size)])
    with pytest.raises(ValueError) as estimating:
        jobs_from_args(args)
    assert str(estimating.value) == str(training.value)


@pytest.mark.parametrize("name", SCHEDULE_CASES)
def test_in_flight_micro_batches_equal_the_real_schedules(real, name):
    pp, vp, num_microbatches = SCHEDULE_CASES[name]
    for rank in real[2]:
        pp_rank, peak = rank[("schedule", name)]
        assert in_flight_chunk_counts(pp, vp, pp_rank, num_microbatches, [1] * (vp or 1)) == peak


def test_in_flight_micro_batches_follow_the_schedules():
    assert in_flight_chunk_counts(1, None, 0, 8, [1]) == [1]
    assert [in_flight_chunk_counts(4, None, p, 8, [1]) for p in range(4)] == [[4], [3], [2], [1]]
    assert in_flight_chunk_counts(4, None, 0, 2, [1]) == [2]
    # Interleaved, PP=2 x 2 chunks, 4 micro-batches: rank 0 warms up with
    # (2 - 0 - 1) * 2 + (2 - 1) * 2 = 4 forwards (chunks 0 0 1 1), then one more (chunk 0).
    assert in_flight_chunk_counts(2, 2, 0, 4, [1, 1]) == [3, 2]
    # M == PP: every forward runs before any backward.
    assert in_flight_chunk_counts(2, 2, 1, 2, [1, 1]) == [2, 2]


def test_layouts_place_layers_like_build_model():
    job = _job(TINY + STATE_CASES["tp2_pp2_vp2_mixed_fp32_reduce"])
    chunks = [chunk_placements(job.model, job.parallel, p) for p in range(2)]
    assert [[c.layer_offset for c in stage] for stage in chunks] == [[0, 4], [2, 6]]
    assert [[(c.pre_process, c.post_process) for c in stage] for stage in chunks] == \
        [[(True, False), (False, False)], [(False, False), (False, True)]]


def test_cli_compare_and_errors():
    command = [sys.executable, str(REPO / "tools" / "estimate.py")] + TINY.split()
    compared = subprocess.run(command + ["--data-parallel-size", "2", "--compare"],
                              capture_output=True, text=True, check=True)
    for strategy in ("fp32", "amp", "bf16-mixed", "bf16", "bf16-sr", "bf16-kahan"):
        assert f"\n{strategy} " in compared.stdout
    bad = subprocess.run(command + ["--tensor-model-parallel-size", "3"], capture_output=True,
                         text=True)
    assert bad.returncode == 2
    assert "--num-attention-heads (4) is not divisible by --tensor-model-parallel-size (3)" \
        in bad.stderr


def test_scaling_doc_tables_are_what_the_tool_prints():
    doc = (REPO / "docs" / "SCALING.md").read_text()
    commands = re.findall(r"```sh\npython tools/estimate\.py ([^\n.]*)\n```", doc)
    assert len(commands) >= 10
    for command in commands:
        assert report_from_argv(shlex.split(command)) in doc, command


def test_guide_gradient_buffer_figures_are_what_the_tool_prints():
    """GUIDE.md's memory and traffic of the FP32 gradient buffer against the BF16
    one (and SR accumulation, which keeps the BF16 buffer's) for the command it
    quotes, as the tool prints them now."""
    guide = (REPO / "docs" / "GUIDE.md").read_text()
    quoted = re.search(r"\(`tools/estimate\.py\s+([^`]*)`,\s+against the same with bf16\)",
                       guide)
    needs = re.search(r"needs ([\d.]+) instead of ([\d.]+)\s+GiB per rank and\s+sends "
                      r"([\d.]+)\s+instead of ([\d.]+) GiB per step over DP", guide)
    sr_accumulation = re.search(r"\(([\d.]+) GiB per rank in the\s+example above, as the BF16 "
                                r"buffer", guide)
    assert quoted and needs and sr_accumulation
    fp32_flags = shlex.split(" ".join(quoted.group(1).split()))
    bf16_flags = [f for f in fp32_flags if f not in ("--grad-reduce-dtype", "fp32")]

    def totals(flags):
        report = report_from_argv(flags)
        memory = report[report.index("memory per rank"):].splitlines()[2].split()
        traffic = report[report.index("sent per rank per step"):].splitlines()[2].split()
        return float(memory[-1]), float(traffic[1]) + float(traffic[2]) + float(traffic[3])

    fp32, bf16 = totals(fp32_flags), totals(bf16_flags)
    sr = totals(bf16_flags + ["--grad-accumulation-rounding", "stochastic"])
    assert f"{fp32[0]:.1f}" == needs.group(1) and f"{bf16[0]:.1f}" == needs.group(2)
    assert f"{fp32[1]:.1f}" == needs.group(3) and f"{bf16[1]:.1f}" == needs.group(4)
    assert f"{sr[0]:.1f}" == sr_accumulation.group(1)
