"""Megatron-LM's own launch scripts parse here unchanged, minus FP8; MLCommons'
GPT-3 reference parses and stops naming each flag megatron_sr refuses or has not
implemented yet; the foreign flags issue 33 found most used are accepted with a
notice each.

The flag lists below are copied verbatim from Megatron-LM's
examples/gpt3/train_gpt3_175b_distributed.sh (the version after
NVIDIA/Megatron-LM#4411 replaced --rampup-batch-size with
--step-batch-size-schedule; GPT3_175B_RAMPUP swaps the older flag back) and
examples/llama/train_llama3_8b_h100_fp8.sh (real-data branch; the mock
branch's extra flags are in LLAMA3_8B_MOCK), with the shell variables filled
in. Word splitting is the shell's (shlex): the script's "--split '99,1,0'"
reaches argparse with its quotes. The GPT-3 script expands its flag arrays
unquoted, so its quoted schedule reaches argparse as six words;
`_shell_words` gives that argv too.
"""
import shlex

import pytest

from megatron_sr.config import build_parser, job_config_from_args
from megatron_sr.config.megatron_compat import REFUSING, megatron_table

GPT3_175B = """
    --num-layers 96
    --hidden-size 12288
    --num-attention-heads 96
    --seq-length 2048
    --max-position-embeddings 2048
    --attention-backend auto
    --micro-batch-size 1
    --global-batch-size 1536
    --step-batch-size-schedule "0:16 2.4B:320 4.8B:624 7.2B:928 9.6B:1232 12B:1536"
    --train-iters 500000
    --weight-decay 0.1
    --adam-beta1 0.9
    --adam-beta2 0.95
    --init-method-std 0.006
    --clip-grad 1.0
    --fp16
    --lr 6.0e-5
    --lr-decay-style cosine
    --min-lr 6.0e-6
    --lr-warmup-fraction .001
    --lr-decay-iters 430000
    --tensor-model-parallel-size 8
    --pipeline-model-parallel-size 16
    --data-path /data/my-gpt3_00_text_document
    --vocab-file /data/gpt2-vocab.json
    --merge-file /data/gpt2-merges.txt
    --split 949,50,1
    --log-interval 100
    --save-interval 10000
    --eval-interval 1000
    --save /ckpt
    --load /ckpt
    --eval-iters 10
    --tensorboard-dir /tb
"""

LLAMA3_8B = """
    --use-mcore-models
    --num-layers 32
    --hidden-size 4096
    --ffn-hidden-size 14336
    --num-attention-heads 32
    --group-query-attention
    --num-query-groups 8
    --kv-channels 128
    --seq-length 8192
    --max-position-embeddings 8192
    --position-embedding-type rope
    --rotary-base 1000000
    --rotary-percent 1.0
    --attention-dropout 0.0
    --hidden-dropout 0.0
    --swiglu
    --normalization RMSNorm
    --init-method-std 0.0134
    --attention-backend fused
    --apply-layernorm-1p
    --untie-embeddings-and-output-weights
    --disable-bias-linear
    --micro-batch-size 1
    --global-batch-size 128
    --train-samples 1953125000
    --lr-decay-samples 1949218748
    --lr-warmup-samples 3906252
    --lr 0.00015
    --min-lr 0.00001
    --decoupled-lr 5.0e-4
    --decoupled-min-lr 4.5e-5
    --lr-decay-style cosine
    --clip-grad 1.0
    --weight-decay 0.1
    --adam-beta1 0.9
    --adam-beta2 0.95
    --bf16
    --grad-reduce-in-bf16
    --cross-entropy-loss-fusion
    --calculate-per-token-loss
    --manual-gc
    --empty-unused-memory-level 1
    --exit-duration-in-mins 235
    --use-distributed-optimizer
    --overlap-grad-reduce
    --overlap-param-gather
    --fp8-format hybrid
    --fp8-amax-history-len 1024
    --fp8-amax-compute-algo max
    --fp8-param-gather
    --tensor-model-parallel-size 1
    --context-parallel-size 1
    --sequence-parallel
    --data-path /data/llama_text_document
    --tokenizer-type HuggingFaceTokenizer
    --tokenizer-model /models/llama3
    --data-cache-path /cache
    --split '99,1,0'
    --no-create-attention-mask-in-dataloader
    --no-mmap-bin-files
    --num-workers 1
    --vocab-size 128256
    --log-interval 1
    --eval-iters 32
    --eval-interval 100
    --save-interval 1000
    --log-throughput
    --profile
    --profile-step-start 4
    --profile-step-end 6
    --ckpt-format torch_dist
    --distributed-timeout-minutes 60
    --save /ckpt
    --load /ckpt
    --tensorboard-dir /tb
"""
GPT3_175B_RAMPUP = GPT3_175B.replace(
    '--step-batch-size-schedule "0:16 2.4B:320 4.8B:624 7.2B:928 9.6B:1232 12B:1536"',
    "--rampup-batch-size 16 16 5859375")
