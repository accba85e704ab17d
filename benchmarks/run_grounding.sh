#!/usr/bin/env bash
# Grounding results for an adapter (default: the shipped one), flat KB attention, as committed in
# benchmarks/results/. Answers are also scored with the shipped refusal rule (*_with_refusal fields).
#   [ADAPTER=path] [OUT=dir] bash benchmarks/run_grounding.sh [QUESTIONS] [ANSWER_QUESTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${ATLASKV_SHARED:-../shared}
Q=${1:-500}
A=${2:-100}
OUT=${OUT:-benchmarks/results}
ADAPTER_ARG=${ADAPTER:+--adapter $ADAPTER}
export HF_HUB_OFFLINE=1
run() {  # set, json name, extra options
  .venv/bin/atlaskv eval grounding --set $SHARED/eval/$1 --sizes 10,100,1000,10000 --questions $Q --no-prune \
    --answer-questions $A --refuse-below 3.23 $ADAPTER_ARG "${@:3}" --json $OUT/$2
}
mkdir -p $OUT
run fb15k grounding_fb15k_flat.json
run pararel grounding_pararel_flat.json
run fb15k-para grounding_fb15k-para_samehead_flat.json --distractors same-head
