#!/usr/bin/env bash
# Install what the web-page test needs: Debian's headless-capable Chromium with its WebDriver
# (apt) and the Selenium client (pip), each only when it is missing. Runs apt-get as root, or
# through sudo.
#   usage: scripts/install_browser.sh [PYTHON]
#   PYTHON: the interpreter that runs the tests (default: ${PICOCHAT_VENV:-.venv}/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."

python="${1:-${PICOCHAT_VENV:-.venv}/bin/python}"
if [ ! -x "$python" ] && ! command -v "$python" >/dev/null; then
    python=python3
fi

if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    sudo_cmd=""
    if [ "$(id -u)" != 0 ]; then
        sudo_cmd="sudo"
    fi
    export DEBIAN_FRONTEND=noninteractive
    $sudo_cmd apt-get update -qq
    $sudo_cmd apt-get install -y -qq --no-install-recommends chromium chromium-driver
fi

if ! "$python" -c "import selenium" 2>/dev/null; then
    "$python" -m pip install --quiet "selenium>=4.10"
fi

echo "browser: $(chromium --version 2>/dev/null); $(chromedriver --version | head -1); selenium $("$python" -c 'import selenium; print(selenium.__version__)')"
