#!/usr/bin/env bash
# Create .venv and install RADAR with everything it needs, from scratch.
# torch comes first and pinned: on our machines `torch==2.13.0` is the CPU wheel on local disk;
# an unpinned torch (or torchvision) would pull a multi-GB CUDA build. A CUDA host can set
# RADAR_TORCH_SPEC (e.g. "torch==2.13.0 --index-url <its wheel index>").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# shellcheck disable=SC2086  # the spec may hold several words on purpose
.venv/bin/python -m pip install --quiet ${RADAR_TORCH_SPEC:-torch==2.13.0}
.venv/bin/python -m pip install --quiet -e '.[encoders,dev,bench,int8]'
echo "installed: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
