"""Bad data inputs, made as a user would make them: preprocessing inputs and
flags, tokenizer files, datasets and their caches. Each case ends with exit
status 1 (or the ValueError that `exit_on_job_error` turns into it) and one
error line naming the input, never a traceback, and leaves every file as it
was: the folder holding the inputs and the output prefix is snapshotted
before and compared after.

Tables, one per surface:
- PREPROCESS_CASES: `tools/preprocess_data.py` in-process (`main(argv)`);
- TOKENIZER_CASES: tokenizer files, through the same tool;
- DATASET_CASES: `.bin`/`.idx` datasets, --data-path, --split and the
  --data-cache-path caches, through `build_gpt_datasets`;
then the signal cases (SIGTERM, SIGINT, SIGKILL with workers) and two runs of
`pretrain_gpt.py` (slow).
"""
import base64
import gzip
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from megatron_sr.config import DataConfig
from megatron_sr.data.gpt_dataset import build_gpt_datasets
from megatron_sr.data.indexed_dataset import write_dataset
from megatron_sr.data.tokenizers import GPT2BPETokenizer, NullTokenizer
from megatron_sr.data.tokenizers.gpt2_bpe import _byte_to_printable

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "preprocess_data.py")
_spec = importlib.util.spec_from_file_location("preprocess_data_tool", TOOL)
preprocess_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(preprocess_tool)

NULL = ("--tokenizer-type", "NullTokenizer", "--vocab-size", "1000")
GOOD_LINE = b'{"text": "1 2 3"}\n'


def snapshot(folder) -> dict[str, str]:
    """Relative path -> sha256 of every file (or "dir") under `folder`."""
    state = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            state[os.path.relpath(os.path.join(root, name), folder)] = "dir"
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                state[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return state


def assert_one_error_line(text: str, prefix: str, needles) -> None:
    lines = text.strip().splitlines()
    assert "Traceback" not in text, text
    assert len(lines) == 1 and lines[0].startswith(prefix), text
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in: {lines[0]}"


# ----- a tiny GPT-2-format vocabulary whose merges every backend honours alike -------------

PRINTABLE = _byte_to_printable()
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a")]


def tiny_vocab() -> dict[str, int]:
    vocab = {PRINTABLE[b]: b for b in range(256)}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def tiny_merges(merges=MERGES) -> bytes:
    return ("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)).encode()


def _vocab_with(**changes) -> bytes:
    vocab = tiny_vocab()
    vocab.update(changes)
    return json.dumps(vocab).encode()


def _without_eod() -> bytes:
    vocab = tiny_vocab()
    del vocab["<|endoftext|>"]
    return json.dumps(vocab).encode()


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data)


def gpt2_flags(vocab="vocab.json", merges="merges.txt"):
    return ("--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges)


def gpt2_files(vocab: bytes = None, merges: bytes = None) -> dict[str, bytes]:
    return {"vocab.json": tiny_vocab_bytes() if vocab is None else vocab,
            "merges.txt": tiny_merges() if merges is None else merges}


def tiny_vocab_bytes() -> bytes:
    return json.dumps(tiny_vocab()).encode()


def _hf_folder_with_bad_config() -> dict[str, bytes]:
    from tokenizers import Tokenizer, models

    vocab = {"a": 0, "</s>": 1}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="a"))
    return {"hf/tokenizer.json": tokenizer.to_str().encode(),
            "hf/tokenizer_config.json": b'{"eos_token": '}


def _ranks(entries) -> bytes:
    return b"".join(base64.b64encode(token) + b" " + str(rank).encode() + b"\n"
                    for token, rank in entries)


