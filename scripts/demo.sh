#!/usr/bin/env bash
# Set up from nothing, then run the demo: train a model, serve it, send signed requests, show the decisions.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/retention demo "$@"
