#!/usr/bin/env bash
# Set everything up on a fresh machine and serve a working router on 127.0.0.1:8000.
# Until a trained router ships, the model is the tiny random Qwen3-VL router (made here once).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
[ -f model_store/tiny/router.json ] || .venv/bin/radar make-tiny-model model_store/tiny
exec .venv/bin/radar serve "$@"
