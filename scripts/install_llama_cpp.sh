#!/usr/bin/env bash
# Build llama.cpp (CPU) into .venv through llama-cpp-python, for the GGUF checks:
#   pytest -m llama_cpp  and  bench/bench_gguf_llamacpp.py
# Compiles C++ from the PyPI source package: about 3 minutes on 2 cores. Needs cmake and a
# C++17 compiler. The pin is the version whose vendored llama.cpp was checked with the
# 'deci' export (per-layer heads/MLP widths, attention-free layers, q/k/v biases).
# Extra CMake flags (e.g. -DGGML_CUDA=on) can be passed in CMAKE_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "run scripts/install.sh first" >&2; exit 1; }
VERSION=0.3.36  # keep in sync with the 'llamacpp' extra in pyproject.toml
# GGML_NATIVE=OFF: a portable build (not tuned to this CPU); LLAVA_BUILD=OFF: skip the
# multimodal library, which the checks do not use
export CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF ${CMAKE_ARGS:-}"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
start=$(date +%s)
.venv/bin/pip install --no-binary llama-cpp-python "llama-cpp-python==${VERSION}"
echo "llama-cpp-python ${VERSION} installed in $(( $(date +%s) - start )) s (already built: seconds; a fresh build: minutes)"
.venv/bin/python -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
