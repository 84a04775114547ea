#!/usr/bin/env bash
# The main job: bootstraps .venv, then generates a completion with `codegen-jax generate`.
# With no arguments it runs on the committed fixture checkpoint (a tiny random Qwen2 model: the text is noise,
# the point is the whole path: checkpoint -> tokenizer -> paged-KV engine -> sampling -> text).
# Pass your own flags to use a real checkpoint:  scripts/demo.sh --model /path/to/Qwen2.5-Coder-1.5B --prompt "def fib(n):"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
if [ $# -eq 0 ]; then
  echo "demo: running on the fixture checkpoint tests/fixtures/qwen2 (random weights: expect gibberish)" >&2
  set -- --model tests/fixtures/qwen2 --prompt "def fibonacci(n):" --max-new-tokens 32 --json
fi
exec .venv/bin/codegen-jax generate "$@"
