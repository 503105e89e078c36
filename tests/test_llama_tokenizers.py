"""Llama2Tokenizer and Llama3Tokenizer, as Megatron-LM's ``--tokenizer-type``
names them, checked offline against libraries that implement the same
tokenizers independently: SentencePiece's own bos handling for Llama 2, and
Hugging Face's BPE (transformers' tiktoken converter) for Llama 3, on files
made here: a SentencePiece model trained with Llama 2's trainer options, and
GPT-2's BPE ranks written as a Llama 3 style tiktoken file."""
import base64
import json
import subprocess
import sys

import numpy as np
import pytest

from megatron_sr.data.indexed_dataset import IndexedDataset
from megatron_sr.data.tokenizers import build_tokenizer

pytest_plugins = ["data_fixtures"]

TEXTS = [
    "", " ", "Hello world", "   leading and trailing   ", "tabs\tand\r\nwindows lines\n",
    "It's 3.14159 -- isn't it?!", "I'M HERE, YOU'LL SEE", "12345 and 1234567", "naïve café, Zürich",
    "日本語のテキスト", "emoji 👍🏽👨‍👩‍👧 and 🤗", "mixed\u00a0nbsp\u2009thin space", "x" * 500,
]

# Meta's Llama 3 pre-tokenization pattern as published (meta-llama/llama3, llama/tokenizer.py).
META_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                       r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _first_document(sample_slice) -> str:
    with open(sample_slice, encoding="utf-8") as f:
        return json.loads(f.readline())["text"]


def _documents(sample_slice) -> list[str]:
    with open(sample_slice, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


# ----- Llama2Tokenizer ------------------------------------------------------------------------

def _train_sentencepiece(sample_slice, prefix, **options) -> str:
    """A 600-piece BPE model trained with Llama 2's trainer options (identity
    normalization, whitespace kept, digits split, byte fallback, <unk> <s> </s>
    at ids 0 1 2, no pad), the `options` overriding them."""
    import sentencepiece

    text = prefix.parent / "train.txt"
    text.write_text("\n".join(_documents(sample_slice)), encoding="utf-8")
    settings = dict(input=str(text), model_prefix=str(prefix), vocab_size=600, model_type="bpe",
                    normalization_rule_name="identity", remove_extra_whitespaces=False,
                    split_digits=True, byte_fallback=True, character_coverage=1.0,
                    unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    settings.update(options)
    sentencepiece.SentencePieceTrainer.train(**settings)
    return f"{prefix}.model"


@pytest.fixture(scope="module")
def llama2_model(sample_slice, tmp_path_factory):
    return _train_sentencepiece(sample_slice, tmp_path_factory.mktemp("llama2") / "tokenizer")


def test_llama2_ids_are_bos_then_the_sentencepiece_ids(llama2_model, sample_slice):
    import sentencepiece

    tokenizer = build_tokenizer("Llama2Tokenizer", tokenizer_model=llama2_model)
    reference = sentencepiece.SentencePieceProcessor(model_file=llama2_model, add_bos=True)
    assert (tokenizer.vocab_size, tokenizer.bos, tokenizer.eod) == (600, 1, 2)
    assert (reference.id_to_piece(tokenizer.bos), reference.id_to_piece(tokenizer.eod)) == \
        ("<s>", "</s>")
    for text in TEXTS + [_first_document(sample_slice)]:
        ids = tokenizer.tokenize(text)
        assert ids == reference.encode(text), text
        assert ids[0] == 1 and 2 not in ids  # bos first, no eos
        assert tokenizer.detokenize(ids) == text  # bos decodes to nothing
    assert tokenizer.tokenize("") == [1]
    # The one difference from GPTSentencePieceTokenizer on the same model: the bos.
    plain = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=llama2_model)
    assert tokenizer.tokenize("In the beginning") == [1] + plain.tokenize("In the beginning")
    assert plain.eod == tokenizer.eod


def test_llama2_needs_a_bos_piece(sample_slice, tmp_path):
    model = _train_sentencepiece(sample_slice, tmp_path / "nobos", bos_id=-1, eos_id=1)
    assert build_tokenizer("SentencePieceTokenizer", tokenizer_model=model).eod == 1
    with pytest.raises(ValueError, match=r"--tokenizer-model .*nobos.model: the model has no "
                                         r"beginning-of-sentence piece"):
        build_tokenizer("Llama2Tokenizer", tokenizer_model=model)


def test_llama2_bad_model_names_the_file(tmp_path):
    (tmp_path / "bad.model").write_bytes(b"\x00\x01 not a model \xff")
    with pytest.raises(ValueError, match=r"--tokenizer-model .*bad.model: not a SentencePiece"):
        build_tokenizer("Llama2Tokenizer", tokenizer_model=str(tmp_path / "bad.model"))
    with pytest.raises(ValueError, match="Llama2Tokenizer needs --tokenizer-model"):
        build_tokenizer("Llama2Tokenizer")


# ----- Llama3Tokenizer ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama3_file(gpt2_files, tmp_path_factory):
    """GPT-2's BPE (ranks 0..50255) as a Llama 3 tokenizer.model: 'base64 rank' lines."""
    from megatron_sr.data.tokenizers.gpt2_bpe import _byte_to_printable

    byte_of = {c: b for b, c in _byte_to_printable().items()}
    vocab = json.loads(open(gpt2_files[0], encoding="utf-8").read())
    ranks = sorted((i, bytes(byte_of[c] for c in piece)) for piece, i in vocab.items()
                   if piece != "<|endoftext|>")
    path = tmp_path_factory.mktemp("llama3") / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n"
                            for rank, token in ranks))
    return str(path)