# (first sample, global batch size): the script's token thresholds / --seq-length 2048.
GPT3_175B_SCHEDULE = ((0, 16), (1171875, 320), (2343750, 624), (3515625, 928), (4687500, 1232),
                      (5859375, 1536))

LLAMA3_8B_MOCK = """
    --mock-data
    --tokenizer-type NullTokenizer
    --vocab-size 128256
    --tiktoken-pattern v2
"""

# mlcommons/training large_language_model/megatron-lm/run_gpt3.sh (MLCommons' GPT-3
# reference), its options string with the variables filled in (GBS 1536, EVAL_INTERVAL 16,
# its data blend shortened to one prefix each); USE_BF16=true appends --bf16, which is the
# precision flag changed here to --precision bf16-sr. The external-checkpoint branch's flags
# are MLCOMMONS_GPT3_EXTERNAL.
MLCOMMONS_GPT3 = """
    --exit-duration-in-mins 465
    --tensor-model-parallel-size 8
    --pipeline-model-parallel-size 8
    --sequence-parallel
    --recompute-activations
    --num-layers 96
    --hidden-size 12288
    --num-attention-heads 96
    --seq-length 2048
    --max-position-embeddings 2048
    --micro-batch-size 1
    --global-batch-size 1536
    --train-samples 20000000
    --lr-warmup-samples 407040
    --lr-decay-samples 166809600
    --lr 2.0e-5
    --min-lr 2.0e-6
    --lr-decay-style cosine
    --log-interval 1
    --eval-iters -1
    --eval-interval 16
    --attention-dropout 0.0
    --hidden-dropout 0.0
    --train-data-path 0.5 /data/c4_en_6_c4_spm_text_document 0.5 /data/c4_en_7_c4_spm_text_document
    --valid-data-path 1.0 /data/c4_en_validation_subset_c4_spm_text_document
    --vocab-file /bpe/vocab.json
    --merge-file /bpe/merges.txt
    --save-interval 500
    --save /logs/GPT3-175B-checkpoints
    --do-layernorm-bias-weight-decay
    --no-scaled-init
    --loss-scale 1.0
    --split 100,0,0
    --clip-grad 1.0
    --weight-decay 0.1
    --adam-beta1 0.9
    --adam-beta2 0.95
    --init-method-std 0.006
    --log-params-norm
    --log-num-zeros-in-grad
    --log-validation-ppl-to-tensorboard
    --DDP-impl local
    --tensorboard-dir /logs/GPT3-175B-tensorboard
    --no-query-key-layer-scaling
    --no-seq-len-plus-one-tokens
    --seed 1234
    --precision bf16-sr
    --load /logs/GPT3-175B-checkpoints
"""
MLCOMMONS_GPT3_EXTERNAL = """
    --no-load-rng
    --use-ext-ckpt
    --ext-iterations 4000
    --ext-lr-steps 6144000
"""
# The flags issue 33 counts as the most used among 30 public launch scripts that
# megatron_sr's parser did not know, with the values those scripts give them.
ISSUE_33_FLAGS = """
    --use-flash-attn
    --transformer-impl local
    --optimizer adam
    --no-masked-softmax-fusion
    --data-impl mmap
    --attention-softmax-in-fp32
    --no-query-key-layer-scaling
    --checkpoint-activations
    --tensorboard-queue-size 1
    --DDP-impl local
    --no-rope-fusion
    --no-async-tensor-model-parallel-allreduce
    --deterministic-mode
    --no-bias-gelu-fusion
    --no-bias-dropout-fusion
    --log-timers-to-tensorboard
"""


