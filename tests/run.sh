#!/usr/bin/env bash
# Installs megatron_sr with its test extras into .venv and runs the test suite.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -m "not slow" -x`.
# MEGATRON_SR_TEST_PYTHON: a python that already has megatron_sr and its test
# extras (the Docker image sets it): used as is, nothing is installed into it;
# the test data (GPT-2 BPE files, sample corpus) is fetched into .cache/ first,
# as tools/install.sh does, so that no test downloads anything.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${MEGATRON_SR_TEST_PYTHON:-}" ]; then
  python="$MEGATRON_SR_TEST_PYTHON"
  "$python" "$root/tools/prepare_sample_corpus.py" --gpt2-files >/dev/null
else
  venv="${VENV:-$root/.venv}"
  VENV="$venv" bash "$root/tools/install.sh"
  python="$venv/bin/python"
fi
cd "$root"
exec "$python" -m pytest "$@"
