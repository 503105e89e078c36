"""Megatron-style flags -> validated typed configs: defaults, aliases, the
mapping to each config, derived sizes, and one clear message per invalid
combination (each naming the flags at fault)."""
import ast
import inspect
import traceback
import warnings

import pytest
import torch

from megatron_sr.config import arguments
from megatron_sr.config import build_parser, job_config_from_args, parse_args

# A minimal valid command line, as (flag, value) pairs so cases can drop flags.
BASE = [("--num-layers", "4"), ("--hidden-size", "64"), ("--num-attention-heads", "4"),
        ("--seq-length", "32"), ("--lr", "1e-3"), ("--train-iters", "100"), ("--mock-data", None),
        ("--tokenizer-type", "NullTokenizer"), ("--vocab-size", "1000")]


def argv(*extra: str, drop: tuple = ()) -> list[str]:
    out = []
    for flag, value in BASE:
        if flag not in drop:
            out += [flag] if value is None else [flag, value]
    return out + list(extra)


def job(*extra: str, world_size: int = 1, drop: tuple = ()):
    return parse_args(argv(*extra, drop=drop), world_size)


def test_defaults():
    j = job()
    assert j.optimizer.precision == "bf16-sr"
    assert j.model.params_dtype == torch.bfloat16
    assert j.model.vocab_size == 0 and j.unpadded_vocab_size is None  # until the tokenizer is known
    assert j.model.ffn_hidden_size == 256 and j.model.max_position_embeddings == 32
    assert j.model.activation == "gelu" and j.model.add_bias_linear
    assert j.model.recompute_granularity is None
    assert j.training.global_batch_size == 1 and j.training.train_iters == 100
    assert j.num_microbatches == 1 and j.data_parallel_size == 1
    assert j.optimizer.lr_decay_style == "linear" and j.optimizer.lr_warmup_iters == 0
    assert j.parallel.virtual_pipeline_model_parallel_size is None
    assert j.data.seq_length == 32 and j.data.data_path == [] and j.data.mock_data
    assert j.training.seed == 1234 and j.make_vocab_size_divisible_by == 128


def test_model_config_mapping():
    j = job("--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
            "--normalization", "RMSNorm", "--norm-epsilon", "1e-6", "--position-embedding-type",
            "rope", "--rotary-base", "500000", "--init-method-std", "0.01", "--hidden-dropout", "0",
            "--attention-dropout", "0.05", "--ffn-hidden-size", "96")
    m = j.model
    assert (m.activation, m.add_bias_linear) == ("swiglu", False)
    assert m.untie_embeddings_and_output_weights
    assert (m.normalization, m.layernorm_epsilon) == ("RMSNorm", 1e-6)
    assert (m.position_embedding_type, m.rotary_base) == ("rope", 500000.0)
    assert (m.init_method_std, m.hidden_dropout, m.attention_dropout) == (0.01, 0.0, 0.05)
    assert m.ffn_hidden_size == 96


def test_squared_relu_sets_the_activation_and_keeps_the_4h_mlp():
    m = job("--squared-relu").model
    assert (m.activation, m.ffn_hidden_size) == ("squared_relu", 4 * m.hidden_size)


def test_add_qkv_bias_biases_qkv_only_and_is_implied_by_linear_biases():
    qwen = job("--disable-bias-linear", "--add-qkv-bias").model
    assert (qwen.add_bias_linear, qwen.add_qkv_bias, qwen.qkv_bias) == (False, True, True)
    assert not job("--disable-bias-linear").model.qkv_bias
    assert job().model.qkv_bias and not job().model.add_qkv_bias  # every linear has a bias


@pytest.mark.parametrize("given, canonical", [("rmsnorm", "RMSNorm"), ("RMSNORM", "RMSNorm"),
                                              ("layernorm", "LayerNorm"),
                                              ("LayerNorm", "LayerNorm")])
def test_normalization_is_accepted_in_any_case(given, canonical):
    assert job("--normalization", given).model.normalization == canonical
    assert job(f"--normalization={given}").model.normalization == canonical


def test_unknown_normalization_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit):
        job("--normalization", "batchnorm")
    err = capsys.readouterr().err
    assert "--normalization: invalid choice: 'batchnorm'" in err and "RMSNorm" in err


