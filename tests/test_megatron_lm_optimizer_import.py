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
  DP 2 with several buckets) and its gathered layouts (torch_dist's
  dp_zero_gather_scatter, the legacy format's distrib_optim.pt) import the
  same way, checked against the live optimizer's state; at TP2 x PP2 and TP2
  all three give the bits the model-space layout (fully_reshardable) gives.
- A layout read in the wrong parameter order, a main parameter that is not
  the saved weight, virtual or uneven pipeline bucket layouts and unknown
  layouts are refused by name.
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


def _megatron_args(case: str, tp: int = 1, pp: int = 1):
    from test_megatron_lm_import import megatron_lm_args

    args = megatron_lm_args(case, tp, "torch_dist")
    args.__dict__.update(bf16=True, params_dtype=torch.bfloat16, seed=SEED,
                         global_batch_size=BATCH, micro_batch_size=BATCH, train_iters=TRAIN_ITERS,
                         consumed_train_samples=ITERATION * BATCH, lr=1e-3, min_lr=0.0,
                         lr_decay_style="constant", use_distributed_optimizer=True,
                         pipeline_model_parallel_size=pp,
                         transformer_impl="local")  # the local layer spec it builds
    return args


def _save_iteration(save_dir, args, model, optimizer, scheduler, sharding_type) -> None:
    """Iteration 3 into `save_dir` as Megatron-LM's training loop writes it:
    `dist_checkpointing.save` with the distributed optimizer's state as
    `sharding_type`, or with sharding_type "legacy" `--ckpt-format torch`
    (per model-parallel rank `model_optim_rng.pt` and `distrib_optim.pt`)."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as mcore_parallel_state
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    directory = os.path.join(save_dir, f"iter_{ITERATION:07d}")
    os.makedirs(directory, exist_ok=True)
    if sharding_type == "legacy":
        tp_rank = mcore_parallel_state.get_tensor_model_parallel_rank()
        pp_rank = mcore_parallel_state.get_pipeline_model_parallel_rank()
        rank_dir = os.path.join(directory, f"mp_rank_{tp_rank:02d}" if args.
                                pipeline_model_parallel_size == 1 else
                                f"mp_rank_{tp_rank:02d}_{pp_rank:03d}")
        os.makedirs(rank_dir, exist_ok=True)
        optimizer.save_parameter_state(os.path.join(rank_dir, "distrib_optim.pt"))
        if mcore_parallel_state.get_data_parallel_rank() == 0:
            torch.save({"args": args, "checkpoint_version": 3.0, "iteration": ITERATION,
                        "model": model.state_dict_for_save_checkpoint(),
                        "optimizer": optimizer.state_dict(),
                        "opt_param_scheduler": scheduler.state_dict()},
                       os.path.join(rank_dir, "model_optim_rng.pt"))
        torch.distributed.barrier()
        if torch.distributed.get_rank() == 0:
            with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt"), "w") as f:
                f.write(f"{ITERATION}\n")
        return
    state = {"args": args, "checkpoint_version": 3.0, "iteration": ITERATION,
             "model": model.sharded_state_dict(),
             "num_floating_point_operations_so_far": 0}
    state["optimizer"] = optimizer.sharded_state_dict(state, metadata={
        "distrib_optim_sharding_type": sharding_type, "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True})
    state["opt_param_scheduler"] = scheduler.state_dict()
    dist_checkpointing.save(state, directory, sharded_strategy=TorchDistSaveShardedStrategy(
        "torch_dist", 1, thread_count=1))
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(f"{ITERATION}\n")


def _train_and_save_with_megatron_core(rank, world_size, save_dir, sharding_type,
                                       distributed=True, case="gpt2", bucket_size=None,
                                       tp=1, pp=1, also_save=None):
    """Three Adam steps of megatron-core's bf16 GPTModel under its
    DistributedOptimizer (`distributed`, its state saved as `sharding_type`;
    with `bucket_size` its gradient buffer is cut in buckets of about that many
    elements, reduced while the backward runs, as Megatron-LM's
    --overlap-grad-reduce does) or its mixed-precision optimizer, at tensor
    and pipeline parallel sizes `tp`, `pp` (data parallel: the rest), saved as
    Megatron-LM saves iteration 3, and also as each {sharding_type: save
    directory} of `also_save` (`_save_iteration`). Every data-parallel rank runs the
    same batch; under pipeline parallelism each stage's loss is its own output's
    (the last stage's input a fixed tensor), its gradients finalized as
    Megatron-LM's loop does (the tied embedding's copies reduced together).
    Returns, at TP = PP = 1, {name: (shape, start, (fp32 main parameter,
    exp_avg, exp_avg_sq))} of the part of each parameter (flat, from `start`)
    this rank's live optimizer holds, as numpy arrays (tensors do not outlive
    the rank's process); `_assemble` joins the ranks' parts. None otherwise."""
    from megatron.core import parallel_state as mcore_parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from test_megatron_lm_import import SEQ, TOKENS, _cpu_stand_ins, _megatron_core_model

    _cpu_stand_ins()
    torch.manual_seed(11)
    mcore_parallel_state.initialize_model_parallel(tp, pp)
    first = mcore_parallel_state.is_pipeline_first_stage()
    last = mcore_parallel_state.is_pipeline_last_stage()
    args = _megatron_args(case, tp, pp)
    stage_input = torch.randn(SEQ, 2, args.hidden_size,
                              generator=torch.Generator().manual_seed(3)).bfloat16()
    with _CudaTensorsOnCpu():
        model = _megatron_core_model(args, pre_process=first, post_process=last).bfloat16()
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
            if not first:
                model.set_input_tensor(stage_input)
            ddp(TOKENS, positions, causal).float().square().mean().backward()
            finalize_model_grads([ddp])
            assert optimizer.step()[0]
            scheduler.step(increment=BATCH)
        _save_iteration(save_dir, args, model, optimizer, scheduler, sharding_type)
        for other_sharding_type, other_dir in (also_save or {}).items():
            _save_iteration(other_dir, args, model, optimizer, scheduler, other_sharding_type)
    expected = None
    if tp == pp == 1:
        names = {id(param): name for name, param in model.named_parameters()}
        inner = optimizer.chained_optimizers[0]
        expected = {}
        groups = (zip(inner.model_float16_groups, inner.shard_fp32_from_float16_groups)
                  if distributed else zip(inner.float16_groups, inner.fp32_from_float16_groups))
        for group, mains in groups:
            for param, main in zip(group, mains):
                adam = inner.optimizer.state[main]
                start = inner._get_model_param_range_map(param)["param"].start \
                    if distributed else 0
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
# --overlap-grad-reduce's buckets, each rank saving its slice of them; and the same state
# gathered on data-parallel rank 0 (dp_zero_gather_scatter, legacy distrib_optim.pt).
@pytest.mark.slow
@pytest.mark.parametrize("case,dp,bucket_size", [("gpt2", 1, None), ("llama_gqa", 2, 4000)],
                         ids=["gpt2-dp1", "llama_gqa-dp2-buckets"])
def test_the_distributed_optimizers_bucket_layout_imports(case, dp, bucket_size, tmp_path):
    from multiprocess import run_ranks
    from megatron_sr.checkpointing import megatron_lm, megatron_lm_optimizer, megatron_torch_dist
    from megatron_sr.checkpointing.conversion import load_full_checkpoint
    from megatron_sr.precision.rounding import stochastic_round

    save = str(tmp_path / "megatron")
    gathered = {layout: str(tmp_path / layout) for layout in ("dp_zero_gather_scatter", "legacy")}
    for directory in (save, *gathered.values()):
        os.makedirs(directory)
    expected = _assemble(run_ranks(_train_and_save_with_megatron_core, dp, save,
                                   "dp_reshardable", True, case, bucket_size, 1, 1, gathered))
    directory = os.path.join(save, f"iter_{ITERATION:07d}")
    common, tensors = megatron_torch_dist.read(directory, optimizer=True)
    assert megatron_lm_optimizer.sharding_type(common) == "dp_reshardable"
    # Adam's step is read from the saved param groups, not taken from the iteration.
    assert megatron_lm_optimizer.adam_step(common, iteration=-1) == ITERATION
    buckets = [key for key in tensors
               if key.startswith("optimizer.distributed.") and key.endswith(".param")]
    assert (len(buckets) > 1) == (bucket_size is not None), buckets
    # The gathered layouts (torch_dist's dp_zero_gather_scatter, the legacy format's
    # distrib_optim.pt) coalesce the buckets without their padding: the same state.
    for source in (save, *gathered.values()):
        which = os.path.basename(source)
        _convert(source, str(tmp_path / f"{which}_sr"))
        _convert(source, str(tmp_path / f"{which}_mixed"), "--precision", "bf16-mixed")
        sr, mixed = (load_full_checkpoint(str(tmp_path / f"{which}_{precision}"))
                     for precision in ("sr", "mixed"))
        assert sr.optimizer["step"] == ITERATION and set(sr.model) == set(expected), which
        for name, (main, exp_avg, exp_avg_sq) in expected.items():
            rounded = stochastic_round(main, _documented_import_key(name))
            assert torch.equal(sr.model[name].view(torch.int16), rounded.view(torch.int16)), \
                (which, name)
            assert torch.equal(sr.optimizer["params"]["exp_avg"][name], exp_avg.bfloat16()), \
                (which, name)
            assert torch.equal(sr.optimizer["params"]["exp_avg_sq"][name],
                               exp_avg_sq.bfloat16()), (which, name)
            assert torch.equal(mixed.optimizer["params"]["master"][name], main), (which, name)
            assert torch.equal(mixed.optimizer["params"]["exp_avg"][name], exp_avg), \
                (which, name)
            assert torch.equal(mixed.optimizer["params"]["exp_avg_sq"][name], exp_avg_sq), \
                (which, name)
    # The layout is checked against the saved weights: read in Transformer Engine's
    # parameter order (the input norm after linear_proj) it is refused, not loaded shuffled.
    args = common["args"]
    args.transformer_impl = "transformer_engine"
    model = {megatron_lm.local_name(key): tensor for key, tensor in tensors.items()
             if not key.startswith("optimizer.") and not key.endswith("_extra_state")}
    with pytest.raises(ValueError, match="layout"):
        megatron_lm_optimizer.bucket_states(
            directory, args, megatron_lm.model_config_from_megatron_args(args), model,
            megatron_lm_optimizer.bucket_groups(directory, tensors))


# At tensor and pipeline parallel sizes above 1 each model-parallel rank saved the buckets of
# its own shards: GPT-2 style at TP2 x PP2 (the tied embedding's last-stage copy in the last
# stage's buffer), Llama style at TP2 (GQA's QKV rows, SwiGLU's fc1 as
# [gate; up] per TP rank). The same live optimizer also saved its state in model space
# (fully_reshardable), whose global tensors megatron-core itself assembled: both
# imports must give the same bits.
@pytest.mark.slow
@pytest.mark.parametrize("case,tp,pp,dp,bucket_size", [("gpt2", 2, 2, 1, None),
                                                       ("llama_gqa", 2, 1, 1, None)],
                         ids=["gpt2-tp2-pp2", "llama_gqa-tp2"])
def test_the_bucket_layout_imports_at_tensor_and_pipeline_parallel(case, tp, pp, dp,
                                                                   bucket_size, tmp_path):
    from multiprocess import run_ranks
    from megatron_sr.checkpointing.conversion import load_full_checkpoint

    saves = {layout: str(tmp_path / layout) for layout in
             ("fully_reshardable", "dp_reshardable", "dp_zero_gather_scatter", "legacy")}
    for directory in saves.values():
        os.makedirs(directory)
    run_ranks(_train_and_save_with_megatron_core, tp * pp * dp, saves["fully_reshardable"],
              "fully_reshardable", True, case, bucket_size, tp, pp,
              {k: v for k, v in saves.items() if k != "fully_reshardable"})
    for precision in ("bf16-sr", "bf16-mixed"):
        converted = {}
        for layout, directory in saves.items():
            _convert(directory, str(tmp_path / f"{layout}_{precision}"), "--precision", precision)
            converted[layout] = load_full_checkpoint(str(tmp_path / f"{layout}_{precision}"))
        oracle = converted.pop("fully_reshardable")
        for layout, imported in converted.items():
            assert imported.optimizer["step"] == ITERATION, layout
            assert imported.iteration == ITERATION, layout
            assert set(imported.model) == set(oracle.model), layout
            for name, weight in oracle.model.items():
                assert torch.equal(imported.model[name].view(torch.int16),
                                   weight.view(torch.int16)), (layout, name)
            for kind, named in oracle.optimizer["params"].items():
                assert set(imported.optimizer["params"][kind]) == set(named), (layout, kind)
                for name, tensor in named.items():
                    assert torch.equal(imported.optimizer["params"][kind][name], tensor), \
                        (layout, kind, name)
            assert imported.lr_scheduler == oracle.lr_scheduler, layout


def test_other_distributed_optimizer_layouts_are_refused_by_name():
    from megatron_sr.checkpointing.megatron_lm_optimizer import check_model_space

    for refused in ("fully_sharded_bucket_space", "fsdp_dtensor"):
        common = {"optimizer": {"param_state_sharding_type": refused}}
        with pytest.raises(ValueError, match=f"ckpt: .*{refused!r}.*"
                                             f"--dist-ckpt-optim-fully-reshardable"):
            check_model_space("ckpt", common)
    for imported in ("fully_reshardable", "fully_sharded_model_space", "dp_reshardable",
                     "dp_zero_gather_scatter"):
        check_model_space("ckpt", {"optimizer": {"param_state_sharding_type": imported}})


def test_a_main_parameter_that_is_not_the_weight_is_refused():
    from megatron_sr.checkpointing.megatron_lm_optimizer import parameter_states
    from megatron_sr.precision.strategies import get_strategy

    weight = torch.randn(4, 3).bfloat16()
    main = weight.float()
    kinds = {"param": {"w": main}, "exp_avg": {"w": torch.zeros(4, 3)},
             "exp_avg_sq": {"w": torch.zeros(4, 3)}}
    weights, _ = parameter_states("ckpt", {"w": weight}, kinds, get_strategy("bf16-mixed"), 1, 3)
    assert torch.equal(weights["w"], weight)
    kinds["param"]["w"] = main + 0.5  # e.g. a state saved from another run's buffers
    with pytest.raises(ValueError, match="ckpt: the optimizer's main parameter for w is not "
                                         "the saved weight"):
        parameter_states("ckpt", {"w": weight}, kinds, get_strategy("bf16-mixed"), 1, 3)


@pytest.mark.parametrize("flag", ["virtual_pipeline_model_parallel_size",
                                  "decoder_first_pipeline_num_layers"])
def test_bucket_layouts_of_uneven_or_virtual_pipelines_are_refused_by_flag(flag):
    import argparse

    from megatron_sr.checkpointing.megatron_lm_optimizer import bucket_states

    args = argparse.Namespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=2,
                              **{flag: 2})
    with pytest.raises(ValueError, match=f"ckpt: .*bucket layout under "
                                         f"--{flag.replace('_', '-')}.*"
                                         f"--dist-ckpt-optim-fully-reshardable"):
        bucket_states("ckpt", args, None, {}, {})
