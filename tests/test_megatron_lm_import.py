"""Megatron-LM checkpoints as megatron-core writes them, imported (issue 33).

Spec:
- megatron-core's own GPTModel (local spec, on the CPU with Gloo) saves
  torch_dist (`dist_checkpointing.save` of its `sharded_state_dict()`, with
  Megatron-LM's common state: args holding an AttnBackend enum, numpy RNG
  state) at TP1 and TP2, GPT-2 and Llama style, with and without GQA, and
  with squared ReLU, partial rotary and qk-layernorm; and the legacy
  per-rank files. Our model built from the import computes megatron-core's
  logits (fp32, 1e-5).
- A checkpoint trained with a flag our model lacks is refused by that flag.
- A pickle naming a foreign class is refused naming the file; nothing runs.
- `--load` of a Megatron-LM directory says which command converts it.
- `--to-megatron` writes torch_dist that megatron-core's
  `dist_checkpointing.load` reads into its GPTModel with our logits.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import pytest
import torch

from megatron_sr.checkpointing import CheckpointError, megatron_lm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
import checkpoint_convert  # noqa: E402

pytest.importorskip("megatron.core")

VOCAB, SEQ = 64, 8
TOKENS = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))

# Megatron-LM args (its attribute names) of each model; TransformerConfig follows from them.
BASE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48,
            seq_length=SEQ, max_position_embeddings=SEQ, padded_vocab_size=VOCAB,
            norm_epsilon=1e-5, hidden_dropout=0.0, attention_dropout=0.0,
            params_dtype=torch.float32, bf16=False, init_method_std=0.02, iteration=7)
CASES = {
    "gpt2": dict(position_embedding_type="learned_absolute", normalization="LayerNorm",
                 add_bias_linear=True, swiglu=False, untie_embeddings_and_output_weights=False),
    "llama_gqa": dict(position_embedding_type="rope", normalization="RMSNorm",
                      add_bias_linear=False, swiglu=True, untie_embeddings_and_output_weights=True,
                      group_query_attention=True, num_query_groups=2),
    "llama": dict(position_embedding_type="rope", normalization="RMSNorm", add_bias_linear=False,
                  swiglu=True, untie_embeddings_and_output_weights=True),
    "features": dict(position_embedding_type="rope", normalization="RMSNorm",
                     add_bias_linear=False, squared_relu=True, rotary_percent=0.5,
                     qk_layernorm=True, untie_embeddings_and_output_weights=True,
                     group_query_attention=True, num_query_groups=2),
    "openai_gelu": dict(position_embedding_type="learned_absolute", normalization="LayerNorm",
                        add_bias_linear=True, openai_gelu=True,
                        untie_embeddings_and_output_weights=False),
}


def megatron_lm_args(case: str, tp: int, ckpt_format: str) -> argparse.Namespace:
    """The args Megatron-LM's training loop stores (the fields import reads),
    with an enum and a dtype as Megatron-LM pickles them."""
    from megatron.core.transformer.enums import AttnBackend

    fields = {**BASE, **CASES[case]}
    fields.setdefault("num_query_groups", fields["num_attention_heads"])
    return argparse.Namespace(**fields, tensor_model_parallel_size=tp,
                              pipeline_model_parallel_size=1, kv_channels=8,
                              attention_backend=AttnBackend.auto, ckpt_format=ckpt_format,
                              tokenizer_type="NullTokenizer", vocab_size=VOCAB - 1)


def _cpu_stand_ins():
    """What megatron-core asks of CUDA, answered on the CPU; psutil (which
    its checkpoint writer reads memory with) is not installed here."""
    import contextlib

    import megatron.core.dist_checkpointing.strategies.filesystem_async as filesystem_async
    from megatron.core import tensor_parallel

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args: None
    filesystem_async._process_memory = lambda: 0
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.fork = lambda *args, **kwargs: contextlib.nullcontext()


def _megatron_core_model(args: argparse.Namespace, pre_process: bool = True,
                         post_process: bool = True):
    import torch.nn.functional as F
    from megatron.core.activations import squared_relu
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.utils import openai_gelu

    activation = F.silu if getattr(args, "swiglu", False) else squared_relu if getattr(
        args, "squared_relu", False) else openai_gelu if getattr(args, "openai_gelu",
                                                                 False) else F.gelu
    qk_layernorm = getattr(args, "qk_layernorm", False)
    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
        ffn_hidden_size=args.ffn_hidden_size, use_cpu_initialization=True,
        params_dtype=torch.float32, add_bias_linear=args.add_bias_linear,
        gated_linear_unit=getattr(args, "swiglu", False), activation_func=activation,
        normalization=args.normalization, layernorm_epsilon=args.norm_epsilon,
        qk_layernorm=qk_layernorm, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        pipeline_dtype=torch.bfloat16,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False)
    spec = get_gpt_layer_local_spec(normalization=args.normalization, qk_layernorm=qk_layernorm)
    return GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=SEQ,
                    position_embedding_type=args.position_embedding_type,
                    share_embeddings_and_output_weights=not
                    args.untie_embeddings_and_output_weights,
                    rotary_percent=getattr(args, "rotary_percent", 1.0),
                    pre_process=pre_process, post_process=post_process)


def _megatron_core_logits(model, tp: int) -> np.ndarray:
    import torch.distributed as dist

    model.eval()
    causal = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    with torch.no_grad():
        logits = model(TOKENS, torch.arange(SEQ).unsqueeze(0).expand(2, SEQ), causal)
    if tp > 1:  # vocabulary-parallel logits: gather the TP ranks' columns
        parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(parts, logits.contiguous())
        logits = torch.cat(parts, dim=-1)
    return logits.float().numpy()


def _save_with_megatron_core(rank, world_size, case, save_dir, ckpt_format):
    """Builds megatron-core's GPTModel at TP=world_size with random weights,
    saves it as Megatron-LM does, returns its logits on TOKENS."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as mcore_parallel_state
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    _cpu_stand_ins()
    torch.manual_seed(11)
    mcore_parallel_state.initialize_model_parallel(world_size, 1)
    args = megatron_lm_args(case, world_size, ckpt_format)
    model = _megatron_core_model(args)
    with torch.no_grad():  # norms away from 1 so that a dropped norm weight shows
        for name, param in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    logits = _megatron_core_logits(model, world_size)
    directory = os.path.join(save_dir, "iter_0000007")
    common = {"args": args, "checkpoint_version": 3.0, "iteration": 7,
              "rng_state": [{"np_rng_state": np.random.get_state(),
                             "random_rng_state": ("state", 3)}]}
    if ckpt_format == "torch_dist":
        if rank == 0:
            os.makedirs(directory)
        torch.distributed.barrier()
        dist_checkpointing.save({"model": model.sharded_state_dict(), **common}, directory,
                                sharded_strategy=TorchDistSaveShardedStrategy(
                                    "torch_dist", 1, thread_count=1))
    else:
        rank_dir = os.path.join(directory, f"mp_rank_{rank:02d}")
        os.makedirs(rank_dir)
        torch.save({**common, "model": model.state_dict()},
                   os.path.join(rank_dir, "model_optim_rng.pt"))
    torch.distributed.barrier()
    if rank == 0:
        with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("7\n")
    mcore_parallel_state.destroy_model_parallel()
    return logits


