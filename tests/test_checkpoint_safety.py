"""Nothing a user has saved is ever lost (issue 14, "Nothing lost").

Spec:
- A re-save of an existing iteration that dies after the old directory was
  moved aside (`iter_XXXXXXX.replaced`) and before the new one was renamed in
  is rolled back by the next writer: the iteration the tracker names exists
  again, with its old contents; readers find it meanwhile. When the new
  directory was already in place, the old copy is removed.
- `--save` refuses a directory holding another run's checkpoints unless it is
  also `--load` or `--override-existing-checkpoints` is given.
- `tools/checkpoint_convert.py` refuses an output that exists and is not
  empty, equals its input or overlaps it; it never removes a `.partial` it
  did not create.
- The Hugging Face export copies only the files the checkpoint's tokenizer
  type reads, resolved and checked (they must build that tokenizer): a
  checkpoint whose metadata names another file exports nothing of it.
- A resume at a larger data-parallel size seeds the new DP ranks from
  (seed, DP rank, iteration), not with a copy of DP rank 0's stream.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from job_harness import checkpoint_files, run_pretrain, tiny_gpt_argv
from megatron_sr import checkpointing
from megatron_sr.checkpointing.conversion import tokenizer_export_files
from megatron_sr.config import TrainingConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import checkpoint_convert  # noqa: E402

pytest_plugins = ["data_fixtures"]


def _save(save_dir: str, iteration: int, value: float) -> None:
    checkpointing.save_checkpoint(save_dir, iteration, {"w": torch.full((8,), value)},
                                  tp_rank=0, pp_rank=0, tp_size=1, pp_size=1)


def _weights(save_dir: str, iteration: int) -> torch.Tensor:
    directory = os.path.join(save_dir, checkpointing.iteration_dir_name(iteration))
    return checkpointing.load_state_file(directory, 0, 0, 1, 1)["w"]


_RESAVE = """
import sys, torch
from megatron_sr import checkpointing
checkpointing.save_checkpoint(sys.argv[1], 2, {"w": torch.full((8,), 2.0)},
                              tp_rank=0, pp_rank=0, tp_size=1, pp_size=1)
