"""A Megatron-LM run resumed in megatron_sr, optimizer state included (issue 33).

Spec:
- megatron-core itself trains a bf16 GPT (its DistributedDataParallel and
  DistributedOptimizer from `get_megatron_optimizer`, or its mixed-precision
  optimizer without the distributed one; its
  OptimizerParamScheduler; on the CPU with Gloo) for three steps and saves
  iteration 3 with `dist_checkpointing.save` as Megatron-LM's training loop
  does (model, optimizer.sharded_state_dict, scheduler, args).
- `checkpoint_convert.py --from-megatron` writes our checkpoint: with
  --precision bf16-sr each parameter is the stochastic rounding of
  Megatron's fp32 main parameter under `import_rounding_key(seed, 3, name)`
  (bitwise), m and v are Megatron's exp_avg / exp_avg_sq in bf16; with
  bf16-mixed the master is the main parameter and m, v stay fp32; iteration,
  consumed samples, Adam's step and the schedule's position carry over.
- `pretrain_gpt.py --load` of the result resumes: the loaded state is the
  converted one and training continues at iteration 4.
- The distributed optimizer's default bucket layout (dp_reshardable, DP 1 and
  DP 2 with several buckets) imports the same way, checked against the live
  optimizer's state; a layout read in the wrong parameter order and the
  older dp_zero_gather_scatter are refused by name.
"""
from __future__ import annotations

import hashlib
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
import checkpoint_convert  # noqa: E402

pytest.importorskip("megatron.core")

ITERATION, BATCH, TRAIN_ITERS, SEED = 3, 2, 5, 1234


class _CudaTensorsOnCpu(torch.overrides.TorchFunctionMode):
    """megatron-core's optimizer allocates with device="cuda", moves with
    .cuda() and checks `param.type()` against 'torch.cuda.*Tensor': on the
    CPU the allocation goes to the CPU, .cuda() is the identity and type()
    names the CUDA type of the same dtype."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def _megatron_args(case: str):
    from test_megatron_lm_import import megatron_lm_args

    args = megatron_lm_args(case, 1, "torch_dist")
    args.__dict__.update(bf16=True, params_dtype=torch.bfloat16, seed=SEED,
                         global_batch_size=BATCH, micro_batch_size=BATCH, train_iters=TRAIN_ITERS,
                         consumed_train_samples=ITERATION * BATCH, lr=1e-3, min_lr=0.0,
                         lr_decay_style="constant", use_distributed_optimizer=True,
                         transformer_impl="local")  # the local layer spec it builds
    return args


def _train_and_save_with_megatron_core(rank, world_size, save_dir, sharding_type,
                                       distributed=True, case="gpt2", bucket_size=None):
    """Three Adam steps of megatron-core's bf16 GPTModel under its
    DistributedOptimizer (`distributed`, its state saved as `sharding_type`;
    with `bucket_size` its gradient buffer is cut in buckets of about that many
    elements, reduced while the backward runs, as Megatron-LM's
    --overlap-grad-reduce does) or its mixed-precision optimizer, saved as
    Megatron-LM saves iteration 3; every rank runs the same batch. Returns
    {name: (shape, start, (fp32 main parameter, exp_avg, exp_avg_sq))} of the
    part of each parameter (flat, from `start`) this rank's live optimizer
    holds, as numpy arrays (tensors do not outlive the rank's process);
    `_assemble` joins the ranks' parts."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as mcore_parallel_state
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from test_megatron_lm_import import SEQ, TOKENS, _cpu_stand_ins, _megatron_core_model

    _cpu_stand_ins()
    torch.manual_seed(11)
    mcore_parallel_state.initialize_model_parallel(1, 1)
    args = _megatron_args(case)
    with _CudaTensorsOnCpu():
        model = _megatron_core_model(args).bfloat16()
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=distributed,
            overlap_grad_reduce=bucket_size is not None, bucket_size=bucket_size), model)
        optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=0.01, bf16=True,
            use_distributed_optimizer=distributed), [ddp])
        scheduler = OptimizerParamScheduler(
            optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=0,
            lr_decay_steps=TRAIN_ITERS * BATCH, lr_decay_style="constant", start_wd=0.01,
            end_wd=0.01, wd_incr_steps=TRAIN_ITERS * BATCH, wd_incr_style="constant")
        causal = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
        positions = torch.arange(SEQ).unsqueeze(0).expand(2, SEQ)
        for _ in range(ITERATION):
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            ddp(TOKENS, positions, causal).float().square().mean().backward()
            ddp.finish_grad_sync()
            assert optimizer.step()[0]
            scheduler.step(increment=BATCH)
        directory = os.path.join(save_dir, f"iter_{ITERATION:07d}")
        os.makedirs(directory, exist_ok=True)
        state = {"args": args, "checkpoint_version": 3.0, "iteration": ITERATION,
                 "model": model.sharded_state_dict(),
                 "num_floating_point_operations_so_far": 0}
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata={
            "distrib_optim_sharding_type": sharding_type, "singleton_local_shards": False,
            "chained_optim_avoid_prefix": True})
        state["opt_param_scheduler"] = scheduler.state_dict()
        dist_checkpointing.save(state, directory, sharded_strategy=TorchDistSaveShardedStrategy(
            "torch_dist", 1, thread_count=1))
    if rank == 0:
        with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(f"{ITERATION}\n")
    names = {id(param): name for name, param in model.named_parameters()}
    inner = optimizer.chained_optimizers[0]
    expected = {}
    groups = (zip(inner.model_float16_groups, inner.shard_fp32_from_float16_groups) if distributed
              else zip(inner.float16_groups, inner.fp32_from_float16_groups))
    for group, mains in groups:
        for param, main in zip(group, mains):
            adam = inner.optimizer.state[main]
            start = inner._get_model_param_range_map(param)["param"].start if distributed else 0
            expected[names[id(param)]] = (tuple(param.shape), start, tuple(
                t.detach().flatten().numpy().copy()
                for t in (main, adam["exp_avg"], adam["exp_avg_sq"])))
    mcore_parallel_state.destroy_model_parallel()
    return expected


