"""The Megatron MMapIndexedDataset format: round trips, the exact header bytes,
and clear errors for damaged files; plus tools/merge_datasets.py."""
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from megatron_sr.data.indexed_dataset import (
    DTYPE_CODES, IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError, optimal_token_dtype,
    write_dataset)

DOCUMENTS = [[5, 6, 7], [1], [], [9, 8, 7, 6, 5, 4, 3, 2], [0]]


def _documents_of(dtype):
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    top = int(info.max) if info else 1e6
    return [np.asarray(d + ([top] if d else []), dtype=dtype) for d in DOCUMENTS]


@pytest.mark.parametrize("dtype", list(DTYPE_CODES.values()), ids=lambda t: np.dtype(t).name)
def test_round_trip_every_dtype(tmp_path, dtype):
    prefix = str(tmp_path / "ds")
    documents = _documents_of(dtype)
    write_dataset(prefix, documents, dtype)
    dataset = IndexedDataset(prefix)
    assert dataset.dtype == dtype
    assert len(dataset) == len(documents)
    for i, document in enumerate(documents):
        assert dataset[i].dtype == dtype
        np.testing.assert_array_equal(dataset[i], document)
    assert dataset.sequence_lengths.tolist() == [len(d) for d in documents]
    assert dataset.document_indices.tolist() == list(range(len(documents) + 1))
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]


def test_header_bytes_follow_the_spec(tmp_path):
    prefix = str(tmp_path / "ds")
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        builder.add_item([10, 11, 12])  # one document made of two sequences
        builder.add_item([13])
        builder.end_document()
        builder.add_document([14, 15])
    expected = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + bytes([8])  # uint16 is code 8
                + struct.pack("<Q", 3) + struct.pack("<Q", 3)
                + np.array([3, 1, 2], "<i4").tobytes()
                + np.array([0, 6, 8], "<i8").tobytes()  # byte offsets
                + np.array([0, 2, 3], "<i8").tobytes())
    assert open(prefix + ".idx", "rb").read() == expected
    assert open(prefix + ".bin", "rb").read() == np.arange(10, 16, dtype="<u2").tobytes()
    dataset = IndexedDataset(prefix)
    np.testing.assert_array_equal(dataset.get(0, 1, 2), [11, 12])
    np.testing.assert_array_equal(dataset.get(2, 1), [15])
    assert dataset.num_tokens == 6


def test_megatron_dtype_codes_and_choice():
    assert {code: np.dtype(t).name for code, t in DTYPE_CODES.items()} == {
        1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64", 7: "float32",
        8: "uint16"}
    assert optimal_token_dtype(50257) == np.uint16
    assert optimal_token_dtype(65499) == np.uint16
    assert optimal_token_dtype(65500) == np.int32


@pytest.fixture
def valid_prefix(tmp_path):
    prefix = str(tmp_path / "ds")
    write_dataset(prefix, [[1, 2, 3], [4, 5]], np.int32)
    return prefix


def _patch(path, offset, new_bytes):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(new_bytes)


def test_truncated_bin_is_named(valid_prefix):
    os.truncate(valid_prefix + ".bin", 12)
    with pytest.raises(IndexedDatasetError, match=r"ds\.bin: has 12 bytes but .*ds\.idx "
                                                   r"describes 20.*truncated"):
        IndexedDataset(valid_prefix)


def test_wrong_magic_is_named(valid_prefix):
    _patch(valid_prefix + ".idx", 0, b"TNTIDX\x00\x00\x00")
    with pytest.raises(IndexedDatasetError, match=r"ds\.idx: wrong magic"):
        IndexedDataset(valid_prefix)


def test_wrong_version_is_named(valid_prefix):
    _patch(valid_prefix + ".idx", 9, struct.pack("<Q", 2))
    with pytest.raises(IndexedDatasetError, match=r"ds\.idx: unsupported version 2"):
        IndexedDataset(valid_prefix)


def test_unknown_dtype_code_is_named(valid_prefix):
    _patch(valid_prefix + ".idx", 17, bytes([9]))
    with pytest.raises(IndexedDatasetError, match=r"ds\.idx: unknown dtype code 9"):
        IndexedDataset(valid_prefix)


def test_truncated_idx_is_named(valid_prefix):
    os.truncate(valid_prefix + ".idx", os.path.getsize(valid_prefix + ".idx") - 8)
    with pytest.raises(IndexedDatasetError, match=r"ds\.idx: has \d+ bytes but its header"):
        IndexedDataset(valid_prefix)
    os.truncate(valid_prefix + ".idx", 5)
    with pytest.raises(IndexedDatasetError, match=r"ds\.idx: 5 bytes is shorter than"):
        IndexedDataset(valid_prefix)