def test_no_position_embedding_is_accepted_with_rope():
    model = job("--no-position-embedding", "--position-embedding-type", "rope").model
    assert model.position_embedding_type == "rope"


@pytest.mark.parametrize("hidden, ffn", [(64, 128), (96, 256), (1024, 2688), (4096, 10880)])
def test_swiglu_ffn_default_is_two_thirds_of_4h_rounded_down_to_64(hidden, ffn):
    assert job("--swiglu", "--hidden-size", str(hidden)).model.ffn_hidden_size == ffn


@pytest.mark.parametrize("flags, precision, dtype", [
    ((), "bf16-sr", torch.bfloat16),
    (("--bf16",), "bf16-mixed", torch.bfloat16),
    (("--bf16", "--precision", "bf16-mixed"), "bf16-mixed", torch.bfloat16),
    (("--precision", "bf16"), "bf16", torch.bfloat16),
    (("--precision", "bf16-kahan"), "bf16-kahan", torch.bfloat16),
    (("--precision", "fp32"), "fp32", torch.float32),
    (("--precision", "amp"), "amp", torch.float32),
])
def test_precision_decides_the_param_dtype(flags, precision, dtype):
    j = job(*flags)
    assert j.optimizer.precision == precision and j.model.params_dtype == dtype


def test_optimizer_state_and_grad_reduce_dtypes_pass_through():
    j = job("--optimizer-state-dtype", "fp32", "--grad-reduce-dtype", "fp32")
    assert (j.optimizer.optimizer_state_dtype, j.optimizer.grad_reduce_dtype) == ("fp32", "fp32")


def test_megatron_fp32_grad_accumulation_flag_is_grad_reduce_dtype_fp32():
    assert job("--accumulate-allreduce-grads-in-fp32").optimizer.grad_reduce_dtype == "fp32"
    assert job().optimizer.grad_reduce_dtype is None
    with pytest.raises(ValueError, match="--accumulate-allreduce-grads-in-fp32 .* conflicts"):
        job("--accumulate-allreduce-grads-in-fp32", "--grad-reduce-dtype", "bf16")


def test_gradient_accumulation_fusion_is_opt_in():
    assert job("--gradient-accumulation-fusion").model.gradient_accumulation_fusion
    assert not job().model.gradient_accumulation_fusion
    assert not job("--no-gradient-accumulation-fusion").model.gradient_accumulation_fusion
    with pytest.raises(SystemExit):
        job("--gradient-accumulation-fusion", "--no-gradient-accumulation-fusion")


def test_megatron_aliases():
    assert job("--recompute-activations").model.recompute_granularity == "selective"
    assert job("--recompute-granularity", "full").model.recompute_granularity == "full"
    assert job("--layernorm-epsilon", "1e-6").model.layernorm_epsilon == 1e-6
    assert job("--override-opt_param-scheduler").optimizer.override_opt_param_scheduler
    assert job("--use-checkpoint-opt_param-scheduler").optimizer.use_checkpoint_opt_param_scheduler


def test_optimizer_and_training_mapping():
    j = job("--min-lr", "1e-5", "--weight-decay", "0.1", "--clip-grad", "0.5", "--adam-beta1", "0.8",
            "--adam-beta2", "0.95", "--adam-eps", "1e-6", "--lr-decay-style", "cosine",
            "--lr-decay-iters", "80", "--lr-warmup-fraction", "0.05", "--micro-batch-size", "2",
            "--global-batch-size", "16", "--eval-interval", "10", "--eval-iters", "0",
            "--log-interval", "1", "--exit-interval", "50", "--exit-duration-in-mins", "30",
            "--seed", "7", "--save", "ck", "--save-interval", "10", "--load", "ck",
            "--tensorboard-dir", "tb", "--max-skipped-iterations", "3", "--split", "98,2,0",
            world_size=2)
    o, t = j.optimizer, j.training
    assert (o.lr, o.min_lr, o.weight_decay, o.clip_grad) == (1e-3, 1e-5, 0.1, 0.5)
    assert (o.adam_beta1, o.adam_beta2, o.adam_eps) == (0.8, 0.95, 1e-6)
    assert (o.lr_decay_style, o.lr_decay_iters, o.lr_warmup_fraction) == ("cosine", 80, 0.05)
    assert (t.micro_batch_size, t.global_batch_size, j.num_microbatches) == (2, 16, 4)
    assert (t.eval_interval, t.eval_iters, t.log_interval, t.exit_interval) == (10, 0, 1, 50)
    assert (t.exit_duration_in_mins, t.seed, t.save_interval) == (30.0, 7, 10)
    assert (t.save, t.load) == ("ck", "ck")
    assert (t.tensorboard_dir, t.max_skipped_iterations, j.data.split) == ("tb", 3, "98,2,0")