def _assemble(per_rank: list[dict]) -> dict[str, tuple]:
    """{name: (main, exp_avg, exp_avg_sq) tensors of the parameter's shape}
    from the ranks' parts (`_train_and_save_with_megatron_core`); every
    element must come from exactly one rank."""
    full: dict[str, tuple] = {}
    for parts in per_rank:
        for name, (shape, start, arrays) in parts.items():
            numel = int(torch.Size(shape).numel())
            whole = full.setdefault(name, (shape, torch.zeros(numel, dtype=torch.int32), tuple(
                torch.zeros(numel) for _ in arrays)))
            end = start + arrays[0].size
            whole[1][start:end] += 1
            for target, array in zip(whole[2], arrays):
                target[start:end] = torch.from_numpy(array)
    assert all(bool((covered == 1).all()) for _, covered, _ in full.values())
    return {name: tuple(t.view(shape) for t in arrays)
            for name, (shape, _, arrays) in full.items()}


# megatron-core's DistributedOptimizer (saved fully_reshardable) and its mixed-precision
# optimizer without --use-distributed-optimizer (Float16OptimizerWithFloat16Params); GPT-2
# and Llama style (GQA, SwiGLU's fc1 stored as all gates then all ups, untied output).
@pytest.fixture(scope="module", params=[("gpt2", "distributed"), ("gpt2", "mixed_precision"),
                                        ("llama_gqa", "distributed")], ids="-".join)
def megatron_run(request, tmp_path_factory):
    from multiprocess import run_ranks

    case, optimizer = request.param
    save = str(tmp_path_factory.mktemp("megatron") / "save")
    os.makedirs(save)
    return save, _assemble(run_ranks(_train_and_save_with_megatron_core, 1, save,
                                     "fully_reshardable", optimizer == "distributed", case))


def _documented_import_key(name: str) -> int:
    """The import's SR key as `random.import_rounding_key` documents it for
    this run's --seed and iteration, computed here from that contract."""
    text = f"megatron-lm-import|{SEED}|{ITERATION}|{name}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & (2**63 - 1)


