#!/usr/bin/env bash
# The test suite (CPU, tiny models + one integration test on the embedded parent). Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")"
bash install.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} WANDB_MODE=disabled
exec .venv/bin/python -m pytest -q tests/ "$@"
