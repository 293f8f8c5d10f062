#!/usr/bin/env bash
# Install picochat into a virtual environment (./.venv unless PICOCHAT_VENV says otherwise).
# Usage: bash scripts/setup.sh [EXTRAS]     e.g. `bash scripts/setup.sh dev`
# Where no torch is installed and no NVIDIA GPU is found, the CPU build torch==2.13.0 goes in
# first; with a GPU, plain pip resolves `torch>=2.5` to a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${PICOCHAT_VENV:-.venv}"
extras="${1:-}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
if ! "$py" -c "import torch" 2>/dev/null && ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "picochat setup: no torch and no NVIDIA GPU: installing the CPU build torch==2.13.0"
  "$py" -m pip install --quiet "torch==2.13.0"
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
"$py" -m pip install --quiet -e "$spec"
echo "picochat setup: installed into $venv"
