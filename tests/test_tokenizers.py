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
    with pytest.raises(FileNotFoundError, match="--vocab-file .*missing.json"):
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
    with pytest.raises(FileNotFoundError, match="--tokenizer-model"):
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
