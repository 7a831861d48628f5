#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its test extras (versions as pyproject.toml gives them).
# Python: $PYTHON, else the first of python3.11, python3.12, python3.13, python3 that is 3.11 or newer. pip's own output goes to
# .venv/setup.log; it is printed only when the installation fails.
set -euo pipefail
cd "$(dirname "$0")/.."
new_enough='import sys; sys.exit(sys.version_info < (3, 11))'
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "$new_enough" 2>/dev/null; then
      PY=$candidate
      break
    fi
  done
  if [ -z "$PY" ]; then
    if command -v python3 >/dev/null 2>&1; then
      found="python3 is $(python3 --version 2>&1 | head -n 1)"
    else
      found="nor python3"
    fi
    echo "setup: needs Python 3.11 or newer: no python3.11, 3.12 or 3.13 on PATH, $found (set PYTHON=/path/to/python3.11)" >&2
    exit 1
  fi
elif ! command -v "$PY" >/dev/null 2>&1; then
  echo "setup: PYTHON=$PY: not found" >&2
  exit 1
elif ! "$PY" -c "$new_enough" >/dev/null 2>&1; then
  echo "setup: PYTHON=$PY is not a Python 3.11 or newer" >&2
  exit 1
fi
if [ -e .venv ] && ! .venv/bin/python -c "$new_enough" >/dev/null 2>&1; then
  echo "setup: .venv holds an older or broken Python; making it again with $PY" >&2
  rm -rf .venv
fi
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
