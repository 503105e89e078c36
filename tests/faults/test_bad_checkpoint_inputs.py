"""Bad checkpoints are refused in one line, run nothing and read nothing outside
themselves (issue 32, the checkpoint half).

Spec, for both formats (`torch`: per-rank files; `torch_dist`: DCP):
- A crafted DCP `.metadata` (a pickle naming `os.system`) is refused naming
  the file and the class, before anything of it runs: by `pretrain_gpt.py
  --load`, `tools/text_generation.py` and `tools/checkpoint_convert.py`,
  each exiting 1 with one error line and no traceback. A truncated one, and
  one whose storage entries name a file outside the manifest, likewise.
- `checksums.json` is checked before anything is opened: a JSON list,
  missing keys, an entry that is not an object, a `..` or absolute path, a
  file the format does not write are refused by name; so is any file or
  symbolic link in the checkpoint directory that the manifest does not list.
- A tracker holding anything but ASCII digits is a clear error (`release`
  points at the Megatron-LM importer).
- Loads are strict: a checkpoint with a layer more, or of another
  vocabulary (beyond padding), does not load into the model.
- `--load DIR/iter_XXXXXXX` loads that iteration (as the tools do); `--save`
  inside a published checkpoint, below a file, or in a read-only directory
  is refused before training; the converter refuses bad target sizes and
  bad outputs.

The file-level cases call the loading functions in this process (they are
what every entry point runs); the crafted-metadata case also runs the three
command lines end to end.
"""
from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys

import pytest

from fault_harness import REPO
from job_harness import run_pretrain, tiny_gpt_argv
from megatron_sr import checkpointing
from megatron_sr.checkpointing.conversion import load_full_checkpoint
from megatron_sr.checkpointing import CheckpointError
from megatron_sr.config import TrainingConfig
from megatron_sr.files import sha256_file

sys.path.insert(0, os.path.join(REPO, "tools"))
import checkpoint_convert  # noqa: E402

ITER = "iter_0000001"
FORMATS = ("torch", "torch_dist")
SHARD = {"torch": "mp_rank_00/model_optim_rng.pt", "torch_dist": "__0_0.distcp"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, str]:
    """A --save directory of one step of the 2-layer tiny GPT per format."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for fmt in FORMATS:
        out[fmt] = str(root / fmt)
        run_pretrain(1, tiny_gpt_argv(train_iters=1, save=out[fmt], ckpt_format=fmt))
    return out


@pytest.fixture(params=FORMATS)
def ckpt(request, saved, tmp_path) -> tuple[str, str]:
    """(format, a private copy of its --save directory)."""
    copy = str(tmp_path / "ckpt")
    shutil.copytree(saved[request.param], copy, symlinks=True)
    return request.param, copy


def tree(path: str) -> dict[str, str]:
    """{relative path: sha256 or link target} of everything under `path`."""
    out = {}
    for directory, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(directory, name)
            rel = os.path.relpath(full, path)
            if os.path.islink(full):
                out[rel] = "-> " + os.readlink(full)
            elif os.path.isfile(full):
                out[rel] = sha256_file(full)
    return out


def edit_manifest(directory: str, edit) -> None:
    path = os.path.join(directory, checkpointing.MANIFEST_FILENAME)
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    manifest = edit(manifest)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f)


def relist(directory: str, relpath: str) -> None:
    """Updates the manifest entry of `relpath` to the file's size and sha256
    (what the writer of a crafted file does)."""
    full = os.path.join(directory, relpath)

    def edit(manifest):
        manifest["files"][relpath] = {"size": os.path.getsize(full), "sha256": sha256_file(full)}
        return manifest

    edit_manifest(directory, edit)


def refused(path: str, *needles: str) -> str:
    """The one-line CheckpointError of reading the checkpoint at `path` as the
    tools and the job do; it contains every needle."""
    with pytest.raises(CheckpointError) as info:
        load_full_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


class Payload:
    """Unpickles to `os.system(touch MARKER)`: what a crafted .metadata holds."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def plant_payload(save: str, marker: str) -> str:
    directory = os.path.join(save, ITER)
    with open(os.path.join(directory, ".metadata"), "wb") as f:
        pickle.dump(Payload(marker), f)
    relist(directory, ".metadata")
    return os.path.join(directory, ".metadata")


# ----- torch_dist metadata ------------------------------------------------------------------

def test_crafted_metadata_is_refused_without_running(saved, tmp_path):
    save = str(tmp_path / "ckpt")
    shutil.copytree(saved["torch_dist"], save)
    marker = str(tmp_path / "marker")
    metadata = plant_payload(save, marker)
    before = tree(save)
    refused(save, metadata, "system", "refused without running it")
    assert not os.path.exists(marker)
    assert tree(save) == before


