#!/usr/bin/env bash
# The main job: install picochat, run every stage on the embedded synthetic world (cpu preset),
# write the report card to runs/demo/report.md, then open a chat with the result.
# Rerunning it skips finished stages and resumes an interrupted one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
venv="${PICOCHAT_VENV:-.venv}"
run="${PICOCHAT_RUN:-runs/demo}"
"$venv/bin/picochat" speedrun --preset cpu --run "$run"
"$venv/bin/picochat" chat --run "$run" --prompt "Who are you?"
if [ -t 0 ]; then
  exec "$venv/bin/picochat" chat --run "$run"
fi
