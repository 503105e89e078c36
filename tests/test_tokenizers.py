"""Tokenizers: GPT-2 BPE against known GPT-2 ids, SentencePiece training round
trips, and every tokenizer through the one `Tokenizer` interface."""
import json
import subprocess
import sys

import pytest

from megatron_sr.data.tokenizers import (
    GPT2BPETokenizer, NullTokenizer, SentencePieceTokenizer, Tokenizer, build_tokenizer,
    padded_vocab_size)

pytest_plugins = ["data_fixtures"]

# Ids produced by OpenAI's GPT-2 encoder for these strings.
GPT2_KNOWN = [
    ("Hello world", [15496, 995]),
    (" Hello world", [18435, 995]),
    ("I'm here", [40, 1101, 994]),
    ("you've they'll we'd", [5832, 1053, 484, 1183, 356, 1549]),
    ("a   b", [64, 220, 220, 275]),
    ("line\n\nnext", [1370, 198, 198, 19545]),
    ("héllo", [71, 2634, 18798]),
    ("🤗", [8582, 97, 245]),
    ("<|endoftext|>", [27, 91, 437, 1659, 5239, 91, 29]),  # plain text, not the eod id
]

ROUND_TRIP_TEXTS = [
    "", " ", "   leading and trailing   ", "tabs\tand\r\nwindows lines\n",
    "It's 3.14159 -- isn't it?!", "naïve café, Zürich, Ærø", "日本語のテキスト", "Привет, мир",
    "emoji 👍🏽👨‍👩‍👧 and 🤗", "mixed\u00a0nbsp\u2009thin space", "x" * 500,
]

PYTHON = sys.executable


@pytest.mark.parametrize("text,ids", GPT2_KNOWN)
def test_gpt2_known_encodings(gpt2_tokenizer, text, ids):
    assert gpt2_tokenizer.tokenize(text) == ids
    assert gpt2_tokenizer.detokenize(ids) == text


def test_gpt2_vocabulary_and_eod(gpt2_tokenizer):
    assert gpt2_tokenizer.vocab_size == 50257
    assert gpt2_tokenizer.eod == 50256
    assert gpt2_tokenizer.detokenize([gpt2_tokenizer.eod]) == "<|endoftext|>"


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_gpt2_exact_round_trip(gpt2_tokenizer, text):
    assert gpt2_tokenizer.detokenize(gpt2_tokenizer.tokenize(text)) == text