def random_full_state(config) -> dict[str, torch.Tensor]:
    """Our model's full state dict at TP1, every parameter random (norms too)."""
    from megatron_sr import parallel_state
    from megatron_sr.config import ParallelConfig
    from megatron_sr.model import build_model
    from megatron_sr.model.parallel_layout import named_parameters_global

    parallel_state.initialize_model_parallel(1)
    try:
        (model,) = build_model(config, ParallelConfig(), seed=3)
        generator = torch.Generator().manual_seed(3)
        return {name: torch.randn(param.shape, generator=generator) * 0.5
                for name, param in named_parameters_global([model])}
    finally:
        parallel_state.destroy_model_parallel()


def our_logits(config, full) -> np.ndarray:
    from megatron_sr import parallel_state
    from megatron_sr.checkpointing import load_model_state
    from megatron_sr.config import ParallelConfig
    from megatron_sr.model import build_model

    config = config.__class__(**{**config.__dict__, "params_dtype": torch.float32,
                                 "hidden_dropout": 0.0, "attention_dropout": 0.0})
    parallel_state.initialize_model_parallel(1)
    try:
        (model,) = build_model(config, ParallelConfig(), seed=1)
        load_model_state([model], {k: v.float() for k, v in full.items()}, "import")
        model.eval()
        with torch.no_grad():
            return model(TOKENS).float().numpy()
    finally:
        parallel_state.destroy_model_parallel()


def _import_and_compare(rank, world_size, save_dir):
    _, config, iteration, full = megatron_lm.import_megatron_lm(save_dir)
    return config, iteration, our_logits(config, full)


def _megatron_checkpoint(tmp_path, case, tp, ckpt_format):
    from multiprocess import run_ranks

    save = str(tmp_path / f"{case}-{ckpt_format}-tp{tp}")
    os.makedirs(save)
    theirs = run_ranks(_save_with_megatron_core, tp, case, save, ckpt_format)[0]
    return save, theirs