def test_data_mapping():
    j = job("--data-path", "0.3", "a", "0.7", "b", "--tokenizer-type", "GPT2BPETokenizer",
            "--vocab-file", "v.json", "--merge-file", "m.txt", "--data-cache-path", "cache",
            "--num-workers", "2", drop=("--mock-data",))
    d = j.data
    assert d.data_path == ["0.3", "a", "0.7", "b"] and not d.mock_data
    assert (d.tokenizer_type, d.vocab_file, d.merge_file) == ("GPT2BPETokenizer", "v.json", "m.txt")
    assert (d.data_cache_path, d.num_workers) == ("cache", 2)
    assert job("--data-path", "a", "b", drop=("--mock-data",)).data.data_path == ["a", "b"]


def test_parallel_mapping_and_derived_sizes():
    j = job("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
            "--sequence-parallel", "--use-distributed-optimizer", "--overlap-grad-reduce",
            "--overlap-param-gather", "--distributed-backend", "gloo",
            "--distributed-timeout-minutes", "1.5", "--micro-batch-size", "2",
            "--global-batch-size", "24", world_size=12)
    p = j.parallel
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size) == (2, 2)
    assert p.sequence_parallel and p.use_distributed_optimizer
    assert p.overlap_grad_reduce and p.overlap_param_gather
    assert (p.distributed_backend, p.distributed_timeout_minutes) == ("gloo", 1.5)
    assert (j.world_size, j.data_parallel_size, j.num_microbatches) == (12, 3, 4)


def test_global_batch_defaults_to_micro_times_data_parallel():
    j = job("--micro-batch-size", "3", "--tensor-model-parallel-size", "2", world_size=8)
    assert (j.training.global_batch_size, j.num_microbatches) == (12, 1)


@pytest.mark.parametrize("layers, pp, per_stage, vp", [(8, 2, 2, 2), (8, 2, 1, 4), (12, 3, 2, 2),
                                                       (8, 2, 4, 1)])
def test_virtual_pipeline_size_is_layers_over_pp_over_layers_per_stage(layers, pp, per_stage, vp):
    j = job("--num-layers", str(layers), "--pipeline-model-parallel-size", str(pp),
            "--num-layers-per-virtual-pipeline-stage", str(per_stage),
            "--global-batch-size", str(pp), world_size=pp)
    assert j.parallel.virtual_pipeline_model_parallel_size == vp


def test_train_samples_gives_whole_iterations_of_the_global_batch():
    j = job("--train-samples", "1000", "--global-batch-size", "16", drop=("--train-iters",))
    assert (j.training.train_samples, j.training.train_iters) == (1000, 62)


def test_lr_samples_flags_become_iterations():
    j = job("--train-samples", "1600", "--global-batch-size", "16", "--lr-decay-samples", "1280",
            "--lr-warmup-samples", "160", "--lr-decay-style", "WSD", "--lr-wsd-decay-samples", "320",
            drop=("--train-iters",))
    o = j.optimizer
    assert (o.lr_decay_iters, o.lr_warmup_iters, o.lr_wsd_decay_iters) == (80, 10, 20)


def test_lr_samples_not_a_multiple_of_the_batch_round_with_a_notice():
    # Megatron's Llama-3 8B script: --lr-warmup-samples 3906252 with a global batch of 128.
    j = job("--train-samples", "100000000", "--global-batch-size", "128",
            "--lr-warmup-samples", "3906252", drop=("--train-iters",))
    assert j.optimizer.lr_warmup_iters == 30518  # 3906252 / 128 = 30517.6
    assert any("--lr-warmup-samples 3906252 is not a multiple of --global-batch-size 128" in n
               and "uses 30518" in n for n in j.notices)


