#!/usr/bin/env bash
# Installs megatron_sr with its test extras into .venv and runs the test suite.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -m "not slow" -x`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv}"
VENV="$venv" bash "$root/tools/install.sh"
cd "$root"
exec "$venv/bin/python" -m pytest "$@"
