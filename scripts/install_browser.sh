#!/usr/bin/env bash
# Install what the web-page test needs: Debian's headless-capable Chromium with its WebDriver
# (apt) and the Selenium client (pip), each only when it is missing. Run as root (or via sudo).
#   usage: scripts/install_browser.sh [PYTHON]   (PYTHON defaults to $PICOCHAT_VENV/bin/python or python3)
set -euo pipefail

python="${1:-${PICOCHAT_VENV:+$PICOCHAT_VENV/bin/python}}"
python="${python:-python3}"

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

echo "browser: $(chromium --version); $(chromedriver --version | head -1); selenium $("$python" -c 'import selenium; print(selenium.__version__)')"