def _argv(flags: str) -> list[str]:
    return shlex.split(flags.replace("'", "\\'"), posix=True)


def _shell_words(flags: str) -> list[str]:
    """The argv of `${ARRAY[@]}` expanded unquoted: every word split again at spaces."""
    return [part for word in _argv(flags) for part in word.split()]


def _without(argv: list[str], prefixes) -> list[str]:
    out, skip = [], False
    for word in argv:
        if word.startswith("--"):
            skip = word.startswith(prefixes)
        if not skip:
            out.append(word)
    return out


@pytest.mark.parametrize("flags", [GPT3_175B, GPT3_175B_RAMPUP, LLAMA3_8B,
                                   LLAMA3_8B + LLAMA3_8B_MOCK, MLCOMMONS_GPT3,
                                   MLCOMMONS_GPT3 + MLCOMMONS_GPT3_EXTERNAL,
                                   GPT3_175B + ISSUE_33_FLAGS])
def test_every_flag_of_the_script_is_known(flags):
    known = build_parser()._option_string_actions
    unknown = [w for w in _argv(flags) if w.startswith("--") and w not in known]
    assert not unknown


@pytest.mark.parametrize("words", [_argv, _shell_words], ids=["one-word", "split"])
def test_gpt3_175b_runs_without_fp16(words):
    parser = build_parser()
    argv = _without(words(GPT3_175B), ("--fp16",))
    job = job_config_from_args(parser.parse_args(argv), world_size=128 * 16)  # DP 16
    assert (job.model.num_layers, job.model.head_dim, job.training.global_batch_size) == (
        96, 128, 1536)
    assert job.training.step_batch_size_schedule == GPT3_175B_SCHEDULE
    assert job.training.rampup_batch_size is None and job.training.train_iters == 500000
    assert job.optimizer.precision == "bf16-sr"
    assert any("--attention-backend auto" in notice for notice in job.notices)


def test_gpt3_175b_older_script_runs_with_its_rampup():
    argv = _without(_argv(GPT3_175B_RAMPUP), ("--fp16",))
    job = job_config_from_args(build_parser().parse_args(argv), world_size=128 * 16)
    assert job.training.rampup_batch_size == (16, 16, 5859375)
    assert job.training.step_batch_size_schedule is None
    assert job.optimizer.precision == "bf16-sr"
    assert any("--attention-backend auto" in notice for notice in job.notices)


def test_gpt3_175b_fp16_gives_the_reason():
    with pytest.raises(ValueError, match="--fp16: FP16 is not supported: megatron_sr trains in BF16"):
        job_config_from_args(build_parser().parse_args(_argv(GPT3_175B)), world_size=128 * 12)


def test_llama3_8b_runs_without_fp8():
    argv = _without(_argv(LLAMA3_8B), ("--fp8-",))
    with pytest.warns(UserWarning, match="--sequence-parallel has no effect"):
        job = job_config_from_args(build_parser().parse_args(argv), world_size=8)
    model = job.model
    assert (model.num_query_groups, model.head_dim, model.qkv_size) == (8, 128, 48 * 128)
    assert model.apply_layernorm_1p and not model.add_bias_linear
    assert job.optimizer.grad_reduce_dtype == "bf16" and job.optimizer.decoupled_lr == 5e-4
    assert job.data.split == "99,1,0" and job.training.profile
    assert job.parallel.sequence_parallel is False  # TP 1: ignored, as in Megatron
    assert job.optimizer.lr_warmup_iters == 30518  # 3906252 samples / 128, rounded
    ignored = "\n".join(job.notices)
    for flag in ("--use-mcore-models", "--attention-backend fused", "--cross-entropy-loss-fusion",
                 "--manual-gc", "--empty-unused-memory-level 1", "--no-mmap-bin-files",
                 "--no-create-attention-mask-in-dataloader", "--log-throughput", "--vocab-size"):
        assert flag in ignored