# (id, files to create: name -> bytes, argv after --output-prefix, needles of the error line).
# "{d}" in an argument is the case's folder. A file name ending in "/" is a folder.
PREPROCESS_CASES = [
    ("empty-input", {"in.jsonl": b""}, ("--input", "{d}/in.jsonl", *NULL),
     ["--input {d}/in.jsonl", "no document", "nothing to write"]),
    ("all-blank-input", {"in.jsonl": b"\n   \n\t\n"}, ("--input", "{d}/in.jsonl", *NULL),
     ["--input {d}/in.jsonl", "no document"]),
    ("only-empty-texts", {"in.jsonl": b'{"text": ""}\n{"text": "  "}\n'},
     ("--input", "{d}/in.jsonl", *NULL), ["--input {d}/in.jsonl", "no document"]),
    ("all-lines-skipped", {"in.jsonl": b'{"body": "1"}\n'},
     ("--input", "{d}/in.jsonl", "--skip-invalid", *NULL), ["no document", "1 invalid lines"]),
    ("one-key-empty", {"in.jsonl": b'{"text": "1", "title": ""}\n'},
     ("--input", "{d}/in.jsonl", "--json-keys", "text", "title", *NULL),
     ["no document", "'title'"]),
    ("duplicate-json-keys", {"in.jsonl": GOOD_LINE},
     ("--input", "{d}/in.jsonl", "--json-keys", "text", "text", *NULL),
     ["--json-keys text text", "twice"]),
    ("gz-truncated", {"in.jsonl.gz": _gzip(GOOD_LINE * 200)[:40]},
     ("--input", "{d}/in.jsonl.gz", *NULL), ["{d}/in.jsonl.gz", "cut short or corrupt"]),
    ("gz-not-gzip", {"in.jsonl.gz": GOOD_LINE}, ("--input", "{d}/in.jsonl.gz", *NULL),
     ["{d}/in.jsonl.gz", "cut short or corrupt"]),
    ("gz-corrupt-body", {"in.jsonl.gz": _gzip(GOOD_LINE * 200)[:30] + b"\xff" * 40},
     ("--input", "{d}/in.jsonl.gz", *NULL), ["{d}/in.jsonl.gz", "cut short or corrupt"]),
    ("json-nested-deeply",
     {"in.jsonl": b'{"text": ' + b"[" * 200000 + b"]" * 200000 + b"}\n"},
     ("--input", "{d}/in.jsonl", *NULL), ["{d}/in.jsonl:1", "nested too deeply"]),
    ("null-tokenizer-words", {"in.jsonl": GOOD_LINE + b'{"text": "1 hello"}\n'},
     ("--input", "{d}/in.jsonl", *NULL), ["{d}/in.jsonl:2", "'hello' is not an integer id"]),
    ("null-tokenizer-id-too-large", {"in.jsonl": b'{"text": "1 1000"}\n'},
     ("--input", "{d}/in.jsonl", *NULL), ["{d}/in.jsonl:1", "[1000]", "--vocab-size"]),
    ("input-missing", {}, ("--input", "{d}/none.jsonl", *NULL),
     ["--input {d}/none.jsonl", "no such file"]),
    ("input-is-a-folder", {"sub/": b""}, ("--input", "{d}/sub", *NULL),
     ["--input {d}/sub", "is a directory"]),
    ("input-glob-matches-nothing", {}, ("--input", "{d}/*.jsonl", *NULL),
     ["--input {d}/*.jsonl", "matches no file"]),
    ("output-parent-is-a-file", {"in.jsonl": GOOD_LINE, "afile": b"keep"},
     ("--input", "{d}/in.jsonl", "--output-prefix", "{d}/afile/out", *NULL),
     ["--output-prefix {d}/afile/out", "a file stands where a folder is needed"]),
    ("output-grandparent-is-a-file", {"in.jsonl": GOOD_LINE, "afile": b"keep"},
     ("--input", "{d}/in.jsonl", "--output-prefix", "{d}/afile/x/out", *NULL),
     ["--output-prefix {d}/afile/x/out", "a file stands where a folder is needed"]),
    ("workers-zero", {"in.jsonl": GOOD_LINE}, ("--input", "{d}/in.jsonl", "--workers", "0", *NULL),
     ["--workers", "got 0"]),
    ("null-vocab-size-zero", {"in.jsonl": GOOD_LINE},
     ("--input", "{d}/in.jsonl", "--tokenizer-type", "NullTokenizer", "--vocab-size", "0"),
     ["--vocab-size", "got 0"]),
    ("null-vocab-size-huge", {"in.jsonl": GOOD_LINE},
     ("--input", "{d}/in.jsonl", "--tokenizer-type", "NullTokenizer", "--vocab-size",
      str(10**12)), ["--vocab-size", str(10**12), "int32"]),
    ("null-without-vocab-size", {"in.jsonl": GOOD_LINE},
     ("--input", "{d}/in.jsonl", "--tokenizer-type", "NullTokenizer"),
     ["--tokenizer-type NullTokenizer needs --vocab-size"]),
]

