"""tools/checkpoint_convert.py and tools/text_generation.py on real checkpoints.

One tiny GPT is trained with TP=2 x PP=2 under torchrun (bf16-sr); the tests
reshape it, sample from it at several layouts, export it, and feed the tools
bad input. Each tool runs once as a command line; the other calls run its
`main(argv)` in this process (checkpoint_convert.py) or in `run_ranks`
workers (text_generation.py, which joins their process group): a new Python
process spends seconds importing torch.
"""
import contextlib
import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bitwise import assert_same_bits
from multiprocess import run_ranks

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a 4-rank torchrun job, then the tools on it: ~60 CPU-s together
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


def tool_module(name):
    spec = importlib.util.spec_from_file_location(name[:-3], ROOT / "tools" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tool_main(name, *args):
    """`tool(name, *args)` as a call of the tool's `main` in this process."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        returncode = tool_module(name).main([str(a) for a in args])
    return SimpleNamespace(returncode=returncode, stdout=stdout.getvalue(), stderr=stderr.getvalue())


def convert(*args):
    return tool_main("checkpoint_convert.py", *args)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A TP=2 x PP=2 checkpoint of 3 bf16-sr steps (--ckpt-format torch_dist, the default)."""
    save = tmp_path_factory.mktemp("ckpt") / "tp2pp2"
    result = run([TORCHRUN, "--standalone", "--nproc_per_node", "4", "pretrain_gpt.py", *GPT,
                  "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                  "--save", str(save)])
    assert result.returncode == 0, result.stderr[-3000:]
    return save


@pytest.fixture(scope="module")
def merged(trained, tmp_path_factory):
    """`trained` reshaped to TP=1 x PP=1."""
    out = tmp_path_factory.mktemp("merged") / "tp1"
    result = convert("--load", trained, "--save", out, "--target-tensor-parallel-size", "1",
                     "--target-pipeline-parallel-size", "1")
    assert result.returncode == 0, result.stderr
    return out


def rank_files(save):
    return sorted(p.relative_to(save) for p in Path(save).glob("iter_*/mp_rank_*/*.pt"))


def test_reshape_round_trip_is_bit_exact(trained, merged, tmp_path):
    from megatron_sr.checkpointing.conversion import load_full_checkpoint

    back = tmp_path / "tp2pp2"
    assert rank_files(merged) == [Path("iter_0000003/mp_rank_00/model_optim_rng.pt")]
    result = convert("--load", merged, "--save", back, "--target-tensor-parallel-size", "2",
                     "--target-pipeline-parallel-size", "2")
    assert result.returncode == 0, result.stderr
    assert len(rank_files(back)) == 4
    # The job wrote --ckpt-format torch_dist; the converter writes the legacy layout.
    original, reshaped = load_full_checkpoint(str(trained)), load_full_checkpoint(str(back))
    assert original.model.keys() == reshaped.model.keys()
    for name, tensor in original.model.items():
        assert_same_bits(tensor, reshaped.model[name], name)
    assert original.optimizer["params"].keys() == reshaped.optimizer["params"].keys()
    for kind, tensors in original.optimizer["params"].items():
        for name, tensor in tensors.items():
            assert_same_bits(tensor, reshaped.optimizer["params"][kind][name], f"{name} {kind}")
    assert original.lr_scheduler == reshaped.lr_scheduler
    assert original.optimizer["step"] == reshaped.optimizer["step"] == 3


def _generation_args(load, *extra):
    return ["--load", str(load), "--prompt", "5 6 7 8", "--prompt", "9", "--max-new-tokens", "12",
            *extra]


def _texts(stdout):
    return [line for line in stdout.splitlines() if line and not line.startswith("-")]


def _generate_on_rank(rank, world_size, args):
    """text_generation.py's main on this rank, with TP = the world size; (exit code, stdout)."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        returncode = tool_module("text_generation.py").main(args)
    return returncode, stdout.getvalue()


def generated_text(load, *extra, nproc=1):
    """The texts text_generation.py prints, run on `nproc` ranks (TP = nproc)."""
    ranks = run_ranks(_generate_on_rank, nproc, _generation_args(load, *extra), timeout=240)
    assert [code for code, _ in ranks] == [0] * nproc
    return _texts(ranks[0][1])


def test_generation_is_the_same_for_every_layout(trained, merged):
    result = tool("text_generation.py", *_generation_args(trained, "--greedy"))
    assert result.returncode == 0, result.stderr[-3000:]
    greedy = _texts(result.stdout)
    assert len(greedy) == 2 and greedy[0].startswith("5 6 7 8 ") and greedy[1].startswith("9 ")
    assert len(greedy[0].split()) == 4 + 12
    assert generated_text(merged, "--greedy") == greedy
    assert generated_text(merged, "--greedy", nproc=2) == greedy
    assert generated_text(trained, "--greedy", "--no-kv-cache") == greedy
    sampled = generated_text(trained, "--top-k", "20", "--temperature", "1.5", "--seed", "7")
    assert generated_text(merged, "--top-k", "20", "--temperature", "1.5", "--seed", "7",
                          nproc=2) == sampled


def _generate_counting_reads(rank, world_size, args):
    """`_generate_on_rank`, recording what this rank reads from the checkpoint's
    shard files: {entry name: bytes} of every stored chunk DCP reads."""
    from megatron_sr.checkpointing.dcp_metadata import CheckpointReader

    reads = {}
    read_data = CheckpointReader.read_data

    def counting(self, plan, planner):
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            key = (item.storage_index.fqn, info.relative_path, info.offset)
            reads[key] = info.length
        return read_data(self, plan, planner)

    CheckpointReader.read_data = counting
    try:
        returncode, stdout = _generate_on_rank(rank, world_size, args)
    finally:
        CheckpointReader.read_data = read_data
    totals = {}
    for (fqn, _, _), length in reads.items():
        totals[fqn] = totals.get(fqn, 0) + length
    return returncode, stdout, totals


def test_generation_reads_only_its_own_blocks_of_the_weights(trained):
    """Each of 2 TP ranks reads the checkpoint's `common` entry and its half of
    the TP-split weights (all of the replicated ones): no optimizer state, no
    RNG state, about half the weights' bytes."""
    from megatron_sr.checkpointing import read_manifest, resolve_checkpoint_dir, torch_dist

    directory = resolve_checkpoint_dir(str(trained))
    stored = torch_dist.reader(directory, read_manifest(directory)).read_metadata()
    model_bytes = sum(info.length for index, info in stored.storage_data.items()
                      if index.fqn.startswith("model/"))
    assert any(index.fqn.startswith("optimizer/") for index in stored.storage_data)
    ranks = run_ranks(_generate_counting_reads, 2, _generation_args(trained, "--greedy"),
                      timeout=240)
    assert [code for code, _, _ in ranks] == [0, 0]
    for _, _, totals in ranks:
        assert all(key == "common" or key.startswith("model/") for key in totals), sorted(totals)
        weights = sum(n for key, n in totals.items() if key.startswith("model/"))
        assert 0.4 * model_bytes < weights < 0.7 * model_bytes, (weights, model_bytes)
    assert {key for _, _, totals in ranks for key in totals if key.startswith("model/")} == {
        index.fqn for index in stored.storage_data if index.fqn.startswith("model/")}


def test_model_only_conversions_read_no_optimizer_state(trained):
    from megatron_sr.checkpointing.conversion import load_full_checkpoint
    from megatron_sr.checkpointing.dcp_metadata import CheckpointReader

    requested = []
    read_data = CheckpointReader.read_data

    def recording(self, plan, planner):
        requested.extend(item.storage_index.fqn for item in plan.items)
        return read_data(self, plan, planner)

    CheckpointReader.read_data = recording
    try:
        checkpoint = load_full_checkpoint(str(trained), with_optimizer=False)
    finally:
        CheckpointReader.read_data = read_data
    assert checkpoint.optimizer is None and checkpoint.model
    assert requested and all(k == "common" or k.startswith("model/") for k in requested)


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
    result = convert("--load", tmp_path / "nowhere", "--save", tmp_path / "out", "--to-hf")
    assert result.returncode == 1 and "holds no checkpoint" in result.stderr
    partial = tmp_path / "partial"
    subprocess.run(["cp", "-r", str(trained), str(partial)], check=True)
    (partial / "iter_0000003" / "checksums.json").unlink()
    result = tool_main("text_generation.py", "--load", partial, "--prompt", "1 2")
    assert result.returncode == 1 and "not a complete checkpoint" in result.stderr
    assert not (tmp_path / "out").exists()

    rope_layernorm = tmp_path / "rope"
    result = run([sys.executable, "pretrain_gpt.py", *GPT, "--train-iters", "1",
                  "--position-embedding-type", "rope", "--save", str(rope_layernorm)])
    assert result.returncode == 0, result.stderr[-3000:]
    result = convert("--load", rope_layernorm, "--save", tmp_path / "hf", "--to-hf")
    assert result.returncode == 1 and "rope" in result.stderr.lower(), result.stderr
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.partial").exists()
