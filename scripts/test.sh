#!/usr/bin/env bash
# The test command: install picochat with its test extras, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
venv="${PICOCHAT_VENV:-.venv}"
exec "$venv/bin/python" -m pytest -q "$@"