IMPORTS = [("gpt2", 1, "torch_dist"), ("llama", 1, "torch_dist"), ("llama_gqa", 1, "torch_dist"),
           ("features", 1, "torch_dist"), ("gpt2", 2, "torch"), ("llama_gqa", 2, "torch"),
           ("gpt2", 2, "torch_dist"), ("llama_gqa", 2, "torch_dist")]


# Every test that runs megatron-core spawns ranks that import it: 20-40 s each.
@pytest.mark.slow
@pytest.mark.parametrize("case,tp,ckpt_format", IMPORTS)
def test_imported_model_computes_megatron_cores_logits(case, tp, ckpt_format, tmp_path):
    from multiprocess import run_ranks

    save, theirs = _megatron_checkpoint(tmp_path, case, tp, ckpt_format)
    config, iteration, ours = run_ranks(_import_and_compare, 1, save)[0]
    assert iteration == 7
    args = {**BASE, **CASES[case]}
    assert config.num_query_groups == args.get("num_query_groups", 4)
    assert config.activation == ("swiglu" if args.get("swiglu") else
                                 "squared_relu" if args.get("squared_relu") else "gelu")
    assert config.rotary_percent == args.get("rotary_percent", 1.0)
    assert config.qk_layernorm == args.get("qk_layernorm", False)
    assert ours.shape == theirs.shape == (2, SEQ, VOCAB)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    if ckpt_format == "torch":  # the same files with Transformer Engine's names import the same
        _, _, _, local = megatron_lm.import_megatron_lm(save)
        _rename_to_transformer_engine(save)
        _, _, _, renamed = megatron_lm.import_megatron_lm(save)
        assert list(renamed) == list(local)
        assert all(torch.equal(renamed[name], local[name]) for name in local)


def _rename_to_transformer_engine(save: str) -> None:
    """Rewrites each legacy rank file with Transformer Engine's parameter
    names (the norms fused into linear_qkv and linear_fc1) and an
    `_extra_state` per linear layer, as Megatron-LM's default spec saves."""
    from megatron_sr.checkpointing.megatron_pickle import read_megatron_pickle

    iteration = os.path.join(save, "iter_0000007")
    for rank_dir in os.listdir(iteration):
        path = os.path.join(iteration, rank_dir, "model_optim_rng.pt")
        state = read_megatron_pickle(path)
        model = {}
        for name, tensor in state["model"].items():
            if name.endswith("_extra_state"):
                continue
            model[megatron_lm.te_name(name)] = tensor
            if name.endswith("linear_qkv.weight") or name.endswith("linear_fc1.weight"):
                model[name.replace(".weight", "._extra_state")] = None
        assert any("layer_norm_weight" in name for name in model)
        torch.save({**state, "model": model}, path)


@pytest.mark.slow
def test_a_flag_our_model_lacks_is_refused_by_name(tmp_path, capsys):
    save, _ = _megatron_checkpoint(tmp_path, "openai_gelu", 1, "torch_dist")
    with pytest.raises(ValueError, match="--openai-gelu"):
        megatron_lm.import_megatron_lm(save)
    assert checkpoint_convert.main(["--load", save, "--save", str(tmp_path / "out"),
                                    "--from-megatron"]) == 1
    assert "--openai-gelu" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


class _Payload:
    """Unpickling it would call print: a stand-in for os.system."""

    def __reduce__(self):
        return (print, ("foreign code ran",))


