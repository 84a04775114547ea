#!/usr/bin/env bash
# Creates .venv on Python 3.12 and installs the project with its exact pins. Idempotent and quiet when done.
# Finds python3.12 on the PATH, then under pyenv; set PYTHON=/path/to/python3.12 to choose one yourself.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  local c
  for c in "${PYTHON:-}" python3.12 "$(command -v pyenv >/dev/null 2>&1 && PYENV_VERSION=3.12 pyenv which python3.12 2>/dev/null)" \
           "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/local/bin/python3.12 /usr/bin/python3.12; do
    [ -n "$c" ] || continue
    if "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; then
      command -v "$c" || echo "$c"; return 0
    fi
  done
  return 1
}

stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -x .venv/bin/python ]; then
  py=$(find_python) || { echo "bootstrap: no Python 3.12 found; install one (e.g. 'pyenv install 3.12') or set PYTHON=/path/to/python3.12" >&2; exit 2; }
  echo "bootstrap: creating .venv with $py" >&2
  "$py" -m venv .venv
fi
if [ ! -f "$stamp" ]; then
  echo "bootstrap: installing codegen-jax and its pinned dependencies into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip >&2
  .venv/bin/python -m pip install -q -e ".[dev]" >&2
  rm -f .venv/.installed-*; touch "$stamp"
fi
# The remote KV tier's tests run against a real redis-server (Debian's package); install it where we can.
if ! command -v redis-server >/dev/null 2>&1 && [ ! -x /usr/bin/redis-server ] && [ -z "${REDIS_SERVER:-}" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: installing redis-server (apt-get)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; } >/dev/null 2>&1 \
      || { echo "bootstrap: apt-get install redis-server failed" >&2; exit 2; }
  else
    echo "bootstrap: redis-server is missing: 'sudo apt-get install redis-server' or set REDIS_SERVER=/path" >&2
    exit 2
  fi
fi
