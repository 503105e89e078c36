"""The GPU launch scripts examples/gpt_*.sh: their pretrain_gpt.py flags parse
and validate (megatron_sr.config.parse_args) for the world size they would
launch, under each precision strategy and with the layout overrides. No GPU:
DRY_RUN=1 makes a script print WORLD_SIZE=<n> and its flags instead of running."""
import os
import subprocess

import pytest

from megatron_sr.config import parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["gpt_350m.sh", "gpt_1.3b.sh", "gpt_2.7b.sh", "gpt_6.7b.sh"]
# The parameter count each script's name promises (GPT-3 sizes), within 20%: the untied
# output layer adds vocab x hidden (50M at 350M).
NOMINAL_PARAMS = {"gpt_350m.sh": 350e6, "gpt_1.3b.sh": 1.3e9, "gpt_2.7b.sh": 2.7e9, "gpt_6.7b.sh": 6.7e9}
GPT2_VOCAB = 50257


def dry_run(script: str, **env) -> tuple[int, list[str]]:
    """(world size, pretrain_gpt.py flags) the script would launch with."""
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("PRECISION", "LR", "LR_MULT", "TP", "PP", "EXTRA_ARGS", "GBS", "MBS")}
    environment.update({"DRY_RUN": "1", "GPUS_PER_NODE": "8", "DATA_PATH": "/data/pile_text_document",
                        "VOCAB": "/data/gpt2-vocab.json", "MERGES": "/data/gpt2-merges.txt", **env})
    out = subprocess.run(["bash", os.path.join(ROOT, "examples", script)], env=environment,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].startswith("WORLD_SIZE="), out[:2]
    return int(out[0].split("=", 1)[1]), out[1:]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.mark.parametrize("script", SCRIPTS)
def test_default_flags_validate_and_follow_the_recipe(script):
    world_size, args = dry_run(script)
    job = parse_args(args, world_size).with_vocab_size(GPT2_VOCAB)
    model, opt = job.model, job.optimizer
    assert opt.precision == "bf16-sr"
    assert model.seq_length == 2048 and model.position_embedding_type == "rope"
    assert model.untie_embeddings_and_output_weights
    assert (opt.adam_beta1, opt.adam_beta2, opt.weight_decay) == (0.9, 0.95, 0.1)
    assert opt.lr_decay_style == "cosine" and opt.lr_warmup_iters > 0
    assert job.parallel.use_distributed_optimizer
    h, layers, v = model.hidden_size, model.num_layers, model.vocab_size
    params = layers * 12 * h * h + 2 * v * h
    assert abs(params / NOMINAL_PARAMS[script] - 1) < 0.2, params


@pytest.mark.parametrize("script", SCRIPTS)
def test_sr_learning_rate_is_twice_the_mixed_precision_one(script):
    _, sr_args = dry_run(script)
    _, mixed_args = dry_run(script, PRECISION="bf16-mixed")
    world_size, amp_args = dry_run(script, PRECISION="amp")
    assert parse_args(mixed_args, world_size).optimizer.precision == "bf16-mixed"
    assert parse_args(amp_args, world_size).optimizer.precision == "amp"
    assert float(flag(sr_args, "--lr")) == pytest.approx(2 * float(flag(mixed_args, "--lr")))
    _, explicit = dry_run(script, LR="1e-4")
    assert flag(explicit, "--lr") == "1e-4"


@pytest.mark.parametrize("script", SCRIPTS)
def test_layout_overrides_validate(script):
    world_size, args = dry_run(script, TP="2", PP="2", GPUS_PER_NODE="8", NNODES="2",
                               PRECISION="bf16-kahan")
    assert world_size == 16
    job = parse_args(args, world_size)
    assert (job.parallel.tensor_model_parallel_size, job.parallel.pipeline_model_parallel_size,
            job.data_parallel_size) == (2, 2, 4)
    assert job.parallel.sequence_parallel