@pytest.fixture(scope="module")
def llama3_reference(llama3_file):
    """Hugging Face's BPE on the same file and Meta's published pattern (no special tokens)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converted = TikTokenConverter(vocab_file=llama3_file, pattern=META_LLAMA3_PATTERN).converted()
    return PreTrainedTokenizerFast(tokenizer_object=converted)


def test_llama3_ids_match_an_independent_bpe(llama3_file, llama3_reference, sample_slice):
    tokenizer = build_tokenizer("Llama3Tokenizer", tokenizer_model=llama3_file)
    n = 50256  # BPE ranks in the file
    assert (tokenizer.vocab_size, tokenizer.bos, tokenizer.eod) == (n + 256, n, n + 1)
    for text in TEXTS + [_first_document(sample_slice)]:
        ids = tokenizer.tokenize(text)
        assert ids == [n] + llama3_reference.encode(text, add_special_tokens=False), text
        assert tokenizer.detokenize(ids[1:]) == text
        assert tokenizer.detokenize(ids) == "<|begin_of_text|>" + text  # as Meta's decode


def test_llama3_pattern_splits_numbers_into_threes_without_the_space(llama3_file,
                                                                     gpt2_tokenizer):
    tokenizer = build_tokenizer("Llama3Tokenizer", tokenizer_model=llama3_file)
    gpt2 = gpt2_tokenizer.tokenize  # the same BPE, with GPT-2's pre-tokenization
    assert tokenizer.tokenize("year 2024")[1:] == gpt2("year") + gpt2(" ") + gpt2("202") + \
        gpt2("4")
    assert gpt2("year 2024") == gpt2("year") + gpt2(" 2024") != tokenizer.tokenize("year 2024")[1:]


def test_llama3_special_tokens(llama3_file):
    tokenizer = build_tokenizer("Llama3Tokenizer", tokenizer_model=llama3_file)
    n = 50256
    offsets = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|reserved_special_token_0|>": 2,
               "<|reserved_special_token_3|>": 5, "<|start_header_id|>": 6,
               "<|end_header_id|>": 7, "<|reserved_special_token_4|>": 8, "<|eot_id|>": 9,
               "<|reserved_special_token_5|>": 10, "<|reserved_special_token_250|>": 255}
    for name, offset in offsets.items():
        assert tokenizer.tokenize(name) == [n, n + offset], name  # text of a special: its id
        assert tokenizer.detokenize([n + offset]) == name
    assert tokenizer.tokenize("<|reserved_special_token_251|>")[1] < n  # not one of the 256
    text = "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    assert tokenizer.detokenize(tokenizer.tokenize(text)[1:]) == text


def _meta_pieces(text: str, piece_chars: int = 400_000, run_chars: int = 25_000):
    """Meta's cuts written out one character at a time: 400,000-character
    pieces, each cut again after every `run_chars` characters of one run of
    whitespace (str.isspace) or of non-whitespace."""
    for start in range(0, len(text), piece_chars):
        piece = text[start:start + piece_chars]
        cut, run, run_is_space = 0, 0, None
        for at, char in enumerate(piece):
            if char.isspace() != run_is_space:
                run, run_is_space = 1, char.isspace()
            elif run == run_chars:
                yield piece[cut:at]
                cut, run = at, 1
            else:
                run += 1
        yield piece[cut:]


def test_llama3_long_texts_are_encoded_in_meta_pieces(llama3_file):
    import tiktoken

    from megatron_sr.data.tokenizers.tiktoken_bpe import LLAMA3_PATTERN, _read_tiktoken_ranks

    tokenizer = build_tokenizer("Llama3Tokenizer", tokenizer_model=llama3_file)
    whole = tiktoken.Encoding("reference", pat_str=META_LLAMA3_PATTERN,
                              mergeable_ranks=_read_tiktoken_ranks(llama3_file), special_tokens={})
    assert LLAMA3_PATTERN == META_LLAMA3_PATTERN
    texts = ["abc" * 20_001,  # one 60,003-character word: cut after 25,000 and 50,000
             "hello " * 70_000,  # 420,000 characters: a 400,000 piece ends inside a word
             "\x1c\u3000 " * 9_000 + "tail",  # 27,000 whitespace characters of three kinds
             "word " * 5 + "é" * 30_000 + "\n" * 26_000 + "end"]
    for text in texts:
        pieces = list(_meta_pieces(text))
        assert len(pieces) > 1 and "".join(pieces) == text
        expected = [tokenizer.bos] + [i for p in pieces for i in whole.encode_ordinary(p)]
        assert tokenizer.tokenize(text) == expected
    assert tokenizer.tokenize(texts[0]) != [tokenizer.bos] + whole.encode_ordinary(texts[0])


@pytest.mark.parametrize("content,match", [
    (b"YQ== 0\nnot*base64 1\n", r"bad.model:2: not a tiktoken BPE ranks file: expected a "
                                r"'base64-token rank' line, got b'not\*base64 1'"),
    (b"YQ== 0\nYg== 1 2\n", r"bad.model:2: not a tiktoken BPE ranks file"),
    (b"YQ== 0\n\nYQ== 1\n", r"bad.model:3: token b'a' again"),
    (b"YQ== 0\nYg== 0\n", r"bad.model:2: rank 0 again"),
    (b"YQ== 0\nYg== -1\n", r"bad.model:2: rank -1 is out of range"),
    (b"YQ== 0\nYg== 2\n", r"bad.model: the ranks of its 2 tokens must be 0..1"),
    (b"\n\n", r"bad.model: holds no token"),
])
def test_llama3_bad_file_names_file_and_line(tmp_path, content, match):
    (tmp_path / "bad.model").write_bytes(content)
    with pytest.raises(ValueError, match="--tokenizer-model .*" + match):
        build_tokenizer("Llama3Tokenizer", tokenizer_model=str(tmp_path / "bad.model"))


def test_llama3_reads_only_a_local_file(tmp_path):
    with pytest.raises(ValueError, match="--tokenizer-model .*no such file .*nothing is "
                                         "downloaded"):
        build_tokenizer("Llama3Tokenizer", tokenizer_model=str(tmp_path / "tokenizer.model"))


# ----- tools/preprocess_data.py -----------------------------------------------------------

@pytest.mark.parametrize("kind, model_fixture, bos, eod", [
    ("Llama2Tokenizer", "llama2_model", 1, 2), ("Llama3Tokenizer", "llama3_file", 50256, 50257)])
def test_preprocess_data_end_to_end(kind, model_fixture, bos, eod, request, sample_slice,
                                    tmp_path):
    model = request.getfixturevalue(model_fixture)
    result = subprocess.run(
        [sys.executable, "tools/preprocess_data.py", "--input", sample_slice, "--output-prefix",
         str(tmp_path / "out"), "--append-eod", "--workers", "2", "--tokenizer-type", kind,
         "--tokenizer-model", model], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    dataset = IndexedDataset(str(tmp_path / "out_text_document"))
    tokenizer = build_tokenizer(kind, tokenizer_model=model)
    documents = _documents(sample_slice)
    assert len(dataset) == len(documents)
    for i, text in enumerate(documents):
        assert dataset[i].tolist() == tokenizer.tokenize(text) + [eod]
        assert dataset[i][0] == bos
    assert dataset[0].dtype == np.uint16  # under 65,500 ids (Megatron's choice)