def test_tp_and_pp_without_sequence_parallel_get_a_notice():
    flags = ("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2")
    notice = "without --sequence-parallel: each of the 2 TP ranks sends the whole activation"
    assert any(notice in n for n in job(*flags, world_size=4).notices)
    assert not any(notice in n for n in job(*flags, "--sequence-parallel", world_size=4).notices)


def test_sequence_parallel_with_tp1_is_ignored_with_a_warning():
    with pytest.warns(UserWarning, match="--sequence-parallel"):
        assert not job("--sequence-parallel").parallel.sequence_parallel


def test_finetune_implies_no_load_optim_and_rng():
    t = job("--finetune", "--load", "ck").training
    assert t.finetune and t.no_load_optim and t.no_load_rng
    t = job("--no-load-rng", "--load", "ck").training
    assert t.no_load_rng and not t.no_load_optim and not t.finetune


def test_vocab_padding_once_the_tokenizer_is_known():
    j = job("--tensor-model-parallel-size", "2", world_size=2)
    padded = j.with_vocab_size(50257)
    assert padded.model.vocab_size == 50432 and padded.unpadded_vocab_size == 50257  # 197 x 256
    assert j.model.vocab_size == 0  # the original is unchanged
    assert job("--make-vocab-size-divisible-by", "1").with_vocab_size(1001).model.vocab_size == 1001
    assert j.with_vocab_size(256).model.vocab_size == 256
    with pytest.raises(ValueError, match="vocabulary size"):
        j.with_vocab_size(0)


@pytest.mark.parametrize("bad", [["--no-such-flag"], ["--num-lay", "4"], ["--precision", "fp8"],
                                 ["--lr-decay-style", "exp"], ["--num-layers", "four"]])
def test_argparse_rejects_unknown_abbreviated_and_malformed_flags(bad, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv(*bad), 1)
    assert "error" in capsys.readouterr().err


def test_data_source_dataloader_and_skip_train_flags():
    j = job()
    assert (j.data.dataloader_type, j.training.skip_train) == ("single", False)
    assert j.data.train_data_path == j.data.valid_data_path == j.data.test_data_path == []
    j = job("--train-data-path", "0.3", "a", "0.7", "b", "--valid-data-path", "v",
            "--test-data-path", "t", "--dataloader-type", "cyclic", drop=("--mock-data",))
    assert (j.data.data_path, j.data.train_data_path, j.data.valid_data_path,
            j.data.test_data_path) == ([], ["0.3", "a", "0.7", "b"], ["v"], ["t"])
    assert j.data.dataloader_type == "cyclic"
    j = job("--valid-data-path", "v", "--skip-train", drop=("--mock-data",))
    assert j.training.skip_train and j.training.no_load_optim
    assert any("--skip-train implies --no-load-optim" in n for n in j.notices)
    assert not any("--no-load-optim" in n for n in job("--skip-train", "--no-load-optim").notices)


def test_dataloader_type_external_is_refused_with_its_row_reason():
    with pytest.raises(ValueError, match="--dataloader-type external: an external data loader "
                                         "is not supported"):
        job("--dataloader-type", "external")


def test_extra_args_provider_adds_a_tools_flags():
    parser = build_parser(lambda p: p.add_argument("--world-size", type=int, default=1))
    args = parser.parse_args(argv("--world-size", "4", "--tensor-model-parallel-size", "4"))
    j = job_config_from_args(args, world_size=args.world_size)
    assert (j.world_size, j.parallel.tensor_model_parallel_size) == (4, 4)


