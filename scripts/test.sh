#!/usr/bin/env bash
# The test command: bootstraps .venv, then runs ruff and the CPU test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check .
# The suite compiles far more than it computes: XLA:CPU's LLVM at -O0 compiles its programs ~30% faster (every test
# compares programs compiled alike). Subprocesses that set XLA_FLAGS keep it (tests/conftest.py: xla_flags).
export XLA_FLAGS="--xla_backend_optimization_level=0${XLA_FLAGS:+ $XLA_FLAGS}"
JAX_PLATFORMS=cpu .venv/bin/python -m pytest "$@"
