#!/usr/bin/env bash
# All five methods side by side (issue 7) on the same questions and KBs (seed 0): one JSON per set and
# method in benchmarks/results/methods/, summarised by benchmarks/summarize_methods.py.
#   bash benchmarks/run_methods.sh [QUESTIONS] [ANSWER_QUESTIONS] [METHODS]   (SIZES=..., ICL_SIZES=... to change;
#   TAG=_x appends _x to the JSON names, for extra sizes run separately: summarize_methods.py merges them)
# Committed: "rag zeroshot" with the defaults; atlaskv with SIZES=100,1000,10000 and again with TAG=_10
# SIZES=10; icl with ICL_SIZES=10,100,1000.
# kblam (flat) rows are the committed grounding_*_flat.json runs (same seed, questions and KBs).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${ATLASKV_SHARED:-../shared}
Q=${1:-500}
A=${2:-100}
METHODS=${3:-"rag zeroshot atlaskv icl"}
OUT=benchmarks/results/methods
mkdir -p $OUT
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# heavy jobs one at a time on this 2-core machine (other torch jobs take the same lock)
ev() { flock /tmp/atlaskv-heavy.lock .venv/bin/atlaskv eval grounding --questions $Q --answer-questions $A "$@"; }
for m in $METHODS; do
  sizes=${SIZES:-10,100,1000,10000}
  [ $m = icl ] && sizes=${ICL_SIZES:-10,100,1000}   # 1,000 facts already overflow SmolLM2's 8,192-token window
  ev --method $m --set $SHARED/eval/fb15k --sizes $sizes --json $OUT/fb15k_$m${TAG:-}.json
  ev --method $m --set $SHARED/eval/pararel --sizes $sizes --json $OUT/pararel_$m${TAG:-}.json
  ev --method $m --set $SHARED/eval/fb15k-para --distractors same-head --sizes $sizes \
    --json $OUT/fb15k-para_samehead_$m${TAG:-}.json
done