# (extra flags, flags dropped from BASE, world size, flags the message must name)
INVALID = [
    ((), ("--num-layers", "--hidden-size"), 1, ["--num-layers", "--hidden-size"]),
    ((), ("--lr",), 1, ["--lr"]),
    ((), ("--seq-length",), 1, ["--seq-length"]),
    ((), ("--train-iters",), 1, ["--train-iters", "--train-samples"]),
    (("--train-samples", "100"), (), 1, ["--train-iters", "--train-samples"]),
    ((), ("--mock-data",), 1, ["--data-path", "--mock-data"]),
    (("--data-path", "corpus"), (), 1, ["--data-path", "--mock-data"]),
    (("--data-path", "0.5", "a", "0.5"), ("--mock-data",), 1, ["--data-path"]),
    (("--data-path", "a", "0.5", "b"), ("--mock-data",), 1, ["--data-path"]),
    (("--split", "90,5,4,1"), (), 1, ["--split"]),
    (("--tokenizer-type", "GPT2BPETokenizer"), (), 1, ["--tokenizer-type", "--vocab-file",
                                                       "--merge-file"]),
    (("--tokenizer-type", "SentencePieceTokenizer"), (), 1, ["--tokenizer-model"]),
    ((), ("--vocab-size",), 1, ["NullTokenizer", "--vocab-size"]),
    (("--micro-batch-size", "4", "--global-batch-size", "6"), (), 2,
     ["--global-batch-size", "--micro-batch-size", "data-parallel size"]),
    (("--micro-batch-size", "0"), (), 1, ["--micro-batch-size"]),
    (("--train-samples", "3", "--global-batch-size", "4"), ("--train-iters",), 1,
     ["--train-samples", "--global-batch-size"]),
    (("--lr-warmup-fraction", "1.0"), (), 1, ["--lr-warmup-fraction"]),
    (("--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "5"), (), 1,
     ["--lr-warmup-fraction", "--lr-warmup-iters"]),
    (("--lr-warmup-iters", "100"), (), 1, ["--lr-warmup-iters", "--lr-decay-iters"]),
    (("--min-lr", "0.01"), (), 1, ["--min-lr", "--lr"]),
    (("--lr-decay-style", "WSD"), (), 1, ["--lr-wsd-decay-iters"]),
    (("--lr-decay-samples", "50"), (), 1, ["--lr-decay-samples", "--train-samples"]),
    (("--train-samples", "1600", "--global-batch-size", "16", "--lr-decay-iters", "80",
      "--lr-decay-samples", "1280"), ("--train-iters",), 1, ["--lr-decay-iters", "--lr-decay-samples"]),
    (("--fp8-format", "hybrid"), (), 1, ["--fp8-format"]),
    (("--context-parallel-size", "2"), (), 1, ["--context-parallel-size"]),
    (("--decoupled-min-lr", "1e-4"), (), 1, ["--decoupled-min-lr", "--decoupled-lr"]),
    (("--rotary-percent", "1.5"), (), 1, ["--rotary-percent"]),
    (("--no-position-embedding",), (), 1, ["--no-position-embedding",
                                           "--position-embedding-type rope"]),
    (("--no-position-embedding", "--position-embedding-type", "learned_absolute"), (), 1,
     ["--no-position-embedding", "--position-embedding-type learned_absolute"]),
    (("--grad-reduce-in-bf16", "--grad-reduce-dtype", "fp32"), (), 1,
     ["--grad-reduce-in-bf16", "--grad-reduce-dtype"]),
    (("--recompute-method", "block"), (), 1, ["--recompute-method", "--recompute-granularity"]),
    (("--num-query-groups", "2"), (), 1, ["--num-query-groups", "--group-query-attention"]),
    (("--group-query-attention",), (), 1, ["--group-query-attention", "--num-query-groups"]),
    (("--group-query-attention", "--num-query-groups", "3"), (), 1,
     ["--num-attention-heads", "--num-query-groups"]),
    (("--rampup-batch-size", "0", "1", "10"), (), 1, ["--rampup-batch-size"]),
    (("--micro-batch-size", "2", "--global-batch-size", "4", "--rampup-batch-size", "1", "1", "8"),
     (), 1, ["--rampup-batch-size", "--micro-batch-size"]),
    (("--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
      "--global-batch-size", "4", "--rampup-batch-size", "1", "1", "8"), (), 2,
     ["--rampup-batch-size", "--pipeline-model-parallel-size"]),
    (("--global-batch-size", "4", "--rampup-batch-size", "1", "2", "8"), (), 1,
     ["--rampup-batch-size", "--global-batch-size"]),
    (("--step-batch-size-schedule", "0:2", "--rampup-batch-size", "1", "1", "8"), (), 1,
     ["--step-batch-size-schedule", "--rampup-batch-size"]),
    (("--step-batch-size-schedule", "0:2 64"), (), 1, ["--step-batch-size-schedule", "TOKENS:BATCH"]),
    (("--step-batch-size-schedule", "0:2 x:4"), (), 1, ["--step-batch-size-schedule", "'x'"]),
    (("--micro-batch-size", "2", "--step-batch-size-schedule", "0:3"), (), 1,
     ["--step-batch-size-schedule", "--micro-batch-size"]),
    (("--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
      "--step-batch-size-schedule", "0:1 64:2"), (), 2,
     ["--step-batch-size-schedule", "--pipeline-model-parallel-size"]),
    (("--step-batch-size-schedule", "0:1 64:2 70:4"), (), 1,
     ["--step-batch-size-schedule", "--seq-length"]),
    (("--step-batch-size-schedule", "32:1"), (), 1, ["--step-batch-size-schedule", "0 tokens"]),
    (("--global-batch-size", "4", "--step-batch-size-schedule", "0:2"), (), 1,
     ["--global-batch-size", "--step-batch-size-schedule"]),
    (("--override-opt-param-scheduler", "--use-checkpoint-opt-param-scheduler"), (), 1,
     ["--override-opt-param-scheduler", "--use-checkpoint-opt-param-scheduler"]),
    (("--save-interval", "10"), (), 1, ["--save-interval", "--save"]),
    (("--finetune",), (), 1, ["--finetune", "--load"]),
    (("--ckpt-step", "2"), (), 1, ["--ckpt-step", "--load"]),
    (("--exit-on-missing-checkpoint",), (), 1, ["--exit-on-missing-checkpoint", "--load"]),
    (("--use-checkpoint-args",), (), 1, ["--use-checkpoint-args", "--load"]),
    (("--use-mp-args-from-checkpoint-args",), (), 1,
     ["--use-mp-args-from-checkpoint-args", "--use-checkpoint-args"]),
    (("--async-save", "--ckpt-format", "torch"), (), 1, ["--async-save", "--ckpt-format"]),
    (("--fp16",), (), 1, ["--fp16", "--precision"]),
    (("--bf16", "--precision", "bf16-sr"), (), 1, ["--bf16", "--precision"]),
    (("--accumulate-allreduce-grads-in-fp32", "--grad-reduce-dtype", "bf16"), (), 1,
     ["--accumulate-allreduce-grads-in-fp32", "--grad-reduce-dtype"]),
    (("--precision", "bf16-mixed", "--optimizer-state-dtype", "fp32"), (), 1,
     ["--optimizer-state-dtype", "--precision"]),
    (("--recompute-activations", "--recompute-granularity", "full"), (), 1,
     ["--recompute-activations", "--recompute-granularity"]),
    (("--gradient-accumulation-fusion", "--precision", "amp"), (), 1,
     ["--gradient-accumulation-fusion", "--precision"]),
    (("--hidden-dropout", "1.0"), (), 1, ["--hidden-dropout"]),
    (("--adam-beta2", "1.5"), (), 1, ["--adam-beta2"]),
    (("--adam-eps", "0"), (), 1, ["--adam-eps"]),
    (("--weight-decay", "-0.1"), (), 1, ["--weight-decay"]),
    (("--max-position-embeddings", "16"), (), 1, ["--max-position-embeddings", "--seq-length"]),
    (("--swiglu", "--hidden-size", "16"), (), 1, ["--swiglu", "--ffn-hidden-size"]),
    (("--squared-relu", "--swiglu"), (), 1, ["--squared-relu", "--swiglu"]),
    (("--overlap-param-gather",), (), 1, ["--overlap-param-gather", "--use-distributed-optimizer"]),
    (("--tensor-model-parallel-size", "8"), (), 8, ["--num-attention-heads",
                                                    "--tensor-model-parallel-size"]),
    (("--tensor-model-parallel-size", "4"), (), 6, ["--tensor-model-parallel-size"]),
    (("--hidden-size", "66"), (), 1, ["--hidden-size", "--num-attention-heads"]),
    (("--pipeline-model-parallel-size", "3"), (), 3, ["--num-layers",
                                                      "--pipeline-model-parallel-size"]),
    (("--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"), (), 2,
     ["--num-layers", "--num-layers-per-virtual-pipeline-stage"]),
    (("--num-layers-per-virtual-pipeline-stage", "2"), (), 1,
     ["--num-layers-per-virtual-pipeline-stage", "--pipeline-model-parallel-size"]),
    (("--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"), (), 2,
     ["--global-batch-size", "--pipeline-model-parallel-size"]),
    (("--sequence-parallel", "--tensor-model-parallel-size", "2", "--seq-length", "33",
      "--max-position-embeddings", "33"), (), 2, ["--sequence-parallel", "--seq-length"]),
    (("--seed", str(2**40)), (), 1, ["--seed", str(2**40)]),
    (("--lr", "nan"), (), 1, ["--lr", "finite"]),
    (("--data-cache-path", "/dev/null/cache"), (), 1, ["--data-cache-path /dev/null/cache",
                                                       "not a folder"]),
    (("--global-batch-size", "4000000000"), (), 1, ["--global-batch-size 4000000000",
                                                     "micro-batches per step"]),
    (("--split", "nan"), (), 1, ["--split 'nan'"]),
    (("--data-path", "nan", "a"), ("--mock-data",), 1, ["--data-path nan a", "finite"]),
    (("--train-data-path", "a"), (), 1, ["--train-data-path", "--mock-data"]),
    (("--train-data-path", "a", "--data-path", "b"), ("--mock-data",), 1,
     ["--data-path", "--train-data-path"]),
    (("--train-data-path", "a", "--valid-data-path", "0.5", "b", "c"), ("--mock-data",), 1,
     ["--valid-data-path 0.5 b c"]),
    (("--train-data-path", "a", "--split", "90,10,0"), ("--mock-data",), 1,
     ["--split", "--train-data-path"]),
    (("--valid-data-path", "a"), ("--mock-data",), 1,
     ["--valid-data-path", "--train-data-path", "--skip-train"]),
]


@pytest.mark.parametrize("extra, drop, world_size, flags", INVALID,
                         ids=[" ".join(c[0] + tuple("-" + d for d in c[1])) for c in INVALID])
def test_invalid_combination_names_the_flags(extra, drop, world_size, flags):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError) as err:
            job(*extra, drop=drop, world_size=world_size)
    for flag in flags:
        assert flag in str(err.value), f"{flag} not named in: {err.value}"


