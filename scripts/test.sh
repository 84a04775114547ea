#!/usr/bin/env bash
# The test command: bootstraps .venv, then runs ruff and the CPU test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check .
JAX_PLATFORMS=cpu .venv/bin/python -m pytest "$@"
