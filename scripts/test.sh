#!/usr/bin/env bash
# Install from scratch (if needed), lint, and run the whole test suite: what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
bash scripts/audit.sh
.venv/bin/python -m pytest "$@"