def test_data_path_with_blending_weights_and_extra_args():
    world_size, args = dry_run("gpt_350m.sh", DATA_PATH="0.7 /data/a_text_document 0.3 /data/b",
                               EXTRA_ARGS="--swiglu --seed 7")
    job = parse_args(args, world_size)
    assert job.data.data_path == ["0.7", "/data/a_text_document", "0.3", "/data/b"]
    assert job.model.activation == "swiglu" and job.training.seed == 7


def test_missing_data_path_is_named():
    environment = {k: v for k, v in os.environ.items() if k not in ("DATA_PATH", "DRY_RUN")}
    result = subprocess.run(["bash", os.path.join(ROOT, "examples", "gpt_350m.sh")],
                            env=environment, capture_output=True, text=True)
    assert result.returncode != 0 and "DATA_PATH" in result.stderr


# ----- Llama scripts -----------------------------------------------------------------------

LLAMA_SCRIPTS = {"llama3_8b.sh": (128256, 8.03e9, 8), "llama2_7b.sh": (32000, 6.74e9, 32)}


@pytest.mark.parametrize("script", LLAMA_SCRIPTS)
def test_llama_scripts_validate_and_have_the_published_size(script):
    vocab, nominal, groups = LLAMA_SCRIPTS[script]
    world_size, args = dry_run(script, TOKENIZER="/models/tokenizer")
    job = parse_args(args, world_size).with_vocab_size(vocab)
    model = job.model
    assert job.data.tokenizer_type == "HuggingFaceTokenizer"
    assert (model.activation, model.normalization, model.add_bias_linear) == ("swiglu", "RMSNorm",
                                                                             False)
    assert model.num_query_groups == groups and model.untie_embeddings_and_output_weights
    h, f, layers = model.hidden_size, model.ffn_hidden_size, model.num_layers
    per_layer = h * model.qkv_size + model.query_projection_size * h + 3 * h * f + 2 * h
    params = layers * per_layer + 2 * vocab * h + h
    assert abs(params / nominal - 1) < 0.01, params
    assert job.optimizer.precision == "bf16-sr" and job.parallel.sequence_parallel


def test_llama_script_names_a_missing_tokenizer():
    environment = {k: v for k, v in os.environ.items() if k not in ("TOKENIZER", "DRY_RUN")}
    environment["DATA_PATH"] = "/data/x_text_document"
    result = subprocess.run(["bash", os.path.join(ROOT, "examples", "llama3_8b.sh")],
                            env=environment, capture_output=True, text=True)
    assert result.returncode != 0 and "TOKENIZER" in result.stderr


def test_the_launch_hands_torchrun_nccl_error_handling_and_the_flight_recorder(tmp_path):
    """examples/launch_common.sh exports torch's NCCL error handling and the
    flight recorder's dump folder (under CHECKPOINT) to the ranks, keeping
    what the user set (here the older spelling of the buffer size)."""
    torchrun = tmp_path / "torchrun"
    torchrun.write_text('#!/usr/bin/env bash\nenv | grep ^TORCH_ | sort > "$OUT"\n')
    torchrun.chmod(0o755)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TORCH_")}
    environment.update(GPUS_PER_NODE="1", DATA_PATH="/data/pile_text_document",
                       VOCAB="/data/gpt2-vocab.json", MERGES="/data/gpt2-merges.txt",
                       CHECKPOINT=str(tmp_path / "ckpt"), TORCHRUN=str(torchrun),
                       OUT=str(tmp_path / "env"), TORCH_NCCL_TRACE_BUFFER_SIZE="500")
    subprocess.run(["bash", os.path.join(ROOT, "examples", "gpt_350m.sh")], env=environment,
                   capture_output=True, text=True, check=True)
    seen = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines())
    assert seen == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
                    "TORCH_NCCL_TRACE_BUFFER_SIZE": "500",
                    "TORCH_FR_DUMP_TEMP_FILE": f"{tmp_path}/ckpt/nccl_flight_recorder/rank_"}
    assert (tmp_path / "ckpt" / "nccl_flight_recorder").is_dir()