def test_gpt2_round_trip_on_sample_documents(gpt2_tokenizer, sample_slice):
    with open(sample_slice, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    for text in texts[:10] + texts[-1:]:
        ids = gpt2_tokenizer.tokenize(text)
        assert gpt2_tokenizer.detokenize(ids) == text
        # The merge cache must not change results: a second pass is identical.
        assert gpt2_tokenizer.tokenize(text) == ids


def test_gpt2_accepts_huggingface_file_names(gpt2_files, tmp_path):
    vocab_file, merge_file = gpt2_files
    (tmp_path / "vocab.json").write_bytes(open(vocab_file, "rb").read())
    (tmp_path / "merges.txt").write_bytes(open(merge_file, "rb").read())
    tokenizer = build_tokenizer("GPT2BPETokenizer", str(tmp_path / "vocab.json"),
                                str(tmp_path / "merges.txt"))
    assert tokenizer.tokenize("Hello world") == [15496, 995]


def test_gpt2_bad_files_name_the_flag(gpt2_files, tmp_path):
    vocab_file, merge_file = gpt2_files
    with pytest.raises(ValueError, match="--vocab-file .*missing.json"):
        GPT2BPETokenizer(str(tmp_path / "missing.json"), merge_file)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="--vocab-file .*bad.json"):
        GPT2BPETokenizer(str(tmp_path / "bad.json"), merge_file)
    (tmp_path / "bad.bpe").write_text("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match=r"--merge-file .*bad.bpe:2"):
        GPT2BPETokenizer(vocab_file, str(tmp_path / "bad.bpe"))


@pytest.fixture(scope="module")
def sentencepiece_models(sample_slice, tmp_path_factory):
    folder = tmp_path_factory.mktemp("spm")
    models = {}
    for model_type in ("bpe", "unigram"):
        prefix = folder / model_type
        subprocess.run([PYTHON, "tools/train_tokenizer.py", "--input", sample_slice,
                        "--vocab-size", "600", "--model-type", model_type,
                        "--output-prefix", str(prefix)], check=True, capture_output=True)
        models[model_type] = str(prefix) + ".model"
    return models


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_train_encode_decode(sentencepiece_models, sample_slice, model_type):
    tokenizer = build_tokenizer("SentencePieceTokenizer",
                                tokenizer_model=sentencepiece_models[model_type])
    assert tokenizer.vocab_size == 600
    assert tokenizer.eod == 2
    with open(sample_slice, encoding="utf-8") as f:
        text = json.loads(f.readline())["text"]
    ids = tokenizer.tokenize(text)
    assert len(ids) < len(text) / 2  # it learned merges
    assert tokenizer.detokenize(ids) == text
    for unseen in ["Zürich 日本 🤗", "  two  spaces\nnewline "]:  # byte fallback, whitespace kept
        assert tokenizer.detokenize(tokenizer.tokenize(unseen)) == unseen


def test_sentencepiece_training_is_deterministic(sentencepiece_models, sample_slice, tmp_path):
    subprocess.run([PYTHON, "tools/train_tokenizer.py", "--input", sample_slice,
                    "--vocab-size", "600", "--model-type", "bpe",
                    "--output-prefix", str(tmp_path / "again")], check=True, capture_output=True)
    assert (tmp_path / "again.model").read_bytes() == open(sentencepiece_models["bpe"], "rb").read()


def test_train_tokenizer_reports_bad_lines(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text key"}\n')
    result = subprocess.run([PYTHON, "tools/train_tokenizer.py", "--input", str(bad),
                             "--vocab-size", "300", "--output-prefix", str(tmp_path / "m")],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert f"{bad}:2" in result.stderr
    assert not (tmp_path / "m.model").exists()


def test_sentencepiece_missing_model_names_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--tokenizer-model"):
        SentencePieceTokenizer(str(tmp_path / "none.model"))


def test_null_tokenizer():
    tokenizer = NullTokenizer(100)
    assert tokenizer.vocab_size == 101 and tokenizer.eod == 100
    assert tokenizer.tokenize("5 0 99") == [5, 0, 99]
    assert tokenizer.detokenize([5, 0, 99]) == "5 0 99"
    with pytest.raises(ValueError, match="--vocab-size"):
        tokenizer.tokenize("100")


def _tokenizers_and_texts(gpt2_files, sentencepiece_models):
    return [
        (build_tokenizer("GPT2BPETokenizer", *gpt2_files), "One interface, 1 test."),
        (build_tokenizer("SentencePieceTokenizer",
                         tokenizer_model=sentencepiece_models["bpe"]), "One interface, 1 test."),
        (build_tokenizer("GPTSentencePieceTokenizer",
                         tokenizer_model=sentencepiece_models["unigram"]), "And God said."),
        (build_tokenizer("NullTokenizer", vocab_size=1000), "1 22 333"),
    ]


def test_all_tokenizers_share_one_interface(gpt2_files, sentencepiece_models):
    for tokenizer, text in _tokenizers_and_texts(gpt2_files, sentencepiece_models):
        assert isinstance(tokenizer, Tokenizer)
        assert isinstance(tokenizer.vocab_size, int) and 0 <= tokenizer.eod < tokenizer.vocab_size
        ids = tokenizer.tokenize(text)
        assert ids and all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.eod not in ids
        assert tokenizer.detokenize(ids) == text


def test_build_tokenizer_names_missing_flags():
    with pytest.raises(ValueError, match="--vocab-file and --merge-file"):
        build_tokenizer("GPT2BPETokenizer")
    with pytest.raises(ValueError, match="--tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer")
    with pytest.raises(ValueError, match="--vocab-size"):
        build_tokenizer("NullTokenizer")
    with pytest.raises(ValueError, match="--tokenizer-type 'BertWordPieceLowerCase'"):
        build_tokenizer("BertWordPieceLowerCase")


def test_padded_vocab_size():
    assert padded_vocab_size(50257) == 50304
    assert padded_vocab_size(50257, 128, 8) == 51200
    assert padded_vocab_size(1024, 128, 2) == 1024


# ----- GPT2BPETokenizer on the tiktoken and `tokenizers` libraries --------------------------

@pytest.mark.parametrize("backend", ["tiktoken", "tokenizers"])
def test_gpt2_runs_on_a_rust_library_with_identical_ids(gpt2_files, sample_slice, backend):
    fast = GPT2BPETokenizer(*gpt2_files, backend=backend)
    regex = GPT2BPETokenizer(*gpt2_files, backend="regex")
    assert (fast.backend, regex.backend) == (backend, "regex")
    assert GPT2BPETokenizer(*gpt2_files).backend == "tiktoken"  # auto: measured fastest
    with open(sample_slice, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    for text in texts + ROUND_TRIP_TEXTS + [text for text, _ in GPT2_KNOWN]:
        assert fast.tokenize(text) == regex.tokenize(text)
    assert fast.tokenize("a<|endoftext|>b") == regex.tokenize("a<|endoftext|>b")  # plain text


def test_gpt2_unknown_backend_is_named(gpt2_files):
    with pytest.raises(ValueError, match="backend must be one of auto, tiktoken"):
        GPT2BPETokenizer(*gpt2_files, backend="fast")


# ----- HuggingFaceTokenizer ----------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_tokenizer_folder(sample_slice, tmp_path_factory):
    """A byte-level BPE tokenizer.json trained here with the `tokenizers` library."""
    from tokenizers import Tokenizer as FastTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    with open(sample_slice, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    fast = FastTokenizer(models.BPE())
    fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    fast.decoder = decoders.ByteLevel()
    fast.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path_factory.mktemp("hf_tokenizer")
    fast.save(str(folder / "tokenizer.json"))
    return folder


def test_huggingface_tokenizer_from_file_or_folder(hf_tokenizer_folder):
    from megatron_sr.data.tokenizers import HuggingFaceTokenizer

    by_folder = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(hf_tokenizer_folder))
    by_file = HuggingFaceTokenizer(str(hf_tokenizer_folder / "tokenizer.json"))
    assert by_folder.vocab_size == by_file.vocab_size == 400
    assert by_folder.eod == by_file.eod == 0  # <|endoftext|>, the first special token
    for text in ROUND_TRIP_TEXTS:
        ids = by_folder.tokenize(text)
        assert ids == by_file.tokenize(text) and by_folder.detokenize(ids) == text
        assert all(0 <= i < 400 for i in ids)


def test_huggingface_tokenizer_eod_from_tokenizer_config(hf_tokenizer_folder, tmp_path):
    import shutil

    shutil.copy(hf_tokenizer_folder / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "a"}))
    tokenizer = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))
    assert tokenizer.eod == tokenizer.tokenize("a")[0]


