"""tools/checkpoint_convert.py and tools/text_generation.py on real checkpoints.

One tiny GPT is trained with TP=2 x PP=2 under torchrun (bf16-sr); the tests
reshape it, sample from it at several layouts, export it, and feed the tools
bad input.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
GPT = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
       "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
       "--train-iters", "3", "--lr", "1e-3", "--mock-data", "--tokenizer-type", "NullTokenizer",
       "--vocab-size", "200", "--log-interval", "1", "--eval-interval", "100", "--eval-iters", "0"]


def run(args, timeout=240, **kwargs):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, **kwargs)


def tool(name, *args):
    return run([sys.executable, f"tools/{name}", *args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A TP=2 x PP=2 checkpoint of 3 bf16-sr steps (--ckpt-format torch_dist, the default)."""
    save = tmp_path_factory.mktemp("ckpt") / "tp2pp2"
    result = run([TORCHRUN, "--standalone", "--nproc_per_node", "4", "pretrain_gpt.py", *GPT,
                  "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                  "--save", str(save)])
    assert result.returncode == 0, result.stderr[-3000:]
    return save


def rank_files(save):
    return sorted(p.relative_to(save) for p in Path(save).glob("iter_*/mp_rank_*/*.pt"))


def test_reshape_round_trip_is_bit_exact(trained, tmp_path):
    from megatron_sr.checkpoint_conversion import load_full_checkpoint

    merged, back = tmp_path / "tp1", tmp_path / "tp2pp2"
    result = tool("checkpoint_convert.py", "--load", str(trained), "--save", str(merged),
                  "--target-tensor-parallel-size", "1", "--target-pipeline-parallel-size", "1")
    assert result.returncode == 0, result.stderr
    assert rank_files(merged) == [Path("iter_0000003/mp_rank_00/model_optim_rng.pt")]
    result = tool("checkpoint_convert.py", "--load", str(merged), "--save", str(back),
                  "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2")
    assert result.returncode == 0, result.stderr
    assert len(rank_files(back)) == 4
    # The job wrote --ckpt-format torch_dist; the converter writes the legacy layout.
    original, reshaped = load_full_checkpoint(str(trained)), load_full_checkpoint(str(back))
    assert original.model.keys() == reshaped.model.keys()
    for name, tensor in original.model.items():
        assert torch.equal(tensor, reshaped.model[name]), name
    assert original.optimizer["params"].keys() == reshaped.optimizer["params"].keys()
    for kind, tensors in original.optimizer["params"].items():
        for name, tensor in tensors.items():
            assert torch.equal(tensor, reshaped.optimizer["params"][kind][name]), (name, kind)
    assert original.lr_scheduler == reshaped.lr_scheduler
    assert original.optimizer["step"] == reshaped.optimizer["step"] == 3


def generated_text(load, *extra, nproc=1):
    args = ["tools/text_generation.py", "--load", str(load), "--prompt", "5 6 7 8",
            "--prompt", "9", "--max-new-tokens", "12", *extra]
    launcher = ([sys.executable] if nproc == 1
                else [TORCHRUN, "--standalone", "--nproc_per_node", str(nproc)])
    result = run(launcher + args)
    assert result.returncode == 0, result.stderr[-3000:]
    return [line for line in result.stdout.splitlines() if line and not line.startswith("-")]


def test_generation_is_the_same_for_every_layout(trained, tmp_path):
    merged = tmp_path / "tp1"
    assert tool("checkpoint_convert.py", "--load", str(trained), "--save", str(merged),
                "--target-tensor-parallel-size", "1",
                "--target-pipeline-parallel-size", "1").returncode == 0
    greedy = generated_text(trained, "--greedy")
    assert len(greedy) == 2 and greedy[0].startswith("5 6 7 8 ") and greedy[1].startswith("9 ")
    assert len(greedy[0].split()) == 4 + 12
    assert generated_text(merged, "--greedy") == greedy
    assert generated_text(merged, "--greedy", nproc=2) == greedy
    assert generated_text(trained, "--greedy", "--no-kv-cache") == greedy
    sampled = generated_text(trained, "--top-k", "20", "--temperature", "1.5", "--seed", "7")
    assert generated_text(merged, "--top-k", "20", "--temperature", "1.5", "--seed", "7",
                          nproc=2) == sampled


def test_hugging_face_export_loads_in_transformers(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    result = tool("checkpoint_convert.py", "--load", str(trained), "--save", str(out),
                  "--to-hf", "--hf-dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert {"config.json", "model.safetensors"} <= set(os.listdir(out))
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "gpt2" and model.config.n_layer == 4
    logits = model(torch.tensor([[5, 6, 7, 8]])).logits
    assert logits.shape == (1, 4, 256) and torch.isfinite(logits).all()


def test_missing_partial_and_unsupported_checkpoints_are_clear_errors(trained, tmp_path):
    result = tool("checkpoint_convert.py", "--load", str(tmp_path / "nowhere"), "--save",
                  str(tmp_path / "out"), "--to-hf")
    assert result.returncode == 1 and "holds no checkpoint" in result.stderr
    partial = tmp_path / "partial"
    subprocess.run(["cp", "-r", str(trained), str(partial)], check=True)
    (partial / "iter_0000003" / "checksums.json").unlink()
    result = tool("text_generation.py", "--load", str(partial), "--prompt", "1 2")
    assert result.returncode == 1 and "not a complete checkpoint" in result.stderr
    assert not (tmp_path / "out").exists()

    rope_layernorm = tmp_path / "rope"
    result = run([sys.executable, "pretrain_gpt.py", *GPT, "--train-iters", "1",
                  "--position-embedding-type", "rope", "--save", str(rope_layernorm)])
    assert result.returncode == 0, result.stderr[-3000:]
    result = tool("checkpoint_convert.py", "--load", str(rope_layernorm), "--save",
                  str(tmp_path / "hf"), "--to-hf")
    assert result.returncode == 1 and "rope" in result.stderr.lower(), result.stderr
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.partial").exists()