TOKENIZER_CASES = [
    ("gpt2-without-merge-file", gpt2_files(),
     ("--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "{d}/vocab.json"),
     ["--merge-file"]),
    ("gpt2-vocab-missing", gpt2_files(), gpt2_flags("{d}/none.json", "{d}/merges.txt"),
     ["--vocab-file {d}/none.json", "no such file"]),
    ("gpt2-vocab-is-a-folder", {**gpt2_files(), "v/": b""}, gpt2_flags("{d}/v", "{d}/merges.txt"),
     ["--vocab-file {d}/v", "is a directory"]),
    ("gpt2-vocab-not-json", gpt2_files(vocab=b"\x00\xff binary"),
     gpt2_flags("{d}/vocab.json", "{d}/merges.txt"), ["--vocab-file {d}/vocab.json", "UTF-8"]),
    ("gpt2-vocab-truncated-json", gpt2_files(vocab=tiny_vocab_bytes()[:100]),
     gpt2_flags("{d}/vocab.json", "{d}/merges.txt"), ["--vocab-file {d}/vocab.json", "JSON"]),
    ("gpt2-vocab-a-list", gpt2_files(vocab=b"[1, 2]"),
     gpt2_flags("{d}/vocab.json", "{d}/merges.txt"), ["--vocab-file {d}/vocab.json", "object"]),
    ("gpt2-vocab-string-id", gpt2_files(vocab=_vocab_with(he="257")),
     gpt2_flags("{d}/vocab.json", "{d}/merges.txt"), ["--vocab-file {d}/vocab.json", "'he'",
                                                       "0..260"]),
    ("gpt2-vocab-duplicate-id", gpt2_files(vocab=_vocab_with(he=256)),
     gpt2_flags("{d}/vocab.json", "{d}/merges.txt"), ["--vocab-file {d}/vocab.json", "each once"]),
    ("gpt2-vocab-id-gap", gpt2_files(vocab=_vocab_with(he=900)),
     gpt2_flags("{d}/vocab.json", "{d}/merges.txt"), ["--vocab-file {d}/vocab.json", "'he': 900"]),
    ("gpt2-vocab-float-id", gpt2_files(vocab=_vocab_with(he=257.0)),
     gpt2_flags("{d}/vocab.json", "{d}/merges.txt"), ["--vocab-file {d}/vocab.json", "'he'"]),
    ("gpt2-vocab-without-eod", gpt2_files(vocab=_without_eod()),
     gpt2_flags("{d}/vocab.json", "{d}/merges.txt"),
     ["--vocab-file {d}/vocab.json", "<|endoftext|>"]),
    ("gpt2-vocab-not-byte-level", gpt2_files(vocab=_vocab_with(**{"∑": 261})),
     gpt2_flags("{d}/vocab.json", "{d}/merges.txt"),
     ["--vocab-file {d}/vocab.json", "256 byte characters"]),
    ("gpt2-merges-missing", gpt2_files(), gpt2_flags("{d}/vocab.json", "{d}/none.txt"),
     ["--merge-file {d}/none.txt", "no such file"]),
    ("gpt2-merges-is-a-folder", {**gpt2_files(), "m/": b""}, gpt2_flags("{d}/vocab.json", "{d}/m"),
     ["--merge-file {d}/m", "is a directory"]),
    ("gpt2-merges-empty", gpt2_files(merges=b""), gpt2_flags("{d}/vocab.json", "{d}/merges.txt"),
     ["--merge-file {d}/merges.txt", "no merge makes 4"]),
    ("gpt2-merges-only-header", gpt2_files(merges=b"#version: 0.2\n"),
     gpt2_flags("{d}/vocab.json", "{d}/merges.txt"), ["--merge-file {d}/merges.txt", "no merge"]),
    ("gpt2-merges-binary", gpt2_files(merges=b"\x89PNG\r\n\x1a\n\x00\xff"),
     gpt2_flags("{d}/vocab.json", "{d}/merges.txt"), ["--merge-file {d}/merges.txt", "UTF-8"]),
    ("gpt2-merges-three-pieces", gpt2_files(merges=b"#version: 0.2\n\xc4\xa0 t x\n"),
     gpt2_flags("{d}/vocab.json", "{d}/merges.txt"),
     ["--merge-file {d}/merges.txt:2", "two space-separated pieces"]),
    ("gpt2-merges-foreign", gpt2_files(merges=tiny_merges(MERGES + [("x", "y")])),
     gpt2_flags("{d}/vocab.json", "{d}/merges.txt"),
     ["--merge-file {d}/merges.txt:6", "'xy' is not in the --vocab-file"]),
    ("gpt2-merges-out-of-id-order", gpt2_files(merges=tiny_merges(MERGES[1::-1] + MERGES[2:])),
     gpt2_flags("{d}/vocab.json", "{d}/merges.txt"),
     ["--merge-file {d}/merges.txt:3", "id order"]),
    ("gpt2-merges-repeated", gpt2_files(merges=tiny_merges(MERGES + MERGES[-1:])),
     gpt2_flags("{d}/vocab.json", "{d}/merges.txt"), ["--merge-file {d}/merges.txt:6"]),
    ("gpt2-merges-incomplete", gpt2_files(merges=tiny_merges(MERGES[:-1])),
     gpt2_flags("{d}/vocab.json", "{d}/merges.txt"),
     ["--merge-file {d}/merges.txt", "no merge makes 1", "'Ġa'"]),
    *[(f"{kind.lower()}-model-{name}", files, ("--tokenizer-type", kind, "--tokenizer-model",
                                               "{d}/" + target), ["--tokenizer-model {d}/" + target,
                                                                  message])
      for kind in ("SentencePieceTokenizer", "HuggingFaceTokenizer", "TikTokenizer",
                   "Llama2Tokenizer", "Llama3Tokenizer")
      for name, files, target, message in [
          ("missing", {}, "none.model", "no"),
          ("a-folder", {"f/": b""}, "f", "tokenizer.json" if kind == "HuggingFaceTokenizer"
           else "is a directory"),
          ("garbage", {"g.model": b"\x00\x01garbage\xff"}, "g.model", "not a")]],
    ("huggingface-config-corrupt", _hf_folder_with_bad_config(),
     ("--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "{d}/hf"),
     ["--tokenizer-model {d}/hf/tokenizer_config.json", "not a JSON object"]),
    ("tiktoken-duplicate-ranks", {"r.tiktoken": _ranks([(b"a", 0), (b"b", 0)])},
     ("--tokenizer-type", "TikTokenizer", "--tokenizer-model", "{d}/r.tiktoken"),
     ["--tokenizer-model {d}/r.tiktoken", "distinct integer ranks"]),
    ("tiktoken-bad-base64", {"r.tiktoken": b"@@@ 0\n"},
     ("--tokenizer-type", "TikTokenizer", "--tokenizer-model", "{d}/r.tiktoken"),
     ["--tokenizer-model {d}/r.tiktoken", "not a tiktoken BPE ranks file"]),
    ("llama3-bad-line", {"t.model": _ranks([(b"a", 0)]) + b"%%% 1\n"},
     ("--tokenizer-type", "Llama3Tokenizer", "--tokenizer-model", "{d}/t.model"),
     ["--tokenizer-model {d}/t.model:2", "not a tiktoken BPE ranks file"]),
    ("llama3-ranks-with-a-gap", {"t.model": _ranks([(b"a", 0), (b"b", 2)])},
     ("--tokenizer-type", "Llama3Tokenizer", "--tokenizer-model", "{d}/t.model"),
     ["--tokenizer-model {d}/t.model", "must be 0..1"]),
    ("tiktoken-json-without-rank", {"r.json": b'[{"token_bytes": "YQ=="}]'},
     ("--tokenizer-type", "TikTokenizer", "--tokenizer-model", "{d}/r.json"),
     ["--tokenizer-model {d}/r.json", "not a tiktoken BPE ranks file"]),
    ("tiktoken-too-few-special-tokens", {"r.tiktoken": _ranks([(b"a", 0)])},
     ("--tokenizer-type", "TikTokenizer", "--tokenizer-model", "{d}/r.tiktoken",
      "--tiktoken-num-special-tokens", "3"), ["--tiktoken-num-special-tokens", "got 3"]),
    ("tiktoken-special-tokens-absurd", {"r.tiktoken": _ranks([(b"a", 0)])},
     ("--tokenizer-type", "TikTokenizer", "--tokenizer-model", "{d}/r.tiktoken",
      "--tiktoken-num-special-tokens", str(10**12)),
     ["--tiktoken-num-special-tokens", str(10**12)]),
]


def _make_files(folder, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = folder / name
        if name.endswith("/"):
            path.mkdir(parents=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _run_tool(folder, argv, capfd) -> tuple[int, str]:
    """`main(argv)` of tools/preprocess_data.py: (exit status, stderr)."""
    argv = [a.replace("{d}", str(folder)) for a in argv]
    if "--output-prefix" not in argv:
        argv += ["--output-prefix", str(folder / "out")]
    code = preprocess_tool.main(argv)
    return code, capfd.readouterr().err


@pytest.mark.parametrize("files, argv, needles",
                         [c[1:] for c in PREPROCESS_CASES + TOKENIZER_CASES],
                         ids=[c[0] for c in PREPROCESS_CASES + TOKENIZER_CASES])
def test_bad_preprocessing_input_one_error_line_nothing_written(tmp_path, capfd, files, argv,
                                                                  needles):
    if "--input" not in argv:  # a tokenizer case: any input will do
        files, argv = {**files, "in.jsonl": GOOD_LINE}, ("--input", "{d}/in.jsonl", *argv)
    _make_files(tmp_path, files)
    before = snapshot(tmp_path)
    code, err = _run_tool(tmp_path, argv, capfd)
    assert code == 1, err
    assert_one_error_line(err, "preprocess_data.py: error: ",
                          [n.replace("{d}", str(tmp_path)) for n in needles])
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_one_error_line(tmp_path, capfd):
    (tmp_path / "in.jsonl").write_bytes(GOOD_LINE)
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    try:
        before = snapshot(tmp_path)
        code, err = _run_tool(tmp_path, ("--input", "{d}/in.jsonl", "--output-prefix",
                                         "{d}/ro/out", *NULL), capfd)
        assert code == 1
        assert_one_error_line(err, "preprocess_data.py: error: ", ["--output-prefix",
                                                                    str(tmp_path / "ro")])
        assert snapshot(tmp_path) == before
    finally:
        os.chmod(tmp_path / "ro", 0o755)


@pytest.mark.parametrize("flags, needle", [
    (dict(temperature=float("nan")), "--temperature"), (dict(temperature=float("inf")),
                                                        "--temperature"),
    (dict(temperature=0.0), "--temperature"), (dict(temperature=-1.0), "--temperature"),
    (dict(top_p=float("nan")), "--top-p"), (dict(top_p=1.5), "--top-p"),
    (dict(top_k=-1), "--top-k"), (dict(top_k=101), "--top-k"),
], ids=["temperature-nan", "temperature-inf", "temperature-0", "temperature-negative",
        "top-p-nan", "top-p-above-1", "top-k-negative", "top-k-above-vocabulary"])
def test_bad_sampling_flags_are_named(flags, needle):
    """tools/text_generation.py prints this ValueError as its one error line;
    `generate` checks before its first forward pass."""
    from megatron_sr.inference.sampling import check_sampling

    values = dict(temperature=1.0, top_k=0, top_p=1.0) | flags
    with pytest.raises(ValueError, match=needle) as error:
        check_sampling(values["temperature"], values["top_k"], values["top_p"], 100)
    assert "\n" not in str(error.value)


def test_the_tables_cover_enough_cases():
    assert len(PREPROCESS_CASES) >= 20 and len(TOKENIZER_CASES) >= 30


def test_an_existing_dataset_survives_a_failed_run(tmp_path, capfd):
    """A bad input aimed at the prefix of an existing dataset leaves it as it was."""
    (tmp_path / "good.jsonl").write_bytes(GOOD_LINE)
    assert _run_tool(tmp_path, ("--input", "{d}/good.jsonl", *NULL), capfd)[0] == 0
    (tmp_path / "bad.jsonl").write_bytes(GOOD_LINE + b'{"text": "x"}\n')
    before = snapshot(tmp_path)
    code, err = _run_tool(tmp_path, ("--input", "{d}/bad.jsonl", *NULL), capfd)
    assert code == 1 and "bad.jsonl:2" in err
    assert snapshot(tmp_path) == before


def test_a_failed_run_removes_the_output_folder_it_created(tmp_path, capfd):
    (tmp_path / "in.jsonl").write_bytes(b"")
    code, _ = _run_tool(tmp_path, ("--input", "{d}/in.jsonl", "--output-prefix",
                                   "{d}/new/deeper/out", *NULL), capfd)
    assert code == 1 and not (tmp_path / "new" / "deeper").exists()


@pytest.mark.parametrize("backend", ["regex", "tokenizers", "tiktoken"])
def test_the_tiny_gpt2_files_give_the_same_ids_on_every_backend(tmp_path, backend):
    """The validated merges are honoured alike: tiktoken ranks merges by the id
    of the piece they make, the other two by the merge's line."""
    _make_files(tmp_path, gpt2_files())
    tokenizer = GPT2BPETokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"),
                                 backend)
    vocab = tiny_vocab()
    assert tokenizer.tokenize("the at thet") == [
        vocab["t"], vocab["he"], vocab["Ġa"], vocab["t"], vocab["Ġthe"], vocab["t"]]


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def test_a_later_run_removes_stale_temporary_files_of_its_prefix(tmp_path, capfd):
    dead = _dead_pid()
    stale = [f"out_text_document.bin.tmp-{dead}-7f00", f"out_text_document.idx.tmp-{dead}-7f00"]
    kept = [f"out_text_document.bin.tmp-{os.getpid()}-7f00",  # a live process's
            f"other_text_document.bin.tmp-{dead}-7f00"]  # another prefix's
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"partial")
    (tmp_path / "in.jsonl").write_bytes(GOOD_LINE)
    code, err = _run_tool(tmp_path, ("--input", "{d}/in.jsonl", *NULL), capfd)
    assert code == 0, err
    names = set(os.listdir(tmp_path))
    assert not names & set(stale) and set(kept) <= names
    assert f"removed {tmp_path / stale[0]}, left by a killed run" in err


# ----- datasets, --data-path, --split, --data-cache-path -------------------------------------

def _dataset(folder) -> str:
    prefix = str(folder / "corpus")
    rng = np.random.default_rng(0)
    write_dataset(prefix, [rng.integers(0, 100, size=20) for _ in range(30)], dtype=np.uint16)
    return prefix


def _corrupt_cache(folder, pattern: str, data: bytes) -> None:
    """Builds the datasets once with a cache, then overwrites the cache files matching `pattern`."""
    cache = folder / "cache"
    build_gpt_datasets(DataConfig(data_path=[str(folder / "corpus")], seq_length=8,
                                  split="100,0,0", data_cache_path=str(cache)),
                       NullTokenizer(100), [10, 0, 0], 1)
    matches = [p for p in cache.iterdir() if pattern in p.name]
    assert matches, sorted(p.name for p in cache.iterdir())
    for path in matches:
        path.write_bytes(data)


def _header_claims(folder, count: int) -> None:
    path = folder / "corpus.idx"
    data = bytearray(path.read_bytes())
    data[18:26] = count.to_bytes(8, "little")  # the sequence count after magic, version, dtype
    path.write_bytes(bytes(data))


# (id, how to break the folder holding `corpus`, DataConfig changes, train samples, needles)
DATASET_CASES = [
    ("prefix-missing", None, dict(data_path=["{d}/none"]), 10, ["{d}/none.idx", "no such file"]),
    ("idx-empty", lambda d: (d / "corpus.idx").write_bytes(b""), {}, 10,
     ["{d}/corpus.idx", "header"]),
    ("idx-garbage", lambda d: (d / "corpus.idx").write_bytes(b"x" * 100), {}, 10,
     ["{d}/corpus.idx", "magic"]),
    ("idx-claims-2^40-sequences", lambda d: _header_claims(d, 2**40), {}, 10, ["{d}/corpus.idx"]),
    ("bin-truncated", lambda d: (d / "corpus.bin").write_bytes(b"\x00" * 10), {}, 10,
     ["{d}/corpus.bin"]),
    ("split-nan", None, dict(split="nan"), 10, ["--split 'nan'", "finite"]),
    ("split-inf", None, dict(split="inf,1,1"), 10, ["--split 'inf,1,1'", "finite"]),
    ("split-negative", None, dict(split="-1,2"), 10, ["--split '-1,2'"]),
    ("split-zero", None, dict(split="0,0,0"), 10, ["--split '0,0,0'", "positive sum"]),
    ("split-words", None, dict(split="train,valid"), 10, ["--split 'train,valid'"]),
    ("weight-nan", None, dict(data_path=["nan", "{d}/corpus"]), 10, ["--data-path nan", "finite"]),
    ("weight-inf", None, dict(data_path=["inf", "{d}/corpus"]), 10, ["--data-path inf", "finite"]),
    ("weights-overflow", None, dict(data_path=["1e308", "{d}/corpus", "1e308", "{d}/corpus"]), 10,
     ["--data-path 1e308", "finite sum"]),
    ("weights-all-zero", None, dict(data_path=["0", "{d}/corpus"]), 10,
     ["--data-path 0", "positive"]),
    ("valid-split-without-documents", None, dict(split="100,0,0"), None,
     ["{d}/corpus", "the valid split", "--split"]),
    ("samples-beyond-memory", None, {}, 10**13, ["{d}/corpus (train)", "memory",
                                                 "--global-batch-size"]),
    ("token-range-cache-corrupt", lambda d: _corrupt_cache(d, "token-id-range", b"{not json"),
     dict(data_cache_path="{d}/cache"), 10, ["--data-cache-path", "token-id-range.json",
                                             "delete it"]),
    ("token-range-cache-wrong-values",
     lambda d: _corrupt_cache(d, "token-id-range", b'{"token_id_range": ["a", 1]}'),
     dict(data_cache_path="{d}/cache"), 10, ["--data-cache-path", "token-id-range.json"]),
    ("index-cache-corrupt", lambda d: _corrupt_cache(d, "sample_index.npy", b"\x93NUMPY garbage"),
     dict(data_cache_path="{d}/cache", split="100,0,0"), 10, ["--data-cache-path {d}/cache",
                                                             "sample_index.npy",
                                             "delete it"]),
    ("index-cache-wrong-array",
     lambda d: _corrupt_cache(d, "shuffle_index.npy", _npy(np.zeros((2, 2), np.float32))),
     dict(data_cache_path="{d}/cache", split="100,0,0"), 10,
     ["{d}/cache", "shuffle_index.npy", "not this index"]),
]


def _npy(array) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize("damage, changes, train_samples, needles",
                         [c[1:] for c in DATASET_CASES], ids=[c[0] for c in DATASET_CASES])
def test_bad_dataset_is_one_error_naming_it_nothing_changed(tmp_path, damage, changes,
                                                             train_samples, needles):
    _dataset(tmp_path)
    if damage is not None:
        damage(tmp_path)
    fill = lambda v: [x.replace("{d}", str(tmp_path)) for x in v] if isinstance(v, list) \
        else v.replace("{d}", str(tmp_path)) if isinstance(v, str) else v  # noqa: E731
    config = dict(data_path=[str(tmp_path / "corpus")], seq_length=8, split="90,10,0")
    config.update({k: fill(v) for k, v in changes.items()})
    samples = [10, 5, 0] if train_samples is None else [train_samples, 0, 0]
    before = snapshot(tmp_path)
    with pytest.raises(ValueError) as error:
        build_gpt_datasets(DataConfig(**config), NullTokenizer(100), samples, 1)
    message = str(error.value)
    assert "\n" not in message, message
    for needle in fill(needles):
        assert needle in message, f"{needle!r} not in: {message}"
    assert snapshot(tmp_path) == before


# ----- signals: SIGTERM and SIGINT clean up, SIGKILL leaves no traceback ---------------------

def _start(folder, sample_corpus, workers: int) -> subprocess.Popen:
    """tools/preprocess_data.py on the ~9 MB sample corpus (seconds of work) with the
    tiny GPT-2 files, in its own session so the test can signal the whole group."""
    _make_files(folder, gpt2_files())
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.Popen(
        [sys.executable, TOOL, "--input", sample_corpus, "--output-prefix", str(folder / "out"),
         *gpt2_flags(str(folder / "vocab.json"), str(folder / "merges.txt")),
         "--workers", str(workers), "--log-interval", "20"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True, preexec_fn=_sigint_as_from_a_terminal)


def _sigint_as_from_a_terminal() -> None:
    """SIGINT at its default in the tool, as a terminal's Ctrl-C finds it, even when
    the suite itself runs as a background job (which inherits SIGINT ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


pytest_plugins = ["data_fixtures"]


@pytest.mark.slow
@pytest.mark.parametrize("signum, whole_group, workers, code", [
    (signal.SIGTERM, False, 1, 143), (signal.SIGTERM, True, 2, 143),
    (signal.SIGINT, True, 2, 130), (signal.SIGINT, False, 1, 130),
], ids=["sigterm-1-worker", "sigterm-group-2-workers", "sigint-group-2-workers",
        "sigint-1-worker"])
def test_signal_stops_the_run_cleanly(tmp_path, sample_corpus, signum, whole_group, workers,
                                      code):
    process = _start(tmp_path, sample_corpus, workers)
    try:
        first = process.stderr.readline()
        assert first.startswith("processed 20 documents"), first
        (os.killpg if whole_group else os.kill)(process.pid, signum)
        _, err = process.communicate(timeout=60)  # a hang fails here, the finally kills it
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == code, err
    assert_one_error_line(err, "preprocess_data.py: stopped by SIG", ["temporary files"])
    assert not [n for n in os.listdir(tmp_path) if n.startswith("out")]


@pytest.mark.slow
def test_sigkill_of_the_parent_ends_workers_quietly(tmp_path, sample_corpus):
    process = _start(tmp_path, sample_corpus, 2)
    try:
        assert process.stderr.readline().startswith("processed 20 documents")
        os.kill(process.pid, signal.SIGKILL)
        _, err = process.communicate(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the workers notice within a moment
            if subprocess.run(["pgrep", "-s", str(process.pid)],
                              capture_output=True).returncode != 0:
                break
            time.sleep(0.2)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert subprocess.run(["pgrep", "-s", str(process.pid)], capture_output=True).returncode != 0
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert any(".bin.tmp-" in n for n in os.listdir(tmp_path))  # removed by the next run


# ----- the same refusals through pretrain_gpt.py ---------------------------------------------

PRETRAIN_BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                 "--seq-length", "8", "--micro-batch-size", "2", "--lr", "1e-3",
                 "--train-iters", "2", "--eval-iters", "0", "--split", "100,0,0"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["vocab-file-is-a-folder", "token-range-cache-corrupt"])
def test_pretrain_refuses_with_one_line(tmp_path, case):
    prefix = _dataset(tmp_path)
    if case == "vocab-file-is-a-folder":
        (tmp_path / "v").mkdir()
        (tmp_path / "merges.txt").write_bytes(tiny_merges())
        flags = ["--data-path", prefix, *gpt2_flags(str(tmp_path / "v"),
                                                    str(tmp_path / "merges.txt"))]
        needles = [f"--vocab-file {tmp_path / 'v'}", "is a directory"]
    else:
        _corrupt_cache(tmp_path, "token-id-range", b"\x00")
        flags = ["--data-path", prefix, "--data-cache-path", str(tmp_path / "cache"),
                 "--tokenizer-type", "NullTokenizer", "--vocab-size", "100"]
        needles = ["--data-cache-path", "token-id-range.json"]
    before = snapshot(tmp_path)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, os.path.join(REPO, "pretrain_gpt.py"),
                             *PRETRAIN_BASE, *flags], capture_output=True, text=True, env=env,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in result.stderr and len(error_lines) == 1, result.stderr
    for needle in needles:
        assert needle in error_lines[0]
    assert snapshot(tmp_path) == before