@pytest.mark.parametrize("ckpt_format", ["torch", "torch_dist"])
def test_a_foreign_class_in_a_pickle_is_refused_naming_the_file(ckpt_format, tmp_path,
                                                                  capsys):
    save = str(tmp_path / "megatron")
    if ckpt_format == "torch":
        path = os.path.join(save, "iter_0000007", "mp_rank_00", "model_optim_rng.pt")
    else:  # a torch_dist directory whose common.pt carries the payload
        from megatron_sr.checkpointing import megatron_torch_dist

        megatron_torch_dist.export({"embedding.word_embeddings.weight": torch.zeros(4, 2)}, 0,
                                   {}, os.path.join(save, "iter_0000007"))
        path = os.path.join(save, "iter_0000007", "common.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"args": argparse.Namespace(num_layers=1), "iteration": 7, "model": {},
                "payload": _Payload()}, path)
    with open(os.path.join(save, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("7\n")
    assert checkpoint_convert.main(["--load", save, "--save", str(tmp_path / "out"),
                                    "--from-megatron"]) == 1
    captured = capsys.readouterr()
    assert "foreign code ran" not in captured.out
    assert path in captured.err and "builtins.print" in captured.err, captured.err


@pytest.mark.slow
@pytest.mark.parametrize("ckpt_format", ["torch", "torch_dist"])
def test_load_of_a_megatron_lm_directory_names_the_converter(ckpt_format, tmp_path):
    from megatron_sr.checkpointing.conversion import load_full_checkpoint

    save, _ = _megatron_checkpoint(tmp_path, "gpt2", 1, ckpt_format)
    for path in (save, os.path.join(save, "iter_0000007")):
        with pytest.raises(CheckpointError) as error:
            load_full_checkpoint(path)
        message = str(error.value)
        assert "Megatron-LM" in message and "--from-megatron" in message, message
        assert "interrupted" not in message and "\n" not in message


# ----- export: megatron-core reads our torch_dist ----------------------------------------------

def _megatron_core_loads_export(rank, world_size, case, save_dir):
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as mcore_parallel_state

    _cpu_stand_ins()
    mcore_parallel_state.initialize_model_parallel(1, 1)
    model = _megatron_core_model(megatron_lm_args(case, 1, "torch_dist"))
    with torch.serialization.safe_globals([argparse.Namespace]):
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()},
                                         os.path.join(save_dir, "iter_0000007"))
    model.load_state_dict(loaded["model"])
    logits = _megatron_core_logits(model, 1)
    mcore_parallel_state.destroy_model_parallel()
    return logits


def _our_checkpoint_and_logits(rank, world_size, case, save_dir):
    """Writes our checkpoint of `case` (random weights) to `save_dir`;
    returns our logits on TOKENS."""
    from megatron_sr.checkpointing.conversion import FullCheckpoint, write_reshaped

    args = megatron_lm_args(case, 1, "torch")
    config = megatron_lm.model_config_from_megatron_args(args)
    full = random_full_state(config)
    write_reshaped(FullCheckpoint(
        directory="", iteration=7, description=megatron_lm.description_from_megatron_args(
            args, config), config=config, model=full, optimizer=None, lr_scheduler=None,
        consumed_train_samples=0), save_dir, 1, 1)
    return our_logits(config, full)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gpt2", "features"])
def test_to_megatron_torch_dist_loads_in_megatron_core(case, tmp_path):
    from multiprocess import run_ranks

    ours = str(tmp_path / "ours")
    os.makedirs(ours)
    logits = run_ranks(_our_checkpoint_and_logits, 1, case, ours)[0]
    exported = str(tmp_path / "megatron")
    assert checkpoint_convert.main(["--load", ours, "--save", exported, "--to-megatron"]) == 0
    assert sorted(os.listdir(os.path.join(exported, "iter_0000007")))[-2:] == [
        "common.pt", "metadata.json"]
    theirs = run_ranks(_megatron_core_loads_export, 1, case, exported)[0]
    np.testing.assert_allclose(theirs, logits, rtol=0, atol=1e-5)


def test_the_printed_model_flags_build_the_imported_model():
    from megatron_sr.config import parse_args
    from megatron_sr.checkpointing.conversion import model_flags

    config = megatron_lm.model_config_from_megatron_args(megatron_lm_args("llama_gqa", 1, "torch"))
    config.rotary_percent, config.qk_layernorm, config.apply_layernorm_1p = 0.5, True, True
    job = parse_args(model_flags(config).split() + [
        "--vocab-size", "63", "--tokenizer-type", "NullTokenizer", "--micro-batch-size", "1",
        "--train-iters", "1", "--mock-data", "--untie-embeddings-and-output-weights",
        "--lr", "1e-4",
        ], world_size=1)
    built = job.model
    for field in ("num_query_groups", "rotary_percent", "qk_layernorm", "apply_layernorm_1p",
                  "activation", "ffn_hidden_size", "position_embedding_type", "normalization"):
        assert getattr(built, field) == getattr(config, field), field


def test_our_own_legacy_checkpoint_without_manifest_is_not_taken_for_megatron_lms(tmp_path):
    from megatron_sr.checkpointing import MANIFEST_FILENAME
    from megatron_sr.checkpointing.conversion import load_full_checkpoint
    from test_megatron_lm_conversion import _checkpoint

    from megatron_sr.checkpointing.conversion import write_reshaped

    save = str(tmp_path / "ours")
    os.makedirs(save)
    directory = write_reshaped(_checkpoint(megatron_lm.model_config_from_megatron_args(
        megatron_lm_args("gpt2", 1, "torch"))), save, 1, 1)
    os.remove(os.path.join(directory, MANIFEST_FILENAME))
    with pytest.raises(CheckpointError, match="interrupted"):
        load_full_checkpoint(save)
