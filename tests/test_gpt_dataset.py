"""The GPT dataset: samples are the right windows of the concatenated
documents, deterministic, disjoint across splits; blending follows the
weights at every prefix; the index cache is hit and invalidated correctly."""
import os
import sys

import numpy as np
import pytest
import torch

from megatron_sr.config import DataConfig
from megatron_sr.data import gpt_dataset
from megatron_sr.data.gpt_dataset import (
    BlendedDataset, GPTDataset, blending_indices, build_document_index, build_gpt_datasets,
    build_sample_index, parse_data_path, parse_split, split_document_ranges)
from megatron_sr.data.indexed_dataset import IndexedDataset, write_dataset
from megatron_sr.data.tokenizers import NullTokenizer

pytest_plugins = ["data_fixtures"]

SEQ_LENGTH = 16


def make_documents(num_documents, first_token, seed):
    """Documents of varied length (empty ones included) whose tokens are
    consecutive integers, so each token says where it came from."""
    lengths = np.random.default_rng(seed).integers(0, 40, size=num_documents)
    lengths[3] = 0
    starts = first_token + np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return [np.arange(s, s + n, dtype=np.int32) for s, n in zip(starts, lengths)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three prefixes with disjoint token ranges: A from 0, B from 100000, C from 200000."""
    folder = tmp_path_factory.mktemp("gpt")
    prefixes = {}
    for number, name in enumerate("ABC"):
        prefix = str(folder / name)
        write_dataset(prefix, make_documents(200, 100000 * number, seed=number), np.int32)
        prefixes[name] = prefix
    return prefixes


def config(data_path, tmp_path=None, **overrides):
    fields = dict(data_path=list(data_path), split="80,10,10", seq_length=SEQ_LENGTH,
                  data_cache_path=str(tmp_path / "cache") if tmp_path else None)
    fields.update(overrides)
    return DataConfig(**fields)


def test_every_sample_is_the_right_window(corpus):
    """The samples are the windows ``stream[k * s : (k + 1) * s + 1]`` of the
    raw documents concatenated in the epochs' document order, each window
    once, in shuffled order (the sample and shuffle indices are not consulted)."""
    documents = make_documents(200, 0, seed=0)  # what corpus["A"] holds
    dataset = GPTDataset(IndexedDataset(corpus["A"]), "train", (0, 150), num_samples=300,
                         seq_length=SEQ_LENGTH, seed=7)
    assert len(dataset) >= 300
    stream = np.concatenate([documents[d] for d in dataset.document_index]).tolist()
    windows = [tuple(stream[k * SEQ_LENGTH:(k + 1) * SEQ_LENGTH + 1]) for k in range(len(dataset))]
    samples = []
    for i in range(len(dataset)):
        tokens = dataset[i]["tokens"]
        assert tokens.dtype == torch.int64 and tokens.shape == (SEQ_LENGTH + 1,)
        samples.append(tuple(tokens.tolist()))
    assert sorted(samples) == sorted(windows)
    assert samples != windows  # shuffled


def test_document_index_is_a_permutation_per_epoch(corpus):
    indexed = IndexedDataset(corpus["A"])
    dataset = GPTDataset(indexed, "train", (10, 60), num_samples=500, seq_length=SEQ_LENGTH,
                         seed=3)
    epochs = dataset.document_index.reshape(-1, 50)
    assert len(epochs) >= 2
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(10, 60))
    assert not np.array_equal(epochs[0], epochs[1])


def test_deterministic_for_a_seed(corpus):
    datasets = [build_gpt_datasets(config([corpus["A"]]), None, [200, 20, 20], seed)
                for seed in (1, 1, 2)]
    first, again, other = ([d[0][i]["tokens"] for i in range(200)] for d in datasets)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_splits_do_not_overlap(corpus):
    train, valid, test = build_gpt_datasets(config([corpus["A"]]), None, [400, 50, 50], 5)
    ranges = split_document_ranges("80,10,10", 200)
    assert ranges == [(0, 160), (160, 180), (180, 200)]
    indexed = IndexedDataset(corpus["A"])
    split_tokens = []
    for dataset, (start, end) in zip((train, valid, test), ranges):
        assert set(np.unique(dataset.document_index).tolist()) <= set(range(start, end))
        allowed = set(np.concatenate([indexed[d] for d in range(start, end)]).tolist())
        used = set(torch.cat([dataset[i]["tokens"] for i in range(len(dataset))]).tolist())
        assert used <= allowed
        split_tokens.append(used)
    assert not (split_tokens[0] & split_tokens[1] or split_tokens[0] & split_tokens[2]
                or split_tokens[1] & split_tokens[2])


def test_blending_follows_weights_at_every_prefix():
    for weights in ([0.3, 0.7], [0.5, 0.25, 0.25], [0.01, 0.19, 0.8], [1, 1, 1, 1, 1, 1, 1]):
        num_samples = 5000
        dataset_index, dataset_sample_index = blending_indices(weights, num_samples)
        expected = np.asarray(weights) / np.sum(weights)
        served = np.arange(1, num_samples + 1)
        for d in range(len(weights)):
            fraction = np.cumsum(dataset_index == d) / served
            assert np.abs(fraction[999:] - expected[d]).max() < 0.01, (weights, d)
            np.testing.assert_array_equal(dataset_sample_index[dataset_index == d],
                                          np.arange(np.sum(dataset_index == d)))


def test_blended_datasets_draw_from_the_weighted_prefixes(corpus):
    data_path = ["0.2", corpus["A"], "0.5", corpus["B"], "0.3", corpus["C"]]
    train, valid, _ = build_gpt_datasets(config(data_path), None, [2000, 100, 0], 11)
    assert isinstance(train, BlendedDataset) and len(train) == 2000
    source_of_first_token = [train[i]["tokens"][0].item() // 100000 for i in range(2000)]
    np.testing.assert_array_equal(source_of_first_token, train.dataset_index)
    counts = np.bincount(train.dataset_index, minlength=3) / 2000
    np.testing.assert_allclose(counts, [0.2, 0.5, 0.3], atol=0.002)
    assert len(valid) == 100


def test_unweighted_prefixes_are_weighted_by_tokens(corpus):
    train, _, _ = build_gpt_datasets(config([corpus["A"], corpus["B"]]), None, [1000, 0, 0], 1)
    tokens = [IndexedDataset(corpus[n]).num_tokens for n in "AB"]
    assert abs(np.mean(train.dataset_index == 0) - tokens[0] / sum(tokens)) < 0.01


def test_cache_hit_and_rebuild_on_change(corpus, tmp_path):
    def build(seed=1, samples=(300, 20, 0), **data_overrides):
        return build_gpt_datasets(config([corpus["A"]], tmp_path, **data_overrides), None,
                                  samples, seed)

    first = build()
    assert not first[0].loaded_from_cache
    files = sorted(os.listdir(tmp_path / "cache"))
    assert len(files) == 8  # train and valid: three indices and a description each
    second = build()
    assert second[0].loaded_from_cache and second[1].loaded_from_cache
    assert all(torch.equal(first[0][i]["tokens"], second[0][i]["tokens"]) for i in range(300))
    for change in (dict(seed=2), dict(seq_length=8), dict(samples=(301, 20, 0)),
                   dict(split="70,20,10")):
        assert not build(**change)[0].loaded_from_cache, change
    # Same prefix path, different contents: the lengths digest changes the key.
    write_dataset(str(tmp_path / "A"), make_documents(200, 0, seed=99), np.int32)
    changed = build_gpt_datasets(config([str(tmp_path / "A")], tmp_path), None, [300, 0, 0], 1)
    assert not changed[0].loaded_from_cache
    assert not any(".tmp-" in name for name in os.listdir(tmp_path / "cache"))


def _indices_and_python_lines_run(lengths: np.ndarray, seq_length: int):
    """(document index, sample index, number of Python lines of gpt_dataset.py
    executed while building them)."""
    lines_run = 0

    def trace(frame, event, arg):
        nonlocal lines_run
        if frame.f_code.co_filename != gpt_dataset.__file__:
            return None
        lines_run += event == "line"
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        document_index = build_document_index(np.arange(len(lengths)), 1, np.random.RandomState(0))
        num_samples = (int(lengths.sum()) - 1) // seq_length
        sample_index = build_sample_index(lengths, document_index, seq_length, num_samples)
    finally:
        sys.settrace(previous)
    return document_index, sample_index, lines_run


def test_sample_index_of_1e8_tokens_is_built_without_a_python_loop():
    """The indices are numpy array operations: the Python lines run are the
    same for 1e3 and 1e5 documents (no per-document or per-sample loop)."""
    rng = np.random.default_rng(0)
    small = rng.integers(1, 2000, size=1_000).astype(np.int32)
    lengths = rng.integers(1, 2000, size=100_000).astype(np.int32)
    assert lengths.sum() > 9.9e7
    _, _, lines_for_small = _indices_and_python_lines_run(small, 1024)
    document_index, sample_index, lines_run = _indices_and_python_lines_run(lengths, 1024)
    assert lines_run == lines_for_small
    num_samples = len(sample_index) - 1
    assert num_samples == (int(lengths.sum()) - 1) // 1024
    starts = np.concatenate([[0], np.cumsum(lengths[document_index], dtype=np.int64)])
    k = np.arange(0, num_samples + 1, 997)
    np.testing.assert_array_equal(starts[sample_index[k, 0]] + sample_index[k, 1], k * 1024)


def test_mock_data():
    train, valid, test = build_gpt_datasets(config([], mock_data=True), NullTokenizer(500),
                                            [10, 3, 0], 4)
    assert len(train) == 10 and len(valid) == 3 and test is None
    sample = train[2]["tokens"]
    assert sample.shape == (SEQ_LENGTH + 1,) and int(sample.max()) < 501
    assert torch.equal(sample, build_gpt_datasets(config([], mock_data=True), NullTokenizer(500),
                                                  [10, 3, 0], 4)[0][2]["tokens"])
    assert not torch.equal(train[0]["tokens"], valid[0]["tokens"])


def test_on_the_preprocessed_sample_corpus(sample_slice, gpt2_files, tmp_path):
    from megatron_sr.data.preprocessing import TokenizerSpec, preprocess

    spec = TokenizerSpec("GPT2BPETokenizer", *gpt2_files)
    preprocess([sample_slice], str(tmp_path / "slice"), spec, append_eod=True, log=None)
    data = config([str(tmp_path / "slice_text_document")], split="949,50,1", seq_length=64)
    train, valid, test = build_gpt_datasets(data, spec.build(), [500, 10, 0], 1234)
    assert len(train) >= 500 and train[499]["tokens"].shape == (65,)
    assert test is None


def test_bad_flags_are_named(corpus):
    with pytest.raises(ValueError, match="--split 'a,b'"):
        parse_split("a,b")
    with pytest.raises(ValueError, match="--split"):
        parse_split("0,0,0")
    assert parse_split("98,2") == [0.98, 0.02, 0.0]
    with pytest.raises(ValueError, match="--data-path is empty"):
        parse_data_path([])
    with pytest.raises(ValueError, match="--data-path .*weight-prefix pairs"):
        parse_data_path(["0.5", "A", "0.5"])
    with pytest.raises(ValueError, match="--data-path .*every prefix or none"):
        parse_data_path(["A", "0.5"])
    with pytest.raises(ValueError, match="test split .* has no tokens; adjust --split"):
        build_gpt_datasets(config([corpus["A"]], split="100,0,0"), None, [10, 0, 5], 1)

