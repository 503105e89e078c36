#!/usr/bin/env bash
# Installs megatron_sr with its test extras into .venv and runs the test suite.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -m "not slow" -x`.
# MEGATRON_SR_TEST_PYTHON: a python that already has megatron_sr and its test
# extras (the Docker image sets it): used as is, nothing is installed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${MEGATRON_SR_TEST_PYTHON:-}" ]; then
  python="$MEGATRON_SR_TEST_PYTHON"
else
  venv="${VENV:-$root/.venv}"
  VENV="$venv" bash "$root/tools/install.sh"
  python="$venv/bin/python"
fi
cd "$root"
exec "$python" -m pytest "$@"