def _convert(save: str, out: str, *flags: str) -> None:
    assert checkpoint_convert.main(["--load", save, "--save", out, "--from-megatron",
                                    *flags]) == 0


@pytest.mark.slow
def test_bf16_sr_import_rounds_megatrons_main_params_with_the_import_key(megatron_run,
                                                                         tmp_path):
    from megatron_sr.checkpointing.conversion import load_full_checkpoint
    from megatron_sr.precision.rounding import stochastic_round

    save, expected = megatron_run
    _convert(save, str(tmp_path / "ours"))
    ours = load_full_checkpoint(str(tmp_path / "ours"))
    assert (ours.iteration, ours.consumed_train_samples) == (ITERATION, ITERATION * BATCH)
    assert ours.optimizer["strategy"] == "bf16-sr" and ours.optimizer["step"] == ITERATION
    assert ours.lr_scheduler["iteration"] == ITERATION
    assert ours.lr_scheduler["decay_iters"] == TRAIN_ITERS
    assert set(ours.model) == set(expected)
    params = ours.optimizer["params"]
    assert sorted(params) == ["exp_avg", "exp_avg_sq"]
    differs_from_nearest = 0
    for name, (main, exp_avg, exp_avg_sq) in expected.items():
        assert exp_avg.abs().max() > 0 and exp_avg_sq.abs().max() > 0, name
        rounded = stochastic_round(main, _documented_import_key(name))
        assert ours.model[name].dtype == torch.bfloat16
        assert torch.equal(ours.model[name].view(torch.int16), rounded.view(torch.int16)), name
        assert torch.equal(params["exp_avg"][name], exp_avg.to(torch.bfloat16)), name
        assert torch.equal(params["exp_avg_sq"][name], exp_avg_sq.to(torch.bfloat16)), name
        differs_from_nearest += int(not torch.equal(rounded, main.to(torch.bfloat16)))
    # The main parameters are not bf16 values: the rounding (and its key) decides the bits.
    assert differs_from_nearest == len(expected)


@pytest.mark.slow
def test_bf16_mixed_import_keeps_the_main_params_as_master(megatron_run, tmp_path):
    from megatron_sr.checkpointing.conversion import load_full_checkpoint

    save, expected = megatron_run
    _convert(save, str(tmp_path / "ours"), "--precision", "bf16-mixed")
    ours = load_full_checkpoint(str(tmp_path / "ours"))
    params = ours.optimizer["params"]
    assert ours.optimizer["strategy"] == "bf16-mixed"
    for name, (main, exp_avg, exp_avg_sq) in expected.items():
        assert torch.equal(params["master"][name], main), name
        assert torch.equal(params["exp_avg"][name], exp_avg), name
        assert torch.equal(params["exp_avg_sq"][name], exp_avg_sq), name
        assert torch.equal(ours.model[name], main.to(torch.bfloat16)), name


@pytest.mark.slow
def test_pretrain_gpt_resumes_the_converted_megatron_run(megatron_run, tmp_path):
    from job_harness import run_pretrain, tiny_gpt_argv
    from megatron_sr.checkpointing.conversion import load_full_checkpoint, model_flags

    save, _ = megatron_run
    ours = str(tmp_path / "ours")
    _convert(save, ours)
    converted = load_full_checkpoint(ours)
    argv = tiny_gpt_argv(load=ours, train_iters=TRAIN_ITERS, seq_length=8,
                         max_position_embeddings=8, ffn_hidden_size=48, vocab_size=63,
                         micro_batch_size=BATCH, precision="bf16-sr", seed=SEED)
    argv += model_flags(converted.config).split()  # the model Megatron trained
    result = run_pretrain(1, argv)[0]
    assert f"loaded iteration {ITERATION}" in result["stdout"], result["stdout"]
    assert result["last_iteration"] == TRAIN_ITERS
    assert len(result["reports"]) == TRAIN_ITERS - ITERATION
    for name, tensor in converted.model.items():
        assert (result["loaded_params"][name] == tensor.float().numpy()).all(), name
    loaded = result["loaded_optimizer"]
    assert loaded["step"] == ITERATION
    for name, tensor in converted.optimizer["params"]["exp_avg"].items():
        assert (loaded["params"][name]["exp_avg"] == tensor.float().numpy()).all(), name


