#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its test extras (versions as pyproject.toml gives them).
# pip's own output goes to .venv/setup.log; it is printed only when the installation fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  log=.venv/setup.log
  echo "setup: installing the project and its dependencies into .venv (a few minutes the first time; log: $log)" >&2
  if ! { .venv/bin/python -m pip install --upgrade pip && .venv/bin/python -m pip install -e '.[test]'; } >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "setup: pip failed (the whole log: $log)" >&2
    exit 1
  fi
  rm -f .venv/.installed-* && touch "$stamp"
fi
