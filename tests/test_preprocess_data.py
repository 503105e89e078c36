"""tools/preprocess_data.py: worker-count independence, exact tokens, invalid
input, empty documents, .gz and glob inputs, and no valid-looking output
after an interrupted run."""
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from megatron_sr.data.indexed_dataset import IndexedDataset

pytest_plugins = ["data_fixtures"]


def run_preprocess(inputs, output_prefix, *extra, tokenizer_args=()):
    command = [sys.executable, "tools/preprocess_data.py", "--input", *inputs,
               "--output-prefix", str(output_prefix), *tokenizer_args, *extra]
    return subprocess.run(command, capture_output=True, text=True)


@pytest.fixture(scope="module")
def gpt2_args(gpt2_files):
    return ("--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", gpt2_files[0],
            "--merge-file", gpt2_files[1])


NULL_ARGS = ("--tokenizer-type", "NullTokenizer", "--vocab-size", "1000")


def files_of(prefix):
    return open(f"{prefix}.bin", "rb").read(), open(f"{prefix}.idx", "rb").read()


def output_names(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith((".bin", ".idx")))


@pytest.fixture(scope="module")
def one_worker_output(sample_slice, gpt2_args, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("pre1") / "slice"
    result = run_preprocess([sample_slice], prefix, "--append-eod", "--workers", "1",
                            "--log-interval", "10", tokenizer_args=gpt2_args)
    assert result.returncode == 0, result.stderr
    return f"{prefix}_text_document", result.stderr


def test_output_identical_for_1_and_2_workers(one_worker_output, sample_slice, gpt2_args,
                                              tmp_path):
    prefix = tmp_path / "slice"
    result = run_preprocess([sample_slice], prefix, "--append-eod", "--workers", "2",
                            tokenizer_args=gpt2_args)
    assert result.returncode == 0, result.stderr
    assert files_of(f"{prefix}_text_document") == files_of(one_worker_output[0])


def test_tokens_equal_direct_tokenization(one_worker_output, sample_slice, gpt2_tokenizer):
    dataset = IndexedDataset(one_worker_output[0])
    with open(sample_slice, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    assert dataset.dtype == np.uint16
    assert len(dataset) == len(texts)
    for i, text in enumerate(texts):
        assert dataset[i].tolist() == gpt2_tokenizer.tokenize(text) + [gpt2_tokenizer.eod]


def test_progress_and_summary_lines(one_worker_output, sample_slice):
    log = one_worker_output[1]
    assert "processed 10 documents (" in log and "docs/s" in log and "MB/s" in log
    assert "ETA" in log
    with open(sample_slice, encoding="utf-8") as f:
        count = sum(1 for _ in f)
    assert f"{count} documents" in log and "skipped 0 empty documents" in log


def test_batches_across_workers_keep_order(tmp_path, monkeypatch):
    """Many tiny batches, two workers: the in-process API gives the same files."""
    from megatron_sr.data import preprocessing

    lines = [json.dumps({"text": " ".join(str(j) for j in range(i % 7 + 1))}) for i in range(300)]
    source = tmp_path / "numbers.jsonl"
    source.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(preprocessing, "BATCH_BYTES", 64)
    spec = preprocessing.TokenizerSpec("NullTokenizer", vocab_size=1000)
    outputs = []
    for workers in (1, 2):
        prefix = str(tmp_path / f"w{workers}")
        preprocessing.preprocess([str(source)], prefix, spec, append_eod=True, workers=workers,
                                 log=None)
        outputs.append(files_of(f"{prefix}_text_document"))
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("bad_line,message", [
    (b'{"text": "unterminated\n', "malformed JSON"),
    (b'{"body": "no text"}\n', "missing key 'text'"),
    (b'{"text": 42}\n', "key 'text' is a int, not a string"),
    (b'["a", "list"]\n', "expected a JSON object, got list"),
    (b'{"text": "caf\xe9"}\n', "not valid UTF-8"),
])
def test_invalid_line_is_an_error_naming_file_and_line(tmp_path, bad_line, message):
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"text": "1 2"}\n\n{"text": "3"}\n' + bad_line + b'{"text": "4"}\n')
    result = run_preprocess([str(source)], tmp_path / "out", tokenizer_args=NULL_ARGS)
    assert result.returncode == 1
    assert f"{source}:4: {message}" in result.stderr
    assert "--skip-invalid" in result.stderr
    assert output_names(tmp_path) == []

    result = run_preprocess([str(source)], tmp_path / "out", "--skip-invalid", "--append-eod",
                            tokenizer_args=NULL_ARGS)
    assert result.returncode == 0, result.stderr
    assert "skipped 1 invalid lines" in result.stderr
    dataset = IndexedDataset(str(tmp_path / "out_text_document"))
    assert [dataset[i].tolist() for i in range(len(dataset))] == [[1, 2, 1000], [3, 1000],
                                                                   [4, 1000]]


def test_empty_documents_skipped_and_counted(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "1"}\n{"text": ""}\n{"text": "   "}\n{"text": "2 3"}\n')
    result = run_preprocess([str(source)], tmp_path / "out", "--append-eod",
                            tokenizer_args=NULL_ARGS)
    assert result.returncode == 0, result.stderr
    assert "2 documents, 5 tokens; skipped 2 empty documents" in result.stderr
    dataset = IndexedDataset(str(tmp_path / "out_text_document"))
    assert len(dataset) == 2


def test_gz_and_glob_inputs_and_several_keys(tmp_path):
    parts = [[{"text": "1 2", "title": "9"}, {"text": "3", "title": ""}],
             [{"text": "4 5 6", "title": "8 8"}]]
    for number, records in enumerate(parts):
        payload = "".join(json.dumps(r) + "\n" for r in records).encode()
        (tmp_path / f"part{number}.jsonl").write_bytes(payload)
        with gzip.open(tmp_path / f"part{number}.jsonl.gz", "wb") as f:
            f.write(payload)
    keys = ("--json-keys", "text", "title")
    plain = run_preprocess([str(tmp_path / "part*.jsonl")], tmp_path / "plain", *keys,
                           tokenizer_args=NULL_ARGS)
    zipped = run_preprocess([str(tmp_path / "part*.jsonl.gz")], tmp_path / "zipped", *keys,
                            tokenizer_args=NULL_ARGS)
    assert plain.returncode == 0 and zipped.returncode == 0, plain.stderr + zipped.stderr
    for key in ("text", "title"):
        assert files_of(tmp_path / f"plain_{key}_document") == files_of(
            tmp_path / f"zipped_{key}_document")
    text = IndexedDataset(str(tmp_path / "plain_text_document"))
    title = IndexedDataset(str(tmp_path / "plain_title_document"))
    assert [text[i].tolist() for i in range(len(text))] == [[1, 2], [3], [4, 5, 6]]
    assert [title[i].tolist() for i in range(len(title))] == [[9], [8, 8]]
    missing = run_preprocess([str(tmp_path / "nothing*.jsonl")], tmp_path / "x",
                             tokenizer_args=NULL_ARGS)
    assert missing.returncode == 1
    assert "nothing*.jsonl: the pattern matches no file" in missing.stderr


def test_killed_run_leaves_no_valid_looking_output(sample_corpus, gpt2_args, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    process = subprocess.Popen(
        [sys.executable, "tools/preprocess_data.py", "--input", sample_corpus,
         "--output-prefix", str(out / "corpus"), *gpt2_args, "--workers", "1",
         "--log-interval", "20"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        first_line = process.stderr.readline()  # tokens are being written now
        assert first_line.startswith("processed 20 documents"), first_line
        time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert output_names(out) == []
    assert any(".bin.tmp-" in name for name in os.listdir(out))  # the partial data, named so
    shutil.rmtree(out)


def test_bad_tokenizer_flag_fails_fast_with_workers(sample_slice, tmp_path):
    result = run_preprocess([sample_slice], tmp_path / "out", "--workers", "2",
                            tokenizer_args=("--tokenizer-type", "GPT2BPETokenizer", "--vocab-file",
                                            str(tmp_path / "none.json"), "--merge-file", "x"))
    assert result.returncode == 1
    assert f"--vocab-file {tmp_path / 'none.json'}: no such file" in result.stderr
    assert os.listdir(tmp_path) == []
