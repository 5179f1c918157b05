#!/usr/bin/env bash
# The whole pipeline on the embedded parent (SmolLM2-135M-Instruct), CPU-sized budgets, ending with the results
# tables. Each stage is skipped when its output is already complete, so a crashed run.sh resumes where it stopped.
#   bash run.sh                 # runs/smol, about an hour on a 2-core CPU
#   NAME=exp2 bash run.sh       # another run directory
# Larger budgets (GPU) are flags of each stage script; see the README.
set -euo pipefail
cd "$(dirname "$0")"
bash install.sh
export WANDB_MODE=${WANDB_MODE:-offline} OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
PY=.venv/bin/python
NAME=${NAME:-smol}
R=runs/$NAME
D=data/$NAME
mkdir -p "$R/metrics"

# stage LABEL DONE_PATH CMD...: run CMD unless DONE_PATH exists; record wall time in metrics/timings.json
stage() {
  local label=$1 done=$2; shift 2
  if [ -e "$done" ]; then echo "== $label: done ($done)"; return; fi
  echo "== $label: $*"
  local t0=$SECONDS
  "$@"
  $PY -c "import json,os,sys; p='$R/metrics/timings.json'; t=json.load(open(p)) if os.path.exists(p) else {}; t['$label']=$((SECONDS - t0)); json.dump(t, open(p,'w'), indent=1)"
}

stage parent        "$R/parent/COMPLETED"          $PY -m common.parent --out "$R/parent"
stage eval_parent   "$R/metrics/parent.json"       $PY -m common.evaluate --model "$R/parent" --parent "$R/parent" --stage parent --run-dir "$R"

$PY -m common.report --run-dir "$R"