"""


def test_a_resave_killed_between_the_renames_is_rolled_back(tmp_path):
    save = str(tmp_path / "ckpt")
    _save(save, 2, 1.0)
    # A real process re-saves iteration 2 and is SIGKILLed between the renames.
    killed = subprocess.run(
        [sys.executable, "-c", _RESAVE, save], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": REPO,
             "MEGATRON_SR_FAULT": "kill@checkpoint-replace,iteration=2"})
    assert killed.returncode == -9, killed.stdout + killed.stderr
    final = os.path.join(save, "iter_0000002")
    assert not os.path.exists(final) and os.path.isdir(final + ".replaced")
    assert checkpointing.read_tracker(save) == 2
    # Readers find the old copy where it lies.
    assert checkpointing.resolve_checkpoint_dir(save) == final + ".replaced"
    # The next writer rolls back before anything else.
    _save(save, 4, 4.0)
    assert not os.path.exists(final + ".replaced")
    assert torch.equal(_weights(save, 2), torch.full((8,), 1.0))
    assert torch.equal(_weights(save, 4), torch.full((8,), 4.0))


def test_a_published_replacement_drops_the_old_copy(tmp_path):
    save = str(tmp_path / "ckpt")
    _save(save, 2, 1.0)
    old = os.path.join(save, "iter_0000002")
    os.rename(old, old + ".replaced")
    _save(str(tmp_path / "other"), 2, 3.0)
    os.rename(os.path.join(tmp_path, "other", "iter_0000002"), old)
    actions = checkpointing.recover_interrupted_publish(save)
    assert actions and "removed" in actions[0]
    assert not os.path.exists(old + ".replaced")
    assert torch.equal(_weights(save, 2), torch.full((8,), 3.0))


def test_save_refuses_a_directory_of_another_run(tmp_path):
    other = str(tmp_path / "other")
    _save(other, 2, 1.0)
    with pytest.raises(checkpointing.CheckpointError,
                       match="holds checkpoints of another run.*iteration 2.*--load.*"
                             "--override-existing-checkpoints"):
        checkpointing.check_save_directory(TrainingConfig(save=other))
    with pytest.raises(checkpointing.CheckpointError, match="another run"):
        checkpointing.check_save_directory(TrainingConfig(save=other, load=str(tmp_path)))
    checkpointing.check_save_directory(TrainingConfig(save=other, load=other + "/"))
    checkpointing.check_save_directory(TrainingConfig(save=other,
                                                      override_existing_checkpoints=True))
    checkpointing.check_save_directory(TrainingConfig(save=str(tmp_path / "new")))
    os.makedirs(tmp_path / "empty")
    checkpointing.check_save_directory(TrainingConfig(save=str(tmp_path / "empty")))


def test_the_job_refuses_to_save_over_another_run(tmp_path):
    other = str(tmp_path / "other")
    _save(other, 2, 1.0)
    result = run_pretrain(1, tiny_gpt_argv(train_iters=1, save=other), expect_error=True)[0]
    assert result["error"].startswith("CheckpointError: ") and "another run" in result["error"]
    assert result["reports"] == []
    assert torch.equal(_weights(other, 2), torch.full((8,), 1.0))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    save = str(tmp_path_factory.mktemp("tiny") / "ckpt")
    run_pretrain(1, tiny_gpt_argv(train_iters=1, save=save))
    return save


def _convert(*argv) -> int:
    return checkpoint_convert.main([str(a) for a in argv])


def test_the_converter_never_writes_over_a_checkpoint(tiny_checkpoint, tmp_path, capsys):
    before = checkpoint_files(tiny_checkpoint, 1)
    reshape = ["--target-tensor-parallel-size", "1"]
    assert _convert("--load", tiny_checkpoint, "--save", tiny_checkpoint, *reshape) == 1
    assert "overlaps" in capsys.readouterr().err
    assert _convert("--load", tiny_checkpoint, "--save",
                    os.path.join(tiny_checkpoint, "inside"), *reshape) == 1
    assert not os.path.exists(os.path.join(tiny_checkpoint, "inside"))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert _convert("--load", tiny_checkpoint, "--save", busy, "--to-hf") == 1
    assert "not an empty directory" in capsys.readouterr().err
    assert os.listdir(busy) == ["notes.txt"]
    from job_harness import assert_states_equal
    assert_states_equal(checkpoint_files(tiny_checkpoint, 1), before)
    # An empty directory is fine.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _convert("--load", tiny_checkpoint, "--save", empty, *reshape) == 0
    assert checkpointing.read_tracker(str(empty)) == 1


def test_the_export_leaves_a_partial_it_did_not_create(tiny_checkpoint, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    partial = tmp_path / "hf.partial"
    partial.mkdir()
    (partial / "keep.txt").write_text("someone else's")
    assert _convert("--load", tiny_checkpoint, "--save", tmp_path / "hf", "--to-hf") == 0
    assert (partial / "keep.txt").read_text() == "someone else's"
    assert sorted(os.listdir(tmp_path)) == ["hf", "hf.partial"]
    # A failing export removes only its own staging directory.
    assert _convert("--load", tiny_checkpoint, "--save", tmp_path / "hf2", "--to-hf",
                    "--hf-dtype", "float32", "--target-tensor-parallel-size", "1") == 2
    def failing_export(checkpoint, staging, dtype):
        open(os.path.join(staging, "config.json"), "w").close()
        raise ValueError("disk full halfway")

    monkeypatch.setattr(checkpoint_convert, "export_hugging_face", failing_export)
    assert _convert("--load", tiny_checkpoint, "--save", tmp_path / "hf3", "--to-hf") == 1
    assert sorted(os.listdir(tmp_path)) == ["hf", "hf.partial"]
    assert (partial / "keep.txt").read_text() == "someone else's"


def _description(tmp_path, tokenizer_type: str, **data) -> dict:
    return {"data": {"tokenizer_type": tokenizer_type, "vocab_file": None, "merge_file": None,
                     "tokenizer_model": None, "vocab_size": 60, **data},
            "unpadded_vocab_size": data.pop("unpadded", 61)}


def test_the_export_copies_only_the_files_the_tokenizer_reads(tmp_path, gpt2_files):
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2\n")
    # NullTokenizer reads no file: a tokenizer_model in its metadata is ignored.
    assert tokenizer_export_files(_description(tmp_path, "NullTokenizer",
                                               tokenizer_model=str(secret))) == []
    # A tiktoken file (TikTokenizer, Llama3Tokenizer) is no transformers tokenizer file.
    for kind in ("TikTokenizer", "Llama3Tokenizer"):
        assert tokenizer_export_files(_description(tmp_path, kind,
                                                   tokenizer_model=str(secret))) == []
    # A file named for a tokenizer that cannot read it is refused, through symlinks too.
    link = tmp_path / "vocab.json"
    link.symlink_to(secret)
    with pytest.raises(ValueError, match="do not build its --tokenizer-type GPT2BPETokenizer"):
        tokenizer_export_files(_description(tmp_path, "GPT2BPETokenizer", vocab_file=str(link),
                                            merge_file=gpt2_files[1]))
    with pytest.raises(ValueError, match="SentencePieceTokenizer"):
        tokenizer_export_files(_description(tmp_path, "SentencePieceTokenizer",
                                            tokenizer_model=str(secret)))
    with pytest.raises(ValueError, match="not a regular file"):
        tokenizer_export_files(_description(tmp_path, "SentencePieceTokenizer",
                                            tokenizer_model=str(tmp_path)))
    # The real GPT-2 files are exported, resolved, only when the vocabulary matches.
    vocab_size = len(json.load(open(gpt2_files[0], encoding="utf-8")))
    files = tokenizer_export_files({**_description(tmp_path, "GPT2BPETokenizer",
                                                   vocab_file=gpt2_files[0],
                                                   merge_file=gpt2_files[1]),
                                    "unpadded_vocab_size": vocab_size})
    assert files == [(os.path.realpath(gpt2_files[0]), "vocab.json"),
                     (os.path.realpath(gpt2_files[1]), "merges.txt")]
    with pytest.raises(ValueError, match="vocabulary of"):
        tokenizer_export_files(_description(tmp_path, "GPT2BPETokenizer",
                                            vocab_file=gpt2_files[0], merge_file=gpt2_files[1]))


@pytest.mark.slow
def test_new_data_parallel_ranks_get_their_own_rng_stream(tmp_path):
    save = str(tmp_path / "ckpt")
    flags = dict(train_iters=3, save=save, global_batch_size=4)
    run_pretrain(1, tiny_gpt_argv(exit_interval=2, **flags))
    run_pretrain(2, tiny_gpt_argv(load=save, **flags))
    states = checkpoint_files(save, 3)["mp_rank_00"]["rng_state"]
    assert len(states) == 2
    # Both ranks drew the same number of dropout masks since the resume: with a
    # copy of rank 0's state they would be equal.
    assert states[0]["torch"] != states[1]["torch"]
    assert states[0]["tracker"] != states[1]["tracker"]
