#!/usr/bin/env bash
# The test command: install picochat with its test extras (and headless Chromium for the web-page
# test), then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
venv="${PICOCHAT_VENV:-.venv}"
bash scripts/install_browser.sh "$venv/bin/python" || echo "test.sh: could not install Chromium; the web-page test will be skipped"
exec "$venv/bin/python" -m pytest -q "$@"