@pytest.mark.parametrize("module, name", [("builtins", "eval"), ("torch", "load"),
                                          ("torch.serialization", "load"),
                                          ("torch.distributed.checkpoint.metadata", "os"),
                                          ("subprocess", "Popen")])
def test_the_metadata_unpickler_resolves_no_other_global(tmp_path, module, name):
    from megatron_sr.checkpointing.dcp_metadata import read_metadata_file

    path = str(tmp_path / ".metadata")
    with open(path, "wb") as f:  # pickle's GLOBAL opcode, then STOP: a bare reference
        f.write(f"c{module}\n{name}\n.".encode())
    with pytest.raises(CheckpointError, match=f"names {module}.{name}, which is not part"):
        read_metadata_file(path, frozenset())


def test_truncated_metadata_is_refused(saved, tmp_path):
    save = str(tmp_path / "ckpt")
    shutil.copytree(saved["torch_dist"], save)
    metadata = os.path.join(save, ITER, ".metadata")
    with open(metadata, "r+b") as f:
        f.truncate(os.path.getsize(metadata) // 2)
    relist(os.path.join(save, ITER), ".metadata")
    refused(save, metadata, "not a readable DCP metadata file")


def test_a_storage_path_out_of_the_directory_is_refused(saved, tmp_path):
    from megatron_sr.checkpointing.dcp_metadata import MetadataUnpickler

    save = str(tmp_path / "ckpt")
    shutil.copytree(saved["torch_dist"], save)
    directory = os.path.join(save, ITER)
    metadata = os.path.join(directory, ".metadata")
    with open(metadata, "rb") as f:
        content = MetadataUnpickler(f).load()
    outside = str(tmp_path / "outside.distcp")
    shutil.copyfile(os.path.join(directory, SHARD["torch_dist"]), outside)
    for info in content.storage_data.values():
        info.relative_path = "../../outside.distcp"
    with open(metadata, "wb") as f:
        pickle.dump(content, f)
    relist(directory, ".metadata")
    refused(save, metadata, "'../../outside.distcp'", "not a file of this checkpoint's manifest")


# ----- the manifest and the directory listing ----------------------------------------------

def _as_list(manifest):
    return list(manifest.items())


def _without_files(manifest):
    return {k: v for k, v in manifest.items() if k != "files"}


def _without_layout(manifest):
    return {k: v for k, v in manifest.items() if k != "tensor_model_parallel_size"}


def _entry_not_an_object(manifest):
    first = sorted(manifest["files"])[0]
    manifest["files"][first] = "0" * 64
    return manifest


def _entry_without_sha(manifest):
    first = sorted(manifest["files"])[0]
    del manifest["files"][first]["sha256"]
    return manifest


@pytest.mark.parametrize("edit, needle", [
    (_as_list, "holds a JSON list, not an object"),
    (_without_files, '"files" is not an object'),
    (_without_layout, '"tensor_model_parallel_size" is None'),
    (_entry_not_an_object, '{"size": bytes, "sha256": 64 hex digits}'),
    (_entry_without_sha, '{"size": bytes, "sha256": 64 hex digits}'),
], ids=["list", "no-files", "no-layout", "entry-not-object", "entry-without-sha256"])
def test_malformed_manifest_is_refused(ckpt, edit, needle):
    _, save = ckpt
    directory = os.path.join(save, ITER)
    edit_manifest(directory, edit)
    refused(save, os.path.join(directory, "checksums.json"), needle)


def test_invalid_json_manifest_is_refused(ckpt):
    _, save = ckpt
    path = os.path.join(save, ITER, "checksums.json")
    with open(path, "w") as f:
        f.write('{"files": ')
    refused(save, path, "is not valid JSON")


@pytest.mark.parametrize("entry", ["../outside.bin", "/etc/hostname", "mp_rank_00/../../x",
                                   "./checksums.json"])
def test_manifest_entries_outside_the_directory_are_refused(ckpt, tmp_path, entry):
    _, save = ckpt
    directory = os.path.join(save, ITER)
    (tmp_path / "outside.bin").write_bytes(b"not a checkpoint")

    def edit(manifest):
        manifest["files"][entry] = {"size": 16, "sha256": "0" * 64}
        return manifest

    edit_manifest(directory, edit)
    refused(save, repr(entry), "is not a path inside the checkpoint directory")


def test_an_unlisted_file_is_refused(ckpt):
    fmt, save = ckpt
    directory = os.path.join(save, ITER)
    stray = os.path.join(directory, os.path.dirname(SHARD[fmt]), "extra.pt")
    with open(stray, "wb") as f:
        f.write(b"\0" * 8)
    refused(save, stray, "is not listed in the checkpoint's checksums.json")


def test_a_shard_the_manifest_drops_is_refused(ckpt):
    fmt, save = ckpt
    directory = os.path.join(save, ITER)

    def edit(manifest):
        del manifest["files"][SHARD[fmt]]
        return manifest

    edit_manifest(directory, edit)
    message = refused(save)
    assert SHARD[fmt] in message, message


def test_a_symlinked_shard_is_refused(ckpt, tmp_path):
    fmt, save = ckpt
    shard = os.path.join(save, ITER, SHARD[fmt])
    outside = str(tmp_path / "elsewhere")
    shutil.move(shard, outside)
    os.symlink(outside, shard)  # same bytes, same checksum: only the link is wrong
    refused(save, shard, "is a symbolic link")


# ----- trackers ----------------------------------------------------------------------------

@pytest.mark.parametrize("content, needle", [
    ("\u00b2\n".encode(), "expected an iteration number"),
    (b"\xff\xfe1\n", "is not UTF-8 text"),
    (b"latest\n", "found 'latest'"),
    (b"", "found ''"),
    (b"-1\n", "found '-1'"),
    (b"release\n", "--from-megatron"),
    (b"1" * 100, "more than 64 bytes"),
], ids=["superscript", "invalid-utf8", "word", "empty", "negative", "release", "long"])
def test_a_bad_tracker_is_a_clear_error(ckpt, content, needle):
    _, save = ckpt
    tracker = os.path.join(save, checkpointing.TRACKER_FILENAME)
    with open(tracker, "wb") as f:
        f.write(content)
    refused(save, tracker, needle)
    with pytest.raises(CheckpointError, match="latest_checkpointed_iteration.txt"):
        checkpointing.read_tracker(save)


# ----- strict loads through the training job ------------------------------------------------

def _job_error(argv) -> str:
    result = run_pretrain(1, argv, expect_error=True)[0]
    assert result["error"] is not None and result["reports"] == [], result
    assert result["error"].startswith("CheckpointError: "), result["error"]
    return result["error"]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_checkpoint_loads_only_into_its_model(saved, fmt, tmp_path):
    before = tree(saved[fmt])
    # A layer more than the model: the checkpoint is refused, not cut.
    error = _job_error(tiny_gpt_argv(train_iters=2, load=saved[fmt], num_layers=1,
                                     ckpt_format=fmt))
    assert "decoder.layers.1." in error and "which this model lacks" in error, error
    # A larger vocabulary (60 tokens) into a 40-token model.
    error = _job_error(tiny_gpt_argv(train_iters=2, load=saved[fmt], vocab_size=40,
                                     ckpt_format=fmt))
    assert "vocabulary of 61 tokens" in error and "41" in error, error
    assert tree(saved[fmt]) == before


@pytest.mark.slow
def test_load_of_an_iteration_directory_loads_that_iteration(saved, tmp_path):
    save = str(tmp_path / "ckpt")
    shutil.copytree(saved["torch"], save)
    result = run_pretrain(1, tiny_gpt_argv(train_iters=2, load=os.path.join(save, ITER),
                                           save=save, override_opt_param_scheduler=True))[0]
    assert "is an iteration directory: loading iteration 1" in result["stdout"]
    assert result["last_iteration"] == 2 and len(result["reports"]) == 1
    assert checkpointing.read_tracker(save) == 2
    assert sorted(os.listdir(os.path.join(save, ITER))) == ["checksums.json", "mp_rank_00"]


# ----- where --save may point ---------------------------------------------------------------

def test_save_inside_a_published_checkpoint_is_refused(saved, tmp_path):
    save = str(tmp_path / "ckpt")
    shutil.copytree(saved["torch"], save)
    inside = os.path.join(save, ITER)
    before = tree(save)
    for target in (inside, os.path.join(inside, "more")):
        with pytest.raises(CheckpointError, match="lies inside the published checkpoint"):
            checkpointing.check_save_directory(TrainingConfig(save=target, load=inside))
        with pytest.raises(CheckpointError, match="lies inside the published checkpoint"):
            checkpointing.check_save_directory(TrainingConfig(
                save=target, override_existing_checkpoints=True))
    assert tree(save) == before


def test_save_below_an_unrelated_checksums_file_is_allowed(tmp_path):
    (tmp_path / "checksums.json").write_text("{}")  # a dataset's, say: not a checkpoint
    checkpointing.check_save_directory(TrainingConfig(save=str(tmp_path / "run" / "ckpt")))
    assert sorted(os.listdir(tmp_path)) == ["checksums.json"]


def test_save_below_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file, not a directory"):
        checkpointing.check_save_directory(TrainingConfig(save=str(tmp_path / "file" / "out")))
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_save_in_a_read_only_directory_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(CheckpointError, match="is not writable"):
            checkpointing.check_save_directory(TrainingConfig(save=str(locked / "out")))
    finally:
        locked.chmod(0o755)


# ----- the converter's flags and outputs ----------------------------------------------------

def _convert(capsys, *argv) -> str:
    """The converter's one error line (it exits 1)."""
    assert checkpoint_convert.main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("checkpoint_convert.py: error: "), err
    return lines[0]


@pytest.mark.parametrize("flags, needle", [
    (["--target-tensor-parallel-size", "0"], "--target-tensor-parallel-size 0: must be at least 1"),
    (["--target-pipeline-parallel-size", "-2"], "--target-pipeline-parallel-size -2"),
    (["--target-tensor-parallel-size", "1",
      "--target-num-layers-per-virtual-pipeline-stage", "-1"],
     "--target-num-layers-per-virtual-pipeline-stage -1: must be at least 1"),
    (["--target-tensor-parallel-size", "1",
      "--target-num-layers-per-virtual-pipeline-stage", "3"],
     "layers do not split into virtual stages of 3"),
])
def test_bad_target_sizes_are_refused(saved, tmp_path, capsys, flags, needle):
    out = tmp_path / "out"
    line = _convert(capsys, "--load", saved["torch_dist"], "--save", out, *flags)
    assert needle in line, line
    assert not out.exists()


def test_unwritable_outputs_are_refused(saved, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    below_file = tmp_path / "file" / "out"
    for flags in (["--target-tensor-parallel-size", "1"], ["--to-hf"]):
        line = _convert(capsys, "--load", saved["torch_dist"], "--save", below_file, *flags)
        assert "is a file, not a directory" in line, line
    inside = os.path.join(saved["torch_dist"], ITER, "out")
    line = _convert(capsys, "--load", saved["torch"], "--save", inside,
                    "--target-tensor-parallel-size", "1")
    assert "lies inside the published checkpoint" in line, line
    assert not os.path.exists(inside)


@pytest.fixture(scope="module")
def hf_model(saved, tmp_path_factory) -> str:
    pytest.importorskip("transformers")
    out = str(tmp_path_factory.mktemp("hf") / "model")
    assert checkpoint_convert.main(["--load", saved["torch"], "--save", out, "--to-hf"]) == 0
    return out


def test_a_truncated_safetensors_file_is_refused(hf_model, tmp_path, capsys):
    model = str(tmp_path / "model")
    shutil.copytree(hf_model, model)
    weights = os.path.join(model, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    line = _convert(capsys, "--load", model, "--save", tmp_path / "out", "--from-hf")
    assert model in line and "could not be read" in line, line
    assert not (tmp_path / "out").exists()


def test_a_config_that_lies_about_shapes_is_refused(hf_model, tmp_path, capsys):
    model = str(tmp_path / "model")
    shutil.copytree(hf_model, model)
    path = os.path.join(model, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["n_embd"] = 2 * config["n_embd"]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f)
    line = _convert(capsys, "--load", model, "--save", tmp_path / "out", "--from-hf")
    assert model in line, line
    assert not (tmp_path / "out").exists()


def test_a_weight_map_naming_a_file_outside_is_refused(hf_model, tmp_path, capsys):
    model = str(tmp_path / "model")
    shutil.copytree(hf_model, model)
    with open(os.path.join(model, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"lm_head.weight": "../model.safetensors"}}, f)
    line = _convert(capsys, "--load", model, "--save", tmp_path / "out", "--from-hf")
    assert "'../model.safetensors'" in line and "must lie in" in line, line


# ----- the crafted metadata end to end -----------------------------------------------------

def _one_error_line(result: subprocess.CompletedProcess, prefix: str, *needles: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), output[-4000:]


@pytest.mark.slow
def test_crafted_metadata_end_to_end(saved, tmp_path):
    save = str(tmp_path / "ckpt")
    shutil.copytree(saved["torch_dist"], save)
    marker = str(tmp_path / "marker")
    metadata = plant_payload(save, marker)
    before = tree(save)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    commands = [
        ([sys.executable, "pretrain_gpt.py",
          *tiny_gpt_argv(train_iters=2, load=save, ckpt_format="torch_dist")], "error: "),
        ([sys.executable, "tools/text_generation.py", "--load", save, "--prompt", "1 2 3",
          "--max-new-tokens", "2", "--greedy"], "text_generation.py: error: "),
        ([sys.executable, "tools/checkpoint_convert.py", "--load", save, "--save",
          str(tmp_path / "out"), "--target-tensor-parallel-size", "1"],
         "checkpoint_convert.py: error: "),
    ]
    for command, prefix in commands:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env,
                                timeout=180)
        _one_error_line(result, prefix, metadata, "posix.system")
        assert not os.path.exists(marker), command
    assert tree(save) == before and not (tmp_path / "out").exists()