def test_huggingface_tokenizer_errors_name_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--tokenizer-model .*no tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="--tokenizer-model .*not a Hugging Face tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))


# ----- TikTokenizer ------------------------------------------------------------------------

def _gpt2_ranks(gpt2_files) -> dict:
    """GPT-2's vocabulary as tiktoken BPE ranks (bytes -> id; r50k_base is exactly this)."""
    from megatron_sr.data.tokenizers.gpt2_bpe import _byte_to_printable

    byte_of = {c: b for b, c in _byte_to_printable().items()}
    vocab = json.loads(open(gpt2_files[0], encoding="utf-8").read())
    return {bytes(byte_of[c] for c in piece): i for piece, i in vocab.items()
            if piece != "<|endoftext|>"}


@pytest.mark.parametrize("file_format", ["megatron_json", "tiktoken"])
@pytest.mark.parametrize("pattern", ["v1", "v2"])
def test_tiktokenizer_reads_a_local_ranks_file(gpt2_files, gpt2_tokenizer, tmp_path, file_format,
                                               pattern):
    pytest.importorskip("tiktoken")
    import base64

    ranks = _gpt2_ranks(gpt2_files)
    path = tmp_path / "ranks"
    if file_format == "megatron_json":
        path.write_text(json.dumps([
            {"rank": r, "token_bytes": base64.b64encode(t).decode(), "token_str": ""}
            for t, r in sorted(ranks.items(), key=lambda item: item[1])]))
    else:
        path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    tokenizer = build_tokenizer("TikTokenizer", tokenizer_model=str(path), tiktoken_pattern=pattern,
                                tiktoken_num_special_tokens=1000)
    assert (tokenizer.vocab_size, tokenizer.eod) == (1000 + 50256, 2)  # eod: Megatron's </s>
    for text in ROUND_TRIP_TEXTS + ["Hello world"]:
        ids = tokenizer.tokenize(text)
        assert tokenizer.detokenize(ids) == text
        # Same BPE ranks, shifted past the special tokens: GPT-2 decodes them to the text.
        assert gpt2_tokenizer.detokenize([i - 1000 for i in ids]) == text
    assert tokenizer.tokenize("Hello world") == [1000 + 15496, 1000 + 995]


def test_tiktokenizer_needs_a_local_file(tmp_path):
    pytest.importorskip("tiktoken")
    with pytest.raises(ValueError, match="--tokenizer-model .*nothing is downloaded"):
        build_tokenizer("TikTokenizer", tokenizer_model=str(tmp_path / "missing.tiktoken"))