# Megatron-LM's default layout of the distributed optimizer, megatron-core's flat buckets:
# GPT-2 style at DP 1 in one bucket; Llama style (untied output, no biases) at DP 2 with
# --overlap-grad-reduce's buckets, each rank saving its slice of them.
@pytest.mark.slow
@pytest.mark.parametrize("case,dp,bucket_size", [("gpt2", 1, None), ("llama_gqa", 2, 4000)],
                         ids=["gpt2-dp1", "llama_gqa-dp2-buckets"])
def test_the_distributed_optimizers_bucket_layout_imports(case, dp, bucket_size, tmp_path):
    from multiprocess import run_ranks
    from megatron_sr.checkpointing import megatron_lm_optimizer, megatron_torch_dist
    from megatron_sr.checkpointing.conversion import load_full_checkpoint
    from megatron_sr.precision.rounding import stochastic_round

    save = str(tmp_path / "megatron")
    os.makedirs(save)
    expected = _assemble(run_ranks(_train_and_save_with_megatron_core, dp, save,
                                   "dp_reshardable", True, case, bucket_size))
    directory = os.path.join(save, f"iter_{ITERATION:07d}")
    common, tensors = megatron_torch_dist.read(directory, optimizer=True)
    assert megatron_lm_optimizer.sharding_type(common) == "dp_reshardable"
    # Adam's step is read from the saved param groups, not taken from the iteration.
    assert megatron_lm_optimizer.adam_step(common, iteration=-1) == ITERATION
    buckets = [key for key in tensors
               if key.startswith("optimizer.distributed.") and key.endswith(".param")]
    assert (len(buckets) > 1) == (bucket_size is not None), buckets
    _convert(save, str(tmp_path / "sr"))
    _convert(save, str(tmp_path / "mixed"), "--precision", "bf16-mixed")
    sr, mixed = (load_full_checkpoint(str(tmp_path / which)) for which in ("sr", "mixed"))
    assert sr.optimizer["step"] == ITERATION and set(sr.model) == set(expected)
    for name, (main, exp_avg, exp_avg_sq) in expected.items():
        rounded = stochastic_round(main, _documented_import_key(name))
        assert torch.equal(sr.model[name].view(torch.int16), rounded.view(torch.int16)), name
        assert torch.equal(sr.optimizer["params"]["exp_avg"][name], exp_avg.bfloat16()), name
        assert torch.equal(sr.optimizer["params"]["exp_avg_sq"][name],
                           exp_avg_sq.bfloat16()), name
        assert torch.equal(mixed.optimizer["params"]["master"][name], main), name
        assert torch.equal(mixed.optimizer["params"]["exp_avg"][name], exp_avg), name
        assert torch.equal(mixed.optimizer["params"]["exp_avg_sq"][name], exp_avg_sq), name
    # The layout is checked against the saved weights: read in Transformer Engine's
    # parameter order (the input norm after linear_proj) it is refused, not loaded shuffled.
    common["args"].transformer_impl = "transformer_engine"
    with pytest.raises(ValueError, match="layout"):
        megatron_lm_optimizer.bucket_states(directory, common["args"], tensors)


def test_other_distributed_optimizer_layouts_are_refused_by_name():
    from megatron_sr.checkpointing.megatron_lm_optimizer import check_model_space

    common = {"optimizer": {"param_state_sharding_type": "dp_zero_gather_scatter"}}
    with pytest.raises(ValueError, match="dp_zero_gather_scatter.*"
                                         "--dist-ckpt-optim-fully-reshardable"):
        check_model_space("ckpt", common)
    for imported in ("fully_reshardable", "fully_sharded_model_space", "dp_reshardable"):
        check_model_space("ckpt", {"optimizer": {"param_state_sharding_type": imported}})
