#!/usr/bin/env bash
# Grounding results for the shipped default adapter (flat KB attention), as committed in benchmarks/results/.
#   bash benchmarks/run_grounding.sh [QUESTIONS] [ANSWER_QUESTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${ATLASKV_SHARED:-../shared}
Q=${1:-500}
A=${2:-200}
export HF_HUB_OFFLINE=1
.venv/bin/atlaskv eval grounding --set $SHARED/eval/fb15k --sizes 10,100,1000,10000 --questions $Q \
  --answer-questions $A --json benchmarks/results/grounding_fb15k_flat.json
.venv/bin/atlaskv eval grounding --set $SHARED/eval/pararel --sizes 10,100,1000,10000 --questions $Q \
  --answer-questions $A --json benchmarks/results/grounding_pararel_flat.json
.venv/bin/atlaskv eval grounding --set $SHARED/eval/fb15k-para --sizes 10,100,1000,10000 --questions $Q \
  --answer-questions $A --distractors same-head --json benchmarks/results/grounding_fb15k-para_samehead_flat.json