def test_corrupt_pointers_and_document_indices_are_named(valid_prefix):
    _patch(valid_prefix + ".idx", 34 + 8 + 8, struct.pack("<q", 4))  # second pointer
    with pytest.raises(IndexedDatasetError, match=r"ds\.idx: sequence pointer 1 is 4, expected 12"):
        IndexedDataset(valid_prefix)
    _patch(valid_prefix + ".idx", 34 + 8 + 8, struct.pack("<q", 12))
    _patch(valid_prefix + ".idx", 34 + 8 + 16 + 16, struct.pack("<q", 7))  # last doc index
    with pytest.raises(IndexedDatasetError, match=r"ds\.idx: document indices"):
        IndexedDataset(valid_prefix)


def test_missing_file_is_named(valid_prefix):
    os.remove(valid_prefix + ".bin")
    with pytest.raises(IndexedDatasetError, match=r"ds\.bin: no such file"):
        IndexedDataset(valid_prefix)


def test_out_of_range_reads(valid_prefix):
    dataset = IndexedDataset(valid_prefix)
    with pytest.raises(IndexError, match="sequence 2 out of range"):
        dataset[2]
    with pytest.raises(IndexError, match=r"tokens \[1, 4\) are outside sequence 0 of length 3"):
        dataset.get(0, 1, 3)


def test_builder_rejects_tokens_that_do_not_fit(tmp_path):
    with pytest.raises(ValueError, match="do not fit in uint16"):
        with IndexedDatasetBuilder(str(tmp_path / "ds"), np.uint16) as builder:
            builder.add_document([1, 70000])
    assert os.listdir(tmp_path) == []  # the failed build left nothing behind


def test_unfinished_builder_leaves_no_valid_looking_files(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "ds"), np.int32)
    builder.add_document([1, 2, 3])
    assert not any(n.endswith((".bin", ".idx")) for n in os.listdir(tmp_path))
    builder.abort()
    assert os.listdir(tmp_path) == []


def test_rewrite_replaces_both_files(valid_prefix):
    write_dataset(valid_prefix, [[7] * 10], np.int32)
    dataset = IndexedDataset(valid_prefix)
    assert len(dataset) == 1 and dataset[0].tolist() == [7] * 10


def test_empty_dataset(tmp_path):
    write_dataset(str(tmp_path / "ds"), [], np.uint16)
    dataset = IndexedDataset(str(tmp_path / "ds"))
    assert len(dataset) == 0 and dataset.document_indices.tolist() == [0]


def test_merge_datasets_tool(tmp_path):
    parts = tmp_path / "parts"
    write_dataset(str(parts / "a"), [[1, 2], [3]], np.uint16)
    write_dataset(str(parts / "b"), [[4, 5, 6]], np.uint16)
    write_dataset(str(tmp_path / "c"), [[7]], np.uint16)
    result = subprocess.run([sys.executable, "tools/merge_datasets.py", "--input", str(parts),
                             str(tmp_path / "c"), "--output-prefix", str(tmp_path / "all")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    merged = IndexedDataset(str(tmp_path / "all"))
    assert [merged[i].tolist() for i in range(len(merged))] == [[1, 2], [3], [4, 5, 6], [7]]
    assert merged.document_indices.tolist() == [0, 1, 2, 3, 4]
    write_dataset(str(tmp_path / "wide"), [[1]], np.int32)
    result = subprocess.run([sys.executable, "tools/merge_datasets.py", "--input", str(parts),
                             str(tmp_path / "wide"), "--output-prefix", str(tmp_path / "bad")],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "wide.idx: dtype int32 differs" in result.stderr
    assert not (tmp_path / "bad.idx").exists() and not (tmp_path / "bad.bin").exists()


def test_token_id_range_is_cached_by_file_identity(tmp_path):
    """With --data-cache-path the one pass over the .bin happens once per file
    version: a cached range is reused, a changed .bin is read again."""
    prefix = str(tmp_path / "corpus")
    write_dataset(prefix, [[3, 9, 4], [7]], dtype=np.uint16)
    cache = tmp_path / "cache"
    assert IndexedDataset(prefix).token_id_range(cache_path=str(cache)) == (3, 9)
    (record,) = cache.glob("*-token-id-range.json")
    record.write_text('{"token_id_range": [0, 5]}')
    assert IndexedDataset(prefix).token_id_range(cache_path=str(cache)) == (0, 5)
    assert IndexedDataset(prefix).token_id_range() == (3, 9)
    stat = os.stat(prefix + ".bin")
    os.utime(prefix + ".bin", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert IndexedDataset(prefix).token_id_range(cache_path=str(cache)) == (3, 9)
    with pytest.raises(IndexedDatasetError, match="token ids span"):
        IndexedDataset(prefix).check_fits_vocabulary(8, cache_path=str(cache))