def _raising_line(error: BaseException) -> tuple[str, int]:
    """(file, line) of the `raise` that raised `error`."""
    frame = traceback.extract_tb(error.__traceback__)[-1]
    return frame.filename, frame.lineno


def test_every_check_of_arguments_py_has_an_invalid_case():
    """Each `raise ValueError` of megatron_sr/config/arguments.py is what fails some
    command line of INVALID (or `with_vocab_size` of 0 or 10**12), so a check without a
    case, or a case that fails for another reason, is noticed."""
    source = inspect.getsource(arguments)
    raises = {node.lineno for node in ast.walk(ast.parse(source))
              if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)
              and getattr(node.exc.func, "id", None) == "ValueError"}
    assert raises
    reached = set()
    for extra, drop, world_size, _ in INVALID:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(ValueError) as err:
                job(*extra, drop=drop, world_size=world_size)
        reached.add(_raising_line(err.value))
    for vocab_size in (0, 10**12):
        with pytest.raises(ValueError) as err:
            job().with_vocab_size(vocab_size)
        reached.add(_raising_line(err.value))
    in_arguments = {line for path, line in reached if path == arguments.__file__}
    assert sorted(raises - in_arguments) == [], "checks of arguments.py without an INVALID case"


@pytest.mark.parametrize("dest, low", arguments._INT_MINIMUMS)
def test_every_integer_flag_below_its_minimum_is_named(dest, low):
    flag = "--" + dest.replace("_", "-")
    drop = ("--train-iters",) if dest == "train_samples" else ()  # one of the two, not both
    with pytest.raises(ValueError, match=f"{flag} must be >= {low}, got {low - 1}"):
        job(flag, str(low - 1), drop=drop)


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "-inf"])
@pytest.mark.parametrize("dest", [row[0] for row in arguments._FLOAT_RANGES])
def test_every_float_flag_out_of_range_or_not_finite_is_named(dest, value):
    flag = "--" + dest.replace("_", "-")
    with pytest.raises(ValueError, match=f"{flag} must be a finite number in "):
        job(f"{flag}={value}",  # "=": argparse reads a bare -inf as a flag
            *(("--decoupled-lr", "1e-3") if dest == "decoupled_min_lr" else ()))