def test_llama3_8b_fp8_gives_the_reason():
    argv = _argv(LLAMA3_8B)
    with pytest.raises(ValueError, match="--fp8-format hybrid, --fp8-amax-history-len 1024, "
                                         "--fp8-amax-compute-algo max, --fp8-param-gather: "
                                         "FP8/FP4 training is not supported"):
        job_config_from_args(build_parser().parse_args(argv), world_size=8)


def test_context_parallelism_gives_a_clear_error():
    argv = _without(_argv(LLAMA3_8B), ("--fp8-", "--context-parallel-size"))
    with pytest.raises(ValueError, match="--context-parallel-size 2: context parallelism is not"):
        job_config_from_args(build_parser().parse_args(argv + ["--context-parallel-size", "2"]),
                             world_size=8)


def _refused_flags(error: ValueError) -> list[str]:
    """The flags a refusal names, in its order."""
    return [word.rstrip(":,") for line in str(error).splitlines()
            for word in line.split(": ", 1)[0].split() if word.startswith("--")]


def test_mlcommons_gpt3_parses_and_names_what_it_cannot_run():
    """MLCommons' GPT-3 reference parses (no flag is unrecognized); the job stops
    naming every flag megatron_sr refuses or has not implemented yet, each with
    its reason, and runs without them and with a count for --eval-iters (its
    fork's -1 is out of range here)."""
    argv = _argv(MLCOMMONS_GPT3 + MLCOMMONS_GPT3_EXTERNAL)
    args = build_parser().parse_args(argv)
    with pytest.raises(ValueError) as error:
        job_config_from_args(args, world_size=64 * 8)
    rows = megatron_table().flags
    stopping = {word for word in argv if word in rows and rows[word].decision in REFUSING}
    assert stopping >= {"--do-layernorm-bias-weight-decay", "--no-scaled-init",
                        "--no-seq-len-plus-one-tokens", "--use-ext-ckpt", "--ext-iterations",
                        "--ext-lr-steps"}
    assert set(_refused_flags(error.value)) == stopping
    assert "--use-ext-ckpt, --ext-iterations 4000, --ext-lr-steps 6144000: MLCommons' GPT-3 " \
        "reference fork loads its external checkpoint" in str(error.value)

    train_blend = argv[argv.index("--train-data-path") + 1:argv.index("--valid-data-path")]
    without = _without(argv, tuple(stopping | {"--train-data-path", "--valid-data-path"}))
    without += ["--data-path", *train_blend]
    with pytest.raises(ValueError, match="--eval-iters must be >= 0, got -1"):
        job_config_from_args(build_parser().parse_args(without), world_size=64 * 8)
    without[without.index("--eval-iters") + 1] = "10"
    job = job_config_from_args(build_parser().parse_args(without), world_size=64 * 8)
    assert job.optimizer.precision == "bf16-sr" and job.model.recompute_granularity == "selective"
    assert job.training.global_batch_size == 1536 and job.parallel.sequence_parallel
    for flag in ("--loss-scale 1.0", "--DDP-impl local", "--no-query-key-layer-scaling"):
        assert any(notice.startswith(f"[flags] {flag} is accepted and ignored")
                   for notice in job.notices), flag


def test_the_issues_most_used_foreign_flags_are_accepted_with_notices():
    argv = _without(_argv(GPT3_175B + ISSUE_33_FLAGS), ("--fp16",))
    job = job_config_from_args(build_parser().parse_args(argv), world_size=128 * 16)
    assert job.model.recompute_granularity == "full"  # --checkpoint-activations, an alias
    ignored = "\n".join(job.notices)
    for word in _argv(ISSUE_33_FLAGS):
        if word.startswith("--") and word not in ("--checkpoint-activations",
                                                  "--log-timers-to-tensorboard"):
            assert f"[flags] {word}" in ignored, word
